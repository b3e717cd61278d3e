"""Task ``publish-report``: the run's metrics as Prefect artifacts, so the dashboard shows a
metrics table and a readable report on the flow run's page."""

from __future__ import annotations

import re
from typing import Any

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_table_artifact,
)

from grove.artifacts import Artifact
from grove.tasks._report_text import markdown_report, table_rows

__all__ = ["loss_png", "publish_finetune_report", "publish_fleet_summary", "publish_report"]


@task(name="publish-report", persist_result=False)
def publish_report(report: dict[str, object], output_path: str | None, package: Artifact) -> None:
    name = str(report.get("model", "model")).rstrip("/").rsplit("/", 1)[-1]  # hub id or path: its last part
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "model"
    create_table_artifact(key=f"metrics-{slug}", table=table_rows(report),
                          description=f"auto-opt metrics for {report.get('model')}")
    location = package.location  # where the output lives in the store (s3:// or a folder)
    create_markdown_artifact(key=f"report-{slug}", markdown=markdown_report(report, output_path or location),
                             description=f"auto-opt report for {report.get('model')}")
    create_link_artifact(key=f"output-{slug}", link=location if "://" in location else f"file://{location}",
                         link_text=location, description="the packaged output in the artifact store")


@task(name="publish-fleet-summary", persist_result=False)
def publish_fleet_summary(rows: list[dict[str, str]]) -> None:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("refreshed", "unchanged", "failed")}
    create_table_artifact(key="fleet-refresh", table=rows,
                          description=", ".join(f"{n} {s}" for s, n in counts.items()))


@task(name="publish-finetune-report", persist_result=False)
def publish_finetune_report(report: dict[str, object], output_path: str) -> None:
    """The loss curve as a table, and the before / after figures, on the run's page."""
    name = str(report.get("model", "model")).rstrip("/").rsplit("/", 1)[-1]
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40] or "model"
    metrics = report.get("metrics") or {}
    assert isinstance(metrics, dict)
    log = report.get("loss_curve")
    curve: list[dict[str, Any]] = [{"step": e.get("step"), "loss": e.get("loss"),
                                    "learning_rate": e.get("learning_rate")}
             for e in log if isinstance(e, dict)] if isinstance(log, list) else []
    if curve:
        create_table_artifact(key=f"loss-{slug}", table=curve, description=f"training loss of {name}'s adapter")
    plot = f"\n![loss curve](data:image/png;base64,{loss_png(curve)})\n" if len(curve) >= 2 else ""
    rows = "\n".join(f"| {k.replace('_', ' ')} | {_short(metrics.get(k))} |" for k in (
        "steps", "first_loss", "train_loss", "eval_loss_before", "eval_loss_after", "perplexity_before",
        "perplexity_after", "tokens_per_s") if k in metrics)
    create_markdown_artifact(key=f"finetune-{slug}", markdown=f"# Fine-tuned {report.get('model')}\n\nAdapter: "
                             f"`{output_path}/adapter`\n{plot}\n| metric | value |\n|---|---|\n{rows}\n",
                             description=f"finetune report for {report.get('model')}")


def loss_png(curve: list[dict[str, Any]]) -> str:
    """The training loss against the step, as a small PNG (base64) for the run's markdown report: the
    dashboard renders it inline, where a table of numbers hides the curve's shape."""
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")  # no display: render to memory
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3), dpi=80)
    axes = figure.add_subplot()
    axes.plot([e["step"] for e in curve], [e["loss"] for e in curve], marker="o", markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def _short(value: object) -> object:
    return f"{value:.4g}" if isinstance(value, float) else value
