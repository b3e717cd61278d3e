"""Recipe coverage: how many of olive-recipes' workflow configs ``grove run --dry-run`` accepts.

    .venv/bin/python bench/bench_recipes.py [--recipes DIR] [--baseline FILE] [--json FILE] [--show N]

Every JSON file under DIR (default: the olive-recipes snapshot in ../shared/olive-recipes) that is a
workflow config (it has ``input_model`` or ``passes``) is classified by its target: the execution
provider of the system its ``target`` names (or its only system; none: Olive's default, the CPU).
The configs counted are those that target CPU, CUDA or DirectML, use no vendor-specific pass (Quark,
RyzenAI, QAIRT, INC, VitisAI, OpenVINO, QNN, NVIDIA ModelOpt..., or a toolchain's plugins) and no
``model_script`` (multimodal, speech and diffusion models come with loader code). The evaluation configs
of those speech and multimodal models (audio or image data: whisper's WER, ai2d, fleurs) are counted
apart, and the share is printed both without and with them. Each one is run through ``grove run --config F
--dry-run`` in this process (the command's own ``main``: reading the config and translating it is all
a dry run does, so in-process calls give its exact exit code and error line without a process start
per file), and the refusals are grouped by reason: the error split into its parts, each with the
config's names and values masked. Prints JSON and a table, writes bench/results/recipes.json, and
compares with ``--baseline`` (default: bench/recipes_baseline.json, the figures before issue
25's work) when it exists.

A dry run does not fetch the model, so an accepted file may still name a model whose architecture Grove
does not serve (the run itself stops with the supported list). The run-level view says which: each
accepted file's model, by its model_type from bench/recipe_model_types.json (a snapshot written by hand:
the bench runs offline), is served when tasks/architectures.py has it; an ONNX input is the graph path's,
served whatever its architecture; a model not in the snapshot (a placeholder path) is unknown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ROOT.parent / "shared" / "olive-recipes"
RESULTS = ROOT / "bench" / "results"
TARGETS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "DmlExecutionProvider": "dml"}
# Pass types that run a vendor's toolchain (matched as prefixes, without case).
VENDOR_PASSES = ("quark", "ryzen", "qairt", "inc", "vitis", "openvino", "qnn", "nvmodelopt", "aimet",
                 "epcontextbinarygenerator", "aitkpython")


def _target(config: dict) -> str:
    """The execution provider a config targets, as a short name (cpu, cuda, dml, or the provider
    itself for the others)."""
    systems = config.get("systems") or {}
    engine = config.get("engine") or {}
    name = config.get("target", engine.get("target"))
    system = name if isinstance(name, dict) else systems.get(name) if isinstance(name, str) else None
    if system is None and isinstance(systems, dict) and len(systems) == 1:
        system = next(iter(systems.values()))
    if not isinstance(system, dict):
        return "cpu"  # Olive's default: the local CPU
    accelerators = (system.get("config") or {}).get("accelerators") or system.get("accelerators") or [{}]
    first = accelerators[0] if isinstance(accelerators, list) and accelerators else {}
    providers = first.get("execution_providers") or []
    providers = [providers] if isinstance(providers, str) else providers
    if providers:
        return TARGETS.get(providers[0], providers[0])
    return "cuda" if str(first.get("device", "cpu")).lower() == "gpu" else str(first.get("device", "cpu")).lower()


def _pass_types(config: dict) -> list[str]:
    passes = config.get("passes") or {}
    sections = passes.values() if isinstance(passes, dict) else passes
    out = []
    for section in sections:
        if isinstance(section, list):
            section = section[0] if section else {}
        if isinstance(section, dict):
            out.append(str(section.get("type", "")))
    return out


def _has_key(value: object, key: str) -> bool:
    if isinstance(value, dict):
        return any(k == key and v for k, v in value.items()) or any(_has_key(v, key) for v in value.values())
    if isinstance(value, list):
        return any(_has_key(v, key) for v in value)
    return False


def classify(path: Path) -> tuple[str | None, str]:
    """(target, why it is left out or ""), or (None, "") for a JSON file that is not a workflow config."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, ""
    if not isinstance(config, dict) or not ({"input_model", "passes"} & set(config)):
        return None, ""
    target = _target(config)
    if target not in TARGETS.values():
        return target, f"targets {target}"
    if vendor := [t for t in _pass_types(config) if t.lower().startswith(VENDOR_PASSES)]:
        return target, f"vendor pass {vendor[0]}"
    if _plugins(config):  # VitisAI's whisper configs: passes that are its toolchain's plugins, no type
        return target, "vendor plugin passes"
    if _has_key(config, "model_script"):
        return target, "model_script"
    if kinds := _media_data(config):
        return target, f"{MEDIA} ({kinds[0]})"
    return target, ""


# Evaluation configs of speech and vision-language models (whisper's WER, ai2d, fleurs): their data is
# audio or images, and their models are the model_script ones the issue leaves to a later one. Counted
# apart, and reported both ways.
MEDIA = "speech or multimodal data"
_MEDIA_PRE_PROCESS = ("speech", "vision", "audio", "image")


def _plugins(config: dict) -> bool:
    passes = config.get("passes") or {}
    sections = passes.values() if isinstance(passes, dict) else passes
    return any(isinstance(s, dict) and "plugin" in s and "type" not in s for s in sections)


def _media_data(config: dict) -> list[str]:
    data = config.get("data_configs") or []
    data = data.values() if isinstance(data, dict) else data
    kinds = [str((d.get("pre_process_data_config") or {}).get("type", "")) for d in data if isinstance(d, dict)]
    return [k for k in kinds if k.lower().startswith(_MEDIA_PRE_PROCESS)]


_MASKS = [
    (re.compile(r"passes (?:[\w\-]+ \([^)]*\)(?:, )?)+:"), "passes <names>:"),  # a group of unread passes
    (re.compile(r"(?<=different precisions: )[^;]*"), "<passes>"),
    (re.compile(r"passes\.[\w.\-\[\]]+"), "passes.<name>"),
    (re.compile(r"data_configs\.[\w\-]+"), "data_configs.<name>"),
    (re.compile(r"evaluators\.[\w\-]+"), "evaluators.<name>"),
    (re.compile(r"systems\.[\w\-]+"), "systems.<name>"),
    (re.compile(r"'[^']*'"), "'<value>'"),
    (re.compile(r"(?<![\w.])\d+(\.\d+)?(?![\w.])"), "<n>"),
]


def reasons(message: str) -> list[str]:
    """A refusal's parts, each masked of the config's own names and values, so that the same cause
    in two configs groups as one reason."""
    parts: list[str] = []
    for part in re.split(r"; (?=passes|input_model|systems|data_configs|evaluators|evaluator|target|no output|"
                         r"log_severity|engine|'[^']*' is not an Olive)", message):
        for pattern, mask in _MASKS:
            part = pattern.sub(mask, part)
        parts.append(part.strip())
    return parts


def dry_run(path: Path) -> tuple[int, str]:
    """``grove run --config path --dry-run``: (exit code, its error line or the command)."""
    from grove.shell.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["run", "--config", str(path), "--dry-run"])
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    if code == 0:
        return 0, out.getvalue().strip()
    lines = [line for line in err.getvalue().splitlines() if line.startswith("grove: error:")]
    message = lines[-1].removeprefix("grove: error: ") if lines else err.getvalue().strip()
    return code, message.removeprefix(f"{path}: ")


MODEL_TYPES = ROOT / "bench" / "recipe_model_types.json"


def _model_named(config: dict) -> tuple[str, str]:
    """(the input model's type, lower case; its hub id or path) as the config names them."""
    model = config.get("input_model") or {}
    inner = model.get("config") or {}
    path = model.get("model_path") or inner.get("model_path") or (inner.get("hf_config") or {}).get("model_name")
    return str(model.get("type", "")).lower(), str(path)


def served(path: Path, model_types: dict[str, str]) -> str:
    """What a run of the accepted config at ``path`` meets: "served", "unknown", or the model_type Grove's
    paths do not serve."""
    from grove.tasks.architectures import ARCHITECTURES

    kind, name = _model_named(json.loads(path.read_text(encoding="utf-8")))
    if kind == "onnxmodel":
        return "served"
    model_type = model_types.get(name)
    if model_type is None:
        return "unknown"
    return "served" if model_type in ARCHITECTURES else model_type


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipes", type=Path, default=DEFAULT_RECIPES, help="olive-recipes checkout")
    parser.add_argument("--baseline", type=Path, default=ROOT / "bench" / "recipes_baseline.json",
                        help="an earlier run's JSON to compare with")
    parser.add_argument("--json", type=Path, default=RESULTS / "recipes.json", help="where to write the figures")
    parser.add_argument("--show", type=int, default=0, metavar="N", help="also list N refused files per reason")
    args = parser.parse_args()
    if not args.recipes.is_dir():
        print(f"bench_recipes: {args.recipes} is not a folder; pass --recipes <olive-recipes checkout>",
              file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    left_out: Counter[str] = Counter()
    per_target: dict[str, dict[str, int]] = {}
    grouped: dict[str, list[str]] = {}
    files: dict[str, dict[str, object]] = {}
    media: dict[str, bool] = {}  # the speech / multimodal evaluation configs: accepted or not
    model_types = {k: v for k, v in json.loads(MODEL_TYPES.read_text()).items() if not k.startswith("_")}
    runs: Counter[str] = Counter()  # the accepted files, by what their run meets (served())
    for path in sorted(args.recipes.rglob("*.json")):
        target, why = classify(path)
        if target is None:
            continue
        name = str(path.relative_to(args.recipes))
        if why.startswith(MEDIA):
            media[name] = dry_run(path)[0] == 0
        if why:
            left_out[why.split(" ")[0] if why.startswith("vendor") else why.split(" (")[0]] += 1
            continue
        code, message = dry_run(path)
        row = per_target.setdefault(target, {"accepted": 0, "refused": 0})
        row["accepted" if code == 0 else "refused"] += 1
        files[name] = {"target": target, "accepted": code == 0, **({} if code == 0 else {"error": message})}
        if code == 0:
            files[name]["run"] = run = served(path, model_types)
            runs[run] += 1
        if code:
            for reason in dict.fromkeys(reasons(message)):
                grouped.setdefault(reason, []).append(name)
    accepted = sum(r["accepted"] for r in per_target.values())
    total = sum(r["accepted"] + r["refused"] for r in per_target.values())
    result = {
        "recipes": str(args.recipes), "counted": total, "accepted": accepted,
        "accepted_share": round(accepted / total, 3) if total else None,
        "per_target": dict(sorted(per_target.items())),
        # The filter read literally (no model_script), the speech and multimodal evaluations counted in:
        "with_media_evaluations": {"counted": total + len(media), "accepted": accepted + sum(media.values()),
                                   "accepted_share": round((accepted + sum(media.values())) / (total + len(media)), 3)
                                   if total + len(media) else None},
        # Accepted, and the model's architecture one Grove serves (the rest: by model_type, or unknown).
        "served": runs["served"], "served_share": round(runs["served"] / total, 3) if total else None,
        "accepted_not_served": {k: v for k, v in runs.most_common() if k != "served"},
        "left_out": dict(left_out.most_common()),
        "refusal_reasons": {r: len(f) for r, f in sorted(grouped.items(), key=lambda kv: -len(kv[1]))},
        "files": files,
    }
    baseline = None
    if args.baseline.is_file() and args.baseline.resolve() != args.json.resolve():
        baseline = json.loads(args.baseline.read_text())
        result["baseline"] = {"file": str(args.baseline), "accepted": baseline["accepted"],
                              "counted": baseline["counted"], "accepted_share": baseline["accepted_share"],
                              "newly_accepted": sorted(f for f, r in files.items() if r["accepted"]
                                                       and not baseline["files"].get(f, {}).get("accepted")),
                              "newly_refused": sorted(f for f, r in files.items() if not r["accepted"]
                                                      and baseline["files"].get(f, {}).get("accepted"))}
    print(json.dumps({k: v for k, v in result.items() if k != "files"}, indent=2))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nolive-recipes workflow configs targeting CPU / CUDA / DirectML, no vendor pass, no model_script: "
          f"{accepted}/{total} accepted ({100 * accepted / max(total, 1):.0f}%); with the {len(media)} speech and "
          f"multimodal evaluation configs counted in: {accepted + sum(media.values())}/{total + len(media)} "
          f"({100 * (accepted + sum(media.values())) / max(total + len(media), 1):.0f}%)"
          + (f"; baseline {baseline['accepted']}/{baseline['counted']} ({100 * baseline['accepted_share']:.0f}%)"
             if baseline else ""))
    print(f"of those, the model's architecture served (the run can build it): {runs['served']}/{total} "
          f"({100 * runs['served'] / max(total, 1):.0f}%); accepted, not served: "
          + ", ".join(f"{k} {v}" for k, v in runs.most_common() if k != "served"))
    print(f"{'target':8} {'accepted':>9} {'refused':>8}" + (f" {'baseline accepted':>18}" if baseline else ""))
    for target, row in sorted(per_target.items()):
        was = baseline["per_target"].get(target, {}).get("accepted", 0) if baseline else None
        print(f"{target:8} {row['accepted']:9} {row['refused']:8}" + (f" {was:18}" if baseline else ""))
    print(f"\n{'configs':>7}  refusal reason")
    for reason, names in sorted(grouped.items(), key=lambda kv: -len(kv[1])):
        print(f"{len(names):7}  {reason[:200]}")
        for name in names[:args.show]:
            print(f"{'':9}{name}")
    print(f"\nleft out: {', '.join(f'{k} {v}' for k, v in left_out.most_common())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
