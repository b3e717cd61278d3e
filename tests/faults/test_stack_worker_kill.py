"""kill -9 of the stack's cpu-pool worker itself (the ``prefect worker`` that ``grove stack up`` started),
in the middle of a flow run's quantize-int4. Prefect's process worker starts each flow run in a process
of its own (its own process group), which reports the run's states and heartbeats itself: the run goes on
without its worker and ends Completed (or, if the kill takes the run down with it, Crashed), never Running
forever; only committed artifacts are visible in the store; ``grove stack up`` starts the missing worker
again, and the same run triggered again completes with every node that had finished Cached."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import grove_cli, task_states
from tests.faults.conftest import trigger_until_quantizing, wait_for

pytestmark = pytest.mark.slow  # a whole stack of processes (Prefect server, S3 server, workers) per test

NODES = {"download-model", "capture-onnx", "quantize-int4", "evaluate", "package-genai"}


def _manifests(bucket: Path) -> dict[str, float]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())["created_at"]
            for p in bucket.glob("store/artifacts/*/*/manifest.json")}


def _whole(bucket: Path) -> list[str]:
    """The committed artifacts one of whose listed files is missing or of another size (none, ever)."""
    broken = []
    for manifest in bucket.glob("store/artifacts/*/*/manifest.json"):
        for entry in json.loads(manifest.read_text())["files"]:
            path = manifest.parent / entry["path"]
            if not path.is_file() or path.stat().st_size != entry["size"]:
                broken.append(str(path))
    return broken


def test_kill_9_of_the_stack_worker_mid_run_the_run_still_ends_and_stack_up_restarts_the_worker(
        stack: tuple[dict, dict], mid_llama: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    state, env = stack
    bucket = Path(state["s3_data"]) / "grove"
    request = {"model_name_or_path": str(mid_llama), "output_path": str(tmp_path / "out"), "eval_tokens": 64}
    run, _ = trigger_until_quantizing(bucket, request)
    worker = int(state["workers"]["cpu-pool"])
    os.kill(worker, signal.SIGKILL)  # the worker, as the OOM killer would; not its flow run's process
    at_kill = _manifests(bucket)
    assert not any(k.startswith("quantize-int4/") for k in at_kill), "the worker was killed mid-run"

    def final_state():  # noqa: ANN202
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(run.id).state
        return current if current is not None and current.is_final() else None

    ended = wait_for(final_state, "a final state of the run whose worker was killed", timeout_s=240)
    # Mostly the flow run's own process finishes it (it sends the run's states and heartbeats, not the
    # worker); it went down with the worker once, when the suite's order shifted the kill's moment (Crashed,
    # "aborted by Python system exit call"). Either way it ends, and nothing half-written is visible.
    assert ended.is_completed() or ended.is_crashed(), ended
    committed = _manifests(bucket)
    assert not _whole(bucket), "every committed artifact is whole"
    if ended.is_completed():
        assert {k.split("/")[0] for k in committed} >= NODES and (tmp_path / "out" / "model.onnx").exists()

    up = grove_cli("stack", "up", env=env, timeout=180)  # starts the missing worker again
    assert up.returncode == 0, up.stderr[-3000:]
    restarted = json.loads((Path(env["GROVE_HOME"]) / "stack.json").read_text())["workers"]
    assert restarted["cpu-pool"] != worker and Path(f"/proc/{restarted['cpu-pool']}").exists(), restarted
    assert restarted["gpu-pool"] == state["workers"]["gpu-pool"], "a live worker is left as it is"

    retry = run_deployment("auto-opt/auto-opt-cpu", parameters={"request": request}, timeout=240)
    assert retry.state is not None and retry.state.is_completed(), retry.state
    after = _manifests(bucket)
    assert {k: v for k, v in after.items() if k in committed} == committed, "nothing committed is rebuilt"
    assert {k.split("/")[0] for k in after} >= NODES and (tmp_path / "out" / "model.onnx").exists()
    states = task_states(retry.id, NODES)
    done = {k.split("/")[0] for k in committed}
    assert all("Cached" in states[node] for node in NODES & done), states
    if ended.is_completed():
        assert all(set(states[node]) == {"Cached"} for node in NODES), states
