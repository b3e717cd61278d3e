"""Node ``package-genai``: the final output folder (model, genai_config.json, tokenizer files,
chat template, ``grove_report.json``) as one artifact, and ``export-output``, which copies it
to the user's output path atomically."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node, store_for
from grove.tasks._report import REPORT, copy_model_files, ratio, write_report

__all__ = ["PackageConfig", "export_output", "package_genai"]



class PackageConfig(StepConfig):
    NODE = "package-genai"
    VERSION = 3  # 2: the report's file list includes grove_report.json; 3: "reference" names its precision
    model: str = Field(description="what the user asked for (hub id or path), for the report")
    target: dict[str, str | bool | int | None] = Field(description="device, provider, precision, algorithm, block size")
    reference_precision: str = Field("fp32", description="precision of the reference model the output is compared with")


@task(name="package-genai", cache_policy=RECIPE_CACHE)
def package_genai(model: Artifact, evaluation: Artifact, reference: Artifact, config: PackageConfig) -> Artifact:
    """Model folder + its evaluation + the reference's evaluation -> output folder artifact."""
    return run_node(config, [model, evaluation, reference], model.store, _package)


def _package(inputs: list[Path], config: PackageConfig, out: Path) -> dict[str, object]:
    model_dir, eval_dir, ref_dir = inputs
    copy_model_files(model_dir, out)
    metrics = json.loads((eval_dir / "eval.json").read_text())
    reference = json.loads((ref_dir / "eval.json").read_text())
    write_report(out, model=config.model, target=dict(config.target), metrics=metrics, reference=reference,
                 reference_precision=config.reference_precision, inputs=inputs, ratios={
                     "size_vs_reference": ratio(metrics.get("size_mb"), reference.get("size_mb")),
                     "perplexity_vs_reference": ratio(metrics.get("perplexity"), reference.get("perplexity")),
                     "decode_speed_vs_reference": ratio(metrics.get("decode_tok_s"), reference.get("decode_tok_s")),
                 })
    return {k: v for k, v in metrics.items() if k != "sample"}


@task(name="export-output", persist_result=False)
def export_output(package: Artifact, output_path: str | None) -> dict[str, object]:
    """Copy the package to ``output_path`` (replacing an earlier Grove output there) and return
    the report. Written beside the target and renamed, so a failure or an interruption leaves the
    earlier output (if any) or the new one, whole: never a mix. No ``output_path``: no copy (a
    fleet entry publishes from the store), the report read from the package."""
    if output_path is None:
        store = store_for(package.store)
        node_logger().info("no output path: the output stays in the store, %s", package.location)
        return dict(json.loads(store.fs.cat_file(f"{store.artifact_path(package.node, package.digest)}/{REPORT}")))
    target = Path(output_path).expanduser().resolve()
    if target.exists() and any(target.iterdir()) and not (target / REPORT).exists():
        raise InvalidRequest(f"output path {target} exists and is not a Grove output; choose an empty or new folder")
    src = store_for(package.store).fetch(package.node, package.digest)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.grove-", dir=target.parent))
    except OSError as exc:  # the CLI checks this before any work; a deployed run's path is only known here
        raise InvalidRequest(f"output path {target} cannot be written ({exc.strerror or exc}); choose another "
                             "output_path (the optimized model is in the store: rerun with it, nothing is rebuilt)"
                             ) from exc
    previous = staging.with_name(staging.name + "-previous")
    try:
        for f in sorted(src.rglob("*")):  # an adapter's output keeps its adapter/ folder
            if f.is_file() and f.name != "manifest.json":
                (staging / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                _copy_file(f, staging / f.relative_to(src))
        if target.exists():
            target.rename(previous)  # moved aside, not deleted, until the new output is in place
        staging.rename(target)
    except BaseException:
        if previous.exists() and not target.exists():
            previous.rename(target)  # stopped between the two renames: the earlier output comes back
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(previous, ignore_errors=True)
    node_logger().info("wrote %s", target)
    report: dict[str, object] = json.loads((target / REPORT).read_text())
    return report


def _copy_file(src: Path, dst: Path) -> None:
    # A copy, not a hard link: users edit their outputs, and the store must stay intact.
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise InvalidRequest(f"cannot write {dst.parent}: {exc.strerror}; free some space or choose another "
                             "--output_path") from exc
    os.chmod(dst, 0o644)
