"""Task ``refresh-entry``: one (model, target) of a fleet that the bulk check
(:func:`grove.flows.fleet.unchanged_rows`) did not find current. Detects upstream change by the
source's digest again (another refresh may have published it meanwhile), skips what is current,
otherwise runs auto-opt (on the target's pool when deployed) and publishes to the registry.
Never raises: a failure is a row, so one broken model does not stop the fleet."""

from __future__ import annotations

from prefect import task

from grove.errors import GroveError
from grove.flows.fleet import FleetManifest, FleetModel, entry_row, entry_version
from grove.node import node_logger

__all__ = ["refresh_entry"]


@task(name="refresh-entry", persist_result=False)
def refresh_entry(model: FleetModel, target_name: str, manifest: FleetManifest) -> dict[str, str]:
    row = entry_row(model, target_name)
    target = manifest.targets[target_name]
    try:
        from grove.flows.launch import request_from_flags, run_auto_opt_on_pool
        from grove.tasks import _sources
        from grove.tasks.publish_model import read_latest

        source = _sources.resolve(model.source)
        if model.adapter is not None:
            from grove.tasks.import_adapter import resolve_adapter

            adapter = resolve_adapter(model.adapter)  # one line saying what is wrong with it, as a row
            version = entry_version(source.digest, target, adapter.digest, model.merge_adapter)
        else:
            version = entry_version(source.digest, target)
        latest = read_latest(manifest.store, model.name, target_name)
        if latest is not None and latest.get("version") == version:
            return {**row, "status": "unchanged", "version": version}
        fields: dict[str, object] = {
            # No output_path: the registry (in the store) is the fleet's output; a copy on the
            # worker's disk per entry would only fill it.
            "model_name_or_path": model.source,
            "store": manifest.store, "publish_as": (model.name, target_name, version),
            **target.model_dump(exclude_none=True, exclude_defaults=True),
            **({"adapter_path": model.adapter, "merge_adapter": model.merge_adapter} if model.adapter else {})}
        request, _ = request_from_flags(fields, source, decoder_fields={"eval_tokens": manifest.eval_tokens})
        run_auto_opt_on_pool(request, target.device)
        return {**row, "status": "refreshed", "version": version}
    except (GroveError, ValueError) as exc:
        node_logger().warning("fleet entry %s/%s failed: %s", model.name, target_name, exc)
        return {**row, "reason": str(exc)[:500]}
