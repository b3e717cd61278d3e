"""The four floors' contracts cover the whole core, and no code imports the plain `tasks` / `flows`
packages (they install as grove.tasks / grove.flows). scripts/check.sh runs the contracts."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_every_core_module_is_under_the_core_contract() -> None:
    (core,) = [c for c in CONTRACTS if c["type"] == "forbidden"]
    modules = {f"grove.{p.stem}" for p in (ROOT / "grove").glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert set(core["source_modules"]) == modules, "list each module of grove/ in the core contract"
    assert set(core["forbidden_modules"]) == {"grove.tasks", "grove.flows", "grove.shell"}
    assert "ignore_imports" not in core, "the core has no exceptions"


def test_the_floors_are_in_order() -> None:
    (layers,) = [c for c in CONTRACTS if c["type"] == "layers"]
    assert layers["layers"] == ["grove.shell", "grove.flows", "grove.tasks"]
    assert "ignore_imports" not in layers


def test_nothing_imports_plain_tasks_or_flows() -> None:
    plain = re.compile(r"^\s*(from|import) (tasks|flows)\b", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("grove", "tasks", "flows", "tests", "bench")
                 for p in (ROOT / folder).rglob("*.py") if plain.search(p.read_text())]
    assert offenders == []
