"""The embedded Prefect server (grove/server.py): a server that cannot start is one clear error
with its cause from the server's own log, and leaves nothing running or recorded."""

from __future__ import annotations

import os
from pathlib import Path

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
