"""Build leases: one build of a recipe at a time, across the threads, processes and machines that
share a store.

Runs that need the same artifact at the same moment (a fleet's targets share their model's
download and fp32 reference; two people start the same command) would each build it: the same
multi-GB download twice, the same capture twice. So the first run to need an artifact takes its
*lease*, a small JSON file in the store (``leases/<node>/<digest>.json``) created exclusively
(``link`` on a local store, ``If-None-Match: *`` on S3), renews it while it builds, and removes it
once the artifact is committed. The others wait, and read the committed artifact. A lease that is
not renewed for its time to live (its holder crashed or lost the store) is taken over; so is, at once,
a lease whose holder was a process of this same machine that no longer runs (a rerun after a crash or
a ``kill -9`` need not wait out the time to live). A lease records its holder's machine (host name,
kernel boot and pid namespace: a pid means nothing outside them) and process (pid and start time, so
that a pid the kernel gave to another process since does not pass for the holder).

It is a guard against wasted work, not a correctness mechanism: commits are idempotent (the store
keeps the first whole one), so where it cannot exclude (an S3-compatible server that ignores
If-None-Match, such as rclone's, and two runs that find no lease within the same instant), both
build, as before.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grove.errors import StoreError
from grove.store import unreachable

if TYPE_CHECKING:
    from grove.store import ArtifactStore, Manifest

__all__ = ["LEASE_TTL_S", "HeldLease", "build_lease", "remove_stale", "scan_leases"]

LEASE_TTL_S = 120.0  # a lease not renewed for this long is stale (renewed every quarter of it)
_POLL_S = 1.0
_REPORT_EVERY_S = 60.0
_SETTLE_S = 0.5  # servers that ignore If-None-Match: how long concurrent writers have to land
_exclusive: dict[str, bool] = {}  # store URI -> whether its server honours If-None-Match


def _lease_path(store: ArtifactStore, node: str, digest: str) -> str:
    return f"{store.root}/leases/{node}/{digest}.json"


def _exclusive_writes(store: ArtifactStore) -> bool:
    """Whether the store's S3 server refuses a second If-None-Match write (AWS, MinIO, moto do; rclone
    does not). Probed once per process and store."""
    if store.uri not in _exclusive:
        probe = f"{store.root}/leases/.probe-{uuid.uuid4().hex}"
        try:
            for _ in range(2):
                with store.fs.open(probe, "xb") as f:
                    f.write(b"probe")
            _exclusive[store.uri] = False
        except FileExistsError:
            _exclusive[store.uri] = True
        except Exception as exc:  # noqa: BLE001 - conditional writes rejected outright
            if unreachable(exc):  # no answer is not the server's answer: ask again next time
                with store.reaching():
                    raise
            _exclusive[store.uri] = False
        with contextlib.suppress(Exception):
            store.fs.rm(probe)
    return _exclusive[store.uri]


class _Lease:
    def __init__(self, store: ArtifactStore, node: str, digest: str, ttl: float) -> None:
        self.store, self.ttl = store, ttl
        self.path = _lease_path(store, node, digest)
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.since = time.time()

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "since": self.since, "expires": time.time() + self.ttl,
                           "machine": _machine(), "pid": os.getpid(), "start": _process_start(os.getpid())}).encode()

    def _staged(self, body: bytes) -> Path:
        """``body`` in a file of this lease's own beside the lease (local stores), to link or rename."""
        path = Path(self.path)
        staged = path.with_name(f".{path.name}.{self.owner.rsplit(':', 1)[-1]}")
        staged.write_bytes(body)
        return staged

    def read(self) -> dict[str, Any] | None:
        """The lease in the store; None if there is none. An unreadable one reads as expired."""
        try:
            with self.store.reaching():
                raw = self.store.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            held = json.loads(raw)
            return {"owner": str(held["owner"]), "since": float(held["since"]), "expires": float(held["expires"]),
                    "machine": held.get("machine"), "pid": held.get("pid"), "start": held.get("start")}
        except (ValueError, KeyError, TypeError, AttributeError):
            return {"owner": "?", "since": 0.0, "expires": 0.0}

    def create(self) -> bool:
        """Write this lease if the store holds none; True if it is then ours."""
        with self.store.reaching():
            return self._create(self._body())

    def _create(self, body: bytes) -> bool:
        try:
            if self.store.is_local:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                staged = self._staged(body)
                try:
                    os.link(staged, self.path)  # atomic, whole, and refused if the lease exists
                finally:
                    staged.unlink(missing_ok=True)
            else:
                self._create_remote(body)
        except FileExistsError:
            return False
        if not self.store.is_local and not _exclusive_writes(self.store):
            # The last writer wins: let the writes of runs that found no lease at the same moment land,
            # then the lease is ours only if ours is the one that stayed.
            time.sleep(_SETTLE_S)
        held = self.read()
        return held is not None and held["owner"] == self.owner

    def _create_remote(self, body: bytes) -> None:
        try:
            with self.store.fs.open(self.path, "xb") as f:  # s3fs: PutObject with If-None-Match: *
                f.write(body)
        except FileExistsError:
            raise
        except Exception:  # noqa: BLE001 - a server that rejects conditional writes: a plain one, read back
            self.store.fs.pipe(self.path, body)

    def renew(self) -> bool:
        """Push the expiry on while the lease is still ours; False once it is not."""
        held = self.read()
        if held is None or held["owner"] != self.owner:
            return False
        if self.store.is_local:
            self._staged(self._body()).replace(self.path)
        else:
            self.store.fs.pipe(self.path, self._body())
        return True

    def remove(self, owner: str) -> None:
        """Remove the lease if ``owner`` still holds it."""
        held = self.read()
        if held is not None and held["owner"] == owner:
            with contextlib.suppress(FileNotFoundError), self.store.reaching():
                self.store.fs.rm(self.path)


@functools.cache
def _machine() -> str | None:
    """This machine as far as a pid means anything: host name, kernel boot and pid namespace (two
    containers of one host may share a name and a kernel, not their pids). None without /proc."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22; the command name before ')' may hold spaces


def _holder_gone(held: dict[str, Any]) -> bool:
    """Whether the lease's holder was a process of this machine that has ended (or whose pid now
    names a process started later). A holder elsewhere, or a lease without these facts: not known."""
    machine, pid, start = held.get("machine"), held.get("pid"), held.get("start")
    if machine is None or machine != _machine() or not isinstance(pid, int) or not isinstance(start, int):
        return False
    return _process_start(pid) != start


def _describe(owner: str) -> str:
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return f"process {pid} on {host}" if pid else repr(owner)


@contextlib.contextmanager
def _renewing(lease: _Lease, log: logging.Logger | logging.LoggerAdapter[logging.Logger]) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(lease.ttl / 4):
            try:
                if not lease.renew():
                    log.warning("the build lease %s was taken over; building on regardless", lease.path)
                    return
            except Exception as exc:  # noqa: BLE001 - a store hiccup must not kill the build
                log.warning("could not renew the build lease %s: %s", lease.path, exc)

    thread = threading.Thread(target=beat, name="grove-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def build_lease(store: ArtifactStore, node: str, digest: str,
                log: logging.Logger | logging.LoggerAdapter[logging.Logger],
                ttl: float = LEASE_TTL_S) -> Iterator[Manifest | None]:
    """Hold the lease on building ``node/digest`` for the ``with`` block. Yields None when the
    caller is to build (and commit before the block ends), or the artifact's manifest when another
    run committed it while this one waited for the lease."""
    lease = _Lease(store, node, digest, ttl)
    started = reported = time.monotonic()
    waited_for: str | None = None
    while True:
        if (manifest := store.manifest(node, digest)) is not None:
            yield manifest
            return
        # Read first: on a server that ignores If-None-Match, a create would overwrite a live lease.
        if (held := lease.read()) is None:
            if lease.create():
                break
            continue  # another run's lease landed first: read it
        if (gone := _holder_gone(held)) or held["expires"] < time.time():
            why = ("a process of this machine that is gone" if gone else
                   f"not renewed for {time.time() - held['expires'] + ttl:.0f} s (its run stopped)")
            log.warning("%s/%s: taking over the build lease of %s, %s", node, digest[:12], _describe(held["owner"]),
                        why)
            lease.remove(held["owner"])
            continue
        now = time.monotonic()
        if waited_for != held["owner"] or now - reported >= _REPORT_EVERY_S:
            log.info("%s/%s is being built by %s (for %.0f s); waiting for it instead of building it again",
                     node, digest[:12], _describe(held["owner"]), max(time.time() - held["since"], 0.0))
            waited_for, reported = held["owner"], now
        time.sleep(_POLL_S)
    try:
        if waited_for is not None:
            log.info("%s/%s: the lease is ours after %.0f s of waiting", node, digest[:12], time.monotonic() - started)
        # A run that committed between our manifest check and our lease: nothing left to build.
        if (manifest := store.manifest(node, digest)) is not None:
            yield manifest
            return
        with _renewing(lease, log):
            yield None
    finally:
        try:
            lease.remove(lease.owner)
        except StoreError as exc:  # the store went away: the run's own error says so; the lease expires
            log.warning("could not remove the build lease %s: %s", lease.path, exc)


@dataclass(frozen=True)
class HeldLease:
    """A lease found in a store: a build in progress, or (``stale``) one whose run stopped."""

    node: str
    digest: str
    holder: str  # "process PID on HOST"
    since: float
    expires: float
    gone: bool = False  # its holder was a process of this machine that has ended

    @property
    def stale(self) -> bool:
        return self.gone or self.expires < time.time()


def scan_leases(store: ArtifactStore) -> list[HeldLease]:
    """Every lease in the store, oldest first."""
    found = []
    for path in store.listing(f"{store.root}/leases"):
        node, name = path.rstrip("/").split("/")[-2:]
        if not name.endswith(".json") or name.startswith("."):
            continue
        lease = _Lease(store, node, name.removesuffix(".json"), LEASE_TTL_S)
        if (held := lease.read()) is not None:
            found.append(HeldLease(node, name.removesuffix(".json"), _describe(held["owner"]), held["since"],
                                   held["expires"], _holder_gone(held)))
    return sorted(found, key=lambda h: h.since)


def remove_stale(store: ArtifactStore, leases: list[HeldLease], older_than_s: float,
                 dry_run: bool = False) -> list[HeldLease]:
    """Remove the leases whose runs stopped renewing them more than ``older_than_s`` ago; returns them.
    (A run that needs the artifact takes a stale lease over anyway: this is tidying.)"""
    gone = [h for h in leases if h.expires < time.time() - older_than_s]
    for h in [] if dry_run else gone:
        with contextlib.suppress(FileNotFoundError):
            store.fs.rm(_lease_path(store, h.node, h.digest))
    return gone
