"""The one dispatcher. On a worker of a deployed stack (``GROVE_DEVICE`` names the worker's
device), a node that must run on another device (``StepConfig.device``: its placement, or what
its config needs, e.g. an evaluation on CUDA) runs as the ``run-node`` deployment on that
device's pool, as a subflow of the current run; its artifact comes back through the shared
store, where :func:`grove.node.run_node` then finds it. A node that can run anywhere runs where
its flow runs. Locally (no ``GROVE_DEVICE``) nothing is dispatched. Flows never branch."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, cast

from grove.artifacts import Artifact, Device, Source, StepConfig
from grove.errors import GroveError

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

__all__ = ["pool_for", "pool_has_worker", "run_on_pool"]


def pool_for(config: StepConfig, here: str | None = None, api_url: str | None = None,
             has_worker: Callable[[Device], bool] | None = None) -> Device | None:
    """The device whose pool must build ``config``'s node, or None to build it in this process.
    ``here`` / ``api_url`` default to ``GROVE_DEVICE`` / ``PREFECT_API_URL``. A node that runs anywhere
    but prefers a device (train-adapter: a GPU) goes to that device's pool when the pool has a live
    worker (``has_worker``, default: asked of the Prefect API), else runs here."""
    here = here if here is not None else os.environ.get("GROVE_DEVICE")
    api_url = api_url if api_url is not None else os.environ.get("PREFECT_API_URL")
    if not here or not api_url:
        return None
    needs = config.device
    if needs is None and config.PREFERS not in (None, here) and (has_worker or pool_has_worker)(config.PREFERS):
        return config.PREFERS
    if needs is None or needs == here:
        return None
    return needs


def pool_has_worker(device: Device) -> bool:
    """Whether ``<device>-pool`` has a worker that is online now (Prefect marks a worker offline when its
    heartbeats stop)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            workers = client.read_workers_for_work_pool(f"{device}-pool")
        except ObjectNotFound:
            return False
    return any(str(getattr(w.status, "value", w.status)).upper() == "ONLINE" for w in workers)


def run_on_pool(config: StepConfig, parents: Sequence[Artifact | Source], store: str, device: Device) -> None:
    """Run ``config``'s node on ``device``'s pool (what ``pool_for`` chose) and wait; raise if it did not
    complete."""
    from prefect.deployments import run_deployment

    from grove.node import node_logger

    name = f"run-node/run-node-{device}"
    node_logger().info("dispatching %s to the %s pool (%s)", config.NODE, device, name)
    flow_run = cast("FlowRun", run_deployment(  # sync here (Prefect's dual API)
        name,
        parameters={"node": config.NODE, "config": config.model_dump(mode="json"),
                    "parents": [p.model_dump(mode="json") for p in parents], "store": store},
        as_subflow=True,
    ))
    state = flow_run.state
    if state is None or not state.is_completed():
        message = state.message if state else "no state"
        raise GroveError(f"node {config.NODE} failed on the {device} pool ({name}): {message}")
