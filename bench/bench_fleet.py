"""Fleet refresh on the local stack: 4 tiny models, wall time with 2 workers vs 1 worker on the
cpu pool (same run, fresh store prefix each, each worker running one flow run at a time), and the
trigger-to-first-node latency of every entry. Prints JSON and a table.

    .venv/bin/python bench/bench_fleet.py
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "qwen2", "gemma", "phi3")


def _phase(label: str, workers: int, models: dict[str, Path], env: dict[str, str]) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from flows.fleet_refresh import fleet_refresh
    from grove.fleet import FleetManifest
    from grove.stack import spawn_worker

    pids = [spawn_worker("cpu-pool", "cpu", env, name=f"bench-{label}-{i}", limit=1) for i in range(workers)]
    time.sleep(3)  # let the workers register before timing
    manifest = FleetManifest.model_validate({
        "store": f"s3://grove/bench-{label}", "eval_tokens": 64, "concurrency": len(models),
        "targets": {"cpu-int4": {"device": "cpu"}},
        "models": [{"name": n, "source": str(p), "targets": ["cpu-int4"]} for n, p in models.items()]})
    start = time.perf_counter()
    state = fleet_refresh(manifest, return_state=True)
    wall = time.perf_counter() - start
    for pid in pids:
        os.killpg(pid, signal.SIGTERM)
    rows = state.result()
    latencies = []
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[state.state_details.flow_run_id])))
        for child in children:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [child.id]}))
            first = min((t.start_time for t in tasks if t.start_time), default=None)
            if first and child.created:
                latencies.append(round((first - child.created).total_seconds(), 2))
    return {"workers": workers, "wall_s": round(wall, 2), "statuses": sorted({r["status"] for r in rows}),
            "trigger_to_first_node_s": sorted(latencies)}


def main() -> int:
    os.environ["GROVE_HOME"] = tempfile.mkdtemp(prefix="grove-bench-fleet-")
    os.environ.pop("PREFECT_API_URL", None)
    sys.path.insert(0, str(ROOT))
    from tests import tiny_models

    from grove.stack import stack_down, stack_up

    base = Path(tempfile.mkdtemp(prefix="grove-bench-models-"))
    models = {f"m-{f}": tiny_models.build(f, base / f) for f in FAMILIES}
    state = stack_up(workers=False)
    env = dict(state["env"])  # type: ignore[arg-type]
    os.environ.update(env, GROVE_DEVICE="cpu")  # the fleet flow dispatches every entry to the pool
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:
        with temporary_settings(updates={PREFECT_API_URL: str(state["api_url"])}):
            one = _phase("one", 1, models, env)
            two = _phase("two", 2, models, env)
    finally:
        stack_down()
    ratio = round(two["wall_s"] / one["wall_s"], 3)  # type: ignore[operator]
    from bench._machine import machine

    result = {"machine": machine(), "one_worker": one, "two_workers": two, "ratio_two_vs_one": ratio,
              "bar <= 0.65": ratio <= 0.65}
    print(json.dumps(result, indent=2))
    print("\nworkers  wall s  statuses          trigger->first node (s)")
    for r in (one, two):
        print(f"{r['workers']:<8} {r['wall_s']:<7} {','.join(r['statuses']):<17} {r['trigger_to_first_node_s']}")
    print(f"\n2 workers / 1 worker = {ratio} (bar <= 0.65: {'PASS' if ratio <= 0.65 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
