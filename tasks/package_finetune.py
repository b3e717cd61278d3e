"""Node ``package-finetune``: the fine-tuning output in Olive's layout, as one artifact: ``adapter/``
(the peft folder, naming its base), ``train_log.json`` (the loss curve) and ``grove_report.json``
(steps, losses, perplexity before and after, tokens/s). ``export-finetune`` copies it to the output
path and writes ``model_config.json`` there (the base and the adapter's absolute path, as Olive's
finetune writes it), which ``grove auto-opt -m <that folder>`` and Olive's own commands read."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks._report import REPORT
from grove.tasks.package_genai import export_output
from grove.tasks.train_adapter import ADAPTER_DIR, TRAIN_LOG

__all__ = ["MODEL_CONFIG", "FinetunePackageConfig", "export_finetune", "package_finetune", "read_model_config"]

MODEL_CONFIG = "model_config.json"


class FinetunePackageConfig(StepConfig):
    NODE = "package-finetune"
    VERSION = 1
    model: str = Field(description="the base model as the user named it (written into the adapter's config)")
    base_digest: str = Field(description="the base model's source digest, so a later command can check it")
    adapter: dict[str, object] = Field(description="method, r, alpha, target modules: for the report")


@task(name="package-finetune", cache_policy=RECIPE_CACHE)
def package_finetune(adapter: Artifact, evaluation: Artifact, data: Artifact,
                     config: FinetunePackageConfig) -> Artifact:
    return run_node(config, [adapter, evaluation, data], adapter.store, _package)


def _package(inputs: list[Path], config: FinetunePackageConfig, out: Path) -> dict[str, object]:
    from grove import __version__
    from grove.store import lineage_of

    adapter_dir, eval_dir, data_dir = inputs
    shutil.copytree(adapter_dir / ADAPTER_DIR, out / ADAPTER_DIR)
    adapter_config = json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = config.model
    (out / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    shutil.copy2(adapter_dir / TRAIN_LOG, out / TRAIN_LOG)
    train = json.loads((adapter_dir / "manifest.json").read_text())["metrics"]
    evaluation = json.loads((eval_dir / "eval.json").read_text())
    data = json.loads((data_dir / "data.json").read_text())
    metrics = {**{k: v for k, v in train.items() if k not in ("target_modules",)}, **evaluation}
    report = {"grove_version": __version__, "model": config.model, "base_digest": config.base_digest,
              "adapter": {**config.adapter, "target_modules": train.get("target_modules")}, "metrics": metrics,
              "data": data, "loss_curve": json.loads((adapter_dir / TRAIN_LOG).read_text()),
              "lineage": lineage_of(inputs),
              "files": sorted({ADAPTER_DIR + "/", TRAIN_LOG, REPORT, MODEL_CONFIG})}
    (out / REPORT).write_text(json.dumps(report, indent=2))
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None}


@task(name="export-finetune", persist_result=False)
def export_finetune(package: Artifact, output_path: str) -> dict[str, object]:
    """The package at ``output_path`` (whole, replacing an earlier Grove output), then its
    ``model_config.json`` naming the base and the adapter where it now is."""
    report = export_output.fn(package, output_path)
    target = Path(output_path).expanduser().resolve()
    model_config = {"type": "HfModel", "config": {"model_path": report["model"], "task": "text-generation",
                                                  "adapter_path": str(target / ADAPTER_DIR)},
                    "grove": {"base_digest": report["base_digest"]}}
    fd, tmp = tempfile.mkstemp(prefix=f".{MODEL_CONFIG}.", dir=target)
    with os.fdopen(fd, "w") as f:
        json.dump(model_config, f, indent=2)
    os.replace(tmp, target / MODEL_CONFIG)
    node_logger().info("adapter written to %s", target / ADAPTER_DIR)
    return report


def read_model_config(folder: Path) -> tuple[str, Path | None, str | None]:
    """An Olive / Grove output folder's ``model_config.json``: the base model, the adapter folder (None:
    no adapter) and the base's digest where Grove wrote it."""
    from grove.errors import InvalidRequest

    try:
        content = json.loads((folder / MODEL_CONFIG).read_text())
        config = content["config"]
        base = str(config["model_path"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidRequest(f"{folder / MODEL_CONFIG} is not an Olive model config with config.model_path ({exc}); "
                             "pass the base model with -m and the adapter with --adapter_path") from exc
    adapter = config.get("adapter_path")
    adapter_path = None if adapter is None else Path(adapter) if Path(adapter).is_absolute() else folder / adapter
    return base, adapter_path, (content.get("grove") or {}).get("base_digest")
