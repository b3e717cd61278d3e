"""Task ``publish-registry``: copy a package artifact to the model registry in the store,
``models/<name>/<target>/<version>/``, then move ``models/<name>/<target>/latest.json``
to it. The pointer is one small object written last (a single PUT on S3, a rename locally),
so readers see the old version or the new one, never a mix."""

from __future__ import annotations

import json
import time

from prefect import task

from grove.artifacts import Artifact
from grove.node import node_logger, store_for

__all__ = ["publish_registry", "read_latest"]


def _base(store_uri: str, name: str, target: str) -> str:
    return f"{store_for(store_uri).root}/models/{name}/{target}"


def read_latest(store_uri: str, name: str, target: str) -> dict[str, object] | None:
    """The ``latest`` pointer of (name, target), or None if nothing was published yet."""
    fs = store_for(store_uri).fs
    try:
        return dict(json.loads(fs.cat_file(f"{_base(store_uri, name, target)}/latest.json")))
    except FileNotFoundError:
        return None


@task(name="publish-registry", persist_result=False, retries=2, retry_delay_seconds=[2, 5])
def publish_registry(package: Artifact, name: str, target: str, version: str, source_digest: str) -> str:
    """Publish ``package`` as ``version`` and point ``latest`` at it; returns the version path."""
    store = store_for(package.store)
    src = store.artifact_path(package.node, package.digest)
    dst = f"{_base(package.store, name, target)}/{version}"
    for path in store.fs.find(src):
        target_path = f"{dst}/{path[len(src) + 1:]}"  # the package manifest comes along
        if store.is_local:
            store.fs.makedirs(target_path.rsplit("/", 1)[0], exist_ok=True)
        store.fs.copy(path, target_path)
    pointer = {"version": version, "path": dst, "package": package.digest, "source_digest": source_digest,
               "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    latest = f"{_base(package.store, name, target)}/latest.json"
    if store.is_local:
        store.fs.pipe(f"{latest}.tmp", json.dumps(pointer).encode())
        store.fs.mv(f"{latest}.tmp", latest)
    else:
        store.fs.pipe(latest, json.dumps(pointer).encode())
    node_logger().info("published %s/%s version %s", name, target, version)
    return dst
