"""``grove deploy``: apply everything a Prefect server needs to run Grove, idempotently: the work
pools (with concurrency limits), the result-storage block of the shared store, and a deployment
of every flow on every pool. No credentials are stored: workers read ``AWS_*`` and
``AWS_ENDPOINT_URL`` from their own environment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from grove.errors import InvalidRequest

__all__ = ["DEPLOYMENTS", "POOLS", "deploy"]


@dataclass(frozen=True)
class Pool:
    name: str
    device: str
    concurrency: int  # flow runs at once on the pool: one model per GPU, a few per CPU box


@dataclass(frozen=True)
class Deployment:
    entrypoint: str  # relative to the project root
    name: str
    description: str


POOLS = (Pool("cpu-pool", "cpu", 2), Pool("gpu-pool", "gpu", 1))
DEPLOYMENTS = (
    Deployment("flows/auto_opt.py:auto_opt", "auto-opt", "One decoder LLM to an onnxruntime-genai folder"),
    Deployment("flows/optimize_encoder.py:optimize_encoder", "auto-opt-encoder",
               "One encoder (BERT family) to an optimized ONNX model"),
    Deployment("flows/optimize_onnx.py:optimize_onnx", "auto-opt-onnx",
               "An ONNX graph given as the model to int4 weights, measured against the graph"),
    Deployment("flows/olive_run.py:olive_run", "olive-run",
               "An Olive workflow config (the JSON of olive run --config), as the auto-opt it amounts to"),
    Deployment("flows/finetune.py:finetune", "finetune", "LoRA fine-tuning of one model on one dataset (grove "
               "finetune)"),
    Deployment("flows/benchmark.py:benchmark", "benchmark", "lm-eval tasks on one model (grove benchmark)"),
    Deployment("flows/run_node.py:run_node_flow", "run-node", "One node on this pool (the dispatcher's target)"),
)
FLEET = Deployment("flows/fleet_refresh.py:fleet_refresh", "fleet-refresh",
                   "Refresh every model x target of a manifest; only what changed upstream is rebuilt")
NIGHTLY = "0 2 * * *"


def fleet_schedule(cron: str | None = None, timezone: str | None = None) -> Any:
    """The fleet refresh's schedule (default: NIGHTLY, UTC); a cron expression or time zone Prefect
    refuses is one InvalidRequest naming it (checked before anything is applied)."""
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    cron, timezone = cron or NIGHTLY, timezone or "UTC"
    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValidationError as exc:
        field = str(exc.errors()[0]["loc"][0])
        given = f"--cron {cron!r}" if field == "cron" else f"--timezone {timezone!r}"
        fix = ("five fields: minute hour day-of-month month day-of-week, e.g. '0 2 * * *' (02:00 daily)"
               if field == "cron" else "an IANA time zone name, e.g. UTC or Europe/Paris")
        raise InvalidRequest(f"{given} is not valid for the fleet schedule; give {fix}") from None


def _project_root() -> Path:
    import grove.flows

    return Path(grove.flows.__file__).resolve().parent.parent


@contextlib.contextmanager
def _cwd(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


ZOMBIE_AUTOMATION = "grove-crash-zombie-flow-runs"
HEARTBEAT_SECONDS = 30


def _apply_zombie_automation() -> None:
    """A run whose machine dies stops sending heartbeats; mark it Crashed after three missed
    beats (Prefect's documented zombie-run recipe), so the UI and retries see the truth."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    automation = Automation(
        name=ZOMBIE_AUTOMATION,
        description="Flow runs that miss heartbeats for 90 s are marked Crashed",
        trigger=EventTrigger(after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
                             match={"prefect.resource.id": ["prefect.flow-run.*"]},
                             for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                             within=timedelta(seconds=3 * HEARTBEAT_SECONDS)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message="Marked Crashed by Grove: no heartbeat for 90 s (machine lost?)")],
    )
    try:
        existing = cast("Automation | None", Automation.read(name=ZOMBIE_AUTOMATION))  # sync here
    except ValueError:
        existing = None
    if existing is None:
        automation.create()
    else:
        automation.id = existing.id
        automation.update()


def deploy(store: str, fleet_manifest: dict[str, object] | None = None, schedule: Any = None) -> list[str]:
    """Create or update pools, the store's result block and the deployments; returns their names.
    With ``fleet_manifest``, ``fleet-refresh`` runs it on ``schedule`` (``fleet_schedule()``;
    default nightly at 02:00 UTC), on the cpu pool: it only orchestrates; each entry runs on its
    target's pool."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.deployments.runner import RunnerDeployment
    from prefect.exceptions import ObjectAlreadyExists

    from grove.flows.launch import result_storage

    schedule = (schedule or fleet_schedule()) if fleet_manifest else None

    with get_client(sync_client=True) as client:
        for pool in POOLS:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool.name, type="process",
                                                       concurrency_limit=pool.concurrency))
            except ObjectAlreadyExists:
                client.update_work_pool(pool.name, WorkPoolUpdate(concurrency_limit=pool.concurrency))
    _apply_zombie_automation()
    block = result_storage(store)
    env = {
        "PREFECT_RUNNER_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS),  # feeds the zombie automation
        # Node results (cache records) go to the shared store as Grove-JSON, never pickle.
        "PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": f"{block.get_block_type_slug()}/{block._block_document_name}",  # noqa: SLF001
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        "PREFECT_RESULTS_DEFAULT_SERIALIZER": "grove-json",
        "GROVE_STORE": store,
    }
    root = _project_root()
    names = []
    with _cwd(root):
        for dep in DEPLOYMENTS:
            for pool in POOLS:
                deployment = RunnerDeployment.from_entrypoint(
                    dep.entrypoint, name=f"{dep.name}-{pool.device}", work_pool_name=pool.name,
                    description=dep.description, tags=["grove", pool.device],
                    job_variables={"env": {**env, "GROVE_DEVICE": pool.device}, "working_dir": str(root)})
                deployment.apply()
                names.append(f"{dep.name}/{dep.name}-{pool.device}")
        fleet = RunnerDeployment.from_entrypoint(
            FLEET.entrypoint, name=FLEET.name, work_pool_name=POOLS[0].name, description=FLEET.description,
            tags=["grove", "fleet"], schedules=[schedule] if schedule else None,
            parameters={"manifest": fleet_manifest} if fleet_manifest else None,
            job_variables={"env": {**env, "GROVE_DEVICE": POOLS[0].device}, "working_dir": str(root)})
        fleet.apply()
        names.append(f"{FLEET.name}/{FLEET.name}"
                     + (f" (cron {schedule.cron}, {schedule.timezone})" if schedule else ""))
    return names
