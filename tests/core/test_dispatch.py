"""The dispatcher's decision (which pool builds a node) for every node of real requests, and the
run-node table that the other pool builds from. The end-to-end dispatch over a real stack is in
test_stack.py."""

from __future__ import annotations

import contextlib

import pytest

from grove.artifacts import StepConfig
from grove.dispatch import pool_for
from grove.flows.request import AutoOptRequest
from grove.flows.request_encoder import EncoderOptRequest
from grove.tasks.steps import STEPS

API = "http://127.0.0.1:1/api"


def _decoder_configs(request: AutoOptRequest) -> dict[str, StepConfig]:
    configs: dict[str, StepConfig] = {"download-model": request.download, "capture-onnx": request.capture,
                                      "evaluate": request.evaluation("0" * 64, gate=True),
                                      "package-genai": request.package}
    if request.int4 is not None:
        configs["quantize-int4"] = request.int4
    if request.int4_algorithm_used == "gptq":
        configs["quantize-torch"] = request.torch_quant("0" * 64)
    if (pruning := request.pruning("0" * 64)) is not None:
        configs["prune-torch"] = pruning
    if request.components is not None:
        configs.update({"export-components": request.exported, "evaluate-components": request.components_evaluation,
                        "package-components": request.components_package})
    return configs


def _encoder_configs(request: EncoderOptRequest) -> dict[str, StepConfig]:
    configs = {"download-model": request.download, "capture-encoder": request.capture,
               "optimize-graph": request.graph, "check-parity": request.parity(request.precision),
               "evaluate-encoder": request.evaluation(), "package-encoder": request.package}
    return {**configs, **({"quantize-int8": request.int8} if request.int8 else {}),
            **({"convert-fp16": request.fp16} if request.fp16 else {})}


def _placed(configs: dict[str, StepConfig], here: str | None, api: str | None = API) -> dict[str, str]:
    return {node: pool for node, config in configs.items() if (pool := pool_for(config, here or "", api or ""))}


def test_nothing_is_dispatched_outside_a_deployed_worker() -> None:
    gpu = AutoOptRequest(model_name_or_path="m", output_path="o", device="gpu", gpu_nodes=["quantize-int4"])
    assert _placed(_decoder_configs(gpu), here=None) == {}
    assert _placed(_decoder_configs(gpu), here="cpu", api=None) == {}


def test_a_cuda_target_sends_only_its_measurements_to_the_gpu_pool() -> None:
    gpu = AutoOptRequest(model_name_or_path="m", output_path="o", device="gpu", provider="CUDAExecutionProvider")
    # On the gpu pool's worker everything runs in place: download, capture and packaging need no
    # particular device, so nothing bounces to the cpu pool.
    assert _placed(_decoder_configs(gpu), here="gpu") == {}
    # Triggered on a cpu worker, only the evaluation on CUDA must move.
    assert _placed(_decoder_configs(gpu), here="cpu") == {"evaluate": "gpu"}
    encoder = EncoderOptRequest(model_name_or_path="m", output_path="o", device="gpu", precision="fp16",
                                task="feature-extraction")
    assert _placed(_encoder_configs(encoder), here="gpu") == {}
    assert _placed(_encoder_configs(encoder), here="cpu") == {"evaluate-encoder": "gpu"}


def test_cpu_targets_run_in_place_on_either_pool_unless_placed() -> None:
    cpu = AutoOptRequest(model_name_or_path="m", output_path="o")
    assert _placed(_decoder_configs(cpu), here="cpu") == {} == _placed(_decoder_configs(cpu), here="gpu")
    placed = AutoOptRequest(model_name_or_path="m", output_path="o", gpu_nodes=["quantize-int4", "evaluate"])
    assert _placed(_decoder_configs(placed), here="cpu") == {"quantize-int4": "gpu", "evaluate": "gpu"}
    assert _placed(_decoder_configs(placed), here="gpu") == {}


def test_placement_is_policy_not_recipe() -> None:
    plain = AutoOptRequest(model_name_or_path="m", output_path="o")
    placed = AutoOptRequest(model_name_or_path="m", output_path="o", gpu_nodes=["quantize-int4"])
    assert plain.int4 is not None and placed.int4 is not None
    assert plain.int4.recipe() == placed.int4.recipe() and placed.int4.device == "gpu"


@pytest.mark.parametrize("kind", ["decoder", "gptq", "sparsity", "components", "encoder"])
def test_run_node_can_build_every_node_the_dispatcher_may_send(kind: str) -> None:
    flags = {"gptq": {"int4_algorithm": "gptq", "gpu_nodes": ["quantize-int4"]}, "sparsity": {"sparsity": "2:4"},
             "components": {"components": ["vision_encoder"], "device": "gpu"}}
    configs = (_decoder_configs(AutoOptRequest(model_name_or_path="m", output_path="o", **flags.get(kind, {})))
               if kind != "encoder" else {**_encoder_configs(EncoderOptRequest(model_name_or_path="m", output_path="o",
                                                          task="text-classification")),
                     "convert-fp16": EncoderOptRequest(model_name_or_path="m", output_path="o",
                                                       precision="fp16").fp16})
    for node, config in configs.items():
        if node == "download-model":  # never needs a device: always runs where its flow runs
            assert config.device is None
            continue
        assert node in STEPS and isinstance(config, STEPS[node].config), node
        rebuilt = STEPS[node].config.model_validate(config.model_dump(mode="json"))  # as run-node receives it
        assert rebuilt == config


def test_training_goes_to_the_gpu_pool_only_while_it_has_a_live_worker() -> None:
    """train-adapter runs anywhere but prefers a GPU: from a cpu worker it is dispatched to gpu-pool when
    that pool has an online worker (asked of the real Prefect API of the test session), else it trains in
    place. QLoRA needs the GPU whatever the pools say."""
    import os
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    from grove.dispatch import pool_has_worker
    from grove.flows.request_finetune import FinetuneRequest

    lora = FinetuneRequest(model_name_or_path="m", data_name="d.jsonl").train(cuda=False)
    qlora = FinetuneRequest(model_name_or_path="m", data_name="d.jsonl", method="qlora").train(cuda=True)
    api = os.environ["PREFECT_API_URL"]
    assert pool_for(lora, "cpu", api, has_worker=lambda device: False) is None
    assert pool_for(lora, "cpu", api, has_worker=lambda device: device == "gpu") == "gpu"
    assert pool_for(lora, "gpu", api, has_worker=lambda device: True) is None
    assert pool_for(qlora, "cpu", api, has_worker=lambda device: False) == "gpu"
    assert pool_for(lora, "cpu", "", has_worker=lambda device: True) is None  # no API: not deployed, in place

    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_work_pool(WorkPoolCreate(name="gpu-pool", type="process"))
        had_worker = pool_has_worker("gpu")
        client.send_worker_heartbeat("gpu-pool", f"test-{uuid.uuid4().hex[:8]}", heartbeat_interval_seconds=60)
    assert not had_worker and pool_has_worker("gpu")
    assert pool_for(lora, "cpu", api) == "gpu"
