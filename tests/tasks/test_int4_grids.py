"""Grove's int4 quantizer (tasks/_int4_grids.py): the grids it claims, and that the rewritten
ONNX graph computes exactly with the weights it claims (onnxruntime at accuracy_level 0)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from grove.tasks import _int4_grids as int4

K, N, V, BLOCK = 64, 48, 40, 32


def _blocks_of(w: np.ndarray) -> np.ndarray:
    """[K, N] -> [N, K / BLOCK, BLOCK], the layout the quantizer works in."""
    return w.T.reshape(w.shape[1], -1, BLOCK)


def test_affine_reproduces_q4_1_weights_exactly() -> None:
    # GGUF Q4_1: per block of 32 a float scale and a float minimum, w = d * q + m.
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(N, K // BLOCK, BLOCK)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15  # every block spans the whole grid, as Q4_1 blocks do
    d = rng.uniform(0.001, 0.05, size=(N, K // BLOCK, 1)).astype(np.float32)
    m = rng.uniform(-0.4, 0.1, size=(N, K // BLOCK, 1)).astype(np.float32)
    w = (d * q + m).reshape(N, K).T.copy()

    affine = int4.dequantize(int4.quantize_weight(w, BLOCK, "affine"), BLOCK)
    asym = int4.dequantize(int4.quantize_weight(w, BLOCK, "asym"), BLOCK)

    assert np.abs(affine - w).max() < 1e-6
    assert np.abs(asym - w).max() > 100 * np.abs(affine - w).max(), "an integer zero point cannot hold m / d"


def test_hqq_keeps_q4_1_weights_exact_and_lowers_the_error_of_other_weights() -> None:
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(N, K // BLOCK, BLOCK)).astype(np.float32)
    q[..., 0], q[..., 1] = 0, 15
    d = rng.uniform(0.001, 0.05, size=(N, K // BLOCK, 1)).astype(np.float32)
    q4_1 = (d * q - 0.2).reshape(N, K).T.copy()
    assert np.abs(int4.dequantize(int4.quantize_weight(q4_1, BLOCK, "hqq"), BLOCK) - q4_1).max() < 1e-6

    # Heavy-tailed weights (Student t, 3 degrees of freedom), as trained weights are: HQQ's
    # zero points cut the layer's output error, and no block's error grows.
    w = (rng.standard_t(3, size=(576, 256)) * 0.03).astype(np.float32)
    x = rng.normal(0, 1, size=(64, 576)).astype(np.float32)
    err = {mode: int4.dequantize(int4.quantize_weight(w, BLOCK, mode), BLOCK) - w for mode in ("affine", "hqq")}
    block_mae = {mode: np.abs(_blocks_of(e)).mean(-1) for mode, e in err.items()}
    out = {mode: np.linalg.norm(x @ e) for mode, e in err.items()}
    assert (block_mae["hqq"] <= block_mae["affine"] * (1 + 1e-6)).all()
    assert out["hqq"] < 0.97 * out["affine"], out


# Error bound in grid steps: half a step, plus what rounding the zero point (asym) or clipping the
# absmax side's opposite end at +7 (sym, onnxruntime's RTN convention) adds.
@pytest.mark.parametrize(("mode", "bits", "bound"), [("affine", 4, 0.5), ("asym", 4, 1.0), ("sym", 4, 1.0),
                                                     ("sym", 8, 0.5)])
def test_error_stays_within_the_grid_step(mode: str, bits: int, bound: float) -> None:
    w = np.random.default_rng(1).normal(0, 0.05, size=(K, N)).astype(np.float32)
    qw = int4.quantize_weight(w, BLOCK, mode, bits)
    err = _blocks_of(np.abs(int4.dequantize(qw, BLOCK) - w))

    assert (err <= bound * np.abs(qw.scales)[..., None] * (1 + 1e-5)).all()
    assert (qw.correction is not None) == (mode == "affine" and bits == 4)
    assert (qw.zero_points is not None) == (mode == "asym" and bits == 4)


def _model(path: Path, weights: dict[str, np.ndarray], head_bias: np.ndarray | None = None) -> None:
    """ids -> Gather(embedding [V, K]) -> MatMul(w1) (+ the same w1 on a graph input x) -> MatMul(w2)
    times MatMul(w3) (siblings like gate/up, of different N) -> MatMul(head [K, V]) -> logits: an
    untied embedding, inner MatMuls reading tensors of unknown and known rank (the two block-sum
    forms), a fused pair, and an lm_head (a MatMul writing a graph output; with ``head_bias``, through
    a bias Add, as phi's)."""
    nodes = [
        helper.make_node("Gather", ["embed", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["a"]),
        helper.make_node("MatMul", ["x", "w1"], ["b"]),  # same weight, input of known rank
        helper.make_node("Add", ["a", "b"], ["c"]),
        helper.make_node("MatMul", ["c", "w2"], ["d2"]),
        helper.make_node("MatMul", ["c", "w3"], ["d3"]),  # a sibling of w2 (gate/up): fused with it
        helper.make_node("Slice", ["d3", "zero", "k", "minus_one"], ["d3k"]),  # N differs from w2's
        helper.make_node("Mul", ["d2", "d3k"], ["d"]),
        helper.make_node("MatMul", ["d", "head"], ["logits" if head_bias is None else "raw_logits"]),
    ]
    if head_bias is not None:
        nodes.append(helper.make_node("Add", ["raw_logits", "head_bias"], ["logits"]))
        weights = {**weights, "head_bias": head_bias}
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 5]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 5, K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 5, V])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()]
        + [numpy_helper.from_array(np.array([v], np.int64), k) for k, v in (("zero", 0), ("k", K), ("minus_one", -1))])
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path / "model.onnx"))


@pytest.mark.parametrize(("mode", "head_bits"), [("affine", 8), ("affine", 4), ("hqq", 8)])
def test_rewritten_graph_computes_with_the_dequantized_weights(tmp_path: Path, mode: str, head_bits: int) -> None:
    import onnxruntime as ort

    rng = np.random.default_rng(2)
    weights = {"embed": rng.normal(0, 0.5, (V, K)), "w1": rng.normal(0, 0.1, (K, N + 16)),
               "w2": rng.normal(0, 0.1, (N + 16, K)), "w3": rng.normal(0, 0.1, (N + 16, K + 32)),
               "head": rng.normal(0, 0.1, (K, V))}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    _model(tmp_path / "fp32", weights)
    int4.quantize(tmp_path / "fp32", tmp_path / "int4", block_size=BLOCK, mode=mode, head_bits=head_bits,
                  accuracy_level=0)
    ids = np.array([[3, 0, 39, 7, 7]], np.int64)
    x = rng.normal(0, 1, (1, 5, K)).astype(np.float32)

    sess = ort.InferenceSession(str(tmp_path / "int4" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"ids": ids, "x": x})[0]
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    ops = {n.op_type for n in model.graph.node}

    def deq(w: np.ndarray, bits: int) -> np.ndarray:  # [K, N] as the quantizer stores it
        return int4.dequantize(int4.quantize_weight(w, BLOCK, mode, bits), BLOCK)

    embed = deq(weights["embed"].T.copy(), head_bits).T  # quantized along K, like a tied lm_head
    w1, w2, w3 = (deq(weights[w], 4) for w in ("w1", "w2", "w3"))
    head = deq(weights["head"], head_bits)
    c = embed[ids] @ w1 + x @ w1
    want = ((c @ w2) * (c @ w3)[..., :K]) @ head
    assert {"MatMulNBits", "GatherBlockQuantized", "Split"} <= ops
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 4, "w2 and w3 share one MatMulNBits"
    assert not {"embed", "w1", "w2", "w3", "head"} & {t.name for t in model.graph.initializer}, "no fp32 weight is left"
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    c = weights["embed"][ids] @ weights["w1"] + x @ weights["w1"]
    fp32 = ((c @ weights["w2"]) * (c @ weights["w3"])[..., :K]) @ weights["head"]
    assert np.abs(got - fp32).max() > 1e-3 * np.abs(fp32).max(), "the weights really are quantized"


@pytest.mark.parametrize("biased", [False, True])
def test_head_shortlist_rescores_the_best_tokens_of_a_4bit_pass_with_the_8bit_head(tmp_path: Path,
                                                                                   biased: bool) -> None:
    """The shortlist's logits are the 8-bit head's, the others the 4-bit pass's; a head with a bias
    (phi's) picks its shortlist with the bias added (a bias as large as the scores reorders them)."""
    import onnxruntime as ort

    rng = np.random.default_rng(4)
    weights = {"embed": rng.normal(0, 0.5, (V, K)), "w1": rng.normal(0, 0.1, (K, N + 16)),
               "w2": rng.normal(0, 0.1, (N + 16, K)), "w3": rng.normal(0, 0.1, (N + 16, K)),
               "head": rng.normal(0, 0.1, (K, V))}
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    bias = rng.normal(0, 0.05, V).astype(np.float32) if biased else np.zeros(V, np.float32)
    _model(tmp_path / "fp32", weights, bias if biased else None)
    shortlist = 8
    int4.quantize(tmp_path / "fp32", tmp_path / "full", block_size=BLOCK, accuracy_level=0)
    int4.quantize(tmp_path / "fp32", tmp_path / "short", block_size=BLOCK, accuracy_level=0, head_shortlist=shortlist)
    feeds = {"ids": np.array([[3, 0, 39, 7, 7]], np.int64), "x": rng.normal(0, 1, (1, 5, K)).astype(np.float32)}
    full, short = (ort.InferenceSession(str(tmp_path / d / "model.onnx"), providers=["CPUExecutionProvider"])
                   .run(["logits"], feeds)[0][0] for d in ("full", "short"))

    def deq(w: np.ndarray, mode: str = "affine", bits: int = 4) -> np.ndarray:
        return int4.dequantize(int4.quantize_weight(w, BLOCK, mode, bits), BLOCK)

    c = (deq(weights["embed"].T.copy(), bits=8).T[feeds["ids"]] + feeds["x"]) @ deq(weights["w1"])
    h = ((c @ deq(weights["w2"])) * (c @ deq(weights["w3"])))[0]  # what the head reads
    assert np.abs(h @ deq(weights["head"], bits=8) + bias - full).max() < 1e-4 * np.abs(full).max()
    approx = h @ deq(weights["head"], "sym") + bias  # the 4-bit pass
    for row in range(len(full)):
        top = np.argsort(-approx[row])[:shortlist]
        rest = np.setdiff1d(np.arange(V), top)
        assert np.abs(short[row, top] - full[row, top]).max() < 1e-4 * np.abs(full[row]).max(), \
            "shortlist: 8-bit logits"
        assert np.abs(short[row, rest] - approx[row, rest]).max() < 1e-4 * np.abs(full[row]).max(), "others: 4-bit pass"
        assert np.abs(short[row, rest] - full[row, rest]).max() > 1e-3 * np.abs(full[row]).max(), \
            "others really are 4-bit"
    assert (short.argmax(-1) == full.argmax(-1)).all()

    model = onnx.load(str(tmp_path / "short" / "model.onnx"))
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert 8 not in bits, "no token reads the whole 8-bit head"
    assert sum(n.op_type == "GatherBlockQuantized" for n in model.graph.node) == 2  # embedding and rescoring


def test_weights_the_block_size_does_not_divide_stay_fp32_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(3)
    weights = {"embed": rng.normal(0, 0.5, (V, K)), "w1": rng.normal(0, 0.1, (K, N)),  # w2, w3: K = N = 48
               "w2": rng.normal(0, 0.1, (N, K)), "w3": rng.normal(0, 0.1, (N, K + 32)),
               "head": rng.normal(0, 0.1, (K, V))}
    _model(tmp_path / "fp32", {k: v.astype(np.float32) for k, v in weights.items()})
    with caplog.at_level("WARNING", logger=int4.__name__):
        int4.quantize(tmp_path / "fp32", tmp_path / "int4", block_size=BLOCK, accuracy_level=0)

    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("2 weight(s) left in fp32") and "(48)" in warnings[0], warnings
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"))
    assert {"w2", "w3"} <= {t.name for t in model.graph.initializer}
    assert sum(n.op_type == "MatMulNBits" for n in model.graph.node) == 3  # w1's two MatMuls and the head
