"""The auto-opt request for encoders (BERT, RoBERTa, DistilBERT): the user-facing fields of
:class:`grove.flows.request.AutoOptRequest` that apply, plus the encoder knobs, validated together
before any work starts and split into the typed configs of the nodes that will run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from grove.artifacts import Source
from grove.errors import InvalidRequest
from grove.flows.request import EP_SHORT, PROVIDER_DEVICE, OptRequestBase
from grove.tasks._choices import EncoderTask

if TYPE_CHECKING:  # the nodes import Prefect: imported where a request is split into their configs
    from grove.tasks.capture_encoder import CaptureEncoderConfig
    from grove.tasks.check_parity import ParityConfig
    from grove.tasks.convert_fp16 import Fp16Config
    from grove.tasks.download_model import DownloadConfig
    from grove.tasks.evaluate_encoder import EncoderEvalConfig
    from grove.tasks.optimize_graph import GraphConfig
    from grove.tasks.package_encoder import EncoderPackageConfig
    from grove.tasks.quantize_int8 import Int8Config

__all__ = ["EncoderOptRequest", "infer_task", "refuse_encoder_flags"]

# auto-opt flags (and fleet target fields) that only the decoder path takes.
DECODER_ONLY = ("int4_algorithm", "block_size", "symmetric", "accuracy_level", "head_bits", "head_shortlist",
                 "eval_tokens", "min_top1_agreement", "mixed_precision_ratio", "mixed_precision_algorithm",
                 "include_hidden_states", "prune_lm_head", "rotate", "int8_nodes", "clip_search", "embedding_int8",
                 "sparsity", "components")

# auto-opt flags that only the encoder path takes.
_ENCODER_ONLY = ("int8_mode", "per_channel", "op_types_to_quantize", "nodes_to_exclude", "quant_format",
                 "calibrate_method", "eval_repeat", "eval_samples", "min_cosine")  # calibration: gptq's too
_STATIC_OPTIONS = ("quant_format", "calibrate_method", "calibration_data", "calibration_samples")
_INT8_OPTIONS = ("int8_mode", "per_channel", "op_types_to_quantize", "nodes_to_exclude", *_STATIC_OPTIONS)


def _flags(names: Sequence[str]) -> str:
    """'--a applies' or '--a, --b apply'."""
    return ", ".join(f"--{n}" for n in names) + (" applies" if len(names) == 1 else " apply")


def _refuse(fields: Mapping[str, object], names: Sequence[str], rest: str) -> None:
    if given := [n for n in names if n in fields]:
        raise InvalidRequest(f"{_flags(given)} {rest}")


def refuse_encoder_flags(fields: Mapping[str, object], model: str) -> None:
    """Raise InvalidRequest naming the encoder-only flags among a decoder's ``fields``."""
    _refuse(fields, _ENCODER_ONLY, f"to encoders; {model} is a decoder LLM (its int4 options: --int4_algorithm, "
            "--block_size, --symmetric, --accuracy_level)")




def infer_task(architectures: Sequence[str]) -> EncoderTask:
    """The task an encoder's head is for, from config.json's architectures (as transformers names
    them): a sequence classifier is served as text-classification, a token classifier as
    token-classification, anything else (a bare encoder, a masked-LM head) as feature-extraction."""
    for arch in architectures:
        if arch.endswith("ForSequenceClassification"):
            return "text-classification"
        if arch.endswith("ForTokenClassification"):
            return "token-classification"
    return "feature-extraction"


class EncoderOptRequest(OptRequestBase):
    """What ``grove auto-opt`` was asked to do for an encoder model."""

    precision: Literal["int8", "fp16", "fp32"] = Field("int8", description="precision of the output (int4: of the "
                                                       "weights; fp16 is for GPUs)")
    task: EncoderTask | None = Field(None, description="the task of the weights' head (config.json's "
                                     "architectures: *ForSequenceClassification text-classification, "
                                     "*ForTokenClassification token-classification, else feature-extraction); "
                                     "another task is refused unless the weights have its head (feature-extraction "
                                     "drops a head, so it always works)")
    int8_mode: Literal["dynamic", "static"] = Field("dynamic", description="int8: activations scaled per run "
                                                    "(dynamic), or ranges calibrated on text (static)")
    per_channel: bool = Field(True, description="int8: one weight scale per output channel (keeps MiniLM's "
                              "cosine >= 0.99)")
    nodes_to_exclude: list[str] = Field(default_factory=list, description="int8: node names kept in fp32 (they "
                                        "must be in the graph; the error lists real names)")
    op_types_to_quantize: list[str] | None = Field(None, description="int8: only these op types (they must be in "
                                                   "the graph; default: onnxruntime's)")
    quant_format: Literal["QDQ", "QOperator"] = Field("QDQ", description="static int8: graph format")
    calibrate_method: Literal["MinMax", "Entropy", "Percentile"] = Field("MinMax", description="static int8: how "
                                                                         "activation ranges are found")
    calibration_data: str = Field("builtin:GPL-3", description="static int8: UTF-8 text, one calibration sample "
                                  "per paragraph (blank-line separated, over 40 characters); or a .parquet, .jsonl "
                                  "or .csv table: its sentence pairs (sentence1 + sentence2 and the other pair "
                                  "columns --eval_data reads), as a paraphrase or NLI model reads them, else its "
                                  "text column's rows; FILE#text=<column>[+<column>] names them")
    calibration_samples: int = Field(32, ge=1, le=4096, description="static int8: paragraphs used")
    eval_data: str | None = Field(None, description="labelled data. Text classifiers: CSV / JSONL / Parquet with a "
                                  "text (or sentence) and a label column (ids or id2label names), or a sentence "
                                  "pair for paraphrase / NLI models (sentence1+sentence2, premise+hypothesis, "
                                  "question+sentence, question1+question2, text+text_pair): accuracy. Token "
                                  "classifiers: JSONL / Parquet with tokens and ner_tags lists, or CoNLL text: "
                                  "accuracy, and entity F1 for B-/I- tags. sentence-transformers models: sentence "
                                  "pairs with a similarity score (STS-B's sentence1, sentence2, label; or a score "
                                  "column): Spearman. A hub table's class ids are matched to the model's by name. "
                                  "FILE#text=<column>[+<column>],label=<column> names other columns")
    eval_samples: int | None = Field(None, ge=1, description="classifiers: score the first N labelled rows "
                                     "(sentences, pairs) of --eval_data (default: all; a hub split can hold 25,000 "
                                     "reviews)")
    eval_repeat: int = Field(100, ge=5, description="timed calls per latency measurement")
    threads: int = Field(2, ge=1, description="intra-op threads for latency")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="feature extraction: parity limit on the mean "
                                     "embedding cosine (default: per precision)")

    @classmethod
    def from_flags(cls, fields: dict[str, object]) -> EncoderOptRequest:
        """The encoder request from ``grove auto-opt``'s flags (or a fleet target), refusing the
        decoder-only ones by name."""
        _refuse(fields, DECODER_ONLY, "to decoder LLMs; this model takes the encoder path (--precision int8, "
                "fp16 or fp32)")
        if fields.get("precision") == "int4":
            raise InvalidRequest("--precision int4 is for decoder LLMs; encoders take int8 (default), fp16 or fp32")
        return cls(**{k: v for k, v in fields.items() if k != "use_ort_genai"})

    @model_validator(mode="after")
    def _consistent(self) -> EncoderOptRequest:
        problems = []
        if self.provider and PROVIDER_DEVICE[self.provider] != self.device:
            problems.append(f"--provider {self.provider} runs on {PROVIDER_DEVICE[self.provider]}, not --device "
                            f"{self.device}; pass --device {PROVIDER_DEVICE[self.provider]} or another provider")
        # Options changed from their defaults (a run form from the dashboard sends every field).
        fields = type(self).model_fields
        changed = [n for n in _INT8_OPTIONS if getattr(self, n) != fields[n].get_default(call_default_factory=True)]
        if self.precision != "int8" and changed:
            problems.append(f"{_flags(changed)} to --precision int8, not {self.precision}")
        elif self.int8_mode == "dynamic" and (static := [n for n in changed if n in _STATIC_OPTIONS]):
            problems.append(f"{_flags(static)} to --int8_mode static (dynamic int8 needs no calibration)")
        if self.eval_samples is not None and not self.eval_data:
            problems.append("--eval_samples caps the labelled rows of --eval_data, and no --eval_data is given")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def resolved(self, source: Source) -> EncoderOptRequest:
        """This request with its task settled: as asked, or (task None) the task of the source's
        head. Raises InvalidRequest for a task whose head the weights lack, labelled --eval_data for
        a local folder with no sentence embedding to score, or --min_cosine for one that is not an
        embedding model."""
        head = infer_task(source.architectures)
        task = self.task or head
        if task != head and task != "feature-extraction" and source.architectures:
            # The weights have no such head: transformers would initialise one at random, silently.
            other = "" if head == "feature-extraction" else " or feature-extraction (the encoder without its head)"
            raise InvalidRequest(f"--task {task} needs a {task} head, and {self.model_name_or_path} is "
                                 f"{', '.join(source.architectures)} ({head}): that head would be untrained, random "
                                 f"weights; pass --task {head}{other}, or a model trained for {task}")
        if self.min_cosine is not None and task != "feature-extraction":
            raise InvalidRequest(f"--min_cosine limits the embeddings' cosine (--task feature-extraction); a {task} "
                                 "model is gated on top-1 agreement and class probabilities, per precision")
        if task == "feature-extraction" and source.kind == "local":
            # refuses what the graph cannot compute, up front
            from grove.tasks.capture_encoder import sentence_transformers_pipeline

            pooling, _ = sentence_transformers_pipeline(Path(source.location))
            if self.eval_data and pooling is None:
                raise InvalidRequest(f"--eval_data scores an embedding model on sentence pairs' similarity, and "
                                     f"{self.model_name_or_path} has no sentence-transformers pooling (modules.json): "
                                     "its graph outputs token states only; leave --eval_data out, or pass --task "
                                     "text-classification / token-classification for a classifier's labelled data")
        return self if self.task == task else self.model_copy(update={"task": task})

    @property
    def _task(self) -> EncoderTask:
        if self.task is None:
            raise ValueError("the request's task is settled by resolved(source) before its node configs are read")
        return self.task

    @property
    def execution_provider(self) -> Literal["cpu", "cuda", "dml"]:
        ep = self.provider or ("CUDAExecutionProvider" if self.device == "gpu" else "CPUExecutionProvider")
        return EP_SHORT[ep]  # type: ignore[return-value]

    @property
    def download(self) -> DownloadConfig:
        from grove.tasks.download_model import DownloadConfig

        return DownloadConfig(trust_remote_code=self.trust_remote_code)

    @property
    def capture(self) -> CaptureEncoderConfig:
        from grove.tasks.capture_encoder import CaptureEncoderConfig

        return CaptureEncoderConfig(task=self._task)

    @property
    def graph(self) -> GraphConfig:
        from grove.tasks.optimize_graph import GraphConfig

        return GraphConfig(use_gpu=self.device == "gpu")

    @property
    def int8(self) -> Int8Config | None:
        if self.precision != "int8":
            return None
        from grove.tasks.quantize_int8 import Int8Config

        return Int8Config(mode=self.int8_mode, per_channel=self.per_channel, nodes_to_exclude=self.nodes_to_exclude,
                          op_types_to_quantize=self.op_types_to_quantize, quant_format=self.quant_format,
                          calibrate_method=self.calibrate_method, calibration_data=self.calibration_data,
                          calibration_samples=self.calibration_samples)

    @property
    def fp16(self) -> Fp16Config | None:
        from grove.tasks.convert_fp16 import Fp16Config

        return Fp16Config() if self.precision == "fp16" else None

    def parity(self, precision: Literal["int8", "fp16", "fp32"]) -> ParityConfig:
        from grove.tasks.check_parity import ParityConfig

        return ParityConfig(precision=precision, min_cosine=self.min_cosine if precision == self.precision else None)

    def evaluation(self, labelled_sha256: str = "") -> EncoderEvalConfig:
        from grove.tasks.evaluate_encoder import EncoderEvalConfig

        return EncoderEvalConfig(repeat=self.eval_repeat, threads=self.threads, provider=self.execution_provider,
                                 labelled_data=self.eval_data, labelled_sha256=labelled_sha256,
                                 labelled_samples=self.eval_samples)

    @property
    def package(self) -> EncoderPackageConfig:
        from grove.tasks.package_encoder import EncoderPackageConfig

        return EncoderPackageConfig(model=self.model_name_or_path, target={
            "device": self.device, "provider": self.execution_provider, "precision": self.precision,
            "task": self._task, "int8_mode": self.int8_mode if self.precision == "int8" else None})
