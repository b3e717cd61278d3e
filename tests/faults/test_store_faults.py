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


def test_a_failure_is_never_cached_the_node_that_raised_runs_again_on_the_next_run(tiny_dir,  # noqa: ANN001
                                                                                   tmp_path: Path) -> None:
    """Olive caches a failed pass and replays the failure; Grove caches only committed artifacts."""
    store = tmp_path / "store"
    runs = [_auto_opt(tiny_dir("llama"), tmp_path / "out", store, "--min_top1_agreement", "1.0") for _ in range(2)]
    for run in runs:
        assert run.returncode == 2 and "grove: error: parity check failed" in run.stderr, run.stderr[-3000:]
        assert "top-1 agreement with the reference:" in run.stderr, "the gated evaluation ran (again)"
    assert not re.findall(r"\| (capture-onnx|quantize-int4)/[0-9a-f]{12} built in", runs[1].stderr), \
        "what had succeeded is reused"
    evaluations = list((store / "artifacts" / "evaluate").glob("*/manifest.json"))
    records = list((store / "prefect-results").glob("evaluate-*"))
    assert len(evaluations) == len(records) == 1, "the reference's evaluation only: nothing of the failed one"
    assert not (tmp_path / "out").exists()


def test_a_planted_pickle_result_record_is_refused_and_never_unpickled(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    """A result record in a shared store is a code-execution path if it is decoded with pickle (Prefect's
    default serializer): Grove drops any record that is not its own JSON and recomputes the key's result."""
    from prefect.results import ResultRecord, ResultRecordMetadata
    from prefect.serializers import JSONSerializer, PickleSerializer

    store, marker = tmp_path / "store", tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # noqa: ANN204 - unpickling opens (creates) the marker file
            return (open, (str(marker), "w"))

    first = _auto_opt(tiny_dir("llama"), tmp_path / "first", store)
    assert first.returncode == 0, first.stderr[-3000:]
    capture = next((store / "prefect-results").glob("capture-onnx-*"))
    quantize = next((store / "prefect-results").glob("quantize-int4-*"))
    for record, serializer, value in ((capture, PickleSerializer(picklelib="cloudpickle"), Payload()),
                                      (quantize, JSONSerializer(), {"__class__": "os.system", "data": "true"})):
        planted = ResultRecord(metadata=ResultRecordMetadata(storage_key=record.name, serializer=serializer),
                               result=value)
        record.write_bytes(planted.serialize())

    rerun = _auto_opt(tiny_dir("llama"), tmp_path / "second", store)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert not marker.exists(), "the planted pickle was unpickled"
    for record in (capture, quantize):
        assert json.loads(record.read_bytes())["metadata"]["serializer"]["type"] == "grove-json", record.name
    assert not re.findall(r"\| \S+/[0-9a-f]{12} built in", rerun.stderr), "the artifacts themselves are reused"


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    """A 1 MB filesystem of the test's own (tmpfs): the store's disk, full after the first artifact."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for a full disk here (needs root): {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_full_store_disk_is_one_error_with_nothing_committed_half_and_the_output_left_as_it_was(
        tiny_dir, tmp_path: Path, small_disk: Path) -> None:  # noqa: ANN001
    from tests.faults.conftest import one_error_line

    out = tmp_path / "out"
    earlier = _auto_opt(tiny_dir("llama"), out, tmp_path / "roomy-store")  # an earlier output at the path
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    before = _snapshot(out)
    store = small_disk / "store"

    full = _auto_opt(tiny_dir("llama"), out, store)
    error = one_error_line(full.stderr)
    assert full.returncode == 2
    assert error.startswith(f"grove: error: artifact store {store} is full: no space left for "), error
    assert "free space there" in error
    assert _snapshot(out) == before, "the output folder is left as it was"
    reader = ArtifactStore(str(store))
    for folder in (store / "artifacts").glob("*/*"):
        assert not folder.name.startswith("."), f"a half-copied staging folder is left: {folder}"
        assert reader.manifest(folder.parent.name, folder.name) is not None, f"half an artifact: {folder}"
