"""Node ``evaluate-encoder``: latency (avg / p50 / p90 / p95 / p99 after warm-up), throughput
and size on disk of an ONNX encoder; with the Hugging Face folder as reference, the PyTorch fp32
latency measured in the same run, the embedding cosine (feature extraction) or top-1 agreement
(classifiers) vs PyTorch; with labelled data, accuracy (classifiers; entity F1 for a token
classifier's B-/I- tags) or STS Spearman (embedding models). Writes ``eval.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, MeasureConfig
from grove.node import RECIPE_CACHE, node_logger, report_progress, run_node
from grove.tasks import _encoder_io as eio
from grove.tasks._data_sources import LABEL_COLUMNS, is_table, table_label_names
from grove.tasks.architectures import encoder_spec

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

__all__ = ["EncoderEvalConfig", "entity_f1", "entity_spans", "evaluate_encoder", "latency_stats", "spearman"]


class EncoderEvalConfig(MeasureConfig):
    NODE = "evaluate-encoder"
    VERSION = 4  # 2: labelled data is validated (unknown labels and malformed rows are errors, not misses);
    # 3: a hub table's class ids are matched to the model's classes by name; token classifiers and
    # embedding models (sentence pairs with a similarity score) are scored; 4: says whether the
    # timing process had transparent huge pages
    batch_size: int = Field(1, ge=1, le=256, description="rows per timed call")
    sequence_length: int = Field(64, ge=4, le=512, description="tokens per row in the timed call (padded)")
    warmup: int = Field(10, ge=0, description="untimed calls first (allocations, thread pools)")
    repeat: int = Field(100, ge=5, description="timed calls")
    threads: int = Field(2, ge=1, le=256, description="onnxruntime intra-op threads (and torch threads)")
    labelled_data: str | None = Field(None, description="text classifiers: CSV, JSONL or Parquet with text,label; "
                                      "token classifiers: JSONL, Parquet or CoNLL with tokens,ner_tags; embedding "
                                      "models: sentence pairs with a similarity score")
    labelled_sha256: str = Field("", description="sha256 of labelled_data (part of the recipe)")
    labelled_samples: int | None = Field(None, ge=1, description="score the first N labelled rows or sentences "
                                         "(None: all)")


@task(name="evaluate-encoder", cache_policy=RECIPE_CACHE)
def evaluate_encoder(model: Artifact, config: EncoderEvalConfig, reference: Artifact | None = None) -> Artifact:
    """Measure ``model``; ``reference`` is the HF folder artifact (download-model) it came from."""
    parents = [model] if reference is None else [model, reference]
    return run_node(config, parents, model.store, _evaluate)


def _evaluate(inputs: list[Path], config: EncoderEvalConfig, out: Path) -> dict[str, object]:
    log = node_logger()
    model_dir = inputs[0]
    info = eio.encoder_info(model_dir)
    sess = eio.session(model_dir / "model.onnx", threads=config.threads, provider=config.provider)
    output = eio.primary_output(info)
    timed = eio.encode(model_dir, ["Grove measures latency on a fixed padded input. " * 40] * config.batch_size,
                       info.inputs, pad_to=config.sequence_length)
    stats = latency_stats(lambda: eio.run(sess, timed, output), config.warmup, config.repeat)
    metrics: dict[str, object] = {f"latency_ms_{k}": v for k, v in stats.items() if k not in _MACHINE_STATE}
    metrics["cpu_busy_elsewhere"], metrics["huge_pages"] = stats["busy"], stats["huge_pages"]
    avg = float(cast(float, stats["avg"]))  # always measured (None is only for "busy": unknown)
    metrics["throughput_rows_s"] = round(1000.0 * config.batch_size / avg, 2)
    metrics["size_mb"] = round((model_dir / "model.onnx").stat().st_size / 1e6, 2)
    log.info("latency %.2f ms avg (p90 %.2f) at batch %d x %d tokens, %d threads", stats["avg"], stats["p90"],
             config.batch_size, config.sequence_length, config.threads)
    if len(inputs) > 1:
        metrics.update(_vs_pytorch(inputs[1], model_dir, sess, info, timed, config))
        metrics["latency_vs_pytorch"] = round(avg / float(cast(float, metrics["pytorch_latency_ms_avg"])), 4)
    if config.labelled_data and info.task == "text-classification":
        metrics["accuracy"] = _accuracy(sess, model_dir, info, config.labelled_data, config.labelled_samples)
    elif config.labelled_data and info.task == "token-classification":
        metrics.update(_token_accuracy(sess, model_dir, info, config.labelled_data, config.labelled_samples))
    elif config.labelled_data:  # an embedding model: sentence pairs with a similarity score (STS)
        metrics["sts_spearman"] = _similarity(sess, model_dir, info, config.labelled_data, config.labelled_samples)
    metrics["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    return metrics


_MACHINE_STATE = ("busy", "huge_pages")  # latency_stats' keys that describe the machine, not the latency


def latency_stats(call: Callable[[], object], warmup: int, repeat: int) -> dict[str, float | bool | None]:
    """Milliseconds per call (avg, p50, p90, p95, p99) after ``warmup`` calls, timed in this machine's
    timing turn; ``busy`` is the share of CPU time other processes used meanwhile (None: unknown);
    ``huge_pages``: whether this process had memory on transparent huge pages (grove/timing.py)."""
    import numpy as np

    from grove.timing import timed_alone

    with timed_alone(f"{repeat} calls") as load:
        for _ in range(warmup):
            call()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000.0)
    ms = np.asarray(times)
    return {"avg": round(float(ms.mean()), 3), **{f"p{q}": round(float(np.percentile(ms, q)), 3)
                                                  for q in (50, 90, 95, 99)},
            "busy": load["cpu_busy_elsewhere"], "huge_pages": load["huge_pages"]}


def _vs_pytorch(hf_dir: Path, model_dir: Path, sess: object, info: eio.EncoderInfo,
                timed: dict[str, np.ndarray], config: EncoderEvalConfig) -> dict[str, object]:
    """PyTorch fp32 latency on the same input and threads, and closeness on fixed sentences."""
    import torch

    torch.set_num_threads(config.threads)
    module = _torch_model(hf_dir, info.task)
    as_torch = {k: torch.from_numpy(v) for k, v in timed.items() if k in info.inputs}
    with torch.inference_mode():
        stats = latency_stats(lambda: module(**as_torch), config.warmup, config.repeat)
        feeds = eio.encode(model_dir, eio.PARITY_TEXTS, info.inputs)
        result = module(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    onnx_out = eio.run(sess, feeds, eio.primary_output(info))
    metrics: dict[str, object] = {f"pytorch_latency_ms_{k}": v for k, v in stats.items() if k not in _MACHINE_STATE}
    metrics["pytorch_cpu_busy_elsewhere"] = stats["busy"]
    if info.task == "feature-extraction":
        hidden = result.last_hidden_state.numpy()
        want = _pool(hidden, feeds["attention_mask"], info.pooling) if info.pooling else hidden
        metrics["cosine_vs_pytorch"] = round(float(eio.cosine_rows(onnx_out, want, feeds["attention_mask"]).mean()), 5)
    else:
        agree = onnx_out.argmax(-1) == result.logits.numpy().argmax(-1)
        real = feeds["attention_mask"].astype(bool) if agree.ndim == 2 else slice(None)
        metrics["top1_vs_pytorch"] = round(float(agree[real].mean()), 4)
    return metrics


def _torch_model(hf_dir: Path, task_name: str):  # noqa: ANN202 - a transformers model
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = {"feature-extraction": AutoModel, "text-classification": AutoModelForSequenceClassification,
            "token-classification": AutoModelForTokenClassification}[task_name]
    return auto.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def _pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """sentence-transformers' pooling (``mode``: mean, cls or max), L2-normalised (cosine ignores
    the norm)."""
    import numpy as np

    weights = mask[..., None].astype(np.float32)
    if mode == "cls":
        pooled = hidden[:, 0]
    elif mode == "max":
        pooled = np.where(weights > 0, hidden, -1e9).max(1)
    else:
        pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def _first(rows: tuple[list, list], limit: int | None, what: str) -> tuple[list, list]:
    """The first ``limit`` labelled rows (all when None), said in the log when that is fewer, or when
    the data holds fewer rows than asked for (e.g. a hub split's first Parquet shard)."""
    if limit is None or limit >= len(rows[0]):
        if limit is not None and limit > len(rows[0]):
            node_logger().warning("--eval_samples %d asks for more labelled %s than the data holds: scoring all %d",
                                  limit, what, len(rows[0]))
        return rows
    node_logger().info("scoring the first %d of %d labelled %s (--eval_samples)", limit, len(rows[0]), what)
    return rows[0][:limit], rows[1][:limit]


def _accuracy(sess: object, model_dir: Path, info: eio.EncoderInfo, path: str, limit: int | None = None) -> float:
    """Top-1 accuracy on a CSV / JSONL / Parquet file of text,label rows (label: id or id2label name),
    each row cut at the model's longest input (its tokenizer's and position table's limit)."""
    config = json.loads((model_dir / "config.json").read_text())
    texts, raw = _first(eio.read_labelled(path), limit, "rows")
    names = table_label_names(path, LABEL_COLUMNS) if is_table(path) else None
    labels = eio.label_ids(raw, config.get("id2label", {}), path, names=names, log=node_logger())
    longest = eio.max_tokens(model_dir, eio.tokenizer(model_dir))  # as the model is used: not cut at 128
    correct = 0
    for start in range(0, len(texts), 32):
        feeds = eio.encode(model_dir, texts[start:start + 32], info.inputs, max_length=longest)
        predicted = eio.run(sess, feeds, "logits").argmax(-1)
        correct += int((predicted == labels[start:start + 32]).sum())
        done = min(start + 32, len(texts))
        report_progress(0.5 + 0.5 * done / len(texts), f"accuracy: {done}/{len(texts)} labelled rows")
    return round(correct / max(len(texts), 1), 4)


def _token_accuracy(sess: object, model_dir: Path, info: eio.EncoderInfo, path: str,
                    limit: int | None = None) -> dict[str, float]:
    """Word accuracy on labelled sentences (each word's tag predicted at its first sub-token, as
    token classifiers are trained and used) and, for a B-/I- tag set, entity F1 over conlleval's
    spans. Words past the model's longest input are not scored (the log says how many)."""
    import numpy as np

    from grove.errors import InvalidRequest

    log = node_logger()
    config = json.loads((model_dir / "config.json").read_text())
    id2label = {str(k): str(v) for k, v in config.get("id2label", {}).items()}
    sentences, raw = _first(eio.read_labelled_tokens(path), limit, "sentences")
    names = table_label_names(path, eio.TAG_COLUMNS) if is_table(path) else None
    flat = iter(eio.label_ids([t for tags in raw for t in tags], id2label, path, names=names, log=log))
    gold = [[next(flat) for _ in tags] for tags in raw]
    spec = encoder_spec(config.get("model_type"))
    tok = eio.tokenizer(model_dir, **({"add_prefix_space": True} if spec is not None and spec.prefix_space else {}))
    if not tok.is_fast:
        raise InvalidRequest(f"--eval_data for a token classifier needs a fast tokenizer (tokenizer.json) in "
                             f"{info.model_type}'s folder, to map words to sub-tokens")
    limit = eio.max_tokens(model_dir, tok)
    correct = scored = 0
    gold_tags: list[list[str]] = []
    predicted_tags: list[list[str]] = []
    for start in range(0, len(sentences), 32):
        batch = sentences[start:start + 32]
        enc = tok(batch, is_split_into_words=True, padding=True, truncation=True, max_length=limit, return_tensors="np")
        feeds = {name: np.asarray(enc[name], dtype=np.int64) if name in enc else
                 np.zeros_like(enc["input_ids"], dtype=np.int64) for name in info.inputs}
        logits = eio.run(sess, feeds, "logits")
        for row in range(len(batch)):
            first: dict[int, int] = {}
            for position, word in enumerate(enc.word_ids(row)):
                if word is not None:
                    first.setdefault(word, position)
            words = sorted(first)
            want = [gold[start + row][w] for w in words]
            got = [int(logits[row, first[w]].argmax()) for w in words]
            correct += sum(p == g for p, g in zip(got, want, strict=True))
            scored += len(words)
            gold_tags.append([id2label.get(str(i), str(i)) for i in want])
            predicted_tags.append([id2label.get(str(i), str(i)) for i in got])
        done = min(start + 32, len(sentences))
        report_progress(0.5 + 0.5 * done / len(sentences), f"accuracy: {done}/{len(sentences)} labelled sentences")
    total = sum(len(s) for s in sentences)
    if scored < total:
        log.info("%d of %d labelled words were not scored: past the model's %d tokens (or no sub-token)",
                 total - scored, total, limit)
    metrics = {"accuracy": round(correct / max(scored, 1), 4)}
    if any(name[:2] in ("B-", "I-") for name in id2label.values()):
        f1 = entity_f1(gold_tags, predicted_tags)
        if f1 is not None:
            metrics["entity_f1"] = round(f1, 4)
    return metrics


def _similarity(sess: object, model_dir: Path, info: eio.EncoderInfo, path: str, limit: int | None = None) -> float:
    """Spearman correlation between the embeddings' cosine and the gold similarity of scored
    sentence pairs (STS-B, SICK), as sentence-transformers' EmbeddingSimilarityEvaluator reports it."""
    import numpy as np

    from grove.errors import InvalidRequest

    if "sentence_embedding" not in info.outputs:
        raise InvalidRequest(f"--eval_data {path}: scoring similarity needs a sentence embedding, and this "
                             f"{info.model_type} folder has no sentence-transformers pooling (modules.json); "
                             "leave --eval_data out, or pass a sentence-transformers model")
    pairs, scores = _first(eio.read_scored_pairs(path), limit, "pairs")
    gold = np.asarray(scores)
    longest = eio.max_tokens(model_dir, eio.tokenizer(model_dir))

    def embed(texts: list[str]) -> np.ndarray:
        batches = (eio.encode(model_dir, texts[i:i + 32], info.inputs, max_length=longest)
                   for i in range(0, len(texts), 32))
        return np.concatenate([eio.run(sess, feeds, "sentence_embedding") for feeds in batches])

    sides = []
    for side in (0, 1):
        sides.append(embed([pair[side] for pair in pairs]))
        report_progress(0.5 + 0.25 * (side + 1), f"similarity: side {side + 1} of 2 embedded")
    return round(spearman(eio.cosine_rows(sides[0], sides[1]), gold), 4)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their average rank, as scipy's spearmanr)."""
    import numpy as np

    def ranks(x: np.ndarray) -> np.ndarray:
        values, inverse, counts = np.unique(np.asarray(x, dtype=np.float64), return_inverse=True, return_counts=True)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        return (first + (counts - 1) / 2.0)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """The entities of one sentence's IOB tags as (type, start, end) word spans, read as conlleval
    does: B- starts one, I- continues one of its type (or starts one after O or another type), E-
    and S- (IOBES) end one; any other tag is outside."""
    spans: set[tuple[str, int, int]] = set()
    kind: str | None = None
    start = 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-") if tag[1:2] == "-" else ("O", "", "")
        if kind is not None and (prefix in ("O", "B", "S") or typ != kind):
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "S") or (prefix in ("I", "E") and kind is None):
            kind, start = typ, i
        if prefix in ("E", "S") and kind is not None:
            spans.add((kind, start, i + 1))
            kind = None
    return spans


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> float | None:
    """Micro-averaged F1 of exact entity spans over sentences (None: no entity in either)."""
    want = {(n, *span) for n, tags in enumerate(gold) for span in entity_spans(tags)}
    got = {(n, *span) for n, tags in enumerate(predicted) for span in entity_spans(tags)}
    if not want and not got:
        return None
    hits = len(want & got)
    return 2 * hits / (len(want) + len(got))
