"""Node ``prune-torch``: SparseGPT (Frantar & Alistarh, 2023) on a Hugging Face decoder's weights before the
capture (Olive's ``SparseGPT`` pass, ``auto-opt --sparsity``). Each decoder layer's linear weights lose a
share of their entries (``0.5``: half of each block of columns; ``2:4``: two of every four consecutive
inputs of a row, the pattern NVIDIA's sparse tensor cores run), and the weights kept absorb the error: the
columns are pruned in order, and each one's error is spread over the columns not yet reached through the
inverse Hessian of the layer's calibration inputs, as GPTQ spreads rounding error. The mask is chosen a
block of columns at a time by the OBS saliency w^2 / [H^-1]_jj^2, so a weight the layer's output leans on
survives even when it is small.

Written here, beside Grove's GPTQ (tasks/quantize_torch.py), rather than taken from a library: the
reference implementation is a research repository, not a package, and Olive's pass is its copy; the
algorithm is GPTQ's column loop with a mask in place of the rounding, and it reuses that node's layer-by-layer
calibration (one decoder layer's activations in memory, each layer fed the pruned layers' outputs).

The output is a plain checkpoint (the pruned weights, zeros stored as zeros, in float32) that the capture
reads as any other; onnxruntime's CPU kernels do not skip zeros, so the gain is what a sparse-aware runtime
or a later compression makes of it, and the report measures what the pruning cost."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field, field_validator

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks import quantize_torch as qt
from grove.tasks.architectures import torch_spec

__all__ = ["PruneConfig", "magnitude_prune", "parse_sparsity", "prune_torch", "sparsegpt"]

_PATTERN = re.compile(r"^(?:(?P<n>[1-9]\d*):(?P<m>[1-9]\d*)|(?P<share>0?\.\d+))$")


def parse_sparsity(value: str) -> tuple[float, int, int]:
    """``"0.5"`` -> (0.5, 0, 0), unstructured; ``"2:4"`` -> (0.5, 2, 4), n of every m inputs pruned. Raises
    ValueError naming the two forms."""
    match = _PATTERN.match(value.strip())
    if match is None or (match["n"] and int(match["n"]) >= int(match["m"])) \
            or (match["share"] and not 0 < float(match["share"]) < 1):
        raise ValueError(f"sparsity {value!r}: a share of the weights to prune, 0 < s < 1 (e.g. 0.5), or N:M, N "
                         "of every M consecutive inputs (e.g. 2:4)")
    if match["n"]:
        n, m = int(match["n"]), int(match["m"])
        return n / m, n, m
    return float(match["share"]), 0, 0


class PruneConfig(StepConfig):
    NODE = "prune-torch"
    VERSION = 1
    sparsity: str = Field(description="share of each linear layer's weights set to zero (0.5), or N:M (2:4)")
    block: int = Field(128, ge=1, description="columns per block: an unstructured mask is chosen a block at a time")
    damp: float = Field(0.01, gt=0, lt=1, description="dampening, a share of the Hessian's mean diagonal")
    calibration: str = Field("builtin:GPL-3", description="calibration text: builtin:GPL-3, a file, or a table")
    calibration_sha256: str = Field("", description="digest of the calibration text (the cache key reads it)")
    calibration_samples: int = Field(32, ge=1, le=1024, description="windows of calibration tokens")
    calibration_seq_len: int = Field(512, ge=16, le=8192, description="tokens per calibration window")

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, value: str) -> str:
        parse_sparsity(value)
        return value.strip()


@task(name="prune-torch", cache_policy=RECIPE_CACHE)
def prune_torch(model: Artifact, config: PruneConfig) -> Artifact:
    """HF folder -> HF folder whose decoder layers' linear weights are pruned by SparseGPT."""
    return run_node(config, [model], model.store, _prune)


# -- the algorithms ---------------------------------------------------------------------------------

def _saliency(w: Any, hinv_diag: Any) -> Any:
    """OBS: the output error of zeroing each weight alone, w^2 / [H^-1]_jj^2 (up to a constant)."""
    return w ** 2 / hinv_diag[None, :] ** 2


def sparsegpt(w: Any, h: Any, sparsity: float, n: int = 0, m: int = 0, block: int = 128,
              damp: float = 0.01) -> Any:
    """SparseGPT on one weight [out, in] with its inputs' Hessian ``h`` = 2 X^T X / samples [in, in]. Returns
    the pruned weight: ``sparsity`` of each block's entries zero (``n`` of every ``m`` inputs of a row when
    ``n``), the others updated to keep the layer's output on the calibration inputs."""
    import torch

    w = w.float().clone()
    rows, k = w.shape
    h = h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(k, device=h.device) * damp * torch.mean(torch.diag(h))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    for start in range(0, k, block):
        end = min(start + block, k)
        w1, err = w[:, start:end].clone(), torch.zeros(rows, end - start, device=w.device)
        hinv1 = hinv[start:end, start:end]
        diag = torch.diag(hinv1)
        if n:
            mask = torch.zeros_like(w1, dtype=torch.bool)
        else:  # the block's least salient entries, all rows together
            scores = _saliency(w1, diag)
            mask = scores <= torch.kthvalue(scores.flatten(), max(1, int(scores.numel() * sparsity)))[0]
        for i in range(end - start):
            if n and i % m == 0:  # the group's mask from its weights as updated so far
                scores = _saliency(w1[:, i:i + m], diag[i:i + m])
                mask.scatter_(1, i + torch.topk(scores, n, dim=1, largest=False)[1], True)
            col = w1[:, i]
            kept = torch.where(mask[:, i], torch.zeros_like(col), col)
            e = (col - kept) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = kept
            err[:, i] = e
        w[:, start:end] = w1
        w[:, end:] -= err @ hinv[start:end, end:]
    return w


def magnitude_prune(w: Any, sparsity: float, n: int = 0, m: int = 0) -> Any:
    """The baseline: the smallest weights by magnitude set to zero, the others unchanged (per row's groups of
    ``m`` when ``n``, else over the whole weight)."""
    import torch

    w = w.float().clone()
    if n:
        groups = w.reshape(w.shape[0], -1, m)
        drop = torch.topk(groups.abs(), n, dim=-1, largest=False)[1]
        return groups.scatter(-1, drop, 0.0).reshape(w.shape)
    threshold = torch.kthvalue(w.abs().flatten(), max(1, int(w.numel() * sparsity)))[0]
    return torch.where(w.abs() <= threshold, torch.zeros_like(w), w)


# -- the node ---------------------------------------------------------------------------------------

def _prune(inputs: list[Path], config: PruneConfig, out: Path) -> dict[str, object]:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    (src,) = inputs
    log = node_logger()
    torch_spec(src, "SparseGPT")
    sparsity, n, m = parse_sparsity(config.sparsity)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    model.eval()
    layers = qt._layers(model)  # noqa: SLF001 - the GPTQ node's layer walk, shared
    prefix = "model.layers" if getattr(getattr(model, "model", None), "layers", None) is layers else None
    if prefix is None:
        raise InvalidRequest(f"{type(model).__name__}: Grove prunes model.layers decoders")
    if n and (odd := next((name for i, layer in enumerate(layers) for name, lin in
                           qt._linears(layer, f"{prefix}.{i}").items() if lin.in_features % m), None)):  # noqa: SLF001
        raise InvalidRequest(f"{odd}: its inputs are not a multiple of {m}, so {config.sparsity} sparsity has no "
                             "whole groups; choose another N:M, or a share (e.g. 0.5)")
    tokens, where = qt._calibration_tokens(config, src)  # noqa: SLF001
    log.info("SparseGPT %s calibration: %s", config.sparsity, where)
    xs, kws = qt._layer_inputs(model, layers, tokens)  # noqa: SLF001
    pruned = zeros = 0
    error = baseline = 0.0
    started = time.perf_counter()
    for index, layer in enumerate(layers):
        linears = qt._linears(layer, f"{prefix}.{index}")  # noqa: SLF001
        sums, counts, _ = qt.layer_hessians(layer, linears, xs, kws)
        for name, lin in linears.items():
            h = 2 * sums[name] / max(counts[name], 1)
            w = lin.weight.data
            new = sparsegpt(w, h, sparsity, n, m, config.block, config.damp)
            error += qt.output_error(w, new, h)
            baseline += qt.output_error(w, magnitude_prune(w, sparsity, n, m), h)
            zeros += int((new == 0).sum())
            pruned += new.numel()
            lin.weight.data = new.to(w.dtype)
        xs = [qt._run_layer(layer, x, kw) for x, kw in zip(xs, kws, strict=True)]  # noqa: SLF001
        if (index + 1) % max(1, len(layers) // 8) == 0 or index + 1 == len(layers):
            log.info("SparseGPT: decoder layer %d of %d (%.0f s)", index + 1, len(layers),
                     time.perf_counter() - started)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the embedding's rows: saved once, as transformers does
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json", ".bin")) \
                and f.name not in ("config.json", "manifest.json"):
            shutil.copy2(f, out / f.name)
    hf_config = json.loads((src / "config.json").read_text())
    hf_config.pop("torch_dtype", None)
    hf_config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    stats = {"sparsity": config.sparsity, "weights_pruned": round(zeros / max(pruned, 1), 4),
             "linear_weights": pruned, "output_error": round(error, 6),
             "magnitude_output_error": round(baseline, 6), "calibration": where,
             "calibration_tokens": int(tokens.numel())}
    log.info("SparseGPT %s: %.1f%% of %d linear weights zero; output error %.4g (magnitude pruning: %.4g)",
             config.sparsity, 100 * stats["weights_pruned"], pruned, error, baseline)  # type: ignore[operator]
    return stats
