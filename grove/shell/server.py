"""The embedded Prefect API: one local server shared by every ``grove`` command.

Prefect's own ephemeral mode starts a temporary server inside each process (8-12 s here, every
time). Grove instead starts one ``prefect server start`` on loopback the first time it is
needed, records its URL in ``$GROVE_HOME/server.json``, and reuses it from then on; the server
stops itself after ``GROVE_SERVER_IDLE`` seconds (default 3600; 0 = never, as ``grove stack``
uses) without a grove command (one still running counts: it marks the server used as it goes).
The UI is therefore there for a user who wants to look (``grove server status`` prints its URL).
A ``PREFECT_API_URL`` in the environment always wins: then Grove uses that server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from grove.errors import GroveError

__all__ = ["check_api", "ensure_api", "free_port", "grove_home", "server_status", "stop_server"]

MAX_PARAMETER_BYTES = 16 * 1024 * 1024  # the local server's limit on a run's parameters (Prefect's: 512 KB)


def grove_home() -> Path:
    return Path(os.environ.get("GROVE_HOME", Path.home() / ".grove"))


def _state_file() -> Path:
    return grove_home() / "server.json"


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as resp:  # noqa: S310 - loopback only
            return bool(resp.status == 200)
    except OSError:
        return False


def _touch() -> None:
    (grove_home() / "last-used").touch()


_marker: threading.Thread | None = None


def _idle_s() -> float:
    return float(os.environ.get("GROVE_SERVER_IDLE", "3600"))


def _keep_marked(idle: float) -> None:
    """Mark the server used while this process lives: a run longer than the server's idle time (a
    large model's quantization and evaluation can take hours) must not lose its server midway.
    ``idle``: the server's own (from its state: it was started with the starter's environment)."""
    global _marker
    if idle <= 0 or (_marker is not None and _marker.is_alive()):
        return
    every = max(1.0, min(60.0, idle / 4))

    def mark() -> None:
        while True:
            time.sleep(every)
            with contextlib.suppress(OSError):
                _touch()

    _marker = threading.Thread(target=mark, name="grove-server-mark", daemon=True)
    _marker.start()


def server_status() -> dict[str, object] | None:
    """The running embedded server's state, or None."""
    try:
        state: dict[str, object] = json.loads(_state_file().read_text())
    except (OSError, ValueError):
        return None
    return state if _healthy(str(state["api_url"])) else None


@contextlib.contextmanager
def _lock() -> Iterator[None]:
    from grove.store import file_lock

    grove_home().mkdir(parents=True, exist_ok=True)
    with file_lock(grove_home() / "server.lock"):
        yield


def ensure_api(timeout: float = 120.0) -> str:
    """Point this process at a Prefect API (starting the embedded server if needed)."""
    if os.environ.get("PREFECT_API_URL"):
        return check_api(os.environ["PREFECT_API_URL"])
    with _lock():
        state = server_status()
        if state is None:
            state = _start(timeout)
    _touch()
    _keep_marked(float(str(state.get("idle_s", _idle_s()))))
    url = str(state["api_url"])
    os.environ["PREFECT_API_URL"] = url
    return url


def check_api(url: str, timeout: float = 10.0) -> str:
    """``url`` if a server answers there (any HTTP answer: a Prefect Cloud workspace may want
    credentials for /health); else a GroveError naming the URL, the cause and the fix."""
    import urllib.error

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=timeout):  # noqa: S310 - the user's API
            return url
    except urllib.error.HTTPError:
        return url
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise GroveError(f"the Prefect API at PREFECT_API_URL={url} does not answer ({reason}); start that server "
                         "(or `grove stack up`), or unset PREFECT_API_URL to use grove's own local server") from None


def _start(timeout: float, attempts: int = 2) -> dict[str, object]:
    """Start the daemon on a free port and wait until it answers. A server that exits before it
    answers (a port taken in between, a transient failure) is retried on another port; the last
    failure is reported with the end of its log, so the cause is in the message."""
    for attempt in range(1, attempts + 1):
        state, failure = _start_once(timeout)
        if state is not None:
            return state
        if attempt < attempts and failure.startswith("exited"):
            print(f"grove: the local Prefect server {failure}; trying again on another port", file=sys.stderr)
            continue
        break
    log = grove_home() / "server.log"
    raise GroveError(
        f"the local Prefect server did not start: it {failure}. Its log ({log}) ends with:\n{_tail(log)}\n"
        "Fix the cause above, or point grove at a running Prefect server with PREFECT_API_URL."
    )


def _start_once(timeout: float) -> tuple[dict[str, object] | None, str]:
    home = grove_home()
    port = free_port()
    with open(home / "server.log", "ab") as log:
        log.write(f"\n--- grove: starting the server on 127.0.0.1:{port} at {time.ctime()}\n".encode())
        log.flush()
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "grove.shell.server", "--serve", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/api"
    started = time.monotonic()
    said = started
    print(f"grove: starting the local Prefect server on 127.0.0.1:{port} (once; reused by later runs)",
          file=sys.stderr)
    while not _healthy(url, timeout=1.0):
        now = time.monotonic()
        if (code := proc.poll()) is not None:
            return None, f"exited with status {code} after {now - started:.0f} s"
        if now - started > timeout:
            with contextlib.suppress(ProcessLookupError):  # the daemon and its Prefect server with it
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None, f"did not answer within {timeout:.0f} s"
        if now - said >= 30:
            print(f"grove: the Prefect server is still starting ({now - started:.0f} s)", file=sys.stderr)
            said = now
        time.sleep(0.3)
    state = {"pid": proc.pid, "port": port, "api_url": url, "ui_url": f"http://127.0.0.1:{port}", "idle_s": _idle_s()}
    _state_file().write_text(json.dumps(state))
    return state, ""


def _tail(log: Path, lines: int = 12) -> str:
    """The last lines of this attempt's part of the server log, indented."""
    try:
        text = log.read_text(errors="replace")
    except OSError as exc:
        return f"    (unreadable: {exc})"
    text = text.rsplit("--- grove: starting the server", 1)[-1]
    return "\n".join("    " + line for line in text.strip().splitlines()[-lines:])


def stop_server() -> bool:
    state = server_status()
    if state is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(int(str(state["pid"])), signal.SIGTERM)
    _state_file().unlink(missing_ok=True)
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _last_used(home: Path) -> float:
    try:
        return (home / "last-used").stat().st_mtime
    except OSError:
        return 0.0


def _serve(port: int) -> int:
    """Daemon body: run ``prefect server start`` and stop it once grove has been idle."""
    home = grove_home()
    # The UI must call this server's API, not Prefect's default port 4200.
    env = dict(os.environ, PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false", PREFECT_UI_API_URL=f"http://127.0.0.1:{port}/api")
    env.pop("PREFECT_API_URL", None)
    # A fleet manifest is the fleet refresh's parameter: 10,000 entries are ~0.5 MB, Prefect's default
    # limit (the server answered 422); a user's own setting stands.
    env.setdefault("PREFECT_SERVER_API_MAX_PARAMETER_SIZE", str(MAX_PARAMETER_BYTES))
    idle = _idle_s()
    child = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--analytics-off"],
        env=env, stdin=subprocess.DEVNULL,
    )

    def _stop(*_: object) -> None:
        child.terminate()

    signal.signal(signal.SIGTERM, _stop)
    answered: float | None = None
    try:
        while child.poll() is None:
            time.sleep(5)
            if answered is None:
                answered = time.time() if _healthy(f"http://127.0.0.1:{port}/api") else None
                continue
            # Idle since the last grove command, but never counted from before this server
            # answered: a `last-used` left by an earlier session (hours old) must not stop a server
            # that is still starting (that killed it 5 s in, before any command could touch it).
            last = max(_last_used(home), answered)
            if idle > 0 and time.time() - last > idle:
                print(f"grove: stopping the server: no grove command for {idle:.0f} s (GROVE_SERVER_IDLE)",
                      flush=True)
                child.terminate()
                break
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=20)
        if child.poll() is None:
            child.kill()
    return max(child.wait(), 0)  # a crash's status; 0 once stopped by a signal (idle, or asked)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m grove.shell.server")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    sys.exit(_serve(args.port))
