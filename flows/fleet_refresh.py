"""``fleet-refresh``: every (model, target) of a manifest, only what changed upstream, fanned
out with a concurrency limit; a summary table on the run's page. Wiring only."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.utilities.annotations import quote

from grove.flows.fleet import FleetManifest, fleet_entries, unchanged_rows
from grove.flows.refresh_entry import refresh_entry
from grove.tasks.publish_report import publish_fleet_summary

__all__ = ["fleet_refresh"]


@flow(name="fleet-refresh", task_runner=ThreadPoolTaskRunner(max_workers=4))  # type: ignore[arg-type]  # Prefect's generic
def fleet_refresh(manifest: FleetManifest) -> list[dict[str, str]]:
    """Refresh the fleet; returns one row per entry: unchanged / refreshed / failed (reason).
    Staleness is decided for the whole fleet at once: an unchanged entry is a row, and only the
    others get a task (and, deployed, a run on their pool)."""
    entries, checked = fleet_entries(manifest), unchanged_rows(manifest)
    stale = [i for i, row in enumerate(checked) if row is None]
    get_run_logger().info("%d of %d entries unchanged upstream; refreshing %d", len(checked) - len(stale),
                          len(checked), len(stale))
    refreshed: dict[int, dict[str, str]] = {}
    for start in range(0, len(stale), manifest.concurrency):
        batch = stale[start : start + manifest.concurrency]
        futures = [refresh_entry.submit(*entries[i], manifest) for i in batch]
        refreshed.update((i, future.result()) for i, future in zip(batch, futures, strict=True))
    rows = [row if row is not None else refreshed[i] for i, row in enumerate(checked)]
    publish_fleet_summary(quote(rows))  # type: ignore[call-overload]  # quote: not walked for futures (4 s at 10,000 rows)
    return rows
