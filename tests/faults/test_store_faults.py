"""The store's guarantees under faults: a file changed behind the store's back is never served as good,
a failure is never cached, a result record that is not Grove's JSON is refused, a full disk leaves
nothing half-committed."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from grove.store import ArtifactStore, sha256_file
from tests.conftest import grove_cli


def _auto_opt(model: Path, out: Path, store: Path, *extra: str):  # noqa: ANN202
    return grove_cli("auto-opt", "-m", str(model), "-o", str(out), "--store", str(store), "--eval_tokens", "64",
                     *extra, timeout=300)


def _flip_same_size(path: Path) -> None:
    """Other bytes, same size, and the mtime put back: as a bad disk, a stray tool or a hand would."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


def test_a_committed_local_file_changed_behind_the_stores_back_is_never_served_and_is_rebuilt(
        tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    store = tmp_path / "store"
    first = _auto_opt(tiny_dir("llama"), tmp_path / "first", store)
    assert first.returncode == 0, first.stderr[-3000:]
    [folder] = (store / "artifacts" / "capture-onnx").iterdir()
    damaged = folder / "model.onnx.data"
    manifest = json.loads((folder / "manifest.json").read_text())
    [entry] = [e for e in manifest["files"] if e["path"] == "model.onnx.data"]
    _flip_same_size(damaged)

    rerun = _auto_opt(tiny_dir("llama"), tmp_path / "second", store)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"capture-onnx/{folder.name[:12]}: model.onnx.data does not match its sha256" in rerun.stderr
    assert re.findall(r"\| (capture-onnx/[0-9a-f]{12}) built in", rerun.stderr) == [f"capture-onnx/{folder.name[:12]}"]
    assert sha256_file(damaged) == entry["sha256"], "rebuilt: the store holds the bytes its manifest names"
    assert ArtifactStore(str(store)).manifest("capture-onnx", folder.name) is not None


def test_a_fetched_copy_changed_on_this_machine_is_fetched_again(s3_store: str, tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import logging

    store = ArtifactStore(s3_store)
    work = tmp_path / "work"
    work.mkdir()
    (work / "weights.bin").write_bytes(os.urandom(4096))
    good = sha256_file(work / "weights.bin")
    store.commit(work, node="test-node", node_version=1, digest="f" * 64, config={}, inputs=[], metrics={}, seconds=0)
    copy = store.fetch("test-node", "f" * 64, tmp_path / "fetched") / "weights.bin"
    _flip_same_size(copy)

    with caplog.at_level(logging.WARNING, logger="grove"):
        again = store.fetch("test-node", "f" * 64, tmp_path / "fetched") / "weights.bin"
    assert "weights.bin does not match its sha256" in caplog.text
    assert sha256_file(again) == good
