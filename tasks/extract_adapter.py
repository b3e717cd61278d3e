"""Node ``extract-adapter``: the LoRA weights of a graph captured with an adapter become optional
inputs (dynamic rank, a rank-0 default: no adapter = the base model), and the adapter they held is
written beside the model as ``adapter_weights.onnx_adapter``, which ``onnxruntime_genai.Adapters``
loads and a generator switches on per request (Olive's ExtractAdapters pass). The base's weights
(int4 or fp32) are untouched, so one base serves every adapter trained on it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task

from grove.artifacts import Artifact, StepConfig
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks._onnx_adapter import ADAPTER_FILE, LAYOUT_FILE, fuse_lora_groups, make_switchable, write_adapter

__all__ = ["ExtractAdapterConfig", "extract_adapter"]


class ExtractAdapterConfig(StepConfig):
    NODE = "extract-adapter"
    VERSION = 2  # 2: the LoRA paths of a group Grove's int4 fused (q/k/v, gate/up) are one path


@task(name="extract-adapter", cache_policy=RECIPE_CACHE)
def extract_adapter(model: Artifact, config: ExtractAdapterConfig) -> Artifact:
    return run_node(config, [model], model.store, _extract)


def _extract(inputs: list[Path], config: ExtractAdapterConfig, out: Path) -> dict[str, object]:
    import onnx

    (model_dir,) = inputs
    model = onnx.load(str(model_dir / "model.onnx"))
    layout = fuse_lora_groups(model)
    weights = make_switchable(model)
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in ("model.onnx", "model.onnx.data", "manifest.json"):
            shutil.copy2(f, out / f.name)
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    write_adapter(weights, out / ADAPTER_FILE)
    if layout:  # what convert-adapters -m needs to lay another adapter out as this graph takes it
        (out / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
    node_logger().info("%d LoRA weights made switchable (%d fused groups); the adapter is %s", len(weights),
                       len(layout) // 2, ADAPTER_FILE)
    return {"lora_inputs": len(weights), "fused_groups": len(layout) // 2}
