"""Node ``package-components``: a multimodal model's exported components as their user gets them: the
folder mobius wrote (a subfolder per component; with all of them, genai_config.json and the tokenizer and
processor files beside), and ``grove_report.json`` in the report shape of the other paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.node import RECIPE_CACHE, run_node
from grove.tasks._report import write_report

__all__ = ["ComponentsPackageConfig", "package_components"]


class ComponentsPackageConfig(StepConfig):
    NODE = "package-components"
    VERSION = 1
    model: str = Field(description="what the user asked for (a hub id or path), for the report")
    target: dict[str, str | int | list[str] | None] = Field(description="device, provider, precision, components")


@task(name="package-components", cache_policy=RECIPE_CACHE)
def package_components(model: Artifact, evaluation: Artifact, config: ComponentsPackageConfig) -> Artifact:
    """Exported components + their evaluation -> the output folder."""
    return run_node(config, [model, evaluation], model.store, _package)


def _package(inputs: list[Path], config: ComponentsPackageConfig, out: Path) -> dict[str, object]:
    model_dir, eval_dir = inputs
    for f in sorted(model_dir.rglob("*")):
        if f.is_file() and f.name != "manifest.json":
            (out / f.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / f.relative_to(model_dir))
    metrics = json.loads((eval_dir / "eval.json").read_text())
    write_report(out, model=config.model, target=dict(config.target), metrics=metrics, reference={},
                 reference_precision="none: the components are measured alone", inputs=inputs, ratios={})
    return {"size_mb": metrics["size_mb"], "components": sorted(metrics["components"])}
