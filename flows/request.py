"""The auto-opt request: every flag validated together before any work starts, then split
into the typed configs of the nodes that will run."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from grove.store import default_store_uri
from grove.tasks._choices import MIXED_PRECISION_HEURISTICS, Int4Algorithm, MixedPrecisionAlgorithm

if TYPE_CHECKING:  # the nodes import Prefect: imported where a request is split into their configs
    from grove.tasks.capture_onnx import CaptureConfig
    from grove.tasks.download_model import DownloadConfig
    from grove.tasks.evaluate import EvalConfig
    from grove.tasks.evaluate_components import ComponentsEvalConfig
    from grove.tasks.export_components import ExportComponentsConfig
    from grove.tasks.package_components import ComponentsPackageConfig
    from grove.tasks.package_genai import PackageConfig
    from grove.tasks.prune_torch import PruneConfig
    from grove.tasks.quantize_int4 import Int4Config
    from grove.tasks.quantize_torch import TorchQuantConfig

__all__ = ["EP_SHORT", "PROVIDER_DEVICE", "AutoOptRequest", "OptRequestBase", "local_output_path"]

Provider = Literal["CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider"]
Precision = Literal["int4", "int8", "fp16", "fp32"]
PROVIDER_DEVICE = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "gpu", "DmlExecutionProvider": "gpu"}
EP_SHORT = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}


def local_output_path(value: str | None) -> str | None:
    """The output is a local folder (on a worker, its output volume): refuse what cannot be one
    before any work, instead of a folder named 's3:' or a traceback from expanduser. None: no
    copy; the output stays in the store (fleet entries publish it to the registry from there)."""
    from pathlib import Path

    if value is None:
        return None
    if not value.strip():
        raise ValueError("empty; pass the folder to write the optimized model to")
    if "://" in value:
        raise ValueError(f"{value} is a URI; the output is a local folder (the artifacts themselves are in the "
                         "store, --store s3://..., and `grove fleet refresh` publishes outputs there)")
    try:
        Path(value).expanduser()
    except RuntimeError as exc:  # ~user of an unknown user
        raise ValueError(f"{value}: {exc}") from None
    return value


class OptRequestBase(BaseModel):
    """What every auto-opt request has, whichever path (decoder, encoder) serves the model. Each field's
    description is its flag's help, the dashboard form's text and its line in docs/cli.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_name_or_path: str = Field(description="the model: a hub id, a local Hugging Face folder, a .gguf file "
                                    "(decoders), an s3:// folder, or pkg:<module>/<path> (a file inside an installed "
                                    "Python package); docs/cli.md lists what each is and its digest")
    output_path: str | None = Field(None, description="folder the optimized model is written to, on the machine "
                                    "that runs the flow; replaced only if it holds an earlier Grove output. None "
                                    "(a deployment's run): the output stays in the store, linked from the run's page")
    device: Literal["cpu", "gpu"] = Field("cpu", description="target hardware")
    provider: Provider | None = Field(None, description="execution provider, CPUExecutionProvider, "
                                      "CUDAExecutionProvider or DmlExecutionProvider; it must match --device "
                                      "(default: the device's own)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="accepted, as Olive's commands pass it: every architecture "
                                    "Grove supports is native to transformers, so no model code from the hub is "
                                    "fetched or run either way (an architecture that would need it is refused, with "
                                    "the supported list)")
    store: str = Field(default_factory=default_store_uri, description="artifact store: a folder, or "
                       "s3://bucket/prefix (endpoint from AWS_ENDPOINT_URL, credentials from AWS_ACCESS_KEY_ID / "
                       "AWS_SECRET_ACCESS_KEY); default $GROVE_STORE, else ~/.cache/grove/store")
    publish_as: tuple[str, str, str] | None = Field(None, description="fleet refresh: (name, target, version) "
                                                    "to publish the output under in the store's registry")

    _output_path = field_validator("output_path")(local_output_path)


class AutoOptRequest(OptRequestBase):
    """What ``grove auto-opt`` was asked to do for a decoder LLM (Olive's flags plus Grove's own)."""

    precision: Precision = Field("int4", description="precision of the output (int4: of the weights; fp16 is for "
                                 "GPUs)")
    task: str = Field("text-generation", description="what the model is for: text-generation")
    use_ort_genai: Literal[True] = Field(True, description="write an onnxruntime-genai folder: always on for "
                                         "decoder LLMs (on an encoder it is noted and ignored: encoders are written "
                                         "for onnxruntime)")
    include_hidden_states: bool = Field(False, description="decoders: the graph also outputs the last hidden states "
                                        "(embedding models built as decoders, e.g. Qwen3-Embedding)")
    prune_lm_head: bool = Field(False, description="decoders: logits of the last position only (the builder's "
                                "prune_lm_head: a prefill skips the lm_head for the prompt's other tokens; "
                                "perplexity is then scored a token at a time)")
    int4_algorithm: Int4Algorithm | None = Field(None, description="affine, rtn, hqq, k_quant, builder "
                                                 "(docs/int4.md); gptq: GPTQ on the PyTorch weights before the "
                                                 "capture, calibrated on --calibration_data, the builder writing "
                                                 "MatMulNBits from its integers (default: affine on CPU, builder "
                                                 "on GPU)")
    block_size: Literal[16, 32, 64, 128, 256] = Field(32, description="int4 weights per block")
    symmetric: bool = Field(False, description="symmetric int4 blocks (rtn)")
    accuracy_level: Literal[0, 1, 2, 3, 4] = Field(4, description="int4 MatMulNBits compute type: 4 = int8 "
                                                   "activations (fastest on CPU), 0 = fp32 (exact, slower)")
    head_bits: Literal[4, 8] = Field(8, description="affine/hqq int4: bits of the lm_head and the tied embedding; "
                                     "8 keeps them near-exact (SmolLM2: top-1 0.967 vs fp32), 4 is 10% smaller "
                                     "(perplexity 1.045x, top-1 0.83)")
    embedding_int8: bool = Field(False, description="builder int4 (the GPU default): the embedding as 8-bit "
                                 "blocks, which a tied lm_head reads too (Olive's QuantizeEmbeddingInt8 + "
                                 "ShareEmbeddingLmHead surgeries; the builder writes both at 4 bits); affine, hqq "
                                 "and gptq write 8-bit tables by default (--head_bits)")
    head_shortlist: int | None = Field(None, ge=0, le=1024, description="affine/hqq/gptq int4 with 8-bit heads: a "
                                       "4-bit pass scores the vocabulary, the K best tokens per position get their "
                                       "logits recomputed from the 8-bit rows; 0 = the whole 8-bit lm_head for every "
                                       "token (default: 32; gptq: on cpu; docs/int4.md)")
    mixed_precision_ratio: float | None = Field(None, gt=0, le=1, description="gptq: share of the decoder's linear "
                                                "layers' weights at 4 bits; the other layers, the most sensitive by "
                                                "--mixed_precision_algorithm, keep 8 bits (Olive's "
                                                "SelectiveMixedPrecision ratio)")
    mixed_precision_algorithm: MixedPrecisionAlgorithm | None = Field(
        None, description="gptq: how the 8-bit layers are chosen: a score ranks them for --mixed_precision_ratio "
        "(kld_gradient, the default: how much the model's next-token distribution moves when the layer is at 4 "
        "bits, from the gradient of that divergence on the calibration text; Olive's snr, snr_relative, iqe, "
        "iqe_relative; Grove's output_error, each layer's own 4-bit output error), or a fixed heuristic picks "
        "them by position, without a ratio (high_precision_lm_head, _mlp_down, _mlp_down_qkv: llama.cpp's "
        "k-quant mixes); docs/olive-compatibility.md")
    int8_nodes: list[str] | None = Field(None, description="k_quant: MatMul nodes (graph node names) quantized at "
                                         "8 bits instead of 4 (Olive's customized_weight_config)")
    rotate: bool = Field(False, description="gptq: rotate the weights first by a random Hadamard matrix "
                         "(QuaRot's offline rotations, Olive's QuaRot pass: the same function, smaller outliers "
                         "to round; llama, mistral, qwen2, qwen3 and phi3 families)")
    clip_search: bool = Field(False, description="gptq: each group's range shrunk to the factor (1.0 to 0.6) with "
                              "the least rounding error instead of its min and max (GPTQ's mse option; SmolLM2, "
                              "rotated, symmetric: perplexity 1.048x fp32 instead of 1.055x; ~15% longer)")
    sparsity: str | None = Field(None, description="SparseGPT before the capture (Olive's SparseGPT pass): a share "
                                 "of each decoder layer's linear weights set to zero (0.5), or N:M, N of every M "
                                 "consecutive inputs (2:4), the kept weights updated on --calibration_data to keep "
                                 "each layer's output; then the capture and --precision as usual")
    components: list[str] | None = Field(None, description="a multimodal checkpoint's ONNX components as mobius "
                                         "writes them (Olive's MobiusBuilder components_to_export): all, or some "
                                         "of decoder, vision_encoder, audio_encoder, embedding, each in a folder "
                                         "of its own at --precision fp32 (default) or fp16, measured alone; each "
                                         "is then an ONNX graph for auto-opt -m <output>/<component>/model.onnx")
    calibration_data: str | None = Field(None, description="gptq, --sparsity: text (or a table's text column) cut "
                                         "in windows "
                                         "of 512 tokens (default: the built-in GPL-3 text after its first 4,096 "
                                         "tokens, which the default evaluation scores); FILE#text=<column> names "
                                         "a table's column")
    calibration_samples: int | None = Field(None, ge=1, le=1024, description="gptq, --sparsity: windows of 512 "
                                            "calibration "
                                            "tokens (default: 32)")
    eval_data: str | None = Field(None, description="UTF-8 text for perplexity: a path, s3://..., or a hub dataset "
                                  "file hf://datasets/<repo>/<file>; a table (.parquet, e.g. a split's shards "
                                  "<split>/*.parquet read in name order, or .jsonl / .csv rows) reads as its text "
                                  "(or sentence, content) column's rows joined by blank lines; FILE#text=<column> "
                                  "names another (default: the GPL-3 text shipped with Grove)")
    eval_tokens: int = Field(1024, ge=16, description="tokens scored for perplexity (chunks of 512, or the "
                             "model's context - 1 if shorter, each from an empty cache); a shorter text is scored "
                             "whole, with a warning")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="fail the run if top-1 agreement with "
                                             "the fp32 model is lower than this")
    adapter_path: str | None = Field(None, description="a LoRA adapter folder (peft: adapter_config.json, "
                                     "adapter_model.safetensors) trained on this model, e.g. grove finetune's "
                                     "<output>/adapter: kept switchable beside the int4 base "
                                     "(adapter_weights.onnx_adapter, loaded with onnxruntime_genai.Adapters), or "
                                     "merged with --merge_adapter")
    merge_adapter: bool = Field(False, description="merge --adapter_path into the weights first and write one "
                                "plain model")
    gpu_nodes: list[Literal["capture-onnx", "quantize-int4", "evaluate", "package-genai"]] = Field(
        default_factory=list, description="on a deployed stack: nodes to run on the gpu pool (others run where "
        "they naturally do); ignored when running locally")

    @model_validator(mode="before")
    @classmethod
    def _components_precision(cls, data: object) -> object:
        """Components are exported at full precision by default (Olive's MobiusBuilder: fp32), fp16 on a GPU."""
        if isinstance(data, dict) and data.get("components") and data.get("precision") is None:
            data = {**data, "precision": "fp16" if data.get("device") == "gpu" else "fp32"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> AutoOptRequest:
        problems = []
        if self.components is not None:
            problems += self._components_problems()
        if self.provider and PROVIDER_DEVICE[self.provider] != self.device:
            problems.append(f"--provider {self.provider} runs on {PROVIDER_DEVICE[self.provider]}, not "
                            f"--device {self.device}; pass --device {PROVIDER_DEVICE[self.provider]} "
                            "or another provider")
        if self.precision == "fp16" and self.device == "cpu" and self.components is None:
            problems.append("--precision fp16 targets GPUs (onnxruntime's CPU kernels for these graphs are fp32); "
                            "for CPU pass --precision int4, int8 or fp32")
        if self.device == "gpu" and self.int4_algorithm == "affine":  # its block-sum correction
            problems.append("--int4_algorithm affine is for CPU graphs (a zero-point-free kernel plus a correction); "
                            "on gpu use 'builder' (the default), 'gptq', or onnxruntime's 'rtn', 'k_quant' or 'hqq' "
                            "on the fp16 graph")
        if self.precision != "int4" and self.int4_algorithm is not None:
            problems.append(f"--int4_algorithm applies to --precision int4, not {self.precision}")
        if self.precision != "int4" and (int4_only := [f for f, on in (("--block_size", self.block_size != 32),
                                                                        ("--symmetric", self.symmetric)) if on]):
            problems.append(f"{', '.join(int4_only)} {'apply' if len(int4_only) > 1 else 'applies'} to "
                            f"--precision int4, not {self.precision}")
        algorithm = self.int4_algorithm_used
        if self.symmetric and algorithm not in (None, "rtn", "builder", "gptq"):
            problems.append(f"--symmetric applies to --int4_algorithm rtn; {algorithm} chooses its own zero points "
                            "(pass --int4_algorithm rtn --symmetric, or drop --symmetric)")
        if self.accuracy_level != 4 and algorithm in (None, "builder"):
            problems.append("--accuracy_level applies to Grove's int4 quantizer (--precision int4 on cpu, "
                            "--int4_algorithm affine, rtn, hqq or k_quant)")
        if self.head_bits != 8 and (algorithm not in ("affine", "hqq", "gptq") or (algorithm == "hqq"
                                                                                   and self.device == "gpu")):
            problems.append("--head_bits applies to Grove's affine and hqq int4 (--precision int4 on cpu), and gptq")
        if self.embedding_int8 and algorithm != "builder":
            problems.append("--embedding_int8 applies to --int4_algorithm builder (the GPU default); affine, hqq "
                            "and gptq write the 8-bit table by default (--head_bits 8)")
        if self.head_shortlist is not None and (algorithm not in ("affine", "hqq", "gptq") or self.device != "cpu"):
            problems.append("--head_shortlist applies to Grove's affine, hqq and gptq int4 on cpu (their 8-bit "
                            "lm_head)")
        elif self.head_shortlist and self.head_bits != 8:
            problems.append("--head_shortlist rescores with the 8-bit lm_head, and --head_bits 4 has none; "
                            "drop --head_shortlist, or pass --head_bits 8")
        if (calibrated := [f"--{f}" for f in ("mixed_precision_ratio", "mixed_precision_algorithm",
                                              *(("calibration_data", "calibration_samples") if self.sparsity is None
                                                else ()))
                           if getattr(self, f) is not None] + (["--rotate"] if self.rotate else [])
                          + (["--clip_search"] if self.clip_search else [])) \
                and algorithm != "gptq":
            problems.append(f"{', '.join(calibrated)}: for a decoder, calibration is GPTQ's; pass --int4_algorithm "
                            "gptq")
        if self.sparsity is not None:
            from grove.tasks.prune_torch import parse_sparsity

            try:
                parse_sparsity(self.sparsity)
            except ValueError as exc:
                problems.append(f"--{exc}")
            if algorithm == "gptq":
                problems.append("--sparsity with --int4_algorithm gptq: GPTQ's updates would fill the pruned weights "
                                "back in; use another int4 algorithm, or --precision fp32 / fp16")
            if self.keeps_adapter:
                problems.append("--sparsity prunes the model an adapter was trained on: pass --merge_adapter to prune "
                                "the merged weights")
        mixed, positional = self.mixed_precision_algorithm, MIXED_PRECISION_HEURISTICS
        if mixed in positional and self.mixed_precision_ratio is not None:
            problems.append(f"--mixed_precision_algorithm {mixed} picks its layers by position: drop "
                            "--mixed_precision_ratio")
        elif mixed is not None and mixed not in positional and self.mixed_precision_ratio is None:
            problems.append(f"--mixed_precision_algorithm {mixed} ranks the layers: pass --mixed_precision_ratio "
                            "(the share of weights left at 4 bits, e.g. 0.65)")
        if self.int8_nodes and algorithm != "k_quant":
            problems.append("--int8_nodes applies to --int4_algorithm k_quant")
        if self.merge_adapter and self.adapter_path is None:
            problems.append("--merge_adapter merges the adapter --adapter_path names: pass it too")
        if self.keeps_adapter and not (self.device == "cpu" and (self.precision == "fp32" or algorithm in ("affine",
                                                                                                          "hqq"))):
            problems.append("a switchable adapter (--adapter_path) is kept beside an int4 base of Grove's affine or "
                            "hqq int4 on cpu, or an fp32 one; for this target pass --merge_adapter")
        if self.task not in ("text-generation", "text-generation-with-past"):
            problems.append(f"--task {self.task} is not supported by auto-opt yet; supported: text-generation")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def _components_problems(self) -> list[str]:
        problems = []
        if not self.components or ("all" in self.components and len(self.components) > 1):
            problems.append("--components: all, or the components to write (decoder, vision_encoder, audio_encoder, "
                            "embedding)")
        if self.precision not in ("fp32", "fp16"):
            problems.append(f"--components writes fp32 or fp16 graphs, not {self.precision}: quantize each one after "
                            "(auto-opt -m <output>/<component>/model.onnx --precision int4 or int8)")
        defaults = AutoOptRequest.model_fields
        pipeline = [f for f in ("int4_algorithm", "adapter_path", "sparsity", "include_hidden_states", "prune_lm_head",
                                "eval_data", "min_top1_agreement", "calibration_data", "publish_as")
                    if getattr(self, f) != defaults[f].get_default()]
        if pipeline:
            problems.append(f"{', '.join('--' + f for f in pipeline)}: for auto-opt's text decoder, not --components "
                            "(each component is exported and measured alone)")
        if self.execution_provider == "dml":
            problems.append("--components: mobius builds for cpu or cuda, not DirectML")
        return problems

    # -- node configs -------------------------------------------------------------------------
    def _placement(self, node: str) -> Literal["gpu"] | None:
        return "gpu" if node in self.gpu_nodes else None

    @property
    def execution_provider(self) -> str:
        return EP_SHORT[self.provider or ("CUDAExecutionProvider" if self.device == "gpu" else "CPUExecutionProvider")]

    @property
    def download(self) -> DownloadConfig:
        from grove.tasks.download_model import DownloadConfig

        return DownloadConfig(trust_remote_code=self.trust_remote_code)

    @property
    def reference_capture(self) -> CaptureConfig:
        from grove.tasks.capture_onnx import CaptureConfig

        precision = "fp32" if self.execution_provider == "cpu" else "fp16"
        return CaptureConfig(precision=precision, execution_provider=self.execution_provider,
                             include_hidden_states=self.include_hidden_states, prune_lm_head=self.prune_lm_head,
                             placement=self._placement("capture-onnx"))

    @property
    def capture(self) -> CaptureConfig:
        """The output's capture (the reference's unless the builder quantizes; for gptq, the builder
        reads the quantize-torch node's checkpoint, whose integers it keeps)."""
        from grove.tasks.capture_onnx import CaptureConfig

        builder_int4 = self.int4_algorithm_used == "builder"
        return CaptureConfig(precision=self.precision, execution_provider=self.execution_provider,
                             block_size=self.block_size if builder_int4 else None,
                             embedding_int8=self.embedding_int8,
                             accuracy_level=self.accuracy_level if self.int4_algorithm_used == "gptq" else None,
                             head_shortlist=self._gptq_shortlist,
                             include_hidden_states=self.include_hidden_states, prune_lm_head=self.prune_lm_head,
                             placement=self._placement("capture-onnx"))

    @property
    def _gptq_shortlist(self) -> int:
        """gptq's 8-bit lm_head gets the shortlist the affine head has (default 32; none with a 4-bit
        head, or on a GPU, whose fp16 head is not the CPU's bottleneck)."""
        if self.int4_algorithm_used != "gptq" or self.head_bits != 8 or self.device != "cpu":
            return 0
        return 32 if self.head_shortlist is None else self.head_shortlist

    @property
    def exported(self) -> ExportComponentsConfig:
        """The export-components node's config (``--components``)."""
        from grove.tasks.export_components import ExportComponentsConfig

        wanted = [] if self.components in (None, ["all"]) else list(self.components or [])
        return ExportComponentsConfig(components=wanted, precision=self.precision,
                                      execution_provider=self.execution_provider,
                                      placement=self._placement("capture-onnx"))

    @property
    def components_evaluation(self) -> ComponentsEvalConfig:
        from grove.tasks.evaluate_components import ComponentsEvalConfig

        return ComponentsEvalConfig(provider=self.execution_provider,
                                    placement=self._placement("evaluate"))

    @property
    def components_package(self) -> ComponentsPackageConfig:
        from grove.tasks.package_components import ComponentsPackageConfig

        return ComponentsPackageConfig(model=self.model_name_or_path, placement=self._placement("package-genai"),
                                       target={"device": self.device, "provider": self.execution_provider,
                                               "precision": self.precision, "components": list(self.components or [])})

    @property
    def keeps_adapter(self) -> bool:
        """Whether the output keeps --adapter_path switchable (multi-LoRA) rather than merged."""
        return self.adapter_path is not None and not self.merge_adapter

    @property
    def int4_algorithm_used(self) -> Int4Algorithm | None:
        """The int4 algorithm this request runs: None unless --precision int4; by default affine on
        CPU and the builder's own on GPU."""
        if self.precision != "int4":
            return None
        return self.int4_algorithm or ("affine" if self.device == "cpu" else "builder")

    @property
    def int4(self) -> Int4Config | None:
        """The int4 node's config, or None when the builder quantizes (or no int4 is asked)."""
        algorithm = self.int4_algorithm_used
        if algorithm in (None, "builder", "gptq"):
            return None
        from grove.tasks.quantize_int4 import Int4Config

        return Int4Config(algorithm=algorithm, block_size=self.block_size, symmetric=self.symmetric,
                          accuracy_level=self.accuracy_level, placement=self._placement("quantize-int4"),
                          head_bits=self.head_bits, head_shortlist=self.head_shortlist,
                          int8_nodes=self.int8_nodes or [])

    def pruning(self, calibration_sha256: str) -> PruneConfig | None:
        """The prune-torch node's config (``--sparsity``: SparseGPT before the capture), or None."""
        if self.sparsity is None:
            return None
        from grove.tasks._data_sources import BUILTIN_TEXT
        from grove.tasks.prune_torch import PruneConfig

        return PruneConfig(sparsity=self.sparsity, calibration=self.calibration_data or BUILTIN_TEXT,
                           calibration_sha256=calibration_sha256, calibration_samples=self.calibration_samples or 32)

    def torch_quant(self, calibration_sha256: str) -> TorchQuantConfig:
        """The quantize-torch node's config (``--int4_algorithm gptq``: the weights are quantized before
        the capture)."""
        from grove.tasks._data_sources import BUILTIN_TEXT
        from grove.tasks.quantize_torch import TorchQuantConfig

        return TorchQuantConfig(group_size=self.block_size, symmetric=self.symmetric, head_bits=self.head_bits,
                                mixed_precision_ratio=self.mixed_precision_ratio,
                                mixed_precision_algorithm=self.mixed_precision_algorithm, rotate=self.rotate,
                                clip_search=self.clip_search, calibration=self.calibration_data or BUILTIN_TEXT,
                                calibration_sha256=calibration_sha256,
                                calibration_samples=self.calibration_samples or 32,
                                placement=self._placement("quantize-int4"))

    def evaluation(self, text_sha256: str, *, gate: bool) -> EvalConfig:
        from grove.tasks._data_sources import BUILTIN_TEXT
        from grove.tasks.evaluate import EvalConfig

        return EvalConfig(text=self.eval_data or BUILTIN_TEXT, text_sha256=text_sha256, ppl_tokens=self.eval_tokens,
                          provider=self.execution_provider,
                          min_top1_agreement=self.min_top1_agreement if gate else None,
                          placement=self._placement("evaluate"))

    @property
    def package(self) -> PackageConfig:
        from grove.tasks.package_genai import PackageConfig

        return PackageConfig(model=self.model_name_or_path, placement=self._placement("package-genai"),
                             reference_precision=self.reference_capture.precision, target={
            "device": self.device, "provider": self.execution_provider, "precision": self.precision,
            "int4_algorithm": self.int4_algorithm_used,
            "block_size": self.block_size if self.int4_algorithm_used else None,
            **({"embedding_int8": True} if self.embedding_int8 else {}),
            **({"sparsity": self.sparsity} if self.sparsity is not None else {})})
