"""Node ``convert-fp16``: onnxruntime's float16 conversion of an encoder graph, or of an ONNX graph given
as the model (its weights stay in ``model.onnx.data``). Inputs and
outputs stay fp32 (``keep_io_types``), so callers feed and read the same arrays as before;
ops that overflow or lose too much in fp16 stay fp32 (``op_block_list``)."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks._genai_runtime import model_size

__all__ = ["DEFAULT_FP16_BLOCK_LIST", "Fp16Config", "convert_fp16"]

# Normalisations and softmax reduce over a whole row: their sums of squares overflow fp16's
# 65504 on long rows, and the L2 normalisation of the pooled embedding divides by such a sum.
DEFAULT_FP16_BLOCK_LIST: tuple[str, ...] = ("LayerNormalization", "SkipLayerNormalization", "Softmax",
                                            "ReduceSum", "Sqrt", "Div")


class Fp16Config(StepConfig):
    NODE = "convert-fp16"
    VERSION = 1
    keep_io_types: bool = Field(True, description="keep graph inputs and outputs fp32")
    op_block_list: list[str] = Field(default_factory=lambda: list(DEFAULT_FP16_BLOCK_LIST),
                                     description="op types kept in fp32")


@task(name="convert-fp16", cache_policy=RECIPE_CACHE)
def convert_fp16(model: Artifact, config: Fp16Config) -> Artifact:
    """fp32 ONNX encoder artifact -> fp16 ONNX encoder artifact."""
    return run_node(config, [model], model.store, _convert)


def _convert(inputs: list[Path], config: Fp16Config, out: Path) -> dict[str, object]:
    import onnx
    from onnxruntime.transformers.onnx_model import OnnxModel

    (src,) = inputs
    model = OnnxModel(onnx.load(str(src / "model.onnx")))
    # onnxruntime's converter (not onnxconverter-common's) knows its contrib ops (Attention,
    # SkipLayerNormalization, BiasGelu) and inserts the Casts around blocked ops itself.
    model.convert_float_to_float16(keep_io_types=config.keep_io_types, op_block_list=list(config.op_block_list))
    external = (src / "model.onnx.data").is_file()  # an imported graph (import-onnx) keeps its weights apart
    if external:
        onnx.save_model(model.model, str(out / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    else:
        model.save_model_to_file(str(out / "model.onnx"))
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx") and f.name != "manifest.json":
            shutil.copy2(f, out / f.name)
    casts = sum(1 for n in model.model.graph.node if n.op_type == "Cast")
    size = model_size(out) / 1e6
    node_logger().info("fp16: %.1f MB -> %.1f MB, %d Cast nodes", model_size(src) / 1e6, size, casts)
    return {"size_mb": round(size, 2), "casts": casts, "op_block_list": list(config.op_block_list)}
