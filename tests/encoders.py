"""What the encoder tests share: the parity bars measured on these models, the tiny classifiers, and
the fixtures (a store per test module; the real all-MiniLM-L6-v2 and a tiny BERT classifier, exported
and fused once per module), which tests/tasks/conftest.py and tests/flows/conftest.py bring in (not the
root conftest: these import Prefect, whose settings must be read after the session's server is up)."""


from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from grove.artifacts import Artifact
from grove.tasks import _encoder_io as eio
from tests import tiny_models

# The nodes import Prefect, whose settings must be read after the session's server is up (conftest's
# pytest_configure), and the conftests that bring these fixtures in load before it: imported in them.

# Mean cosine of the ONNX sentence embedding vs SentenceTransformer.encode() on PARITY_TEXTS.
FP32_MIN_COSINE = 0.9999  # measured 1.00000 (max abs diff ~1e-7)
FP16_MIN_COSINE = 0.999  # measured 1.00000 (max abs diff ~1e-4)
INT8_MIN_COSINE = 0.985  # measured 0.9927 (min 0.989) with the default: dynamic, per-channel
# Tiny random classifiers vs PyTorch logits, measured on 64 GPL-3 paragraphs for all three families:
TINY_INT8_MIN_TOP1 = 0.75  # measured 1.0
TINY_INT8_MAX_ABS = 0.05  # logits, measured 0.006-0.013 (MPNet with its positions dropped: 0.52)
TINY_FP16_MAX_ABS = 5e-3  # measured 3.4e-4 to 3.7e-4 (fp32 graph: 2-3e-7)
# Static QDQ MinMax int8 of the tiny BERT on 48 GPL-3 paragraphs it was not calibrated on: measured top-1
# 1.0 vs PyTorch (also for RoBERTa, DistilBERT and QOperator), logits cosine 0.996 vs the fp32 graph.
TINY_STATIC_INT8_MIN_TOP1 = 0.9
# The model nodes of the encoder flow: all of them Cached on an identical rerun.
ENCODER_NODES = {"download-model", "capture-encoder", "optimize-graph", "check-parity", "quantize-int8",
                 "evaluate-encoder", "package-encoder"}


def _minilm() -> Path:
    return tiny_models.minilm_dir()


@pytest.fixture(scope="module")
def enc_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("encoder-store"))


@pytest.fixture(scope="module")
def minilm(enc_store: str) -> dict[str, Artifact]:
    from grove.tasks._sources import resolve
    from grove.tasks.capture_encoder import CaptureEncoderConfig, capture_encoder
    from grove.tasks.download_model import DownloadConfig, download_model
    from grove.tasks.optimize_graph import GraphConfig, optimize_graph

    hf = download_model.fn(resolve(str(_minilm())), DownloadConfig(), enc_store)
    captured = capture_encoder.fn(hf, CaptureEncoderConfig())
    fp32 = optimize_graph.fn(captured, GraphConfig())
    return {"hf": hf, "captured": captured, "fp32": fp32}


def _dir(artifact: Artifact) -> Path:
    from grove.node import store_for

    return store_for(artifact.store).fetch(artifact.node, artifact.digest)


def _tiny_classifier(family: str, folder: Path, *, per_token: bool = False) -> Path:
    return tiny_models.build_encoder(family, folder, head="token" if per_token else "sequence")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, enc_store: str) -> dict[str, object]:
    """The tiny random BERT sequence classifier, exported (dynamo) and fused once for the tests below."""
    from grove.tasks._sources import resolve
    from grove.tasks.capture_encoder import CaptureEncoderConfig, capture_encoder
    from grove.tasks.download_model import DownloadConfig, download_model
    from grove.tasks.optimize_graph import GraphConfig, optimize_graph

    folder = _tiny_classifier("bert", tmp_path_factory.mktemp("tiny-bert") / "bert")
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
    fp32 = optimize_graph.fn(capture_encoder.fn(hf, CaptureEncoderConfig(task="text-classification")), GraphConfig())
    return {"folder": folder, "hf": hf, "fp32": fp32}


def _labelled_files(folder: Path, out: Path) -> tuple[Path, Path, float]:
    """A CSV (label ids) and a JSONL (id2label names) of the same rows, a third of them labelled
    against PyTorch's prediction; returns both and the accuracy PyTorch itself gets on them."""
    import csv

    texts = ['A row with "quotes", commas, and a\nline break, to exercise CSV quoting.']
    texts += eio.read_lines("builtin:GPL-3", 40)  # 41 rows: two batches of evaluate's 32
    predicted = _pytorch_top1(folder, texts)
    labels = [int(p) if i % 3 else (int(p) + 1) % 3 for i, p in enumerate(predicted)]
    id2label = json.loads((folder / "config.json").read_text())["id2label"]
    csv_path, jsonl_path = out / "labelled.csv", out / "labelled.jsonl"
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    jsonl_path.write_text("".join(json.dumps({"text": t, "label": id2label[str(y)]}) + "\n"
                                  for t, y in zip(texts, labels, strict=True)), encoding="utf-8")
    return csv_path, jsonl_path, float((predicted == np.asarray(labels)).mean())


def _pytorch_top1(folder: Path, texts: list[str]) -> np.ndarray:
    """What the PyTorch classifier predicts, tokenised exactly as the ONNX nodes tokenise."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    feeds = eio.encode(folder, texts, ["input_ids", "attention_mask", "token_type_ids"],
                       max_length=eio.max_tokens(folder, eio.tokenizer(folder)))  # the rows are not cut at 128
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy().argmax(-1)


def _as_parquet(csv_path: Path, class_names: list[str] | None = None, id2label: dict[str, str] | None = None) -> Path:
    """The CSV's rows as a hub dataset stores them (sst2's layout: sentence, int label, idx); with
    ``class_names``, the model's classes (``id2label``) numbered in that order and named in the
    schema's metadata, as the datasets library writes a ClassLabel."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(csv_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [int(r["label"]) for r in rows]
    if class_names is not None and id2label is not None:
        labels = [class_names.index(id2label[str(y)]) for y in labels]
    table = pa.table({"idx": list(range(len(rows))), "sentence": [r["text"] for r in rows], "label": labels})
    if class_names is None:
        path = csv_path.with_suffix(".parquet")
    else:
        features = {"label": {"names": class_names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
        path = csv_path.with_name("named.parquet")
    pq.write_table(table, path)
    return path
