"""``grove run --config``: an Olive workflow config (the tutorial's ``olive run --config
config.json``) read as the ``grove auto-opt`` command it amounts to.

Grove's pipeline is fixed (capture -> graph optimization -> quantization -> parity -> evaluation
-> package), so a config maps onto auto-opt's flags: the input model, the target system's
accelerator and execution provider, and the precision and quantizer options of its passes. What
Grove does on every run anyway (ONNX conversion, transformer fusions, latency) is accepted; what
Grove does differently (a search strategy, the cache folder) is printed as a note; what it cannot
honour (remote systems, LoRA, quantizing the PyTorch weights, a custom model loader...) is one
error naming every such key and what to do instead, never dropped in silence. The translation is
printed before the run, so the config and the command stay interchangeable."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from grove.errors import InvalidRequest
from grove.flows.request import PROVIDER_DEVICE
from grove.tasks._mixed_precision import OLIVE_ALIASES, SCORED

__all__ = ["PASSES", "Translation", "load", "translate"]

# auto-opt flags in the order a person would write them (the rest follow in insertion order).
_FLAG_ORDER = ("model_name_or_path", "output_path", "device", "provider", "precision", "task", "revision",
               "trust_remote_code", "log_level")


@dataclass
class Translation:
    """A config as auto-opt flags (argparse dest -> value), and what Grove does differently."""

    flags: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # A fine-tuning pass: grove finetune's flags (training_args among them), run before auto-opt, whose
    # -m then names the fine-tuning output (its base and adapter).
    finetune: dict[str, object] | None = None
    # An LMEvaluator: grove benchmark's flags, run on the input model (no passes) or, ``benchmark_after``,
    # on auto-opt's output (the model and output folders are the flags').
    benchmark: dict[str, object] | None = None
    benchmark_after: bool = False
    # GraphSurgeries on the embedding and lm_head, which Grove's int4 honours with some algorithms only:
    # (where, surgeons), checked once the passes have set the flags.
    table_surgeries: list[tuple[str, list[str]]] = field(default_factory=list)
    graph: bool = False  # an ONNXModel input: auto-opt takes the graph path

    def argv(self) -> list[str]:
        return _argv(self.flags)

    def finetune_argv(self) -> list[str]:
        """grove finetune's argv (its TrainingArguments as --name value, as typed), or [] without one."""
        if self.finetune is None:
            return []
        flags = dict(self.finetune)
        training = flags.pop("training_args", None) or {}
        return _argv(flags) + [token for name, value in cast(dict[str, object], training).items()
                               for token in (f"--{name}", *(map(str, value) if isinstance(value, list) else
                                                            [json.dumps(value) if isinstance(value, dict) else
                                                             str(value)]))]

    def benchmark_argv(self) -> list[str]:
        """grove benchmark's argv (the model, output and device from the flags; after auto-opt, its output
        is the model), or [] without one (or, after auto-opt, without an output folder)."""
        if self.benchmark is None or (self.benchmark_after and "output_path" not in self.flags):
            return []
        flags = {k: v for k, v in self.flags.items() if k in ("model_name_or_path", "output_path", "revision",
                                                              "trust_remote_code", "store", "device")}
        if self.benchmark_after:
            flags = {"model_name_or_path": flags["output_path"], "output_path": f"{flags['output_path']}/lm-eval",
                     **{k: v for k, v in flags.items() if k in ("store", "device")}}
        return _argv({**flags, **self.benchmark})

    def command(self) -> str:
        if self.benchmark is not None and not self.benchmark_after:
            return "grove benchmark " + shlex.join(self.benchmark_argv())
        steps = ["grove auto-opt " + shlex.join(self.argv())]
        if self.finetune:
            steps.insert(0, "grove finetune " + shlex.join(self.finetune_argv()))
        if self.benchmark_argv():
            steps.append("grove benchmark " + shlex.join(self.benchmark_argv()))
        return " && ".join(steps)


def _argv(flags: dict[str, object]) -> list[str]:
    out: list[str] = []
    for name in sorted(flags, key=lambda n: _FLAG_ORDER.index(n) if n in _FLAG_ORDER else len(_FLAG_ORDER)):
        value = flags[name]
        if value is True:
            out.append(f"--{name}")
        elif value is False:
            out.append(f"--no-{name}")  # only BooleanOptionalAction flags take False (per_channel)
        elif isinstance(value, list):
            out += [f"--{name}", *map(str, value)]
        else:
            out += [f"--{name}", str(value)]
    return out


def load(path: str | Path) -> dict[str, Any]:
    """The config file as a dict (JSON, or YAML for .yaml/.yml, as Olive reads them)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidRequest(f"config file {path} does not exist; pass the path of an Olive workflow config "
                             "(JSON or YAML)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"config file {path} is not UTF-8 text; pass an Olive workflow config (JSON or YAML)") \
            from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidRequest(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            hint = " (JSON has no comments: remove the // lines)" if "//" in text else ""
            raise InvalidRequest(f"config file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column "
                                 f"{exc.colno}{hint}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"config file {path} holds a {type(data).__name__}, not a workflow config (an object "
                             "with input_model, systems, passes, ...)")
    return data


# -- passes --------------------------------------------------------------------------------------

class _Pass(BaseModel):
    """One Olive pass type: the fields Grove reads (others are an error naming them), and the
    auto-opt flags they amount to. ``precision``: what the pass makes of the weights (None: it
    does not quantize), so that two passes asking for different precisions are one error."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    NOTE: ClassVar[str | None] = None  # printed when the pass is in the config

    def precision(self) -> str | None:
        return None

    def flags(self) -> dict[str, object]:
        return {}


class _Accepted(_Pass):
    """Passes whose work Grove does on every run: their options tune what Grove chooses itself."""

    model_config = ConfigDict(extra="allow", frozen=True)


class ModelBuilder(_Pass):
    precision_: Literal["int4", "int8", "fp16", "fp32"] = Field("fp32", alias="precision",
                                                                  description="weights the builder writes")
    int4_block_size: Literal[16, 32, 64, 128, 256] | None = Field(None, description="int4 weights per block")
    int4_accuracy_level: Literal[1, 2, 3, 4] | None = Field(None, description="MatMulNBits compute type")
    int4_is_symmetric: bool | None = Field(None, description="symmetric (rtn) or asymmetric (rtn) int4 blocks "
                                           "instead of Grove's affine")
    int4_algo_config: Literal["default", "rtn", "rtn_last", "k_quant", "k_quant_mixed", "k_quant_last",
                              "k_quant_linear"] | None = Field(
        None, description="the builder's int4 algorithm: rtn, or k_quant, with the int8 layers of its compound "
        "names (_last, _mixed, _linear) noted")
    int4_op_types_to_quantize: list[str] | None = Field(
        None, description="the op types whose weights get int4 (`olive optimize` writes MatMul and Gather)")
    metadata_only: bool = Field(False, description="only the genai config for the ONNX model of an earlier "
                                "OnnxConversion: Grove's builder writes the graph and its config together")
    search: dict[str, Any] | None = Field(None, description="generation defaults: Grove writes its own")
    use_ort_genai: Literal[True] = Field(True, description="the tutorial's key: a decoder's output is always an "
                                         "onnxruntime-genai folder")
    use_dynamo_exporter: bool | None = Field(None, description="the tutorial's key: the model builder writes the "
                                             "graph itself, no exporter involved")
    extra_options: dict[str, Any] | None = Field(None, description="the builder's options: Grove reads "
                                                 "int4_accuracy_level, include_hidden_states, prune_lm_head and "
                                                 "filename")
    enable_cuda_graph: bool | None = Field(None, description="a CUDA session option of the output")

    NOTE = ("ModelBuilder: Grove captures decoder LLMs with onnxruntime-genai's model builder (fp32 on cpu, fp16 "
            "on gpu); int4 is Grove's affine on cpu (docs/int4.md) and the builder's own on gpu (--int4_algorithm "
            "picks another)")

    def precision(self) -> str | None:
        return self.precision_

    def problems(self, where: str) -> list[str]:
        """The extra options Grove cannot honour: ones that change the model's inputs or outputs (its
        evaluation and package read them as the builder writes them by default), and ones the builder
        does not know."""
        problems = []
        if (ops := self.int4_op_types_to_quantize) is not None:
            if unknown := [op for op in ops if op not in ("MatMul", "Gather")]:
                problems.append(f"{where}.int4_op_types_to_quantize: {', '.join(unknown)}: the builder quantizes the "
                                "weights of MatMul and Gather (the token embedding) only")
            elif "MatMul" not in ops:
                problems.append(f"{where}.int4_op_types_to_quantize {ops}: Grove's int4 quantizes every MatMul; a "
                                "graph with only its embedding at 4 bits (for an NPU's own quantizer after) is not "
                                "in Grove")
        for key, value in sorted((self.extra_options or {}).items()):
            if key in _BUILDER_SHAPE_OPTIONS and str(value).lower() in ("", "0", "false", "none"):
                continue  # the builder's default, e.g. the recipes' "exclude_embeds": false
            if key in _BUILDER_SHAPE_OPTIONS:
                problems.append(f"{where}.extra_options.{key}: changes the model's inputs or outputs, which Grove's "
                                "evaluation reads as the builder writes them by default; not in Grove yet")
            elif key not in _BUILDER_OPTIONS:
                problems.append(f"{where}.extra_options.{key} is not an option of onnxruntime-genai's model builder")
        return problems

    def notes(self, where: str) -> list[str]:
        extra = {k: v for k, v in (self.extra_options or {}).items() if k not in _BUILDER_SHAPE_OPTIONS
                 and k in _BUILDER_OPTIONS and k not in _BUILDER_FLAGS}
        if self.enable_cuda_graph is not None:
            extra["enable_cuda_graph"] = self.enable_cuda_graph
        notes = [f"{where}: {', '.join(f'{k}={v}' for k, v in sorted(extra.items()))} not used: Grove names the "
                 "graph model.onnx (genai_config.json points at it) and builds with the builder's defaults "
                 "otherwise"] if extra else []
        if self.int4_op_types_to_quantize:
            notes.append(f"{where}.int4_op_types_to_quantize {self.int4_op_types_to_quantize}: Grove's int4 quantizes "
                         "every MatMul, and the token embedding (Gather) as its algorithm does: affine, hqq and gptq "
                         "as 8-bit blocks (--head_bits), the others not at all")
        if (algo := self.int4_algo_config or "") in _INT8_LAYERS:
            base, head = (("k_quant", "but the lm_head, which keeps full precision") if algo.startswith("k_quant")
                          else ("rtn", "the lm_head included"))
            notes.append(f"{where}.int4_algo_config {algo}: Grove's {base} quantizes every MatMul at 4 bits, {head}; "
                         f"the int8 layers {algo} adds ({_INT8_LAYERS[algo]}) are not chosen")
        return notes

    def flags(self) -> dict[str, object]:
        flags: dict[str, object] = {}
        if (self.int4_algo_config or "").startswith("k_quant"):
            flags["int4_algorithm"] = "k_quant"
        elif (self.int4_algo_config or "").startswith("rtn") or self.int4_is_symmetric is not None:
            flags["int4_algorithm"] = "rtn"
        if self.int4_is_symmetric:
            flags["symmetric"] = True
        for key in ("include_hidden_states", "prune_lm_head"):
            if str((self.extra_options or {}).get(key, "")).lower() in ("1", "true"):
                flags[key] = True
        level: int | None = self.int4_accuracy_level
        if level is None and (self.extra_options or {}).get("int4_accuracy_level") is not None:
            level = int((self.extra_options or {})["int4_accuracy_level"])
        return {**flags, **{k: v for k, v in (("block_size", self.int4_block_size),
                                              ("accuracy_level", level)) if v is not None}}


class MobiusBuilder(_Pass):
    """Olive's MobiusBuilder: mobius exports the model at fp32 / fp16 (a quantizer after it makes int4). Grove
    picks the exporter of a text decoder by architecture (tasks/architectures.py): mobius for Gemma 4, which the
    model builder cannot export, the model builder for the others; both write the graph genai runs. With no
    quantizer after it, or with components_to_export, it is Olive's export of a multimodal checkpoint's
    components (auto-opt --components, all of them by default): a text model's one component is the text
    decoder, which auto-opt exports and evaluates."""

    precision_: Literal["fp32", "fp16"] = Field("fp32", alias="precision", description="mobius writes fp32 or fp16 "
                                                "(bf16: not in Grove); int4 is the quantizer after it")
    components_to_export: list[str] | None = Field(None, min_length=1, description="the components to write "
                                                   "(--components): decoder, vision_encoder, audio_encoder, "
                                                   "embedding; default: all")
    runtime: str | None = Field(None, description="the runtime config written beside the graphs: Grove writes "
                                "mobius's genai config with all components, none with a subset (as Olive)")

    NOTE = ("MobiusBuilder: Grove exports a decoder's text model with mobius where the model builder cannot (Gemma "
            "4) and with the model builder otherwise (the same graph for genai); on its own, or with "
            "components_to_export, it writes a multimodal checkpoint's components as mobius lays them out")

    def precision(self) -> str | None:
        return self.precision_

    def flags(self) -> dict[str, object]:
        return {"components": list(self.components_to_export)} if self.components_to_export else {}


# The builder's compound int4 algorithms: the layers each keeps at 8 bits besides the base method's.
_INT8_LAYERS = {"rtn_last": "the last MatMul", "k_quant_last": "the last MatMul",
                "k_quant_mixed": "the last MatMul, and the first and last eighth of the layers' and every third "
                                 "layer's qkv, v and down projections",
                "k_quant_linear": "the last MatMul, and the linear-attention projections and their MLPs"}

# onnxruntime-genai 0.18's model builder options (its --extra_options help), those of them that
# change the graph's inputs or outputs in ways Grove's evaluation cannot read, and those that are
# auto-opt flags.
_BUILDER_FLAGS = ("int4_accuracy_level", "include_hidden_states", "prune_lm_head")
_BUILDER_SHAPE_OPTIONS = {"exclude_embeds", "exclude_lm_head",
                          "config_only", "num_hidden_layers", "adapter_path", "exclude_mtp"}
_BUILDER_OPTIONS = _BUILDER_SHAPE_OPTIONS | {
    "int4_accuracy_level", "include_hidden_states", "prune_lm_head", "filename", "enable_cuda_graph",
    "enable_dml_graph", "enable_webgpu_graph",
    "accuracy_level", "block_size", "is_symmetric", "op_types_to_quantize", "nodes_to_exclude", "algo_config",
    "int4_block_size", "int4_is_symmetric", "int4_op_types_to_quantize", "int4_nodes_to_exclude", "int4_algo_config",
    "matmul_mixed_precision", "hf_token", "hf_remote", "shared_embeddings", "use_qdq", "use_8bits_moe",
    "use_webgpu_fp32", "use_cuda_bf16", "fuse_qkv", "disable_qkv_fusion", "fuse_qk_norm_gqa", "fuse_mlp_gate_up",
    "use_device_allocator_for_initializers", "use_paged_attention", "windowed_kv_cache", "kv_cache_quant_scheme"}


class OnnxConversion(_Accepted):
    NOTE = ("OnnxConversion: Grove captures the model itself (decoder LLMs with the model builder, encoders with "
            "torch.onnx.export, dynamo first), with dynamic batch and sequence axes")


class OrtTransformersOptimization(_Accepted):
    float16: bool = Field(False, description="convert to fp16 after the fusions")
    NOTE = ("OrtTransformersOptimization: Grove fuses encoders with onnxruntime's transformer optimizer (the model "
            "type read from config.json) on every run; a decoder's graph comes fused from the model builder")

    def precision(self) -> str | None:
        return "fp16" if self.float16 else None


class OnnxQuantization(_Pass):
    quant_mode: Literal["dynamic", "static"] = Field("static", description="activations scaled per run, or calibrated")
    per_channel: bool | None = Field(None, description="one weight scale per output channel (Olive's default: "
                                     "off)")
    op_types_to_quantize: list[str] | None = Field(None, description="only these op types")
    nodes_to_exclude: list[str] | None = Field(None, description="node names kept in fp32")
    quant_format: Literal["QDQ", "QOperator"] | None = Field(None, description="static: graph format")
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] | None = Field(None, description="static: ranges")
    weight_type: Literal["QInt8"] = Field("QInt8", description="Grove writes signed int8 weights (uint8 weights "
                                          "measured slower and no more accurate: docs/encoders.md)")
    weight_precision: Literal["int8"] = Field("int8", alias="precision", description="weight_type's newer name: "
                                              "Grove writes signed int8 weights, uint8 ones measured slower and no "
                                              "more accurate (docs/encoders.md)")
    activation_type: Literal["QInt8", "QUInt8", "int8", "uint8"] | None = Field(
        None, description="8-bit activations, signed or not as Grove chooses: 16-bit "
        "ones are for NPU targets, which Grove does not build for")
    reduce_range: Literal[False] = Field(False, description="7-bit weights: measured slower and less accurate on "
                                         "MiniLM (docs/encoders.md), not offered")
    quant_preprocess: bool | None = Field(None, description="Grove's graph optimization runs first anyway")
    save_as_external_data: bool | None = None
    all_tensors_to_one_file: bool | None = None
    data_config: Any = Field(None, description="static: calibration data, a data config's name (a table's text "
                             "column, or a text file's paragraphs)")

    def precision(self) -> str | None:
        return "int8"

    def flags(self) -> dict[str, object]:
        flags: dict[str, object] = {"int8_mode": self.quant_mode, "per_channel": bool(self.per_channel)}
        flags.update({k: v for k, v in self.model_dump(include={"op_types_to_quantize", "nodes_to_exclude",
                                                                 "quant_format", "calibrate_method"}).items()
                      if v is not None})
        return flags


class OnnxDynamicQuantization(OnnxQuantization):
    quant_mode: Literal["dynamic"] = "dynamic"


class OnnxStaticQuantization(OnnxQuantization):
    quant_mode: Literal["static"] = "static"


class OnnxFloatToFloat16(_Pass):
    keep_io_types: bool = Field(False, description="Grove's fp16 graphs keep fp32 inputs and outputs either way")
    use_symbolic_shape_infer: bool | None = None
    save_as_external_data: bool | None = None
    all_tensors_to_one_file: bool | None = None
    NOTE = ("OnnxFloatToFloat16: Grove's fp16 output keeps fp32 inputs and outputs, and the ops that overflow in "
            "fp16 in fp32")

    def precision(self) -> str | None:
        return "fp16"


class OnnxBlockWiseRtnQuantization(_Pass):
    bits: Literal[4, 8] = Field(4, description="4 (Grove's int4) or 8 (8-bit block-wise weights: --precision int8)")
    block_size: Literal[16, 32, 64, 128, 256] = Field(128, description="int4 weights per block (Olive's default)")
    is_symmetric: bool = Field(True, description="symmetric blocks, no zero point (Olive's default)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(0, description="MatMulNBits compute type; 0 (unset): Grove's 4")
    axis: Literal[0] = Field(0, description="blocks along the input dimension")
    save_as_external_data: bool | None = None
    all_tensors_to_one_file: bool | None = None
    external_data_name: str | None = Field(None, description="Grove names the weights file model.onnx.data, as "
                                           "onnxruntime-genai's genai_config expects")
    customized_weight_config: None = Field(None, description="per-node bits are not in Grove")
    ALGORITHM: ClassVar[str] = "rtn"

    def precision(self) -> str | None:
        return "int8" if self.bits == 8 else "int4"

    def notes(self, where: str) -> list[str]:
        notes = [f"{where}: 8-bit block-wise weights are --precision int8: a decoder's model builder writes 8-bit "
                 "MatMulNBits blocks (round to nearest, block 32), an ONNX graph gets them at this pass's block size "
                 "and symmetry, an encoder gets Grove's int8"
                 ] if self.bits == 8 else []
        if self.external_data_name:
            notes.append(f"{where}: external_data_name {self.external_data_name!r} not used: Grove names the weights "
                         "model.onnx.data, the file genai_config.json reads")
        return notes

    def flags(self) -> dict[str, object]:
        if self.bits == 8:
            return {}
        return self.block_flags()

    def block_flags(self) -> dict[str, object]:
        """The blocks' flags; an ONNX graph at 8 bits takes them too (``_passes``)."""
        flags: dict[str, object] = {"int4_algorithm": self.ALGORITHM, "block_size": self.block_size}
        if self.is_symmetric and self.ALGORITHM == "rtn":
            flags["symmetric"] = True
        if self.accuracy_level:
            flags["accuracy_level"] = self.accuracy_level
        return flags


class OnnxMatMul4Quantizer(OnnxBlockWiseRtnQuantization):
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="int4 weights per block (Olive's default)")
    algorithm: Literal["RTN", "HQQ", "DEFAULT"] | None = Field(None, description="RTN (default) or HQQ; GPTQ "
                                                               "needs calibration data and is not in Grove")

    def flags(self) -> dict[str, object]:
        if self.algorithm != "HQQ":
            return super().flags()
        return {k: v for k, v in super().flags().items() if k != "symmetric"} | {"int4_algorithm": "hqq"}


class OnnxHqqQuantization(OnnxBlockWiseRtnQuantization):
    ALGORITHM = "hqq"


class OnnxKQuantQuantization(OnnxBlockWiseRtnQuantization):
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="int4 weights per block (Olive's default)")
    customized_weight_config: dict[str, dict[Literal["bits"], Literal[4, 8]]] | None = Field(  # type: ignore[assignment]
        None, description="per-node bits, {<MatMul node name>: {\"bits\": 8}}: those MatMuls at 8 bits (--int8_nodes)")
    ALGORITHM = "k_quant"

    def problems(self, where: str) -> list[str]:
        if self.customized_weight_config and self.bits != 4:
            return [f"{where}.customized_weight_config: per-node bits raise chosen MatMuls of a 4-bit model to 8 "
                    f"bits; with bits {self.bits} every MatMul is 8-bit already: drop it, or set bits 4"]
        return []

    def flags(self) -> dict[str, object]:
        eight = [n for n, c in (self.customized_weight_config or {}).items() if c.get("bits") == 8]
        return {**super().flags(), **({"int8_nodes": eight} if eight and self.bits == 4 else {})}


class Gptq(_Pass):
    """Olive's Gptq pass (and its GptqQuantizer / GptqModel spellings): GPTQ on the PyTorch weights
    before the capture, Grove's quantize-torch node (--int4_algorithm gptq)."""

    bits: Literal[4] = Field(4, description="Grove's GPTQ writes 4-bit weights (8-bit ones: the lm_head, and the "
                             "layers mixed precision keeps)")
    group_size: Literal[16, 32, 64, 128, 256] = Field(128, description="weights per group: Grove's int4 is "
                                                      "block-wise (16-256), not per-channel (-1)")
    sym: bool = Field(False, description="symmetric groups")
    lm_head: bool | None = Field(None, description="Grove keeps the lm_head at 8 bits (round to nearest)")
    damp_percent: float | None = Field(None, gt=0, lt=1, description="dampening of the Hessian")
    desc_act: bool | None = Field(None, description="Grove quantizes the columns in order (act-order is not used)")
    data_config: Any = Field(None, description="calibration data: a data config's text")
    device: str | None = Field(None, description="where to quantize: Grove's node runs on the CPU (or its GPU pool)")
    dynamic: dict[str, dict[str, Any]] | None = Field(None, description="GptqModel's per-module overrides: Grove "
                                                      "reads the lm_head's bits")
    rotation: None = Field(None, description="rotate with a QuaRot pass before the Gptq one")
    moe_fallback_threshold: Any = None
    moe_fallback_min_k_multiple: Any = None
    NOTE = ("Gptq: Grove runs GPTQ on the PyTorch weights in its quantize-torch node (layer by layer, on the "
            "calibration text), and the model builder writes MatMulNBits from those integers, without rounding again")

    def precision(self) -> str | None:
        return "int4"

    def flags(self) -> dict[str, object]:
        flags: dict[str, object] = {"int4_algorithm": "gptq", "block_size": self.group_size}
        if self.sym:
            flags["symmetric"] = True
        for pattern, override in (self.dynamic or {}).items():
            if "lm_head" in pattern and override.get("bits") in (4, 8):
                flags["head_bits"] = override["bits"]
        return flags

    def problems(self, where: str) -> list[str]:
        others = [p for p in self.dynamic or {} if "lm_head" not in p]
        return [f"{where}.dynamic: per-module bits for {', '.join(others)} are not in Grove (it reads the lm_head's); "
                "use SelectiveMixedPrecision to keep sensitive layers at 8 bits"] if others else []


class Rtn(_Pass):
    """Olive's Rtn pass on the PyTorch weights. In olive-recipes it follows Gptq with 8 bits for the
    lm_head and the embedding, which is what Grove's int4 keeps them at; on its own at 4 bits it is
    round to nearest, which Grove's rtn does on the captured graph's weights (the same values)."""

    bits: Literal[4, 8] = Field(4, description="bits of the weights it quantizes")
    group_size: Literal[16, 32, 64, 128, 256] = Field(128, description="weights per group")
    sym: bool = Field(False, description="symmetric groups")
    lm_head: bool = Field(False, description="quantize the lm_head too")
    embeds: bool = Field(False, description="quantize the embedding too")
    overrides: dict[str, dict[str, Any]] | None = Field(None, description="per-module bits: Grove reads the "
                                                        "lm_head's and the embedding's")

    def head_bits(self) -> int | None:
        bits = {o.get("bits") for name, o in (self.overrides or {}).items()
                if name in ("lm_head", "model.embed_tokens")}
        return bits.pop() if len(bits) == 1 else (self.bits if self.lm_head or self.embeds else None)

    def body(self) -> bool:
        """Whether it quantizes the decoder layers (not only the lm_head and embedding)."""
        return self.bits == 4

    def precision(self) -> str | None:
        return "int4" if self.body() else None

    def problems(self, where: str) -> list[str]:
        others = [n for n in self.overrides or {} if n not in ("lm_head", "model.embed_tokens")]
        return [f"{where}.overrides: per-module bits for {', '.join(others)} are not in Grove (it reads lm_head and "
                "model.embed_tokens); use SelectiveMixedPrecision to keep sensitive layers at 8 bits"] if others else []


class QuaRot(_Pass):
    """Olive's QuaRot pass: the offline Hadamard rotations of the PyTorch weights before GPTQ (Grove's
    --rotate, in its quantize-torch node)."""

    rotate_mode: Literal["hadamard"] = Field("hadamard", description="Grove rotates by randomized Hadamard "
                                             "matrices (a random orthogonal one where no Hadamard of that size "
                                             "exists)")
    seed: Literal[0] = Field(0, description="Grove's rotation draws its signs from seed 0 (Olive's default)")
    NOTE = ("QuaRot: Grove rotates the weights by randomized Hadamard matrices before its GPTQ (the offline "
            "rotations: residual stream and attention heads; the online ones would need graph ops the model builder "
            "does not write)")

    def flags(self) -> dict[str, object]:
        return {"rotate": True}


class SparseGPT(_Pass):
    """Olive's SparseGPT pass: SparseGPT on the PyTorch weights before the capture, Grove's prune-torch node
    (--sparsity), calibrated on its data config's text."""

    sparsity: float | list[int] = Field(description="a share of the weights (0.5), or [N, M] (N of every M inputs)")
    blocksize: Literal[128] = Field(128, description="columns per mask block: Grove's is 128, Olive's default")
    percdamp: float = Field(0.01, description="dampening: Grove's is 0.01, Olive's default")
    min_layer: int | None = Field(None, description="Grove prunes every decoder layer")
    max_layer: int | None = Field(None, description="Grove prunes every decoder layer")
    layer_name_filter: str | list[str] | None = Field(None, description="Grove prunes every linear layer the builder "
                                                      "reads")
    data_config: Any = Field(None, description="calibration data: a data config's text")
    device: str | None = Field(None, description="where to prune: Grove's node runs on the CPU")
    NOTE = ("SparseGPT: Grove prunes the PyTorch weights in its prune-torch node (layer by layer, on the calibration "
            "text), then captures the pruned model")

    def flags(self) -> dict[str, object]:
        value = (f"{self.sparsity[0]}:{self.sparsity[1]}" if isinstance(self.sparsity, list)
                 else str(self.sparsity))
        return {"sparsity": value}

    def problems(self, where: str) -> list[str]:
        from grove.tasks.prune_torch import parse_sparsity

        problems = []
        if isinstance(self.sparsity, list) and len(self.sparsity) != 2:
            problems.append(f"{where}.sparsity {self.sparsity}: [N, M], N of every M inputs (e.g. [2, 4])")
        else:
            try:
                parse_sparsity(str(self.flags()["sparsity"]))
            except ValueError as exc:
                problems.append(f"{where}.{exc}")
        if chosen := [k for k in ("min_layer", "max_layer", "layer_name_filter") if getattr(self, k) is not None]:
            problems.append(f"{where}: {', '.join(chosen)}: Grove prunes every linear layer of every decoder layer; "
                            "drop them")
        if self.percdamp != 0.01:
            problems.append(f"{where}.percdamp {self.percdamp}: Grove's SparseGPT dampens by 0.01 (Olive's default); "
                            "drop it")
        return problems


class SelectiveMixedPrecision(_Pass):
    """Olive's SelectiveMixedPrecision: which linear layers keep ``high_bits`` (8), by the same algorithm
    (--mixed_precision_algorithm, tasks/_mixed_precision.py) on the calibration data Grove is given."""

    algorithm: Literal["kld_gradient", "iqe", "iqe_relative", "snr", "snr_relative", "high_precision_lm_head",
                       "high_precision_mlp_down", "high_precision_mlp_down_qkv", "k_quant_down", "k_quant_mixed",
                       "k_quant_last"] = Field(description="how the layers are chosen, which Olive requires too: "
                                                           "kld_gradient, snr, snr_relative, iqe or iqe_relative with "
                                                           "a ratio, or a high_precision_* heuristic (k_quant_* their "
                                                           "former names)")
    bits: Literal[4] = Field(4, description="the low bits (Grove's int4)")
    high_bits: Literal[8] = Field(8, description="the high bits (Grove's 8)")
    ratio: float | None = Field(None, gt=0, lt=1, description="share of the weights kept at the low bits (the "
                                "scores; the heuristics take none)")
    group_size: Literal[16, 32, 64, 128, 256] | None = None
    sym: bool | None = None
    high_group_size: int | None = None
    high_sym: bool | None = None
    kld_memory_mode: Any = None
    data_config: Any = Field(None, description="the calibration data (the Gptq pass's, when it has one)")

    @model_validator(mode="after")
    def _ratio(self) -> SelectiveMixedPrecision:
        if self.ratio is None and self.algorithm in SCORED:
            raise ValueError(f"algorithm {self.algorithm} ranks the layers: give ratio, the share of weights left "
                             "at 4 bits (olive-recipes use 0.65)")
        return self

    def flags(self) -> dict[str, object]:
        algorithm = OLIVE_ALIASES.get(self.algorithm, self.algorithm)
        return {"mixed_precision_algorithm": algorithm} | (
            {"mixed_precision_ratio": self.ratio} if algorithm in SCORED else {})

    def notes(self, where: str) -> list[str]:
        return [f"{where}: ratio {self.ratio} is not read by {self.algorithm}, which picks its "
                "layers by position (as in Olive)"] if self.ratio is not None and self.algorithm not in SCORED \
            else []


class OnnxPeepholeOptimizer(_Accepted):
    NOTE = ("OnnxPeepholeOptimizer: Grove's graphs come fused from the model builder (decoders) or onnxruntime's "
            "transformer optimizer (encoders); the peephole rewrites are not run again")


class OrtSessionParamsTuning(_Accepted):
    NOTE = ("OrtSessionParamsTuning: Grove does not tune session options; the output runs with onnxruntime's "
            "defaults, and its latency is measured with the threads of the evaluation (2)")


class LoRA(_Pass):
    """Olive's LoRA pass (and QLoRA, DoRA, LoHa, LoKr): grove finetune's training before the capture.
    The adapter is then merged into the weights, or kept switchable when an ExtractAdapters pass
    follows (a plain LoRA: DoRA, LoHa and LoKr updates are not low-rank A and B pairs)."""

    r: int = Field(64, ge=1, description="rank")
    alpha: float = Field(16, gt=0, description="the update's scale is alpha / r")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA path")
    target_modules: list[str] | None = Field(None, description="modules to adapt (peft's default for the "
                                             "architecture)")
    modules_to_save: None = Field(None, description="modules trained whole beside the adapter are not in Grove's "
                                  "adapters (the switchable graph's inputs are LoRA pairs)")
    torch_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(None, description="the base weights' "
                                                                          "dtype while training")
    device_map: Any = Field(None, description="Grove loads the base on the one device training runs on")
    allow_tf32: bool | None = Field(None, description="a CUDA math option")
    ephemeral_gpu_offload: Literal[False] = Field(False, description="Grove keeps the model on one device")
    train_data_config: Any = Field(description="the training data: a data config's name")
    eval_data_config: Any = Field(None, description="evaluation data: a split of the training data's dataset")
    training_args: dict[str, Any] | None = Field(None, description="transformers TrainingArguments")
    METHOD: ClassVar[str] = "lora"

    def finetune(self, data: dict[str, Any], where: str) -> tuple[dict[str, object], list[str]]:
        """grove finetune's flags for this pass (the data's among them), and notes."""
        flags, notes = _finetune_data(self.train_data_config, data, f"{where}.train_data_config")
        flags.update(method=self.METHOD, lora_r=self.r, lora_alpha=self.alpha, lora_dropout=self.lora_dropout)
        if self.target_modules:
            flags["target_modules"] = ",".join(self.target_modules)
        if self.torch_dtype:
            flags["torch_dtype"] = self.torch_dtype
        if self.eval_data_config is not None:
            evaluation, _ = _finetune_data(self.eval_data_config, data, f"{where}.eval_data_config")
            if (evaluation.get("data_name"), evaluation.get("data_files")) != (flags.get("data_name"),
                                                                                 flags.get("data_files")):
                raise InvalidRequest(f"{where}.eval_data_config reads {evaluation.get('data_name')}, another dataset "
                                     f"than train_data_config's {flags.get('data_name')}: Grove evaluates on a split "
                                     "of the training dataset; point both at one dataset (or drop eval_data_config: "
                                     "held-out blocks of the training data)")
            flags["eval_split"] = evaluation["train_split"]
            if evaluation.get("train_subset") != flags.get("train_subset"):
                flags["eval_subset"] = evaluation.get("train_subset")
        args = dict(self.training_args or {})
        if "per_device_train_batch_size" in args:  # grove finetune's own name for it
            flags["batch_size"] = args.pop("per_device_train_batch_size")
        for key in [k for k in args if k in ("output_dir", "overwrite_output_dir", "extra_args")]:
            notes.append(f"{where}.training_args.{key}: not used: grove finetune keeps its checkpoints in the store")
            args.pop(key)
        if args:
            flags["training_args"] = args
        if self.device_map is not None or self.allow_tf32 is not None:
            notes.append(f"{where}: device_map / allow_tf32 not used: Grove trains on one device, the GPU where its "
                         "node runs on one (train-adapter prefers a gpu pool)")
        return flags, notes


class QLoRA(LoRA):
    compute_dtype: Literal["bfloat16", "float16", "float32"] | None = Field(None, description="the 4-bit base's "
                                                                            "compute dtype (Grove: torch_dtype)")
    double_quant: bool | None = Field(None, description="Grove's QLoRA quantizes the 4-bit base's scales too "
                                      "(double quantization, QLoRA's paper)")
    quant_type: Literal["nf4"] = Field("nf4", description="Grove's QLoRA base is NF4")
    save_quant_config: bool | None = None
    METHOD = "qlora"


class _Lycoris(LoRA):
    """DoRA, LoHa, LoKr: peft's options of these passes, at peft's defaults (what Grove trains with)."""

    rank_dropout: float = Field(0.0, ge=0, le=0, description="Grove trains with peft's default (0)")
    module_dropout: float = Field(0.0, ge=0, le=0, description="Grove trains with peft's default (0)")
    use_effective_conv2d: bool | None = Field(None, description="convolutions: not in the decoders Grove trains")
    exclude_modules: None = Field(None, description="name the modules to adapt in target_modules instead")
    init_weights: Literal[True] = Field(True, description="Grove trains from peft's initialization")
    layers_to_transform: None = Field(None, description="per-layer adapters are not in Grove")
    layers_pattern: None = None
    rank_pattern: dict[str, Any] | None = Field(None, description="per-module ranks are not in Grove")
    alpha_pattern: dict[str, Any] | None = Field(None, description="per-module alphas are not in Grove")

    def problems(self, where: str) -> list[str]:
        return [f"{where}.{key}: per-module values are not in Grove; one rank and alpha for every module"
                for key in ("rank_pattern", "alpha_pattern") if getattr(self, key)]


class DoRA(_Lycoris):
    METHOD = "dora"


class LoHa(_Lycoris):
    METHOD = "loha"


class LoKr(_Lycoris):
    decompose_both: Literal[False] = Field(False, description="Grove trains with peft's default")
    decompose_factor: Literal[-1] = Field(-1, description="Grove trains with peft's default")
    rank_dropout_scale: Literal[False] = Field(False, description="Grove trains with peft's default")
    METHOD = "lokr"


class ExtractAdapters(_Pass):
    """Olive's ExtractAdapters: the adapter's weights become the graph's inputs, the adapter a file
    beside (grove auto-opt --adapter_path without --merge_adapter)."""

    adapter_type: Literal["lora"] = Field("lora", description="a graph input carries a plain LoRA's A and B; DoRA's "
                                          "and LoHa's updates are not of that form: drop ExtractAdapters to merge "
                                          "them into the weights")
    make_inputs: Literal[True] = Field(True, description="Grove's switchable graphs take the LoRA weights as inputs")
    dynamic_lora_r: Literal[True] = Field(True, description="Grove's LoRA inputs have a dynamic rank")
    optional_inputs: Literal[True] = Field(True, description="Grove's LoRA inputs default to rank 0 (no adapter)")
    save_format: Literal["onnx_adapter"] = Field("onnx_adapter", description="Grove writes adapter_weights."
                                                 "onnx_adapter (grove convert-adapters writes the others)")
    NOTE = ("ExtractAdapters: the adapter stays switchable: its weights are the graph's optional inputs and "
            "adapter_weights.onnx_adapter is written beside (onnxruntime_genai.Adapters)")


class MergeAdapterWeights(_Pass):
    NOTE = "MergeAdapterWeights: the adapter is merged into the weights before the capture (--merge_adapter)"


# Olive's pass types that Grove reads (matched without case, as Olive does).
PASSES: dict[str, type[_Pass]] = {cls.__name__.lower(): cls for cls in (
    ModelBuilder, MobiusBuilder, OnnxConversion, OrtTransformersOptimization, OnnxQuantization, OnnxDynamicQuantization,
    OnnxStaticQuantization, OnnxFloatToFloat16, OnnxBlockWiseRtnQuantization, OnnxMatMul4Quantizer,
    OnnxHqqQuantization, OnnxKQuantQuantization, OrtSessionParamsTuning, Gptq, Rtn, SelectiveMixedPrecision,
    OnnxPeepholeOptimizer, LoRA, QLoRA, DoRA, LoHa, LoKr, ExtractAdapters, MergeAdapterWeights, QuaRot, SparseGPT)}
PASSES["gptqquantizer"] = PASSES["gptqmodel"] = Gptq
PASSES["ortperftuning"] = OrtSessionParamsTuning  # its name before Olive 0.7
PASSES["onnxmatmulnbits"] = OnnxBlockWiseRtnQuantization

# Olive pass types a user may well write, and why Grove has no counterpart.
_NOT_IN_GROVE = {
    "loftq": "LoftQ's quantization-aware initialization is not in Grove: use a QLoRA pass (LoRA on a 4-bit NF4 base)",
    **dict.fromkeys(("autoawqquantizer", "awq"),
                    "AWQ-scaling the PyTorch weights is not in Grove yet: its GPTQ (a Gptq pass, --int4_algorithm "
                    "gptq) calibrates the int4 weights without it, and a QuaRot pass rotates their outliers away"),
    "spinquant": "SpinQuant's trained rotations are not in Grove: a QuaRot pass rotates by randomized Hadamard "
                 "matrices, untrained",
}


def _pass_errors(exc: ValidationError, where: str, cls: type[BaseModel]) -> str:
    """pydantic's errors for one pass as one line; an unknown option lists those Grove reads."""
    known = ", ".join(f.alias or n for n, f in cls.model_fields.items())
    why = {f.alias or n: f.description for n, f in cls.model_fields.items() if f.description}
    errors = [e for e in exc.errors() if e["type"] != "extra_forbidden"]
    lines = [f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}"  # a refused value: why Grove has only these
             + (f" - {why[str(e['loc'][0])]}" if e["type"] in ("literal_error", "missing") and str(e["loc"][0]) in why
                else "")
             for e in errors]
    if unknown := [str(e["loc"][0]) for e in exc.errors() if e["type"] == "extra_forbidden"]:
        lines.append(f"{where}: {', '.join(unknown)} {'is not an option' if len(unknown) == 1 else 'are not options'} "
                     f"of {cls.__name__} that Grove reads (it reads {known})")
    return "; ".join(lines)


_TABLE_SURGEONS = ("QuantizeEmbeddingInt8", "ShareEmbeddingLmHead")


def _surgeries(fields: dict[str, Any], where: str, out: Translation) -> str | None:
    """Olive's GraphSurgeries on a decoder's embedding and lm_head: TieWordEmbeddings, QuantizeEmbeddingInt8
    and ShareEmbeddingLmHead are what Grove's int4 writes anyway (one 8-bit table serves the embedding and a
    tied lm_head; ``_table_surgeries`` checks the algorithm that makes it); another surgeon is a problem."""
    surgeons = [str(s.get("surgeon")) if isinstance(s, dict) else str(s) for s in fields.get("surgeries") or []]
    if others := [s for s in surgeons if s != "TieWordEmbeddings" and s not in _TABLE_SURGEONS]:
        return (f"{where}: graph surgeries {', '.join(others)} are not in Grove (it reads TieWordEmbeddings, "
                f"{', '.join(_TABLE_SURGEONS)})")
    out.table_surgeries.append((where, surgeons))
    return None


def _table_surgeries(out: Translation) -> list[str]:
    """QuantizeEmbeddingInt8 / ShareEmbeddingLmHead against the int4 the flags chose: Grove's affine, hqq
    and gptq write the embedding as 8-bit blocks (GatherBlockQuantized) and a tied lm_head reads the same
    table; the builder's own int4 (the GPU default) does with --embedding_int8; onnxruntime's quantizers
    do not."""
    problems = []
    algorithm = out.flags.get("int4_algorithm") or ("affine" if out.flags.get("device", "cpu") == "cpu"
                                                    else "builder")
    int4 = out.flags.get("precision") == "int4"
    if int4 and algorithm == "builder" and any(set(s) & set(_TABLE_SURGEONS) for _, s in out.table_surgeries):
        out.flags["embedding_int8"] = True
    eight_bit = int4 and (algorithm in ("affine", "hqq", "gptq") and out.flags.get("head_bits") != 4
                          or algorithm == "builder" and bool(out.flags.get("embedding_int8")))
    for where, surgeons in out.table_surgeries:
        if "TieWordEmbeddings" in surgeons:
            out.notes.append(f"{where}: TieWordEmbeddings: " + (
                f"Grove's {algorithm} int4 of a tied model reads one 8-bit table for the embedding and the lm_head"
                if eight_bit else "the builder's int4 of a tied model reads the lm_head's 4-bit rows for the "
                "embedding (one table; --embedding_int8 makes it an 8-bit one)" if int4 and algorithm == "builder"
                else f"not applied with {out.flags.get('precision')} {algorithm}: the output keeps the "
                "embedding and lm_head tables that quantizer writes (the same outputs, a larger file); Grove's "
                "affine, hqq and gptq int4 share one 8-bit table"))
        if not (named := ", ".join(s for s in surgeons if s in _TABLE_SURGEONS)):
            continue
        if not eight_bit:
            problems.append(f"{where}: {named}: Grove writes the 8-bit embedding table (shared with a tied lm_head) "
                            "with its int4 algorithms affine (the CPU default), hqq and gptq at 8-bit head_bits, and "
                            f"the builder's (--embedding_int8), not with {out.flags.get('precision')} {algorithm}: "
                            "choose one of them")
        elif algorithm == "builder":
            out.notes.append(f"{where}: {named}: the builder's int4 with --embedding_int8: the embedding as 8-bit "
                             "blocks (GatherBlockQuantized, from the checkpoint's float table) and a tied lm_head "
                             "reads the same table as an 8-bit MatMulNBits; an untied model's lm_head keeps the "
                             "builder's 4-bit weights (sharing the embedding's would change its logits)")
        else:
            out.notes.append(f"{where}: {named}: Grove's {algorithm} int4 writes the embedding as 8-bit blocks "
                             "(GatherBlockQuantized) and a tied lm_head reads the same 8-bit table; an untied "
                             "model's lm_head keeps its own 8-bit weights (sharing the embedding's would change "
                             "its logits)")
    return problems


def _fields(section: dict[str, Any], where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """A section's options: Olive takes them under "config" or beside "type" (``skip``: keys that
    are not options, e.g. a pass's host)."""
    nested = section.get("config", {})
    if not isinstance(nested, dict):
        raise InvalidRequest(f"{where}.config must be an object of options")
    return {k: v for k, v in {**section, **nested}.items() if k not in ("type", "config", *skip)}


def _object(value: object, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{where} must be an object, not {type(value).__name__}")
    return value


def _section(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    return _object(data.get(key) or None, f"{where}{key}")


def _passes(passes: dict[str, Any], data: dict[str, Any], out: Translation) -> None:
    if not passes:
        raise InvalidRequest('passes is empty: Grove needs at least one, e.g. "passes": {"convert": {"type": '
                             '"ModelBuilder", "precision": "int4"}}, or an LMEvaluator to score the input model on '
                             'lm-eval tasks (grove benchmark)')
    precisions: dict[str, str] = {}
    specs: dict[str, _Pass] = {}
    problems: list[str] = []  # every pass Grove cannot honour, reported at once
    unread: dict[str, list[str]] = {}  # why -> the passes of types Grove has no counterpart for
    for name, section in passes.items():
        where = f"passes.{name}"
        if isinstance(section, list) and section:  # Olive's search alternatives: without a search, the first
            if len(section) > 1:
                out.notes.append(f"{where} lists {len(section)} alternatives: Grove does not search; it runs the "
                                 "first, as Olive does without a search strategy")
            section, where = section[0], f"{where}[0]"
        if not isinstance(section, dict) or not isinstance(section.get("type"), str):
            raise InvalidRequest(f'{where} must be an object with a "type" (e.g. "ModelBuilder")')
        kind = section["type"].lower()
        if kind in _NOT_IN_GROVE:
            unread.setdefault(_NOT_IN_GROVE[kind], []).append(f"{name} ({section['type']})")
            continue
        if kind == "graphsurgeries":
            if problem := _surgeries(_fields(section, where), where, out):
                problems.append(problem)
            continue
        if kind not in PASSES:
            known = ", ".join(sorted({c.__name__ for c in PASSES.values()}))
            unread.setdefault(f"not read by Grove, which reads {known}", []).append(f"{name} ({section['type']})")
            continue
        cls = PASSES[kind]
        try:  # a pass's own host and evaluator: Grove runs and evaluates every step the same way
            spec = cls(**_fields(section, where, skip=("host", "evaluator")))
        except ValidationError as exc:
            problems.append(_pass_errors(exc, where, cls))
            continue
        specs[name] = spec
        if isinstance(spec, Gptq | Rtn | ModelBuilder | _Lycoris | OnnxKQuantQuantization | SparseGPT):
            problems += spec.problems(where)
        if isinstance(spec, ModelBuilder) and spec.metadata_only:
            if not any(isinstance(s, OnnxConversion) for s in specs.values()):
                problems.append(f"{where}.metadata_only: writes only the genai config of the ONNX model an earlier "
                                "OnnxConversion made, and there is none; drop metadata_only (Grove's builder writes "
                                "the graph and its config)")
            else:
                out.notes.append(f"{where}.metadata_only: Grove's builder writes the graph and its genai config "
                                 "together, the model OnnxConversion and metadata_only make in Olive")
        if isinstance(spec, ModelBuilder | OnnxBlockWiseRtnQuantization | SelectiveMixedPrecision):
            out.notes += spec.notes(where)
        if isinstance(spec, Gptq | SelectiveMixedPrecision | SparseGPT) and spec.data_config is not None \
                and "calibration_data" not in out.flags:
            calibration = _data_source(spec.data_config, data, f"{where}.data_config", for_labels=False)
            out.flags["calibration_data"] = calibration.source
            _unused(calibration, out)
        if cls.NOTE and cls.NOTE not in out.notes:
            out.notes.append(cls.NOTE)
        if isinstance(spec, _Accepted) and spec.model_extra:  # e.g. an NPU recipe's enable_attention: false
            out.notes.append(f"{where}: {', '.join(sorted(spec.model_extra))} not used: Grove chooses what "
                             f"{cls.__name__} sets itself, as above")
        if isinstance(spec, ModelBuilder) and not str(out.flags.get("task", "text-generation")).startswith(
                "text-generation"):  # olive-recipes' TensorRT-RTX Qwen2.5 config says text-classification
            out.notes.append(f"input_model.task {out.flags['task']!r}: {name} (ModelBuilder) builds the model as an "
                             "onnxruntime-genai text generator whatever the task, as Olive's does; Grove runs it "
                             "as text-generation")
            out.flags["task"] = "text-generation"
        if isinstance(spec, OnnxQuantization) and spec.data_config is not None and spec.quant_mode == "static":
            calibration = _data_source(spec.data_config, data, f"{where}.data_config", for_labels=False)
            out.flags["calibration_data"] = calibration.source
            _unused(calibration, out)
            if calibration.max_samples:
                out.flags["calibration_samples"] = calibration.max_samples
            else:
                out.notes.append(f"{name}: static int8 is calibrated on the first 32 rows (or paragraphs) of its data "
                                 "config, Grove's default; its max_samples sets how many")
        if isinstance(spec, OnnxQuantization) and spec.per_channel is None:
            out.notes.append(f"{name}: per_channel is not set, so per-tensor weight scales, as Olive's default; "
                             "Grove's auto-opt default is per-channel (all-MiniLM-L6-v2: cosine 0.992 vs 0.960 "
                             "per-tensor): set per_channel to true for it")
        if isinstance(spec, OnnxQuantization) and spec.quant_mode == "static" and spec.data_config is None:
            out.notes.append(f"{name}: static int8 is calibrated on Grove's default text (the GPL-3, 32 paragraphs); "
                             "--calibration_data FILE takes yours")
        if (precision := spec.precision()) is not None:
            precisions[name] = precision
        out.flags.update(spec.flags())
        if out.graph and isinstance(spec, OnnxBlockWiseRtnQuantization) and spec.bits == 8:  # the graph's own blocks
            out.flags.update({k: v for k, v in spec.block_flags().items() if k != "int4_algorithm"})
    problems += _before_capture(specs, out)
    problems += _fine_tuning(specs, data, out)
    problems += [f"passes {', '.join(names)}: {why}" for why, names in unread.items()]
    if problems:
        raise InvalidRequest("; ".join(problems) + ("; remove those passes to run the rest" if unread else ""))
    builders = [n for n, spec in specs.items()
                if isinstance(spec, ModelBuilder | MobiusBuilder) and spec.precision_ in ("fp32", "fp16")]
    if builders and (later := [n for n in list(specs)[list(specs).index(builders[0]) + 1:]
                               if precisions.get(n) in ("int4", "int8")]):  # a chain: the last quantizer decides
        kind = type(specs[builders[0]]).__name__
        out.notes.append(f"{builders[0]} ({kind}) writes {precisions[builders[0]]} and {later[-1]} quantizes it: "
                         f"the output is {precisions[later[-1]]}, as in Olive's chain")
        precisions.pop(builders[0])
    mobius = [n for n, spec in specs.items() if isinstance(spec, MobiusBuilder)]
    if mobius and "components" not in out.flags and not [n for n in list(specs)[list(specs).index(mobius[0]) + 1:]
                                                         if precisions.get(n) in ("int4", "int8")]:
        out.flags["components"] = ["all"]  # Olive's export of every component; a text model's one is its decoder
    quantizing = {n: p for n, p in precisions.items() if p != "fp32"}
    if len(set(quantizing.values())) > 1:
        raise InvalidRequest("passes ask for different precisions: " + ", ".join(f"{n} {p}" for n, p in
                             quantizing.items()) + "; Grove writes one output per run: keep one quantization pass")
    out.flags["precision"] = next(iter(quantizing.values()), "fp32")
    if problems := _table_surgeries(out):
        raise InvalidRequest("; ".join(problems))


def _fine_tuning(specs: dict[str, _Pass], data: dict[str, Any], out: Translation) -> list[str]:
    """A fine-tuning pass as grove finetune's flags (``out.finetune``), and what becomes of its adapter:
    kept switchable when ExtractAdapters follows, merged into the weights otherwise."""
    tuning = [(n, s) for n, s in specs.items() if isinstance(s, LoRA)]
    extract = [n for n, s in specs.items() if isinstance(s, ExtractAdapters)]
    merge = [n for n, s in specs.items() if isinstance(s, MergeAdapterWeights)]
    if len(tuning) > 1:
        return [f"passes {', '.join(n for n, _ in tuning)}: Grove trains one adapter per run; keep one fine-tuning "
                "pass"]
    if extract and merge:
        return [f"passes {extract[0]} (ExtractAdapters) and {merge[0]} (MergeAdapterWeights): an adapter is kept "
                "switchable or merged, not both; keep one"]
    if not tuning:
        return [f"passes.{n}: no fine-tuning pass (LoRA, QLoRA, DoRA, LoHa, LoKr) makes an adapter for it; add one, "
                "or pass a fine-tuned model with grove auto-opt --adapter_path" for n in extract + merge]
    name, spec = tuning[0]
    try:
        flags, notes = spec.finetune(data, f"passes.{name}")
        _check_finetune(flags, f"passes.{name}")
    except InvalidRequest as exc:
        return [str(exc)]
    if extract and spec.METHOD not in ("lora", "qlora"):
        return [f"passes.{extract[0]} (ExtractAdapters): a {spec.METHOD} adapter cannot be kept switchable (a graph "
                f"input carries a plain LoRA's A and B); drop ExtractAdapters to merge it into the weights"]
    out.finetune = flags
    out.notes += notes
    out.notes.append(f"{name} ({type(spec).__name__}): grove finetune trains the adapter first (cached nodes: "
                     "prepare-data, train-adapter, evaluate-adapter), then auto-opt optimizes its base with it "
                     + ("kept switchable" if extract else "merged into the weights (no ExtractAdapters pass)"))
    if not extract:
        out.flags["merge_adapter"] = True
    return []


def _check_finetune(flags: dict[str, object], where: str) -> None:
    """The fine-tuning flags checked as grove finetune checks them (its request; TrainingArguments by
    transformers' parser), so that a dry run refuses what the run would."""
    from pydantic import ValidationError

    from grove.flows.request_finetune import FinetuneRequest

    try:  # output_path None: its check (a folder to write) is the run's
        FinetuneRequest.model_validate({"model_name_or_path": "-", **flags, "output_path": None})
    except InvalidRequest as exc:  # TrainingArguments' parser: it names the flag
        raise InvalidRequest(f"{where}.training_args: {exc}") from None
    except ValidationError as exc:
        if errors := [f"{'.'.join(map(str, e['loc']))}: {str(e['msg']).removeprefix('Value error, ')}"
                      for e in exc.errors() if e["loc"] != ("output_path",)]:
            raise InvalidRequest(f"{where}: {'; '.join(errors)}") from None


def _finetune_paths(finetune: dict[str, object], out: Translation) -> None:
    """grove finetune (``finetune``, its flags) writes to <output>/finetuned, and auto-opt reads it there
    (-m: its base and adapter) and writes <output>/model."""
    for key in ("model_name_or_path", "revision", "trust_remote_code", "store"):
        if key in out.flags:
            finetune[key] = out.flags[key]
    if (output := out.flags.get("output_path")) is not None:
        finetune["output_path"] = f"{output}/finetuned"
        out.flags.update(model_name_or_path=f"{output}/finetuned", output_path=f"{output}/model")
        out.notes.append(f"output_dir: the adapter is written to {output}/finetuned (grove finetune's layout), the "
                         f"optimized model to {output}/model")


def _before_capture(specs: dict[str, _Pass], out: Translation) -> list[str]:
    """Olive's passes on the PyTorch weights (SelectiveMixedPrecision -> Gptq -> Rtn 8-bit head, the
    olive-recipes LLM chain) as Grove's GPTQ flags; what they ask that Grove cannot do, as problems."""
    gptq = [s for s in specs.values() if isinstance(s, Gptq)]
    rtn = [(n, s) for n, s in specs.items() if isinstance(s, Rtn)]
    mixed = [n for n, s in specs.items() if isinstance(s, SelectiveMixedPrecision)]
    rotated = [n for n, s in specs.items() if isinstance(s, QuaRot)]
    problems: list[str] = []
    if rotated and not gptq:
        problems.append(f"passes.{rotated[0]} (QuaRot): Grove rotates the weights in its GPTQ node; add a Gptq pass "
                        "after it")
    if mixed and not gptq:
        problems.append(f"passes.{mixed[0]} (SelectiveMixedPrecision): Grove keeps the sensitive layers at 8 bits in "
                        "its GPTQ; add a Gptq pass after it")
    elif mixed and cast(SelectiveMixedPrecision, specs[mixed[0]]).algorithm == "kld_gradient":
        out.notes.append(f"{mixed[0]} (SelectiveMixedPrecision): kld_gradient scores the layers on the calibration "
                         "data Grove calibrates GPTQ with (Olive's pass reads wikitext-2 from the hub whatever its "
                         "data config)")
    for name, spec in rtn:
        head = spec.head_bits() if not gptq else spec.head_bits() or spec.bits  # after Gptq: what it left, the head
        if spec.body() and not gptq:
            out.flags.update({"int4_algorithm": "rtn", "block_size": spec.group_size})
            if spec.sym:
                out.flags["symmetric"] = True
            out.notes.append(f"{name} (Rtn): Grove rounds the captured graph's int4 weights to nearest, the same "
                             "values" + ("; the lm_head stays as onnxruntime's RTN writes it" if head else ""))
        elif head is not None and head != 8:
            out.flags["head_bits"] = head
        if gptq or not spec.body():
            out.notes.append(f"{name} (Rtn): the lm_head and embedding at {head} bits, round to nearest: Grove's int4 "
                             "keeps them so (a tied embedding reads the lm_head's rows)")
    if gptq:
        g = gptq[-1]
        out.flags.update(g.flags())
        if unused := [f"{k} {v}" for k, v in (("damp_percent", g.damp_percent), ("desc_act", g.desc_act))
                      if v not in (None, False, 0.01)]:
            out.notes.append(f"Gptq: {', '.join(unused)} not used: Grove's GPTQ damps the Hessian by 1% of its mean "
                             "diagonal (Olive's default) and quantizes the columns in order")
        if "calibration_data" not in out.flags:
            out.notes.append("Gptq: no data config, so Grove calibrates on its built-in text (the GPL-3, after the "
                             "tokens its default evaluation scores); --calibration_data FILE takes yours (Olive's "
                             "default is wikitext-2 from the hub)")
    return problems


# -- the input model, the target, the evaluator ---------------------------------------------------

_CUSTOM_CODE = ("model_script", "script_dir", "model_loader", "dummy_inputs_func")


def _input_model(section: dict[str, Any], out: Translation, model_given: bool = False) -> None:
    """``model_given``: -m names the model, so a model_path Grove cannot read is not a problem."""
    where = "input_model"
    if not section:
        raise InvalidRequest("input_model is missing: add {\"type\": \"HfModel\", \"model_path\": \"<hub id or "
                             "folder>\"}, or pass -m")
    kind = str(section.get("type", "")).lower().removesuffix("handler")
    if kind == "onnxmodel":  # the graph path: -m model.onnx
        out.graph = True
        _onnx_input(_fields(section, where), out)
        return
    if kind not in ("hfmodel", "pytorchmodel"):
        raise InvalidRequest(f"{where}.type {section.get('type')!r}: Grove reads HfModel (or PyTorchModel with "
                             "hf_config), the Hugging Face model to optimize")
    fields = _fields(section, where)
    if custom := [k for k in _CUSTOM_CODE if fields.get(k)]:
        raise InvalidRequest(f"{where}.{custom[0]}: Grove loads Hugging Face models with transformers and runs no "
                             "loader code from a config; save the model with save_pretrained and point "
                             f"{where}.model_path at that folder")
    if fields.get("adapter_path"):
        raise InvalidRequest(f"{where}.adapter_path: LoRA adapters are not applied by Grove; merge the adapter into "
                             "the model (PEFT's merge_and_unload, then save_pretrained) and optimize the merged model")
    hf = _object(fields.pop("hf_config", None), f"{where}.hf_config")
    loading = {**_object(hf.get("from_pretrained_args"), f"{where}.hf_config.from_pretrained_args"),
               **_object(fields.get("load_kwargs"), f"{where}.load_kwargs")}
    # Olive passes unknown load_kwargs on to from_pretrained through extra_args
    loading.update(_object(loading.get("extra_args"), f"{where}.load_kwargs.extra_args"))
    model = hf.get("model_name") or fields.get("model_path")
    if isinstance(model, dict) and str(model.get("type", "")).startswith("azureml") and not model_given:
        named = ": " + " ".join(str(model[k]) for k in ("name", "version") if model.get(k))
        raise InvalidRequest(f"{where}.model_path is an Azure ML resource ({model['type']}{named.rstrip(': ')}), "
                             "which Grove does not fetch: download it and point model_path at the folder, use its "
                             "hub id, or pass -m")
    if (not model or not isinstance(model, str)) and not model_given:
        raise InvalidRequest(f"{where} names no model: set {where}.model_path (hub id, local folder, .gguf or "
                             "s3:// folder), or pass -m")
    if not model_given:
        out.flags["model_name_or_path"] = model
    if task := hf.get("task") or fields.get("task"):
        out.flags["task"] = task
    if revision := loading.get("revision"):
        out.flags["revision"] = revision
    if hf.get("trust_remote_code") or fields.get("trust_remote_code") or loading.get("trust_remote_code"):
        out.flags["trust_remote_code"] = True
    if unused := sorted(set(loading) - {"trust_remote_code", "revision", "extra_args"}):
        out.notes.append(f"input_model: {', '.join(unused)} not used: Grove loads the weights itself, for the "
                         "capture and the reference")
    if fields.get("io_config"):
        out.notes.append("input_model.io_config: Grove names the inputs and outputs itself (dynamic batch and "
                         "sequence axes), as onnxruntime-genai and its tokenizer files expect")


def _onnx_input(fields: dict[str, Any], out: Translation) -> None:
    """An ``ONNXModel`` input: its graph (``model_path``, a .onnx file or a folder, with ``onnx_file_name``
    naming the graph in a folder) is the model, and Grove's graph path serves it."""
    path = fields.get("model_path")
    if not path or not isinstance(path, str):
        raise InvalidRequest("input_model names no graph: set input_model.model_path to the .onnx file (or its "
                             "folder), or pass -m")
    if name := fields.get("onnx_file_name"):
        path = f"{path.rstrip('/')}/{name}"
    out.flags["model_name_or_path"] = path
    if unused := sorted(k for k in fields if k not in ("type", "model_path", "onnx_file_name") and fields[k]):
        out.notes.append(f"input_model: {', '.join(unused)} not used: Grove reads the graph's own inputs and "
                         "outputs")


def _target(config: dict[str, Any], engine: dict[str, Any], out: Translation) -> None:
    systems = _section(config, "systems", "")
    name = engine.get("target")
    if isinstance(name, dict):
        system, where = name, "target"
    elif name is not None:
        if name not in systems:
            raise InvalidRequest(f"target {name!r} is not among systems ({', '.join(systems) or 'none'}); name one "
                                 "of them, or add it to systems")
        system, where = systems[name], f"systems.{name}"
    elif len(systems) == 1:
        (where, system), = ((f"systems.{k}", v) for k, v in systems.items())
    elif not systems:
        return  # Olive's default: the local CPU
    else:
        raise InvalidRequest(f"systems has {len(systems)} systems and no target names one; set target to one of "
                             f"{', '.join(systems)}")
    if not isinstance(system, dict):
        raise InvalidRequest(f"{where} must be an object")
    if str(system.get("type", "LocalSystem")).lower() != "localsystem":
        raise InvalidRequest(f"{where}.type {system.get('type')!r}: Grove runs where it is started, or on its Prefect "
                             "work pools ('grove deploy', see docs/distributed.md); "
                             "use a LocalSystem with one accelerator")
    accelerators = _fields(system, where).get("accelerators") or [{}]
    if not isinstance(accelerators, list) or len(accelerators) > 1:
        raise InvalidRequest(f"{where}.accelerators: Grove optimizes for one target per run; keep one accelerator "
                             "(for several targets, list them in a fleet manifest: 'grove fleet refresh')")
    accelerator = accelerators[0] if isinstance(accelerators[0], dict) else {}
    providers = accelerator.get("execution_providers") or []
    providers = [providers] if isinstance(providers, str) else providers
    if len(providers) > 1:  # Olive searches over them; Grove's own targets among them must be one
        if len(ours := [p for p in providers if p in PROVIDER_DEVICE]) > 1:
            raise InvalidRequest(f"{where}.accelerators[0].execution_providers: Grove optimizes for one execution "
                                 f"provider per run, not {len(ours)} ({', '.join(ours)}); keep one (for several "
                                 "targets, list them in a fleet manifest: 'grove fleet refresh')")
        if ours:
            out.notes.append(f"{where}: execution providers {', '.join(p for p in providers if p not in ours)} are "
                             f"not Grove targets; it optimizes for {ours[0]}")
            providers = ours
    device = str(accelerator.get("device") or "").lower() or None
    if device not in (None, "cpu", "gpu"):
        raise InvalidRequest(f"{where}.accelerators[0].device {device!r}: Grove targets cpu or gpu")
    if providers:
        if providers[0] not in PROVIDER_DEVICE:
            raise InvalidRequest(f"{where}.accelerators[0].execution_providers: {providers[0]} is not a Grove target; "
                                 f"it targets {', '.join(PROVIDER_DEVICE)}")
        out.flags["provider"] = providers[0]
        device = device or PROVIDER_DEVICE[providers[0]]
    if device:
        out.flags["device"] = device


_MEASURED = {"latency", "throughput"}  # Olive metric types that Grove's evaluation reports on every run
# Olive's accuracy sub-types and what Grove's labelled scores answer them with ("": nothing).
_ENTITY_F1 = "computed only for token classifiers with B-/I- tags, as entity F1"
_SCORED = {"accuracy_score": "", "accuracy": "", "f1_score": _ENTITY_F1, "f1": _ENTITY_F1,  # torchmetrics', HF's
           "perplexity": ""}  # decoders


def _chosen_evaluator(config: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any] | None:
    """The evaluator the engine names (inline, or by its name among ``evaluators``), if any."""
    name = engine.get("evaluator")
    chosen = name if isinstance(name, dict) else (config.get("evaluators") or {}).get(name) if isinstance(
        name, str) else None
    return chosen if isinstance(chosen, dict) else None


def _evaluator_where(engine: dict[str, Any]) -> str:
    """How messages name the chosen evaluator: by its key in ``evaluators``, or inline."""
    return f"evaluators.{engine.get('evaluator')}" if isinstance(engine.get("evaluator"), str) else "evaluator"


def _evaluator_kind(chosen: dict[str, Any] | None) -> str:
    return str((chosen or {}).get("type") or "OliveEvaluator")


def _lm_evaluator(config: dict[str, Any], engine: dict[str, Any]) -> dict[str, Any] | None:
    """The chosen evaluator when it is Olive's LMEvaluator (lm-eval tasks), else None."""
    chosen = _chosen_evaluator(config, engine)
    return chosen if _evaluator_kind(chosen).lower() == "lmevaluator" else None


def _other_evaluator(chosen: dict[str, Any] | None, where: str) -> str | None:
    """An evaluator of a kind whose scores Grove does not compute (MTEB's), as the report's note names it."""
    if (kind := _evaluator_kind(chosen)).lower() in ("oliveevaluator", "lmevaluator"):
        return None
    tasks = [str(t) for t in (chosen or {}).get("tasks") or []]
    return (f"{where} ({kind}{': ' + ', '.join(tasks) if tasks else ''}"
            + ("; MTEB's benchmark is not in Grove: an encoder's report compares its embeddings with PyTorch's by "
               "cosine" if kind.lower() == "mtebevaluator" else "") + ")")


class LMEvaluator(BaseModel):
    """Olive's LMEvaluator options, as grove benchmark's flags."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    type: str
    tasks: list[str | dict[str, Any]] = Field(min_length=1, description="lm-eval tasks")
    batch_size: int | None = Field(None, ge=1)
    max_length: int | None = Field(None, ge=16)
    limit: float | None = Field(None, gt=0)
    num_fewshot: int | None = Field(None, ge=0)
    apply_chat_template: bool | None = None
    fewshot_as_multiturn: bool | None = None
    device: str | None = Field(None, description="the target's device is Grove's (systems)")
    model_class: Literal["hf", "ortgenai"] | None = Field(None, description="Grove picks the model class from the "
                                                          "model: hf for a Hugging Face model, ortgenai for an "
                                                          "onnxruntime-genai folder")
    bootstrap_iters: int | None = Field(None, description="Grove reports no bootstrap standard errors")
    sample_log_num: int | None = Field(None, description="Grove keeps the harness's results, not its samples")
    model_args: dict[str, Any] | None = Field(None, description="onnxruntime-genai options Grove sets itself")
    provider_options: dict[str, Any] | list[dict[str, Any]] | None = Field(
        None, description="the execution provider's options are the ones Grove sets for the target's device")
    metrics: None = Field(None, description="an LMEvaluator scores its tasks' own metrics")


def _benchmark(config: dict[str, Any], engine: dict[str, Any], out: Translation, after: bool) -> None:
    """An LMEvaluator as grove benchmark: on the input model for a config with no passes, or (``after``)
    on the passes' output, once auto-opt has written it."""
    chosen = _lm_evaluator(config, engine)
    where = _evaluator_where(engine)
    try:
        spec = LMEvaluator(**(chosen or {}))
    except ValidationError as exc:
        raise InvalidRequest(_pass_errors(exc, where, LMEvaluator)) from None
    inline = [t for t in spec.tasks if not isinstance(t, str)]
    if unnamed := [i for i, t in enumerate(spec.tasks) if isinstance(t, dict) and not isinstance(t.get("task"), str)]:
        raise InvalidRequest(f"{where}.tasks[{unnamed[0]}]: an inline task config needs its \"task\" name, as "
                             "lm-eval's task YAML files have")
    tasks = [t if isinstance(t, str) else str(t["task"]) for t in spec.tasks]
    flags: dict[str, object] = {"tasks": tasks}
    if inline:  # lm-eval task configs given whole: the node writes them as the YAML files the harness reads
        flags["task_definitions"] = [json.dumps(t, sort_keys=True) for t in inline]
    for key in ("batch_size", "max_length", "limit", "num_fewshot"):
        if (value := getattr(spec, key)) is not None:
            flags[key] = value
    for key in ("apply_chat_template", "fewshot_as_multiturn"):
        if getattr(spec, key):
            flags[key] = True
    out.benchmark, out.benchmark_after = flags, after
    out.notes.append(f"{where}: " + ("the output is scored after auto-opt" if after else
                                     "no passes, so the input model is scored")
                     + f" on lm-eval's {', '.join(tasks)} (grove benchmark: the harness's own tasks and metrics, "
                     "a cached evaluate-lm node" + (", written to <output>/lm-eval)" if after else ")")
                     + (f"; {', '.join(str(t['task']) for t in inline)} defined in the config, passed whole "
                        "(--task_definitions)" if inline else ""))
    if unused := [k for k in ("bootstrap_iters", "sample_log_num", "model_args", "device", "provider_options")
                  if getattr(spec, k)]:
        out.notes.append(f"{where}: {', '.join(unused)} not used: Grove runs the harness without bootstrap errors "
                         "or sample logs, on the target's device with the provider options it sets for it")


def _evaluator(config: dict[str, Any], engine: dict[str, Any], data: dict[str, Any], out: Translation) -> None:
    evaluators = _section(config, "evaluators", "")
    name = engine.get("evaluator")
    if isinstance(name, str) and name not in evaluators:
        raise InvalidRequest(f"evaluator {name!r} is not among evaluators ({', '.join(evaluators) or 'none'})")
    chosen = _chosen_evaluator(config, engine)
    where = _evaluator_where(engine)
    metrics = [m for m in (chosen or {}).get("metrics") or [] if isinstance(m, dict)]
    others: list[str] = []
    labelled: list[tuple[str, object]] = []  # (where, data config) of the accuracy metrics
    decoder = str(out.flags.get("task", "")).startswith("text-generation")  # scored by perplexity only
    perplexity = decoder
    for index, metric in enumerate(metrics):
        kind = str(metric.get("type", "")).lower()
        ref = metric.get("data_config") or (chosen or {}).get("data_config")
        if kind in _MEASURED:
            if ref is not None:
                out.notes.append(f"{metric.get('name')} ({kind}): Grove times fixed inputs (decoders: the prompt "
                                 "'What is machine learning?'; encoders: 64 tokens), not a data config's rows")
            continue
        if kind == "accuracy" and ref is not None:
            labelled.append((f"{where}.metrics[{index}]", ref))
            for sub in (str(s.get("name") if isinstance(s, dict) else s) for s in metric.get("sub_types") or []):
                perplexity |= sub == "perplexity"
                if decoder and sub != "perplexity":
                    others.append(f"{sub} ({metric.get('name')}; a text-generation model is scored by perplexity "
                                  "on the data's text)")
                elif sub not in _SCORED or _SCORED[sub]:
                    others.append(f"{sub} ({metric.get('name')}{'; ' + _SCORED[sub] if _SCORED.get(sub) else ''})")
        else:
            others.append(f"{metric.get('name')} ({metric.get('type')})")
    if other := _other_evaluator(chosen, where):
        others.append(other)
    sources: dict[_Data, str] = {}  # the data -> the first metric scoring it
    for at, ref in labelled:
        sources.setdefault(_data_source(ref, data, f"{at}.data_config", for_labels=True), at)
    if len(sources) > 1:
        raise InvalidRequest(f"{' and '.join(sources.values())} score different data configs; Grove scores one "
                             "labelled set per run: keep one accuracy metric's data config")
    if sources:
        (scored, at), = sources.items()
        out.flags["eval_data"] = scored.source
        _unused(scored, out)
        if perplexity and scored.max_samples and scored.max_seq_len:  # a decoder's text: chunks of tokens
            out.flags["eval_tokens"] = scored.max_samples * scored.max_seq_len
        elif perplexity and scored.max_samples:
            out.notes.append(f"{at}: max_samples without max_seq_len: Grove scores the text's first 1024 tokens "
                             "(--eval_tokens N sets how many)")
        elif scored.max_samples:
            out.flags["eval_samples"] = scored.max_samples
    out.notes.append("evaluation: Grove's report measures the output beside the fp32 reference on every run "
                     "(decoders: size, prefill ms, decode tokens/s, perplexity, top-1 agreement; encoders: size, "
                     "latency avg/p50/p90/p95/p99, throughput, cosine vs PyTorch or accuracy with --eval_data)"
                     + (f"; not computed: {', '.join(others)}" if others else ""))


# -- data configs ----------------------------------------------------------------------------------

# Olive's data containers whose rows Grove can read, and its dummy-input ones (shapes, no rows).
_DATA_CONTAINERS = {"huggingfacecontainer", "datacontainer"}
_DUMMY_CONTAINERS = {"dummydatacontainer", "transformersdummydatacontainer", "transformerspromptdummydatacontainer",
                     "transformerstokendummydatacontainer"}
# Olive's built-in components (a type outside these is a user_script's function, which Grove never runs).
_COMPONENTS = {"load_dataset_config": {"huggingface_dataset"},
               "pre_process_data_config": {"huggingface_pre_process", "ner_huggingface_preprocess",
                                           "tokenizer_pre_process", "text_generation_huggingface_pre_process",
                                           "pre_process", "skip_pre_process"},
               "post_process_data_config": {"text_classification_post_process", "ner_post_process",
                                            "text_generation_post_process", "post_process"},
               "dataloader_config": {"default_dataloader", "no_auto_batch_dataloader"}}
_FILE_BUILDERS = {"json", "csv", "parquet", "text"}  # datasets' builders that read data_files
_LOAD_KEYS = {"type", "params", "data_name", "subset", "split", "data_files", "data_dir", "col_filters", "max_samples"}
_PRE_KEYS = {"type", "params", "input_cols", "text_cols", "label_col", "label_cols", "max_samples", "max_seq_len"}


def _unused(data: _Data, out: Translation) -> None:
    if data.moved and data.moved not in out.notes:
        out.notes.append(data.moved)
    if data.unused and (note := f"{', '.join(data.unused)}: not used: Grove reads the rows itself, from the file or "
                                "the hub's Parquet copy") not in out.notes:
        out.notes.append(note)
    if data.tokenizing and (note := f"{', '.join(data.tokenizing)}: not used: Grove tokenizes the rows itself "
                                    "(static int8 calibrates on one sample at a time, cut at 128 tokens; an "
                                    "evaluation cuts rows at the model's longest input)") not in out.notes:
        out.notes.append(note)


@dataclass(frozen=True)
class _Data:
    """A data config as Grove reads it: where its rows are, and how many of them (max_samples rows,
    or for a text generation config, max_samples chunks of max_seq_len tokens)."""

    source: str
    max_samples: int | None = None
    max_seq_len: int | None = None
    unused: tuple[str, ...] = ()  # load_dataset options Grove does not use
    tokenizing: tuple[str, ...] = ()  # pre-processing and batching options: Grove tokenizes itself
    moved: str | None = None  # a hub dataset's old name, followed to its new one


def _data_configs(config: dict[str, Any]) -> dict[str, Any]:
    """data_configs by name: Olive writes a list of objects with a "name" (older configs: an object
    keyed by name)."""
    raw = config.get("data_configs") or []
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, list) or not all(isinstance(d, dict) and isinstance(d.get("name"), str) for d in raw):
        raise InvalidRequest('data_configs must be a list of objects, each with a "name"')
    return {d["name"]: d for d in raw}


def _data_source(ref: object, configs: dict[str, Any], where: str, *, for_labels: bool) -> _Data:
    """What a data config reference (a name in data_configs, or the config itself) amounts to for
    Grove: the file or hub table its rows are in (``--eval_data`` / ``--calibration_data``) and how
    many. Raises InvalidRequest naming the key Grove cannot read and what to write instead."""
    where, parts = _data_parts(ref, configs, where, for_labels=for_labels)
    load, pre = parts["load_dataset_config"], parts["pre_process_data_config"]
    export = _EXPORT
    if load.get("col_filters"):
        raise InvalidRequest(f"{where}.load_dataset_config.col_filters: Grove scores every row it reads; {export}")
    split = str(load.get("split") or "validation")  # Olive's default split
    files = load.get("data_files")
    if isinstance(files, dict):
        files = files.get(split)
    if isinstance(files, list):
        if len(files) != 1:
            raise InvalidRequest(f"{where}.load_dataset_config.data_files lists {len(files)} files; Grove reads one "
                                 "file: join them into one")
        files = files[0]
    name = load.get("data_name")
    moved = None
    if files:
        source = str(files) if "://" in str(files) or not load.get("data_dir") else str(Path(load["data_dir"]) / files)
        if source.lower().endswith(".json"):
            raise InvalidRequest(f"{where}.load_dataset_config.data_files {source}: Grove reads rows from JSON lines "
                                 "(.jsonl), .csv or .parquet files; save the rows as JSON lines, one object a line")
    elif not isinstance(name, str) or not name:
        raise InvalidRequest(f"{where}.load_dataset_config names no data: set data_files (a .jsonl, .csv or .parquet "
                             "file) or data_name (a hub dataset, org/name)")
    elif name in _FILE_BUILDERS:
        raise InvalidRequest(f"{where}.load_dataset_config: data_name {name!r} reads data_files, and none is set")
    else:
        name, moved = _hub_name(name, where)  # glue: the hub redirects it
        if load.get("data_dir"):
            raise InvalidRequest(f"{where}.load_dataset_config.data_dir: Grove reads a hub dataset's Parquet copy by "
                                 "subset and split, not a folder of its files; set data_files to the file, "
                                 f"hf://datasets/{name}/<path in the repo>")
        # the hub's own Parquet copy of every public dataset: <subset>/<split>/NNNN.parquet, a file a shard
        source = f"hf://datasets/{name}@refs/convert/parquet/{load.get('subset') or 'default'}/{split}/*.parquet"
    source += _columns_suffix(pre, f"{where}.pre_process_data_config", for_labels=for_labels)
    counts = {"max_samples": pre.get("max_samples", load.get("max_samples")), "max_seq_len": pre.get("max_seq_len")}
    for key, value in counts.items():
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise InvalidRequest(f"{where}: {key} {value!r} must be a positive whole number")
    unused = tuple(sorted(set(load) - _LOAD_KEYS))
    tokenizing = tuple(f"{where}.{part}.{key}" for part, read in (("pre_process_data_config", _PRE_KEYS),
                                                                   ("dataloader_config", {"type", "params"}))
                       for key in sorted(set(parts[part]) - read))
    return _Data(source, **counts, unused=tuple(f"{where}.load_dataset_config.{key}" for key in unused),
                 tokenizing=tokenizing, moved=moved)


_EXPORT = ("write the rows to a .jsonl, .csv or .parquet file and set load_dataset_config.data_files to it "
           "(or pass --eval_data / --calibration_data FILE)")


def _data_parts(ref: object, configs: dict[str, Any], where: str, *,
                for_labels: bool) -> tuple[str, dict[str, dict[str, Any]]]:
    """A data config reference (its name in data_configs, or the config itself) as (where it is, its
    components by key with their params merged in), refusing what Grove cannot read: loader code, a
    dummy or custom container, a component that is not one of Olive's built-in ones."""
    if isinstance(ref, str):
        if ref not in configs:
            raise InvalidRequest(f"{where} {ref!r} is not among data_configs ({', '.join(configs) or 'none'})")
        where, ref = f"data_configs.{ref}", configs[ref]
    if not isinstance(ref, dict):
        raise InvalidRequest(f"{where} must name a data config, or be one")
    kind = str(ref.get("type", "DataContainer")).lower()
    if ref.get("user_script") or ref.get("script_dir"):
        raise InvalidRequest(f"{where}.user_script: Grove runs no code from a config; {_EXPORT}")
    if kind in _DUMMY_CONTAINERS:
        raise InvalidRequest(f"{where} is a {ref.get('type')}, dummy inputs without "
                             f"{'labels' if for_labels else 'text'}; {_EXPORT}")
    if kind not in _DATA_CONTAINERS:
        raise InvalidRequest(f"{where}.type {ref.get('type')!r}: Grove reads HuggingfaceContainer (or DataContainer) "
                             f"data configs; {_EXPORT}")
    parts: dict[str, dict[str, Any]] = {}
    for key, known in _COMPONENTS.items():
        part = _object(ref.get(key), f"{where}.{key}")
        if part.get("type") is not None and str(part["type"]) not in known:
            raise InvalidRequest(f"{where}.{key}.type {part['type']!r} is not one of Olive's built-in components "
                                 f"({', '.join(sorted(known))}); {_EXPORT}")
        parts[key] = {**part, **_object(part.get("params"), f"{where}.{key}.params")}
    return where, parts


def _hub_name(name: str, where: str) -> tuple[str, str | None]:
    """A hub dataset's name, followed to where the hub moved it (glue -> nyu-mll/glue), and the note
    saying so; an error when it is not org/name."""
    moved = None
    if "/" not in name and (new := _moved_dataset(name)) is not None:
        moved = f"{where}.load_dataset_config.data_name {name!r} is {new!r} on the hub now (its redirect)"
        name = new
    elif "/" not in name and name in _MOVED_IN_2024:
        moved = (f"{where}.load_dataset_config.data_name {name!r} is {_MOVED_IN_2024[name]!r} on the hub now (the hub "
                 "could not be asked: from Grove's list of the datasets the hub moved under their authors in 2024)")
        name = _MOVED_IN_2024[name]
    if name.count("/") != 1:
        asked = ", and the hub could not be asked where it moved" if "/" not in name else ""
        raise InvalidRequest(f"{where}.load_dataset_config.data_name {name!r}: hub datasets are named org/name "
                             f"(GLUE is nyu-mll/glue){asked}; set that name, or data_files to a local file")
    return name, moved


def _finetune_data(ref: object, configs: dict[str, Any], where: str) -> tuple[dict[str, object], list[str]]:
    """A fine-tuning pass's data config as grove finetune's data flags (-d, its subset and split, the
    text recipe, block length and count), and notes on what is read differently."""
    where, parts = _data_parts(ref, configs, where, for_labels=False)
    load, pre = parts["load_dataset_config"], parts["pre_process_data_config"]
    notes: list[str] = []
    if load.get("col_filters"):
        raise InvalidRequest(f"{where}.load_dataset_config.col_filters: Grove trains on every row it reads; "
                             f"{_EXPORT}")
    flags: dict[str, object] = {"train_split": str(load.get("split") or "train")}
    files, name = load.get("data_files"), load.get("data_name")
    if isinstance(files, list):
        files = ",".join(map(str, files))
    if name in _FILE_BUILDERS and files:
        flags.update(data_name=name, data_files=str(files))
    elif files:
        flags["data_name"] = name or str(files)
        if name:
            flags["data_files"] = str(files)
    elif isinstance(name, str) and name:
        flags["data_name"], moved = _hub_name(name, where)
        if moved:
            notes.append(moved)
    else:
        raise InvalidRequest(f"{where}.load_dataset_config names no data: set data_name (a hub dataset, org/name) "
                             "or data_files")
    if load.get("subset"):
        flags["train_subset"] = str(load["subset"])
    cols = pre.get("text_cols", pre.get("input_cols"))
    cols = [cols] if isinstance(cols, str) else list(cols or [])
    if pre.get("text_template"):
        flags["text_template"] = str(pre["text_template"])
    elif len(cols) == 1:
        flags["text_field"] = cols[0]
    elif cols:
        flags["input_cols"] = cols
    for key in ("max_seq_len", "max_samples"):
        if pre.get(key) is not None:
            flags[key] = pre[key]
    if pre.get("add_special_tokens"):
        flags["add_special_tokens"] = True
    if pre.get("strategy") not in (None, "join"):
        raise InvalidRequest(f"{where}.pre_process_data_config.strategy {pre['strategy']!r}: Grove joins the samples "
                             "and cuts them into max_seq_len blocks (Olive's join); drop the key or set it to join")
    if unused := sorted(set(pre) - {"type", "params", "text_cols", "input_cols", "text_template", "max_seq_len",
                                    "max_samples", "add_special_tokens", "strategy"}):
        notes.append(f"{where}.pre_process_data_config: {', '.join(unused)} not used: Grove tokenizes the rows "
                     "itself (docs/finetune.md, Data)")
    return flags, notes


# The hub moved its canonical datasets (no org in the name) under their authors' orgs in 2024, and
# answers the old names with a redirect. Offline (a dry run on a machine without the hub) the redirect
# cannot be asked for: these are the moves of the datasets olive-recipes and Olive's docs name.
_MOVED_IN_2024 = {"glue": "nyu-mll/glue", "squad": "rajpurkar/squad", "imdb": "stanfordnlp/imdb",
                  "wikitext": "Salesforce/wikitext", "speech_commands": "google/speech_commands",
                  "cnn_dailymail": "abisee/cnn_dailymail", "c4": "allenai/c4", "gsm8k": "openai/gsm8k"}


def _moved_dataset(name: str) -> str | None:
    """Where the hub says a dataset named without its org now lives (GLUE: glue -> nyu-mll/glue): the
    hub answers the old name with a redirect, which huggingface_hub follows, as ``datasets`` does;
    None when the hub cannot be asked (offline) or knows no such dataset."""
    from huggingface_hub import HfApi

    try:
        new = HfApi().dataset_info(name).id
    except Exception:  # noqa: BLE001 - offline, unknown: the caller's error names the fix
        return None
    return new if new.count("/") == 1 else None


def _columns_suffix(pre: dict[str, Any], where: str, *, for_labels: bool) -> str:
    """The ``#text=...,label=...`` suffix (tasks/_data_sources.split_columns) that reads the columns a
    config names: input_cols (text_cols in a text generation config), one text or a sentence pair;
    label_col, or label_cols (a list of one), for labelled data (calibration reads text only). Names
    the suffix cannot hold, or more columns than Grove reads, are an error naming the key."""
    cols = pre.get("input_cols", pre.get("text_cols"))
    cols = [cols] if isinstance(cols, str) else list(cols or [])
    label = pre.get("label_col", pre.get("label_cols")) if for_labels else None
    if isinstance(label, list):
        if len(label) > 1:
            raise InvalidRequest(f"{where}.label_cols {label}: Grove scores one label column per row; keep one")
        label = label[0] if label else None
    if len(cols) > 2:
        raise InvalidRequest(f"{where}.input_cols {cols}: Grove reads one text column or a sentence pair (two); "
                             "join the others into one in a copy of the data (data_files)")
    from grove.tasks._data_sources import Columns

    try:
        return Columns(tuple(cols), label).suffix()
    except ValueError as exc:
        raise InvalidRequest(f"{where}: {exc}, which Grove's column suffix cannot carry; rename them in a copy of "
                             "the data (data_files)") from None


# -- the whole config ------------------------------------------------------------------------------

# Keys Olive reads under "engine" (older configs) or at the top level (Olive >= 0.7).
_ENGINE_KEYS = {"output_dir", "cache_dir", "host", "target", "evaluator", "search_strategy", "log_severity_level",
                "ort_log_severity_level", "ort_py_log_severity_level", "log_to_file", "evaluate_input_model",
                "clean_cache", "clean_evaluation_cache", "packaging_config", "plot_pareto_frontier", "no_artifacts",
                "output_name", "workflow_id", "verbose"}
_TOP_KEYS = {"$schema", "input_model", "systems", "evaluators", "passes", "engine", "data_configs", *_ENGINE_KEYS}
_REFUSED = {
    "pass_flows": "Grove runs one pipeline per run; write one config per flow",
    "auto_optimizer_config": "Grove's auto-opt picks its passes itself: run 'grove auto-opt' instead",
    "azureml_client": "Grove runs where it is started, or on its Prefect work pools ('grove deploy')",
    "workflow_host": "Grove runs where it is started, or on its Prefect work pools ('grove deploy')",
}


def translate(config: dict[str, Any], overrides: dict[str, object] | None = None, *,
              default_output: str | None = None) -> Translation:
    """The auto-opt flags an Olive workflow ``config`` amounts to (``overrides``: flags given on the
    command line, which win, as ``olive run``'s -m and -o do), and notes on what Grove does
    differently. Raises InvalidRequest naming what Grove cannot honour. ``default_output``: the
    output folder of a config without output_dir (Olive writes into the current folder; Grove writes
    a new folder, never into one that holds other files); None: the output stays in the store (a
    deployed run)."""
    overrides = overrides or {}
    for key in config:
        if key in _REFUSED:
            raise InvalidRequest(f"{key}: {_REFUSED[key]}")
        if key not in _TOP_KEYS:
            raise InvalidRequest(f"{key!r} is not an Olive workflow key that Grove reads; it reads "
                                 f"{', '.join(sorted(_TOP_KEYS - {'$schema'}))}")
    engine = {**_section(config, "engine", ""), **{k: v for k, v in config.items() if k in _ENGINE_KEYS}}
    if unknown := sorted(set(engine) - _ENGINE_KEYS):
        raise InvalidRequest(f"engine.{unknown[0]} is not an Olive engine key that Grove reads; it reads "
                             f"{', '.join(sorted(_ENGINE_KEYS))}")
    out = Translation()
    problems: list[str] = []  # what each part cannot honour, reported at once (a part's own: at once too)

    def attempt(part: Callable[..., Any], *args: Any) -> Any:
        try:
            return part(*args)
        except InvalidRequest as exc:
            problems.append(str(exc))
            return None

    model = _section(config, "input_model", "")
    if model or "model_name_or_path" not in overrides:
        attempt(_input_model, model, out, "model_name_or_path" in overrides)
    attempt(_target, config, engine, out)
    if (data := attempt(_data_configs, config)) is not None:  # the passes and metrics name its configs
        lm, passes = _lm_evaluator(config, engine), _section(config, "passes", "")
        other = _other_evaluator(_chosen_evaluator(config, engine), _evaluator_where(engine))
        if not passes and lm is not None:
            attempt(_benchmark, config, engine, out, False)  # evaluation only: lm-eval tasks on the input model
        elif not passes and other:
            problems.append(f"passes is empty: a config that only evaluates the input model runs in Grove with an "
                            f"LMEvaluator (lm-eval tasks, grove benchmark), not {other}")
        else:
            attempt(_passes, passes, data, out)
            attempt(_evaluator, config, engine, data, out)
            if lm is not None:  # the passes' output scored on lm-eval tasks after auto-opt
                attempt(_benchmark, config, engine, out, True)
    if engine.get("output_dir"):
        out.flags["output_path"] = str(engine["output_dir"])
    if (level := engine.get("log_severity_level")) is not None:
        if level not in range(5) or isinstance(level, bool):
            problems.append(f"log_severity_level {level!r}: Olive's levels are 0 (verbose) to 4 (fatal)")
        out.flags["log_level"] = level
    if engine.get("search_strategy"):
        out.notes.append("search_strategy: Grove does not search; it runs the passes once with the options given "
                         "(each step cached, so trying another option reruns only what it changes)")
    if engine.get("cache_dir"):
        out.notes.append(f"cache_dir {engine['cache_dir']!r}: Grove caches every step in its artifact store "
                         "(--store, default $GROVE_STORE or ~/.cache/grove/store), shared by all runs")
    if engine.get("evaluate_input_model") is False:
        out.notes.append("evaluate_input_model false: Grove evaluates the fp32 reference on every run (the report's "
                         "ratios compare with it); it is cached like any step")
    if engine.get("packaging_config"):
        out.notes.append("packaging_config: Grove writes the output as a folder (model, genai_config or tokenizer "
                         "files, grove_report.json), not a zip")
    out.flags.update(overrides)
    if default_output is not None and "output_path" not in out.flags:
        out.flags["output_path"] = default_output
        out.notes.append(f"output_dir is not set: Olive writes into the current folder, Grove into a new one, "
                         f"{default_output} (set output_dir, or pass -o)")
    if out.finetune is not None and "model_name_or_path" in out.flags:
        _finetune_paths(out.finetune, out)
    graph = PurePath(str(out.flags.get("model_name_or_path", "")))
    if out.graph and (output := out.flags.get("output_path")) and PurePath(str(output)) in (graph, graph.parent):
        out.notes.append(f"output_dir {output!r} holds the input graph: Olive writes over it, Grove writes a new "
                         "folder and refuses one that holds other files; pass -o with a new folder")
    if problems:
        raise InvalidRequest("; ".join(problems))
    return out
