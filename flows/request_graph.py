"""The auto-opt request for an ONNX graph given as the model (``-m model.onnx``, or a folder holding one;
Olive's ``ONNXModel`` input): the shared fields, and what applies to a graph of unknown architecture:
int4 or 8-bit weights by onnxruntime's quantizers (MatMulNBits), or onnxruntime's fp16 conversion, measured
against the graph itself."""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from grove.errors import InvalidRequest
from grove.flows.request import EP_SHORT, OptRequestBase
from grove.tasks._choices import EncoderTask

if TYPE_CHECKING:
    from grove.tasks.convert_fp16 import Fp16Config
    from grove.tasks.evaluate_graph import GraphEvalConfig
    from grove.tasks.import_onnx import ImportOnnxConfig
    from grove.tasks.package_graph import GraphPackageConfig
    from grove.tasks.quantize_int4 import Int4Config

__all__ = ["GraphOptRequest"]

# auto-opt flags that a graph takes (besides the shared ones).
_GRAPH_FLAGS = ("precision", "int4_algorithm", "block_size", "symmetric", "accuracy_level", "int8_nodes",
                "min_cosine", "eval_repeat", "task")


class GraphOptRequest(OptRequestBase):
    """What ``grove auto-opt`` was asked to do for an ONNX graph."""

    precision: Literal["int4", "int8", "fp16"] = Field("int4", description="int4 weights (MatMulNBits) for the "
                                                       "graph's MatMuls; int8: 8-bit blocks, round to nearest; "
                                                       "fp16: onnxruntime's float16 conversion (inputs and outputs "
                                                       "stay fp32)")
    int4_algorithm: Literal["rtn", "k_quant"] = Field("rtn", description="onnxruntime's round-to-nearest (Olive's "
                                                      "OnnxBlockWiseRtnQuantization) or k-quant")
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="int4 weights per block")
    symmetric: bool = Field(False, description="symmetric int4 blocks")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="MatMulNBits compute type")
    int8_nodes: list[str] | None = Field(None, description="k_quant: MatMul nodes (graph node names) quantized at "
                                         "8 bits instead of 4 (Olive's customized_weight_config)")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="fail if an output's cosine to the input "
                                     "graph's, on the same synthetic inputs, is lower than this")
    eval_repeat: int = Field(20, ge=1, description="timed runs per latency measurement")

    @classmethod
    def from_flags(cls, fields: Mapping[str, object]) -> GraphOptRequest:
        """The graph request from auto-opt's flags, refusing by name the ones a graph does not take."""
        shared = set(OptRequestBase.model_fields)
        if others := [k for k in fields if k not in shared and k not in _GRAPH_FLAGS and k != "use_ort_genai"]:
            raise InvalidRequest(f"{', '.join('--' + k for k in others)}: not for an ONNX graph given as the model "
                                 "(it takes --precision int4, int8 or fp16, --int4_algorithm rtn or k_quant, "
                                 "--block_size, "
                                 "--symmetric, --accuracy_level, --int8_nodes, --min_cosine); pass the Hugging Face "
                                 "model instead for the rest")
        if fields.get("precision", "int4") not in ("int4", "int8", "fp16"):
            raise InvalidRequest(f"--precision {fields['precision']}: an ONNX graph given as the model gets int4 or "
                                 "8-bit block-wise weights (int8), or fp16")
        if fields.get("precision") == "fp16" and (weights := [f"--{k}" for k in ("int4_algorithm", "block_size",
                                                                                 "symmetric", "accuracy_level",
                                                                                 "int8_nodes") if fields.get(k)]):
            raise InvalidRequest(f"{', '.join(weights)}: for int4 or int8 weights, not --precision fp16 (a float16 "
                                 "conversion of the whole graph)")
        if fields.get("precision") == "int8" and (fields.get("int4_algorithm") not in (None, "rtn")
                                                  or fields.get("int8_nodes")):
            raise InvalidRequest("--precision int8 on an ONNX graph is 8-bit blocks rounded to nearest (rtn): "
                                 "--int4_algorithm k_quant and --int8_nodes apply to int4")
        if fields.get("int4_algorithm") not in (None, "rtn", "k_quant"):
            raise InvalidRequest(f"--int4_algorithm {fields['int4_algorithm']}: an ONNX graph takes rtn or k_quant "
                                 "(the others need to know the model: pass the Hugging Face model)")
        if fields.get("int8_nodes") and fields.get("int4_algorithm") != "k_quant":
            raise InvalidRequest("--int8_nodes applies to --int4_algorithm k_quant")
        if fields.get("task") not in (None, "", "text-generation", *typing.get_args(EncoderTask)):
            raise InvalidRequest(f"--task {fields['task']} is not a task Grove knows")
        return cls(**{k: v for k, v in fields.items() if k not in ("use_ort_genai", "task")})

    @property
    def execution_provider(self) -> Literal["cpu", "cuda", "dml"]:
        provider = self.provider or ("CUDAExecutionProvider" if self.device == "gpu" else "CPUExecutionProvider")
        return EP_SHORT[provider]  # type: ignore[return-value]

    @property
    def imported(self) -> ImportOnnxConfig:
        from grove.tasks.import_onnx import ImportOnnxConfig

        return ImportOnnxConfig()

    @property
    def fp16(self) -> Fp16Config:
        from grove.tasks.convert_fp16 import Fp16Config

        return Fp16Config()

    @property
    def int4(self) -> Int4Config:
        from grove.tasks.quantize_int4 import Int4Config

        return Int4Config(algorithm=self.int4_algorithm, block_size=self.block_size, symmetric=self.symmetric,
                          accuracy_level=self.accuracy_level, head_bits=8, head_shortlist=0,
                          int8_nodes=self.int8_nodes or [], bits=8 if self.precision == "int8" else 4)

    def evaluation(self, *, gate: bool) -> GraphEvalConfig:
        from grove.tasks.evaluate_graph import GraphEvalConfig

        return GraphEvalConfig(provider=self.execution_provider, repeat=self.eval_repeat,
                               min_cosine=self.min_cosine if gate else None)

    @property
    def package(self) -> GraphPackageConfig:
        from grove.tasks.package_graph import GraphPackageConfig

        return GraphPackageConfig(model=self.model_name_or_path, target={
            "device": self.device, "provider": self.execution_provider, "precision": self.precision,
            **({"int4_algorithm": self.int4_algorithm, "block_size": self.block_size} if self.precision != "fp16"
               else {})})
