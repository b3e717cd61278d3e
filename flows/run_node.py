"""``run-node``: run one node on this worker's pool (the dispatcher's target). Wiring only."""

from __future__ import annotations

from prefect import flow

from grove.artifacts import Artifact
from grove.errors import InvalidRequest
from grove.node import run_node
from grove.tasks.steps import STEPS

__all__ = ["run_node_flow"]


@flow(name="run-node")
def run_node_flow(node: str, config: dict[str, object], parents: list[dict[str, object]], store: str) -> None:
    """Build ``node``'s artifact for (config, parents) into ``store`` (skipped if already there)."""
    step = STEPS.get(node)
    if step is None:
        raise InvalidRequest(f"run-node cannot build '{node}'; it builds: {', '.join(sorted(STEPS))}")
    run_node(step.config.model_validate(config), [Artifact.model_validate(p) for p in parents], store, step.build)
