"""Running genai decoder folders in onnxruntime-genai, the runtime users load them with:
teacher-forced logits (perplexity, parity) and generation timings. One model load serves all
of them. Shared by evaluate and the tests."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["available_cpus", "context_length", "genai_model", "generation_timing", "has_chat_template", "kv_floor",
           "logits", "model_size", "perplexity", "tokenize"]


def model_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("model.onnx*"))


def context_length(model_dir: Path) -> int | None:
    """The longest sequence (prompt + generated tokens) the folder's genai_config.json allows."""
    value = _genai_model_section(model_dir).get("context_length")
    return int(value) if value else None


def _genai_model_section(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "genai_config.json").read_text())["model"]


def kv_floor(model_dir: Path) -> int:
    """The shortest KV cache (a generator's max_length) the model accepts: onnxruntime's
    GroupQueryAttention refuses a cache shorter than the model's sliding window (Gemma 2: 4096),
    whatever the sequence; 0 for a model without one."""
    window = int((_genai_model_section(model_dir).get("decoder", {}).get("sliding_window") or {}).get("window_size")
                 or 0)
    context = context_length(model_dir)
    return min(window, context) if context else window


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def genai_model(model_dir: Path, provider: str = "cpu", threads: int | None = None) -> Any:
    """An onnxruntime-genai model on ``provider`` (load once; tokenizing, logits and timing share
    it). ``threads``: intra-op threads; None keeps onnxruntime-genai's default, which on these
    2-CPU machines decodes about 20% slower than an explicit 2 (measured)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if provider != "cpu":
        config.clear_providers()
        config.append_provider(provider)
    if threads is not None:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def tokenize(model_dir: Path, text: str, model: Any = None, limit: int | None = None) -> list[int]:
    """``text``'s tokens; with ``limit``, its first ``limit`` tokens (all if fewer), tokenizing only
    a prefix of the text, grown until its tokens reach well past ``limit`` (a cut mid-word changes
    only the tokens next to the cut): a large corpus passed as --eval_data costs what its first
    tokens cost, not minutes and gigabytes for the whole file."""
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(model if model is not None else genai_model(model_dir))
    if limit is None:
        return [int(t) for t in tokenizer.encode(text)]
    chars = max(4096, 8 * limit)
    while True:
        tokens = tokenizer.encode(text[:chars])
        if chars >= len(text) or len(tokens) >= limit + _CUT_MARGIN_TOKENS:
            return [int(t) for t in tokens[:limit]]
        chars *= 4


_CUT_MARGIN_TOKENS = 64  # tokens past the limit that a prefix must reach (its cut is that far away)


def logits(model: Any, tokens: list[int], min_cache: int = 0) -> np.ndarray:
    """Logits for every position of ``tokens`` from an empty KV cache: shape [len, vocab], fp32.
    (onnxruntime-genai returns the whole prefill's logits, as onnxruntime computes them; a graph built
    with prune_lm_head returns the last position's only, so it is fed a token at a time.)
    ``min_cache``: the model's ``kv_floor``."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max(len(tokens) + 1, min_cache))
    generator = og.Generator(model, params)
    generator.append_tokens(tokens)
    out = np.asarray(generator.get_output("logits"))
    out = out.reshape(-1, out.shape[-1])
    if len(out) < len(tokens):  # a pruned lm_head (the last position's logits only): a token at a time
        generator = og.Generator(model, params)
        rows = []
        for token in tokens:
            generator.append_tokens([token])
            rows.append(np.asarray(generator.get_output("logits")).reshape(-1, out.shape[-1])[-1])
        out = np.stack(rows)
    return out[-len(tokens):].astype(np.float32, copy=False)


def perplexity(model: Any, tokens: list[int], chunk: int, on_chunk: Callable[[float], None] | None = None,
               min_cache: int = 0) -> tuple[float, list[int]]:
    """exp(mean next-token NLL) over consecutive chunks, each from an empty cache, and the
    model's top-1 prediction at every scored position (what parity with a reference compares)."""
    nll, predictions = 0.0, []
    for start in range(0, len(tokens) - 1, chunk):
        if on_chunk:
            on_chunk(start / len(tokens))
        piece = tokens[start : start + chunk]
        if len(piece) < 2:
            break
        scores = logits(model, piece, min_cache)[:-1]
        nll += _nll(scores, piece[1:])
        predictions += scores.argmax(-1).tolist()
    return float(np.exp(nll / len(predictions))), predictions


def _nll(logits_: np.ndarray, targets: list[int]) -> float:
    """Summed -log softmax(logits)[target]. torch's logsumexp over the vocabulary (2 threads:
    0.08 s for 511 x 49152) instead of numpy's single-threaded exp (0.97 s)."""
    import torch

    x = torch.from_numpy(logits_)
    picked = x[torch.arange(len(targets)), torch.as_tensor(targets)]
    return float((torch.logsumexp(x, dim=-1) - picked).double().sum())


def has_chat_template(model_dir: Path) -> bool:
    """Whether the model folder carries a chat template (``chat_template.jinja``, or the tokenizer config's
    ``chat_template``). A base model has none: it is prompted with the plain text, which is how it is used
    (onnxruntime-genai's apply_chat_template raises 'Empty chat template' on it)."""
    if (model_dir / "chat_template.jinja").is_file():
        return True
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("chat_template"))


def generation_timing(model_dir: Path, prompt: str, new_tokens: int, provider: str = "cpu",
                      model: Any = None) -> dict[str, object]:
    """Greedy generation of ``new_tokens`` for ``prompt`` (chat-formatted, if the model has a chat
    template): prefill ms, decode tokens/s (after the first token), and the text (after one warm-up run)."""
    import onnxruntime_genai as og

    model = model if model is not None else genai_model(model_dir, provider)
    tokenizer = og.Tokenizer(model)
    if has_chat_template(model_dir):
        prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": prompt}]),
                                               add_generation_prompt=True)
    ids = tokenizer.encode(prompt)
    if (context := context_length(model_dir)) is not None:  # a short-context model: as many as fit
        new_tokens = min(new_tokens, context - len(ids))
        if new_tokens < 1:
            from grove.errors import InvalidRequest

            raise InvalidRequest(f"the model's context ({context} tokens) cannot hold the timing prompt "
                                 f"({len(ids)} tokens) and one generated token")
    from grove.timing import timed_alone

    floor = kv_floor(model_dir)
    with timed_alone(f"{new_tokens} generated tokens") as load:
        _generate(og, model, ids, min(4, new_tokens), floor)  # warm-up: first-run allocations
        prefill_s, decode_s, out = _generate(og, model, ids, new_tokens, floor)
    decoded = max(len(out) - 1, 1)
    return {
        "prompt_tokens": len(ids),
        "prefill_ms": round(prefill_s * 1000, 2),
        "decode_tok_s": round(decoded / decode_s, 2) if decode_s > 0 else None,
        "generated_tokens": len(out),
        "cpu_busy_elsewhere": load["cpu_busy_elsewhere"],  # other processes' share of the CPUs meanwhile
        "huge_pages": load["huge_pages"],  # this process had memory on transparent huge pages
        # The token budget can end inside a multi-byte character: no trailing replacement mark.
        "sample": tokenizer.decode(out).rstrip("\ufffd"),
    }


def _generate(og: Any, model: object, ids: Any, n: int, min_cache: int) -> tuple[float, float, list[int]]:
    params = og.GeneratorParams(model)
    # A fixed token count, so that timings compare across models: min_length keeps an end-of-text
    # token from stopping it early, and the loop stops at n (max_length may be more: kv_floor).
    params.set_search_options(max_length=max(len(ids) + n, min_cache), min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    out = [int(gen.get_next_tokens()[0])]
    t1 = time.perf_counter()
    while len(out) < n and not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return t1 - t0, time.perf_counter() - t1, out

