"""Node ``package-encoder``: the encoder output folder (``model.onnx``, tokenizer and config
files, ``grove_encoder.json``, ``grove_report.json``) as one artifact, in the same report shape
as the decoder path. ``grove.tasks.package_genai.export_output`` copies it to the output path."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.node import RECIPE_CACHE, run_node
from grove.tasks._report import copy_model_files, ratio, write_report

__all__ = ["EncoderPackageConfig", "package_encoder"]


class EncoderPackageConfig(StepConfig):
    NODE = "package-encoder"
    VERSION = 2  # 2: "reference" (with its precision) replaces "reference_fp32"
    model: str = Field(description="what the user asked for (hub id or path), for the report")
    target: dict[str, str | int | None] = Field(description="device, provider, precision, task, int8 mode")


@task(name="package-encoder", cache_policy=RECIPE_CACHE)
def package_encoder(model: Artifact, evaluation: Artifact, reference: Artifact, parity: Artifact,
                    reference_parity: Artifact | None, config: EncoderPackageConfig) -> Artifact:
    """Model + its evaluation + the fp32 ONNX evaluation + the model's parity check (+ the fp32 graph's
    own, vs the export, when the model is a transformation of it) -> output folder. The parents are
    passed in signature order, the order the cache key reads them in."""
    parents = [model, evaluation, reference, parity, *([reference_parity] if reference_parity else [])]
    return run_node(config, parents, model.store, _package)


def _package(inputs: list[Path], config: EncoderPackageConfig, out: Path) -> dict[str, object]:
    model_dir, eval_dir, ref_dir, parity_dir, *ref_parity_dir = inputs
    copy_model_files(model_dir, out)
    metrics = json.loads((eval_dir / "eval.json").read_text())
    metrics["parity"] = json.loads((parity_dir / "parity.json").read_text())
    reference = json.loads((ref_dir / "eval.json").read_text())
    for folder in ref_parity_dir:  # the fused fp32 graph vs the exported one
        reference["parity"] = json.loads((folder / "parity.json").read_text())
    write_report(out, model=config.model, target=dict(config.target), metrics=metrics, reference=reference,
                 reference_precision="fp32",
                 inputs=inputs, ratios={
                     "size_vs_reference": ratio(metrics.get("size_mb"), reference.get("size_mb")),
                     "latency_vs_reference": ratio(metrics.get("latency_ms_avg"), reference.get("latency_ms_avg")),
                     "latency_vs_pytorch": metrics.get("latency_vs_pytorch"),
                 })
    return {k: v for k, v in metrics.items() if k != "parity"}
