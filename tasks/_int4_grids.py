"""Int4 block weight quantization of decoder ONNX models built by onnxruntime-genai's builder.

Every ``MatMul`` whose B is a constant 2-D fp32 initializer (lm_head included) becomes a
``MatMulNBits`` (4 bits, blocks of ``block_size`` along K, ``accuracy_level`` 4).

Modes:

* ``affine`` (default): per block and output column a float scale ``s = (max - min) / 15`` and a
  float zero point ``z = -min / s``, i.e. the Q4_1 grid ``w = s * (q - z)``. onnxruntime's CPU
  kernel is slow with float zero points (HQQ's form: 3 tok/s) and fastest with none (the
  implicit 8 of symmetric blocks), so the grid is written as
  ``s * (q - z) = s * (q - 8) + s * (8 - z)``: the first term is a zero-point-free
  ``MatMulNBits``; the second is a small correction ``blocksum(x) @ C`` with
  ``C[b, n] = s[b, n] * (8 - z[b, n])`` (K/bs x N), added to its output. ``blocksum(x)`` (sum of
  x over each block of K: Reshape + ReduceSum) is shared by all MatMuls that read the same
  tensor (q/k/v, gate/up). Measured on SmolLM2 against an integer zero point kept in
  ``MatMulNBits`` with only the fractional remainder corrected: same perplexity, ~15% faster
  decode.
* ``hqq``: the same layout and correction, the float zero points refined by HQQ's half-quadratic
  solver (scales kept). Lower error than min/max on full-precision weights; on a GGUF Q4_1 source,
  which min/max already fits exactly, the same weights. (onnxruntime's own HQQ writes float zero
  points into ``MatMulNBits``: its slow CPU path.)
* ``asym``: integer zero point (true min/max per block), no correction.
* ``sym``: signed absmax scale, implicit zero point 8, no correction (onnxruntime's RTN).

MatMuls that read the same tensor (gate/up; q/k/v where the builder did not pack them) become
one ``MatMulNBits`` over their weights concatenated along N, one correction, and a ``Split``.

The lm_head (the MatMul writing a graph output) and the token embedding use ``head_bits``:
8 by default (symmetric, s = absmax / 127: GGUF's Q8_0 grid, the usual format of that tensor),
or 4 with the mode above. The embedding ``Gather`` (tied to lm_head by the builder through a
``Transpose``) follows ``embedding``: ``gbq`` reads the lm_head's quantized weights through
``GatherBlockQuantized`` (integer zero points only, so in ``affine`` mode the correction row is
gathered and spread over the blocks too), ``fp16`` stores a float16 copy, ``keep`` leaves it fp32.

``head_shortlist`` (8-bit heads): instead of reading the whole 8-bit lm_head for every token (the
largest single op of a decode step), a 4-bit symmetric copy scores every token, ``TopK`` keeps the
``head_shortlist`` best, and their logits are recomputed from the 8-bit rows
(``GatherBlockQuantized`` of the same table the embedding reads, a small ``MatMul`` in fp32) and
scattered back. The shortlisted logits are the 8-bit head's, so the argmax is the 8-bit head's
whenever it is among the 4-bit pass's top K; the other logits keep the 4-bit pass's values.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from grove.tasks.architectures import keeps_dense

log = logging.getLogger(__name__)

MODES = ("affine", "hqq", "asym", "sym")
EMBEDDINGS = ("gbq", "fp16", "keep")
_MS = "com.microsoft"
_SHORTLIST = "_shortlist4"  # suffix of a head weight's 4-bit scoring copy


@dataclass
class QuantizedWeight:
    """One weight in MatMulNBits layout (N output columns, nb = K / block_size blocks)."""

    packed: np.ndarray  # uint8 [N, nb, block_size * bits / 8]; 4 bits: element 2i in the low nibble
    scales: np.ndarray  # float32 [N, nb]
    zero_points: np.ndarray | None  # uint8 [N, ceil(nb / 2)], block 2j in the low nibble; None = 2**(bits-1)
    correction: np.ndarray | None  # float32 [nb, N]: C = s * (8 - z) (affine); None = exact
    bits: int = 4


def _pack_nibbles(v: np.ndarray) -> np.ndarray:
    """Pack uint4 values pairwise along the last axis (even index in the low nibble)."""
    if v.shape[-1] % 2:
        v = np.concatenate([v, np.zeros(v.shape[:-1] + (1,), v.dtype)], axis=-1)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


def _minmax_scale(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale and float zero point mapping each block's [min, max] onto [0, 15]."""
    lo, hi = blocks.min(-1), blocks.max(-1)
    span = hi - lo
    # A constant block has no span: pick s so that the value itself lands on q = 0 or 8.
    s = np.where(span > 0, span / 15, np.maximum(np.abs(lo), 1e-12) / 8).astype(np.float32)
    return s, -lo / s


def _hqq_zero_points(blocks: np.ndarray, s: np.ndarray, z: np.ndarray, iters: int = 20, p: float = 0.7,
                     beta: float = 10.0, kappa: float = 1.01) -> np.ndarray:
    """Refine float zero points by half-quadratic splitting (HQQ, Badri & Shaji 2023), scales fixed.

    Alternates rounding with the zero point that best explains the weights once the error has
    been passed through an lp (p < 1) shrinkage, so a few outliers stop dragging the whole block's
    grid. Per block, the zero point with the lowest mean absolute error seen is kept (the min/max
    start included), so no block ends worse than min/max; iteration stops when no block improves by
    more than 1e-4 of a step (a GGUF Q4_1 source, which min/max already fits exactly: after two).
    """
    inv = (1 / s)[..., None]
    scaled = blocks * inv  # the weights in grid steps: the loop works there, err is in steps
    zero = z[..., None].astype(np.float32)
    best_zero, best_err = zero.copy(), np.full(zero.shape, np.inf, np.float32)
    for _ in range(iters):
        q = np.clip(np.rint(scaled + zero), 0, 15)
        e = scaled - q
        e += zero  # the error in steps: (w - s * (q - zero)) / s
        err = np.abs(e).mean(-1, keepdims=True) / inv  # back to weight units, as HQQ compares
        better = err < best_err - 1e-4 / inv  # gains under 1e-4 of a step are rounding noise
        if not better.any():
            break
        np.copyto(best_zero, zero, where=better)
        np.copyto(best_err, err, where=better)
        # lp shrinkage in weight units: |e_w| - |e_w|**(p-1) / beta, e_w = e / inv
        a = np.abs(e) / inv
        shrink = np.maximum(a - np.exp(np.float32(p - 1) * np.log(a + np.float32(1e-8))) / np.float32(beta), 0)
        # zero = mean(q - (w - sign(e) * shrink) * inv) = mean(q - scaled + sign(e) * shrink * inv)
        shrink *= np.sign(e)
        shrink *= inv
        shrink += q
        shrink -= scaled
        zero = shrink.mean(-1, keepdims=True)
        beta *= kappa
    return best_zero[..., 0]


def _quantize_int8(blocks: np.ndarray) -> QuantizedWeight:
    """Symmetric 8 bits, s = absmax / 127 (the GGUF Q8_0 grid), stored with offset 128."""
    s = np.abs(blocks).max(-1) / 127
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    q = np.clip(np.rint(blocks / s[..., None]), -127, 127) + 128
    return QuantizedWeight(q.astype(np.uint8), s, None, None, bits=8)


def quantize_weight(w: np.ndarray, block_size: int = 32, mode: str = "affine", bits: int = 4) -> QuantizedWeight:
    """Quantize a [K, N] fp32 weight (K divisible by block_size), blocks along K.

    ``bits=8`` is always symmetric (``mode`` only applies to 4 bits).
    """
    if mode not in MODES or bits not in (4, 8):
        raise ValueError(f"mode must be one of {MODES} and bits 4 or 8, got {mode!r}, {bits}")
    k, n = w.shape
    blocks = np.ascontiguousarray(w.T, dtype=np.float32).reshape(n, k // block_size, block_size)
    if bits == 8:
        return _quantize_int8(blocks)
    if mode == "sym":
        # Same convention as onnxruntime's RTN: the signed absmax maps to -8.
        lo, hi = blocks.min(-1), blocks.max(-1)
        s = np.where(np.abs(hi) > np.abs(lo), hi, lo) / -8.0
        s = np.where(s == 0, 1.0, s).astype(np.float32)
        q = np.clip(np.rint(blocks / s[..., None]), -8, 7) + 8
        return QuantizedWeight(_pack_nibbles(q.astype(np.uint8)), s, None, None)
    s, z = _minmax_scale(blocks)
    if mode == "hqq":
        z = _hqq_zero_points(blocks, s, z)
    if mode in ("affine", "hqq"):  # the float z: no stored zero point (implicit 8), the rest in C
        q = np.clip(np.rint(blocks / s[..., None] + z[..., None]), 0, 15)
        corr = (s * (8 - z)).T.astype(np.float32)
        return QuantizedWeight(_pack_nibbles(q.astype(np.uint8)), s, None, corr)
    zi = np.clip(np.rint(z), 0, 15)  # asym: rounds against the integer zero point it can store
    q = np.clip(np.rint(blocks / s[..., None] + zi[..., None]), 0, 15)
    return QuantizedWeight(_pack_nibbles(q.astype(np.uint8)), s, _pack_nibbles(zi.astype(np.uint8)), None)


def dequantize(qw: QuantizedWeight, block_size: int = 32) -> np.ndarray:
    """Reconstruct the [K, N] weight the quantized graph computes with (for tests)."""
    q = qw.packed if qw.bits == 8 else np.stack([qw.packed & 15, qw.packed >> 4], -1)
    q = q.reshape(qw.packed.shape[0], -1, block_size).astype(np.float32)
    nb = q.shape[1]
    zi = np.full(qw.scales.shape, 2.0 ** (qw.bits - 1), np.float32)
    if qw.zero_points is not None:
        zi = np.stack([qw.zero_points & 15, qw.zero_points >> 4], -1).reshape(len(zi), -1)[:, :nb]
    w = qw.scales[..., None] * (q - zi[..., None].astype(np.float32))
    if qw.correction is not None:
        w = w + qw.correction.T[..., None]
    return w.reshape(len(w), -1).T.astype(np.float32)


def _rescore(x: str, approx: str, ranked: str, k_name: str, rows: list[str], last: str, bits: int, block_size: int,
             output: str, prefix: str | None = None) -> list[onnx.NodeProto]:
    """The shortlist's second half: the ``k_name`` best tokens of ``ranked`` (TopK), their ``bits``-bit
    rows (``rows``: GatherBlockQuantized's table, scales and zero points) times ``x``, scattered over
    the 4-bit pass's logits ``approx`` into ``output``; the other names start with ``prefix``
    (default: ``output``)."""
    p = prefix or output
    top = p + "/shortlist_ids"
    return [helper.make_node("TopK", [ranked, k_name], [p + "/shortlist_top", top], name=top, axis=-1),
            helper.make_node("GatherBlockQuantized", [rows[0], top, *rows[1:]], [p + "/shortlist_rows"],
                             name=p + "/shortlist_rows", domain=_MS, bits=bits, block_size=block_size,
                             gather_axis=0, quantize_axis=1),
            helper.make_node("Unsqueeze", [x, last], [p + "/shortlist_x"], name=p + "/shortlist_x"),
            helper.make_node("MatMul", [p + "/shortlist_rows", p + "/shortlist_x"], [p + "/shortlist_exact_col"],
                             name=p + "/shortlist_exact_col"),
            helper.make_node("Squeeze", [p + "/shortlist_exact_col", last], [p + "/shortlist_exact"],
                             name=p + "/shortlist_exact"),
            helper.make_node("ScatterElements", [approx, top, p + "/shortlist_exact"], [output],
                             name=p + "/shortlist" if prefix else output, axis=-1)]


class _Rewriter:
    """Rewrites one graph in place; caches what several nodes share."""

    def __init__(self, graph: onnx.GraphProto, block_size: int, mode: str, correction_dtype: str,
                 head_bits: int, accuracy_level: int, head_shortlist: int = 0):
        self.graph, self.bs, self.mode, self.head_bits = graph, block_size, mode, head_bits
        self.accuracy_level, self.head_shortlist = accuracy_level, head_shortlist
        self.head_weights: set[str] = set()  # lm_head / embedding weights, quantized with head_bits
        self.head_bias: dict[str, str | None] = {}  # lm_head weight -> its bias initializer (phi), if any
        self.c_dtype = np.dtype(correction_dtype)
        self.inits = {t.name: t for t in graph.initializer}
        self.ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*graph.input, *graph.value_info]
                      if v.type.tensor_type.HasField("shape")}
        self.quantized: dict[str, QuantizedWeight] = {}
        self.ready: dict[str, QuantizedWeight] = {}  # quantized, not necessarily registered in the graph
        self.blocksums: dict[str, str] = {}  # input tensor -> its blocksum tensor
        self.skipped: dict[str, int] = {}  # fp32 weights left as they are: name -> K (not a multiple of bs)
        self.new_inits: list[TensorProto] = []
        self.prelude: list[onnx.NodeProto] = []  # nodes over initializers only, placed first
        self.tables: dict[str, str] = {}  # head weight -> its [V, row] quantized table (GatherBlockQuantized data)
        self.nodes: list[onnx.NodeProto] = []

    def add_init(self, name: str, array: np.ndarray) -> str:
        """Register an initializer once (names are unique by construction) and return its name."""
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(array, name)
            self.new_inits.append(self.inits[name])
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs: Any) -> str:
        """Append a node named after its output and return the output name."""
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def float_const(self, name: str, array: np.ndarray) -> str:
        """A float32 constant stored as correction_dtype (Cast is folded by onnxruntime at load)."""
        if self.c_dtype == np.float32:
            return self.add_init(name, array.astype(np.float32))
        stored = self.add_init(name + "_fp16", array.astype(self.c_dtype))
        return self.node("Cast", [stored], name, to=TensorProto.FLOAT)

    def _quantize_weight(self, name: str) -> QuantizedWeight:
        if name.endswith(_SHORTLIST):  # a head's 4-bit scoring copy (see rewrite_head)
            return quantize_weight(numpy_helper.to_array(self.inits[name.removesuffix(_SHORTLIST)]), self.bs, "sym", 4)
        bits = self.head_bits if name in self.head_weights else 4
        return quantize_weight(numpy_helper.to_array(self.inits[name]), self.bs, self.mode, bits)

    def quantized_weight(self, name: str) -> QuantizedWeight:
        """Weight ``name`` quantized (ahead by quantize_all, or now), not registered in the graph."""
        if name not in self.ready:
            self.ready[name] = self._quantize_weight(name)
        return self.ready[name]

    def quantize_all(self, names: list[str]) -> None:
        """Quantize these weights ahead, on every CPU: numpy releases the GIL in the array work, so
        threads divide the node's time (SmolLM2: 151 weights)."""
        from concurrent.futures import ThreadPoolExecutor

        from grove.node import report_progress

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for done, (name, qw) in enumerate(zip(names, pool.map(self._quantize_weight, names), strict=True), 1):
                self.ready[name] = qw
                report_progress(0.9 * done / len(names), f"{done}/{len(names)} weights quantized")

    def quantizable(self, name: str) -> bool:
        """Whether ``name`` is a constant 2-D fp32 [K, N] weight with K a multiple of the block."""
        t = self.inits.get(name)
        if t is None or t.data_type != TensorProto.FLOAT or len(t.dims) != 2:
            return False
        if ".lora_A." in name or ".lora_B." in name:  # a LoRA path stays fp32: extract-adapter makes it switchable
            return False
        if t.dims[0] % self.bs:
            self.skipped[name] = t.dims[0]
            return False
        return True

    def rewritable(self, node: onnx.NodeProto) -> bool:
        """A MatMul whose weight is quantizable, and not one the builder keeps dense (keeps_dense)."""
        return node.op_type == "MatMul" and not keeps_dense(node.name) and self.quantizable(node.input[1])

    def quantize(self, name: str) -> QuantizedWeight:
        """Quantize (once) and register the MatMulNBits initializers of weight ``name``."""
        if name not in self.quantized:
            qw = self.quantized_weight(name)
            self.add_init(name + "_qweight", qw.packed)
            self.add_init(name + "_scales", qw.scales)
            if qw.zero_points is not None:
                self.add_init(name + "_zp", qw.zero_points)
            self.quantized[name] = qw
        return self.quantized[name]

    def indicator(self, k: int, transpose: bool = False) -> str:
        """0/1 matrix [K, K/bs] whose product with x sums x over each block (or its transpose)."""
        e = np.kron(np.eye(k // self.bs, dtype=np.float32), np.ones((self.bs, 1), np.float32))
        return self.add_init(f"int4_block_indicator_{k}{'_T' if transpose else ''}", e.T if transpose else e)

    def blocksum(self, x: str, k: int) -> str:
        """Sum of x over each block along its last axis, computed once per tensor.

        Reshape [..., K/bs, bs] + ReduceSum when the graph records x's rank (the cheapest measured:
        one AveragePool of kernel and stride bs, for block means, decoded SmolLM2 8% slower); for an
        unknown rank a MatMul with a 0/1 indicator matrix does the same.
        """
        if x not in self.blocksums:
            rank, out = self.ranks.get(x), f"{x}/int4_blocksum"
            if rank is None:
                self.blocksums[x] = self.node("MatMul", [x, self.indicator(k)], out)
            else:
                shape = [0] * (rank - 1) + [k // self.bs, self.bs]
                shape_name = self.add_init("int4_blocks_shape_" + "_".join(map(str, shape)),
                                           np.array(shape, np.int64))
                blocks = self.node("Reshape", [x, shape_name], f"{x}/int4_blocks")
                axes = self.add_init("int4_last_axis", np.array([-1], np.int64))
                self.blocksums[x] = self.node("ReduceSum", [blocks, axes], out, keepdims=0)
        return self.blocksums[x]

    def rewrite_matmul(self, x: str, w_name: str, output: str) -> None:
        """MatMul(x, W) -> MatMulNBits(x, q, s, zi) [+ blocksum(x) @ C], written to ``output``."""
        qw = self.quantize(w_name)
        n, k = qw.packed.shape[0], qw.scales.shape[1] * self.bs
        out = output if qw.correction is None else output + "/int4_main"
        self.node("MatMulNBits", [x, *self.register(w_name)], out, _MS, K=k, N=n, bits=qw.bits, block_size=self.bs,
                  accuracy_level=self.accuracy_level)
        if qw.correction is not None:
            sums, corr = self.blocksum(x, k), output + "/int4_corr"
            self.node("MatMul", [sums, self.float_const(w_name + "_int4_corr", qw.correction)], corr)
            self.node("Add", [out, corr], output)

    def fuse_siblings(self, matmuls: list[onnx.NodeProto]) -> dict[str, list[onnx.NodeProto]]:
        """Group the 4-bit weight MatMuls that read the same tensor (gate/up; q/k/v when not packed).

        Each group becomes one MatMulNBits over the weights concatenated along N (+ one correction)
        and a Split: the same arithmetic in fewer, larger ops (SmolLM2: 60 fewer per token).
        Returns {the first member's weight name + ``.fused<n>``: members}.
        """
        by_input: dict[str, list[onnx.NodeProto]] = {}
        for mm in matmuls:
            if mm.input[1] not in self.head_weights:
                by_input.setdefault(mm.input[0], []).append(mm)
        return {f"{members[0].input[1]}.fused{len(members)}": members for members in by_input.values()
                if len(members) > 1}

    def rewrite_fused(self, name: str, members: list[onnx.NodeProto]) -> None:
        """One MatMulNBits over the members' weights concatenated along N, split back into their
        outputs. Each weight is quantized on its own (blocks run along K, so concatenating the
        quantized pieces equals quantizing the concatenation) and no fp32 copy is made; the pieces
        leave ``ready`` once concatenated (a weight also read elsewhere is quantized again there)."""
        parts = [self.ready.pop(m.input[1]) if m.input[1] in self.ready else self._quantize_weight(m.input[1])
                 for m in members]
        self.ready[name] = QuantizedWeight(
            np.concatenate([p.packed for p in parts]), np.concatenate([p.scales for p in parts]),
            None if parts[0].zero_points is None else np.concatenate([p.zero_points for p in parts]),
            None if parts[0].correction is None else np.concatenate([p.correction for p in parts], axis=1))
        fused = f"{members[0].output[0]}/fused"
        self.rewrite_matmul(members[0].input[0], name, fused)
        split = self.add_init(f"{name}_split", np.array([len(p.scales) for p in parts], np.int64))
        self.nodes.append(helper.make_node("Split", [fused, split], [m.output[0] for m in members],
                                           name=fused + "/split", axis=-1))

    def table(self, w_name: str) -> str:
        """The quantized [K, V] head weight ``w_name`` as a [V, K * bits / 8] table of rows, for
        ``GatherBlockQuantized`` (a Reshape of the MatMulNBits data, shared by the embedding and the
        shortlist's rescoring; placed first, onnxruntime folds it at load)."""
        if w_name not in self.tables:
            qw = self.quantize(w_name)
            v, row = qw.packed.shape[0], qw.packed.shape[1] * qw.packed.shape[2]
            shape = self.add_init(f"int4_embed_shape_{v}_{row}", np.array([v, row], np.int64))
            self.tables[w_name] = w_name + "_qweight_2d"
            self.prelude.append(helper.make_node("Reshape", [w_name + "_qweight", shape], [self.tables[w_name]],
                                                 name=self.tables[w_name]))
        return self.tables[w_name]

    def rewrite_head(self, x: str, w_name: str, output: str) -> None:
        """lm_head: ``rewrite_matmul`` unless a shortlist applies (an 8-bit head, ``head_shortlist``
        > 0): then a 4-bit symmetric pass picks each position's ``head_shortlist`` best tokens and
        their logits are recomputed from the 8-bit rows (see the module docstring). A head with a
        bias (added after this MatMul, as before) picks them with the bias added."""
        if not self.head_shortlist or self.head_bits != 8:
            self.rewrite_matmul(x, w_name, output)
            return
        qw = self.quantize(w_name)
        k = min(self.head_shortlist, qw.packed.shape[0])
        fast = w_name + _SHORTLIST
        approx = self.node("MatMulNBits", [x, *self.register(fast)], output + "/shortlist_approx", _MS,
                           K=qw.scales.shape[1] * self.bs, N=qw.packed.shape[0], bits=4, block_size=self.bs,
                           accuracy_level=self.accuracy_level)
        k_name = self.add_init(f"int4_shortlist_k_{k}", np.array([k], np.int64))
        ranked = approx if (bias := self.head_bias.get(w_name)) is None else self.node(
            "Add", [approx, bias], output + "/shortlist_biased")
        self.nodes += _rescore(x, approx, ranked, k_name, [self.table(w_name), *self.register(w_name)[1:]],
                               self.add_init("int4_last_axis", np.array([-1], np.int64)), qw.bits, self.bs, output)

    def register(self, name: str) -> list[str]:
        """Register weight ``name``'s MatMulNBits initializers; return them in the op's input order."""
        qw = self.quantize(name)
        return [name + "_qweight", name + "_scales"] + ([name + "_zp"] if qw.zero_points is not None else [])

    def rewrite_gather(self, g: onnx.NodeProto, w_name: str, embedding: str) -> None:
        """Embedding Gather on the (transposed) [K, V] weight ``w_name``."""
        k = self.inits[w_name].dims[0]
        ids, out = g.input[1], g.output[0]
        if embedding == "fp16":
            weight = numpy_helper.to_array(self.inits[w_name])
            table = self.add_init(w_name + "_embed_fp16", weight.T.astype(np.float16))
            self.node("Cast", [self.node("Gather", [table, ids], out + "/fp16")], out, to=TensorProto.FLOAT)
            return
        qw = self.quantize(w_name)
        main = out if qw.correction is None else out + "/int4_main"
        # The table of rows, then the scales (and zero points) that MatMulNBits reads too.
        self.node("GatherBlockQuantized", [self.table(w_name), ids, *self.register(w_name)[1:]], main, _MS,
                  bits=qw.bits, block_size=self.bs, gather_axis=0, quantize_axis=1)
        if qw.correction is not None:
            # The correction of row v is C[:, v] repeated over each block: Gather, then spread.
            c = self.node("Gather", [self.float_const(w_name + "_int4_corr_T", qw.correction.T), ids], out + "/int4_c")
            self.node("Add", [main, self.node("MatMul", [c, self.indicator(k, True)], out + "/int4_corr")], out)

    def embedding_weight(self, g: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> str | None:
        """The [K, V] weight behind an embedding Gather: tied (Transpose of lm_head) or its own."""
        src = producers.get(g.input[0])
        if src is not None and src.op_type == "Transpose" and self.quantizable(src.input[0]):
            self.head_weights.add(src.input[0])
            return src.input[0]
        t = self.inits.get(g.input[0])
        if src is not None or t is None or len(t.dims) != 2 or t.data_type != TensorProto.FLOAT:
            return None
        # Untied table [V, K]: expose its transpose (not stored in the graph) like a MatMul weight.
        name = g.input[0] + "_KxV"
        self.inits[name] = numpy_helper.from_array(numpy_helper.to_array(t).T.copy(), name)
        self.head_weights.add(name)
        return name if self.quantizable(name) else None

    def run(self, embedding: str) -> None:
        """Rewrite every quantizable MatMul and the embedding Gather, then drop dead parts."""
        producers = {o: n for n in self.graph.node for o in n.output}
        outputs = {o.name for o in self.graph.output}
        self.head_bias = heads = _lm_heads(self.graph, outputs)
        self.head_weights = set(heads)
        matmuls = [n for n in self.graph.node if self.rewritable(n)]
        groups = self.fuse_siblings(matmuls)
        member_of = {m.output[0]: name for name, members in groups.items() for m in members}
        shortlists = [h + _SHORTLIST for h in heads if self.head_shortlist and self.head_bits == 8]
        self.quantize_all(sorted({n.input[1] for n in matmuls}) + shortlists)
        for node in list(self.graph.node):
            if node.op_type == "MatMul" and node.output[0] in member_of:
                if member_of[node.output[0]] in groups:  # the group's first member: write it once
                    name = member_of[node.output[0]]
                    self.rewrite_fused(name, groups.pop(name))
            elif self.rewritable(node):
                rewrite = self.rewrite_head if node.input[1] in heads else self.rewrite_matmul
                rewrite(node.input[0], node.input[1], node.output[0])
            elif node.op_type == "Gather" and embedding != "keep" and (w := self.embedding_weight(node, producers)):
                self.rewrite_gather(node, w, embedding)
            else:
                self.nodes.append(node)
        if self.skipped:
            sizes = ", ".join(map(str, sorted(set(self.skipped.values()))))
            log.warning("%d weight(s) left in fp32: their input size (%s) is not a multiple of the block size %d "
                        "(e.g. %s); a smaller --block_size quantizes them", len(self.skipped), sizes, self.bs,
                        next(iter(self.skipped)))
        self.graph.initializer.extend(self.new_inits)
        keep_live(self.graph, self.prelude + self.nodes)


# Ops the builder may put between the lm_head and the logits, each with constant other inputs
# (Gemma 2's soft-capping: Div, Tanh, Mul). All are monotonic in the logit, so a shortlist picked
# before them is the same shortlist after. A bias Add (phi's lm_head) is not: it may only come
# first, and the shortlist is then picked with the bias added.
_LOGIT_EPILOGUE = {"Div", "Mul", "Tanh", "Cast"}


def _lm_heads(graph: onnx.GraphProto, outputs: set[str]) -> dict[str, str | None]:
    """The lm_head's weight name and its bias (an initializer, or None): the MatMul that writes a
    graph output (logits) directly, or through a bias ``Add`` and a chain of ``_LOGIT_EPILOGUE`` ops
    by positive constants. Tied embeddings share its weight."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer if list(t.dims) in ([], [1])}
    constants |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                  if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"}
    vectors = {t.name for t in graph.initializer if len(t.dims) == 1 and t.data_type == TensorProto.FLOAT}

    def only_consumer(name: str) -> onnx.NodeProto | None:
        (nxt, *more) = consumers.get(name, [None])
        return None if more or nxt is None or nxt.input[0] != name else nxt

    def reaches_output(name: str) -> bool:
        for _ in range(8):  # Gemma 2: three
            if name in outputs:
                return True
            nxt = only_consumer(name)
            if nxt is None or nxt.op_type not in _LOGIT_EPILOGUE or any(
                    i not in constants or np.any(constants[i] <= 0) for i in nxt.input[1:]):
                return False
            name = nxt.output[0]
        return name in outputs

    heads: dict[str, str | None] = {}
    for n in graph.node:
        if n.op_type != "MatMul":
            continue
        add = only_consumer(n.output[0])
        if reaches_output(n.output[0]):
            heads[n.input[1]] = None
        elif add is not None and add.op_type == "Add" and add.input[1] in vectors and reaches_output(add.output[0]):
            heads[n.input[1]] = add.input[1]
    return heads


def _live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop nodes none of whose outputs is consumed (e.g. the lm_head Transpose for the embedding).

    Assumes no subgraphs (If/Loop), which genai decoder graphs do not have.
    """
    live, needed = [], set(outputs)
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    return live[::-1]


def keep_live(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Set ``graph``'s nodes to those of ``nodes`` the outputs still read, and drop the initializers no
    node reads any more."""
    del graph.node[:]
    graph.node.extend(_live_nodes(nodes, {o.name for o in graph.output}))
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def save_in_place(model: onnx.ModelProto, path: Path) -> None:
    """Write ``model`` over ``path`` with its tensors in ``<name>.data`` (the old data file removed first:
    onnx appends to an existing one)."""
    (path.parent / f"{path.name}.data").unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=1024)


def quantize(
    model_in_dir: str | Path,
    model_out_dir: str | Path,
    block_size: int = 32,
    mode: str = "affine",
    embedding: str = "gbq",
    correction_dtype: str = "float32",
    head_bits: int = 8,
    accuracy_level: int = 4,
    head_shortlist: int = 0,
) -> Path:
    """Quantize ``model_in_dir/model.onnx`` to int4 into ``model_out_dir``; return the new model path.

    Writes model.onnx + model.onnx.data (one external data file) and copies every other file of
    the folder (genai_config.json, tokenizer files), so the result loads with onnxruntime-genai.
    ``mode``: affine | asym | sym; ``embedding``: gbq | fp16 | keep; ``correction_dtype``:
    float32 | float16 (storage of C; onnxruntime folds the Cast at session creation);
    ``head_bits``: 4 | 8 for the lm_head and embedding (8 = symmetric, the GGUF Q8_0 grid);
    ``accuracy_level``: MatMulNBits' attribute; 4 (int8 activations) selects onnxruntime's fast
    CPU kernel, 0 computes in fp32 (exact, slower); ``head_shortlist``: 0 = the whole 8-bit lm_head
    for every token, K > 0 = a 4-bit pass and the K best tokens' logits recomputed at 8 bits.
    """
    src, dst = Path(model_in_dir), Path(model_out_dir)
    if (mode not in MODES or embedding not in EMBEDDINGS or head_bits not in (4, 8)
            or correction_dtype not in ("float32", "float16") or block_size < 16 or block_size & (block_size - 1)
            or head_shortlist < 0):
        raise ValueError(f"bad arguments: {mode=} {embedding=} {head_bits=} {correction_dtype=} {block_size=} "
                         f"{head_shortlist=}")
    if src.resolve() == dst.resolve():
        raise ValueError("model_out_dir must differ from model_in_dir")
    model = onnx.load(str(src / "model.onnx"))
    rw = _Rewriter(model.graph, block_size, mode, correction_dtype, head_bits, accuracy_level, head_shortlist)
    rw.run(embedding)
    if not any(o.domain == _MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(_MS, 1))
    log.info("quantized %d weights (mode=%s, embedding=%s)", len(rw.quantized), mode, embedding)
    return _write(model, src, dst)


def _write(model: onnx.ModelProto, src: Path, dst: Path) -> Path:
    """Save model.onnx + model.onnx.data into dst and copy src's other files (genai config, tokenizer)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        # manifest.json is a Grove artifact's commit marker and belongs to src only.
        if f.is_file() and not f.name.startswith("model.onnx") and f.name != "manifest.json":
            shutil.copy2(f, dst / f.name)
    (dst / "model.onnx.data").unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(dst / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    return dst / "model.onnx"


def rewrite_quantized(path: Path, head_shortlist: int) -> None:
    """A graph the model builder wrote from a quantize-torch checkpoint, loaded and saved once:
    implicit zero points dropped, then the 8-bit lm_head shortlisted when ``head_shortlist`` > 0."""
    model = onnx.load(str(path))
    changed = drop_implicit_zero_points(model) > 0
    changed = bool(head_shortlist and shortlist_quantized_head(model, head_shortlist)) or changed
    if changed:
        save_in_place(model, path)


def shortlist_quantized_head(model: onnx.ModelProto, head_shortlist: int) -> bool:
    """The shortlist (see the module docstring) on a graph whose lm_head is already an 8-bit
    ``MatMulNBits`` (the model builder's, from a quantize-torch checkpoint): a 4-bit symmetric copy of
    its weights (rounded from the 8-bit ones) scores the vocabulary, and the ``head_shortlist`` best
    tokens' logits are recomputed from the 8-bit rows it keeps. Returns whether there was such a head
    (a 4-bit head, or an lm_head with a bias, is left as it is)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    at, head = next(((i, n) for i, n in enumerate(graph.node) if n.op_type == "MatMulNBits" and n.domain == _MS
                     and n.output[0] in outputs and len(n.input) in (3, 4)), (None, None))
    attrs = {a.name: a.i for a in head.attribute} if head is not None else {}
    if head is None or at is None or attrs.get("bits") != 8 or any(i not in inits for i in head.input[1:]):
        return False
    n, k, bs = attrs["N"], attrs["K"], attrs["block_size"]
    q = numpy_helper.to_array(inits[head.input[1]]).reshape(n, k // bs, bs).astype(np.float32)
    scales = numpy_helper.to_array(inits[head.input[2]]).astype(np.float32).reshape(n, k // bs)
    zeros = (numpy_helper.to_array(inits[head.input[3]]).astype(np.float32).reshape(n, k // bs)
             if len(head.input) == 4 else np.full((n, k // bs), 128, np.float32))
    w = ((q - zeros[..., None]) * scales[..., None]).reshape(n, k).T  # [K, N], what the 8-bit head computes with
    fast = quantize_weight(w, bs, "sym", 4)
    x, logits, base = head.input[0], head.output[0], head.name or "lm_head"
    graph.initializer.extend([numpy_helper.from_array(fast.packed, f"{base}/shortlist4_qweight"),
                              numpy_helper.from_array(fast.scales, f"{base}/shortlist4_scales"),
                              numpy_helper.from_array(np.array([min(head_shortlist, n)], np.int64), f"{base}/k"),
                              numpy_helper.from_array(np.array([n, -1], np.int64), f"{base}/rows_shape"),
                              numpy_helper.from_array(np.array([-1], np.int64), f"{base}/last_axis")])
    rows = [f"{base}/rows_{i}" for i in range(1, len(head.input))]  # data, scales (and zero points) as [N, -1]
    approx = f"{base}/shortlist_approx"
    nodes = [*(helper.make_node("Reshape", [src, f"{base}/rows_shape"], [dst], name=dst)
               for src, dst in zip(head.input[1:], rows, strict=True)),
             helper.make_node("MatMulNBits", [x, f"{base}/shortlist4_qweight", f"{base}/shortlist4_scales"], [approx],
                              name=approx, domain=_MS, K=k, N=n, bits=4, block_size=bs,
                              accuracy_level=attrs.get("accuracy_level", 4)),
             *_rescore(x, approx, approx, f"{base}/k", rows, f"{base}/last_axis", 8, bs, logits, prefix=base)]
    graph.node.remove(head)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    log.info("lm_head: a 4-bit pass shortlists %d tokens, rescored from the 8-bit rows", min(head_shortlist, n))
    return True


def drop_implicit_zero_points(model: onnx.ModelProto) -> int:
    """Remove the zero-point input of every ``MatMulNBits`` whose zero points are all the implicit
    2^(bits-1) (the model builder writes them for a symmetric checkpoint): the same arithmetic, on the
    kernel's zero-point-free path. Returns how many were dropped."""
    inits = {t.name: t for t in model.graph.initializer}
    dropped = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) != 4 or node.input[3] not in inits:
            continue
        bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
        implicit = 0x88 if bits == 4 else 1 << (bits - 1)  # two 4-bit 8s per byte, or one 8-bit 128
        if np.all(numpy_helper.to_array(inits[node.input[3]]) == implicit):
            del node.input[3]
            dropped += 1
    if dropped:
        used = {i for n in model.graph.node for i in n.input}
        keep = [t for t in model.graph.initializer if t.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        log.info("%d MatMulNBits: zero points all implicit, dropped", dropped)
    return dropped
