"""Node ``import-adapter``: a peft LoRA adapter folder given on the command line (``--adapter_path``,
or the ``adapter/`` of a ``grove finetune`` / ``olive finetune`` output) brought into the store, laid
out as train-adapter's output (``adapter/``), so the nodes after it take either alike."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from prefect import task

from grove.artifacts import Artifact, Source, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, run_node
from grove.store import sha256_file
from tasks._onnx_adapter import read_adapter

__all__ = ["ADAPTER_FILES", "ImportAdapterConfig", "import_adapter", "resolve_adapter"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ImportAdapterConfig(StepConfig):
    NODE = "import-adapter"
    VERSION = 1


def resolve_adapter(path: str) -> Source:
    """A local adapter folder pinned by its files' sha256 (the adapter's identity in every later key).
    Raises InvalidRequest when it is not a LoRA adapter folder."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise InvalidRequest(f"--adapter_path {path}: no such folder; pass the folder holding adapter_config.json "
                             "and adapter_model.safetensors")
    config, _ = read_adapter(folder)
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(f"{name}\0{sha256_file(folder / name)}\n".encode())
    return Source(kind="local", location=str(folder), digest=digest.hexdigest(), files=list(ADAPTER_FILES),
                  model_type="lora", architectures=[str(config.get("base_model_name_or_path") or "")])


@task(name="import-adapter", cache_policy=RECIPE_CACHE)
def import_adapter(source: Source, config: ImportAdapterConfig, store: str) -> Artifact:
    return run_node(config, [source], store, lambda _inputs, _cfg, out: _import(source, out))


def _import(source: Source, out: Path) -> dict[str, object]:
    (out / "adapter").mkdir()
    for name in source.files:
        shutil.copy2(Path(source.location) / name, out / "adapter" / name)
    return {"adapter": source.location}
