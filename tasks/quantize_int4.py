"""Node ``quantize-int4``: rewrite the constant-weight MatMuls of a genai ONNX model as 4-bit
``MatMulNBits`` blocks. The other files of the model folder (genai_config.json, tokenizer,
chat template) are carried over unchanged."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import Field, model_validator

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks._choices import Int4Algorithm
from grove.tasks.architectures import keeps_dense

__all__ = ["INT4_ALGORITHMS", "Int4Config", "quantize_int4"]

INT4_ALGORITHMS: tuple[str, ...] = ("affine", "rtn", "hqq", "k_quant", "builder", "gptq")


class Int4Config(StepConfig):
    NODE = "quantize-int4"
    VERSION = 5  # 2: affine keeps no zero point in MatMulNBits; the whole s * (8 - z) goes to the correction;
    # 3: affine fuses MatMuls that read the same tensor (gate/up) into one MatMulNBits + Split;
    # 4: hqq is Grove's (HQQ zero points on the affine layout) instead of onnxruntime's float-zero-point graph;
    # 5: head_shortlist (a 4-bit pass over the vocabulary, the best tokens rescored at 8 bits)
    algorithm: Int4Algorithm = Field(
        "affine",
        description="affine: min/max blocks with a float zero point, run on the zero-point-free integer kernel "
        "plus a block-sum correction (Grove); hqq: the same layout with zero points refined by half-quadratic "
        "optimization (HQQ; lower error than min/max on full-precision weights, slower to quantize), and on an "
        "fp16 graph (the GPU's) onnxruntime's HQQ quantizer, whose float zero points CUDA's kernel reads; rtn: "
        "onnxruntime round-to-nearest; k_quant: onnxruntime k-quant; builder: onnxruntime-genai builder's own int4",
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="weights per quantization block; "
                                                      "smaller = more accurate, larger file")
    symmetric: bool = Field(False, description="symmetric blocks (no zero point); rtn only")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="MatMulNBits compute type; 4 = int8 "
                                                   "activations, fastest on CPU")
    head_bits: Literal[4, 8] = Field(8, description="affine and hqq: bits for the embedding and lm_head; 8 keeps "
                                     "them near-lossless (llama.cpp keeps its output layer at higher precision for "
                                     "the same reason); 4 is 10% smaller")
    head_shortlist: int = Field(32, ge=0, le=1024, description="affine and hqq with 8-bit heads: a 4-bit pass "
                                "scores the whole vocabulary and this many best tokens per position get their "
                                "logits recomputed from the 8-bit rows (the 8-bit head's argmax whenever it is "
                                "among them; decodes faster than reading the whole 8-bit head); 0 = the whole "
                                "8-bit head for every token; default: 32, or 0 with a 4-bit head (no 8-bit rows)")

    int8_nodes: list[str] = Field(default_factory=list, description="k_quant: MatMul nodes (graph node names) "
                                  "quantized at 8 bits instead of 4 (Olive's customized_weight_config)")
    bits: Literal[4, 8] = Field(4, description="rtn: 8 writes 8-bit blocks (Olive's OnnxBlockWiseRtnQuantization "
                                "bits 8; an ONNX graph given as the model at --precision int8)")

    def recipe(self) -> dict[str, object]:
        recipe = super().recipe()
        if not recipe["int8_nodes"]:  # at the default: as the recipes written before it
            del recipe["int8_nodes"]
        if recipe["bits"] == 4:
            del recipe["bits"]
        return recipe

    @model_validator(mode="before")
    @classmethod
    def _default_shortlist(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("head_shortlist") is None:
            data = {**data, "head_shortlist": 32 if data.get("head_bits", 8) == 8 else 0}
        return data

    @model_validator(mode="after")
    def _check(self) -> Int4Config:
        if self.algorithm == "gptq":
            raise ValueError("gptq quantizes the PyTorch weights before the capture (node quantize-torch), "
                             "not the graph")
        if self.symmetric and self.algorithm not in ("rtn", "builder"):
            raise ValueError(f"symmetric=True applies to rtn only; {self.algorithm} chooses its own zero points")
        if self.head_bits != 8 and self.algorithm not in ("affine", "hqq"):
            raise ValueError(f"head_bits applies to the affine and hqq algorithms only, not {self.algorithm}")
        if self.bits == 8 and self.algorithm != "rtn":
            raise ValueError(f"bits=8 applies to the rtn algorithm only, not {self.algorithm}")
        if self.int8_nodes and self.algorithm != "k_quant":
            raise ValueError(f"int8_nodes applies to the k_quant algorithm only, not {self.algorithm}")
        if self.head_shortlist and self.head_bits != 8:
            raise ValueError("head_shortlist rescores with the 8-bit lm_head; a 4-bit head has none")
        return self


@task(name="quantize-int4", cache_policy=RECIPE_CACHE)
def quantize_int4(model: Artifact, config: Int4Config) -> Artifact:
    """fp32 genai model -> int4 genai model. Never mutates the input artifact."""
    if config.algorithm == "builder":
        raise InvalidRequest("algorithm 'builder' quantizes during capture; use capture_onnx(precision='int4')")
    return run_node(config, [model], model.store, _quantize)


def _quantize(inputs: list[Path], config: Int4Config, out: Path) -> dict[str, object]:
    import onnx

    (src,) = inputs
    graph = onnx.load(str(src / "model.onnx"), load_external_data=False).graph  # its ops, not its weights' bytes
    if experts := [n.name for n in graph.node if n.op_type in ("MoE", "QMoE")]:
        raise InvalidRequest(f"this graph's experts are weights of {len(experts)} MoE op(s) (e.g. {experts[0]}), "
                             f"which {config.algorithm} would leave in float; the builder's own int4 quantizes them: "
                             "--int4_algorithm builder")
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx") and f.name != "manifest.json":
            shutil.copy2(f, out / f.name)
    if config.algorithm == "affine" or (config.algorithm == "hqq" and not _float16_weights(graph)):
        from grove.tasks import _int4_grids

        # fp16 correction terms: the same perplexity as fp32 ones, half their size (measured)
        _int4_grids.quantize(src, out, block_size=config.block_size, mode=config.algorithm,
                              correction_dtype="float16", head_bits=config.head_bits,
                              accuracy_level=config.accuracy_level, head_shortlist=config.head_shortlist)
        stats: dict[str, object] = {"head_bits": config.head_bits, "head_shortlist": config.head_shortlist}
    else:
        stats = _quantize_ort(src / "model.onnx", out / "model.onnx", config)
    node_logger().info("int4 %s, block %d: %s", config.algorithm, config.block_size,
                       ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in stats.items()))
    return {"algorithm": config.algorithm, "block_size": config.block_size, **stats}


def _quantize_ort(src: Path, dst: Path, config: Int4Config) -> dict[str, object]:
    import onnx
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    algo: mnq.WeightOnlyQuantConfig
    model, keep = onnx.load(str(src)), []
    if config.algorithm == "k_quant":
        if missing := sorted(set(config.int8_nodes) - {n.name for n in model.graph.node if n.op_type == "MatMul"}):
            names = sorted(n.name for n in model.graph.node if n.op_type == "MatMul")
            raise InvalidRequest(f"int8_nodes: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                                 f"{'is not a MatMul' if len(missing) == 1 else 'are not MatMuls'} of this graph "
                                 f"({len(names)} MatMuls, e.g. {', '.join(names[:3])}); name its MatMul nodes")
        algo = mnq.KQuantWeightOnlyQuantConfig(customized_weight_config={n: {"bits": 8} for n in config.int8_nodes})
        # onnxruntime 1.32's k-quant drops a MatMul whose output is a graph output (the graph then names an
        # output nothing computes, and does not load): such a MatMul keeps its weights.
        outputs = {o.name for o in model.graph.output}
        for i, node in enumerate(model.graph.node):
            if node.op_type == "MatMul" and outputs & set(node.output):
                node.name = node.name or f"grove_matmul_{i}"
                keep.append(node.name)
        if keep:
            node_logger().info("k_quant: %d MatMul(s) computing a graph output keep their weights (%s)", len(keep),
                               ", ".join(keep))
        # It also fails on a weight with an odd number of blocks per column (its zero points, two to a byte, do
        # not reshape: "cannot reshape array of size 32 into shape (64,newaxis)"): such a MatMul keeps its weights.
        shapes = {t.name: t.dims for t in model.graph.initializer}
        if odd := [n.name for n in model.graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2
                   and -(-shapes[n.input[1]][0] // config.block_size) % 2 == 1]:
            keep += odd
            node_logger().warning("k_quant: %d MatMul(s) keep their weights: an odd number of %d-weight blocks per "
                                  "column, which onnxruntime's k-quant cannot pack (e.g. %s); another --block_size "
                                  "quantizes them", len(odd), config.block_size, odd[0])
    elif config.algorithm == "hqq":  # the GPU's fp16 graph: float zero points, which CUDA's MatMulNBits reads
        algo = mnq.HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=config.bits)
    else:
        algo = mnq.DefaultWeightOnlyQuantConfig(block_size=config.block_size, is_symmetric=config.symmetric,
                                                accuracy_level=config.accuracy_level, bits=config.bits)
    keep += [n.name for n in model.graph.node if n.op_type == "MatMul" and keeps_dense(n.name)]
    quantizer = mnq.MatMulNBitsQuantizer(model, bits=config.bits, block_size=config.block_size,
                                         is_symmetric=config.symmetric,
                                         accuracy_level=config.accuracy_level, algo_config=algo,
                                         nodes_to_exclude=keep)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)
    _rename_external_data(dst)
    n = sum(1 for node in quantizer.model.model.graph.node if node.op_type == "MatMulNBits")
    return {"matmuls_quantized": n, **({"int8_matmuls": len(config.int8_nodes)} if config.int8_nodes else {}),
            **({"bits": 8} if config.bits == 8 else {})}


def _float16_weights(graph: Any) -> bool:
    """Whether the graph's MatMul weights are fp16 (the builder's CUDA graph)."""
    import onnx

    types = {t.name: t.data_type for t in graph.initializer}
    return any(types.get(n.input[1]) == onnx.TensorProto.FLOAT16 for n in graph.node if n.op_type == "MatMul")


def _rename_external_data(model_path: Path) -> None:
    # onnxruntime's save writes "<name>.onnx.data" already in 1.32; older versions used other
    # names. genai expects model.onnx.data, so normalise when needed.
    expected = model_path.with_name(model_path.name + ".data")
    if expected.exists():
        return
    import onnx

    model = onnx.load(str(model_path))
    onnx.save_model(model, str(model_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=expected.name)
