"""Node ``import-adapter``: a peft LoRA adapter folder given on the command line (``--adapter_path``,
or the ``adapter/`` of a ``grove finetune`` / ``olive finetune`` output) brought into the store, laid
out as train-adapter's output (``adapter/``), so the nodes after it take either alike."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from prefect import task

from grove.artifacts import Artifact, Source, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, run_node
from grove.store import sha256_file
from grove.tasks._onnx_adapter import adapter_kind, read_adapter

__all__ = ["ADAPTER_FILES", "ImportAdapterConfig", "import_adapter", "resolve_adapter"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class ImportAdapterConfig(StepConfig):
    NODE = "import-adapter"
    VERSION = 1


def resolve_adapter(path: str) -> Source:
    """A local adapter folder pinned by its files' sha256 (the adapter's identity in every later key);
    its model_type is the adapter's method (lora, dora, loha, lokr). Raises InvalidRequest when it is
    not an adapter folder peft can merge."""
    folder = _s3_copy(path) if path.startswith("s3://") else Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise InvalidRequest(f"--adapter_path {path}: no such folder; pass the folder holding adapter_config.json "
                             "and adapter_model.safetensors")
    config, _ = read_adapter(folder, switchable=False)
    digest = hashlib.sha256()
    for name in ADAPTER_FILES:
        digest.update(f"{name}\0{sha256_file(folder / name)}\n".encode())
    return Source(kind="local", location=str(folder), digest=digest.hexdigest(), files=list(ADAPTER_FILES),
                  model_type=adapter_kind(config), architectures=[str(config.get("base_model_name_or_path") or "")])


@task(name="import-adapter", cache_policy=RECIPE_CACHE)
def import_adapter(source: Source, config: ImportAdapterConfig, store: str) -> Artifact:
    return run_node(config, [source], store, lambda _inputs, _cfg, out: _import(source, out))


def _import(source: Source, out: Path) -> dict[str, object]:
    (out / "adapter").mkdir()
    for name in source.files:
        shutil.copy2(Path(source.location) / name, out / "adapter" / name)
    return {"adapter": source.location}


def _s3_copy(uri: str) -> Path:
    """An s3:// adapter folder copied into this machine's caches, keyed by its objects' ETags (a changed
    adapter is a new copy; an unchanged one is read once)."""
    from grove.errors import StoreError
    from grove.store import ArtifactStore, cache_home, download_file, mark_used

    remote = ArtifactStore(uri.rstrip("/"))
    try:
        listing = {Path(name).name: info for name, info in remote.fs.find(remote.root, detail=True).items()}
    except (OSError, ValueError) as exc:
        raise StoreError(f"--adapter_path {uri} cannot be listed ({exc}); check the URI and AWS_* credentials") from exc
    if missing := [n for n in ADAPTER_FILES if n not in listing]:
        raise InvalidRequest(f"--adapter_path {uri} has no {missing[0]}; pass the folder holding "
                             f"{' and '.join(ADAPTER_FILES)}")
    key = hashlib.sha256(json.dumps([uri, [str(listing[n].get("ETag") or listing[n].get("size")) for n in
                                           ADAPTER_FILES]]).encode()).hexdigest()[:32]
    local = cache_home() / "s3-adapters" / key
    for name in ADAPTER_FILES:
        if not (local / name).exists():
            download_file(remote.fs, f"{remote.root}/{name}", local / name)
    mark_used(local)
    return local
