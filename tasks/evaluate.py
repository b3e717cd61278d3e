"""Node ``evaluate`` for genai decoder models: size on disk, perplexity on real text,
prefill latency and decode speed in onnxruntime-genai, a sample answer, and top-1 agreement
with a reference model (parity). Writes ``eval.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, Device, StepConfig
from grove.errors import ParityError
from grove.node import RECIPE_CACHE, node_logger, report_progress, run_node
from tasks import _decoder_io as dio

__all__ = ["EvalConfig", "evaluate", "fingerprint_text"]

PARITY_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Machine learning is a field of study in",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) +",
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of",
)


class EvalConfig(StepConfig):
    NODE = "evaluate"
    VERSION = 1
    text: str = Field(dio.BUILTIN_TEXT, description="perplexity text: 'builtin:GPL-3' (shipped with Grove, same "
                      "bytes as Debian's /usr/share/common-licenses/GPL-3) or a path / s3:// URI to a UTF-8 file")
    text_sha256: str = Field("", description="sha256 of the text (filled in by the request; part of the recipe)")
    ppl_tokens: int = Field(1024, ge=16, description="tokens of the text scored for perplexity")
    ppl_chunk: int = Field(512, ge=8, description="tokens per chunk, each scored from an empty KV cache")
    prompt: str = Field("What is machine learning?", description="user message for the sample and timings")
    new_tokens: int = Field(64, ge=1, description="greedy tokens generated for the decode timing")
    provider: Literal["cpu", "cuda", "dml"] = Field("cpu", description="execution provider to measure on")
    min_top1_agreement: float | None = Field(None, ge=0, le=1, description="fail if top-1 agreement with the "
                                             "reference falls below this (None: report only)")

    @property
    def device(self) -> Device | None:
        """Measuring on CUDA or DirectML needs a GPU box; on the CPU provider, any pool will do."""
        return self.placement or ("gpu" if self.provider != "cpu" else None)


@task(name="fingerprint-text", persist_result=False)
def fingerprint_text(source: str) -> str:
    """sha256 of the perplexity text, so a changed file invalidates evaluations."""
    return dio.text_sha256(source)


@task(name="evaluate", cache_policy=RECIPE_CACHE)
def evaluate(model: Artifact, config: EvalConfig, reference: Artifact | None = None) -> Artifact:
    """Measure ``model``; with ``reference``, also its top-1 agreement with it."""
    parents = [model] if reference is None else [model, reference]
    return run_node(config, parents, model.store, _evaluate)


def _evaluate(inputs: list[Path], config: EvalConfig, out: Path) -> dict[str, object]:
    log = node_logger()
    model_dir = inputs[0]
    metrics: dict[str, object] = {"size_mb": round(dio.model_size(model_dir) / 1e6, 2)}
    genai = dio.genai_model(model_dir, config.provider)  # one load serves tokenizing and timing
    tokens = dio.tokenize(model_dir, dio.read_text(config.text), genai)[: config.ppl_tokens]
    session = dio.session(model_dir, config.provider)
    ppl = dio.perplexity(session, tokens, config.ppl_chunk, lambda f: report_progress(0.7 * f, "perplexity"))
    metrics["perplexity"] = round(ppl, 4)
    report_progress(0.7, "generation timing")
    metrics["ppl_tokens"] = len(tokens)
    log.info("perplexity %.3f over %d tokens", metrics["perplexity"], len(tokens))
    metrics.update(dio.generation_timing(model_dir, config.prompt, config.new_tokens, config.provider, genai))
    log.info("prefill %.1f ms, decode %.1f tok/s", metrics["prefill_ms"], metrics["decode_tok_s"])
    if len(inputs) > 1:
        ref = dio.session(inputs[1], config.provider)
        agreement = dio.top1_agreement(session, ref, [dio.tokenize(model_dir, t, genai) for t in PARITY_TEXTS])
        metrics["top1_agreement"] = round(agreement, 4)
        log.info("top-1 agreement with the reference: %.3f", agreement)
        if config.min_top1_agreement is not None and agreement < config.min_top1_agreement:
            raise ParityError("top-1 agreement with fp32", agreement, config.min_top1_agreement,
                              f"over {len(PARITY_TEXTS)} fixed prompts")
    metrics["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics
