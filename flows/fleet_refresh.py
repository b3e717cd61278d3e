"""``fleet-refresh``: every (model, target) of a manifest, only what changed upstream, fanned
out with a concurrency limit; a summary table on the run's page. Wiring only."""

from __future__ import annotations

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from grove.fleet import FleetManifest
from tasks.publish_report import publish_fleet_summary
from tasks.refresh_entry import refresh_entry

__all__ = ["fleet_refresh"]


@flow(name="fleet-refresh", task_runner=ThreadPoolTaskRunner(max_workers=4))
def fleet_refresh(manifest: FleetManifest) -> list[dict[str, str]]:
    """Refresh the fleet; returns one row per entry: unchanged / refreshed / failed (reason)."""
    entries = [(model, target) for model in manifest.models for target in model.targets]
    rows: list[dict[str, str]] = []
    for start in range(0, len(entries), manifest.concurrency):
        batch = entries[start : start + manifest.concurrency]
        futures = [refresh_entry.submit(model, target, manifest) for model, target in batch]
        rows += [future.result() for future in futures]
    publish_fleet_summary(rows)
    return rows
