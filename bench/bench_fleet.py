"""Fleet refresh on the local stack: 4 tiny models, wall time with 2 workers vs 1 worker on the
cpu pool (same run, fresh store prefix each, each worker running one flow run at a time), and the
trigger-to-first-node latency of every entry. Prints JSON and a table.

    .venv/bin/python bench/bench_fleet.py

With ``--scale``: a nightly refresh at fleet size, nothing changed upstream. For each size (1,000
and 10,000 entries: half as many models, each on two targets, each its own source folder) the
bench fills the registry with every entry's current version, then times ``fleet_refresh`` (the
bulk check), and, as the baseline in the same run, the per-entry task path it replaced (a
refresh-entry task for every entry) on a smaller manifest. Prints JSON and a table and writes
bench/results/fleet-scale.json.

    .venv/bin/python bench/bench_fleet.py --scale [--entries 1000 10000] [--baseline 200] [--s3]
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "qwen2", "gemma", "phi3")
PARAMETER_LIMIT = 8 << 20  # bytes of flow run parameters the --scale bench's Prefect server accepts


def _phase(label: str, workers: int, models: dict[str, Path], env: dict[str, str]) -> dict[str, object]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    from grove.flows.fleet import FleetManifest
    from grove.flows.fleet_refresh import fleet_refresh
    from grove.shell.stack import spawn_worker

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
    if "--scale" in sys.argv[1:]:
        return _scale(sys.argv[1:])
    os.environ["GROVE_HOME"] = tempfile.mkdtemp(prefix="grove-bench-fleet-")
    atexit.register(shutil.rmtree, os.environ["GROVE_HOME"], True)
    os.environ.pop("PREFECT_API_URL", None)
    sys.path.insert(0, str(ROOT))
    from grove.shell.stack import stack_down, stack_up
    from tests import tiny_models

    base = Path(tempfile.mkdtemp(prefix="grove-bench-models-"))
    atexit.register(shutil.rmtree, base, True)
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


def _per_entry_flow():  # noqa: ANN202 - a Prefect flow
    """The refresh before the bulk check: a refresh-entry task for every entry, unchanged or not."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from grove.flows.fleet import fleet_entries
    from grove.flows.refresh_entry import refresh_entry
    from grove.tasks.publish_report import publish_fleet_summary

    @flow(name="fleet-refresh-per-entry", task_runner=ThreadPoolTaskRunner(max_workers=4))
    def fleet_refresh_per_entry(manifest):  # noqa: ANN001, ANN202 - a FleetManifest: Prefect cannot resolve local names
        entries, rows = fleet_entries(manifest), []
        for start in range(0, len(entries), manifest.concurrency):
            futures = [refresh_entry.submit(m, t, manifest) for m, t in entries[start : start + manifest.concurrency]]
            rows += [future.result() for future in futures]
        publish_fleet_summary(rows)
        return rows

    return fleet_refresh_per_entry


def _timed_refresh(refresh, manifest) -> float:  # noqa: ANN001
    start = time.perf_counter()
    rows = refresh(manifest)
    wall = time.perf_counter() - start
    statuses = {r["status"] for r in rows}
    if statuses != {"unchanged"} or len(rows) != sum(len(m.targets) for m in manifest.models):
        raise SystemExit(f"bench: expected {len(rows)} unchanged rows, got {statuses}")
    return wall


def _cli_refresh(manifest, work: Path) -> float:  # noqa: ANN001
    """`grove fleet refresh FILE` in its own process (against the running server), as a user runs it."""
    import subprocess

    import yaml

    path = work / f"fleet-{len(manifest.models)}.yaml"
    path.write_text(yaml.safe_dump(manifest.model_dump(mode="json", exclude_defaults=True)))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "grove.shell.cli", "fleet", "refresh", str(path)], check=False,
                          capture_output=True, text=True, env=os.environ.copy(), cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode != 0 or done.stdout.count(" unchanged ") != sum(len(m.targets) for m in manifest.models):
        raise SystemExit(f"bench: grove fleet refresh failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall


def _s3_store() -> str:
    """A bucket on a real S3-protocol server on loopback (moto's server mode, a test dependency)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1")
    s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]).mkdir("fleet")
    return "s3://fleet/store"


def _scale(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="bench_fleet.py --scale")
    parser.add_argument("--scale", action="store_true")
    parser.add_argument("--entries", type=int, nargs="+", default=[1000, 10000], help="manifest sizes to time")
    parser.add_argument("--baseline", type=int, default=1000, help="entries timed on the per-entry task path")
    parser.add_argument("--s3", action="store_true", help="the store (and registry) on an S3 server on loopback")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="grove-bench-fleet-scale-"))
    # A manifest is the flow run's parameter, and Prefect's server refuses parameters over 512 KB by
    # default: about 5,000 models with paths this long. The bench's own server takes 8 MB.
    os.environ.update(GROVE_HOME=str(work / "grove-home"), XDG_CACHE_HOME=str(work / "xdg-cache"),
                      PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING",
                      PREFECT_SERVER_API_MAX_PARAMETER_SIZE=str(PARAMETER_LIMIT))
    os.environ.pop("PREFECT_API_URL", None)
    sys.path.insert(0, str(ROOT))
    from grove.shell.server import ensure_api, stop_server

    store = _s3_store() if args.s3 else str(work / "store")
    ensure_api()  # one local server, as `grove fleet refresh` starts it; not part of a refresh's time
    from grove.flows.fleet_refresh import fleet_refresh
    from tests.fleet_scale import fill_registry, scale_manifest

    try:
        sizes: dict[int, dict[str, float]] = {}
        manifests = {n: scale_manifest(work / "sources", n, store) for n in sorted({*args.entries, args.baseline})}
        for n, manifest in manifests.items():
            fill_start = time.perf_counter()
            fill_registry(manifest)
            sizes[n] = {"manifest_kb": round(len(manifest.model_dump_json()) / 1024),
                        "fill_s": round(time.perf_counter() - fill_start, 2),
                        "bulk_s": round(_timed_refresh(fleet_refresh, manifest), 2)}
        small = min(args.entries)
        sizes[small]["cli_s"] = round(_cli_refresh(manifests[small], work), 2)
        # Last: its thousands of task runs keep the server busy a while after it returns.
        old = _timed_refresh(_per_entry_flow(), manifests[args.baseline])
        sizes[args.baseline]["per_entry_tasks_s"] = round(old, 2)
    finally:
        stop_server()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    from bench._machine import machine

    base = sizes[args.baseline]
    per_entry_ms = {n: round(1000 * r["bulk_s"] / n, 3) for n, r in sizes.items()}
    old_ms = 1000 * base["per_entry_tasks_s"] / args.baseline
    large = max(args.entries)
    bars = {f"{small} entries <= 20 s": sizes[small]["bulk_s"] <= 20}
    if large != small:
        bars[f"{large} entries <= 10x {small}"] = sizes[large]["bulk_s"] <= 10 * sizes[small]["bulk_s"]
    result = {"machine": machine(), "store": "s3 (moto, loopback)" if args.s3 else "local folder", "sizes": sizes,
              "bulk_ms_per_entry": per_entry_ms, "per_entry_tasks_ms_per_entry": round(old_ms, 2),
              "speedup_per_entry_at_baseline": round(base["per_entry_tasks_s"] / base["bulk_s"], 1),
              f"per_entry_tasks_{small}_estimated_s": round(old_ms * small / 1000, 1), "bars": bars}
    print(json.dumps(result, indent=2))
    print(f"\n{'entries':>8} {'bulk s':>8} {'ms/entry':>9} {'per-entry tasks s':>18} {'CLI s':>7}")
    for n, r in sizes.items():
        old, cli = r.get("per_entry_tasks_s", ""), r.get("cli_s", "")
        print(f"{n:>8} {r['bulk_s']:>8} {per_entry_ms[n]:>9} {old:>18} {cli:>7}")
    print(f"\nper-entry task path / bulk check at {args.baseline} entries: "
          f"{result['speedup_per_entry_at_baseline']}x")
    for bar, ok in bars.items():
        print(f"bar {bar}: {'PASS' if ok else 'FAIL'}")
    out = ROOT / "bench" / "results" / "fleet-scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0 if all(bars.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
