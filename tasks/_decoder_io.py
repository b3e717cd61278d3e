"""Running genai decoder folders: onnxruntime sessions for teacher-forced logits (perplexity,
parity) and onnxruntime-genai for generation timings. Shared by evaluate and the tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
import json
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import onnxruntime as ort

__all__ = ["BUILTIN_TEXT", "generation_timing", "genai_model", "logits", "model_size", "perplexity", "read_text",
           "session", "text_sha256", "tokenize", "top1_agreement"]

BUILTIN_TEXT = "builtin:GPL-3"
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}


def read_text(source: str) -> str:
    """'builtin:GPL-3' (the GNU GPL v3 text shipped with Grove), a local path, or an fsspec URI."""
    if source == BUILTIN_TEXT:
        return (resources.files("grove") / "data" / "GPL-3.txt").read_text(encoding="utf-8")
    import fsspec

    with fsspec.open(source, "r", encoding="utf-8") as f:
        return str(f.read())


def text_sha256(source: str) -> str:
    return hashlib.sha256(read_text(source).encode()).hexdigest()


def model_size(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("model.onnx*"))


def genai_model(model_dir: Path, provider: str = "cpu") -> Any:
    """An onnxruntime-genai model on ``provider`` (load once; tokenizing and timing share it)."""
    import onnxruntime_genai as og

    config = og.Config(str(model_dir))
    if provider != "cpu":
        config.clear_providers()
        config.append_provider(provider)
    return og.Model(config)


def tokenize(model_dir: Path, text: str, model: Any = None) -> list[int]:
    import onnxruntime_genai as og

    tokenizer = og.Tokenizer(model if model is not None else genai_model(model_dir))
    return [int(t) for t in tokenizer.encode(text)]


def session(model_dir: Path, provider: str = "cpu") -> ort.InferenceSession:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=[_PROVIDERS[provider]])


def logits(sess: ort.InferenceSession, tokens: list[int]) -> np.ndarray:
    """Logits for every position of ``tokens`` from an empty KV cache: shape [len, vocab], fp32."""
    feeds: dict[str, np.ndarray] = {}
    head_size = _head_size(sess)
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.asarray([tokens], dtype=np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, len(tokens)), dtype=np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(len(tokens), dtype=np.int64)[None, :]
        elif inp.name.startswith("past_key_values"):
            dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
            feeds[inp.name] = np.zeros((1, inp.shape[1], 0, head_size), dtype=dtype)
        else:
            raise ValueError(f"unexpected decoder input {inp.name}")
    (out,) = sess.run(["logits"], feeds)
    return np.asarray(out[0], dtype=np.float32)


def _head_size(sess: ort.InferenceSession) -> int:
    # The builder leaves the last KV dimension symbolic ("kv_cache_dim"); the present
    # outputs or genai_config.json carry it. The model path is not on the session, so read
    # the static dimension from the graph when there is one, else from the config beside it.
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values") and isinstance(inp.shape[3], int):
            return int(inp.shape[3])
    config_path = Path(sess._model_path).with_name("genai_config.json")  # noqa: SLF001
    return int(json.loads(config_path.read_text())["model"]["decoder"]["head_size"])


def perplexity(sess: ort.InferenceSession, tokens: list[int], chunk: int,
               on_chunk: Callable[[float], None] | None = None) -> float:
    """exp(mean next-token NLL) over consecutive chunks, each from an empty cache."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, chunk):
        if on_chunk:
            on_chunk(start / len(tokens))
        piece = tokens[start : start + chunk]
        if len(piece) < 2:
            break
        logp = _log_softmax(logits(sess, piece)[:-1])
        targets = np.asarray(piece[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return float(np.exp(nll / count))


def top1_agreement(a: ort.InferenceSession, b: ort.InferenceSession, prompts: list[list[int]]) -> float:
    """Fraction of positions where both models predict the same next token."""
    same = total = 0
    for tokens in prompts:
        pa, pb = logits(a, tokens).argmax(-1), logits(b, tokens).argmax(-1)
        same += int((pa == pb).sum())
        total += len(tokens)
    return same / total


def generation_timing(model_dir: Path, prompt: str, new_tokens: int, provider: str = "cpu",
                      model: Any = None) -> dict[str, object]:
    """Greedy generation of ``new_tokens`` for the chat-formatted ``prompt``: prefill ms,
    decode tokens/s (after the first token), and the text (after one warm-up run)."""
    import onnxruntime_genai as og

    model = model if model is not None else genai_model(model_dir, provider)
    tokenizer = og.Tokenizer(model)
    chat = json.dumps([{"role": "user", "content": prompt}])
    ids = tokenizer.encode(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    _generate(og, model, ids, min(4, new_tokens))  # warm-up: first-run allocations
    prefill_s, decode_s, out = _generate(og, model, ids, new_tokens)
    decoded = max(len(out) - 1, 1)
    return {
        "prompt_tokens": len(ids),
        "prefill_ms": round(prefill_s * 1000, 2),
        "decode_tok_s": round(decoded / decode_s, 2) if decode_s > 0 else None,
        "generated_tokens": len(out),
        "sample": tokenizer.decode(out),
    }


def _generate(og: object, model: object, ids: object, n: int) -> tuple[float, float, list[int]]:
    params = og.GeneratorParams(model)  # type: ignore[attr-defined]
    # min_length = max_length: a fixed token count, so timings compare across models
    params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)  # type: ignore[attr-defined]
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    out = [int(gen.get_next_tokens()[0])]
    t1 = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return t1 - t0, time.perf_counter() - t1, out


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
