"""The artifact store: atomic commit, completeness, fetch; the same contract on S3."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from grove.errors import StoreError
from grove.store import ArtifactStore, sha256_file
from grove.timing import huge_pages_available, thp_mode


def _files(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "model.onnx").write_bytes(b"graph" * 100)
    (src / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 40)
    return src


def _commit(store: ArtifactStore, src: Path, digest: str = "d" * 64):  # noqa: ANN202
    return store.commit(src, node="quantize-int4", node_version=1, digest=digest, config={"block_size": 32},
                        inputs=["a" * 64], metrics={"size_mb": 1.0}, seconds=0.5)


def test_commit_writes_files_then_manifest_with_hashes(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    manifest = _commit(store, _files(tmp_path))

    assert [f.path for f in manifest.files] == ["model.onnx", "sub/weights.bin"]
    assert manifest.files[1].sha256 == sha256_file(tmp_path / "src" / "sub" / "weights.bin")
    assert store.manifest("quantize-int4", "d" * 64) == manifest
    assert not list((tmp_path / "store" / "artifacts" / "quantize-int4").glob(".*")), "staging left behind"


def test_missing_or_truncated_file_makes_the_artifact_absent(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    _commit(store, _files(tmp_path))
    folder = store.local_path("quantize-int4", "d" * 64)

    (folder / "sub" / "weights.bin").write_bytes(b"short")
    assert store.manifest("quantize-int4", "d" * 64) is None
    (folder / "sub" / "weights.bin").unlink()
    assert store.manifest("quantize-int4", "d" * 64) is None
    with pytest.raises(StoreError, match="missing or incomplete"):
        store.fetch("quantize-int4", "d" * 64)


def test_a_second_identical_commit_keeps_the_first_and_a_damaged_one_is_replaced(tmp_path: Path) -> None:
    """Two runs that build the same artifact at once (a fleet's targets share the download and
    reference nodes) both commit: before, the second deleted the first's folder under its readers."""
    store = ArtifactStore(str(tmp_path / "store"))
    _commit(store, _files(tmp_path))
    weights = store.local_path("quantize-int4", "d" * 64) / "sub" / "weights.bin"
    first = weights.stat().st_ino
    with weights.open("rb") as reader:  # a reader of the first commit
        _commit(store, _files(tmp_path / "again"))
        assert weights.stat().st_ino == first and reader.read() == bytes(range(256)) * 40
    assert not list((tmp_path / "store" / "artifacts" / "quantize-int4").glob(".*")), "staging left behind"

    weights.write_bytes(b"short")  # damaged: absent to readers, so the next build replaces it
    _commit(store, _files(tmp_path / "third"))
    assert store.manifest("quantize-int4", "d" * 64) is not None and weights.stat().st_size == 256 * 40


def test_no_manifest_means_not_there(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    _commit(store, _files(tmp_path))
    (store.local_path("quantize-int4", "d" * 64) / "manifest.json").unlink()
    assert store.manifest("quantize-int4", "d" * 64) is None


def test_unwritable_store_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreError, match="not usable"):
        ArtifactStore(str(blocker / "store")).check_reachable()


def test_an_s3_endpoint_that_is_down_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as s:  # a loopback port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "grove-test",
                       "AWS_SECRET_ACCESS_KEY": "grove-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(StoreError, match=f"s3://down/grove is not usable: EndpointConnectionError.*127.0.0.1:{port}"
                                         ".*check AWS_ENDPOINT_URL"):
        ArtifactStore("s3://down/grove").check_reachable()


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://", "names no location; pass s3://<bucket>/<prefix>"),  # not a local folder named 's3:'
    pytest.param("gs://bucket/grove", "cannot be opened \\(Please install gcsfs", marks=pytest.mark.skipif(
        importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed here: gs:// opens")),
    ("nosuch://bucket/grove", "cannot be opened \\(Protocol not known: nosuch\\)"),
])
def test_a_store_uri_grove_cannot_open_is_one_clear_error(uri: str, expected: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError, match=expected):
        ArtifactStore(uri)
    assert not any(tmp_path.iterdir()), "nothing written"


def test_s3_store_round_trip(s3_store: str, tmp_path: Path) -> None:
    store = ArtifactStore(s3_store)
    store.check_reachable()
    manifest = _commit(store, _files(tmp_path))

    assert store.manifest("quantize-int4", "d" * 64) == manifest
    local = store.fetch("quantize-int4", "d" * 64, cache_dir=tmp_path / "fetched")
    assert sha256_file(local / "sub" / "weights.bin") == manifest.files[1].sha256
    store.fs.rm(f"{store.artifact_path('quantize-int4', 'd' * 64)}/model.onnx")
    assert store.manifest("quantize-int4", "d" * 64) is None


def test_remote_fetch_lands_in_the_local_cache_not_the_working_directory(s3_store: str, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GROVE_STORE", s3_store)
    monkeypatch.chdir(tmp_path)
    store = ArtifactStore(s3_store)
    _commit(store, _files(tmp_path))
    local = store.fetch("quantize-int4", "d" * 64)
    assert not (tmp_path / "s3:").exists() and local.is_absolute()


def test_runs_fetching_one_remote_artifact_at_once_download_it_once(s3_store: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run downloaded its own copy (a fleet's targets on one machine: the same multi-GB reference)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = ArtifactStore(s3_store)
    _commit(store, _files(tmp_path))
    fetched, real_get, lock = [], store.fs.get_file, threading.Lock()

    def slow_get(remote: str, local: str, **kwargs: object) -> None:
        with lock:
            fetched.append(remote)
        time.sleep(0.5)
        real_get(remote, local, **kwargs)

    monkeypatch.setattr(store.fs, "get_file", slow_get)
    with ThreadPoolExecutor(3) as pool:
        copies = list(pool.map(lambda _: store.fetch("quantize-int4", "d" * 64), range(3)))
    assert len(set(copies)) == 1 and (copies[0] / "sub" / "weights.bin").read_bytes() == bytes(range(256)) * 40
    assert sorted(Path(f).name for f in fetched) == ["model.onnx", "weights.bin"]  # once each


def test_a_file_uri_store_keeps_prefect_records_inside_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grove.flows.launch import result_storage

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    block = result_storage(f"file://{tmp_path}/store")
    block.write_path("record", b"x")  # type: ignore[attr-defined]
    assert (tmp_path / "store" / "prefect-results" / "record").read_bytes() == b"x"
    assert not any((tmp_path / "cwd").iterdir()), "nothing lands in the working directory"


def test_the_result_storage_block_is_saved_once_then_read(tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.filesystems import LocalFileSystem

    from grove.flows.launch import result_storage

    def saved(block: object) -> tuple[object, object]:
        with get_client(sync_client=True) as client:
            doc = client.read_block_document(block._block_document_id)  # type: ignore[attr-defined]  # noqa: SLF001
        return doc.updated, doc.data["basepath"]

    uri = str(tmp_path / "store")
    first = result_storage(uri)
    before = saved(first)
    time.sleep(0.01)  # a write now would move the document's `updated` time
    assert saved(result_storage(uri)) == before, "a second run reads the block; it does not write it again"
    # A block of that name pointing elsewhere (e.g. saved by another version) is put right.
    LocalFileSystem(basepath=str(tmp_path / "elsewhere")).save(first._block_document_name, overwrite=True)  # type: ignore[attr-defined]  # noqa: SLF001
    assert saved(result_storage(uri))[1] == first.basepath  # type: ignore[attr-defined]


def _package(tmp_path: Path, report: str):  # noqa: ANN202
    """A committed package artifact holding a model file and a report."""
    from grove.artifacts import Artifact

    src = tmp_path / f"package-{report}"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"graph")
    (src / "grove_report.json").write_text(report)
    store = ArtifactStore(str(tmp_path / "store"))
    digest = (report.encode().hex() * 64)[:64]
    store.commit(src, node="package-genai", node_version=1, digest=digest, config={}, inputs=[], metrics={},
                 seconds=0.1)
    return Artifact(node="package-genai", digest=digest, store=str(tmp_path / "store"))


def test_export_replaces_an_earlier_output_whole_even_when_stopped_between_renames(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grove.tasks.package_genai import export_output

    out = tmp_path / "out"
    assert export_output.fn(_package(tmp_path, '{"run": 1}'), str(out)) == {"run": 1}

    # Ctrl-C just after the earlier output was moved aside: it comes back, nothing else is left.
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if Path(target) == out and self.name.startswith(".out.grove-") and not self.name.endswith("-previous"):
            raise KeyboardInterrupt  # the new output's rename into place
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        export_output.fn(_package(tmp_path, '{"run": 2}'), str(out))
    monkeypatch.undo()
    assert (out / "grove_report.json").read_text() == '{"run": 1}'
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []

    assert export_output.fn(_package(tmp_path, '{"run": 3}'), str(out)) == {"run": 3}
    assert sorted(p.name for p in out.iterdir()) == ["grove_report.json", "model.onnx"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "staging or old output left behind"


def test_a_deployed_runs_output_path_that_cannot_be_written_is_one_error_with_the_fix(tmp_path: Path) -> None:
    """The CLI refuses it before any work (test_cli_errors); a dashboard run's path is first seen here."""
    from grove.errors import InvalidRequest
    from grove.tasks.package_genai import export_output

    with pytest.raises(InvalidRequest, match=r"output path /proc/grove-out cannot be written .*rerun with it"):
        export_output.fn(_package(tmp_path, '{"run": 1}'), "/proc/grove-out")


def test_measurements_on_one_machine_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """Two runs timing at once (a worker's concurrent flow runs) slowed each other's figures."""
    import logging
    import threading
    import time

    from grove.timing import timed_alone

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    spans: list[tuple[float, float]] = []

    def measure() -> None:
        with timed_alone("64 generated tokens"):
            start = time.monotonic()
            time.sleep(0.4)
            spans.append((start, time.monotonic()))

    with caplog.at_level(logging.INFO, logger="grove"):
        threads = [threading.Thread(target=measure) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    (a_start, a_end), (b_start, b_end) = sorted(spans)
    assert b_start >= a_end, spans
    assert "timing 64 generated tokens after the Grove measurement already running on this machine" in caplog.text


def test_a_timing_says_how_much_cpu_other_processes_used_meanwhile(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One other process spinning on one CPU shows as that CPU's share of the machine (half on these
    2-CPU machines); the timing's own work does not count."""
    import os
    import subprocess
    import sys
    import time

    from grove.timing import timed_alone

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        with timed_alone("a busy second") as load:
            end = time.monotonic() + 1.5
            while time.monotonic() < end:  # our own work, on the other CPU
                pass
    finally:
        spinner.kill()
        spinner.wait()
    busy, cpus = load["cpu_busy_elsewhere"], os.cpu_count() or 1
    # the spinner is 1 / cpus; counting our own loop too would be 2 / cpus. The margin above 1 / cpus is
    # for whatever else the machine runs meanwhile (the test server, a neighbour): 0.755 seen on a busy box
    assert busy is not None and 0.6 / cpus <= busy <= 1.7 / cpus, (busy, cpus)


def test_grove_processes_ask_glibc_for_transparent_huge_pages() -> None:
    """The warm runner and the workers start with glibc's malloc on transparent huge pages (a decode
    step reads every weight: onnxruntime-genai decoded 10-17% faster on them); a user's own setting of
    the tunable stands, and other tunables are kept."""
    from grove.timing import with_huge_pages

    assert with_huge_pages({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    for theirs in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"):
        assert with_huge_pages({"GLIBC_TUNABLES": theirs})["GLIBC_TUNABLES"] == theirs


@pytest.mark.skipif(thp_mode() != "madvise" or not huge_pages_available(), reason="the tunable decides only "
                    f"where transparent huge pages are in 'madvise' mode (this machine: {thp_mode()}) and glibc "
                    "is 2.35 or later")
def test_the_tunable_puts_a_process_on_huge_pages_and_its_timings_say_so(tmp_path: Path) -> None:
    """A process started with ``with_huge_pages`` has its large allocations on 2 MB pages, one
    started without has none, and ``timed_alone`` records which (the report prints it)."""
    import os
    import subprocess
    import sys

    from grove.timing import with_huge_pages

    # malloc'd and written, as onnxruntime's prepacked weights are (not numpy: it asks for huge
    # pages itself for arrays of 4 MB and more)
    script = ("import json; from grove.timing import timed_alone\n"
              "with timed_alone('64 MB') as load:\n    weights = b'\\1' * (64 << 20)\n"
              "print(json.dumps(load))")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    env.pop("GLIBC_TUNABLES", None)
    seen = {}
    for name, e in (("with", with_huge_pages(env)), ("without", env)):
        out = subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parents[2]).stdout
        seen[name] = json.loads(out.strip().splitlines()[-1])["huge_pages"]
    assert seen == {"with": True, "without": False}
