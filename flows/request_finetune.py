"""The finetune request: Olive's ``finetune`` flags (and Grove's own), validated together before any
work, then split into the typed configs of the nodes that will run (prepare-data, train-adapter,
evaluate-adapter). Every TrainingArguments flag the command line gives is checked here, against
transformers' own parser, so a misspelt one fails in a second, naming the closest real ones."""

from __future__ import annotations

import difflib
import enum
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from grove.errors import InvalidRequest
from grove.flows.request import local_output_path
from grove.store import default_store_uri

__all__ = ["FinetuneRequest", "split_rows", "training_arguments"]


class FinetuneRequest(BaseModel):
    """What ``grove finetune`` was asked to do."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_name_or_path: str = Field(description="the base model: hub id, local HF folder, .gguf file, s3:// folder "
                                    "or pkg:<module>/<path>")
    output_path: str = Field("finetuned-adapter", description="folder to write the adapter to (Olive's layout: "
                             "adapter/, model_config.json) with grove_report.json")
    revision: str | None = Field(None, description="hub revision of the base model")
    trust_remote_code: bool = Field(False, description="Olive's flag, accepted: every architecture Grove supports is "
                                    "native to transformers, so no model code from the hub runs either way")
    store: str = Field(default_factory=default_store_uri, description="artifact store URI (file path or s3://)")
    method: Literal["lora", "qlora", "dora", "loha", "lokr"] = Field(
        "lora", description="lora; qlora (lora on a 4-bit base through bitsandbytes: needs a CUDA GPU); dora, loha or "
        "lokr (peft's DoRA, LoHa, LoKr: merged into the weights when optimized, not switchable)")
    lora_r: int = Field(64, ge=1, description="LoRA rank (Olive's default)")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha: the update is scaled by alpha / r (Olive's default)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the LoRA path (Olive's default)")
    target_modules: str | None = Field(None, description="modules to adapt, comma-separated (e.g. q_proj,k_proj,"
                                       "v_proj,o_proj, or all-linear); default: peft's for the architecture "
                                       "(q_proj,v_proj for llama and qwen2)")
    torch_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the base weights' dtype while training; default: on a CPU float32 with bf16 autocast "
        "where the CPU has bf16 instructions (avx512_bf16 / AMX: ~1.3x faster), else float32; on CUDA bfloat16 "
        "(Olive's default)")
    data_name: str = Field(description="the data: a hub dataset id (read from the hub's Parquet copy of the split), "
                           "a builder with --data_files (json, csv, parquet, text), or a file or folder (local or "
                           "s3://) of JSON lines, JSON, CSV, Parquet or text")
    train_subset: str | None = Field(None, description="hub dataset subset (config) to train on")
    train_split: str = Field("train", description="split to train on; a slice of its rows as datasets writes it: "
                             "train[:4096], train[10%:20%]")
    eval_subset: str | None = Field(None, description="subset to evaluate on (default: the training subset)")
    eval_split: str = Field("", description="split to evaluate on (a slice too: train[4096:4224]); none: a "
                            "held-out slice of the training blocks")
    data_files: str | None = Field(None, description="data files, comma-separated: local or s3:// paths with a "
                                   "builder (-d json), or paths in a hub dataset's repo")
    text_field: str | None = Field(None, description="the column holding each row's text")
    text_template: str | None = Field(None, description="each row's text from its columns, as a Python format "
                                      "string, e.g. '### Question: {instruction}\\n### Answer: {response}'")
    use_chat_template: bool = Field(False, description="each row's 'messages' column through the model's chat "
                                    "template")
    input_cols: list[str] | None = Field(None, description="without a text recipe: the columns joined (by newlines) "
                                         "as each row's text (default: the 'text' column)")
    train_on_responses: bool = Field(False, description="leave the prompt out of the loss: the template's part "
                                     "before its last field, or a chat's non-assistant turns (Olive trains on "
                                     "every token)")
    max_seq_len: int = Field(1024, ge=8, description="tokens per training block")
    add_special_tokens: bool = Field(False, description="let the tokenizer add its special tokens (BOS) to each row")
    max_samples: int = Field(256, ge=1, description="training blocks at most")
    batch_size: int = Field(1, ge=1, description="blocks per step (per_device_train_batch_size)")
    training_args: dict[str, Any] = Field(default_factory=dict, description="transformers TrainingArguments, e.g. "
                                          "max_steps, learning_rate (Olive's defaults: 2e-4, constant schedule, "
                                          "3% warm-up)")
    checkpoint_steps: int = Field(50, ge=1, description="steps between checkpoints kept in the store (a killed "
                                  "training resumes from the last)")

    _output_path = field_validator("output_path")(local_output_path)

    @field_validator("training_args")
    @classmethod
    def _known_arguments(cls, value: dict[str, Any]) -> dict[str, Any]:
        return training_arguments(value)

    @field_validator("train_split", "eval_split")
    @classmethod
    def _split(cls, value: str) -> str:
        if value:
            split_rows(value)  # a malformed slice: one error naming the form
        return value

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneRequest:
        from grove.tasks._finetune_data import check_text_recipe, template_fields

        check_text_recipe(self.text_field, self.text_template, self.use_chat_template, self.train_on_responses)
        if self.text_template is not None and not template_fields(self.text_template):
            raise ValueError(f"--text_template {self.text_template!r} names no column; write them as {{column}}")
        if "output_dir" in self.training_args:
            raise ValueError("--output_dir: the adapter is written to --output_path (-o)")
        return self

    # -- the nodes' configs ---------------------------------------------------------------------------
    def files(self, which: Literal["train", "eval"]) -> list[str]:
        from grove.tasks._finetune_data import data_files

        files = self.data_files.split(",") if self.data_files else []
        if which == "train":
            return data_files(self.data_name, split_rows(self.train_split)[0], self.train_subset, files)
        if not self.eval_split:
            return []
        return data_files(self.data_name, split_rows(self.eval_split)[0], self.eval_subset or self.train_subset, files)

    def prepare(self, train_files: list[str], eval_files: list[str], data_sha256: str) -> Any:
        from grove.tasks.prepare_data import PrepareDataConfig

        rows = {"train_rows": split_rows(self.train_split)[1],
                "eval_rows": split_rows(self.eval_split)[1] if self.eval_split else None}
        return PrepareDataConfig(**rows, train_files=train_files, eval_files=eval_files, data_sha256=data_sha256,
                                 text_field=self.text_field, text_template=self.text_template,
                                 use_chat_template=self.use_chat_template, input_cols=self.input_cols,
                                 train_on_responses=self.train_on_responses, max_seq_len=self.max_seq_len,
                                 add_special_tokens=self.add_special_tokens, max_samples=self.max_samples)

    def train(self, cuda: bool | None = None) -> Any:
        """train-adapter's config, with the speed defaults for where it will run (``cuda``: a GPU there;
        default: whether this machine has one)."""
        from grove.tasks.train_adapter import TrainConfig, cpu_has_bf16

        if cuda is None:
            import torch

            cuda = torch.cuda.is_available() or self.method == "qlora"
        dtype = self.torch_dtype or ("bfloat16" if cuda else "float32")
        targets = [t.strip() for t in self.target_modules.split(",") if t.strip()] if self.target_modules else None
        args = {"per_device_train_batch_size": self.batch_size, **self.training_args}
        # How the run reports and keeps itself: Grove's own settings, which stay out of the recipe.
        log_steps = int(args.pop("logging_steps", 5))
        checkpoint_steps = int(args.pop("save_steps", self.checkpoint_steps))
        # Activation checkpointing: the user's word (either of transformers' names for it), else on for CUDA only.
        checkpointing = [bool(args.pop(k)) for k in ("gradient_checkpointing", "activation_checkpointing") if k in args]
        return TrainConfig(method=self.method, lora_r=self.lora_r, lora_alpha=self.lora_alpha,
                           lora_dropout=self.lora_dropout, target_modules=targets, torch_dtype=dtype,
                           bf16_autocast=not cuda and dtype == "float32" and cpu_has_bf16(),
                           gradient_checkpointing=checkpointing[-1] if checkpointing else cuda, training_args=args,
                           checkpoint_steps=checkpoint_steps, log_steps=log_steps)


_SLICE = re.compile(r"(?P<split>[A-Za-z0-9_.-]+)(?:\[(?P<rows>-?\d*%?:-?\d*%?)\])?")


def split_rows(split: str) -> tuple[str, str | None]:
    """A split as ``datasets`` writes it, ``train`` or ``train[:4096]`` / ``train[10%:20%]``: the split's
    name and its rows' slice (``":4096"``, None for every row)."""
    match = _SLICE.fullmatch(split.strip())
    if match is None:
        raise ValueError(f"split {split!r}: write a split's name, or a slice of its rows as datasets does "
                         "(train[:4096], train[100:200], train[:10%])")
    return match["split"], match["rows"] if match["rows"] not in (None, ":") else None


def training_arguments(given: dict[str, Any]) -> dict[str, Any]:
    """``given`` (flag name -> value, as typed or already typed) checked and typed by transformers'
    own TrainingArguments parser, as Olive reads them; JSON values (enums as their value). A name that
    is not a TrainingArguments field raises, naming the closest real ones (Olive drops it with a
    warning: a misspelt --max_step then trains for three epochs)."""
    import dataclasses

    from transformers import HfArgumentParser, TrainingArguments

    if not given:
        return {}
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for name in given:
        if name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else (
                "; grove finetune --help lists its own flags, and every other --flag is one of transformers' "
                "TrainingArguments")
            raise InvalidRequest(f"--{name} is neither a grove finetune flag nor a transformers TrainingArguments "
                                 f"field{hint}")
    argv = ["--output_dir", "unused"]
    for name, value in given.items():
        argv += [f"--{name}", *(str(v) for v in value)] if isinstance(value, list) else [f"--{name}", str(value)]
    try:
        (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)  # type: ignore[arg-type]
    except (SystemExit, ValueError) as exc:
        raise InvalidRequest(f"transformers' TrainingArguments refused {' '.join(argv[2:])} ({exc}); check the "
                             "values") from exc
    typed = {}
    for name in given:
        value = getattr(parsed, name)
        typed[name] = value.value if isinstance(value, enum.Enum) else value
    return typed
