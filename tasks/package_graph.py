"""Node ``package-graph``: the optimized graph as its user gets it back: under its own file name (with
its weights in ``<name>.data``), the files that came with it (configs, tokenizer), and
``grove_report.json`` in the report shape of the other paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.node import RECIPE_CACHE, run_node
from grove.tasks._report import ratio, write_report

__all__ = ["GraphPackageConfig", "package_graph"]


class GraphPackageConfig(StepConfig):
    NODE = "package-graph"
    VERSION = 1
    model: str = Field(description="what the user asked for (a path), for the report")
    target: dict[str, str | int | None] = Field(description="device, provider, precision, algorithm")


@task(name="package-graph", cache_policy=RECIPE_CACHE)
def package_graph(model: Artifact, evaluation: Artifact, reference: Artifact, imported: Artifact,
                  config: GraphPackageConfig) -> Artifact:
    """Model + its evaluation + the original graph's evaluation + the imported graph (its file name)."""
    return run_node(config, [model, evaluation, reference, imported], model.store, _package)


def _package(inputs: list[Path], config: GraphPackageConfig, out: Path) -> dict[str, object]:
    import onnx

    from grove.tasks.import_onnx import GRAPH_JSON

    model_dir, eval_dir, ref_dir, imported_dir = inputs
    name = json.loads((imported_dir / GRAPH_JSON).read_text())["filename"]
    if name == "model.onnx":
        for f in model_dir.glob("model.onnx*"):
            shutil.copy2(f, out / f.name)
    else:  # its own name, and its weights beside it under that name
        onnx.save_model(onnx.load(str(model_dir / "model.onnx")), str(out / name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{name}.data", size_threshold=1024)
    for f in model_dir.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx") and f.name not in ("manifest.json", GRAPH_JSON):
            shutil.copy2(f, out / f.name)
    metrics = json.loads((eval_dir / "eval.json").read_text())
    if metrics.get("parity", {}).get("measured"):
        metrics["min_cosine"] = metrics["parity"]["min_cosine"]
    reference = json.loads((ref_dir / "eval.json").read_text())
    write_report(out, model=config.model, target=dict(config.target), metrics=metrics, reference=reference,
                 reference_precision="input graph", inputs=inputs, ratios={
                     "size_vs_reference": ratio(metrics.get("size_mb"), reference.get("size_mb")),
                     "latency_vs_reference": ratio(metrics.get("latency_ms_avg"), reference.get("latency_ms_avg")),
                 })
    return {k: v for k, v in metrics.items() if k != "parity"}
