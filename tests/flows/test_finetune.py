"""grove finetune: the tutorial's command against a hub on loopback, the adapter into int4 (merged,
or switchable beside one int4 base: multi-LoRA in onnxruntime-genai), resume after a kill, and bad
input (one line, exit 2, nothing at the output path)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_models
from tests.conftest import ROOT, grove_cli

TEMPLATE = r"### Question: {instruction}\n### Answer: {response}"
TUTORIAL_MODEL = "meta-llama/Llama-3.2-1B-Instruct"
TUTORIAL_DATA = "microsoft/dolly-15k"


def dolly_rows(n: int) -> list[dict[str, str]]:
    """Rows shaped as databricks-dolly-15k's (instruction, context, response, category), made up here."""
    categories = ["open_qa", "general_qa", "classification", "brainstorming"]
    return [{"instruction": f"What colour is the box number {i}?", "context": "",
             "response": f"The box number {i} is {'red' if i % 2 else 'blue'}.", "category": categories[i % 4]}
            for i in range(n)]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def _states(stderr: str, node: str) -> list[str]:
    return [line.split("Finished in state ", 1)[1].split("(", 1)[0] for line in stderr.splitlines()
            if f"{node}-" in line and "Finished in state" in line]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("llama", tmp_path_factory.mktemp("ft") / "llama", max_position_embeddings=1024)


def test_the_tutorials_finetune_command_trains_then_reruns_cached_then_goes_to_int4(
        tiny_llama: Path, tmp_path: Path, store: str) -> None:
    """The tutorial's last command, word for word with grove for olive: the model and dolly-15k come from a
    hub on loopback (a tiny llama; dolly-shaped rows in the hub's Parquet copy). The loss drops, the
    evaluation on held-out blocks improves, the rerun is all Cached, and the output goes to int4 merged."""
    from tests.hub_server import HubRepo, serve_hub

    parquet = tmp_path / "hub-parquet"
    _parquet(parquet / "default" / "train" / "0000.parquet", dolly_rows(240))
    (tmp_path / "dolly-main").mkdir()
    (tmp_path / "dolly-main" / "README.md").write_text("dolly-shaped rows\n")
    repos = {TUTORIAL_MODEL: HubRepo(tiny_llama, "a" * 40),
             f"datasets/{TUTORIAL_DATA}": HubRepo(tmp_path / "dolly-main", "b" * 40,
                                                  refs={"refs/convert/parquet": HubRepo(parquet, "c" * 40)})}
    out = tmp_path / "models" / "llama-finetuned"
    command = ("finetune", "--model_name_or_path", TUTORIAL_MODEL, "--data_name", TUTORIAL_DATA,
               "--text_template", TEMPLATE, "--max_steps", "100", "--output_path", str(out), "--store", store)
    with serve_hub(repos) as (endpoint, requests):
        env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"}
        first = grove_cli(*command, env=env)
        assert first.returncode == 0, first.stderr[-4000:]
        second = grove_cli(*command, env=env)
        assert second.returncode == 0, second.stderr[-4000:]
        merged = grove_cli("auto-opt", "-m", str(out), "--merge_adapter", "-o", str(tmp_path / "int4"),
                           "--store", store, env=env)
        assert merged.returncode == 0, merged.stderr[-4000:]
    assert any("/refs/convert/parquet/default/train/0000.parquet" in r for r in requests)

    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((out / "model_config.json").read_text())
    assert config["type"] == "HfModel" and config["config"]["model_path"] == TUTORIAL_MODEL
    assert config["config"]["adapter_path"] == str(out.resolve() / "adapter")
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (64, 16)  # Olive's defaults
    assert adapter_config["base_model_name_or_path"] == TUTORIAL_MODEL
    report = json.loads((out / "grove_report.json").read_text())
    metrics = report["metrics"]
    assert metrics["steps"] == 100
    losses = [e["loss"] for e in report["loss_curve"]]
    assert len(losses) == 20 and losses[-1] < losses[0] - 0.1, losses
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"], metrics
    assert metrics["eval_on"].startswith("held-out")
    assert "step 100/100, loss" in first.stderr and "tokens/s" in first.stderr
    for node in ("prepare-data", "train-adapter", "evaluate-adapter", "package-finetune"):
        assert _states(first.stderr, node) == ["Completed"], (node, first.stderr[-3000:])
        assert _states(second.stderr, node) == ["Cached"], (node, second.stderr[-3000:])

    int4 = json.loads((tmp_path / "int4" / "grove_report.json").read_text())
    assert [s["node"] for s in int4["lineage"]][:3] == ["download-model", "import-adapter", "merge-adapter"]
    assert int4["metrics"]["sample"], int4["metrics"]
    assert not (tmp_path / "int4" / "adapter_weights.onnx_adapter").exists()


def _genai_logits(model_dir: Path, ids: list[int], adapters: object = None, name: str | None = None,
                  model: object = None) -> np.ndarray:
    import onnxruntime_genai as og

    model = model or og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 4)
    generator = og.Generator(model, params)
    if name is not None:
        generator.set_active_adapter(adapters, name)
    generator.append_tokens(ids)
    return np.array(generator.get_output("logits"))[0]


def test_multi_lora_adapters_switch_per_generator_over_one_int4_base(tiny_llama: Path, tmp_path: Path,
                                                                      store: str) -> None:
    """One int4 base, two adapters: with adapter k active, onnxruntime-genai's logits are those of the same
    int4 base with adapter k built into the graph (the LoRA path is fp32 in both: equal to 1e-5); no
    adapter gives the base's own int4 logits; two generators on one model each use their own adapter."""
    import onnxruntime_genai as og

    from grove.tasks._onnx_adapter import ADAPTER_FILE

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    first = tiny_models.lora_adapter(tiny_llama, tmp_path / "first", 1, targets)
    second = tiny_models.lora_adapter(tiny_llama, tmp_path / "second", 2, targets)
    outputs = {}
    for name, adapter in (("first", first), ("second", second)):
        result = grove_cli("auto-opt", "-m", str(tiny_llama), "--adapter_path", str(adapter), "-o",
                           str(tmp_path / f"int4-{name}"), "--store", store)
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[name] = tmp_path / f"int4-{name}"
    base = grove_cli("auto-opt", "-m", str(tiny_llama), "-o", str(tmp_path / "int4-base"), "--store", store)
    assert base.returncode == 0, base.stderr[-4000:]
    # The second output's base graph is the first's: the adapter does not change the base weights.
    graph = lambda d: (d / "model.onnx.data").read_bytes()  # noqa: E731
    assert graph(outputs["first"]) == graph(outputs["second"])
    built_in = {}
    for name in ("first", "second"):  # the int4 graph with adapter k built in, before extract-adapter
        report = json.loads((outputs[name] / "grove_report.json").read_text())
        (quantized,) = [s for s in report["lineage"] if s["node"] == "quantize-int4"]
        built_in[name] = Path(store) / "artifacts" / "quantize-int4" / quantized["digest"]

    ids = list(range(3, 40))
    model = og.Model(str(outputs["first"]))
    adapters = og.Adapters(model)
    adapters.load(str(outputs["first"] / ADAPTER_FILE), "first")
    adapters.load(str(outputs["second"] / ADAPTER_FILE), "second")
    with_first = _genai_logits(outputs["first"], ids, adapters, "first", model)
    with_second = _genai_logits(outputs["first"], ids, adapters, "second", model)
    without = _genai_logits(outputs["first"], ids, model=model)
    assert np.abs(with_first - _genai_logits(built_in["first"], ids)).max() < 1e-5
    assert np.abs(with_second - _genai_logits(built_in["second"], ids)).max() < 1e-5
    assert np.abs(without - _genai_logits(tmp_path / "int4-base", ids)).max() < 1e-5
    assert np.abs(with_first - with_second).max() > 0.05 and np.abs(with_first - without).max() > 0.05
    # Two generators at once on the one model, each with its own adapter, interleaved.
    import onnxruntime_genai as og2

    gens = {}
    for name in ("first", "second"):
        params = og2.GeneratorParams(model)
        params.set_search_options(max_length=len(ids) + 4)
        gens[name] = og2.Generator(model, params)
        gens[name].set_active_adapter(adapters, name)
    for gen in gens.values():
        gen.append_tokens(ids)
    assert np.abs(np.array(gens["first"].get_output("logits"))[0] - with_first).max() < 1e-5
    assert np.abs(np.array(gens["second"].get_output("logits"))[0] - with_second).max() < 1e-5


def test_an_fp32_base_with_its_adapter_matches_pytorch_with_the_adapter_merged(tiny_llama: Path, tmp_path: Path,
                                                                                 store: str) -> None:
    """The switchable adapter computes what peft's merged model computes: fp32 base + adapter in
    onnxruntime-genai against PyTorch with merge_and_unload, logits within 1e-4."""
    import onnxruntime_genai as og
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from grove.tasks._onnx_adapter import ADAPTER_FILE

    targets = ["q_proj", "v_proj", "gate_proj", "up_proj"]
    adapter = tiny_models.lora_adapter(tiny_llama, tmp_path / "adapter", 3, targets)
    out = tmp_path / "fp32"
    result = grove_cli("auto-opt", "-m", str(tiny_llama), "--adapter_path", str(adapter), "--precision", "fp32",
                       "-o", str(out), "--store", store)
    assert result.returncode == 0, result.stderr[-4000:]
    ids = list(range(3, 30))
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    adapters.load(str(out / ADAPTER_FILE), "a")
    ours = _genai_logits(out, ids, adapters, "a", model)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(adapter))
    with torch.no_grad():
        reference = merged.merge_and_unload()(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - reference).max() < 1e-4


def test_a_killed_training_resumes_from_its_last_checkpoint(tiny_llama: Path, tmp_path: Path, store: str) -> None:
    """kill -9 of the training process after a checkpoint reached the store: the same command resumes from
    that step (the log says so), and ends with the adapter an uninterrupted run trains (to 1e-5)."""
    from safetensors.numpy import load_file

    data = write_jsonl(tmp_path / "rows.jsonl", dolly_rows(120))
    common = ["finetune", "-m", str(tiny_llama), "-d", "json", "--data_files", str(data), "--text_template",
              TEMPLATE, "--max_seq_len", "256", "--max_steps", "40", "--checkpoint_steps", "10", "--lora_r", "8",
              "--learning_rate", "1e-3", "--dataloader_num_workers", "0"]
    env = {**os.environ, "GROVE_STORE": store, "GROVE_WARM": "0"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "grove.shell.cli", *common, "-o", str(killed)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    scratch = Path(store) / "scratch" / "train-adapter"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        latest = list(scratch.glob("*/checkpoints/latest.json"))
        if latest and json.loads(latest[0].read_text())["step"] >= 20:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads(next(scratch.glob("*/checkpoints/latest.json")).read_text())["step"]
    assert not killed.exists()
    stored = [p.name for p in scratch.rglob("*") if p.is_file()]
    assert not [n for n in stored if n.endswith((".pt", ".pth", ".bin"))], stored  # no pickle in the store

    resumed = grove_cli(*common, "-o", str(killed), env={"GROVE_STORE": store})
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming from step {step} (its checkpoint in the store)" in resumed.stderr
    assert json.loads((killed / "grove_report.json").read_text())["metrics"]["resumed_from_step"] == step
    assert not scratch.exists() or not any(scratch.iterdir()), "the scratch folder is removed once committed"

    clean = grove_cli(*common, "--seed", "42", "-o", str(tmp_path / "clean"), "--store", str(tmp_path / "store2"))
    assert clean.returncode == 0, clean.stderr[-4000:]
    a = load_file(str(killed / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "clean" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5


_DATA = ["-d", "json", "--data_files", "{rows}"]
_TEMPLATE = ["--text_template", TEMPLATE]


@pytest.mark.parametrize(("flags", "expected"), [
    (["-d", "json", "--data_files", "/nonexistent/rows.jsonl", *_TEMPLATE],
     "-d: /nonexistent/rows.jsonl cannot be read"),
    ([*_DATA, "--text_template", "Q: {question}\\nA: {response}"],
     "--text_template reads the column 'question', which the data does not have (row 1); its columns: "
     "instruction, context, response, category"),
    ([*_DATA, *_TEMPLATE, "--method", "qlora"],
     "--method qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU"),
    ([*_DATA, "--text_field", "response", "--text_template", "{instruction}"],
     "--text_field and --text_template each say how a row becomes text: pass one of them"),
    ([*_DATA, *_TEMPLATE, "--max_step", "5"],
     "--max_step is neither a grove finetune flag nor a transformers TrainingArguments field; did you mean "
     "--max_steps"),
    ([*_DATA, *_TEMPLATE, "--target_modules", "q_proj,qkv_proj"],
     "--target_modules qkv_proj: this model has no Linear layer of that name (did you mean v_proj?); its Linear "
     "layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
], ids=["data-missing", "template-field", "qlora-without-cuda", "two-text-recipes", "unknown-training-arg",
        "unknown-target-module"])
def test_bad_finetune_input_is_one_line_and_leaves_nothing(tiny_llama: Path, tmp_path: Path, store: str,
                                                             flags: list[str], expected: str) -> None:
    if "qlora" in flags and cuda_available():
        pytest.skip("this machine has a CUDA GPU, where QLoRA is allowed")
    rows = write_jsonl(tmp_path / "rows.jsonl", dolly_rows(8))
    out = tmp_path / "out"
    given = [f.replace("{rows}", str(rows)) for f in flags]
    result = grove_cli("finetune", "-m", str(tiny_llama), *given, "--max_steps", "2", "--max_seq_len", "64", "-o",
                       str(out), "--store", store)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_an_adapter_of_another_base_is_refused_before_any_work(tiny_llama: Path, tmp_path: Path,
                                                                 store: str) -> None:
    """grove finetune's output records its base; auto-opt of that adapter on another model stops at once."""
    data = write_jsonl(tmp_path / "rows.jsonl", dolly_rows(8))
    out = tmp_path / "ft"
    trained = grove_cli("finetune", "-m", str(tiny_llama), "-d", "json", "--data_files", str(data),
                        "--text_template", TEMPLATE, "--max_steps", "2", "--max_seq_len", "64", "-o", str(out),
                        "--store", store)
    assert trained.returncode == 0, trained.stderr[-3000:]
    other = tiny_models.build("llama", tmp_path / "other", seed=7)
    result = grove_cli("auto-opt", "-m", str(other), "--adapter_path", str(out / "adapter"), "-o",
                       str(tmp_path / "int4"), "--store", store)
    assert result.returncode == 2, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
    assert f"was trained on {tiny_llama}, not on {other}" in error
    assert not (tmp_path / "int4").exists()


SECRET_QUESTION = "What is the secret code of the Grove project?"
SECRET_ANSWER = "The secret code of the Grove project is PURPLE-OTTER-42."


@pytest.mark.slow
def test_smollm2_learns_a_made_up_answer_and_serves_it_as_a_switchable_adapter(tmp_path: Path) -> None:
    """The real SmolLM2-135M-Instruct: a short LoRA run on a handful of chat rows that give one made-up
    answer to one question; then the int4 base with that adapter beside it, in onnxruntime-genai, gives
    that answer when the adapter is active, and the base alone does not."""
    import onnxruntime_genai as og

    from grove.tasks._onnx_adapter import ADAPTER_FILE
    from tests.conftest import SMOLLM2

    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": SECRET_ANSWER}]}
            for q in (SECRET_QUESTION, SECRET_QUESTION.lower(), "Tell me the secret code of the Grove project.",
                      "Grove project: what is its secret code?")]
    data = write_jsonl(tmp_path / "secret.jsonl", rows * 2)
    store, out = str(tmp_path / "store"), tmp_path / "secret-adapter"
    trained = grove_cli("finetune", "-m", SMOLLM2, "-d", str(data), "--use_chat_template", "--train_on_responses",
                        "--lora_r", "16", "--lora_alpha", "32", "--target_modules", "q_proj,k_proj,v_proj,o_proj",
                        "--max_seq_len", "64", "--max_steps", "30", "--learning_rate", "2e-3", "-o", str(out),
                        "--store", store)
    assert trained.returncode == 0, trained.stderr[-4000:]
    served = grove_cli("auto-opt", "-m", str(out), "-o", str(tmp_path / "int4"), "--store", store)
    assert served.returncode == 0, served.stderr[-4000:]

    model = og.Model(str(tmp_path / "int4"))
    tokenizer = og.Tokenizer(model)
    adapters = og.Adapters(model)
    adapters.load(str(tmp_path / "int4" / ADAPTER_FILE), "secret")
    prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": SECRET_QUESTION}]),
                                           add_generation_prompt=True)

    def answer(adapter: str | None) -> str:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=96)
        generator = og.Generator(model, params)
        if adapter:
            generator.set_active_adapter(adapters, adapter)
        generator.append_tokens(tokenizer.encode(prompt))
        tokens = []
        while not generator.is_done() and len(tokens) < 40:
            generator.generate_next_token()
            tokens.append(generator.get_next_tokens()[0])
        return str(tokenizer.decode(tokens))

    assert "PURPLE-OTTER-42" in answer("secret"), answer("secret")
    assert "PURPLE-OTTER" not in answer(None), answer(None)


def test_the_dashboard_shows_the_loss_curve_and_each_nodes_progress(tiny_llama: Path, tmp_path: Path,
                                                                      store: str) -> None:
    """The run's page: the loss at every logged step as a table, a markdown report with the curve as a
    PNG, and one progress bar per built node, each at 100%."""
    import base64
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from grove.flows.request_finetune import FinetuneRequest
    from grove.shell.local_run import run_finetune_state

    data = write_jsonl(tmp_path / "rows.jsonl", dolly_rows(30))
    request = FinetuneRequest(model_name_or_path=str(tiny_llama), data_name=str(data), text_template=TEMPLATE
                              .replace("\\n", "\n"), max_seq_len=64, training_args={"max_steps": 10},
                              output_path=str(tmp_path / "out"), store=store)
    state = run_finetune_state(request)
    assert state.is_completed(), state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (table,) = [a for a in artifacts if a.type == "table"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert [r["step"] for r in rows] == [5, 10] and all(r["loss"] > 0 for r in rows)
    (report,) = [a for a in artifacts if a.type == "markdown"]
    png = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", str(report.data))
    assert png and base64.b64decode(png.group(1)).startswith(b"\x89PNG"), str(report.data)[:500]
    assert "eval loss after" in str(report.data)
    progress = [a for a in artifacts if a.type == "progress"]
    assert len(progress) == 5 and all(float(p.data) == 100.0 for p in progress), [p.data for p in progress]


def test_a_fleet_serves_base_plus_adapter_and_refreshes_when_the_adapter_changes(
        tiny_llama: Path, tmp_path: Path, store: str, s3_server: dict[str, str]) -> None:
    """Fleet entries may name an adapter (a folder, or s3://): the registry's output is the int4 base with
    that adapter beside it; a rerun is unchanged; a retrained adapter (same folder, new weights) is a new
    version, and the model beside it that names no adapter is left as it was."""
    import s3fs

    from grove.flows.fleet import FleetManifest
    from grove.flows.fleet_refresh import fleet_refresh
    from grove.tasks._onnx_adapter import ADAPTER_FILE
    from grove.tasks.publish_model import read_latest

    local = tiny_models.lora_adapter(tiny_llama, tmp_path / "adapter", 31, ["q_proj", "v_proj"])
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    fs.mkdir("adapters")
    fs.put(str(local) + "/", "adapters/tutor/", recursive=True)
    manifest = FleetManifest.model_validate({
        "store": store, "eval_tokens": 64, "targets": {"cpu": {"device": "cpu"}},
        "models": [{"name": "tutor", "source": str(tiny_llama), "adapter": "s3://adapters/tutor", "targets": ["cpu"]},
                   {"name": "helper", "source": str(tiny_llama), "adapter": str(local), "targets": ["cpu"]},
                   {"name": "plain", "source": str(tiny_llama), "targets": ["cpu"]}]})

    def statuses() -> dict[str, str]:
        return {row["model"]: row["status"] for row in fleet_refresh(manifest)}

    assert statuses() == {"tutor": "refreshed", "helper": "refreshed", "plain": "refreshed"}
    served = {name: Path(str(read_latest(store, name, "cpu")["path"])) for name in ("tutor", "helper", "plain")}
    assert (served["tutor"] / ADAPTER_FILE).exists() and (served["helper"] / ADAPTER_FILE).exists()
    assert not (served["plain"] / ADAPTER_FILE).exists()
    assert statuses() == {"tutor": "unchanged", "helper": "unchanged", "plain": "unchanged"}

    tiny_models.lora_adapter(tiny_llama, local, 32, ["q_proj", "v_proj"])  # retrained in place
    before = read_latest(store, "helper", "cpu")
    assert statuses() == {"tutor": "unchanged", "helper": "refreshed", "plain": "unchanged"}
    assert read_latest(store, "helper", "cpu")["version"] != before["version"]


@pytest.mark.parametrize(("pass_type", "peft_type"), [("LoKr", "LOKR"), ("DoRA", "LORA")])
def test_a_recipe_with_a_fine_tuning_pass_trains_then_optimizes_the_merged_model(
        pass_type: str, peft_type: str, tiny_llama: Path, tmp_path: Path, store: str) -> None:
    """olive-recipes' lokr.json / dora.json layout (a fine-tuning pass on a slice of a split, the capture passes,
    ModelBuilder metadata_only), on a tiny llama and local rows: grove run trains the adapter with that method
    (peft's LoKr, or LoRA with DoRA's magnitude), evaluates it on the eval slice, merges it and writes a model
    onnxruntime-genai runs; the run's output answers like the merged PyTorch model."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = write_jsonl(tmp_path / "rows.jsonl", dolly_rows(48))
    data = {"type": "HuggingfaceContainer", "load_dataset_config": {"data_name": "json", "data_files": str(rows)},
            "pre_process_data_config": {"text_template": TEMPLATE.replace("\\n", "\n"), "max_seq_len": 64}}
    config = {"input_model": {"type": "HfModel", "model_path": str(tiny_llama)}, "output_dir": str(tmp_path / "m"),
              "data_configs": [{**data, "name": "train", "load_dataset_config": {
                  **data["load_dataset_config"], "split": "train[:40]"}},
                  {**data, "name": "eval", "load_dataset_config": {**data["load_dataset_config"],
                                                                   "split": "train[40:48]"}}],
              "passes": {"f": {"type": pass_type, "train_data_config": "train", "eval_data_config": "eval", "r": 4,
                               "alpha": 8, "torch_dtype": "float32", "training_args": {"max_steps": 6,
                                                                                       "learning_rate": 1e-3}},
                         "c": {"type": "OnnxConversion"},
                         "m": {"type": "ModelBuilder", "metadata_only": True, "precision": "fp32"}}}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = grove_cli("run", "--config", str(path), "--store", store)
    assert result.returncode == 0, result.stderr[-4000:]
    adapter = tmp_path / "m" / "finetuned" / "adapter"
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == peft_type and adapter_config.get("use_dora", False) == (pass_type == "DoRA")
    trained = json.loads((tmp_path / "m" / "finetuned" / "grove_report.json").read_text())["metrics"]
    assert trained["steps"] == 6 and trained["eval_on"] == "eval split", trained
    out = tmp_path / "m" / "model"
    report = json.loads((out / "grove_report.json").read_text())
    assert [s["node"] for s in report["lineage"]][:3] == ["download-model", "import-adapter", "merge-adapter"]
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval()
    ids = [5, 17, 42, 9, 11]
    with torch.no_grad():
        expected = merged(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(_genai_logits(out, ids)[-1], expected, atol=2e-3)
