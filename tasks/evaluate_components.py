"""Node ``evaluate-components``: what can be measured of a multimodal model's exported components without
their inputs' preprocessing (images, audio): each one's size, that onnxruntime loads it (a component that
does not load fails the run), and, where Grove's synthetic inputs fit it (token ids, features, a KV cache),
that it runs and how long a run takes. A component they do not fit (an image tower whose patch grid the
synthetic sizes miss) is reported as loaded, not run, with onnxruntime's reason. Their numerical parity
with PyTorch is mobius's to test; Grove measures what the later graph configs do to each component."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, MeasureConfig
from grove.node import RECIPE_CACHE, node_logger, run_node

__all__ = ["ComponentsEvalConfig", "evaluate_components"]

EVAL_JSON = "eval.json"


class ComponentsEvalConfig(MeasureConfig):
    NODE = "evaluate-components"
    VERSION = 1
    repeat: int = Field(5, ge=1, description="timed runs per component that runs on synthetic inputs")


@task(name="evaluate-components", cache_policy=RECIPE_CACHE)
def evaluate_components(model: Artifact, config: ComponentsEvalConfig) -> Artifact:
    """The exported components' sizes, loading, and runs on synthetic inputs."""
    return run_node(config, [model], model.store, _evaluate)


def _evaluate(inputs: list[Path], config: ComponentsEvalConfig, out: Path) -> dict[str, object]:
    import onnxruntime as ort

    from grove.tasks._genai_runtime import model_size
    from grove.tasks.evaluate_graph import _head_size, _session, latency_ms, synthetic_inputs

    (folder,) = inputs
    head_size = _head_size(folder)
    ort.set_default_logger_severity(4)  # a component the synthetic inputs do not fit is reported, not logged
    components: dict[str, dict[str, Any]] = {}
    for graph in sorted(folder.glob("*/model.onnx")):
        name = graph.parent.name
        entry: dict[str, Any] = {"size_mb": round(model_size(graph.parent) / 1e6, 2)}
        session = _session(graph.parent, config.provider, f"the exported {name}")
        entry["loads"] = True
        try:
            feeds = synthetic_inputs(session, head_size=head_size)
            session.run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's errors name no common base; reported, not raised
            entry["runs"] = False
            message = str(exc).split("Status Message:")[-1].strip().splitlines()[0][:160]
            entry["reason"] = f"synthetic inputs do not fit it ({message})"
        else:
            entry["runs"] = True
            entry["latency_ms_avg"] = latency_ms(session, feeds, config.repeat)
        components[name] = entry
        node_logger().info("%s: %.1f MB, loads%s", name, entry["size_mb"],
                           f", runs in {entry['latency_ms_avg']} ms" if entry["runs"] else f"; {entry['reason']}")
    metrics = {"size_mb": round(sum(c["size_mb"] for c in components.values()), 2), "components": components}
    (out / EVAL_JSON).write_text(json.dumps(metrics, indent=2))
    return {"size_mb": metrics["size_mb"], "components": len(components),
            "ran": sum(1 for c in components.values() if c["runs"])}
