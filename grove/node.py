"""The node contract: run a node body once per recipe, commit its output, and let Prefect's
task cache use the very same key.

A task module defines a config (``StepConfig`` subclass) and a body
``build(inputs: list[Path], config, out: Path) -> metrics``; its Prefect task calls
:func:`run_node`. :data:`RECIPE_CACHE` is the task's cache policy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from prefect.cache_policies import CachePolicy
from prefect.serializers import JSONSerializer

from grove.artifacts import Artifact, Source, StepConfig, recipe_digest
from grove.lease import build_lease
from grove.store import ArtifactStore, lineage_of

__all__ = ["RECIPE_CACHE", "RESULT_SERIALIZER", "cache_key", "node_logger", "node_scratch", "report_progress",
           "run_node", "store_for"]

C = TypeVar("C", bound=StepConfig)
# A node's body: its inputs' local folders, its config, the folder to write to -> its metrics (JSON values,
# see artifacts.Metric; validated when the Artifact is made).
Build = Callable[[list[Path], C, Path], Mapping[str, object]]

_DECODER = "grove.node.decode_artifact_json"


class GroveJSONSerializer(JSONSerializer):
    """JSON records whose decoder only rebuilds Grove's own artifact types. Prefect's default
    JSON decoder imports any class a record names (and its default serializer is pickle), so
    a record in a shared bucket could otherwise run code. Registered under its own type name,
    so workers select it with PREFECT_RESULTS_DEFAULT_SERIALIZER=grove-json."""

    type: Literal["grove-json"] = "grove-json"
    object_decoder: str | None = _DECODER


RESULT_SERIALIZER = GroveJSONSerializer()
_ALLOWED_CLASSES: dict[str, type[Artifact] | type[Source]] = {"grove.artifacts.Artifact": Artifact,
                                                              "grove.artifacts.Source": Source}

_stores: dict[str, ArtifactStore] = {}


def store_for(uri: str) -> ArtifactStore:
    if uri not in _stores:
        _stores[uri] = ArtifactStore(uri)
    return _stores[uri]


def decode_artifact_json(obj: dict[str, Any]) -> Any:
    cls = _ALLOWED_CLASSES.get(obj.get("__class__", "")) if "__class__" in obj else None
    if "__class__" in obj and cls is None:
        raise ValueError(f"refusing to decode {obj['__class__']!r} from a result record")
    return cls.model_validate(obj["data"]) if cls else obj


def node_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The Prefect run logger inside a run, else the module logger (plain function calls)."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("grove")


@dataclass
class _Progress:
    artifact_id: Any
    what: str
    updated: float  # when the dashboard's bar last moved
    logged: float  # when the log last said how far the node is


_progress: ContextVar[_Progress | None] = ContextVar("grove_progress", default=None)
_building: ContextVar[tuple[ArtifactStore, str, str] | None] = ContextVar("grove_building", default=None)


def node_scratch() -> tuple[ArtifactStore, str]:
    """The store of the node being built, and a folder in it that belongs to this recipe alone
    (``scratch/<node>/<digest>``): where long nodes keep what lets a rerun resume after a crash (a
    training's checkpoints). It outlives the process, not the build: the node removes it once
    committed. Call from inside a node's body."""
    current = _building.get()
    if current is None:
        raise RuntimeError("node_scratch() is for a node's body, called through run_node")
    store, node, digest = current
    return store, f"{store.root}/scratch/{node}/{digest}"
_BAR_EVERY_S = 1.0  # the dashboard's bar moves at most this often (each move is an API call)
_LOG_EVERY_S = 15.0  # a long node says how far it is this often (a 7B model's int4 takes minutes)


def report_progress(fraction: float, note: str) -> None:
    """Move the running node's progress bar on the dashboard, and on long work say how far it is in
    the log (a no-op outside a Prefect run). Call it from the node's own thread."""
    current = _progress.get()
    if current is None:
        return
    fraction, now = min(max(fraction, 0.0), 1.0), time.monotonic()
    if now - current.updated >= _BAR_EVERY_S or fraction >= 1.0:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(current.artifact_id, round(100 * fraction, 1), description=f"{current.what}: {note}")
        current.updated = now
    if now - current.logged >= _LOG_EVERY_S and fraction < 1.0:
        node_logger().info("%.0f%% done: %s", 100 * fraction, note)
        current.logged = now


@contextlib.contextmanager
def _progress_bar(what: str) -> Iterator[None]:
    from prefect.artifacts import create_progress_artifact
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:  # plain function call (tests, bench): nothing to show
        yield
        return
    start = time.monotonic()
    token = _progress.set(_Progress(create_progress_artifact(0.0, description=f"{what}: started"), what, start, start))
    try:
        yield
        report_progress(1.0, "done")
    finally:
        _progress.reset(token)


def _split_inputs(inputs: Mapping[str, Any]) -> tuple[StepConfig, list[Artifact | Source], str]:
    config = next(v for v in inputs.values() if isinstance(v, StepConfig))
    parents = [v for v in inputs.values() if isinstance(v, (Artifact, Source))]
    store = inputs.get("store") or next(p.store for p in parents if isinstance(p, Artifact))
    return config, parents, str(store)


def cache_key(config: StepConfig, parents: Sequence[Artifact | Source]) -> str:
    return f"{config.NODE}-{recipe_digest(config, parents)}"


@dataclass
class _RecipeCache(CachePolicy):
    """Key = recipe digest. Before Prefect looks the key up, make sure a hit is honest: the
    artifact must be complete in the store and the record must be Grove-JSON; otherwise the
    stale record is dropped so the task runs again."""

    def compute_key(
        self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str | None:
        config, parents, uri = _split_inputs(inputs)
        key = cache_key(config, parents)
        store = store_for(uri)
        digest = key.split("-")[-1]
        if store.manifest(config.NODE, digest) is None or not _record_is_safe(store, key):
            store.drop_result_record(key)
        return key


RECIPE_CACHE = _RecipeCache()


def _record_is_safe(store: ArtifactStore, key: str) -> bool:
    path = f"{store.root}/prefect-results/{key}"
    try:
        record = json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        return True
    except ValueError:
        return False
    serializer = record.get("metadata", {}).get("serializer", {})
    return serializer.get("type") == "grove-json" and serializer.get("object_decoder") == _DECODER


def run_node(config: C, parents: Sequence[Artifact | Source], store_uri: str, build: Build[C]) -> Artifact:
    """Build the artifact for (config, parents) unless the store already holds it."""
    log = node_logger()
    store = store_for(store_uri)
    digest = recipe_digest(config, parents)
    from grove.dispatch import pool_for, run_on_pool

    if (pool := pool_for(config)) is not None:  # only on a worker, for a node that needs (or prefers) the other device
        run_on_pool(config, parents, store_uri, pool)
    existing = store.manifest(config.NODE, digest)
    if existing is not None:
        log.info("%s/%s already in the store; reusing it", config.NODE, digest[:12])
        return Artifact(node=config.NODE, digest=digest, store=store.uri, metrics=existing.metrics)
    with build_lease(store, config.NODE, digest, log) as built_meanwhile:
        if built_meanwhile is not None:
            log.info("%s/%s was built by another run meanwhile; reusing it", config.NODE, digest[:12])
            return Artifact(node=config.NODE, digest=digest, store=store.uri, metrics=built_meanwhile.metrics)
        return _build(config, parents, store, digest, build)


def _build(config: C, parents: Sequence[Artifact | Source], store: ArtifactStore, digest: str,
           build: Build[C]) -> Artifact:
    from grove.quiet import quiet_libraries

    quiet_libraries()
    log = node_logger()
    local_inputs = [store_for(p.store).fetch(p.node, p.digest) for p in parents if isinstance(p, Artifact)]
    work = Path(tempfile.mkdtemp(prefix=f"grove-{config.NODE}-"))
    try:
        start = time.perf_counter()
        token = _building.set((store, config.NODE, digest))
        try:
            with _progress_bar(f"{config.NODE} {digest[:12]}"):
                metrics = dict(build(local_inputs, config, work))
        finally:
            _building.reset(token)
        seconds = time.perf_counter() - start
        metrics.setdefault("seconds", round(seconds, 2))
        manifest = store.commit(
            work,
            node=config.NODE,
            node_version=config.VERSION,
            digest=digest,
            config=config.recipe(),
            inputs=[p.digest for p in parents],
            metrics=metrics,
            seconds=seconds,
            ancestors=lineage_of(local_inputs),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _drop_scratch(store, config.NODE, digest)
    size_mb = sum(f.size for f in manifest.files) / 1e6
    log.info("%s/%s built in %.1f s (%.1f MB)", config.NODE, digest[:12], seconds, size_mb)
    return Artifact(node=config.NODE, digest=digest, store=store.uri, metrics=manifest.metrics)


def _drop_scratch(store: ArtifactStore, node: str, digest: str) -> None:
    """The recipe's scratch folder (node_scratch), once its artifact is committed: nothing resumes it now."""
    scratch = f"{store.root}/scratch/{node}/{digest}"
    try:
        if store.fs.exists(scratch):
            store.fs.rm(scratch, recursive=True)
    except OSError as exc:  # left for `grove store prune`; the artifact itself is committed
        node_logger().warning("could not remove %s (%s)", scratch, exc)
