"""Task ``publish-registry``: publish a package artifact as a model of the registry in the store
(``models/<name>/<target>/<version>/``), then move ``models/<name>/<target>/latest.json`` to it.
The pointer is one small object written last (a single PUT on S3, a rename locally),
so readers see the old version or the new one, never a mix.

Two refreshes of the same fleet at once both find an entry stale, both build (each node once:
the build leases) and both publish the same version: the publishers of one entry take turns
under a lease (``leases/publish-registry/...``), and one that finds ``latest`` already at its
version leaves it alone, so it moves once."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from prefect import task

from grove.artifacts import Artifact
from grove.node import node_logger, store_for

__all__ = ["point_latest", "publish_model", "read_latest", "read_latest_many"]

_READERS = 32  # latest.json reads at once: a fleet's pointers are small objects, each a round trip on S3


def _base(store_uri: str, name: str, target: str) -> str:
    return f"{store_for(store_uri).root}/models/{name}/{target}"


def read_latest(store_uri: str, name: str, target: str) -> dict[str, object] | None:
    """The ``latest`` pointer of (name, target), or None if nothing was published yet."""
    fs = store_for(store_uri).fs
    try:
        return dict(json.loads(fs.cat_file(f"{_base(store_uri, name, target)}/latest.json")))
    except FileNotFoundError:
        return None


def read_latest_many(store_uri: str, entries: Iterable[tuple[str, str]]) -> dict[tuple[str, str], dict[str, object]]:
    """The ``latest`` pointers of many (name, target) entries, read in parallel: only those that
    read and decode, so an entry that is absent here was never published, or has a pointer that
    only its own refresh-entry task (which reads it again) can say what is wrong with."""
    wanted = sorted(set(entries))

    def read(entry: tuple[str, str]) -> dict[str, object] | None:
        try:
            pointer = read_latest(store_uri, *entry)
        except Exception:  # noqa: BLE001 - reported by the entry's own task, which reads it again
            return None
        return pointer if isinstance(pointer, dict) else None

    with ThreadPoolExecutor(max_workers=max(1, min(_READERS, len(wanted)))) as pool:
        pointers = dict(zip(wanted, pool.map(read, wanted), strict=True))
    return {entry: pointer for entry, pointer in pointers.items() if pointer is not None}


def point_latest(store_uri: str, name: str, target: str, version: str, package: str, source_digest: str) -> None:
    """Write ``latest.json`` of (name, target): one small object, whole (a rename locally)."""
    store = store_for(store_uri)
    base = _base(store_uri, name, target)
    pointer = {"version": version, "path": f"{base}/{version}", "package": package, "source_digest": source_digest,
               "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    latest = f"{base}/latest.json"
    if store.is_local:
        staged = f"{latest}.{uuid.uuid4().hex[:8]}.tmp"  # a name of this writer's own
        store.fs.makedirs(base, exist_ok=True)
        store.fs.pipe(staged, json.dumps(pointer).encode())
        store.fs.mv(staged, latest)
    else:
        store.fs.pipe(latest, json.dumps(pointer).encode())


@task(name="publish-registry", persist_result=False, retries=2, retry_delay_seconds=[2, 5])
def publish_model(package: Artifact, name: str, target: str, version: str, source_digest: str) -> str:
    """Publish ``package`` as ``version`` and point ``latest`` at it, unless another run already
    did (the same version: the same bytes); returns the version path."""
    from grove.lease import build_lease

    store = store_for(package.store)
    log = node_logger()
    src = store.artifact_path(package.node, package.digest)
    dst = f"{_base(package.store, name, target)}/{version}"
    entry = hashlib.sha256(f"{name}/{target}".encode()).hexdigest()[:32]
    with build_lease(store, "publish-registry", entry, log):  # no artifact of that name: always ours to do
        current = read_latest(package.store, name, target)
        if current is not None and current.get("version") == version:
            log.info("%s/%s version %s was already published by another run; latest not moved", name, target, version)
            return dst
        for path in store.fs.find(src):
            target_path = f"{dst}/{path[len(src) + 1:]}"  # the package manifest comes along
            if store.is_local:
                store.fs.makedirs(target_path.rsplit("/", 1)[0], exist_ok=True)
            store.fs.copy(path, target_path)
        point_latest(package.store, name, target, version, package.digest, source_digest)
    log.info("published %s/%s version %s", name, target, version)
    return dst
