"""The embedded Prefect server (grove/shell/server.py): a server that cannot start is one clear error
with its cause from the server's own log, and leaves nothing running or recorded; the idle stop
counts from the last grove command or the server's own start, whichever is later."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from grove.shell import server
from grove.shell.server import free_port
from tests.conftest import grove_cli


def test_a_server_that_cannot_start_is_reported_with_its_cause(tmp_path: Path) -> None:
    home = tmp_path / "grove-home"
    # A user's misconfiguration that makes `prefect server start` exit: its database cannot be opened.
    env = {"GROVE_HOME": str(home), "GROVE_WARM": "0",
           "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path}/no-such-dir/prefect.db"}
    saved = os.environ.pop("PREFECT_API_URL")  # as a user has it: grove starts its own server
    try:
        result = grove_cli("server", "start", env=env, timeout=300)
    finally:
        os.environ["PREFECT_API_URL"] = saved

    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback (most recent call last):\n  File" not in result.stderr.split("grove: error:")[0]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
    assert "the local Prefect server did not start: it exited with status" in error
    assert "trying again on another port" in result.stderr  # one retry: a port taken in between is not fatal
    # The cause, from the server's log, is in the message; and what to do.
    assert "unable to open database file" in result.stderr
    assert "PREFECT_API_URL" in result.stderr.splitlines()[-1]
    assert not (home / "server.json").exists(), "no state recorded for a server that is not there"


def _daemon(home: Path, idle: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ, GROVE_HOME=str(home), GROVE_SERVER_IDLE=idle)
    env.pop("PREFECT_API_URL")
    home.mkdir(parents=True, exist_ok=True)
    log = open(home / "server.log", "wb")  # noqa: SIM115 - the daemon's stdout for its lifetime
    proc = subprocess.Popen([sys.executable, "-m", "grove.shell.server", "--serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}/api"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)


def test_a_last_used_mark_from_an_earlier_session_does_not_stop_a_new_server(tmp_path: Path) -> None:
    """CI failed twice with "exited with status 0 after 10 s": a `last-used` file hours old (left by an
    earlier session) made the daemon count the server idle from then, and stop it at its first check
    (5 s in), while Prefect was still starting, before any grove command could mark it used."""
    home = tmp_path / "grove-home"
    home.mkdir()
    (home / "last-used").touch()
    hours_ago = time.time() - 3 * 3600
    os.utime(home / "last-used", (hours_ago, hours_ago))
    proc, url = _daemon(home, idle="3600")
    started = time.monotonic()
    try:
        while not server._healthy(url, timeout=1.0):
            assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
            assert time.monotonic() - started < 180, "the server did not answer within 180 s"
            time.sleep(0.5)
        time.sleep(max(0.0, 12 - (time.monotonic() - started)))  # past two of the daemon's idle checks
        assert proc.poll() is None, (home / "server.log").read_text()[-2000:]
        assert server._healthy(url)
    finally:
        _stop(proc)


def test_a_run_longer_than_the_idle_time_keeps_its_server_which_stops_once_idle(tmp_path: Path) -> None:
    """The server stops after GROVE_SERVER_IDLE seconds without a grove command, but a command that
    is still running (a large model's run can outlast the default hour) keeps it up, at the pace of
    the server's idle time even when the command's own environment does not set it."""
    home = tmp_path / "grove-home"
    env = dict(os.environ, GROVE_HOME=str(home), GROVE_SERVER_IDLE="3")
    env.pop("PREFECT_API_URL")
    # A starts the server with a 3 s idle time and stays a few seconds; B attaches meanwhile,
    # without the variable, and runs longer than the idle time after A is gone.
    starter = subprocess.Popen([sys.executable, "-c", "import time\nfrom grove.shell import server\n"
                                "server.ensure_api()\nprint('ready', flush=True)\ntime.sleep(5)"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert starter.stdout is not None and starter.stdout.readline().strip() == "ready", starter.communicate()[1][-3000:]
    env.pop("GROVE_SERVER_IDLE")
    script = ("import time\nfrom grove.shell import server\nserver.ensure_api()\ntime.sleep(16)\n"
              "print('still up' if server.server_status() else 'stopped under a running command')")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    starter.wait(timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "still up", (home / "server.log").read_text()[-2000:]
    assert "grove: starting the local Prefect server" not in result.stderr, "B attached to A's server"

    url = json.loads((home / "server.json").read_text())["api_url"]
    deadline = time.monotonic() + 60
    while server._healthy(url) and time.monotonic() < deadline:
        time.sleep(1)
    assert not server._healthy(url), "the server did not stop once no command had used it for 3 s"
    assert "stopping the server: no grove command for 3 s (GROVE_SERVER_IDLE)" in (home / "server.log").read_text()


def test_the_local_server_takes_a_fleet_manifest_past_prefects_default_parameter_limit() -> None:
    """A 10,000-entry fleet manifest is ~0.5 MB, past Prefect's default 512 KB for a run's parameters
    (the server answered 422): Grove's local server takes runs with parameters of several MB."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    @flow(name="big-parameter")
    def big(manifest: dict) -> None:  # never run: only created, as a deployment's trigger creates one
        pass

    manifest = {"models": [{"name": f"model-{i:05d}", "source": f"/models/{'x' * 40}/{i}", "targets": ["cpu"]}
                           for i in range(10_000)]}
    assert len(json.dumps(manifest)) > 600_000
    with get_client(sync_client=True) as client:
        run = client.create_flow_run(big, parameters={"manifest": manifest})
        assert len(client.read_flow_run(run.id).parameters["manifest"]["models"]) == 10_000
