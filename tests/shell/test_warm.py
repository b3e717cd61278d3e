"""The warm runner (grove/shell/warm.py): auto-opt runs in a fork of a process that has done the
imports, with the caller's streams, environment and exit code; the same output as a run in the
calling process; it stops when idle or asked."""

from __future__ import annotations

import filecmp
import json
import os
import time
from pathlib import Path

import pytest

from grove.timing import huge_pages_available
from tests.conftest import grove_cli


def _runner_log(home: Path) -> str:
    return "".join(p.read_text() for p in (home / "warm").glob("*.log"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _gone(pid: int, timeout_s: float = 30) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _alive(pid)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the warm runner needs fork (POSIX)")
def test_auto_opt_forks_the_warm_runner_and_matches_a_run_in_process(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    home = tmp_path / "grove-home"  # a runner of its own, apart from the session's
    env = {"GROVE_HOME": str(home), "GROVE_WARM": "1", "GROVE_WARM_IDLE": "600",
           "GROVE_STORE": str(tmp_path / "store")}
    model = str(tiny_dir("llama"))
    args = ["auto-opt", "-m", model, "--precision", "int4", "--eval_tokens", "64", "--log_level", "2"]

    first = grove_cli(*args, "-o", str(tmp_path / "first"), env=env)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "starting the warm runner" in first.stderr
    second = grove_cli(*args, "-o", str(tmp_path / "second"), env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "starting the warm runner" not in second.stderr, "the second run finds the runner up"
    log = _runner_log(home)
    assert log.count(": run ") == 2 and str(tmp_path / "second") in log, log
    [lock] = (home / "warm").glob("*.lock")
    pid = int(lock.read_text())
    assert _alive(pid)
    if Path(f"/proc/{pid}/environ").exists():  # the runner's malloc puts the weights on huge pages
        assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    report = json.loads((tmp_path / "second" / "grove_report.json").read_text())
    assert report["metrics"]["huge_pages"] is huge_pages_available(), report["metrics"]
    assert ("on transparent huge pages" in second.stdout) is report["metrics"]["huge_pages"], second.stdout[:400]

    # A run in the calling process (GROVE_WARM=0, its own store: computed, not cached) writes the
    # same model and the same perplexity.
    local = grove_cli(*args, "-o", str(tmp_path / "local"),
                      env={**env, "GROVE_WARM": "0", "GROVE_STORE": str(tmp_path / "local-store")})
    assert local.returncode == 0, local.stderr[-2000:]
    assert _runner_log(home).count(": run ") == 2, "GROVE_WARM=0 does not use the runner"
    for name in ("model.onnx", "model.onnx.data", "genai_config.json"):
        assert filecmp.cmp(tmp_path / "second" / name, tmp_path / "local" / name, shallow=False), name
    reports = [json.loads((tmp_path / d / "grove_report.json").read_text()) for d in ("second", "local")]
    assert reports[0]["metrics"]["perplexity"] == reports[1]["metrics"]["perplexity"]
    # the cells, not the padding: a column's width follows its longest cell, e.g. a timing of the run
    table = [[line.split() for line in run.stdout.splitlines() if line.startswith(("size on disk", "perplexity"))]
             for run in (second, local)]
    assert len(table[0]) == 2 and table[0] == table[1], "the printed report reaches the caller's stdout"

    # Bad input through the runner: one line, exit 2, nothing written, as in process.
    bad = grove_cli("auto-opt", "-m", str(tmp_path / "missing"), "-o", str(tmp_path / "bad"), env=env)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("grove: error: model path")
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "bad").exists()

    stopped = grove_cli("server", "stop", env=env)  # also stops the warm runners
    assert "stopped 1 warm runner(s)" in stopped.stdout
    assert _gone(pid) and not list((home / "warm").glob("*.sock"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the warm runner needs fork (POSIX)")
def test_the_warm_runner_stops_when_idle(tmp_path: Path) -> None:
    home = tmp_path / "grove-home"
    env = {"GROVE_HOME": str(home), "GROVE_WARM": "1", "GROVE_WARM_IDLE": "1"}
    bad = grove_cli("auto-opt", "-m", str(tmp_path / "missing"), "-o", str(tmp_path / "out"), env=env)
    assert bad.returncode == 2 and "starting the warm runner" in bad.stderr
    [lock] = (home / "warm").glob("*.lock")
    pid = int(lock.read_text())
    assert _gone(pid), "an idle runner exits by itself"
    assert "stopped" in _runner_log(home) and not list((home / "warm").glob("*.sock"))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the warm runner needs fork (POSIX)")
def test_concurrent_first_runs_share_one_runner(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    home = tmp_path / "grove-home"
    env = {**os.environ, "GROVE_HOME": str(home), "GROVE_WARM": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "grove.shell.cli", "auto-opt", "-m", str(tmp_path / f"missing{i}"),
                               "-o", str(tmp_path / f"out{i}")], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
             for i in range(3)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and "grove: error: model path" in err
    log = _runner_log(home)
    assert log.count("ready") == 1 and log.count(": run ") == 3, log
    stopped = grove_cli("server", "stop", env={"GROVE_HOME": str(home)})
    assert "stopped 1 warm runner(s)" in stopped.stdout, "the lock names the runner that holds it"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the warm runner needs fork (POSIX)")
def test_server_start_warms_the_runner_that_the_next_auto_opt_uses(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    # As a user has it: no PREFECT_API_URL (grove finds its own server; here one of this home's).
    home = tmp_path / "grove-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"GROVE_HOME": str(home), "GROVE_WARM": "1"}

    def grove(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "grove.shell.cli", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    try:
        assert grove("server", "start").returncode == 0
        bad = grove("auto-opt", "-m", str(tmp_path / "missing"), "-o", str(tmp_path / "out"))
        assert bad.returncode == 2 and "starting the warm runner" not in bad.stderr, bad.stderr
        assert _runner_log(home).count("ready") == 1
    finally:
        stopped = grove("server", "stop")
    assert "stopped 1 warm runner(s)" in stopped.stdout
