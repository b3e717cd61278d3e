"""Which of a decoder's linear layers keep 8 bits when the others are quantized to 4: Olive's
SelectiveMixedPrecision algorithms, and Grove's own output error (the quantize-torch node's
``mixed_precision_algorithm``).

- Three fixed heuristics, llama.cpp's k-quant mixes as Olive names them (``high_precision_lm_head``,
  ``high_precision_mlp_down``, ``high_precision_mlp_down_qkv``; formerly ``k_quant_last``, ``_down``,
  ``_mixed``): the lm_head, plus down_proj (and q/k/v) of the first and last eighth of the layers and of
  every third layer between. No data, no ratio.
- Four weight-only scores, each from the layer's 4-bit round-to-nearest error (and its 8-bit one for the
  ``_relative`` forms): ``snr`` (signal-to-noise of the weights, dB), ``snr_relative`` (its loss against
  8 bits), ``iqe`` (the worst row's mean squared error) and ``iqe_relative`` (its ratio to 8 bits').
- ``kld_gradient`` (mlx-lm's dynamic quantization, Olive's default): the model with every linear layer
  at 4 bits is run on the calibration windows, the KL divergence of its next-token
  distribution from the original model's is back-propagated, and each layer scores the first-order
  drop of that divergence were it 8-bit, sum(grad * (W4 - W8)), per million weights.
- ``output_error`` (Grove's first measure): the layer's 4-bit output error on the calibration inputs,
  trace((W - Q) H (W - Q)^T), relative to its output's size.

kld_gradient is the default: on SmolLM2 at ratio 0.65 it keeps the layers that matter to the output
distribution, where the per-layer measures do not see how errors compound (bench/bench_gptq.py
--mixed_algorithms; docs/olive-compatibility.md has the table).

The scored ones select as Olive does: the projections the model builder fuses into one MatMulNBits
(q/k/v, gate/up), which has one bit width, are one unit (their stats combined as for the fused weight);
units are promoted most sensitive first until the promoted weights reach (1 - ratio) of all of them
(``ratio``: the share of *weights*, not of layers, left at 4 bits).

Written here rather than called from Olive: olive-ai's pass runs on Olive's own model handler and
writes a model attribute its later passes read, and its scoring is tied to its quantizer classes; the
algorithms are each a few lines of tensor arithmetic on what quantize-torch already holds."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from grove.tasks._choices import MIXED_PRECISION_HEURISTICS

__all__ = ["HEURISTICS", "OLIVE_ALIASES", "SCORED", "heuristic", "kld_stats", "promote",
           "selected_by_position", "weight_stats"]

HEURISTICS = MIXED_PRECISION_HEURISTICS
WEIGHT_SCORES = ("snr", "snr_relative", "iqe", "iqe_relative")
SCORED = ("output_error", "kld_gradient", *WEIGHT_SCORES)
OLIVE_ALIASES = {"k_quant_last": "high_precision_lm_head", "k_quant_down": "high_precision_mlp_down",
                 "k_quant_mixed": "high_precision_mlp_down_qkv"}

_ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value")
_MLP_OUTPUTS = ("down_proj", "fc2", "dense_4h_to_h")
# Projections the builder fuses into one MatMulNBits, which has one bit width: they keep the same bits.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_EPS = 1e-12

FakeQuant = Callable[[Any, int], Any]  # (weight, bits) -> the weight rounded to that grid, dequantized


def selected_by_position(index: int, count: int) -> bool:
    """The k-quant mixes' layers: the first and last eighth, and every third one between."""
    return index < count / 8 or index >= 7 * count / 8 or (index - count // 8) % 3 == 2


def heuristic(algorithm: str, layers: list[list[str]]) -> tuple[str, ...]:
    """The decoder linears a fixed heuristic keeps at 8 bits (``layers``: each decoder layer's linear
    names, in order). The lm_head, which all three keep at 8 bits, is quantize-torch's ``head_bits``."""
    leaves = () if algorithm == "high_precision_lm_head" else \
        _MLP_OUTPUTS + (_ATTENTION_INPUTS if algorithm == "high_precision_mlp_down_qkv" else ())
    return tuple(sorted(name for index, names in enumerate(layers) if selected_by_position(index, len(layers))
                        for name in names if name.rsplit(".", 1)[-1] in leaves))


def _squares(a: Any, b: Any) -> tuple[float, float]:
    a, d = a.float(), a.float() - b.float()
    return float((a * a).sum()), float((d * d).sum())


def weight_stats(algorithm: str, w: Any, fake: FakeQuant, bits: int) -> dict[str, float]:
    """One layer's stats for a weight-only score (``fake``: the node's round to nearest)."""
    low = fake(w, bits)
    if algorithm.startswith("snr"):
        signal, noise = _squares(w, low)
        stats = {"signal": signal, "noise": noise}
        if algorithm == "snr_relative":
            stats["high_noise"] = _squares(w, fake(w, 8))[1]
        return stats
    stats = {"iqe": float(((w.float() - low.float()) ** 2).mean(-1).max())}
    if algorithm == "iqe_relative":
        stats["high_iqe"] = float(((w.float() - fake(w, 8).float()) ** 2).mean(-1).max())
    return stats


def kld_stats(model: Any, modules: dict[str, Any], tokens: Any, fake: FakeQuant, bits: int,
              progress: Callable[[int, int], None] | None = None,
              layers: Iterable[Any] = ()) -> dict[str, dict[str, float]]:
    """``kld_gradient``'s stats: on each window of ``tokens`` [windows, seq], ``model`` is run as it is
    (the teacher), then with ``modules`` (name -> its nn.Linear) at ``bits`` (the student), and the KL
    divergence of the student's next-token distribution from the teacher's is back-propagated; a layer's
    alignment is its weight gradient dotted with (W_low - W_8bit), averaged over the windows.

    No copy of the model: the student is the same model whose scored layers, while it runs, multiply by
    their low-bit weights (kept at 16 bits, with W_low - W_8bit beside them) in an autograd function whose
    backward folds the layer's gradient into its alignment at once, so no weight gradient is stored either.
    Extra memory: two 16-bit tensors per scored weight (an fp32 model's linear layers' size), where a
    4-bit copy of the model plus its gradients took twice the model's.

    ``layers`` (the decoder layers) are checkpointed in the student's pass: each keeps only its input for
    the backward, which runs it again, instead of every intermediate tensor of every layer."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own alias

    _check_memory(model, modules)
    weight = next(iter(modules.values())).weight
    store = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else torch.float16
    low, delta = {}, {}
    with torch.no_grad():
        for name, module in modules.items():
            w_low, w_high = fake(module.weight.data, bits), fake(module.weight.data, 8)
            low[name], delta[name] = w_low.to(store), (w_low.float() - w_high.float()).to(store)
            del w_low, w_high
    alignment: dict[str, Any] = dict.fromkeys(modules, 0.0)  # 0-d tensors once a backward has run
    function = _low_bits_function()
    anchor = torch.zeros((), device=weight.device, requires_grad=True)  # makes the student's outputs need grads

    def student_forward(name: str, module: Any) -> Callable[[Any], Any]:
        return lambda x: function.apply(x, anchor, low[name], delta[name], module.bias, name, alignment)

    trained = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)  # no parameter gradient is wanted: the alignments are summed in the backward
    windows, layers = tokens.shape[0], list(layers)
    try:
        for i, row in enumerate(tokens):
            with torch.no_grad():
                teacher = F.log_softmax(model(input_ids=row[None], use_cache=False).logits.float(), -1)
            # Instance attributes (nn.Module.__call__ calls them), kept through the backward: a checkpointed
            # layer runs its student forward again there.
            for name, module in modules.items():
                module.forward = student_forward(name, module)
            for layer in layers:
                layer.forward = _checkpointed(layer)
            try:
                logits = model(input_ids=row[None], use_cache=False).logits.float()
                loss = F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="none").sum(-1).mean()
                loss.backward()
            finally:
                for module in (*modules.values(), *layers):
                    del module.forward  # the class's forward again
            del teacher, logits, loss
            if progress is not None:
                progress(i + 1, windows)
    finally:
        for parameter, flag in trained.items():
            parameter.requires_grad_(flag)
    return {name: {"alignment": float(value) / windows} for name, value in alignment.items()}


def _checkpointed(layer: Any) -> Callable[..., Any]:
    """``layer``'s own forward under activation checkpointing (non-reentrant: its input needs no grad)."""
    from torch.utils.checkpoint import checkpoint

    forward = type(layer).forward
    return lambda *args, **kwargs: checkpoint(forward, layer, *args, use_reentrant=False, **kwargs)


@functools.cache
def _low_bits_function() -> Any:
    """y = x W_low^T (+ bias) whose backward adds (dL/dW) . (W_low - W_8bit) to the layer's alignment, with
    dL/dW = g^T x of this window, computed and dropped one layer at a time."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own alias

    class LowBits(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, anchor: Any, low: Any, delta: Any, bias: Any, name: str,
                    sink: dict[str, Any]) -> Any:
            ctx.save_for_backward(x)
            ctx.low, ctx.delta, ctx.name, ctx.sink = low, delta, name, sink
            return F.linear(x, low.to(x.dtype), bias)

        @staticmethod
        def backward(ctx: Any, g: Any) -> tuple[Any, ...]:
            (x,) = ctx.saved_tensors
            grad_w = g.reshape(-1, g.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float()
            ctx.sink[ctx.name] = ctx.sink[ctx.name] + (grad_w * ctx.delta.float()).sum()  # no device sync here
            grad_x = g @ ctx.low.to(g.dtype) if ctx.needs_input_grad[0] else None
            return grad_x, None, None, None, None, None, None

    return LowBits


def available_bytes(device: str = "cpu") -> int | None:
    """Memory ``device`` can still hand out (the GPU's free memory; Linux's MemAvailable), or None where it
    is not known."""
    if device != "cpu":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _check_memory(model: Any, modules: dict[str, Any]) -> None:
    """kld_gradient holds two 16-bit tensors per scored weight (its low-bit weights, their distance to 8
    bits): one clear error before they are made, rather than the kernel's OOM kill halfway through."""
    from grove.errors import InvalidRequest

    device = str(next(model.parameters()).device)
    need = sum(m.weight.numel() * 2 * 2 for m in modules.values())
    free = available_bytes(device)
    if free is not None and need > free:
        where = "this machine has" if device == "cpu" else f"{device} has"
        raise InvalidRequest(f"kld_gradient needs {need / 1e9:.1f} GB more memory (its layers' 4-bit weights and "
                             f"their distance to 8 bits, at 16 bits) and {where} {free / 1e9:.1f} GB free: choose "
                             "--mixed_precision_algorithm snr or output_error (nothing held), or a machine with more "
                             "memory")


def _sum(stats: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(s[k] for s in stats) for k in stats[0]}


def _max(stats: list[dict[str, float]]) -> dict[str, float]:
    return {k: max(s[k] for s in stats) for k in stats[0]}


def _db(signal: float, noise: float) -> float:
    return 10 * math.log10(max(signal, _EPS * _EPS) / max(noise, _EPS * _EPS))


# algorithm -> (how a unit's members' stats combine, the unit's sensitivity: higher keeps 8 bits first)
_Stats = dict[str, float]
_RANK: dict[str, tuple[Callable[[list[_Stats]], _Stats], Callable[[_Stats, int], float]]] = {
    "output_error": (_sum, lambda s, _n: s["error"] / max(s["output"], _EPS)),
    "kld_gradient": (_sum, lambda s, n: s["alignment"] / (max(n, 1) / 1e6)),
    "snr": (_sum, lambda s, _n: -_db(s["signal"], s["noise"])),
    "snr_relative": (_sum, lambda s, _n: _db(s["signal"], s["high_noise"]) - _db(s["signal"], s["noise"])),
    "iqe": (_max, lambda s, _n: s["iqe"]),
    "iqe_relative": (_max, lambda s, _n: s["iqe"] / (s["high_iqe"] + _EPS)),
}


def units(names: list[str]) -> list[list[str]]:
    """The layers grouped as the builder fuses them (one MatMulNBits, one bit width)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        group = next((g for g in FUSED if leaf in g), (leaf,))
        groups.setdefault(f"{module}.{'+'.join(group)}", []).append(name)
    return list(groups.values())


def promote(algorithm: str, stats: dict[str, dict[str, float]], numels: dict[str, int],
            ratio: float) -> tuple[str, ...]:
    """The layers kept at 8 bits: units, most sensitive first, until they hold (1 - ratio) of the weights."""
    combine, score = _RANK[algorithm]
    ranked = sorted(units(list(stats)), key=lambda m: -score(combine([stats[n] for n in m]),
                                                             sum(numels[n] for n in m)))
    threshold = (1 - ratio) * sum(numels.values())
    chosen: list[str] = []
    promoted = 0
    for members in ranked:
        if promoted >= threshold:
            break
        chosen += members
        promoted += sum(numels[n] for n in members)
    return tuple(sorted(chosen))
