"""The one dispatcher. A node whose device differs from the worker's (``GROVE_DEVICE``) runs as
the ``run-node`` deployment on the matching pool, as a subflow of the current run; its artifact
comes back through the shared store, where :func:`grove.node.run_node` then finds it. Locally
(no ``GROVE_DEVICE``) nothing is dispatched: every node runs in-process. Flows never branch."""

from __future__ import annotations

from grove.artifacts import Artifact, Source, StepConfig
from grove.errors import GroveError

__all__ = ["run_on_pool"]


def run_on_pool(config: StepConfig, parents: list[Artifact | Source], store: str) -> None:
    """Run ``config``'s node on the ``<device>`` pool and wait; raise if it did not complete."""
    from prefect.deployments import run_deployment

    from grove.node import node_logger

    name = f"run-node/run-node-{config.device}"
    node_logger().info("dispatching %s to the %s pool (%s)", config.NODE, config.device, name)
    flow_run = run_deployment(
        name,
        parameters={"node": config.NODE, "config": config.model_dump(mode="json"),
                    "parents": [p.model_dump(mode="json") for p in parents], "store": store},
        as_subflow=True,
    )
    state = flow_run.state
    if state is None or not state.is_completed():
        message = state.message if state else "no state"
        raise GroveError(f"node {config.NODE} failed on the {config.device} pool ({name}): {message}")


def run_auto_opt_on_pool(request: object, device: str) -> None:
    """Run the auto-opt flow for ``request``: as the ``auto-opt-<device>`` deployment (a subflow)
    on a deployed stack, in-process otherwise. Raises GroveError if the run did not complete."""
    import os

    if os.environ.get("GROVE_DEVICE") and os.environ.get("PREFECT_API_URL"):
        from prefect.deployments import run_deployment

        flow_run = run_deployment(f"auto-opt/auto-opt-{device}",
                                  parameters={"request": request.model_dump(mode="json")},  # type: ignore[attr-defined]
                                  as_subflow=True)
        state = flow_run.state
    else:
        from grove.runner import configured_flow

        state = configured_flow(request)(request, return_state=True)  # type: ignore[arg-type]
    if state is None or not state.is_completed():
        raise GroveError(f"auto-opt did not complete: {state.message if state else 'no state'}")
