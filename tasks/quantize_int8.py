"""Node ``quantize-int8``: onnxruntime's int8 quantization of an encoder graph, dynamic
(weights int8 ahead of time, activations scaled per run) or static (activation ranges
calibrated on tokenised text; QDQ or QOperator format). The other files are carried over.

Default (measured on all-MiniLM-L6-v2, batch 1, 64 tokens, 2 threads, bench/bench_encoder.py):
dynamic, every MatMul and fused Attention, **per-channel** weights: 6.2 ms vs PyTorch fp32 18.0 ms
(0.34x) on a 2-CPU AVX2 machine, mean-pooled cosine 0.992 vs sentence-transformers (docs/encoders.md: the
runs, and why int8 gains little over the fused fp32 graph without VNNI). Per-tensor weights
(onnxruntime's default) give the same speed but cosine 0.960: a few output channels of the FFN
down-projections have outlier ranges that one per-tensor scale cannot cover."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prefect import task
from pydantic import Field, model_validator

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks import _encoder_io as eio

if TYPE_CHECKING:
    from collections.abc import Sequence

    import onnx
    from onnxruntime.quantization import CalibrationDataReader

__all__ = ["Int8Config", "quantize_int8"]


class Int8Config(StepConfig):
    NODE = "quantize-int8"
    VERSION = 3  # 2: static quantization leaves LayerNormalization nodes float; 3: calibration_sha256
    mode: Literal["dynamic", "static"] = Field("dynamic", description="dynamic: activations scaled per run (no "
                                               "data needed); static: activation ranges calibrated on text")
    per_channel: bool = Field(True, description="one weight scale per output channel (keeps cosine >= 0.99 on "
                              "MiniLM; per-tensor drops it to 0.96)")
    op_types_to_quantize: list[str] | None = Field(None, description="op types to quantize (None: onnxruntime's "
                                                   "defaults, i.e. MatMul and fused Attention)")
    nodes_to_exclude: list[str] = Field(default_factory=list, description="node names kept in fp32")
    quant_format: Literal["QDQ", "QOperator"] = Field("QDQ", description="static only: QuantizeLinear/"
                                                      "DequantizeLinear pairs, or fused integer operators")
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = Field("MinMax", description="static only: how "
                                                                         "activation ranges are chosen")
    calibration_data: str = Field("builtin:GPL-3", description="static only: UTF-8 text (path, s3:// or "
                                  "'builtin:GPL-3'); each paragraph is one calibration sample; a Parquet / JSONL / "
                                  "CSV table: its sentence pairs (sentence1 + sentence2, ...) or its text column's "
                                  "rows")
    calibration_samples: int = Field(32, ge=1, le=4096, description="static only: paragraphs used")
    calibration_sha256: str = Field("", description="static only: sha256 of calibration_data (part of the recipe: "
                                    "an edited file at the same path is a new calibration)")
    max_length: int = Field(128, ge=8, le=512, description="static only: tokens per calibration sample")

    @model_validator(mode="after")
    def _check(self) -> Int8Config:
        if self.mode == "dynamic" and (self.quant_format != "QDQ" or self.calibrate_method != "MinMax"):
            raise ValueError("quant_format and calibrate_method apply to mode='static'; dynamic quantization "
                             "has no calibration")
        return self

    @classmethod
    def cpu(cls) -> Int8Config:
        return cls(mode="dynamic", per_channel=True)


@task(name="quantize-int8", cache_policy=RECIPE_CACHE)
def quantize_int8(model: Artifact, config: Int8Config) -> Artifact:
    """fp32 ONNX encoder artifact -> int8 ONNX encoder artifact. Never mutates the input."""
    return run_node(config, [model], model.store, _quantize)


def _quantize(inputs: list[Path], config: Int8Config, out: Path) -> dict[str, object]:
    import onnx
    from onnxruntime.quantization import quantize_dynamic

    (src,) = inputs
    nodes = onnx.load(str(src / "model.onnx"), load_external_data=False).graph.node
    _check_names(nodes, config)
    for f in src.iterdir():
        if f.is_file() and f.name not in ("model.onnx", "manifest.json"):
            shutil.copy2(f, out / f.name)
    if kept := _embeddings_with_positions(nodes):
        node_logger().info("kept in fp32: %s (onnxruntime's QEmbedLayerNormalization has no position-ids input: "
                           "its positions would restart at 0)", ", ".join(kept))
    common: dict[str, Any] = dict(per_channel=config.per_channel, op_types_to_quantize=config.op_types_to_quantize,
                                  nodes_to_exclude=list(config.nodes_to_exclude) + kept)
    if config.mode == "dynamic":
        quantize_dynamic(src / "model.onnx", out / "model.onnx", **common)
    else:
        _quantize_static(src, out, config, common)
    stats = _int8_ops(out / "model.onnx")
    size = (out / "model.onnx").stat().st_size / 1e6
    node_logger().info("int8 %s (per_channel=%s): %s; %.1f MB -> %.1f MB", config.mode, config.per_channel, stats,
                       (src / "model.onnx").stat().st_size / 1e6, size)
    return {"mode": config.mode, "per_channel": config.per_channel, "quantized_ops": stats, "size_mb": round(size, 2)}


def _embeddings_with_positions(nodes: Sequence[onnx.NodeProto]) -> list[str]:
    """Fused EmbedLayerNormalization nodes fed explicit position ids (MPNet's start after the padding
    id). onnxruntime's quantizer rewrites them as QEmbedLayerNormalization, which has no such input,
    and drops it: positions would silently restart at 0 (a tiny MPNet's logits moved by 0.5). They
    stay fp32."""
    return [n.name for n in nodes if n.op_type == "EmbedLayerNormalization" and len(n.input) > 8 and n.input[8]]


def _check_names(nodes: Sequence[onnx.NodeProto], config: Int8Config) -> None:
    """Node names and op types the user gave must be in the graph: onnxruntime's quantizer ignores
    the ones that are not, so a typo would quantize what the user meant to keep."""
    names, ops = {n.name for n in nodes}, {n.op_type for n in nodes}
    if unknown := [n for n in config.nodes_to_exclude if n not in names]:
        examples = ", ".join(sorted(n.name for n in nodes if n.op_type in ("MatMul", "Gemm"))[:3])
        raise InvalidRequest(f"--nodes_to_exclude: no node named {', '.join(unknown)} in the graph to quantize; "
                             f"its MatMul and Gemm nodes are named like {examples} (list them with onnx or Netron)")
    if config.op_types_to_quantize and not ops & set(config.op_types_to_quantize):
        raise InvalidRequest(f"--op_types_to_quantize {' '.join(config.op_types_to_quantize)}: the graph has no such "
                             f"op, so nothing would be quantized; its op types: {', '.join(sorted(ops))}")


def _quantize_static(src: Path, out: Path, config: Int8Config, common: dict[str, object]) -> None:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    reader = _calibration_reader(src, config)
    # Layer norms stay float, as they do inside the fused SkipLayerNormalization that onnxruntime's
    # static quantizer leaves alone; optimize-graph writes those as Sum + LayerNormalization on CPU,
    # and QDQ around a LayerNormalization costs MiniLM's embedding 0.94 -> 0.85 cosine (measured).
    graph = onnx.load(str(src / "model.onnx"), load_external_data=False).graph
    norms = [n.name for n in graph.node if n.op_type == "LayerNormalization"]
    common = {**common, "nodes_to_exclude": [*common["nodes_to_exclude"], *norms]}  # type: ignore[misc]
    quantize_static(src / "model.onnx", out / "model.onnx", reader, quant_format=QuantFormat[config.quant_format],
                    calibrate_method=CalibrationMethod[config.calibrate_method],
                    **common)


def _calibration_reader(src: Path, config: Int8Config) -> CalibrationDataReader:
    from onnxruntime.quantization import CalibrationDataReader

    info = eio.encoder_info(src)
    texts = eio.calibration_texts(config.calibration_data, config.calibration_samples)
    # One sample per batch, so MinMax sees real (unpadded) lengths; the histogram methods stack
    # every sample's activations into one array, so for them all samples are padded alike.
    pad_to = config.max_length if config.calibrate_method != "MinMax" else None
    samples = [eio.encode(src, [t], info.inputs, max_length=config.max_length, pad_to=pad_to) for t in texts]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(samples)

        def get_next(self) -> dict[str, Any] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = iter(samples)

    return _Reader()


def _int8_ops(path: Path) -> dict[str, float]:
    import onnx

    counts: dict[str, float] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        if node.op_type in ("MatMulInteger", "QAttention", "DynamicQuantizeLinear", "QuantizeLinear",
                            "DequantizeLinear", "QLinearMatMul", "DynamicQuantizeMatMul"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts
