"""The encoder path: the real all-MiniLM-L6-v2 at fp32 / int8 / fp16 against
sentence-transformers, tiny random BERT / RoBERTa / DistilBERT classifiers against PyTorch,
the parity failure path, static int8, labelled-data accuracy, the TorchScript exporter and its
fallback, and the auto-opt-encoder flow through Prefect (first run and a fully cached rerun)."""

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
from tasks import _encoder_io as eio
from tasks._sources import resolve
from tasks.capture_encoder import CaptureEncoderConfig, capture_encoder
from tasks.check_parity import ParityConfig, check_parity
from tasks.convert_fp16 import Fp16Config, convert_fp16
from tasks.download_model import DownloadConfig, download_model
from tasks.optimize_graph import GraphConfig, optimize_graph
from tasks.quantize_int8 import Int8Config, quantize_int8
from tests import tiny_models

_INPUTS_BERT = ["input_ids", "attention_mask", "token_type_ids"]

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
    hf = download_model.fn(resolve(str(_minilm())), DownloadConfig(), enc_store)
    captured = capture_encoder.fn(hf, CaptureEncoderConfig())
    fp32 = optimize_graph.fn(captured, GraphConfig())
    return {"hf": hf, "captured": captured, "fp32": fp32}


def _dir(artifact: Artifact) -> Path:
    return store_for(artifact.store).fetch(artifact.node, artifact.digest)


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


def _tiny_classifier(family: str, folder: Path, *, per_token: bool = False) -> Path:
    return tiny_models.build_encoder(family, folder, head="token" if per_token else "sequence")


@pytest.mark.parametrize("family", ["bert", "electra", "roberta", "xlm-roberta", "camembert", "mpnet", "distilbert",
                                    "deberta-v2", "modernbert"])
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


@pytest.mark.slow
def test_auto_opt_encoder_flow_minilm_int8(minilm: dict[str, Artifact], tmp_path: Path, enc_store: str) -> None:
    from grove.request_encoder import EncoderOptRequest
    from grove.runner import run_auto_opt_state as run_encoder_state

    out = tmp_path / "minilm-int8"
    request = EncoderOptRequest(model_name_or_path=str(_minilm()), output_path=str(out), store=enc_store,
                                precision="int8", eval_repeat=20)
    state = run_encoder_state(request)

    assert state.is_completed()
    report = json.loads((out / "grove_report.json").read_text())
    assert set(report) >= {"model", "target", "metrics", "reference", "ratios", "lineage", "files"}
    assert {"model.onnx", "tokenizer.json", "vocab.txt", "grove_encoder.json", "grove_report.json"} <= set(
        report["files"]) <= {p.name for p in out.iterdir()}
    assert report["metrics"]["cosine_vs_pytorch"] >= INT8_MIN_COSINE
    assert report["metrics"]["parity"]["mean_cosine"] >= INT8_MIN_COSINE
    assert report["ratios"]["size_vs_reference"] < 0.3
    assert [s["node"] for s in report["lineage"]] == [
        "download-model", "capture-encoder", "optimize-graph", "quantize-int8", "evaluate-encoder", "evaluate-encoder",
        "check-parity", "check-parity"], "every node behind the output, upstream first, both parity checks"
    assert report["reference"]["parity"]["mean_cosine"] > 0.9999, "the fused fp32 graph vs the export"
    from grove.report import table_rows

    rows = {r["metric"]: r for r in table_rows(report)}
    assert rows["pytorch fp32 latency ms avg"]["ratio"] is None, "two timings of PyTorch: a drift, not a result"
    assert not [m for m in rows if m.startswith("pytorch latency ms p")], "PyTorch's percentiles: the JSON's"
    assert rows["latency vs pytorch"]["ratio"] == round(report["metrics"]["latency_vs_pytorch"]
                                                        / report["reference"]["latency_vs_pytorch"], 3)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "sentence_embedding" in [o.name for o in sess.get_outputs()]


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

    from tasks.evaluate import fingerprint_text
    from tasks.evaluate_encoder import EncoderEvalConfig, evaluate_encoder

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


def test_spearman_is_scipys() -> None:
    from scipy.stats import spearmanr

    from tasks.evaluate_encoder import spearman

    rng = np.random.default_rng(1)
    a = rng.integers(0, 6, 200).astype(float)  # many ties, as STS scores have
    b = a + rng.normal(0, 2, 200)
    assert spearman(a, b) == pytest.approx(float(spearmanr(a, b).statistic), abs=1e-12)
    assert spearman(b, -b) == pytest.approx(-1.0)


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


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, enc_store: str) -> dict[str, object]:
    """The tiny random BERT sequence classifier, exported (dynamo) and fused once for the tests below."""
    folder = _tiny_classifier("bert", tmp_path_factory.mktemp("tiny-bert") / "bert")
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), enc_store)
    fp32 = optimize_graph.fn(capture_encoder.fn(hf, CaptureEncoderConfig(task="text-classification")), GraphConfig())
    return {"folder": folder, "hf": hf, "fp32": fp32}


def _pytorch_top1(folder: Path, texts: list[str]) -> np.ndarray:
    """What the PyTorch classifier predicts, tokenised exactly as the ONNX nodes tokenise."""
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    feeds = eio.encode(folder, texts, ["input_ids", "attention_mask", "token_type_ids"],
                       max_length=eio.max_tokens(folder, eio.tokenizer(folder)))  # the rows are not cut at 128
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy().argmax(-1)


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


def test_labelled_accuracy_csv_and_jsonl_match_pytorch(tiny_bert: dict[str, object], tmp_path: Path) -> None:
    from tasks.evaluate import fingerprint_text
    from tasks.evaluate_encoder import EncoderEvalConfig, evaluate_encoder

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
    from tasks.evaluate_encoder import _first

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

    from tasks.evaluate import fingerprint_text
    from tasks.evaluate_encoder import EncoderEvalConfig, evaluate_encoder

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


def test_a_labelled_table_is_fingerprinted_by_its_labels_too(tmp_path: Path) -> None:
    """A relabelled Parquet table is a new recipe (its text alone is unchanged)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.evaluate import fingerprint_text

    texts = ["a first row of text", "a second row of text"]
    pq.write_table(pa.table({"text": texts, "label": [0, 1]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"text": texts, "label": [1, 1]}), tmp_path / "b.parquet")
    assert fingerprint_text(str(tmp_path / "a.parquet")) != fingerprint_text(str(tmp_path / "b.parquet"))
    assert eio.read_labelled(str(tmp_path / "a.parquet")) == (texts, ["0", "1"])


def test_a_text_table_reads_as_its_text_column_as_parquet_jsonl_or_csv(tmp_path: Path) -> None:
    """Perplexity text and calibration paragraphs from a dataset's rows: a Parquet, JSONL or CSV
    table reads as its text column's rows, one paragraph each (not as the file's JSON or CSV
    syntax); the recipe's fingerprint covers the file's every column."""
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.errors import InvalidRequest
    from tasks import _decoder_io as dio

    texts = [" ".join(p.split()) for p in eio.read_lines("builtin:GPL-3", 6)]
    texts[2] = 'a row with "quotes", a comma\nand a line break, longer than forty characters'
    pq.write_table(pa.table({"text": texts, "label": [0] * 6}), tmp_path / "t.parquet")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in texts))
    with (tmp_path / "t.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("label", "text"), *((0, t) for t in texts)])
    for name in ("t.parquet", "t.jsonl", "t.csv"):
        assert dio.read_text(str(tmp_path / name)) == "\n\n".join(texts), name
        assert eio.read_lines(str(tmp_path / name), 4) == [" ".join(t.split()) for t in texts[:4]], name
    before = dio.text_sha256(str(tmp_path / "t.jsonl"))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in texts))
    assert dio.text_sha256(str(tmp_path / "t.jsonl")) != before
    (tmp_path / "no-text.jsonl").write_text('{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(InvalidRequest, match=r"no-text.jsonl has no column named text or sentence or content \(its "
                       r"columns: sentence1, sentence2\)"):
        dio.read_text(str(tmp_path / "no-text.jsonl"))


def test_static_int8_calibrates_on_a_tables_sentence_pairs(tmp_path: Path) -> None:
    """A paraphrase / NLI table (GLUE MRPC's sentence1 + sentence2) calibrates on its pairs, as the
    model reads them, at most the limit asked for; a text table on its text rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.errors import InvalidRequest

    first, second = ["He said so.", "It rained.", None, "Fine."], ["So he said.", "Rain fell.", "x", "Good."]
    pq.write_table(pa.table({"sentence1": first, "sentence2": second, "label": [1, 1, 0, 1]}), tmp_path / "p.parquet")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"premise": a, "hypothesis": b}) + "\n"
                                              for a, b in zip(first, second, strict=False) if a))
    expected = [("He said so.", "So he said."), ("It rained.", "Rain fell."), ("Fine.", "Good.")]
    assert eio.calibration_texts(str(tmp_path / "p.parquet"), 32) == expected  # the row without a pair skipped
    assert eio.calibration_texts(str(tmp_path / "p.jsonl"), 2) == expected[:2]
    texts = eio.read_lines("builtin:GPL-3", 3)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    assert eio.calibration_texts(str(tmp_path / "t.jsonl"), 3) == texts
    pq.write_table(pa.table({"sentence1": [None], "sentence2": ["b"]}), tmp_path / "empty.parquet")
    with pytest.raises(InvalidRequest, match="has no row with both sentence1 and sentence2"):
        eio.calibration_texts(str(tmp_path / "empty.parquet"), 4)


@pytest.mark.parametrize(("reader", "name", "content", "expected"), [
    ("read_labelled", "wrong-header.csv", "txt,lab\nhello,0\n", "row 1 has no text or no label"),
    ("read_labelled", "empty.csv", "text,label\n", "no rows"),
    ("read_labelled", "missing-label.csv", "text,label\nfine,1\nno label here,\n", "row 2 has no text or no label"),
    ("read_labelled", "broken.jsonl", '{"text": "a", "label": 1}\nnot json\n', "line 2 is not JSON"),
    ("read_labelled_tokens", "short.jsonl", '{"tokens": ["a", "b"], "ner_tags": ["O"]}\n',
     "sentence 1 has 2 words and 1 tags"),
    ("read_labelled_tokens", "nolist.jsonl", '{"text": "a b", "label": "O"}\n',
     "sentence 1 has no list of words and list of tags"),
    ("read_labelled_tokens", "ner.csv", "tokens,ner_tags\na,O\n", "a CSV or JSON file holds no list of words per row"),
    ("read_labelled_tokens", "notag.conll", "Paris B-LOC\nis\n", "line 2 has a word and no tag"),
    ("read_labelled_tokens", "empty.conll", "-DOCSTART- O\n\n\n", "no sentences"),
])
def test_malformed_labelled_data_is_one_clear_error(reader: str, name: str, content: str, expected: str,
                                                    tmp_path: Path) -> None:
    """Text classifiers' rows and token classifiers' sentences: one error naming the problem and the formats."""
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidRequest, match=expected) as exc:
        getattr(eio, reader)(str(path))
    formats = {"read_labelled": "text,label header", "read_labelled_tokens": "a token classifier's labelled data is a"}
    assert formats[reader] in str(exc.value)


def test_a_table_without_its_columns_or_not_a_table_is_one_clear_error(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from grove.errors import InvalidRequest

    pq.write_table(pa.table({"review": ["good"], "stars": [5]}), tmp_path / "reviews.parquet")
    with pytest.raises(InvalidRequest, match="has no column named text or sentence or content \\(its columns: "
                       "review, stars\\); name a table's columns after the source, "
                       "SOURCE#text=<column>,label=<column>"):
        eio.read_labelled(str(tmp_path / "reviews.parquet"))
    (tmp_path / "fake.parquet").write_text("text,label\nhello,1\n")
    with pytest.raises(InvalidRequest, match="fake.parquet cannot be read as a Parquet table"):
        eio.read_labelled(str(tmp_path / "fake.parquet"))
    shards = tmp_path / "split"  # a split in shards (a hub dataset's Parquet copy): one file's fault is named
    shards.mkdir()
    pq.write_table(pa.table({"text": ["good"], "label": [1]}), shards / "0000.parquet")
    pq.write_table(pa.table({"review": ["bad"], "stars": [1]}), shards / "0001.parquet")
    with pytest.raises(InvalidRequest, match=r"split/\*.parquet: its files do not have the same columns"):
        eio.read_labelled(str(shards / "*.parquet"))
    (shards / "0001.parquet").write_text("not parquet")
    with pytest.raises(InvalidRequest, match="0001.parquet cannot be read as a Parquet table"):
        eio.read_labelled(str(shards / "*.parquet"))
    with pytest.raises(InvalidRequest, match=r"test-\*.parquet matches no file; check the folder and the pattern"):
        eio.read_labelled(str(shards / "test-*.parquet"))


def test_a_tables_columns_are_named_after_the_source(tmp_path: Path) -> None:
    """``#text=<column>[+<column>],label=<column>`` (what an Olive config's input_cols / label_col
    become) reads columns of any name, in CSV, JSON lines and Parquet, for every reader; a named
    column the table lacks is an error listing its columns, never a silent fallback to another."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks import _decoder_io as dio

    reviews = {"review": ["A quiet film about two brothers who run a farm together.", "Dull and long."],
               "stars": ["5", "1"], "label": ["decoy", "decoy"]}  # a label column the suffix must not pick
    (tmp_path / "reviews.csv").write_text("review,stars,label\n" + "".join(
        f'"{r}",{s},{d}\n' for r, s, d in zip(*reviews.values(), strict=True)))
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(dict(zip(reviews, row, strict=True))) + "\n"
                                                    for row in zip(*reviews.values(), strict=True)))
    pq.write_table(pa.table(reviews), tmp_path / "reviews.parquet")
    for suffix in ("csv", "jsonl", "parquet"):
        source = f"{tmp_path / 'reviews'}.{suffix}#text=review,label=stars"
        assert eio.read_labelled(source) == (reviews["review"], ["5", "1"]), suffix
        with pytest.raises(InvalidRequest, match=r"has no column named rating \(its columns: review, stars, label\)"):
            eio.read_labelled(f"{tmp_path / 'reviews'}.{suffix}#text=review,label=rating")
        assert dio.text_sha256(source) == dio.text_sha256(f"{tmp_path / 'reviews'}.{suffix}")

    nli = {"premise": ["The committee met on Tuesday to discuss the new budget for the library.",
                       "Two children are playing football in a park near the old railway station."],
           "hypothesis": ["The library's budget was discussed.", "Nobody is outside."], "gold": [0, 2]}
    pq.write_table(pa.table(nli), tmp_path / "nli.parquet")
    pairs = list(zip(nli["premise"], nli["hypothesis"], strict=True))
    assert eio.read_labelled(f"{tmp_path / 'nli.parquet'}#text=premise+hypothesis,label=gold") == (pairs, ["0", "2"])
    assert eio.read_scored_pairs(f"{tmp_path / 'nli.parquet'}#text=premise+hypothesis,label=gold") == (pairs, [0, 2])
    # static int8 calibration: one named column (its rows as paragraphs), or a named pair
    assert eio.calibration_texts(f"{tmp_path / 'nli.parquet'}#text=premise", 8, "--calibration_data") == nli["premise"]
    assert eio.calibration_texts(f"{tmp_path / 'nli.parquet'}#text=premise+hypothesis", 8) == pairs
    with pytest.raises(InvalidRequest, match="has no column named hypo"):
        eio.calibration_texts(f"{tmp_path / 'nli.parquet'}#text=premise+hypo", 8)
    # a decoder's perplexity text: the named column's rows joined by blank lines
    assert dio.read_text(f"{tmp_path / 'nli.parquet'}#text=hypothesis,label=gold") == "\n\n".join(nli["hypothesis"])
    with pytest.raises(InvalidRequest, match="read from one column of a .parquet, .jsonl or .csv table"):
        dio.read_text(f"{tmp_path / 'notes.txt'}#text=body")
    # a token classifier's words and tags
    (tmp_path / "ner.jsonl").write_text(json.dumps({"w": ["Ada", "codes"], "t": ["B-PER", "O"], "tags": ["x", "y"]}))
    assert eio.read_labelled_tokens(f"{tmp_path / 'ner.jsonl'}#text=w,label=t") == ([["Ada", "codes"]],
                                                                                   [["B-PER", "O"]])
    with pytest.raises(InvalidRequest, match="has no column named words_"):
        eio.read_labelled_tokens(f"{tmp_path / 'ner.jsonl'}#text=words_,label=t")

    assert dio.split_columns("data/run#3/dev.csv") == ("data/run#3/dev.csv", dio.Columns())  # no suffix: a path
    with pytest.raises(InvalidRequest, match="text= names 3 columns; Grove reads one text or a sentence pair"):
        dio.split_columns("a.csv#text=x+y+z")
    with pytest.raises(InvalidRequest, match="label= is given twice"):
        dio.split_columns("a.csv#label=x,label=y")


def test_a_spreadsheet_csv_with_a_byte_order_mark_reads(tmp_path: Path) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("text,label\r\n\"one, two\",1\r\nthree,0\r\n".encode("utf-8-sig"))
    assert eio.read_labelled(str(path)) == (["one, two", "three"], ["1", "0"])


def test_labels_are_the_model_classes_by_id_or_name() -> None:
    from grove.errors import InvalidRequest

    id2label = {"0": "negative", "1": "neutral", "2": "positive"}
    assert eio.label_ids(["positive", "0", "neutral", "2"], id2label, "f.csv") == [2, 0, 1, 2]
    with pytest.raises(InvalidRequest, match="label\\(s\\) 3, NEGATIVE are not among this model's 3 classes") as exc:
        eio.label_ids(["negative", "3", "NEGATIVE"], id2label, "f.csv")
    assert "ids 0-2 or names negative, neutral, positive" in str(exc.value)


def test_table_class_names_match_the_model_classes_by_name(caplog: pytest.LogCaptureFixture) -> None:
    """A hub dataset numbers its classes in its own order (its ClassLabel names, in the Parquet
    schema's metadata); a model may number the same classes differently: matched by name."""
    import logging

    id2label = {"0": "O", "1": "B-PER", "2": "I-PER"}
    assert eio.label_ids(["0", "1", "2"], id2label, "t.parquet", names=["o", "I-PER", "B-PER"]) == [0, 2, 1]
    # Names the model does not have: the ids are taken as the model's, and the log says so.
    with caplog.at_level(logging.WARNING, logger="test-names"):
        ids = eio.label_ids(["0", "1"], id2label, "t.parquet", names=["O", "B-ORG"],
                            log=logging.getLogger("test-names"))
    assert ids == [0, 1]
    assert "names its classes B-ORG, O, and this model's are O, B-PER, I-PER" in caplog.text


def test_token_classifier_accuracy_and_entity_f1_on_labelled_sentences(tmp_path: Path, enc_store: str) -> None:
    """Word accuracy (a word's tag read at its first sub-token) and entity F1 of a token classifier,
    from JSONL, a hub-layout Parquet table (whose own class order differs from the model's) and CoNLL
    text, against what PyTorch predicts for the same words; words past the model's 160 positions
    are not scored."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from tasks.evaluate import fingerprint_text
    from tasks.evaluate_encoder import EncoderEvalConfig, entity_f1, evaluate_encoder

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


def test_entity_spans_read_iob_as_conlleval_does() -> None:
    from tasks.evaluate_encoder import entity_f1, entity_spans

    assert entity_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert entity_spans(["I-PER", "I-PER", "I-LOC"]) == {("PER", 0, 2), ("LOC", 2, 3)}  # IOB1: I- after O/other starts
    assert entity_spans(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}
    assert entity_spans(["S-ORG", "B-MISC", "E-MISC", "O"]) == {("ORG", 0, 1), ("MISC", 1, 3)}  # IOBES
    # one entity right and one cut short: precision 1/2, recall 1/2
    assert entity_f1([["B-PER", "I-PER", "O", "B-LOC"]], [["B-PER", "O", "O", "B-LOC"]]) == pytest.approx(0.5)
    # across sentences: one right, two invented, one missed: precision 1/3, recall 1/2
    assert entity_f1([["B-PER", "O"], ["B-ORG"]], [["B-PER", "B-LOC"], ["B-MISC"]]) == pytest.approx(0.4)
    assert entity_f1([["O"]], [["O"]]) is None


def test_auto_opt_encoder_flow_rerun_is_all_cached(tiny_bert: dict[str, object], tmp_path: Path) -> None:
    import hashlib

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from grove.request_encoder import EncoderOptRequest
    from grove.runner import run_auto_opt_state
    from tests.test_auto_opt_flow import _task_states

    csv_path, _, expected = _labelled_files(tiny_bert["folder"], tmp_path)  # type: ignore[arg-type]
    out = tmp_path / "out"
    request = EncoderOptRequest(model_name_or_path=str(tiny_bert["folder"]), output_path=str(out),
                                store=str(tmp_path / "store"), task="text-classification", precision="int8",
                                eval_data=str(csv_path), eval_repeat=5)
    first_state = run_auto_opt_state(request)
    first = _task_states(first_state)
    onnx_sha = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    second = _task_states(run_auto_opt_state(request))

    assert first_state.is_completed()
    assert all("Cached" not in first[n] for n in ENCODER_NODES), first
    assert all(set(second[n]) == {"Cached"} for n in ENCODER_NODES), second
    assert len(second["check-parity"]) == len(second["evaluate-encoder"]) == 2
    assert hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest() == onnx_sha
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["task"] == "text-classification"
    assert report["reference"]["accuracy"] == round(expected, 4)  # fp32 ONNX = PyTorch's argmax
    assert report["metrics"]["top1_vs_pytorch"] >= TINY_INT8_MIN_TOP1
    with get_client(sync_client=True) as client:  # publish-report: the dashboard's table and report
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first_state.state_details.flow_run_id])))
    assert {"table", "markdown"} <= {a.type for a in artifacts}
    table = json.dumps(next(a for a in artifacts if a.type == "table").data)
    assert "latency ms avg" in table and "accuracy" in table


def test_torchscript_exporter_and_fallback(tiny_bert: dict[str, object], enc_store: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tasks.capture_encoder import ExportFailed

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
