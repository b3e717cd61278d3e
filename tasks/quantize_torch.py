"""Node ``quantize-torch``: quantize a Hugging Face decoder's weights before the capture (Olive's
``Gptq`` / ``Rtn`` / ``SelectiveMixedPrecision`` passes) and write them as a quantized checkpoint
that onnxruntime-genai's model builder reads as it is (``quantization_config.quant_method: olive``):
per linear layer ``qweight`` (uint8, [out, in * bits / 8], two 4-bit values a byte, the low nibble
first), ``scales`` ([out, groups]) and ``qzeros`` (unsigned zero points packed the same way). The
builder copies these integers into ``MatMulNBits`` blocks, so there is no second rounding: the
ONNX model computes with exactly the weights chosen here.

GPTQ (Frantar et al., 2022) is written here in torch rather than taken from a library: gptqmodel
and auto-gptq build CUDA extensions at install (no wheel for CPU-only torch 2.13 / Python 3.11),
and optimum's GPTQ quantizer drives them; the algorithm itself is ~40 lines of linear algebra on
the layer's input Hessian. Layers are processed one decoder layer at a time on the calibration
tokens, each layer's inputs being the outputs of the already quantized layers before it (as the
reference implementation does), so memory stays at one layer's activations.

Mixed precision (``high_bits_layers``): the linear layers named there keep 8 bits, Olive's
SelectiveMixedPrecision output; ``mixed_precision_algorithm`` chooses them (tasks/_mixed_precision.py:
Olive's heuristics and scores, kld_gradient among them, and Grove's ``output_error``, which ranks layers by
the error 4-bit rounding adds to their output on the calibration data, trace((W - Q) H (W - Q)^T))."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, Protocol

from prefect import task
from pydantic import Field, model_validator

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks._choices import MIXED_PRECISION_HEURISTICS, MixedPrecisionAlgorithm
from grove.tasks.architectures import torch_spec

__all__ = ["TorchQuantConfig", "gptq", "layer_hessians", "output_stats", "quantize_torch", "rtn"]

# The linear layers of a decoder layer that the builder reads from a quantized checkpoint.
_BUILDER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                    "gate_up_proj", "dense", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h", "query_key_value")


class TorchQuantConfig(StepConfig):
    NODE = "quantize-torch"
    VERSION = 2  # 2: symmetric groups put the weight of largest magnitude on -2^(bits-1) (a signed scale);
    # gptq quantizes an lm_head of its own with GPTQ too. A mixed_precision_ratio, once a share of layers, is a
    # share of weights since mixed_precision_algorithm joined the key (always set with a ratio).
    algorithm: Literal["gptq", "rtn"] = Field("gptq", description="gptq: error-compensating rounding on the "
                                              "calibration data's Hessian; rtn: round to nearest")
    bits: Literal[4, 8] = Field(4, description="bits of the decoder layers' weights")
    group_size: Literal[16, 32, 64, 128, 256] = Field(32, description="weights per quantization group (block)")
    symmetric: bool = Field(False, description="symmetric groups (zero point 8) instead of min/max ones")
    head_bits: Literal[4, 8] | None = Field(8, description="bits of the lm_head (round to nearest, as Olive's Rtn "
                                            "pass with an lm_head override; gptq: GPTQ too, for a head not tied to "
                                            "the embedding); None: the builder quantizes it")
    high_bits_layers: tuple[str, ...] = Field((), description="linear layers kept at 8 bits (mixed precision)")
    mixed_precision_ratio: float | None = Field(None, gt=0, le=1, description="share of the decoder's linear "
                                                "layers' weights kept at `bits`; the most sensitive others keep 8 "
                                                "bits (Olive's SelectiveMixedPrecision ratio)")
    mixed_precision_algorithm: MixedPrecisionAlgorithm | None = Field(
        None, description="how the 8-bit layers are chosen (tasks/_mixed_precision.py): a score, with "
        "mixed_precision_ratio (default kld_gradient), or a fixed high_precision_* heuristic, without")
    rotate: bool = Field(False, description="rotate the weights first (QuaRot's offline Hadamard rotations, "
                         "tasks/_rotate.py): the same function, smaller outliers to round")
    clip_search: bool = Field(False, description="shrink each group's range to the factor (1.0 to 0.6) with the "
                              "least rounding error (GPTQ's mse option) instead of taking its min and max")
    damp: float = Field(0.01, gt=0, lt=1, description="GPTQ: dampening, a share of the Hessian's mean diagonal")
    calibration: str = Field("builtin:GPL-3", description="calibration text: builtin:GPL-3, a file, or a table")
    calibration_sha256: str = Field("", description="digest of the calibration text (the cache key reads it)")
    calibration_samples: int = Field(32, ge=1, le=1024, description="windows of calibration tokens")
    calibration_seq_len: int = Field(512, ge=16, le=8192, description="tokens per calibration window")

    def recipe(self) -> dict[str, object]:
        recipe = super().recipe()
        for key in ("rotate", "clip_search", "mixed_precision_algorithm"):  # off: the key of the checkpoints
            if not recipe[key]:  # quantized before it existed
                del recipe[key]
        return recipe

    @model_validator(mode="after")
    def _check(self) -> TorchQuantConfig:
        mixed = self.mixed_precision_ratio is not None or self.mixed_precision_algorithm is not None
        if self.high_bits_layers and mixed:
            raise ValueError("name the 8-bit layers or choose them (mixed_precision_ratio / _algorithm), not both")
        if self.mixed_precision_algorithm in MIXED_PRECISION_HEURISTICS and self.mixed_precision_ratio is not None:
            raise ValueError(f"{self.mixed_precision_algorithm} picks its layers by position: it takes no "
                             "mixed_precision_ratio")
        if self.mixed_precision_algorithm not in (None, *MIXED_PRECISION_HEURISTICS) \
                and self.mixed_precision_ratio is None:
            raise ValueError(f"{self.mixed_precision_algorithm} ranks the layers: give the share of weights left at "
                             f"{self.bits} bits (mixed_precision_ratio)")
        if self.mixed_precision_ratio is not None and self.mixed_precision_algorithm is None:
            object.__setattr__(self, "mixed_precision_algorithm", "kld_gradient")  # the best measured (docs)
        return self


@task(name="quantize-torch", cache_policy=RECIPE_CACHE)
def quantize_torch(model: Artifact, config: TorchQuantConfig) -> Artifact:
    """HF folder -> HF folder holding an Olive-format quantized checkpoint the builder reads."""
    return run_node(config, [model], model.store, _quantize)


# -- the algorithms ---------------------------------------------------------------------------------

def _qparams(w: Any, bits: int, symmetric: bool, search: bool = False) -> tuple[Any, Any]:
    """Scales and zero points per row of ``w`` [rows, group] (unsigned grid 0..2^bits - 1; the range
    always holds 0, as Olive's quantizer does). ``search``: the range is shrunk, per row, by the factor
    of 1.0, 0.98, ..., 0.6 whose rounding error (sum of |error|^2.4, GPTQ's own ``mse`` option) is least:
    clipping a row's few largest weights buys a finer grid for all the others."""
    import torch

    maxq = 2 ** bits - 1
    lo = torch.minimum(w.min(-1).values, w.new_zeros(()))
    hi = torch.maximum(w.max(-1).values, w.new_zeros(()))
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    if symmetric:  # the weight of largest magnitude lands on -2^(bits-1) exactly, whatever its sign (a negative
        # scale for a positive one): the grid's extra negative level serves either side (Q4_0's and onnxruntime's)
        hi = torch.where(hi >= lo.abs(), hi, lo)

    def grid(lo: Any, hi: Any) -> tuple[Any, Any]:
        if symmetric:
            scale = hi / -((maxq + 1) // 2)
            return scale, torch.full_like(scale, (maxq + 1) // 2)
        scale = (hi - lo) / maxq
        return scale, torch.round(-lo / scale).clamp(0, maxq)

    if not search:
        return grid(lo, hi)
    shrink = (1 - torch.arange(21, device=w.device) / 50).reshape(-1, *[1] * lo.dim())  # 1.0 ... 0.6 at once
    s, z = grid(lo * shrink, hi * shrink)  # [21, rows]
    error = ((_round(w, s[..., None], z[..., None], bits) - z[..., None]) * s[..., None] - w).abs_()
    best = error.pow_(2.4).sum(-1).argmin(0, keepdim=True)  # the first of equal errors: the widest range
    return s.gather(0, best)[0], z.gather(0, best)[0]


def _round(w: Any, scale: Any, zero: Any, bits: int) -> Any:
    import torch

    return torch.clamp(torch.round(w / scale + zero), 0, 2 ** bits - 1)


def rtn(w: Any, bits: int, group_size: int, symmetric: bool, search: bool = False) -> tuple[Any, Any, Any]:
    """Round to nearest: (q [out, in] integers, scales [out, groups], zeros [out, groups])."""
    out, k = w.shape
    g = w.float().reshape(out, k // group_size, group_size)
    scale, zero = _qparams(g, bits, symmetric, search)
    q = _round(g, scale[..., None], zero[..., None], bits)
    return q.reshape(out, k), scale, zero


def gptq(w: Any, h: Any, bits: int, group_size: int, symmetric: bool, damp: float = 0.01,
         block: int = 128, search: bool = False) -> tuple[Any, Any, Any]:
    """GPTQ on one weight [out, in] with the Hessian ``h`` = 2 X^T X / n of its inputs [in, in]:
    the columns are rounded in order, and each one's rounding error is spread over the columns not
    yet rounded through the inverse Hessian's Cholesky factor, so that the layer's output on the
    calibration inputs moves as little as possible. A group's scale and zero point are set when its
    first column is reached, from the weights as updated so far. Returns what ``rtn`` returns.

    Its column loop runs on torch's threads: the linears reading one input come stacked (hundreds to
    thousands of rows), where 2 threads beat 1 by 1.2-1.9x on this 2-core box (192 to 3,072 rows of 576,
    with and without the range search). On SmolLM2 the node's time is mostly the calibration windows'
    two passes through each decoder layer (before and after its quantization), not this loop."""
    import torch

    w = w.float().clone()
    out, k = w.shape
    h = h.float().clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(k, device=h.device) * damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    scales = torch.zeros(out, k // group_size, device=w.device)
    zeros = torch.zeros(out, k // group_size, device=w.device)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1, err = w[:, start:end].clone(), torch.zeros(out, end - start, device=w.device)
        hinv1 = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % group_size == 0:  # the group's columns as updated so far (within this block, or past it)
                ahead = w1[:, i:i + group_size] if i + group_size <= end - start else \
                    torch.cat([w1[:, i:], w[:, end:]], 1)[:, :group_size]
                scales[:, col // group_size], zeros[:, col // group_size] = _qparams(ahead, bits, symmetric, search)
            s, z = scales[:, col // group_size], zeros[:, col // group_size]
            qc = _round(w1[:, i], s, z, bits)
            q[:, col] = qc
            e = (w1[:, i] - (qc - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err[:, i] = e
        w[:, end:] -= err @ hinv[start:end, end:]
    return q, scales, zeros


def dequantize(q: Any, scales: Any, zeros: Any, group_size: int) -> Any:
    out, k = q.shape
    return ((q.reshape(out, -1, group_size) - zeros[..., None]) * scales[..., None]).reshape(out, k)


def output_error(w: Any, w_q: Any, h: Any) -> float:
    """The squared error quantization adds to the layer's output on its calibration inputs,
    trace((W - Q) H (W - Q)^T) (H = 2 X^T X / n), the quantity GPTQ minimizes."""
    d = (w.float() - w_q.float())
    return float(((d @ h.float()) * d).sum())


def output_stats(w: Any, h: Any, bits: int, group_size: int, symmetric: bool) -> dict[str, float]:
    """``output_error``'s stats for one layer: the error ``bits``-bit rounding adds to its output on the
    calibration data, and its output's size (their ratio ranks it: wide and narrow layers compare)."""
    q, s, z = rtn(w, bits, group_size, symmetric)
    return {"error": output_error(w, dequantize(q, s, z, group_size), h),
            "output": float(((w.float() @ h.float()) * w.float()).sum())}


def fake_quantize(group_size: int, symmetric: bool) -> Any:
    """Round to nearest at the node's grid, dequantized: what the mixed-precision scores compare."""
    def fake(w: Any, bits: int) -> Any:
        group = group_size if w.shape[1] % group_size == 0 else w.shape[1]
        return dequantize(*rtn(w, bits, group, symmetric), group)
    return fake


# -- the checkpoint ---------------------------------------------------------------------------------

def pack(values: Any, bits: int) -> Any:
    """Unsigned ``bits``-bit integers [rows, n] -> uint8 [rows, ceil(n * bits / 8)], the first value
    in the low bits (the layout MatMulNBits reads)."""
    import torch

    per = 8 // bits
    v = values.to(torch.uint8)
    if pad := (-v.shape[-1]) % per:
        v = torch.nn.functional.pad(v, (0, pad))
    out = torch.zeros(*v.shape[:-1], v.shape[-1] // per, dtype=torch.uint8)
    for i in range(per):
        out |= v[..., i::per] << (bits * i)
    return out


class Calibrated(Protocol):
    """What the calibration windows are cut from: quantize-torch's and prune-torch's fields."""

    @property
    def calibration(self) -> str: ...
    @property
    def calibration_samples(self) -> int: ...
    @property
    def calibration_seq_len(self) -> int: ...


def _calibration_tokens(config: Calibrated, folder: Path) -> tuple[Any, str]:
    """[samples, seq_len] token windows of the calibration text, and where they came from (logged)."""
    import torch
    from transformers import AutoTokenizer

    from grove.tasks._data_sources import BUILTIN_TEXT, read_text

    text = read_text(config.calibration, "--calibration_data")
    ids = AutoTokenizer.from_pretrained(str(folder))(text, add_special_tokens=False)["input_ids"]
    n = config.calibration_seq_len
    if config.calibration == BUILTIN_TEXT:  # the default evaluation scores the text's first 1024 tokens
        ids = ids[_BUILTIN_SKIP:] if len(ids) >= _BUILTIN_SKIP + n else ids[-n:]
    windows = min(config.calibration_samples, len(ids) // n)
    if windows < 1:
        raise InvalidRequest(f"--calibration_data {config.calibration}: {len(ids)} tokens, fewer than one "
                             f"calibration window of {n}; pass a longer text")
    if config.calibration == BUILTIN_TEXT:
        where = f"Grove's built-in text (the GPL-3), {windows} x {n} tokens after its first {_BUILTIN_SKIP}"
    else:
        where = f"{config.calibration}, {windows} x {n} tokens"
    return torch.tensor(ids[:windows * n]).reshape(windows, n), where


_BUILTIN_SKIP = 4096  # built-in calibration text: tokens left to the evaluation (it scores the first 1024)


def _layers(model: Any) -> Any:
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    raise InvalidRequest(f"{type(model).__name__}: Grove finds no decoder layers to quantize (model.layers)")


def _linears(layer: Any, prefix: str) -> dict[str, Any]:
    import torch

    return {f"{prefix}.{name}": m for name, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in _BUILDER_LINEARS}


def _layer_inputs(model: Any, layers: Any, tokens: Any) -> tuple[list[Any], list[dict[str, Any]]]:
    """The first decoder layer's positional inputs and keyword arguments, a batch of windows at a time."""
    import torch

    class _Stop(Exception):
        pass

    args: list[Any] = []
    kwargs: list[dict[str, Any]] = []

    def catch(_module: Any, a: tuple[Any, ...], kw: dict[str, Any]) -> None:
        args.append(a[0] if a else kw.pop("hidden_states"))
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for rows in tokens.split(_BATCH):  # windows of one length, no padding: a batch shares one set of kwargs
            with contextlib.suppress(_Stop), torch.no_grad():
                model(input_ids=rows, use_cache=False)
    finally:
        handle.remove()
    return args, kwargs


# Calibration windows run through a layer together: one [8, 512] batch instead of eight [1, 512] calls
# (the layer's small ops, rotary and norms, cost as much as its matmuls one window at a time).
_BATCH = 8


def layer_hessians(layer: Any, linears: dict[str, Any], xs: list[Any], kws: list[dict[str, Any]],
                   device: str = "cpu") -> tuple[dict[str, Any], dict[str, int], dict[str, str]]:
    """One pass of the calibration inputs through ``layer``: for each of its ``linears``, the sum of X^T X over
    its inputs and their count (H = 2 * sum / count), and the first linear reading the same input (q, k and v
    read one; gate and up another), whose X^T X is computed once for all of them."""
    import torch

    sums = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)
    last: list[Any] = [None, None, None]  # (input, its X^T X, first reader)
    readers: dict[str, str] = {}

    def hook(name: str) -> Any:
        def accumulate(_m: Any, inputs: tuple[Any, ...], _out: Any) -> None:
            if inputs[0] is not last[0]:
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                last[:] = [inputs[0], x.T @ x, name]
            readers.setdefault(name, last[2])
            sums[name] += last[1]
            counts[name] += inputs[0].numel() // inputs[0].shape[-1]
        return accumulate

    handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
    try:
        for x, kw in zip(xs, kws, strict=True):
            _run_layer(layer, x, kw)
    finally:
        for h in handles:
            h.remove()
    return sums, counts, readers


def _run_layer(layer: Any, x: Any, kwargs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        y = layer(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def _check_group_size(layers: Any, prefix: str, group_size: int) -> None:
    """Every quantized layer's inputs split into whole groups, checked before any calibration pass (on a
    large model the scoring and GPTQ passes take an hour before the first layer would find out)."""
    widths = {name: m.in_features for index, layer in enumerate(layers)
              for name, m in _linears(layer, f"{prefix}.{index}").items()}
    if not (bad := {name: k for name, k in widths.items() if k % group_size}):
        return
    name, k = next(iter(bad.items()))
    fits = [g for g in (256, 128, 64, 32, 16) if g < group_size and all(w % g == 0 for w in widths.values())]
    raise InvalidRequest(f"{name}: {k} inputs are not a multiple of the group size {group_size} ({len(bad)} "
                         f"layer{'s' if len(bad) > 1 else ''} of {len(widths)}); choose a group size (auto-opt's "
                         "--block_size, a recipe's group_size) that divides every layer's inputs"
                         + (f": {fits[0]}" if fits else ""))


def quantize_model(folder: Path, config: TorchQuantConfig) -> Iterator[tuple[str, Any]]:
    """Yields (checkpoint name, tensor) for the quantized checkpoint, after running the algorithm
    layer by layer; the last item is ("__stats__", dict)."""
    import torch
    from transformers import AutoModelForCausalLM

    log = node_logger()
    torch_spec(folder, "GPTQ / RTN / QuaRot / mixed-precision")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    if config.rotate:
        from grove.tasks._rotate import rotate_model

        rotation = rotate_model(model, seed=0)
        log.info("rotated by %s matrices (hidden %s: %s, heads %s: %s)%s", "Hadamard" if rotation["r1"] == "hadamard"
                 else "random orthogonal", rotation["hidden_size"], rotation["r1"], rotation["head_dim"],
                 rotation["r2"], "; the lm_head untied from the embedding" if rotation["untied_lm_head"] else "")
    layers = _layers(model)
    prefix = "model.layers" if getattr(getattr(model, "model", None), "layers", None) is layers else None
    if prefix is None:
        raise InvalidRequest(f"{type(model).__name__}: the builder reads quantized checkpoints of model.layers "
                             "decoders; quantize this one after the capture (--int4_algorithm rtn)")
    _check_group_size(layers, prefix, config.group_size)
    tokens, where = _calibration_tokens(config, folder)
    log.info("%s calibration: %s", config.algorithm.upper(), where)
    high = set(config.high_bits_layers)
    algorithm = config.mixed_precision_algorithm
    device = _compute_device(config)
    if algorithm not in (None, "output_error"):  # chosen up front; output_error needs the layer pass below
        high = set(_choose_high_bits(model, layers, prefix, tokens, config, device))
        config = config.model_copy(update={"mixed_precision_ratio": None, "mixed_precision_algorithm": None})
    xs, kws = _layer_inputs(model, layers, tokens)
    xs, kws = _to(xs, device), _to(kws, device)
    scores: dict[str, dict[str, float]] = {}
    numels: dict[str, int] = {}
    errors = {"gptq": 0.0, "rtn": 0.0}
    quantized: dict[str, tuple[Any, Any, Any, int]] = {}
    started = time.perf_counter()
    for index, layer in enumerate(layers):
        layer.to(device)
        linears = _linears(layer, f"{prefix}.{index}")
        sums, counts, readers = layer_hessians(layer, linears, xs, kws, device)
        batches: dict[tuple[str, int], list[str]] = {}  # one input, one bit width: one GPTQ over their rows
        for name, m in linears.items():
            h = 2 * sums[name] / max(counts[name], 1)
            w = m.weight.data
            if config.mixed_precision_ratio is not None:
                scores[name] = output_stats(w, h, config.bits, config.group_size, config.symmetric)
                numels[name] = w.numel()
                continue
            batches.setdefault((readers.get(name, name), 8 if name in high else config.bits), []).append(name)
        for (reader, layer_bits), names in batches.items():
            # GPTQ treats rows independently given the Hessian: the linears reading one input (q, k, v; gate,
            # up) are one weight of stacked rows, one column loop instead of three (the loop's cost is per column)
            h = 2 * sums[reader] / max(counts[reader], 1)
            ws = [linears[n].weight.data for n in names]
            q_all, s_all, z_all = _quantize_one(torch.cat(ws), h, layer_bits, config)
            start = 0
            for name, w in zip(names, ws, strict=True):
                rows = slice(start, start + w.shape[0])
                start += w.shape[0]
                q, s, z = q_all[rows], s_all[rows], z_all[rows]
                errors[config.algorithm] += output_error(w, dequantize(q, s, z, config.group_size), h)
                quantized[name] = (q.cpu(), s.cpu(), z.cpu(), layer_bits)
                linears[name].weight.data = dequantize(q, s, z, config.group_size).to(w.dtype)
        xs = [_run_layer(layer, x, kw) for x, kw in zip(xs, kws, strict=True)]  # the next layer's inputs
        layer.to("cpu")
        if (index + 1) % max(1, len(layers) // 8) == 0 or index + 1 == len(layers):
            log.info("%s: decoder layer %d of %d (%.0f s)", "scoring" if config.mixed_precision_ratio is not None
                     else config.algorithm.upper(), index + 1, len(layers), time.perf_counter() - started)
    if config.mixed_precision_ratio is not None:  # second pass: chosen layers at 8 bits, the rest at `bits`
        from grove.tasks._mixed_precision import promote

        high = set(promote("output_error", scores, numels, config.mixed_precision_ratio))
        _log_choice(log, "output_error", high, numels)
        yield from quantize_model(folder, config.model_copy(update={
            "mixed_precision_ratio": None, "mixed_precision_algorithm": None, "high_bits_layers": tuple(sorted(high))}))
        return
    head = _head_gptq(model, xs, config) if config.algorithm == "gptq" and config.head_bits is not None else None
    state = model.state_dict()
    for name, tensor in state.items():
        module = name.rsplit(".", 1)[0]
        if module in quantized:
            if name.endswith(".weight"):
                q, s, z, bits = quantized[module]
                for part, rows in _builder_names(module, q.shape[0], model):
                    yield f"{part}.qweight", pack(q[rows], bits)
                    yield f"{part}.scales", s[rows].to(torch.float32).contiguous()
                    yield f"{part}.qzeros", pack(z[rows], bits)
            else:
                yield name, tensor.contiguous()
        elif name == "lm_head.weight" and config.head_bits is not None:
            group = config.group_size if tensor.shape[1] % config.group_size == 0 else tensor.shape[1]
            q, s, z = head or rtn(tensor, config.head_bits, group, config.symmetric)
            yield "lm_head.qweight", pack(q, config.head_bits)
            yield "lm_head.scales", s.contiguous()
            yield "lm_head.qzeros", pack(z, config.head_bits)
        else:
            yield name, tensor.contiguous()
    if config.head_bits is not None and "lm_head.weight" not in state:  # tied and not saved: the embedding
        emb = model.get_input_embeddings().weight.data
        q, s, z = rtn(emb, config.head_bits, config.group_size, config.symmetric)
        yield "lm_head.qweight", pack(q, config.head_bits)
        yield "lm_head.scales", s.contiguous()
        yield "lm_head.qzeros", pack(z, config.head_bits)
    yield "__stats__", {"layers_quantized": len(quantized),
                        "layers_8bit": sorted(part for n, v in quantized.items() if v[3] == 8
                                              for part, _ in _builder_names(n, v[0].shape[0], model)),
                        "tied": bool(getattr(model.config, "tie_word_embeddings", False)),
                        "lm_head": None if config.head_bits is None else "gptq" if head else "rtn",
                        "output_error": round(errors[config.algorithm], 6), "calibration": where,
                        "calibration_tokens": int(tokens.numel())}


def _choose_high_bits(model: Any, layers: Any, prefix: str, tokens: Any, config: TorchQuantConfig,
                      device: str) -> tuple[str, ...]:
    """The 8-bit layers of an algorithm other than output_error (tasks/_mixed_precision.py), before any
    layer is quantized: a heuristic by position, a weight-only score, or kld_gradient on ``tokens``."""
    from grove.tasks import _mixed_precision as mp

    log = node_logger()
    algorithm = config.mixed_precision_algorithm or "output_error"
    per_layer = [_linears(layer, f"{prefix}.{index}") for index, layer in enumerate(layers)]
    if algorithm in mp.HEURISTICS:
        high = mp.heuristic(algorithm, [list(linears) for linears in per_layer])
        log.info("mixed precision %s: %d of %d linear layers keep 8 bits (layers %s of %d)", algorithm, len(high),
                 sum(map(len, per_layer)), ", ".join(str(i) for i in range(len(per_layer))
                                                     if mp.selected_by_position(i, len(per_layer))), len(per_layer))
        return high
    modules = {name: m for linears in per_layer for name, m in linears.items()}
    fake = fake_quantize(config.group_size, config.symmetric)
    if algorithm == "kld_gradient":
        step = max(1, tokens.shape[0] // 8)

        def progress(done: int, total: int) -> None:
            if done % step == 0 or done == total:
                log.info("kld_gradient: %d of %d calibration windows", done, total)

        try:
            stats = mp.kld_stats(model.to(device), modules, tokens.to(device), fake, config.bits, progress,
                                 layers=layers)
        finally:
            model.to("cpu")
    else:
        stats = {name: mp.weight_stats(algorithm, m.weight.data, fake, config.bits) for name, m in modules.items()}
    numels = {name: m.weight.numel() for name, m in modules.items()}
    high = mp.promote(algorithm, stats, numels, config.mixed_precision_ratio or 1.0)
    _log_choice(log, algorithm, set(high), numels)
    return high


def _log_choice(log: Any, algorithm: str, high: set[str], numels: dict[str, int]) -> None:
    share = sum(numels[n] for n in high) / max(sum(numels.values()), 1)
    log.info("mixed precision %s: %d of %d linear layers (%.0f%% of their weights) keep 8 bits: %s%s", algorithm,
             len(high), len(numels), 100 * share, ", ".join(sorted(high)[:4]), ", ..." if len(high) > 4 else "")


def _head_gptq(model: Any, xs: list[Any], config: TorchQuantConfig) -> tuple[Any, Any, Any] | None:
    """GPTQ on an lm_head of its own (untied, or untied by the rotation), on the final norm's outputs
    for the calibration windows (``xs``: the last layer's outputs). A head tied to the embedding keeps
    round to nearest: the embedding reads the same rows, and GPTQ's rows fit the head's inputs only."""
    import torch

    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    norm = getattr(getattr(model, "model", None), "norm", None)
    if head is None or norm is None or head.weight is embedding.weight or head.bias is not None \
            or head.weight.shape[1] % config.group_size:
        return None
    k, device = head.weight.shape[1], xs[0].device
    h, count = torch.zeros(k, k, device=device), 0
    norm.to(device)
    with torch.no_grad():
        for x in xs:
            y = norm(x).reshape(-1, k).float()
            h += y.T @ y
            count += y.shape[0]
    norm.to("cpu")
    node_logger().info("lm_head: GPTQ at %d bits on the final norm's outputs", config.head_bits)
    q, s, z = gptq(head.weight.data.to(device), 2 * h / max(count, 1), config.head_bits or 8, config.group_size,
                   config.symmetric, config.damp, search=config.clip_search)
    return q.cpu(), s.cpu(), z.cpu()


def _builder_names(module: str, rows: int, model: Any) -> list[tuple[str, slice]]:
    """The names (and rows) a quantized linear is written under: phi3's fused qkv_proj and gate_up_proj
    as the q/k/v and gate/up the builder splits them into anyway, because onnxruntime-genai 0.18 splits a
    fused layer's packed Olive zero points at the packed row count (intermediate_size / 2 for 4 bits), which
    gives gate_proj and up_proj zero points of the wrong size (onnxruntime refuses the graph)."""
    parent, _, leaf = module.rpartition(".")
    if leaf == "gate_up_proj":
        return [(f"{parent}.gate_proj", slice(0, rows // 2)), (f"{parent}.up_proj", slice(rows // 2, rows))]
    if leaf == "qkv_proj":
        from grove.tasks._rotate import qkv_rows

        return [(f"{parent}.{part}", r) for part, r in zip(("q_proj", "k_proj", "v_proj"), qkv_rows(model.config),
                                                            strict=True)]
    return [(module, slice(None))]


def _compute_device(config: TorchQuantConfig) -> str:
    """cuda on a GPU pool's node (the layers visit the GPU one at a time), else cpu; a GPU node whose torch
    has no CUDA says so and runs on the CPU."""
    import torch

    if config.placement != "gpu":
        return "cpu"
    if torch.cuda.is_available():
        node_logger().info("%s on %s", config.algorithm.upper(), torch.cuda.get_device_name())
        return "cuda"
    node_logger().warning("quantize-torch placed on the GPU pool, but this torch has no CUDA: running on the CPU "
                          "(install the CUDA build of torch on GPU workers)")
    return "cpu"


def _to(value: Any, device: str) -> Any:
    """Tensors in (nested lists, tuples and dicts of) ``value`` moved to ``device``."""
    if hasattr(value, "to") and hasattr(value, "device"):
        return value.to(device)
    if isinstance(value, list | tuple):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _quantize_one(w: Any, h: Any, bits: int, config: TorchQuantConfig) -> tuple[Any, Any, Any]:
    if config.algorithm == "gptq":
        return gptq(w, h, bits, config.group_size, config.symmetric, config.damp, search=config.clip_search)
    return rtn(w, bits, config.group_size, config.symmetric, config.clip_search)


def _quantize(inputs: list[Path], config: TorchQuantConfig, out: Path) -> dict[str, object]:
    from safetensors.torch import save_file

    (src,) = inputs
    tensors: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for name, value in quantize_model(src, config):
        if name == "__stats__":
            stats = value
        else:
            tensors[name] = value
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")) \
                and f.name not in ("config.json", "manifest.json"):
            shutil.copy2(f, out / f.name)
    hf_config = json.loads((src / "config.json").read_text())
    overrides = {n: {"bits": 8} for n in stats.get("layers_8bit", []) if config.bits != 8}
    if config.head_bits is not None:
        overrides["lm_head"] = {"bits": config.head_bits}
    hf_config["quantization_config"] = {"quant_method": "olive", "bits": config.bits, "group_size": config.group_size,
                                        "symmetric": config.symmetric, "lm_head": config.head_bits is not None,
                                        "embeds": False, "overrides": overrides or None}
    hf_config.pop("torch_dtype", None)
    hf_config["dtype"] = "float32"
    if config.rotate:  # the rotation folded the final norm into the lm_head: no longer the embedding's rows
        hf_config["tie_word_embeddings"] = stats["tied"]
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    node_logger().info("%s int%d, group %d%s: %d linear layers (%d at 8 bits), output error %.4g", config.algorithm,
                       config.bits, config.group_size, ", symmetric" if config.symmetric else "",
                       stats["layers_quantized"], len(stats["layers_8bit"]), stats["output_error"])
    return {"algorithm": config.algorithm, "bits": config.bits, "group_size": config.group_size,
            **{k: v for k, v in stats.items() if k not in ("layers_8bit", "tied")},
            "layers_8bit": len(stats["layers_8bit"]), **({"rotated": True} if config.rotate else {})}
