"""Pieces of grove_report.json shared by the decoder and encoder packaging nodes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

__all__ = ["REPORT", "copy_model_files", "ratio", "write_report"]

REPORT = "grove_report.json"


def ratio(a: object, b: object) -> float | None:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return round(a / b, 4)
    return None


def copy_model_files(model_dir: Path, out: Path) -> None:
    """Every file of a model artifact except its store manifest."""
    for f in model_dir.iterdir():
        if f.is_file() and f.name != "manifest.json":
            shutil.copy2(f, out / f.name)


def write_report(out: Path, *, model: str, target: dict[str, object], metrics: dict[str, object],
                 reference: dict[str, object], reference_precision: str, ratios: dict[str, object],
                 inputs: list[Path]) -> None:
    """grove_report.json: the same shape for every path (decoder, encoder). ``reference`` holds the
    metrics of the unquantized model the output is compared with (fp32 on CPU; fp16 for GPU decoders,
    the builder's CUDA precision), its precision under ``reference.precision``."""
    from grove import __version__
    from grove.store import lineage_of

    report = {"grove_version": __version__, "model": model, "target": target, "metrics": metrics,
              "reference": {"precision": reference_precision, **reference}, "ratios": ratios,
              "lineage": lineage_of(inputs),
              "files": sorted({f.name for f in out.iterdir()} | {REPORT})}
    (out / REPORT).write_text(json.dumps(report, indent=2))
