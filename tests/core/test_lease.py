"""Build leases: runs that need the same artifact at once build it once (threads, processes, local
and S3 stores); a crashed holder's lease is taken over; a failed holder lets the next run build."""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import pytest

from grove.artifacts import Artifact, Source, StepConfig, recipe_digest
from grove.lease import build_lease
from grove.node import run_node, store_for

SOURCE = Source(kind="local", location="/models/m", digest="0" * 64, model_type="llama")
LOG = logging.getLogger("test-lease")


class Slow(StepConfig):
    NODE: ClassVar[str] = "test-slow"
    VERSION: ClassVar[int] = 1
    seconds: float = 1.0


def _builder(calls: list[str], fail: bool = False):  # noqa: ANN202 - a node body
    lock = threading.Lock()

    def build(inputs: list[Path], config: Slow, out: Path) -> dict[str, float]:
        with lock:
            calls.append(threading.current_thread().name)
        time.sleep(config.seconds)
        if fail:
            raise RuntimeError("the build broke")
        (out / "weights.bin").write_bytes(b"w" * 1000)
        return {"value": 1.0}

    return build


def _lease_path(uri: str, config: Slow) -> str:
    store = store_for(uri)
    return f"{store.root}/leases/{config.NODE}/{recipe_digest(config, [SOURCE])}.json"


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "store") if request.param == "local" else request.getfixturevalue("s3_store")


def test_runs_that_need_one_artifact_at_once_build_it_once(store_uri: str) -> None:
    calls: list[str] = []
    config = Slow(seconds=1.5)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: run_node(config, [SOURCE], store_uri, _builder(calls)), range(3)))
    assert len(calls) == 1, calls
    assert {r.digest for r in results} == {recipe_digest(config, [SOURCE])}
    assert all(r.metrics["value"] == 1.0 for r in results)
    assert store_for(store_uri).manifest(config.NODE, results[0].digest) is not None
    assert not store_for(store_uri).fs.exists(_lease_path(store_uri, config))  # released


def _build_in_process(store_uri: str, out: str) -> None:
    def build(inputs: list[Path], config: Slow, work: Path) -> dict[str, float]:
        with open(out, "a") as f:
            f.write("built\n")
        time.sleep(config.seconds)
        (work / "weights.bin").write_bytes(b"w")
        return {}

    run_node(Slow(seconds=3.0), [SOURCE], store_uri, build)


def test_two_processes_build_one_artifact_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = tmp_path / "builds.txt"
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "store"), str(out))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert out.read_text().splitlines() == ["built"]


def test_a_lease_its_holder_stopped_renewing_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    uri, config = str(tmp_path / "store"), Slow(seconds=0.1)
    path = Path(_lease_path(uri, config))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"owner": "gone-host:4242:dead", "since": time.time() - 600,
                                "expires": time.time() - 30}))
    calls: list[str] = []
    with caplog.at_level(logging.WARNING, logger="grove"):
        run_node(config, [SOURCE], uri, _builder(calls))
    assert len(calls) == 1
    assert "taking over the build lease of process 4242 on gone-host" in caplog.text
    assert not path.exists()


def test_when_the_holder_fails_the_waiting_run_builds(store_uri: str) -> None:
    failing: list[str] = []
    calls: list[str] = []
    config = Slow(seconds=1.0)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(run_node, config, [SOURCE], store_uri, _builder(failing, fail=True))
        time.sleep(0.3)  # the failing run holds the lease first
        second = pool.submit(run_node, config, [SOURCE], store_uri, _builder(calls))
        with pytest.raises(RuntimeError, match="the build broke"):
            first.result()
        artifact = second.result(timeout=60)
    assert (len(failing), len(calls)) == (1, 1)
    assert isinstance(artifact, Artifact) and store_for(store_uri).manifest(config.NODE, artifact.digest)


def test_a_holder_renews_its_lease_while_it_builds(tmp_path: Path) -> None:
    """A build longer than the lease's time to live keeps it: the waiter gets the artifact, not the lease."""
    store = store_for(str(tmp_path / "store"))
    digest, ttl = "d" * 64, 0.4
    got: list[object] = []

    def hold() -> None:
        with build_lease(store, "test-slow", digest, LOG, ttl=ttl) as done:
            assert done is None
            time.sleep(4 * ttl)
            work = tmp_path / "work"
            work.mkdir()
            (work / "f").write_bytes(b"x")
            store.commit(work, node="test-slow", node_version=1, digest=digest, config={}, inputs=[], metrics={},
                         seconds=0.0)

    holder = threading.Thread(target=hold)
    holder.start()
    time.sleep(0.1)
    with build_lease(store, "test-slow", digest, LOG, ttl=ttl) as done:
        got.append(done)
    holder.join()
    assert got[0] is not None and got[0].digest == digest  # type: ignore[attr-defined]


def test_a_server_that_ignores_if_none_match_still_gets_one_build(s3_store: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """rclone's S3 server accepts a second If-None-Match write: the last writer wins, and the runs that
    wrote at the same moment settle on it."""
    from grove import lease

    store = store_for(s3_store)
    together, order, lock = threading.Barrier(3), [], threading.Lock()

    def plain_write(self: lease._Lease, body: bytes) -> None:  # all three found no lease; they write 0.1 s apart
        together.wait(10)
        with lock:
            order.append(self.owner)
        time.sleep(0.1 * order.index(self.owner))
        store.fs.pipe(self.path, body)

    monkeypatch.setattr(lease._Lease, "_create_remote", plain_write)
    monkeypatch.setitem(lease._exclusive, store.uri, False)
    calls: list[str] = []
    config = Slow(seconds=1.0)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: run_node(config, [SOURCE], s3_store, _builder(calls)), range(3)))
    assert len(calls) == 1, calls


def test_the_s3_test_server_refuses_a_second_exclusive_write(s3_store: str) -> None:
    from grove import lease

    assert lease._exclusive_writes(store_for(s3_store)) is True


def test_usage_lists_the_builds_in_progress_and_prune_tidies_leases_left_by_stopped_runs(tmp_path: Path) -> None:
    from tests.conftest import grove_cli

    store = tmp_path / "store"
    now = time.time()
    for name, owner, expires in (("a" * 64, "host-a:11:x", now + 100), ("b" * 64, "host-b:22:y", now - 7200),
                                 ("c" * 64, "host-c:33:z", now - 600)):
        path = store / "leases" / "capture-onnx" / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"owner": owner, "since": now - 180, "expires": expires}))

    usage = grove_cli("store", "usage", "--store", str(store))
    assert usage.returncode == 0, usage.stderr
    assert "builds in progress: capture-onnx/aaaaaaaaaaaa by process 11 on host-a for 3 min; 2 lease(s) left" \
        in usage.stdout

    pruned = grove_cli("store", "prune", "--older-than", "30", "--store", str(store))
    assert pruned.returncode == 0, pruned.stderr
    assert "removed 1 build lease(s) left by runs that stopped more than an hour ago" in pruned.stdout
    assert sorted(p.name[0] for p in (store / "leases" / "capture-onnx").iterdir()) == ["a", "c"]


def _hold_until_killed(store_uri: str, digest: str, ready: str) -> None:
    """A build that takes its lease (renewed for an hour) and then hangs until it is killed."""
    with build_lease(store_for(store_uri), "test-slow", digest, LOG, ttl=3600) as done:
        assert done is None
        Path(ready).write_text("holding")
        time.sleep(600)


@pytest.mark.timeout(120)  # without the check, the run below would wait out the hour
def test_a_lease_of_a_dead_process_on_this_machine_is_taken_at_once(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    import os
    import signal

    uri, config = str(tmp_path / "store"), Slow(seconds=0.1)
    digest, ready = recipe_digest(config, [SOURCE]), tmp_path / "ready"
    holder = multiprocessing.get_context("spawn").Process(target=_hold_until_killed, args=(uri, digest, str(ready)))
    holder.start()
    while not ready.exists():
        assert holder.is_alive(), "the holder died before it held the lease"
        time.sleep(0.05)
    os.kill(holder.pid, signal.SIGKILL)  # as a crash, an OOM kill or a CI timeout does: no cleanup
    holder.join()
    assert json.loads(Path(_lease_path(uri, config)).read_text())["expires"] > time.time() + 3000

    calls: list[str] = []
    with caplog.at_level(logging.WARNING, logger="grove"):
        run_node(config, [SOURCE], uri, _builder(calls))
    assert len(calls) == 1
    assert f"taking over the build lease of process {holder.pid} on " in caplog.text
    assert "a process of this machine that is gone" in caplog.text


def test_a_live_holder_on_this_machine_is_waited_for_and_a_reused_pid_is_not_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The pid alone is not the holder: a lease naming a live pid whose process started at another time
    (the kernel reused the pid) is a dead holder's; one naming this very process is a live one's."""
    import os

    from grove import lease

    store = store_for(str(tmp_path / "store"))
    me = {"machine": lease._machine(), "pid": os.getpid(), "start": lease._process_start(os.getpid())}
    assert me["machine"] is not None and me["start"] is not None, "Linux: /proc names this machine and process"
    assert lease._holder_gone(me) is False
    assert lease._holder_gone({**me, "start": me["start"] + 1}) is True  # the pid, reused by a later process
    assert lease._holder_gone({**me, "machine": "another-host/boot/pid:[1]"}) is False  # not ours to judge
    assert lease._holder_gone({"owner": "old-grove:1:x"}) is False  # a lease written before these facts

    digest, path = "e" * 64, Path(store.root) / "leases" / "test-slow" / f"{'e' * 64}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"owner": f"{lease.socket.gethostname()}:{os.getpid()}:live", "since": time.time(),
                                "expires": time.time() + 1.0, **me}))
    with caplog.at_level(logging.INFO, logger=LOG.name), build_lease(store, "test-slow", digest, LOG) as done:
        assert done is None
    assert "is being built by process" in caplog.text  # it waited for the live holder
    assert "not renewed for" in caplog.text and "is gone" not in caplog.text  # and took the lease once it expired
