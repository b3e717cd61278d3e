"""Training checkpoints kept in the store, so that a training killed mid-way resumes where it was.

transformers' Trainer writes a checkpoint as a folder: the adapter (safetensors), its state (JSON),
and the optimizer, scheduler and RNG states as ``torch.save`` pickles. A pickle in a shared bucket is
a code-execution path for whoever loads it, so the store never holds one: each ``.pt`` / ``.pth``
file is rewritten as a safetensors file of its tensors plus a JSON skeleton of everything else
(``to_safe`` / ``from_safe``), and rebuilt on this machine before the Trainer reads it. The latest
checkpoint's name is written last (``latest.json``): a checkpoint without it is not there.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from grove.store import ArtifactStore

__all__ = ["StoreCheckpoints", "from_safe", "to_safe"]

_LATEST = "latest.json"
_PICKLED = (".pt", ".pth")
_SKIPPED = (".bin",)  # training_args.bin: a pickle the Trainer writes for reference and never reads back


def to_safe(obj: Any, tensors: dict[str, Any]) -> Any:
    """``obj`` as JSON, its tensors and arrays moved into ``tensors`` (named t0, t1...), its tuples and
    non-string dict keys marked so that ``from_safe`` rebuilds the same structure."""
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        tensors[key] = torch.from_numpy(obj.copy())
        return {"__ndarray__": key}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {"__dict__": [[to_safe(k, tensors), to_safe(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [to_safe(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [to_safe(v, tensors) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot keep a {type(obj).__name__} in a checkpoint without pickle")


def from_safe(skeleton: Any, tensors: dict[str, Any]) -> Any:
    if isinstance(skeleton, list):
        return [from_safe(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if "__tensor__" in skeleton:
        return tensors[skeleton["__tensor__"]]
    if "__ndarray__" in skeleton:
        return tensors[skeleton["__ndarray__"]].numpy()
    if "__tuple__" in skeleton:
        return tuple(from_safe(v, tensors) for v in skeleton["__tuple__"])
    return {from_safe(k, tensors): from_safe(v, tensors) for k, v in skeleton["__dict__"]}


def _pack(folder: Path, into: Path) -> None:
    """A Trainer checkpoint folder, without pickles, into ``into``."""
    import torch
    from safetensors.torch import save_file

    into.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix in _SKIPPED:
            continue
        if path.suffix in _PICKLED:
            tensors: dict[str, Any] = {}
            # The Trainer wrote this file in this process's private folder a moment ago.
            skeleton = to_safe(torch.load(path, map_location="cpu", weights_only=False), tensors)
            save_file(tensors, str(into / f"{path.name}.safetensors"))
            (into / f"{path.name}.json").write_text(json.dumps(skeleton))
        else:
            shutil.copy2(path, into / path.name)


def _unpack(folder: Path, into: Path) -> None:
    import torch
    from safetensors.torch import load_file

    into.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if path.name.endswith(tuple(f"{s}.json" for s in _PICKLED)):
            name = path.name.removesuffix(".json")
            tensors = load_file(str(folder / f"{name}.safetensors"))
            torch.save(from_safe(json.loads(path.read_text()), tensors), into / name)
        elif not path.name.endswith(tuple(f"{s}.safetensors" for s in _PICKLED)):
            shutil.copy2(path, into / path.name)


class StoreCheckpoints:
    """The checkpoints of one training, under ``prefix`` in ``store`` (a node's scratch folder)."""

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        self.store, self.prefix = store, prefix.rstrip("/")

    def save(self, folder: Path, step: int) -> None:
        """Keep the Trainer checkpoint ``folder`` (taken at ``step``) as the latest; drop older ones."""
        fs = self.store.fs
        with tempfile.TemporaryDirectory(prefix="grove-ckpt-") as tmp:
            _pack(folder, Path(tmp))
            name = f"checkpoint-{step}"
            fs.makedirs(f"{self.prefix}/{name}", exist_ok=True)
            for path in sorted(Path(tmp).iterdir()):
                fs.put_file(str(path), f"{self.prefix}/{name}/{path.name}")
        fs.pipe_file(f"{self.prefix}/{_LATEST}", json.dumps({"step": step, "name": name}).encode())
        for old in self._names():
            if old != name:
                fs.rm(f"{self.prefix}/{old}", recursive=True)

    def latest(self, into: Path) -> int | None:
        """Bring the latest checkpoint into the folder ``into`` (ready for the Trainer) and return its
        step; None if there is none."""
        fs = self.store.fs
        try:
            latest = json.loads(fs.cat_file(f"{self.prefix}/{_LATEST}"))
        except (FileNotFoundError, ValueError):
            return None
        with tempfile.TemporaryDirectory(prefix="grove-ckpt-") as tmp:
            remote = f"{self.prefix}/{latest['name']}"
            try:
                names = [Path(p).name for p in fs.ls(remote, detail=False)]
                for name in names:
                    fs.get_file(f"{remote}/{name}", str(Path(tmp) / name))
            except FileNotFoundError:
                return None
            _unpack(Path(tmp), into)
        return int(latest["step"])

    def clear(self) -> None:
        if self.store.fs.exists(self.prefix):
            self.store.fs.rm(self.prefix, recursive=True)

    def _names(self) -> list[str]:
        try:
            return [Path(p).name for p in self.store.fs.ls(self.prefix, detail=False)
                    if Path(p).name.startswith("checkpoint-")]
        except FileNotFoundError:
            return []
