"""Pieces of grove_report.json shared by the decoder and encoder packaging nodes."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["lineage", "ratio"]


def ratio(a: object, b: object) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 4)
    return None


def lineage(folder: Path) -> dict[str, object]:
    """The manifest facts of one input artifact: what built it, from what, how long it took."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return {k: manifest[k] for k in ("node", "node_version", "digest", "inputs", "config", "seconds")}
