"""kill -9 of the process running a flow run on a stack worker, in the middle of quantize-int4: the
run ends Crashed (not Running forever), nothing partial is visible in the store, and the same run
triggered again resumes after the nodes that had finished."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from tests.faults.conftest import trigger_until_quantizing, wait_for

pytestmark = pytest.mark.slow  # a whole stack of processes (Prefect server, S3 server, workers) per test


def _manifests(bucket: Path) -> dict[str, float]:
    return {f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())["created_at"]
            for p in bucket.glob("store/artifacts/*/*/manifest.json")}


def test_kill_9_of_a_flow_run_on_a_stack_worker_ends_crashed_and_the_retry_resumes(
        stack: tuple[dict, dict], mid_llama: Path, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    stack_state, _ = stack
    bucket = Path(stack_state["s3_data"]) / "grove"
    request = {"model_name_or_path": str(mid_llama), "output_path": str(tmp_path / "out"), "eval_tokens": 64}
    run, lease = trigger_until_quantizing(bucket, request)
    holder = int(json.loads(lease.read_text())["pid"])
    os.kill(holder, signal.SIGKILL)  # the flow run's process, as the OOM killer would

    def final_state():  # noqa: ANN202
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
        return state if state is not None and state.is_final() else None

    state = wait_for(final_state, "a final state of the killed run", timeout_s=240)
    assert state.is_crashed(), state
    committed = _manifests(bucket)
    assert not any(k.startswith("quantize-int4/") for k in committed), "no partial int4 artifact is visible"

    retry = run_deployment("auto-opt/auto-opt-cpu", parameters={"request": request}, timeout=300)
    assert retry.state is not None and retry.state.is_completed(), retry.state
    after = _manifests(bucket)
    assert {k: after[k] for k in committed} == committed, "finished nodes are reused, not rebuilt"
    assert any(k.startswith("quantize-int4/") for k in after) and (tmp_path / "out" / "model.onnx").exists()
