"""kill -9, as a CI timeout, a scheduler or the OOM killer sends it: of the ``grove auto-opt`` command
(nothing of its run goes on), and of the run itself in the middle of a node (nothing partial is
visible; the same command resumes after the nodes that had finished)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from grove.store import ArtifactStore
from tests.conftest import grove_cli
from tests.faults.conftest import group_members, lease_of, run_pid, start_grove, wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the warm runner needs fork (POSIX)")


def _args(model: Path, out: Path, store: Path) -> list[str]:
    return ["auto-opt", "-m", str(model), "-o", str(out), "--store", str(store), "--eval_tokens", "64"]


def test_kill_9_of_the_auto_opt_command_stops_its_run_and_nothing_is_written_afterwards(mid_llama: Path,
                                                                                       tmp_path: Path) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    cli = start_grove(*_args(mid_llama, out, store), log=tmp_path / "cli.log")
    wait_for(lambda: lease_of(store, "quantize-int4"), "quantize-int4 started", cli)
    run = wait_for(lambda: run_pid(out), "the warm runner's log naming the run", cli)
    assert _alive(run)

    os.kill(cli.pid, signal.SIGKILL)
    cli.wait()
    wait_for(lambda: not _alive(run) and not group_members(run), "end of every process of the run", timeout_s=60)
    assert not out.exists(), f"the output was written after its command was killed: {os.listdir(out)}"
    assert ArtifactStore(str(store)).manifest("quantize-int4", lease_of(store, "quantize-int4").stem) is None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _built(log: str) -> list[str]:
    """The nodes a run built (not reused), as node/digest12, from its log."""
    return re.findall(r"\| (\S+/[0-9a-f]{12}) built in", log)


def test_kill_9_of_a_run_inside_quantize_int4_leaves_nothing_partial_and_the_same_command_resumes(
        mid_llama: Path, tmp_path: Path) -> None:
    out, store = tmp_path / "out", tmp_path / "store"
    cli = start_grove(*_args(mid_llama, out, store), log=tmp_path / "first.log")
    lease = wait_for(lambda: lease_of(store, "quantize-int4"), "quantize-int4 started", cli)
    holder = wait_for(lambda: _holder_pid(lease), "the lease's holder", cli)
    os.kill(holder, signal.SIGKILL)  # the process that runs the node, in the middle of it
    assert cli.wait() != 0
    first = (tmp_path / "first.log").read_text()
    assert "the run ended without an exit status (killed?)" in first, first[-2000:]

    reader = ArtifactStore(str(store))
    committed = {f"{p.parent.parent.name}/{p.parent.name[:12]}" for p in store.glob("artifacts/*/*/manifest.json")}
    assert reader.manifest("quantize-int4", lease.stem) is None, "no partial int4 artifact is visible"
    for folder in store.glob("artifacts/*/*"):  # a staging folder left by the kill is no artifact
        assert folder.name.startswith(".") or reader.manifest(folder.parent.name, folder.name) is not None, folder
    assert not out.exists()

    rerun = grove_cli(*_args(mid_llama, out, store), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    built = _built(rerun.stderr)
    assert not set(built) & committed, f"finished nodes are reused, not rebuilt: {built}"
    assert built.count(f"quantize-int4/{lease.stem[:12]}") == 1, built
    assert "taking over the build lease" in rerun.stderr and "that is gone" in rerun.stderr, \
        "the killed run's lease is taken at once: its process is gone"
    assert (out / "model.onnx").exists() and reader.manifest("quantize-int4", lease.stem) is not None


def _holder_pid(lease: Path) -> int | None:
    import json

    try:
        return int(json.loads(lease.read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None
