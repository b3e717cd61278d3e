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

Mixed precision (``high_bits_layers``): the linear layers named there keep ``high_bits`` (8) bits,
Olive's SelectiveMixedPrecision output. ``sensitivity()`` ranks layers by the error 4-bit
quantization adds to their output on the calibration data (the Hessian-weighted squared error,
trace((W - Q) H (W - Q)^T)), and ``choose_high_bits`` keeps the worst share at 8 bits."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import Field, model_validator

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node

__all__ = ["TorchQuantConfig", "gptq", "quantize_torch", "rtn", "sensitivity"]

# The linear layers of a decoder layer that the builder reads from a quantized checkpoint.
_BUILDER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                    "gate_up_proj", "dense", "fc1", "fc2", "dense_h_to_4h", "dense_4h_to_h", "query_key_value")


class TorchQuantConfig(StepConfig):
    NODE = "quantize-torch"
    VERSION = 2  # 2: symmetric groups put the weight of largest magnitude on -2^(bits-1) (a signed scale);
    # gptq quantizes an lm_head of its own with GPTQ too
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
                                                "layers kept at `bits`; the most sensitive others keep 8 bits")
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
        for key in ("rotate", "clip_search"):  # off: the key of the checkpoints quantized before it existed
            if not recipe[key]:
                del recipe[key]
        return recipe

    @model_validator(mode="after")
    def _check(self) -> TorchQuantConfig:
        if self.high_bits_layers and self.mixed_precision_ratio is not None:
            raise ValueError("name the 8-bit layers or give a mixed_precision_ratio, not both")
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
    lo = torch.minimum(w.min(-1).values, torch.zeros(()))
    hi = torch.maximum(w.max(-1).values, torch.zeros(()))
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

    scale, zero = grid(lo, hi)
    if not search:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for step in range(21):
        s, z = grid(lo * (1 - step / 50), hi * (1 - step / 50))
        error = ((_round(w, s[..., None], z[..., None], bits) - z[..., None]) * s[..., None] - w).abs_()
        error = error.pow_(2.4).sum(-1)
        better = error < best
        best, scale, zero = torch.where(better, error, best), torch.where(better, s, scale), \
            torch.where(better, z, zero)
    return scale, zero


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
    first column is reached, from the weights as updated so far. Returns what ``rtn`` returns."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small column updates: 13x faster than 2 threads' handoffs (measured)
    try:
        return _gptq(w, h, bits, group_size, symmetric, damp, block, search)
    finally:
        torch.set_num_threads(threads)


def _gptq(w: Any, h: Any, bits: int, group_size: int, symmetric: bool, damp: float, block: int,
          search: bool) -> tuple[Any, Any, Any]:
    import torch

    w = w.float().clone()
    out, k = w.shape
    h = h.float().clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(k) * damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    scales = torch.zeros(out, k // group_size)
    zeros = torch.zeros(out, k // group_size)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1, err = w[:, start:end].clone(), torch.zeros(out, end - start)
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


def sensitivity(w: Any, h: Any, bits: int, group_size: int, symmetric: bool) -> float:
    """A layer's sensitivity to ``bits``-bit rounding: its output error on the calibration data,
    relative to its output's size (so that wide and narrow layers compare)."""
    q, s, z = rtn(w, bits, group_size, symmetric)
    return output_error(w, dequantize(q, s, z, group_size), h) / max(float(((w.float() @ h.float()) * w.float())
                                                                            .sum()), 1e-12)


# Projections the builder fuses into one MatMulNBits, which has one bit width: they keep the same bits.
_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def choose_high_bits(scores: dict[str, float], ratio: float) -> tuple[str, ...]:
    """Olive's SelectiveMixedPrecision ``ratio``: the share of layers kept at low bits; the rest, the
    most sensitive, keep 8 bits. Projections the builder fuses into one MatMulNBits (q/k/v, gate/up)
    are one unit, as sensitive as its most sensitive member: units are taken, most sensitive first,
    until the 8-bit layers reach their share."""
    units: dict[str, list[str]] = {}
    for name in scores:
        module, _, leaf = name.rpartition(".")
        group = next((g for g in _FUSED if leaf in g), (leaf,))
        units.setdefault(f"{module}.{'+'.join(group)}", []).append(name)
    keep = len(scores) - round(ratio * len(scores))
    chosen: list[str] = []
    for members in sorted(units.values(), key=lambda m: -max(scores[n] for n in m)):
        if len(chosen) >= keep:
            break
        chosen += members
    return tuple(sorted(chosen))


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


def _calibration_tokens(config: TorchQuantConfig, folder: Path) -> tuple[Any, str]:
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


def _run_layer(layer: Any, x: Any, kwargs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        y = layer(x, **kwargs)
    return y[0] if isinstance(y, tuple) else y


def quantize_model(folder: Path, config: TorchQuantConfig) -> Iterator[tuple[str, Any]]:
    """Yields (checkpoint name, tensor) for the quantized checkpoint, after running the algorithm
    layer by layer; the last item is ("__stats__", dict)."""
    import torch
    from transformers import AutoModelForCausalLM

    log = node_logger()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    if config.rotate:
        from grove.tasks._rotate import rotate_model

        rotation = rotate_model(model, seed=0)
        log.info("rotated by %s matrices (hidden %s: %s, heads %s: %s)%s", "Hadamard" if rotation["r1"] == "hadamard"
                 else "random orthogonal", rotation["hidden_size"], rotation["r1"], rotation["head_dim"],
                 rotation["r2"], "; the lm_head untied from the embedding" if rotation["untied_lm_head"] else "")
    tokens, where = _calibration_tokens(config, folder)
    log.info("%s calibration: %s", config.algorithm.upper(), where)
    layers = _layers(model)
    prefix = "model.layers" if getattr(getattr(model, "model", None), "layers", None) is layers else None
    if prefix is None:
        raise InvalidRequest(f"{type(model).__name__}: the builder reads quantized checkpoints of model.layers "
                             "decoders; quantize this one after the capture (--int4_algorithm rtn)")
    xs, kws = _layer_inputs(model, layers, tokens)
    high = set(config.high_bits_layers)
    scores: dict[str, float] = {}
    errors = {"gptq": 0.0, "rtn": 0.0}
    quantized: dict[str, tuple[Any, Any, Any, int]] = {}
    hessians: dict[str, Any] = {}
    for index, layer in enumerate(layers):
        linears = _linears(layer, f"{prefix}.{index}")
        sums = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
        counts = dict.fromkeys(linears, 0)
        last: list[Any] = [None, None]  # (input tensor, its X^T X): q, k and v (gate and up) read one input

        def hook(name: str) -> Any:
            def accumulate(_m: Any, inputs: tuple[Any, ...], _out: Any) -> None:
                if inputs[0] is not last[0]:  # noqa: B023 - the hooks are removed before the next layer's loop
                    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                    last[:] = [inputs[0], x.T @ x]  # noqa: B023
                sums[name] += last[1]  # noqa: B023
                counts[name] += inputs[0].numel() // inputs[0].shape[-1]  # noqa: B023
            return accumulate

        handles = [m.register_forward_hook(hook(name)) for name, m in linears.items()]
        for x, kw in zip(xs, kws, strict=True):
            _run_layer(layer, x, kw)
        for h in handles:
            h.remove()
        last.clear()
        for name, m in linears.items():
            h = 2 * sums[name] / max(counts[name], 1)
            w = m.weight.data
            if w.shape[1] % config.group_size:
                raise InvalidRequest(f"{name}: {w.shape[1]} inputs are not a multiple of the group size "
                                     f"{config.group_size}; pass a group size that divides it (e.g. 32)")
            if config.mixed_precision_ratio is not None:
                scores[name] = sensitivity(w, h, config.bits, config.group_size, config.symmetric)
                hessians[name] = h
                continue
            layer_bits = 8 if name in high else config.bits
            q, s, z = _quantize_one(w, h, layer_bits, config)
            errors[config.algorithm] += output_error(w, dequantize(q, s, z, config.group_size), h)
            quantized[name] = (q, s, z, layer_bits)
            m.weight.data = dequantize(q, s, z, config.group_size).to(w.dtype)
        xs = [_run_layer(layer, x, kw) for x, kw in zip(xs, kws, strict=True)]  # the next layer's inputs
    if config.mixed_precision_ratio is not None:  # second pass: chosen layers at 8 bits, the rest at `bits`
        high = set(choose_high_bits(scores, config.mixed_precision_ratio))
        log.info("mixed precision: %d of %d linear layers keep 8 bits (most sensitive: %s)", len(high), len(scores),
                 ", ".join(sorted(high, key=lambda n: -scores[n])[:3]))
        yield from quantize_model(folder, config.model_copy(update={"mixed_precision_ratio": None,
                                                                    "high_bits_layers": tuple(sorted(high))}))
        return
    head = _head_gptq(model, xs, config) if config.algorithm == "gptq" and config.head_bits is not None else None
    state = model.state_dict()
    for name, tensor in state.items():
        module = name.rsplit(".", 1)[0]
        if module in quantized:
            if name.endswith(".weight"):
                q, s, z, bits = quantized[module]
                yield f"{module}.qweight", pack(q, bits)
                yield f"{module}.scales", s.to(torch.float32).contiguous()
                yield f"{module}.qzeros", pack(z, bits)
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
    yield "__stats__", {"layers_quantized": len(quantized), "layers_8bit": sorted(n for n, v in quantized.items()
                                                                                  if v[3] == 8),
                        "tied": bool(getattr(model.config, "tie_word_embeddings", False)),
                        "lm_head": None if config.head_bits is None else "gptq" if head else "rtn",
                        "output_error": round(errors[config.algorithm], 6), "calibration": where,
                        "calibration_tokens": int(tokens.numel())}


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
    k = head.weight.shape[1]
    h, count = torch.zeros(k, k), 0
    with torch.no_grad():
        for x in xs:
            y = norm(x).reshape(-1, k).float()
            h += y.T @ y
            count += y.shape[0]
    node_logger().info("lm_head: GPTQ at %d bits on the final norm's outputs", config.head_bits)
    return gptq(head.weight.data, 2 * h / max(count, 1), config.head_bits or 8, config.group_size, config.symmetric,
                config.damp, search=config.clip_search)


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
