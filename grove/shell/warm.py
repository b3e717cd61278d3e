"""The warm runner: ``grove auto-opt`` without paying its imports on every run.

A cold ``grove auto-opt`` spends ~7-10 s of its ~31-35 s importing what its nodes need (torch,
transformers and their model code, onnxruntime, the genai builder, Prefect), every run. Like the
embedded Prefect server, Grove keeps one process that has done those imports: the first
``auto-opt`` starts it (and waits for it, paying the imports once); each run after that is a
``fork`` of it, so it starts with everything imported and nothing else shared: its own memory,
its own Prefect client, the caller's environment, working directory, stdin/stdout/stderr (passed
over a Unix socket, so progress and colours reach the terminal as before) and exit code. Ctrl-C
and SIGTERM are forwarded to the run, and a caller killed outright (SIGKILL) takes its run with it:
the run is its own process group, which a watchdog kills when the caller's socket closes.

One runner per interpreter, Grove source tree and the environment variables read at import (a
changed source file, a new ``pip install`` or another ``PREFECT_API_URL`` gets its own); it exits
after ``GROVE_WARM_IDLE`` seconds without a run (default 900) and holds no files open but its
socket and lock in ``$GROVE_HOME/warm/``. ``GROVE_WARM=0`` runs every command in the calling process instead, as do
platforms without ``fork``. Measured on a 2-CPU AMD EPYC: a cold SmolLM2 int4 run took 24.5-25.1 s
forked from the runner and 30.9-34.4 s as its own process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import io
import json
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path

__all__ = ["enabled", "ensure", "run", "runner_socket", "serve", "stop_all"]

# What the auto-opt nodes import; the runner imports them once, before it accepts runs.
PRELOAD = (
    "grove.shell.cli", "grove.shell.local_run", "grove.flows.auto_opt", "grove.flows.optimize_encoder",
    "torch", "transformers", "onnx", "onnxruntime", "onnxruntime_genai", "onnxruntime_genai.models.builder",
    "transformers.models.llama.modeling_llama", "transformers.modeling_gguf_pytorch_utils", "gguf",
)
# Variables read while importing PRELOAD (settings, caches, thread pools, library paths): a runner
# serves only callers that agree on all of them. The others (GROVE_STORE, AWS_*, ...) are read at
# run time, from the caller's environment, which every run gets in full.
_IMPORT_ENV_PREFIXES = ("PREFECT_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH_",
                        "OMP_", "MKL_", "KMP_", "ORT_", "ONNX", "CUDA", "NVIDIA_", "PYTHON", "LD_", "LC_", "XDG_")
_IMPORT_ENV_NAMES = {"GROVE_HOME", "HOME", "PATH", "TMPDIR", "LANG", "VIRTUAL_ENV"}
_START_TIMEOUT_S = 180.0


def enabled() -> bool:
    return os.environ.get("GROVE_WARM", "1") != "0" and hasattr(os, "fork") and hasattr(socket, "AF_UNIX")


def runner_socket() -> Path:
    """The socket of the runner for this interpreter, source tree and environment."""
    from grove.shell.server import grove_home

    key = hashlib.sha256()
    key.update(f"{sys.executable}\0{sys.version}\0".encode())
    root = Path(__file__).resolve().parents[1]
    for package in ("grove", "flows", "tasks"):
        for path in sorted((root / package).glob("*.py")):
            stat = path.stat()
            key.update(f"{path}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    for name, value in sorted(os.environ.items()):
        if name in _IMPORT_ENV_NAMES or name.startswith(_IMPORT_ENV_PREFIXES):
            key.update(f"{name}={value}\0".encode())
    return grove_home() / "warm" / f"{key.hexdigest()[:16]}.sock"


# -- the calling side ------------------------------------------------------------------------
def run(argv: Sequence[str]) -> int | None:
    """Run ``grove <argv>`` in a fork of the warm runner (started first if needed) and return its
    exit code; None when it cannot be used (then the caller runs the command itself)."""
    conn, _started = _runner_connection()
    if conn is None:
        return None
    with conn:
        request = json.dumps({"argv": list(argv), "env": dict(os.environ), "cwd": os.getcwd()}).encode()
        try:
            socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [0, 1, 2])
        except OSError:  # e.g. a closed stdin: nothing to pass, so run here
            return None
        pid = _read_message(conn)
        if not isinstance(pid, int):
            return None  # the runner refused (e.g. it is shutting down): run here
        forward = lambda signum, _frame: _kill(pid, signum)  # noqa: E731
        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = _read_message(conn)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
    if not isinstance(code, int):
        print("grove: error: the run ended without an exit status (killed?)", file=sys.stderr)
        return 1
    return code


def ensure() -> bool:
    """Start the runner for this environment unless it is up (``grove server start``); True if
    this call started it."""
    if not enabled():
        return False
    conn, started = _runner_connection()
    if conn is not None:
        conn.close()  # no request: the runner goes back to waiting
    return started and conn is not None


def _runner_connection() -> tuple[socket.socket | None, bool]:
    """A connection to this environment's runner, started first if it is not up (then True);
    None if it cannot be had."""
    path = runner_socket()
    if len(os.fsencode(path)) > 100:  # AF_UNIX paths are limited to ~107 bytes
        return None, False
    conn = _connect(path)
    return (conn, False) if conn is not None else (_start(path), True)


def _connect(path: Path) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
        return conn
    except OSError:
        conn.close()
        return None


def _start(path: Path) -> socket.socket | None:
    """Start a runner for ``path`` and wait until it accepts runs (it imports first)."""
    print("grove: starting the warm runner (once; later runs fork it instead of importing again)",
          file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    from grove.timing import with_huge_pages

    log = open(path.with_suffix(".log"), "ab")  # noqa: SIM115 - handed to the child
    with log:  # its runs (forks) keep its malloc, which backs the models' weights with huge pages
        proc = subprocess.Popen([sys.executable, "-m", "grove.shell.warm", str(path)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, close_fds=True,
                                cwd=Path(__file__).resolve().parents[1],  # imports resolve from Grove's tree
                                env=with_huge_pages(os.environ))
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        conn = _connect(path)
        if conn is not None:
            return conn
        if proc.poll() not in (None, 0):  # 0: another runner holds the lock; keep waiting for it
            break
        time.sleep(0.05)
    print(f"grove: the warm runner did not start (see {path.with_suffix('.log')}); running here", file=sys.stderr)
    return None


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _read_message(conn: socket.socket) -> object:
    header = _read_exact(conn, 4)
    if header is None:
        return None
    body = _read_exact(conn, struct.unpack("!I", header)[0])
    return None if body is None else json.loads(body)


def _read_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        try:
            chunk = conn.recv(n - len(data))
        except InterruptedError:
            continue
        if not chunk:
            return None
        data += chunk
    return data


def _send_message(conn: socket.socket, value: object) -> None:
    body = json.dumps(value).encode()
    conn.sendall(struct.pack("!I", len(body)) + body)


def stop_all() -> int:
    """Stop every warm runner under $GROVE_HOME/warm (their pids are in their lock files)."""
    from grove.shell.server import grove_home

    stopped = 0
    for lock in (grove_home() / "warm").glob("*.lock"):
        with contextlib.suppress(OSError, ValueError), open(lock) as f:
            try:  # a lock nobody holds is a runner that is gone: its pid may be someone else's now
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                continue
            except OSError:
                pass
            _kill(int(f.read().strip()), signal.SIGTERM)
            stopped += 1
    return stopped


# -- the runner ------------------------------------------------------------------------------
def serve(path: Path, idle_s: float) -> int:
    """Import PRELOAD, then fork one child per connection until ``idle_s`` pass without one."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    lock = open(path.with_suffix(".lock"), "a+")  # noqa: SIM115 - held for the runner's life; "w" would
    try:  # erase the pid of the runner holding it
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return 0  # another runner for the same key is starting or running
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    import threading

    for module in PRELOAD:
        importlib.import_module(module)
    if threading.active_count() > 1:  # fork copies only the calling thread: refuse rather than risk it
        print(f"grove warm runner: importing started threads {threading.enumerate()}; not serving", file=sys.stderr)
        return 1
    path.unlink(missing_ok=True)  # a socket left by a runner that died
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(0))  # stop_all: leave no socket behind
    print(f"warm runner {os.getpid()}: ready ({len(PRELOAD)} modules imported)", flush=True)
    try:
        while select.select([listener], [], [], idle_s)[0]:
            conn, _ = listener.accept()
            with conn:
                _serve_one(conn, [listener, lock])
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        print(f"warm runner {os.getpid()}: stopped", flush=True)
    return 0


def _serve_one(conn: socket.socket, runner_files: list[socket.socket | io.TextIOWrapper]) -> None:
    header, fds, _flags, _addr = socket.recv_fds(conn, 4, 3)
    body = _read_exact(conn, struct.unpack("!I", header)[0]) if len(header) == 4 and len(fds) == 3 else None
    if body is None:  # no request (grove server start): nothing to run
        for fd in fds:
            os.close(fd)
        return
    pid = os.fork()
    if pid != 0:
        for fd in fds:
            os.close(fd)
        if pid:
            request = json.loads(body)
            print(f"warm runner {os.getpid()}: run {pid}: grove {' '.join(request['argv'])}", flush=True)
        return
    # The child: becomes the caller's command, then exits with its code.
    code, watchdog = 1, None
    try:
        _send_message(conn, os.getpid())  # first: the caller forwards its signals here
        for f in runner_files:  # the listener, and the lock (a run outliving the runner must not hold it)
            f.close()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        watchdog = _watch_caller(conn)
        _reseed()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        _reopen_std_streams()
        request = json.loads(body)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        sys.argv = ["grove", *request["argv"]]
        # Logging as a fresh process has it: no handler (Prefect's, bound to the runner's log file);
        # the command configures its own, and re-reads Prefect's settings from this environment.
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        from grove.shell import cli

        code = cli.main(request["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C, forwarded by the caller, before or after the command ran
        print("grove: interrupted", file=sys.stderr)
        code = 130
    except BaseException:  # noqa: BLE001 - the child must report, whatever happened
        traceback.print_exc()
    finally:
        with contextlib.suppress(BaseException):
            from grove.shell import cli

            cli.wind_down()
        _stop_watch(watchdog)  # before the caller reads the code and hangs up: that is not its death
        with contextlib.suppress(OSError):
            _send_message(conn, code)
        os._exit(code)


def _watch_caller(conn: socket.socket) -> int:
    """Make this run its own process group and fork a watchdog that kills that group the moment the
    caller's end of ``conn`` closes before the run ends: a caller killed with SIGKILL (a CI timeout,
    a scheduler, the OOM killer) forwards no signal, and without this the run went on at full CPU and
    wrote the output folder afterwards. A process, not a thread: a thread needs the GIL, which a long
    C call of the run (a protobuf serialization, say) can hold for seconds. Returns its pid."""
    os.setpgid(0, 0)  # the run and what it starts, apart from the runner and its other runs
    run = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    try:  # the watchdog: nothing but two fds, no Python beyond this loop
        keep = conn.fileno()
        os.closerange(0, keep)
        os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
        run_fd = os.pidfd_open(run)
        if os.getppid() != run:  # the run ended before the pidfd was opened
            os._exit(0)
        while True:
            ready = select.select([keep, run_fd], [], [])[0]
            if run_fd in ready:  # the run ended by itself (or was killed): nothing to do
                os._exit(0)
            try:
                hung_up = not conn.recv(1)  # the caller sends nothing more: readable means closed
            except OSError:
                hung_up = True
            if hung_up:
                os.killpg(run, signal.SIGKILL)  # the run, what it started, and this watchdog
    finally:
        os._exit(0)


def _stop_watch(watchdog: int | None) -> None:
    if watchdog is None:
        return
    with contextlib.suppress(OSError):
        os.kill(watchdog, signal.SIGKILL)
        os.waitpid(watchdog, 0)


def _reseed() -> None:
    """Fresh random states, as a new process has (a fork copies the runner's: every run would draw
    the same numbers, e.g. the same Prefect run names)."""
    import random

    random.seed()
    for name, reseed in (("numpy", lambda m: m.random.seed()), ("torch", lambda m: m.seed())):
        if name in sys.modules:
            reseed(sys.modules[name])


def _reopen_std_streams() -> None:
    """Python objects for fds 0-2, which now are the caller's (buffered as a fresh process would)."""
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False, errors="backslashreplace")  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m grove.shell.warm SOCKET  (started by grove itself)", file=sys.stderr)
        return 2
    return serve(Path(args[0]), float(os.environ.get("GROVE_WARM_IDLE", "900")))


if __name__ == "__main__":
    raise SystemExit(main())
