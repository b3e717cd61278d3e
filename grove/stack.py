"""``grove stack up|down|status``: the scaled-out stack without Docker, as processes on
loopback — the Prefect server (SQLite, or Postgres given a URL), an S3 server (moto's server
mode, in memory), the deployments, and one process worker per pool. The integration tests use
exactly this stack; ``infra/`` holds the same stack for compose and Kubernetes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from grove.server import ensure_api, free_port, grove_home, stop_server
from grove.timing import with_huge_pages

__all__ = ["spawn_worker", "stack_down", "stack_status", "stack_up"]

_BUCKET = "grove"
# Local-only credentials for the loopback S3 server; real deployments bring their own.
_S3_KEYS = {"AWS_ACCESS_KEY_ID": "grove-local", "AWS_SECRET_ACCESS_KEY": "grove-local-secret",
            "AWS_DEFAULT_REGION": "us-east-1"}


def _state_file():  # noqa: ANN202
    return grove_home() / "stack.json"


def stack_status() -> dict[str, object] | None:
    try:
        return dict(json.loads(_state_file().read_text()))
    except (OSError, ValueError):
        return None


def stack_up(postgres_url: str | None = None, workers: bool = True) -> dict[str, object]:
    """Start (or return) the local stack; idempotent."""
    existing = stack_status()
    if existing is not None:
        return existing
    home = grove_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["GROVE_SERVER_IDLE"] = "0"  # a stack stays up until `grove stack down`
    if postgres_url:
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_url
    api_url = ensure_api()
    endpoint, s3_pid = _start_s3(home)
    env = {"PREFECT_API_URL": api_url, "AWS_ENDPOINT_URL": endpoint, **_S3_KEYS,
           "GROVE_STORE": f"s3://{_BUCKET}/store", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    os.environ.update(env)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.deploy import POOLS, deploy

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        deployments = deploy(env["GROVE_STORE"])
    pids = [spawn_worker(pool.name, pool.device, env) for pool in POOLS] if workers else []
    state: dict[str, object] = {"api_url": api_url, "ui_url": api_url.removesuffix("/api"), "env": env,
                                "s3_pid": s3_pid, "worker_pids": pids, "deployments": deployments}
    _state_file().write_text(json.dumps(state, indent=2))
    return state


def _start_s3(home) -> tuple[str, int]:  # noqa: ANN001
    port = free_port()
    log = open(home / "s3.log", "ab")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],  # noqa: S603
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError):
            urllib.request.urlopen(endpoint, timeout=1)  # noqa: S310 - loopback
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the local S3 server did not start; see {home / 's3.log'}")
        time.sleep(0.2)
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, key=_S3_KEYS["AWS_ACCESS_KEY_ID"],
                      secret=_S3_KEYS["AWS_SECRET_ACCESS_KEY"]).mkdir(_BUCKET)
    return endpoint, proc.pid


def spawn_worker(pool: str, device: str, env: dict[str, str], name: str | None = None,
                 limit: int | None = None) -> int:
    """Start one process worker for ``pool`` (``limit``: flow runs at once); returns its pid."""
    name = name or f"grove-{pool}"
    log = open(grove_home() / f"worker-{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
         "--name", name, *(["--limit", str(limit)] if limit else [])],
        env=with_huge_pages({**os.environ, **env, "GROVE_DEVICE": device}), stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    return proc.pid


def stack_down() -> bool:
    state = stack_status()
    if state is None:
        return stop_server()
    for pid in [*state.get("worker_pids", []), state.get("s3_pid")]:  # type: ignore[misc]
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.killpg(int(pid), signal.SIGTERM)
    stop_server()
    _state_file().unlink(missing_ok=True)
    return True
