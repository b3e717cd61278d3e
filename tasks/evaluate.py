"""Node ``evaluate`` for genai decoder models, all measured in onnxruntime-genai: size on disk,
perplexity on real text, prefill latency and decode speed, a sample answer, and parity with a
reference: the share of the text's positions where both predict the same next token. Writes
``eval.json`` and ``predictions.json`` (the top-1 token at every scored position, so a later
evaluation compares with this one without loading this model again)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, MeasureConfig
from grove.errors import InvalidRequest, ParityError
from grove.node import RECIPE_CACHE, node_logger, report_progress, run_node
from grove.tasks import _data_sources as data_io
from grove.tasks import _genai_runtime as runtime

__all__ = ["EvalConfig", "evaluate", "fingerprint_text"]

PREDICTIONS = "predictions.json"
MIN_PPL_TOKENS = 16  # the least --eval_tokens accepts


class EvalConfig(MeasureConfig):
    NODE = "evaluate"
    VERSION = 3  # 2: measured in onnxruntime-genai with an explicit thread count; parity over the text;
    # 3: says whether the timing process had transparent huge pages
    text: str = Field(data_io.BUILTIN_TEXT, description="perplexity text: 'builtin:GPL-3' (shipped with Grove, same "
                      "bytes as Debian's /usr/share/common-licenses/GPL-3) or a path / s3:// URI to a UTF-8 file, "
                      "or to a Parquet / JSONL / CSV table (its text column's rows)")
    text_sha256: str = Field("", description="sha256 of the text (filled in by the request; part of the recipe)")
    ppl_tokens: int = Field(1024, ge=16, description="tokens of the text scored for perplexity")
    ppl_chunk: int = Field(512, ge=8, description="tokens per chunk, each scored from an empty KV cache")
    prompt: str = Field("What is machine learning?", description="user message for the sample and timings")
    new_tokens: int = Field(64, ge=1, description="greedy tokens generated for the decode timing")
    threads: int | None = Field(None, ge=1, le=1024, description="intra-op threads for every measurement; None: "
                                "the CPUs this process may use (as many as the PyTorch baseline in bench/ uses)")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="fail if top-1 agreement with the "
                                             "reference over the text falls below this (None: report only)")


@task(name="fingerprint-text", persist_result=False)
def fingerprint_text(source: str) -> str:
    """sha256 of the perplexity text, so a changed file invalidates evaluations."""
    return data_io.text_sha256(source)


@task(name="evaluate", cache_policy=RECIPE_CACHE)
def evaluate(model: Artifact, config: EvalConfig, reference: Artifact | None = None) -> Artifact:
    """Measure ``model``; with ``reference`` (the reference model's evaluate artifact, made with the
    same text and token count), also the top-1 agreement of their predictions."""
    parents = [model] if reference is None else [model, reference]
    return run_node(config, parents, model.store, _evaluate)


def _evaluate(inputs: list[Path], config: EvalConfig, out: Path) -> dict[str, object]:
    log = node_logger()
    model_dir = inputs[0]
    threads = config.threads or runtime.available_cpus()
    metrics: dict[str, object] = {"size_mb": round(runtime.model_size(model_dir) / 1e6, 2), "threads": threads}
    genai = runtime.genai_model(model_dir, config.provider, threads)  # one load serves every measurement
    tokens = runtime.tokenize(model_dir, data_io.read_text(config.text), genai, limit=config.ppl_tokens)
    if len(tokens) < MIN_PPL_TOKENS:
        raise InvalidRequest(f"the perplexity text {config.text} is {len(tokens)} tokens long for this model's "
                             f"tokenizer; at least {MIN_PPL_TOKENS} are needed: pass a longer --eval_data")
    if len(tokens) < config.ppl_tokens:
        log.warning("the perplexity text %s is only %d tokens long (%d asked): perplexity and top-1 agreement "
                    "over so few tokens vary a lot from text to text; a longer --eval_data gives steadier figures",
                    config.text, len(tokens), config.ppl_tokens)
    chunk = config.ppl_chunk
    if (context := runtime.context_length(model_dir)) is not None and chunk >= context:
        chunk = context - 1  # each chunk is scored in one generator of len(chunk) + 1 tokens
        log.info("perplexity chunks of %d tokens: the model's context is %d", chunk, context)
    ppl, predictions = runtime.perplexity(genai, tokens, chunk, lambda f: report_progress(0.7 * f, "perplexity"),
                                      runtime.kv_floor(model_dir))
    metrics.update(perplexity=round(ppl, 4), ppl_tokens=len(tokens), ppl_chunk=chunk)
    log.info("perplexity %.3f over %d tokens", ppl, len(tokens))
    scored = {"tokens_sha256": _sha256(tokens), "top1": predictions}
    (out / PREDICTIONS).write_text(json.dumps(scored))
    report_progress(0.7, "generation timing")
    metrics.update(runtime.generation_timing(model_dir, config.prompt, config.new_tokens, config.provider, genai))
    log.info("prefill %.1f ms, decode %.1f tok/s (%d threads)", metrics["prefill_ms"], metrics["decode_tok_s"],
             threads)
    if len(inputs) > 1:
        metrics["top1_agreement"] = _agreement(scored, json.loads((inputs[1] / PREDICTIONS).read_text()), config)
    metrics["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _agreement(mine: dict[str, Any], reference: dict[str, Any], config: EvalConfig) -> float:
    """Share of scored positions where the two predictions agree; raises ParityError under the gate."""
    if mine["tokens_sha256"] != reference["tokens_sha256"]:
        raise InvalidRequest("the reference evaluation scored other tokens (another text, token count or "
                             "tokenizer); evaluate both models with the same text and ppl_tokens")
    ours, theirs = mine["top1"], reference["top1"]
    agreement = round(sum(a == b for a, b in zip(ours, theirs, strict=True)) / len(ours), 4)
    node_logger().info("top-1 agreement with the reference: %.3f over %d positions", agreement, len(ours))
    if config.min_top1_agreement is not None and agreement < config.min_top1_agreement:
        raise ParityError("top-1 agreement with the reference", agreement, config.min_top1_agreement,
                          f"over the {len(ours)} scored positions of {config.text}", flag="--min_top1_agreement",
                          fix="for int4 try a smaller --block_size or another --int4_algorithm, or pass a higher "
                          "--precision")
    return agreement


def _sha256(tokens: list[int]) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()
