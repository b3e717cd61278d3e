"""Node ``prepare-data``: a fine-tuning dataset as the token blocks training reads
(``train.safetensors``, ``eval.safetensors``: ``input_ids``, ``labels``, ``attention_mask``, each
``[blocks, max_seq_len]``) and ``data.json`` (what went in). Keyed by the data's bytes, the model
(its tokenizer and chat template), the text recipe and the sequence length."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field, model_validator

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks import _finetune_data as fd

__all__ = ["DATA_FILES", "PrepareDataConfig", "fingerprint_data", "load_blocks", "prepare_data"]

DATA_FILES = ("train.safetensors", "eval.safetensors")


class PrepareDataConfig(StepConfig):
    NODE = "prepare-data"
    VERSION = 1
    train_files: list[str] = Field(description="files of the training split (absolute paths or URIs)")
    eval_files: list[str] = Field(default_factory=list, description="files of the evaluation split; none: a "
                                  "held-out slice of the training blocks")
    data_sha256: str = Field(description="sha256 over the files' bytes (filled in by the flow)")
    text_field: str | None = None
    text_template: str | None = None
    use_chat_template: bool = False
    input_cols: list[str] | None = None
    train_on_responses: bool = False
    max_seq_len: int = Field(1024, ge=8)
    add_special_tokens: bool = False
    max_samples: int = Field(256, ge=1, description="training blocks at most (Olive counts blocks too)")
    max_eval_samples: int = Field(32, ge=1, description="evaluation blocks at most")
    holdout: float = Field(0.1, gt=0, lt=1, description="share of the blocks held out for evaluation when there "
                           "is no evaluation split")
    train_rows: str | None = Field(None, description="a slice of the training split's rows, as datasets writes it "
                                   "(':4096', '10%:20%'); None: every row")
    eval_rows: str | None = Field(None, description="a slice of the evaluation split's rows")

    def recipe(self) -> dict[str, object]:
        recipe = super().recipe()
        for key in ("train_rows", "eval_rows"):  # unset: the keys of the stores written before slices existed
            if recipe[key] is None:
                del recipe[key]
        return recipe

    @model_validator(mode="after")
    def _one_text_recipe(self) -> PrepareDataConfig:
        fd.check_text_recipe(self.text_field, self.text_template, self.use_chat_template, self.train_on_responses)
        return self


@task(name="fingerprint-data", persist_result=False)
def fingerprint_data(files: list[str]) -> str:
    """sha256 over the data's bytes; never cached, so changed data retrains."""
    return fd.data_sha256(files)


@task(name="prepare-data", cache_policy=RECIPE_CACHE)
def prepare_data(model: Artifact, config: PrepareDataConfig) -> Artifact:
    """HF model folder (for its tokenizer) -> token blocks."""
    return run_node(config, [model], model.store, _prepare)


def _prepare(inputs: list[Path], config: PrepareDataConfig, out: Path) -> dict[str, object]:
    from safetensors.torch import save_file

    (model_dir,) = inputs
    tokenizer = _tokenizer(model_dir, config.use_chat_template)
    train = _blocks(config.train_files, config.train_rows, config, tokenizer, config.max_samples)
    if not train.input_ids:
        raise InvalidRequest(f"-d: the training data gave no tokens to train on ({train.samples} rows); check "
                                "the data and the text recipe")
    if config.eval_files:
        evaluation = _blocks(config.eval_files, config.eval_rows, config, tokenizer, config.max_eval_samples)
        eval_on = "eval split"
    elif len(train.input_ids) >= 2:  # the tail of the training blocks, never trained on
        held = min(config.max_eval_samples, max(1, math.ceil(len(train.input_ids) * config.holdout)))
        evaluation = fd.Blocks(train.input_ids[-held:], train.labels[-held:], train.attention_mask[-held:],
                               samples=0, tokens=sum(map(sum, train.attention_mask[-held:])))
        train = fd.Blocks(train.input_ids[:-held], train.labels[:-held], train.attention_mask[:-held],
                          samples=train.samples, tokens=sum(map(sum, train.attention_mask[:-held])))
        eval_on = f"held-out ({held} of the training blocks)"
    else:
        evaluation, eval_on = train, "the training block (too little data to hold one out)"
    for name, blocks in zip(DATA_FILES, (train, evaluation), strict=True):
        save_file(_tensors(blocks), str(out / name))
    facts = {"train_blocks": len(train.input_ids), "eval_blocks": len(evaluation.input_ids), "rows": train.samples,
             "train_tokens": train.tokens, "seq_len": config.max_seq_len, "eval_on": eval_on,
             "trained_tokens": sum(label != fd.IGNORE for row in train.labels for label in row)}
    (out / "data.json").write_text(json.dumps(facts, indent=2))
    node_logger().info("%d training blocks of %d tokens from %d rows; evaluation on %s", facts["train_blocks"],
                       config.max_seq_len, train.samples, eval_on)
    return facts


def _tokenizer(model_dir: Path, chat: bool) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if chat and not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest("--use_chat_template: this model's tokenizer has no chat template; build the text "
                                "with --text_template instead")
    return tokenizer


def _blocks(files: list[str], rows_slice: str | None, config: PrepareDataConfig, tokenizer: Any,
            max_blocks: int) -> fd.Blocks:
    rows = fd.read_rows(files)
    if rows_slice is not None:
        rows = rows[fd.row_slice(rows_slice, len(rows))]
    if not rows:
        raise InvalidRequest(f"-d: {', '.join(files)} holds no rows{f' in [{rows_slice}]' if rows_slice else ''}")
    samples = fd.render(rows, text_field=config.text_field, text_template=config.text_template,
                        chat=tokenizer if config.use_chat_template else None, input_cols=config.input_cols,
                        train_on_responses=config.train_on_responses)
    return fd.token_blocks(samples, tokenizer, config.max_seq_len, max_blocks, config.add_special_tokens)


def _tensors(blocks: fd.Blocks) -> dict[str, Any]:
    import torch

    return {"input_ids": torch.tensor(blocks.input_ids, dtype=torch.int64),
            "labels": torch.tensor(blocks.labels, dtype=torch.int64),
            "attention_mask": torch.tensor(blocks.attention_mask, dtype=torch.int64)}


def load_blocks(data_dir: Path, which: str) -> Any:
    """The blocks of ``train`` or ``eval`` as a torch Dataset of dicts (what the Trainer iterates)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(str(data_dir / f"{which}.safetensors"))

    class Blocks(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return int(tensors["input_ids"].shape[0])

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {k: v[i] for k, v in tensors.items()}

    return Blocks()
