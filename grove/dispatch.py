"""The one dispatcher. On a worker of a deployed stack (``GROVE_DEVICE`` names the worker's
device), a node that must run on another device (``StepConfig.device``: its placement, or what
its config needs, e.g. an evaluation on CUDA) runs as the ``run-node`` deployment on that
device's pool, as a subflow of the current run; its artifact comes back through the shared
store, where :func:`grove.node.run_node` then finds it. A node that can run anywhere runs where
its flow runs. Locally (no ``GROVE_DEVICE``) nothing is dispatched. Flows never branch."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from grove.artifacts import Artifact, Device, Source, StepConfig
from grove.errors import GroveError

if TYPE_CHECKING:
    from grove.request import AutoOptRequest
    from grove.request_encoder import EncoderOptRequest

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


def run_on_pool(config: StepConfig, parents: list[Artifact | Source], store: str, device: Device) -> None:
    """Run ``config``'s node on ``device``'s pool (what ``pool_for`` chose) and wait; raise if it did not
    complete."""
    from prefect.deployments import run_deployment

    from grove.node import node_logger

    name = f"run-node/run-node-{device}"
    node_logger().info("dispatching %s to the %s pool (%s)", config.NODE, device, name)
    flow_run = run_deployment(
        name,
        parameters={"node": config.NODE, "config": config.model_dump(mode="json"),
                    "parents": [p.model_dump(mode="json") for p in parents], "store": store},
        as_subflow=True,
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        message = state.message if state else "no state"
        raise GroveError(f"node {config.NODE} failed on the {device} pool ({name}): {message}")


# In-process runs (no deployed stack) take turns. A fleet's entries are checked concurrently, in
# threads of one process; two optimizations at once there share the process's import machinery
# and the exporters' global registries, which are not thread-safe: a decoder and an encoder
# refreshed together failed every time (the model builder's "cannot import name
# 'AutoModelForCausalLM' from 'transformers'", then, with the imports done first, a KeyError
# inside the builder). On a deployed stack each run is its own process on a worker.
_IN_PROCESS = threading.Lock()


def run_auto_opt_on_pool(request: AutoOptRequest | EncoderOptRequest, device: str) -> None:
    """Run the request's auto-opt flow: on a deployed stack as the ``auto-opt-<device>`` (or
    ``auto-opt-encoder-<device>``) deployment, a subflow; in-process otherwise. Raises GroveError
    if the run did not complete."""
    from grove.request import AutoOptRequest

    if os.environ.get("GROVE_DEVICE") and os.environ.get("PREFECT_API_URL"):
        from prefect.deployments import run_deployment

        flow = "auto-opt" if isinstance(request, AutoOptRequest) else "auto-opt-encoder"
        flow_run = run_deployment(f"{flow}/{flow}-{device}", parameters={"request": request.model_dump(mode="json")},
                                  as_subflow=True)
        state = flow_run.state
    else:
        from grove.runner import check_provider, configured_flow

        # In this process, as `grove auto-opt` checks it: a gpu target on a machine without CUDA is one
        # line saying so, not the runtime's failure to load its CUDA library after the capture.
        check_provider(request.execution_provider, "decoder" if isinstance(request, AutoOptRequest) else "encoder")
        with _IN_PROCESS:
            state = configured_flow(request)(request, return_state=True)
    if state is None or not state.is_completed():
        raise GroveError(f"auto-opt did not complete: {state.message if state else 'no state'}")
