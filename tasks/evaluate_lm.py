"""Node ``evaluate-lm``: a model scored on lm-evaluation-harness tasks (``lm_eval``: MMLU, HellaSwag,
ARC..., or tasks of one's own from YAML files), Olive's ``LMEvaluator`` and ``olive benchmark``.

The harness is the field's reference for these scores, so Grove runs it rather than reimplementing
its tasks, prompts and metrics: a Hugging Face folder through the harness's own ``hf`` model (PyTorch),
an onnxruntime-genai folder (a Grove output) through ``tasks/_lm_eval_genai.py``, which serves the
harness's log-likelihood and generation requests from onnxruntime-genai. Writes ``results.json``: per
task its metrics, sample count, few-shot count and version, as the harness reports them."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field

from grove import __version__
from grove.artifacts import Artifact, MeasureConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.store import lineage_of
from grove.tasks._report import REPORT

__all__ = ["LmEvalConfig", "evaluate_lm", "include_sha256", "task_metrics"]

RESULTS = "results.json"


class LmEvalConfig(MeasureConfig):
    NODE = "evaluate-lm"
    VERSION = 1
    tasks: list[str] = Field(min_length=1, description="lm-eval task (or group) names, e.g. mmlu, hellaswag")
    limit: float | None = Field(None, gt=0, description="samples per task: a count, or a share of the task "
                                "when below 1 (None: every sample)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt (None: each task's own)")
    batch_size: int = Field(1, ge=1, description="requests per forward pass (the hf model)")
    max_length: int | None = Field(None, ge=16, description="longest context in tokens (None: the model's)")
    apply_chat_template: bool = Field(False, description="prompts through the model's chat template")
    fewshot_as_multiturn: bool = Field(False, description="with a chat template: each few-shot example a turn")
    include_path: str | None = Field(None, description="a folder of task YAML files of one's own")
    include_sha256: str = Field("", description="sha256 of that folder's files (filled in by the flow)")
    task_definitions: list[dict[str, Any]] = Field(default_factory=list, description="tasks defined in the request "
                                                   "itself (an Olive config's inline tasks): lm-eval task configs, "
                                                   "written as YAML files where the node runs")
    seed: int = Field(1234, description="the harness's few-shot sampling and random seeds")

    def recipe(self) -> dict[str, object]:
        recipe = super().recipe()
        if not recipe["task_definitions"]:  # the key of the runs before inline tasks existed
            del recipe["task_definitions"]
        return recipe


def include_sha256(folder: str | None) -> str:
    """sha256 over a task folder's files (names and bytes), so an edited task is scored again."""
    if not folder:
        return ""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise InvalidRequest(f"--include_path {folder}: no such folder; pass a folder of lm-eval task YAML files")
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root)}\0".encode() + path.read_bytes() + b"\n")
    return digest.hexdigest()


@task(name="evaluate-lm", cache_policy=RECIPE_CACHE)
def evaluate_lm(model: Artifact, config: LmEvalConfig) -> Artifact:
    """HF folder or onnxruntime-genai folder -> lm-eval results."""
    return run_node(config, [model], model.store, _evaluate)


def _evaluate(inputs: list[Path], config: LmEvalConfig, out: Path) -> dict[str, object]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    (model_dir,) = inputs
    log = node_logger()
    include = [str(Path(config.include_path).expanduser())] if config.include_path else []
    if config.task_definitions:  # the request's own tasks as the YAML files the harness reads, kept in the artifact
        import yaml

        defined = out / "tasks"
        defined.mkdir()
        for definition in config.task_definitions:
            (defined / f"{definition['task']}.yaml").write_text(yaml.safe_dump(definition, sort_keys=False))
        include.append(str(defined))
    manager = TaskManager(include_path=include or None)
    if unknown := [t for t in config.tasks if t not in manager.all_tasks]:
        raise InvalidRequest(f"--tasks {', '.join(unknown)}: not lm-eval tasks or groups (the harness lists them: "
                             "lm_eval --tasks list); a task of one's own is a YAML file in --include_path")
    genai = (model_dir / "genai_config.json").is_file()
    if not genai and not (model_dir / "config.json").is_file():
        raise InvalidRequest("an ONNX model without genai_config.json: lm-eval scores a Hugging Face model or an "
                             "onnxruntime-genai folder (a grove auto-opt output); pass the folder holding "
                             "genai_config.json")
    if genai:
        from grove.tasks._lm_eval_genai import GenaiLM

        model: Any = GenaiLM(model_dir, config.provider, config.max_length)
        model_args = None
    else:
        model = "hf"
        model_args = {"pretrained": str(model_dir), "dtype": "float32",
                      **({"max_length": config.max_length} if config.max_length else {})}
    log.info("lm-eval %s on %s (%s)%s", ", ".join(config.tasks), "onnxruntime-genai" if genai else "PyTorch",
             config.provider, f", {config.limit:g} samples a task" if config.limit else "")
    limit = int(config.limit) if config.limit and config.limit >= 1 else config.limit
    results = lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(config.tasks), num_fewshot=config.num_fewshot,
        batch_size=config.batch_size, device="cuda" if config.provider == "cuda" else "cpu", limit=limit,
        bootstrap_iters=0, log_samples=False, task_manager=manager, apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.fewshot_as_multiturn, random_seed=config.seed, numpy_random_seed=config.seed,
        torch_random_seed=config.seed, fewshot_random_seed=config.seed)
    if results is None:  # the harness returns None off its main rank only
        raise RuntimeError("lm-eval returned no results")
    kept = {key: results.get(key) for key in ("results", "groups", "n-shot", "n-samples", "versions",
                                               "higher_is_better", "lm_eval_version")}
    (out / RESULTS).write_text(json.dumps(kept, indent=2, default=str))
    scores = task_metrics(kept)
    for name, metrics in scores.items():
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    backend = "onnxruntime-genai" if genai else "pytorch"
    report = {"grove_version": __version__, "kind": "lm-eval", "backend": backend, "provider": config.provider,
              "tasks": config.tasks, "limit": config.limit, "num_fewshot": config.num_fewshot, "metrics": scores,
              "n_samples": kept.get("n-samples"), "lm_eval_version": kept.get("lm_eval_version"),
              "lineage": lineage_of(inputs), "files": [RESULTS, REPORT]}
    (out / REPORT).write_text(json.dumps(report, indent=2, default=str))
    return {"backend": backend, **{f"{name}/{metric}": value for name, metrics in scores.items()
                                   for metric, value in metrics.items()}}


def task_metrics(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the harness's results (``acc,none`` read as ``acc``; stderr and
    non-numbers left out)."""
    scores: dict[str, dict[str, float]] = {}
    for name, row in (results.get("results") or {}).items():
        metrics = {key.split(",")[0] + ("" if key.endswith(",none") or "," not in key else f" ({key.split(',')[1]})"):
                   float(value) for key, value in row.items()
                   if "," in key and "stderr" not in key and isinstance(value, int | float) and math.isfinite(value)}
        if metrics:
            scores[name] = metrics
    return scores
