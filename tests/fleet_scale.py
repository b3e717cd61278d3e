"""A large fleet without building it: distinct model folders that resolve (a config, a tokenizer
and weights by name, a few bytes each) and a registry whose ``latest`` already holds each entry's
version, as a nightly refresh finds it when nothing changed upstream. Shared by
tests/flows/test_fleet_scale.py and bench/bench_fleet.py --scale."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from grove.flows.fleet import FleetManifest, entry_version, fleet_entries

__all__ = ["fill_registry", "scale_manifest"]

TARGETS = {"cpu": {"device": "cpu"}, "cpu-fp32": {"device": "cpu", "precision": "fp32"}}


def _source(folder: Path, seed: int) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(f"weights of model {seed}".encode())
    return str(folder)


def scale_manifest(base: Path, entries: int, store: str, **fields: object) -> FleetManifest:
    """``entries`` entries: entries / 2 models, each on the two TARGETS, each its own source folder."""
    models = [{"name": f"m{i:05d}", "source": _source(base / f"m{i:05d}", i), "targets": list(TARGETS)}
              for i in range(entries // len(TARGETS))]
    return FleetManifest.model_validate({"store": store, "targets": TARGETS, "models": models, **fields})


def fill_registry(manifest: FleetManifest, skip: frozenset[str] = frozenset()) -> None:
    """Point every entry's ``latest`` (but those of the models in ``skip``) at the version its
    source and target make now, as publish-registry writes it (no version folder: a refresh reads
    only the pointers)."""
    from grove.tasks import _sources
    from grove.tasks.publish_model import point_latest

    with _sources.remembering_in_bulk():
        digests = {m.source: _sources.resolve(m.source).digest for m in manifest.models if m.name not in skip}

    def point(entry: tuple[str, str, str]) -> None:
        name, target, source = entry
        version = entry_version(digests[source], manifest.targets[target])
        point_latest(manifest.store, name, target, version, "filled-by-the-bench", digests[source])

    todo = [(m.name, t, m.source) for m, t in fleet_entries(manifest) if m.name not in skip]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(point, todo))
