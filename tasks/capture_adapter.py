"""Node ``capture-adapter``: capture-onnx with a LoRA adapter built into the graph, as the
onnxruntime-genai builder writes it (``adapter_path``): beside each adapted MatMul, a lora_A and a
lora_B MatMul whose weights extract-adapter then turns into switchable inputs."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from grove.artifacts import Artifact
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks.capture_onnx import CaptureConfig, run_builder

__all__ = ["CaptureAdapterConfig", "capture_adapter"]


class CaptureAdapterConfig(CaptureConfig):
    NODE = "capture-adapter"
    VERSION = 1


@task(name="capture-adapter", cache_policy=RECIPE_CACHE)
def capture_adapter(model: Artifact, adapter: Artifact, config: CaptureAdapterConfig) -> Artifact:
    """HF folder + adapter -> genai model folder with the LoRA MatMuls in the graph."""
    return run_node(config, [model, adapter], model.store, _capture)


def _capture(inputs: list[Path], config: CaptureAdapterConfig, out: Path) -> dict[str, object]:
    hf_dir, adapter_dir = inputs
    try:
        model_type = run_builder(hf_dir, out, config.precision, config.execution_provider,
                                 [f"adapter_path={adapter_dir / 'adapter'}"])
    except RuntimeError as exc:  # peft's "size mismatch for ...": an adapter of another base
        raise InvalidRequest(f"the adapter does not fit this base model ({str(exc).splitlines()[-1].strip()}); "
                             "pass the base it was trained on (its adapter_config.json names it)") from exc
    node_logger().info("captured %s with its LoRA adapter at %s for %s", model_type, config.precision,
                       config.execution_provider)
    return {"model_type": model_type, "precision": config.precision}
