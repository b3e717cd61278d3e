"""The encoder nodes: the real all-MiniLM-L6-v2 at fp32 / int8 / fp16 against sentence-transformers,
tiny random classifiers of every encoder architecture against PyTorch, the parity failure path, static
int8, labelled-data accuracy, token classifiers, sentence embeddings, the TorchScript exporter and its
fallback. The flow over these nodes: tests/flows/test_encoder_flow.py; the data readers and metrics:
tests/tasks/test_encoder_data.py."""


from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from grove.artifacts import Artifact, recipe_digest
from grove.errors import InvalidRequest, ParityError
from grove.node import store_for
from grove.tasks import _encoder_io as eio
from grove.tasks._sources import resolve
from grove.tasks.architectures import ARCHITECTURES
from grove.tasks.capture_encoder import CaptureEncoderConfig, capture_encoder
from grove.tasks.check_parity import ParityConfig, check_parity
from grove.tasks.convert_fp16 import Fp16Config, convert_fp16
from grove.tasks.download_model import DownloadConfig, download_model
from grove.tasks.optimize_graph import GraphConfig, optimize_graph
from grove.tasks.quantize_int8 import Int8Config, quantize_int8
from tests import tiny_models
from tests.encoders import (
    FP16_MIN_COSINE,
    FP32_MIN_COSINE,
    INT8_MIN_COSINE,
    TINY_FP16_MAX_ABS,
    TINY_INT8_MAX_ABS,
    TINY_INT8_MIN_TOP1,
    TINY_STATIC_INT8_MIN_TOP1,
    _as_parquet,
    _dir,
    _labelled_files,
    _minilm,
    _pytorch_top1,
    _tiny_classifier,
)

_INPUTS_BERT = ["input_ids", "attention_mask", "token_type_ids"]

def _embed(artifact: Artifact, texts: list[str]) -> np.ndarray:
    folder = _dir(artifact)
    feeds = eio.encode(folder, texts, eio.encoder_info(folder).inputs)
    return eio.run(eio.session(folder / "model.onnx"), feeds, "sentence_embedding")


@pytest.mark.slow
def test_minilm_fp32_int8_fp16_match_sentence_transformers(minilm: dict[str, Artifact]) -> None:
    from sentence_transformers import SentenceTransformer

    texts = list(eio.PARITY_TEXTS)
    reference = SentenceTransformer(str(_minilm()), device="cpu").encode(texts)
    fp32 = minilm["fp32"]
    int8 = quantize_int8.fn(fp32, Int8Config.cpu())
    fp16 = convert_fp16.fn(fp32, Fp16Config())

    # Everything fused: nothing of the 6 layers is left as plain MatMul/Softmax/Erf; the 12
    # SkipLayerNormalizations are then written as Sum + LayerNormalization (faster on CPU).
    assert minilm["fp32"].metrics["fusions"] == {"EmbedLayerNormalization": 1, "Attention": 6, "BiasGelu": 6,
                                                 "SkipLayerNormalization": 12}
    ops = [n.op_type for n in onnx.load(str(_dir(fp32) / "model.onnx")).graph.node]
    assert (ops.count("Sum"), ops.count("LayerNormalization"), ops.count("SkipLayerNormalization")) == (12, 12, 0)
    assert minilm["fp32"].metrics["skip_layer_norm_split"] == 12
    for artifact, limit in ((fp32, FP32_MIN_COSINE), (int8, INT8_MIN_COSINE), (fp16, FP16_MIN_COSINE)):
        cosine = eio.cosine_rows(_embed(artifact, texts), reference)
        assert cosine.mean() >= limit, f"{artifact.node}: mean cosine {cosine.mean():.5f} < {limit}"
    assert check_parity.fn(int8, fp32, ParityConfig(precision="int8")).metrics["mean_cosine"] >= INT8_MIN_COSINE
    assert check_parity.fn(fp16, fp32, ParityConfig(precision="fp16")).metrics["mean_cosine"] >= FP16_MIN_COSINE
    assert (_dir(int8) / "model.onnx").stat().st_size < 0.3 * (_dir(fp32) / "model.onnx").stat().st_size


@pytest.mark.parametrize("family", sorted(m for m, spec in ARCHITECTURES.items() if spec.path == "encoder"))
def test_tiny_classifier_int8_and_fp16_agree_with_pytorch(family: str, tmp_path: Path, enc_store: str) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification

    folder = _tiny_classifier(family, tmp_path / family)
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
    fp32 = optimize_graph.fn(capture_encoder.fn(hf, CaptureEncoderConfig(task="text-classification")), GraphConfig())
    int8 = quantize_int8.fn(fp32, Int8Config.cpu())
    fp16 = convert_fp16.fn(fp32, Fp16Config())

    # One row past 64 tokens: past ModernBERT's local attention window (128 wide, 64 either side).
    texts = [*eio.PARITY_TEXTS, " ".join(eio.PARITY_TEXTS[:6])]
    feeds = eio.encode(folder, texts, eio.encoder_info(_dir(fp32)).inputs)
    assert feeds["attention_mask"].sum(-1).max() > 64
    with torch.no_grad():
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    logits = {a.node: eio.run(eio.session(_dir(a) / "model.onnx"), feeds, "logits") for a in (fp32, int8, fp16)}
    # MPNet's relative position bias, DeBERTa's disentangled terms and ModernBERT's rotary embedding
    # sit inside the attention, which onnxruntime's fuser does not match.
    unfused = family in ("mpnet", "deberta-v2", "modernbert")
    assert fp32.metrics["fusions"].get("Attention", 0) == (0 if unfused else 2)  # type: ignore[union-attr]
    assert np.abs(logits["optimize-graph"] - want).max() < 1e-4
    # ModernBERT's norms have no bias; the fusions still apply (a zero bias is added for the fuser).
    assert fp32.metrics["fusions"].get("SkipLayerNormalization", 0) > 0  # type: ignore[union-attr]
    assert np.abs(logits["quantize-int8"] - want).max() < TINY_INT8_MAX_ABS
    assert (logits["quantize-int8"].argmax(-1) == want.argmax(-1)).mean() >= TINY_INT8_MIN_TOP1
    assert np.abs(logits["convert-fp16"] - want).max() < TINY_FP16_MAX_ABS
    # The longest row Grove feeds fits the position table (RoBERTa's and MPNet's start after the padding id).
    longest = eio.encode(folder, ["grove " * 400], eio.encoder_info(_dir(fp32)).inputs,
                         max_length=eio.max_tokens(folder, eio.tokenizer(folder)))
    with torch.no_grad():
        want_long = model(**{k: torch.from_numpy(v) for k, v in longest.items()}).logits.numpy()
    assert np.abs(eio.run(eio.session(_dir(fp32) / "model.onnx"), longest, "logits") - want_long).max() < 1e-4
    parity = check_parity.fn(int8, fp32, ParityConfig(precision="int8"))
    assert parity.metrics["top1_agreement"] >= TINY_INT8_MIN_TOP1  # type: ignore[operator]
    assert 0 < parity.metrics["max_prob_diff"] < 0.1  # type: ignore[operator]
    strict = ParityConfig(precision="int8", max_prob_diff=parity.metrics["max_prob_diff"] / 2)  # type: ignore[operator]
    with pytest.raises(ParityError, match="max class-probability change"):
        check_parity.fn(int8, fp32, strict)


@pytest.mark.slow
def test_parity_catches_a_broken_transformation(minilm: dict[str, Artifact], tmp_path: Path, enc_store: str) -> None:
    import onnx
    from onnx import numpy_helper

    reference = minilm["fp32"]
    broken = tmp_path / "broken"
    shutil.copytree(_dir(reference), broken, ignore=shutil.ignore_patterns("manifest.json"))
    model = onnx.load(str(broken / "model.onnx"))
    weight = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)) if len(t.dims) == 2 else 0)
    weight.CopyFrom(numpy_helper.from_array(np.zeros(tuple(weight.dims), np.float32), weight.name))
    onnx.save(model, str(broken / "model.onnx"))
    store = store_for(enc_store)
    store.commit(broken, node="test-broken", node_version=1, digest="0" * 64, config={}, inputs=[], metrics={},
                 seconds=0.0)
    candidate = Artifact(node="test-broken", digest="0" * 64, store=store.uri)

    config = ParityConfig(precision="fp32")
    with pytest.raises(ParityError) as caught:
        check_parity.fn(candidate, reference, config)

    message = str(caught.value)
    assert "max abs diff" in message and "mean cosine" in message and "limit 0.001" in message
    assert "pass a lower" not in message, "this limit is fixed per precision: no flag to relax it"
    assert "fusions changed the outputs, which is a bug" in message, "the fix for the step that failed"
    assert "None" not in message, "an embedding's check names the figures it has, not a classifier's"
    assert caught.value.measured > caught.value.limit
    assert store.manifest("check-parity", recipe_digest(config, [candidate, reference])) is None  # nothing committed


@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_token_classifier_and_unsupported_architecture(family: str, tmp_path: Path, enc_store: str,
                                                       tiny_dir) -> None:  # noqa: ANN001
    import torch
    from transformers import AutoModelForTokenClassification

    from grove.errors import UnsupportedArchitecture

    folder = _tiny_classifier(family, tmp_path / f"{family}-ner", per_token=True)
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
    fp32 = optimize_graph.fn(capture_encoder.fn(hf, CaptureEncoderConfig(task="token-classification")), GraphConfig())
    parity = check_parity.fn(quantize_int8.fn(fp32, Int8Config.cpu()), fp32, ParityConfig(precision="int8"))
    feeds = eio.encode(folder, list(eio.PARITY_TEXTS), eio.encoder_info(_dir(fp32)).inputs)
    with torch.no_grad():
        want = AutoModelForTokenClassification.from_pretrained(folder).eval()(
            **{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    got = eio.run(eio.session(_dir(fp32) / "model.onnx"), feeds, "logits")
    real = feeds["attention_mask"].astype(bool)

    assert np.abs(got - want)[real].max() < 1e-4
    assert parity.metrics["top1_agreement"] >= TINY_INT8_MIN_TOP1  # type: ignore[operator]
    decoder = download_model.fn(resolve(str(tiny_dir("llama"))), DownloadConfig(), enc_store)
    with pytest.raises(UnsupportedArchitecture, match="bert, camembert, deberta-v2, distilbert, electra, modernbert, "
                       "mpnet, roberta, xlm-roberta"):
        capture_encoder.fn(decoder, CaptureEncoderConfig())


@pytest.mark.parametrize(("modules", "pooling"), [(["Pooling"], "mean"), (["Pooling", "Normalize"], "mean"),
                                                  (["Pooling", "Normalize"], "cls"), (["Pooling"], "max")])
def test_sentence_embedding_is_the_librarys_with_or_without_normalize(modules: list[str], pooling: str,
                                                                      tmp_path: Path, enc_store: str) -> None:
    """Before, every mean-pooled model was normalized: for one whose pipeline has no Normalize
    (many sentence-transformers models), the embedding's norm differed from the library's. CLS
    pooling (bge, mxbai) and max pooling were refused."""
    from sentence_transformers import SentenceTransformer

    folder = tiny_models.build_sentence_transformer(tmp_path / "st", modules, pooling=(pooling,))
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
    fp32 = capture_encoder.fn(hf, CaptureEncoderConfig())
    texts = list(eio.PARITY_TEXTS)
    want = SentenceTransformer(str(folder), device="cpu").encode(texts)
    got = eio.run(eio.session(_dir(fp32) / "model.onnx"), eio.encode(folder, texts, _INPUTS_BERT), "sentence_embedding")

    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    assert ("Normalize" in modules) == bool(np.allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-4))


def test_an_embedding_model_is_scored_on_sentence_pairs_similarity(tmp_path: Path, enc_store: str) -> None:
    """--eval_data for a sentence-transformers model: scored pairs (STS-B's sentence1, sentence2,
    label 0-5 in a CSV; sentence-transformers/stsb's score 0-1 in a table) give the Spearman
    correlation of the embeddings' cosine with the scores, as the library's own embeddings give it."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from grove.tasks.evaluate import fingerprint_text
    from grove.tasks.evaluate_encoder import EncoderEvalConfig, evaluate_encoder

    folder = tiny_models.build_sentence_transformer(tmp_path / "st", ["Pooling", "Normalize"])
    paragraphs = eio.read_lines("builtin:GPL-3", 61)
    pairs = list(zip(paragraphs[:-1], paragraphs[1:], strict=False))
    library = SentenceTransformer(str(folder), device="cpu")
    cosine = (library.encode([a for a, _ in pairs]) * library.encode([b for _, b in pairs])).sum(-1)
    noise = np.random.default_rng(0).normal(0, cosine.std(), len(pairs))
    gold = np.round(5 * (cosine + noise - (cosine + noise).min()) / np.ptp(cosine + noise), 2)  # 0-5, as STS-B
    expected = float(spearmanr(cosine, gold).statistic)
    assert 0.3 < expected < 0.95  # the scores follow the model, not exactly
    csv_path = tmp_path / "stsb.csv"
    with open(csv_path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("sentence1", "sentence2", "label"),
                                 *((a, b, g) for (a, b), g in zip(pairs, gold, strict=False))])
    table = tmp_path / "stsb.parquet"
    pq.write_table(pa.table({"sentence1": [a for a, _ in pairs], "sentence2": [b for _, b in pairs],
                             "score": [float(g) / 5 for g in gold]}), table)
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
    fp32 = optimize_graph.fn(capture_encoder.fn(hf, CaptureEncoderConfig()), GraphConfig())
    for path in (csv_path, table):
        config = EncoderEvalConfig(labelled_data=str(path), labelled_sha256=fingerprint_text(str(path)), warmup=0,
                                   repeat=5)
        assert evaluate_encoder.fn(fp32, config).metrics["sts_spearman"] == pytest.approx(expected, abs=1e-3), path
    (tmp_path / "single.csv").write_text("text,label\nonly one sentence,3.5\n")
    (tmp_path / "words.csv").write_text("sentence1,sentence2,label\na,b,similar\n")
    for name, problem in (("single.csv", "these rows have one text each"),
                          ("words.csv", "row 1's score 'similar' is not a number")):
        with pytest.raises(InvalidRequest, match=f"an embedding model's labelled data is sentence pairs with a "
                           rf"similarity score \(sentence1, sentence2 .*\); {problem}"):
            eio.read_scored_pairs(str(tmp_path / name))


def test_a_sentence_transformers_module_the_graph_does_not_compute_is_refused(tmp_path: Path, enc_store: str) -> None:
    folder = tiny_models.build_sentence_transformer(tmp_path / "st", ["Pooling", "Dense"])
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
    with pytest.raises(InvalidRequest, match=r"module\(s\) \['sentence_transformers.models.Dense'\] are not supported"):
        capture_encoder.fn(hf, CaptureEncoderConfig())
    for modes in (("lasttoken",), ("mean", "max")):  # a mode the graph does not compute; two modes concatenated
        folder = tiny_models.build_sentence_transformer(tmp_path / "-".join(modes), ["Pooling"], pooling=modes)
        hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
        with pytest.raises(InvalidRequest, match=r"sentence-transformers pooling \[.*\] is not supported: Grove's "
                           "graph computes one of pooling_mode_mean_tokens, pooling_mode_cls_token"):
            capture_encoder.fn(hf, CaptureEncoderConfig())


def test_static_int8_qdq_minmax_tiny_bert(tiny_bert: dict[str, object]) -> None:
    fp32 = tiny_bert["fp32"]
    assert isinstance(fp32, Artifact)
    int8 = quantize_int8.fn(fp32, Int8Config(mode="static", quant_format="QDQ", calibrate_method="MinMax",
                                             calibration_samples=16))
    ops = int8.metrics["quantized_ops"]
    assert isinstance(ops, dict) and ops.get("QuantizeLinear", 0) > 0 and ops.get("DequantizeLinear", 0) > 0

    texts = eio.read_lines("builtin:GPL-3", 64)[16:]  # paragraphs the calibration (the first 16) did not see
    folder = _dir(int8)
    sess = eio.session(folder / "model.onnx")  # loads and runs in onnxruntime
    longest = eio.max_tokens(folder, eio.tokenizer(folder))  # as _pytorch_top1 tokenises
    got = eio.run(sess, eio.encode(folder, texts, eio.encoder_info(folder).inputs, max_length=longest),
                  "logits").argmax(-1)
    top1 = float((got == _pytorch_top1(tiny_bert["folder"], texts)).mean())  # type: ignore[arg-type]
    assert top1 >= TINY_STATIC_INT8_MIN_TOP1, f"static QDQ int8 top-1 vs PyTorch {top1:.3f}"
    parity = check_parity.fn(int8, fp32, ParityConfig(precision="int8"))
    assert parity.metrics["top1_agreement"] >= TINY_STATIC_INT8_MIN_TOP1  # type: ignore[operator]


def test_int8_exclusions_must_name_what_the_graph_has(tiny_bert: dict[str, object]) -> None:
    """onnxruntime's quantizer ignores node names and op types it does not find, so a typo would
    quantize what the user meant to keep: refused with the names the graph does have."""
    fp32 = tiny_bert["fp32"]
    assert isinstance(fp32, Artifact)
    with pytest.raises(InvalidRequest, match="no node named not_a_node in the graph to quantize; its MatMul and Gemm"):
        quantize_int8.fn(fp32, Int8Config(nodes_to_exclude=["not_a_node"]))
    with pytest.raises(InvalidRequest, match="--op_types_to_quantize Conv: the graph has no such op"):
        quantize_int8.fn(fp32, Int8Config(op_types_to_quantize=["Conv"]))

    graph = onnx.load(str(_dir(fp32) / "model.onnx"), load_external_data=False).graph
    kept = sorted(n.name for n in graph.node if n.op_type == "MatMul")[0]
    int8 = quantize_int8.fn(fp32, Int8Config(nodes_to_exclude=[kept]))
    quantized = onnx.load(str(_dir(int8) / "model.onnx"), load_external_data=False).graph
    assert kept in {n.name for n in quantized.node if n.op_type == "MatMul"}, "the excluded node stays a float MatMul"


def test_labelled_accuracy_csv_and_jsonl_match_pytorch(tiny_bert: dict[str, object], tmp_path: Path) -> None:
    from grove.tasks.evaluate import fingerprint_text
    from grove.tasks.evaluate_encoder import EncoderEvalConfig, evaluate_encoder

    fp32 = tiny_bert["fp32"]
    assert isinstance(fp32, Artifact)
    csv_path, jsonl_path, expected = _labelled_files(tiny_bert["folder"], tmp_path)  # type: ignore[arg-type]
    assert 0.5 < expected < 0.8  # the labels really disagree with the model on a third of the rows
    parquet_path = _as_parquet(csv_path)
    id2label = json.loads((tiny_bert["folder"] / "config.json").read_text())["id2label"]  # type: ignore[operator]
    # a hub table numbering the model's classes in another order, its names in the metadata
    named_path = _as_parquet(csv_path, class_names=sorted(id2label.values(), reverse=True), id2label=id2label)
    for path in (csv_path, jsonl_path, parquet_path, named_path):
        config = EncoderEvalConfig(labelled_data=str(path), labelled_sha256=fingerprint_text(str(path)), warmup=0,
                                   repeat=5)
        metrics = evaluate_encoder.fn(fp32, config).metrics
        assert metrics["accuracy"] == round(expected, 4), path.name
    # --eval_samples 8: the first 8 rows only
    rows = [json.loads(line) for line in jsonl_path.read_text().splitlines()][:8]
    by_name = {name: int(i) for i, name in id2label.items()}
    predicted = _pytorch_top1(tiny_bert["folder"], [r["text"] for r in rows])  # type: ignore[arg-type]
    hits = predicted == [by_name[r["label"]] for r in rows]
    first = evaluate_encoder.fn(fp32, EncoderEvalConfig(labelled_data=str(jsonl_path), labelled_samples=8, warmup=0,
                                                        labelled_sha256=fingerprint_text(str(jsonl_path)), repeat=5))
    assert first.metrics["accuracy"] == round(float(hits.mean()), 4) != round(expected, 4)


def test_eval_samples_beyond_the_data_is_said(caplog: pytest.LogCaptureFixture) -> None:
    """Asking for more labelled rows than the data holds scores them all and says so; fewer: the first."""
    from grove.tasks.evaluate_encoder import _first

    rows = (["a", "b", "c"], ["0", "1", "0"])
    with caplog.at_level("INFO", logger="grove"):
        assert _first(rows, 5, "rows") == rows
        assert _first(rows, 2, "rows") == (["a", "b"], ["0", "1"])
        assert _first(rows, 3, "rows") == rows and _first(rows, None, "rows") == rows
    assert [r.getMessage() for r in caplog.records] == [
        "--eval_samples 5 asks for more labelled rows than the data holds: scoring all 3",
        "scoring the first 2 of 3 labelled rows (--eval_samples)"]


def test_sentence_pairs_are_scored_as_pairs(tiny_bert: dict[str, object], tmp_path: Path) -> None:
    """Labelled sentence pairs (paraphrase, NLI: GLUE's sentence1,sentence2 in a CSV; MNLI's
    premise,hypothesis in a hub table, its classes named in another order) are tokenised as pairs,
    as the model was trained, and scored as PyTorch scores them."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification

    from grove.tasks.evaluate import fingerprint_text
    from grove.tasks.evaluate_encoder import EncoderEvalConfig, evaluate_encoder

    folder = tiny_bert["folder"]
    assert isinstance(folder, Path)
    paragraphs = eio.read_lines("builtin:GPL-3", 41)
    pairs = list(zip(paragraphs[:-1], paragraphs[1:], strict=False))
    feeds = eio.encode(folder, pairs, _INPUTS_BERT, max_length=eio.max_tokens(folder, eio.tokenizer(folder)))
    assert (feeds["token_type_ids"] == 1).any()  # the second sentence is marked as such
    with torch.no_grad():
        predicted = AutoModelForSequenceClassification.from_pretrained(folder).eval()(
            **{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy().argmax(-1)
    labels = [int(p) if i % 3 else (int(p) + 1) % 3 for i, p in enumerate(predicted)]
    expected = round(float((predicted == np.asarray(labels)).mean()), 4)
    with open(tmp_path / "mrpc.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([("sentence1", "sentence2", "label"),
                                 *((a, b, y) for (a, b), y in zip(pairs, labels, strict=False))])
    names = ["LABEL_2", "LABEL_0", "LABEL_1"]  # the hub table's own class order
    table = pa.table({"premise": [a for a, _ in pairs], "hypothesis": [b for _, b in pairs],
                      "label": [names.index(f"LABEL_{y}") for y in labels]})
    features = {"label": {"names": names, "_type": "ClassLabel"}}
    pq.write_table(table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})}),
                   tmp_path / "mnli.parquet")
    fp32 = tiny_bert["fp32"]
    assert isinstance(fp32, Artifact)
    for path in (tmp_path / "mrpc.csv", tmp_path / "mnli.parquet"):
        config = EncoderEvalConfig(labelled_data=str(path), labelled_sha256=fingerprint_text(str(path)), warmup=0,
                                   repeat=5)
        assert evaluate_encoder.fn(fp32, config).metrics["accuracy"] == expected != 1.0, path.name


def test_token_classifier_accuracy_and_entity_f1_on_labelled_sentences(tmp_path: Path, enc_store: str) -> None:
    """Word accuracy (a word's tag read at its first sub-token) and entity F1 of a token classifier,
    from JSONL, a hub-layout Parquet table (whose own class order differs from the model's) and CoNLL
    text, against what PyTorch predicts for the same words; words past the model's 160 positions
    are not scored."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from grove.tasks.evaluate import fingerprint_text
    from grove.tasks.evaluate_encoder import EncoderEvalConfig, entity_f1, evaluate_encoder

    folder = _tiny_classifier("bert", tmp_path / "bert-ner", per_token=True)
    config = json.loads((folder / "config.json").read_text())
    id2label = {"0": "O", "1": "B-PER", "2": "I-PER"}
    config.update(id2label=id2label, label2id={v: int(k) for k, v in id2label.items()})
    (folder / "config.json").write_text(json.dumps(config))
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
    fp32 = optimize_graph.fn(capture_encoder.fn(hf, CaptureEncoderConfig(task="token-classification")), GraphConfig())

    sentences = [p.split()[:30] for p in eio.read_lines("builtin:GPL-3", 36)]
    sentences.append(" ".join(eio.read_lines("builtin:GPL-3", 8)).split()[:300])  # longer than 160 positions
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForTokenClassification.from_pretrained(folder).eval()
    predicted, scored = [], 0
    for words in sentences:
        enc = tok(words, is_split_into_words=True, truncation=True, max_length=160, return_tensors="pt")
        with torch.no_grad():
            top = model(**enc).logits[0].argmax(-1).tolist()
        first = {}
        for position, word in enumerate(enc.word_ids(0)):
            if word is not None:
                first.setdefault(word, position)
        predicted.append([top[first[w]] if w in first else None for w in range(len(words))])
        scored += len(first)
    assert scored < sum(len(s) for s in sentences)  # the long sentence is cut
    gold = [[(p + 1) % 3 if p is not None and i % 3 == 0 else (p if p is not None else 0) for i, p in enumerate(ps)]
            for ps in predicted]
    hits = sum(g == p for gs, ps in zip(gold, predicted, strict=False)
               for g, p in zip(gs, ps, strict=False) if p is not None)
    as_names = [[id2label[str(g)] for g in gs] for gs in gold]
    expected_f1 = entity_f1([[id2label[str(g)] for g, p in zip(gs, ps, strict=False) if p is not None]
                             for gs, ps in zip(gold, predicted, strict=False)],
                            [[id2label[str(p)] for p in ps if p is not None] for ps in predicted])
    assert 0.5 < hits / scored < 0.8 and expected_f1 is not None

    jsonl = tmp_path / "ner.jsonl"
    jsonl.write_text("".join(json.dumps({"tokens": w, "ner_tags": t}) + "\n"
                             for w, t in zip(sentences, as_names, strict=False)))
    hub_order = ["O", "I-PER", "B-PER"]  # the dataset's own ids for the model's classes
    table = tiny_models.hub_ner_table(tmp_path / "ner.parquet", sentences,
                                      [[hub_order.index(t) for t in ts] for ts in as_names], hub_order)
    conll = tmp_path / "ner.conll"
    conll.write_text("-DOCSTART- -X- O\n\n" + "\n\n".join("\n".join(f"{w} NN {t}" for w, t in zip(ws, ts, strict=False))
                                                          for ws, ts in zip(sentences, as_names, strict=False)) + "\n")
    for path in (jsonl, table, conll):
        metrics = evaluate_encoder.fn(fp32, EncoderEvalConfig(labelled_data=str(path), repeat=5, warmup=0,
                                                              labelled_sha256=fingerprint_text(str(path)))).metrics
        assert metrics["accuracy"] == round(hits / scored, 4), path.name
        assert metrics["entity_f1"] == round(expected_f1, 4), path.name


def test_torchscript_exporter_and_fallback(tiny_bert: dict[str, object], enc_store: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from grove.tasks.capture_encoder import ExportFailed

    hf, folder = tiny_bert["hf"], tiny_bert["folder"]
    assert isinstance(hf, Artifact) and isinstance(folder, Path)
    scripted = capture_encoder.fn(hf, CaptureEncoderConfig(task="text-classification", exporter="torchscript"))
    fused = optimize_graph.fn(scripted, GraphConfig())
    feeds = eio.encode(folder, list(eio.PARITY_TEXTS), eio.encoder_info(_dir(fused)).inputs)
    want = eio.run(eio.session(_dir(tiny_bert["fp32"]) / "model.onnx"), feeds, "logits")  # type: ignore[arg-type]
    assert scripted.metrics["exporter"] == "torchscript"
    assert fused.metrics["fusions"]["Attention"] == 2  # type: ignore[index]
    assert np.abs(eio.run(eio.session(_dir(fused) / "model.onnx"), feeds, "logits") - want).max() < 1e-4

    # 'auto' falls back to TorchScript when the dynamo exporter fails (simulated: it works here).
    real_export = torch.onnx.export

    def dynamo_fails(*args: object, **kwargs: object) -> object:
        if kwargs.get("dynamo"):
            raise RuntimeError("simulated dynamo failure")
        return real_export(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    fallback = capture_encoder.fn(hf, CaptureEncoderConfig(task="text-classification", example_length=12))
    assert fallback.metrics["exporter"] == "torchscript"

    def both_fail(*args: object, **kwargs: object) -> object:
        raise TypeError(f"simulated {'dynamo' if kwargs.get('dynamo') else 'torchscript'} failure")

    monkeypatch.setattr(torch.onnx, "export", both_fail)
    config = CaptureEncoderConfig(task="text-classification", example_length=10)
    with pytest.raises(ExportFailed) as caught:
        capture_encoder.fn(hf, config)
    message = str(caught.value)
    assert "dynamo exporter: TypeError: simulated dynamo failure" in message
    assert "torchscript exporter: TypeError: simulated torchscript failure" in message
    assert store_for(enc_store).manifest("capture-encoder", recipe_digest(config, [hf])) is None
