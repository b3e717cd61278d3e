"""Node ``optimize-graph``: onnxruntime's transformer optimizer on an encoder graph (Attention,
SkipLayerNormalization, BiasGelu fusions). Reports the fusions applied and the node counts
before and after. The other files of the artifact are carried over unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.errors import UnsupportedArchitecture
from grove.node import RECIPE_CACHE, node_logger, run_node
from tasks._encoder_io import encoder_info

if TYPE_CHECKING:
    import onnx

__all__ = ["GraphConfig", "optimize_graph"]

# onnxruntime's optimizer model_type by Hugging Face model_type: the three share BERT's graph.
_ORT_MODEL_TYPE = {"bert": "bert", "roberta": "bert", "distilbert": "bert"}


class GraphConfig(StepConfig):
    NODE = "optimize-graph"
    VERSION = 1
    opt_level: Literal[0, 1, 2, 99] = Field(1, description="onnxruntime graph optimization level run after the "
                                            "fusions; 1 keeps the graph portable across providers, 2/99 bake in "
                                            "CPU-specific layouts")
    use_gpu: bool = Field(False, description="let the optimizer pick GPU-only fusions")


@task(name="optimize-graph", cache_policy=RECIPE_CACHE)
def optimize_graph(model: Artifact, config: GraphConfig) -> Artifact:
    """ONNX encoder artifact -> fused ONNX encoder artifact (same inputs and outputs)."""
    return run_node(config, [model], model.store, _optimize)


def _optimize(inputs: list[Path], config: GraphConfig, out: Path) -> dict[str, object]:
    import onnx
    from onnxruntime.transformers.optimizer import optimize_model

    (src,) = inputs
    info = encoder_info(src)
    if info.model_type not in _ORT_MODEL_TYPE:
        raise UnsupportedArchitecture(info.model_type, sorted(_ORT_MODEL_TYPE), path="graph optimization")
    model = onnx.load(str(src / "model.onnx"))
    before = len(model.graph.node)
    _prepare_for_fusion(model)
    staged = out / "prepared.onnx"
    onnx.save(model, str(staged))
    optimizer = optimize_model(str(staged), model_type=_ORT_MODEL_TYPE[info.model_type], num_heads=info.num_heads,
                               hidden_size=info.hidden_size, opt_level=config.opt_level, use_gpu=config.use_gpu)
    staged.unlink()
    optimizer.save_model_to_file(str(out / "model.onnx"))
    fusions = {k: int(v) for k, v in optimizer.get_fused_operator_statistics().items() if v}
    after = len(optimizer.model.graph.node)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.onnx", "manifest.json"):
            shutil.copy2(f, out / f.name)
    node_logger().info("graph optimized: %d -> %d nodes; fusions %s", before, after, json.dumps(fusions))
    return {"nodes_before": before, "nodes_after": after, "fusions": fusions, "opt_level": config.opt_level}


def _prepare_for_fusion(model: onnx.ModelProto) -> None:
    """Rewrite two exporter idioms into the forms onnxruntime 1.32's BERT attention fuser matches
    (same maths): the mask's Unsqueeze(axes=[1, 2]) as two Unsqueezes, and the constant
    ``scores * scale`` before the mask Add as ``scores / (1 / scale)`` (the fuser takes the first
    Mul parent of that Add as the mask, so a scale Mul hides the real one)."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        axes = consts.get(node.input[1]) if node.op_type == "Unsqueeze" and len(node.input) > 1 else None
        if axes is not None and numpy_helper.to_array(axes).tolist() == [1, 2]:
            first, second = (numpy_helper.from_array(np.array([a], np.int64), f"{node.name}_axis{a}") for a in (1, 2))
            graph.initializer.extend([first, second])
            nodes.append(helper.make_node("Unsqueeze", [node.input[0], first.name], [f"{node.name}_mid"],
                                          name=f"{node.name}_1"))
            nodes.append(helper.make_node("Unsqueeze", [f"{node.name}_mid", second.name], list(node.output),
                                          name=f"{node.name}_2"))
        else:
            nodes.append(node)
    for softmax in (n for n in nodes if n.op_type == "Softmax"):
        add = producer.get(softmax.input[0])
        for name in add.input if add is not None and add.op_type == "Add" else []:
            mul = producer.get(name)
            if mul is None or mul.op_type != "Mul" or mul.input[1] not in consts:
                continue
            if getattr(producer.get(mul.input[0]), "op_type", "") == "MatMul":
                scale = numpy_helper.to_array(consts[mul.input[1]])
                inverse = numpy_helper.from_array((1.0 / scale).astype(scale.dtype), f"{mul.name}_inverse_scale")
                graph.initializer.append(inverse)
                mul.op_type, mul.input[1] = "Div", inverse.name
    del graph.node[:]
    graph.node.extend(nodes)
