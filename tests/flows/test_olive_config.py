"""`grove run --config`: Olive workflow configs (the tutorial's `olive run --config config.json`)
run as the `grove auto-opt` they amount to; what Grove cannot honour is one error naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from tests.conftest import ROOT, grove_cli

TUTORIAL_CONFIG = ROOT / "tests" / "data" / "olive_tutorial_config.json"


def _write(tmp_path: Path, config: dict, name: str = "config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path



def _generates_twelve_tokens(out: Path) -> None:
    """The output loads in onnxruntime-genai and generates up to its max_length."""
    import onnxruntime_genai as og

    model = og.Model(str(out))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=12)
    generator = og.Generator(model, params)
    generator.append_tokens([[1, 2, 3, 4]])
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 12

def test_the_tutorials_config_runs_and_is_the_same_recipe_as_its_auto_opt_command(
        tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    """The tutorial's config file, verbatim, with the hub on loopback serving a tiny Qwen2 under the
    tutorial's id: it writes an onnxruntime-genai int4 model at its output_dir that generates, and the
    auto-opt command it prints is the same recipe (that run builds nothing: every digest equal)."""

    from tests.hub_server import HubRepo, serve_hub

    config = json.loads(TUTORIAL_CONFIG.read_text())
    assert config["input_model"]["config"]["hf_config"]["model_name"] == "Qwen/Qwen2.5-0.5B-Instruct"
    repos = {"Qwen/Qwen2.5-0.5B-Instruct": HubRepo(tiny_dir("qwen2"), "5" * 40)}
    with serve_hub(repos) as (endpoint, _):
        env = {"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0", "GROVE_STORE": store}
        result = grove_cli("run", "--config", str(TUTORIAL_CONFIG), env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        [line] = [x for x in result.stderr.splitlines() if x.startswith("grove run: ") and " is: grove auto-opt " in x]
        command = line.split(" is: grove ", 1)[1].split()
        assert command[:5] == ["auto-opt", "--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct", "--output_path",
                               "models/optimized"], command
        assert {"--device": "cpu", "--provider": "CPUExecutionProvider", "--precision": "int4"}.items() <= \
            dict(zip(command[5::2], command[6::2], strict=False)).items(), command
        assert "search_strategy: Grove does not search" in result.stderr
        out = tmp_path / "models" / "optimized"
        report = json.loads((out / "grove_report.json").read_text())
        assert report["target"]["precision"] == "int4", report["target"]

        again = grove_cli(*command[:3], "--output_path", str(tmp_path / "again"), *command[5:], env=env, cwd=tmp_path)
        assert again.returncode == 0, again.stderr[-3000:]
    lineage = {n["node"]: n["digest"] for n in report["lineage"]}
    assert lineage == {n["node"]: n["digest"] for n in json.loads((tmp_path / "again" / "grove_report.json")
                                                                   .read_text())["lineage"]}
    _generates_twelve_tokens(out)


def test_olive_recipes_llm_chain_runs_as_grove_gptq_with_mixed_precision(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                         store: str) -> None:
    """olive-recipes' LLM recipe (SelectiveMixedPrecision -> Gptq -> Rtn 8-bit head and embedding ->
    ModelBuilder int4 -> TieWordEmbeddings), pointed at a tiny tied Qwen2: it runs through `grove run`
    as GPTQ int4 on the PyTorch weights, the most sensitive share of the linear layers and the lm_head
    (which the embedding reads) at 8 bits, and the model generates in onnxruntime-genai."""
    import onnx

    config = {
        "input_model": {"type": "HfModel", "model_path": str(tiny_dir("qwen2")),
                        "load_kwargs": {"torch_dtype": "float16"}},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {
            "s": {"type": "SelectiveMixedPrecision", "algorithm": "kld_gradient", "bits": 4, "high_bits": 8,
                  "ratio": 0.65, "sym": False, "group_size": 32},
            "g": {"type": "gptq", "bits": 4, "sym": False, "group_size": 32},
            "r": {"type": "rtn", "bits": 8, "sym": False, "group_size": 32, "lm_head": True, "embeds": True,
                  "overrides": {"lm_head": {"bits": 8}, "model.embed_tokens": {"bits": 8}}},
            "m": {"type": "ModelBuilder", "precision": "int4"},
            "t": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "TieWordEmbeddings"}]}},
        "target": "local_system", "output_dir": "model", "cache_dir": "cache", "no_artifacts": True}
    result = grove_cli("run", "--config", str(_write(tmp_path, config)), env={"GROVE_STORE": store}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [command] = [x for x in result.stderr.splitlines() if " is: grove auto-opt " in x]
    assert {"--int4_algorithm gptq", "--block_size 32", "--mixed_precision_ratio 0.65",
            "--mixed_precision_algorithm kld_gradient"} <= set(
        " ".join(pair) for pair in zip(command.split()[::1], command.split()[1:], strict=False)), command
    assert "GPTQ calibration: Grove's built-in text" in result.stderr
    out = tmp_path / "model"
    assert json.loads((out / "grove_report.json").read_text())["target"]["int4_algorithm"] == "gptq"
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"
            and "lm_head" not in n.name]  # q, k and v fused in one
    assert 0 < sum(b == 8 for b in bits) < len(bits), bits
    # the 8-bit lm_head as a shortlist: a 4-bit pass, its best tokens rescored from the 8-bit rows
    rescore = {next(a.i for a in n.attribute if a.name == "bits") for n in graph.node
               if n.op_type == "GatherBlockQuantized" and "lm_head" in n.name}
    assert rescore == {8} and any(n.op_type == "TopK" for n in graph.node), rescore
    _generates_twelve_tokens(out)


def test_an_embedding_recipe_keeps_the_builders_hidden_states_output(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                      store: str) -> None:
    """olive-recipes' Qwen3-Embedding int4 recipe (the GPTQ chain, then a ModelBuilder pass with
    extra_options include_hidden_states and int4_accuracy_level 0) on a tiny Qwen3: the output has the
    hidden_states output beside the logits, and its MatMulNBits compute at accuracy level 0."""
    import onnx
    import onnxruntime as ort

    config = {"input_model": {"type": "HfModel", "model_path": str(tiny_dir("qwen3"))},
              "passes": {"g": {"type": "gptq", "bits": 4, "sym": False, "group_size": 32},
                         "m": {"type": "ModelBuilder", "precision": "int4",
                               "extra_options": {"include_hidden_states": 1, "int4_accuracy_level": 0}},
                         "t": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "TieWordEmbeddings"}]}},
              "output_dir": "model"}
    result = grove_cli("run", "--config", str(_write(tmp_path, config)), env={"GROVE_STORE": store}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--include_hidden_states" in result.stderr and "--accuracy_level 0" in result.stderr
    model = tmp_path / "model" / "model.onnx"
    outputs = {o.name for o in ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).get_outputs()}
    assert {"hidden_states", "logits"} <= outputs, outputs
    levels = {next(a.i for a in n.attribute if a.name == "accuracy_level")
              for n in onnx.load(str(model), load_external_data=False).graph.node if n.op_type == "MatMulNBits"}
    assert levels == {0}, levels


def test_a_builder_then_8_bit_k_quant_chain_writes_8_bit_blocks(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                  store: str) -> None:
    """olive-recipes' 8-bit chain (a ModelBuilder at fp32, then OnnxKQuantQuantization with bits 8, as its
    Whisper int8 recipes write it) on a tiny Llama: the output is the builder's 8-bit MatMulNBits."""
    import onnx

    config = {"input_model": {"type": "HfModel", "model_path": str(tiny_dir("llama"))},
              "passes": {"m": {"type": "ModelBuilder", "precision": "fp32"},
                         "q": {"type": "OnnxKQuantQuantization", "bits": 8, "external_data_name": "w.onnx.data"}},
              "output_dir": "model"}
    result = grove_cli("run", "--config", str(_write(tmp_path, config)), env={"GROVE_STORE": store}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--precision int8" in result.stderr and "external_data_name 'w.onnx.data' not used" in result.stderr
    graph = onnx.load(str(tmp_path / "model" / "model.onnx"), load_external_data=False).graph
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in graph.node if n.op_type == "MatMulNBits"}
    assert bits == {8}, bits


_QWEN35_TEXT = {"m": {"type": "ModelBuilder", "precision": "int4", "int4_accuracy_level": 4,
                       "int4_algo_config": "k_quant_linear",
                       "extra_options": {"filename": "text.onnx", "prune_lm_head": True}},
                "t": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "TieWordEmbeddings"}]}}


_MOE_TEXT = {"m": {"type": "ModelBuilder", "precision": "int4", "int4_block_size": 128, "int4_accuracy_level": 4,
                   "extra_options": {"filename": "text.onnx"}}}  # Qwen3.5-35B-A3B's text.json


@pytest.mark.parametrize("family", ["qwen2_5_vl", "mistral3", "qwen3_5", "qwen3_5_moe"])
def test_an_image_text_models_text_recipe_writes_its_text_decoder(family: str, tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                  store: str) -> None:
    """olive-recipes' text.json of an image-text model (Qwen2.5-VL, Qwen3-VL, Fara, Ministral 3: a ModelBuilder
    at int4 on the whole checkpoint; Qwen3.5's with a pruned lm_head and TieWordEmbeddings) on a tiny one:
    the output is its text decoder, as genai's text type, and it generates."""
    passes = _QWEN35_TEXT if family == "qwen3_5" else _MOE_TEXT if family == "qwen3_5_moe" else {
        "convert": {"type": "ModelBuilder", "precision": "int4", "int4_algo_config": "k_quant_mixed",
                    "extra_options": {"filename": "text.onnx"}}}
    config = {"input_model": {"type": "HfModel", "model_path": str(tiny_dir(family))}, "passes": passes,
              "output_dir": "model"}
    result = grove_cli("run", "--config", str(_write(tmp_path, config)), env={"GROVE_STORE": store}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    genai = json.loads((tmp_path / "model" / "genai_config.json").read_text())
    assert genai["model"]["type"] == f"{family}_text", genai["model"]["type"]
    assert f"{family} is an image-text checkpoint: its text decoder is exported" in result.stderr
    if family == "qwen3_5_moe":  # its experts: the builder's own int4 (QMoE), the default for it
        report = json.loads((tmp_path / "model" / "grove_report.json").read_text())
        assert report["target"]["int4_algorithm"] == "builder", report["target"]
        graph = onnx.load(str(tmp_path / "model" / "model.onnx"), load_external_data=False).graph
        ops = [n.op_type for n in graph.node]
        assert ops.count("QMoE") == 2 and "MoE" not in ops
    _generates_twelve_tokens(tmp_path / "model")


def test_gemma4s_mobius_recipe_writes_its_text_decoder_and_k_quant_int4(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                       store: str) -> None:
    """olive-recipes' Gemma 4 cpu/int4 config (MobiusBuilder at fp32, then OnnxKQuantQuantization at 4 bits) on
    a tiny Gemma 4: mobius writes its text decoder as genai's gemma4_text, k-quant makes it int4, and it
    generates; the report's reference is the fp32 graph."""
    passes = {"mobius_build": {"type": "MobiusBuilder", "precision": "fp32"},
              "int4_quantize": {"type": "OnnxKQuantQuantization", "bits": 4, "block_size": 32,
                                "save_as_external_data": True}}
    config = {"input_model": {"type": "HfModel", "model_path": str(tiny_dir("gemma4"))}, "passes": passes,
              "output_dir": "model"}
    result = grove_cli("run", "--config", str(_write(tmp_path, config)), env={"GROVE_STORE": store}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "model"
    assert json.loads((out / "genai_config.json").read_text())["model"]["type"] == "gemma4_text"
    assert "gemma4 is an image-text checkpoint: its text decoder is exported" in result.stderr
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["int4_algorithm"] == "k_quant", report["target"]
    _generates_twelve_tokens(out)


def test_an_encoder_config_in_yaml_with_its_quantization_options(tmp_path: Path, store: str) -> None:
    """Olive >= 0.7's flat style (HfModel, options beside "type", engine keys at the top), as YAML:
    the dynamic quantization pass's options reach the int8 node; a command-line -o wins over output_dir."""
    import yaml

    from tests import tiny_models

    model = tiny_models.build_encoder("bert", tmp_path / "bert")
    config = {
        "input_model": {"type": "HfModel", "model_path": str(model), "task": "text-classification"},
        "systems": {"local": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {"conversion": {"type": "OnnxConversion", "target_opset": 17},
                   "fusions": {"type": "OrtTransformersOptimization", "model_type": "bert", "opt_level": 1},
                   "int8": {"type": "OnnxDynamicQuantization", "per_channel": False,
                            "op_types_to_quantize": ["MatMul"]}},
        "target": "local",
        "output_dir": str(tmp_path / "not-here"),
    }
    path = tmp_path / "bert.yaml"
    path.write_text(yaml.safe_dump(config))
    result = grove_cli("run", "--config", str(path), "-o", str(tmp_path / "out"), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--int8_mode dynamic --no-per_channel --op_types_to_quantize MatMul" in result.stderr
    for noise in ("torchvision is not installed", "UserWarning", "FutureWarning", "Removing initializer",
                  "Please consider to run pre-processing"):  # the libraries' own lines (grove/quiet.py)
        assert noise not in result.stderr, result.stderr
    report = json.loads((tmp_path / "out" / "grove_report.json").read_text())
    assert report["target"]["precision"] == "int8" and report["target"]["task"] == "text-classification"
    int8 = next(n for n in report["lineage"] if n["node"] == "quantize-int8")
    assert int8["config"]["per_channel"] is False and int8["config"]["op_types_to_quantize"] == ["MatMul"]
    assert not (tmp_path / "not-here").exists()


def test_olives_bert_ptq_example_runs_on_the_hubs_parquet_copy_of_glue(tmp_path: Path, store: str) -> None:
    """Olive's examples/bert/bert_ptq_cpu.json, as written (one MRPC data config for calibration,
    accuracy, latency and perf tuning; label_cols; HF metric names), with a tiny model and the
    dataset served by the loopback hub in its Parquet copy (refs/convert/parquet, the split in two
    shards, as the hub cuts a large one): the static int8 calibrates on the sentence pairs, and the
    classifier is scored on the first max_samples rows, as pairs. Those rows (8 in the first shard, 4
    in the second) carry the model's own answers and the rows after them wrong ones, so the fp32
    accuracy is 1.0 only if exactly those rows are scored, in order, and tokenized as pairs."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from grove.tasks import _encoder_io as eio
    from grove.tasks._data_sources import text_sha256
    from tests import tiny_models
    from tests.hub_server import HubRepo, serve_hub

    model = tiny_models.build_encoder("bert", tmp_path / "bert")
    sentences = [" ".join(p.split()[:12]) for p in eio.read_lines("builtin:GPL-3", 40)]
    pairs = list(zip(sentences[0::2], sentences[1::2], strict=False))
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(model)(
            **AutoTokenizer.from_pretrained(model)([a for a, _ in pairs], [b for _, b in pairs], padding=True,
                                                   return_tensors="pt")).logits
    top2 = logits.topk(2).values
    clear = [i for i in range(len(pairs)) if top2[i, 0] - top2[i, 1] > 0.05]  # no near-tie to flip in ONNX
    assert len(clear) >= 16, "the tiny model's answers are too close to call"
    answers = logits.argmax(-1).tolist()
    rows = [(pairs[i], answers[i] if n < 12 else (answers[i] + 1) % 3) for n, i in enumerate(clear[:16])]
    main_branch, converted = tmp_path / "hub-main", tmp_path / "hub-parquet" / "mrpc" / "validation"
    main_branch.mkdir()
    (main_branch / "README.md").write_text("GLUE, as the hub keeps it\n")
    converted.mkdir(parents=True)
    columns = {"sentence1": [a for (a, _), _ in rows], "sentence2": [b for (_, b), _ in rows],
               "label": [y for _, y in rows], "idx": list(range(len(rows)))}
    for shard, part in enumerate((slice(0, 8), slice(8, None))):
        pq.write_table(pa.table({k: v[part] for k, v in columns.items()}), converted / f"{shard:04d}.parquet")
    mrpc = "glue_mrpc"
    config = {  # examples/bert/bert_ptq_cpu.json; the model, data_name and max_samples are this test's
        "input_model": {"type": "HfModel", "model_path": str(model), "task": "text-classification",
                        "load_kwargs": {"attn_implementation": "eager"}},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider", "OpenVINOExecutionProvider"]}]}},
        "data_configs": [{"name": mrpc, "type": "HuggingfaceContainer",
                          "load_dataset_config": {"data_name": "grove-test/glue", "subset": "mrpc",
                                                  "split": "validation"},
                          "pre_process_data_config": {"input_cols": ["sentence1", "sentence2"],
                                                      "label_cols": ["label"], "max_samples": 12},
                          "dataloader_config": {"batch_size": 1}}],
        "evaluators": {"common_evaluator": {"metrics": [
            {"name": "accuracy", "type": "accuracy", "backend": "huggingface_metrics", "data_config": mrpc,
             "sub_types": [{"name": "accuracy", "priority": 1, "goal": {"type": "max-degradation", "value": 0.05}},
                           {"name": "f1"}]},
            {"name": "latency", "type": "latency", "data_config": mrpc, "sub_types": [{"name": "avg"}]},
            {"name": "throughput", "type": "throughput", "data_config": mrpc, "sub_types": [{"name": "avg"}]}]}},
        "passes": {"conversion": {"type": "OnnxConversion", "target_opset": 13},
                   "transformers_optimization": {"type": "OrtTransformersOptimization", "disable_search": True},
                   "quantization": {"type": "OnnxQuantization", "quant_preprocess": True, "per_channel": False,
                                    "reduce_range": False, "calibrate_method": "MinMax", "data_config": mrpc},
                   "perf_tuning": {"type": "OrtPerfTuning", "data_config": mrpc}},
        "search_strategy": {"execution_order": "joint", "search_algorithm": "tpe", "num_samples": 3, "seed": 0},
        "evaluator": "common_evaluator", "host": "local_system", "target": "local_system", "cache_dir": "cache",
        "output_dir": str(tmp_path / "out")}
    hub = HubRepo(main_branch, "6" * 40, refs={"refs/convert/parquet": HubRepo(tmp_path / "hub-parquet", "7" * 40)})
    with serve_hub({"datasets/grove-test/glue": hub}) as (endpoint, requests):
        result = grove_cli("run", "--config", str(_write(tmp_path, config)), "--store", store,
                           env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"})

    assert result.returncode == 0, result.stderr[-3000:]
    table = "hf://datasets/grove-test/glue@refs/convert/parquet/mrpc/validation/*.parquet"
    assert (f"--calibration_data '{table}#text=sentence1+sentence2' --calibration_samples 12 --int8_mode static "
            f"--no-per_channel --calibrate_method MinMax --eval_data '{table}#text=sentence1+sentence2,label=label' "
            "--eval_samples 12") in result.stderr, result.stderr
    assert "not computed: f1 (accuracy; computed only for token classifiers" in result.stderr
    assert ("execution providers OpenVINOExecutionProvider are not Grove targets; it optimizes for "
            "CPUExecutionProvider") in result.stderr
    assert "scoring the first 12 of 16 labelled rows" in result.stderr
    for shard in ("0000", "0001"):
        assert any(r.endswith(f"/resolve/refs/convert/parquet/mrpc/validation/{shard}.parquet") for r in requests)
    report = json.loads((tmp_path / "out" / "grove_report.json").read_text())
    assert report["reference"]["accuracy"] == 1.0
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0
    int8 = next(n for n in report["lineage"] if n["node"] == "quantize-int8")["config"]
    assert (int8["mode"], int8["calibration_data"], int8["calibration_samples"]) == (
        "static", f"{table}#text=sentence1+sentence2", 12)
    assert int8["calibration_sha256"] == text_sha256(str(converted / "*.parquet"))  # an edited shard: new int8


def test_a_hub_dataset_under_its_old_name_follows_the_hubs_redirect(tmp_path: Path) -> None:
    """olive-recipes' BERT configs name GLUE 'glue', which the hub now answers with a redirect to
    nyu-mll/glue: Grove asks the hub, as huggingface_hub and datasets do, and reads the new name's
    Parquet copy (here a loopback hub moved glue to grove-test/glue)."""
    from tests.hub_server import HubRepo, serve_hub

    (tmp_path / "main").mkdir()
    (tmp_path / "main" / "README.md").write_text("GLUE\n")
    config = {"input_model": {"type": "HfModel", "model_path": "some/bert", "task": "text-classification"},
              "data_configs": [{"name": "mrpc", "type": "HuggingfaceContainer",
                                "load_dataset_config": {"data_name": "glue", "subset": "mrpc", "split": "validation"}}],
              "evaluators": {"e": {"metrics": [{"name": "accuracy", "type": "accuracy", "data_config": "mrpc",
                                                "sub_types": [{"name": "accuracy"}]}]}},
              "evaluator": "e", "passes": {"q": {"type": "OnnxDynamicQuantization"}}, "output_dir": "o"}
    with serve_hub({"datasets/grove-test/glue": HubRepo(tmp_path / "main", "6" * 40)},
                   moved={"datasets/glue": "datasets/grove-test/glue"}) as (endpoint, requests):
        result = grove_cli("run", "--config", str(_write(tmp_path, config)), "--dry-run",
                           env={"HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--eval_data 'hf://datasets/grove-test/glue@refs/convert/parquet/mrpc/validation/*.parquet" \
        in result.stdout, result.stdout
    assert "data_configs.mrpc.load_dataset_config.data_name 'glue' is 'grove-test/glue' on the hub now" in result.stderr
    assert "GET /api/datasets/glue -> 307" in requests


def test_a_hub_split_that_is_not_there_is_one_clear_error(tmp_path: Path) -> None:
    """A data config's subset or split the hub's Parquet copy does not have: the error says how that
    copy is laid out and what to check, not a bare "no such file". (In a child process: the hub
    client reads its endpoint when imported.)"""
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.hub_server import HubRepo, serve_hub

    (tmp_path / "main").mkdir()
    (tmp_path / "main" / "README.md").write_text("a dataset\n")
    (tmp_path / "parquet" / "default" / "test").mkdir(parents=True)
    pq.write_table(pa.table({"text": ["a row"]}), tmp_path / "parquet" / "default" / "test" / "0000.parquet")
    hub = HubRepo(tmp_path / "main", "6" * 40, refs={"refs/convert/parquet": HubRepo(tmp_path / "parquet", "7" * 40)})
    script = ("import sys\nfrom grove.errors import InvalidRequest\nfrom grove.tasks._data_sources import read_table\n"
              "split = 'hf://datasets/grove-test/imdb@refs/convert/parquet/default/{}/*.parquet'\n"
              "print(read_table(split.format('test')))\n"
              "try:\n    read_table(split.format('validation'))\nexcept InvalidRequest as exc:\n    print(exc)\n")
    with serve_hub({"datasets/grove-test/imdb": hub}) as (endpoint, _):
        done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_OFFLINE": "0",
                                   "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 0, done.stderr[-2000:]
    table, error = done.stdout.strip().splitlines()
    assert table == "{'text': ['a row']}"
    assert error.startswith("--eval_data hf://datasets/grove-test/imdb@refs/convert/parquet/default/validation/"
                            "*.parquet cannot be read"), error
    assert error.endswith("; the hub's Parquet copy of a dataset holds <subset>/<split>/NNNN.parquet: check the "
                          "dataset, subset and split names, or set HF_TOKEN if it is private"), error


@pytest.mark.parametrize(("passes", "expected"), [
    ({"q": {"type": "OnnxMatMul4Quantizer", "config": {"block_size": 64, "is_symmetric": True}}},
     "--precision int4 --int4_algorithm rtn --block_size 64 --symmetric"),
    ({"q": {"type": "OnnxHqqQuantization", "block_size": 64}}, "--precision int4 --int4_algorithm hqq --block_size 64"),
    ({"mb": {"type": "ModelBuilder", "config": {"precision": "int4", "int4_block_size": 64, "int4_accuracy_level": 4}}},
     "--precision int4 --block_size 64 --accuracy_level 4"),
    ({"mb": {"type": "ModelBuilder", "precision": "fp32"}, "q": {"type": "onnxblockwisertnquantization",
                                                                 "block_size": 32, "is_symmetric": False}},
     "--precision int4 --int4_algorithm rtn --block_size 32"),
    ({"q": {"type": "OnnxStaticQuantization", "quant_format": "QOperator", "calibrate_method": "Entropy"}},
     "--precision int8 --int8_mode static --no-per_channel --quant_format QOperator --calibrate_method Entropy"),
    ({"q": [{"type": "OnnxDynamicQuantization", "per_channel": True}, {"type": "OnnxDynamicQuantization"}]},
     "--precision int8 --int8_mode dynamic --per_channel"),
    ({"s": {"type": "SelectiveMixedPrecision", "algorithm": "kld_gradient", "bits": 4, "high_bits": 8, "ratio": 0.65,
            "sym": False, "group_size": 32},  # olive-recipes' LLM chain
      "g": {"type": "gptq", "bits": 4, "sym": False, "group_size": 32},
      "r": {"type": "rtn", "bits": 8, "sym": False, "group_size": 32, "lm_head": True, "embeds": True,
            "overrides": {"lm_head": {"bits": 8}, "model.embed_tokens": {"bits": 8}}},
      "m": {"type": "ModelBuilder", "precision": "int4"},
      "t": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "TieWordEmbeddings"}]}},
     "--precision int4 --int4_algorithm gptq --block_size 32 --mixed_precision_algorithm kld_gradient "
     "--mixed_precision_ratio 0.65"),
    ({"s": {"type": "SelectiveMixedPrecision", "algorithm": "k_quant_mixed"},  # a heuristic by its former name
      "g": {"type": "Gptq", "bits": 4, "group_size": 128}, "m": {"type": "ModelBuilder", "precision": "int4"}},
     "--precision int4 --int4_algorithm gptq --block_size 128 --mixed_precision_algorithm "
     "high_precision_mlp_down_qkv"),
    ({"g": {"type": "GptqModel", "bits": 4, "group_size": 128, "sym": True, "dynamic": {"+:.*lm_head*": {"bits": 4}}},
      "m": {"type": "ModelBuilder", "precision": "int4"}},
     "--precision int4 --int4_algorithm gptq --block_size 128 --symmetric --head_bits 4"),
    ({"r": {"type": "Rtn", "bits": 4, "group_size": 64}, "m": {"type": "ModelBuilder", "precision": "int4"}},
     "--precision int4 --int4_algorithm rtn --block_size 64"),
    ({"m": {"type": "ModelBuilder", "precision": "fp16"}, "q": {"type": "OnnxHqqQuantization"}},  # a chain
     "--precision int4 --int4_algorithm hqq --block_size 128"),
    ({"m": {"type": "ModelBuilder", "precision": "int4", "extra_options": {"int4_accuracy_level": 4,
                                                                           "filename": "model.onnx"}},
      "p": {"type": "OnnxPeepholeOptimizer"}},
     "--precision int4 --accuracy_level 4"),
    ({"q": {"type": "OnnxBlockWiseRtnQuantization"}},  # Olive's defaults
     "--precision int4 --int4_algorithm rtn --block_size 128 --symmetric"),
    ({"mb": {"type": "ModelBuilder", "precision": "int4", "int4_algo_config": "k_quant_mixed"}},
     "--precision int4 --int4_algorithm k_quant"),
    ({"mb": {"type": "ModelBuilder", "precision": "int4", "int4_block_size": 32, "int4_accuracy_level": 4,
             "int4_op_types_to_quantize": ["MatMul", "Gather"]}},  # what `olive optimize` writes
     "--precision int4 --block_size 32 --accuracy_level 4"),
    ({"mb": {"type": "ModelBuilder", "precision": "int4", "int4_algo_config": "k_quant_linear",
             "extra_options": {"filename": "text.onnx", "prune_lm_head": True}}},  # olive-recipes' Qwen3.5
     "--precision int4 --int4_algorithm k_quant --prune_lm_head"),
    ({"m": {"type": "ModelBuilder", "precision": "int4", "extra_options": {"exclude_embeds": False}},
      "q": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "QuantizeEmbeddingInt8"},
                                                    {"surgeon": "ShareEmbeddingLmHead"}]}},  # what affine writes
     "--precision int4"),
    ({"q": {"type": "OnnxKQuantQuantization", "customized_weight_config": {  # gemma-4's mixed/text.json
        "decoder/model/layers.0/mlp/down_proj/MatMul_node_120": {"bits": 8}, "x/MatMul": {"bits": 4}}}},
     "--precision int4 --int4_algorithm k_quant --block_size 32 --int8_nodes "
     "decoder/model/layers.0/mlp/down_proj/MatMul_node_120"),
    ({"o": {"type": "OrtTransformersOptimization", "float16": True}}, "--precision fp16"),
    ({"c": {"type": "OnnxConversion"}}, "--precision fp32"),
    ({"q": {"type": "OnnxDynamicQuantization", "per_channel": True, "host": "local_system"}},  # a pass's own host
     "--precision int8 --int8_mode dynamic --per_channel"),
])
def test_passes_become_the_auto_opt_flags_they_amount_to(passes: dict, expected: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    config = {"input_model": {"type": "HfModel", "model_path": "some/model"}, "passes": passes, "output_dir": "o"}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    command = capsys.readouterr().out.strip()
    assert command.startswith("grove auto-opt --model_name_or_path some/model --output_path o --precision ")
    flags = command.split(" --output_path o ", 1)[1]
    assert sorted(flags.split(" --")) == sorted(expected.split(" --")), command


def test_a_model_builder_pass_builds_a_text_generator_whatever_the_task(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """olive-recipes' TensorRT-RTX Qwen2.5 config gives its ModelBuilder model the task text-classification,
    which Olive's builder ignores: Grove runs it as text-generation and says so."""
    from grove.shell.cli import main

    config = {"input_model": {"type": "HfModel", "model_path": "some/model", "task": "text-classification"},
              "output_dir": "o", "passes": {"builder": {"type": "ModelBuilder", "precision": "fp16"}},
              "systems": {"g": {"type": "LocalSystem", "accelerators": [
                  {"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}]}}, "target": "g"}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("--precision fp16 --task text-generation"), out
    assert "input_model.task 'text-classification': builder (ModelBuilder) builds the model as an onnxruntime-genai " \
           "text generator" in err, err


def test_a_target_systems_accelerator_sets_device_and_provider(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    config = {"input_model": {"type": "HfModel", "model_path": "some/model"}, "output_dir": "o",
              "passes": {"mb": {"type": "ModelBuilder", "precision": "int4"}},
              "systems": {"a": {"type": "LocalSystem", "accelerators": [{"device": "gpu"}]},
                          "b": {"type": "LocalSystem", "accelerators": [
                              {"execution_providers": "CUDAExecutionProvider"}]}},  # a string, not a list
              "engine": {"host": "a", "target": "b"}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    assert "--device gpu --provider CUDAExecutionProvider --precision int4" in capsys.readouterr().out


def test_a_cuda_chain_of_an_fp16_builder_and_hqq_is_hqq_on_the_gpus_fp16_graph(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """olive-recipes' CUDA Llama hqq.json: the builder at fp16, then onnxruntime's HQQ on that graph."""
    from grove.shell.cli import main

    config = {"input_model": {"type": "HfModel", "model_path": "some/model"}, "output_dir": "o",
              "systems": {"s": {"type": "LocalSystem", "accelerators": [
                  {"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}]}},
              "passes": {"m": {"type": "ModelBuilder", "precision": "fp16"}, "q": {"type": "OnnxHqqQuantization"}}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("--device gpu --provider CUDAExecutionProvider --precision int4 --int4_algorithm hqq "
                                "--block_size 128"), out
    assert "m (ModelBuilder) writes fp16 and q quantizes it: the output is int4" in err, err


def test_what_grove_does_differently_is_said_before_the_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Keys Grove reads but does not follow are notes on stderr, never dropped in silence."""
    from grove.shell.cli import main

    config = {"input_model": {"type": "HfModel", "model_path": "some/model",
                              "load_kwargs": {"attn_implementation": "eager", "revision": "v2"}},
              "passes": {"q": {"type": "OnnxDynamicQuantization"}, "t": {
                  "type": "OrtTransformersOptimization", "optimization_options": {"enable_attention": False}}},
              "evaluate_input_model": False, "packaging_config": {"type": "Zipfile"}, "cache_dir": "cache",
              "output_dir": "o"}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == ("grove auto-opt --model_name_or_path some/model --output_path o --precision int8 "
                           "--revision v2 --int8_mode dynamic --no-per_channel")
    for note in ("input_model: attn_implementation not used", "q: per_channel is not set, so per-tensor weight "
                 "scales, as Olive's default", "evaluate_input_model false: Grove evaluates the fp32 reference",
                 "packaging_config: Grove writes the output as a folder", "cache_dir 'cache': Grove caches",
                 "passes.t: optimization_options not used: Grove chooses what OrtTransformersOptimization sets"):
        assert f"grove run: {note}" in err, err


_MODEL = {"type": "HfModel", "model_path": "some/model"}
_INT4 = {"mb": {"type": "ModelBuilder", "precision": "int4"}}
_TRAIN = {"name": "train", "type": "HuggingfaceContainer", "load_dataset_config": {
    "data_name": "timdettmers/openassistant-guanaco", "split": "train[:4096]"}}
# Olive's own data config example: GLUE MRPC's validation split scored for accuracy.
_MRPC = {"name": "mrpc", "type": "HuggingfaceContainer",
         "load_dataset_config": {"data_name": "nyu-mll/glue", "subset": "mrpc", "split": "validation"},
         "pre_process_data_config": {"input_cols": ["sentence1", "sentence2"], "label_col": "label"}}
_ACCURACY = {"name": "accuracy", "type": "accuracy", "data_config": "mrpc",
             "sub_types": [{"name": "accuracy_score"}, {"name": "auroc"}]}
_EVAL = {"input_model": _MODEL, "output_dir": "o", "passes": {"q": {"type": "OnnxDynamicQuantization"}},
         "evaluators": {"e": {"metrics": [_ACCURACY]}}, "evaluator": "e"}


@pytest.mark.parametrize(("data", "expected"), [
    (_MRPC, "--eval_data 'hf://datasets/nyu-mll/glue@refs/convert/parquet/mrpc/validation/*.parquet"
            "#text=sentence1+sentence2,label=label'"),
    ({**_MRPC, "load_dataset_config": {"data_name": "stanfordnlp/imdb", "split": "test"},
      "pre_process_data_config": {"input_cols": ["text"], "max_samples": 500}},
     "--eval_data 'hf://datasets/stanfordnlp/imdb@refs/convert/parquet/default/test/*.parquet#text=text' "
     "--eval_samples 500"),
    ({**_MRPC, "load_dataset_config": {"data_name": "json", "data_dir": "data", "data_files": "dev.jsonl"},
      "pre_process_data_config": {"input_cols": "review", "label_cols": ["stars"], "padding": "max_length"}},
     "--eval_data 'data/dev.jsonl#text=review,label=stars'"),
    ({**_MRPC, "load_dataset_config": {"data_name": "csv", "split": "test",
                                       "data_files": {"train": "train.csv", "test": ["test.csv"]}},
      "pre_process_data_config": {}},
     "--eval_data test.csv"),
    ({"name": "mrpc", "type": "DataContainer",  # Olive's components with their params
      "load_dataset_config": {"type": "huggingface_dataset", "params": {"data_files": "s3://bucket/dev.parquet",
                                                                          "streaming": True}},
      "pre_process_data_config": {"type": "huggingface_pre_process", "params": {"max_samples": 64}}},
     "--eval_data s3://bucket/dev.parquet --eval_samples 64"),
])
def test_an_accuracy_metrics_data_config_is_the_labelled_data(data: dict, expected: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The data config an accuracy metric names becomes --eval_data (a hub dataset: the hub's Parquet
    copy of its subset and split) and its max_samples --eval_samples; the sub-types Grove does not
    compute are said, and a latency metric's data is said to be unused."""
    from grove.shell.cli import main

    config = {**_EVAL, "data_configs": [data], "evaluators": {"e": {"metrics": [
        _ACCURACY, {"name": "latency", "type": "latency", "data_config": "mrpc", "sub_types": [{"name": "avg"}]}]}}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith(expected), out
    assert "not computed: auroc (accuracy)" in err and "accuracy_score" not in err, err
    assert "latency (latency): Grove times fixed inputs" in err, err
    assert ("data_configs.mrpc.load_dataset_config.streaming: not used" in err) == ("streaming" in json.dumps(data))
    assert ("data_configs.mrpc.pre_process_data_config.padding: not used: Grove tokenizes the rows itself" in err) == (
        "padding" in json.dumps(data)), err


def test_a_perplexity_metrics_data_config_is_the_decoders_text(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Olive's LLM perplexity metric (an accuracy metric of sub-type perplexity) on wikitext-2's test
    split, max_samples chunks of max_seq_len tokens: the hub's Parquet copy of that split is the
    perplexity text and the tokens scored are max_samples x max_seq_len."""
    from grove.shell.cli import main

    wikitext = {"name": "wikitext2_test", "type": "HuggingfaceContainer",
                "load_dataset_config": {"data_name": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1",
                                        "split": "test"},
                "pre_process_data_config": {"type": "text_generation_huggingface_pre_process", "strategy": "join",
                                            "add_special_tokens": False, "max_seq_len": 512, "max_samples": 4,
                                            "text_cols": ["text"]}}
    config = {"input_model": {"type": "HfModel", "model_path": "some/llm", "task": "text-generation"},
              "output_dir": "o", "passes": _INT4, "data_configs": [wikitext], "evaluator": "e",
              "evaluators": {"e": {"metrics": [{"name": "ppl", "type": "accuracy", "data_config": "wikitext2_test",
                                                "sub_types": [{"name": "perplexity"}]}]}}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("--eval_data 'hf://datasets/Salesforce/wikitext@refs/convert/parquet/wikitext-2-raw-v1/"
                                "test/*.parquet#text=text' --eval_tokens 2048"), out
    assert "not computed" not in err, err
    del wikitext["pre_process_data_config"]["max_seq_len"]
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--eval_tokens" not in out and "--eval_samples" not in out, out
    assert "evaluators.e.metrics[0]: max_samples without max_seq_len: Grove scores the text's first 1024 tokens" in err


def test_an_mteb_evaluator_is_named_as_not_computed_not_dropped(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """olive-recipes' embedding configs choose an MTEBEvaluator: after passes the run goes on and the note
    names it among what Grove does not compute; with no passes (the baseline shape) the config is refused
    with that reason, not as an empty pass list."""
    from grove.shell.cli import main

    mteb = {"evaluators": {"mteb": {"type": "MTEBEvaluator", "tasks": ["STS17", "SciFact"], "batch_size": 32}},
            "evaluator": "mteb"}
    config = {"input_model": {**_MODEL, "task": "feature-extraction"}, "output_dir": "o", **mteb,
              "passes": {"q": {"type": "OnnxDynamicQuantization"}}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    assert ("not computed: evaluators.mteb (MTEBEvaluator: STS17, SciFact; MTEB's benchmark is not in Grove: an "
            "encoder's report compares its embeddings with PyTorch's by cosine)") in capsys.readouterr().err
    del config["passes"]
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) != 0
    err = capsys.readouterr().err
    assert "passes is empty: a config that only evaluates the input model runs in Grove with an LMEvaluator " \
           "(lm-eval tasks, grove benchmark), not evaluators.mteb (MTEBEvaluator: STS17, SciFact" in err, err


def test_a_text_generation_models_accuracy_metric_is_scored_as_perplexity(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A decoder's accuracy metric other than perplexity (e.g. accuracy_score on a data config with
    max_samples): Grove scores perplexity on that data's text, says the sub-type is not computed and
    why, and passes no --eval_samples (an encoder's flag, which the decoder path would refuse)."""
    from grove.shell.cli import main

    data = {**_MRPC, "load_dataset_config": {"data_name": "stanfordnlp/imdb", "split": "test"},
            "pre_process_data_config": {"input_cols": ["text"], "max_samples": 500}}
    config = {**_EVAL, "input_model": {**_MODEL, "task": "text-generation"}, "passes": _INT4, "data_configs": [data]}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("--eval_data 'hf://datasets/stanfordnlp/imdb@refs/convert/parquet/default/test/"
                                "*.parquet#text=text'"), out
    assert "not computed: accuracy_score (accuracy; a text-generation model is scored by perplexity" in err, err
    assert "max_samples without max_seq_len: Grove scores the text's first 1024 tokens" in err, err


def test_a_static_quantization_data_config_is_the_calibration_text(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    config = {"input_model": _MODEL, "output_dir": "o", "passes": {"q": {
        "type": "OnnxStaticQuantization", "data_config": "wiki", "per_channel": True}}, "data_configs": {
        "wiki": {"load_dataset_config": {"data_name": "Salesforce/wikitext", "subset": "wikitext-2-raw-v1",
                                         "split": "train"}, "pre_process_data_config": {"max_samples": 16,
                                                                            "label_cols": ["label", "idx"]}}}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert ("--calibration_data 'hf://datasets/Salesforce/wikitext@refs/convert/parquet/wikitext-2-raw-v1/train/"
            "*.parquet' --calibration_samples 16 --int8_mode static --per_channel") in out, out
    assert "calibrated on Grove's default text" not in err and "calibrated on the first 32 rows" not in err
    del config["data_configs"]["wiki"]["pre_process_data_config"]
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--calibration_samples" not in out
    assert "grove run: q: static int8 is calibrated on the first 32 rows (or paragraphs) of its data config" in err


@pytest.mark.parametrize(("config", "expected"), [
    ({"input_model": _MODEL, "passes": {"ft": {"type": "LoRA"}}, "output_dir": "o"},
     "passes.ft.train_data_config: Field required"),
    ({"input_model": _MODEL, "passes": {"ft": {"type": "LoftQ"}}, "output_dir": "o"},
     "passes ft (LoftQ): LoftQ's quantization-aware initialization is not in Grove: use a QLoRA pass"),
    ({"input_model": _MODEL, "output_dir": "o", "data_configs": [_TRAIN], "passes": {
        "ft": {"type": "LoHa", "train_data_config": "train"}, "e": {"type": "ExtractAdapters"}}},
     "passes.e (ExtractAdapters): a loha adapter cannot be kept switchable (a graph input carries a plain LoRA's A "
     "and B); drop ExtractAdapters to merge it into the weights"),
    ({"input_model": _MODEL, "output_dir": "o", "data_configs": [_TRAIN], "passes": {
        "ft": {"type": "LoRA", "train_data_config": "train", "training_args": {"max_step": 3}}}},
     "passes.ft.training_args: --max_step is neither a grove finetune flag nor a transformers TrainingArguments "
     "field; did you mean --max_steps"),
    ({"input_model": _MODEL, "output_dir": "o", "data_configs": [_TRAIN, {**_TRAIN, "name": "other",
                                                                          "load_dataset_config": {"data_name": "a/b"}}],
      "passes": {"ft": {"type": "DoRA", "train_data_config": "train", "eval_data_config": "other"}}},
     "passes.ft.eval_data_config reads a/b, another dataset than train_data_config's timdettmers/openassistant-"
     "guanaco: Grove evaluates on a split of the training dataset"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"e": {"type": "ExtractAdapters"}}},
     "passes.e: no fine-tuning pass (LoRA, QLoRA, DoRA, LoHa, LoKr) makes an adapter for it"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"m": {"type": "ModelBuilder", "metadata_only": True}}},
     "passes.m.metadata_only: writes only the genai config of the ONNX model an earlier OnnxConversion made, and "
     "there is none"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"m": {"type": "ModelBuilder", "precision": "int4",
                                                                 "int4_op_types_to_quantize": ["DummyOPType"]}}},
     "passes.m.int4_op_types_to_quantize: DummyOPType: the builder quantizes the weights of MatMul and Gather (the "
     "token embedding) only"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"m": {"type": "ModelBuilder", "precision": "int4",
                                                                 "int4_op_types_to_quantize": ["Gather"]}}},
     "passes.m.int4_op_types_to_quantize ['Gather']: Grove's int4 quantizes every MatMul"),
    ({"input_model": _MODEL, "passes": {"x": {"type": "SliceGPT"}}, "output_dir": "o"},
     "passes x (SliceGPT): not read by Grove, which reads DoRA, ExtractAdapters, Gptq, LoHa, LoKr, LoRA, "
     "MergeAdapterWeights, MobiusBuilder, ModelBuilder, OnnxBlockWiseRtnQuantization"),
    ({"input_model": _MODEL, "passes": {"x": {"type": "SparseGPT"}}, "output_dir": "o"},
     "passes.x.sparsity: Field required - a share of the weights (0.5), or [N, M]"),
    ({"input_model": _MODEL, "passes": {"x": {"type": "SparseGPT", "sparsity": [2, 4], "min_layer": 2}},
      "output_dir": "o"}, "passes.x: min_layer: Grove prunes every linear layer of every decoder layer; drop them"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {  # a recent olive-recipes layout, all reported at once
        "s": {"type": "SelectiveMixedPrecision"}, "g": {"type": "gptq", "bits": 4}, "r": {"type": "rtn"},
        "m": {"type": "ModelBuilder", "precision": "int4", "int4_block": 32},
        "t": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "RemoveRopeMultiCache"}]}}},
     "passes.s.algorithm: Field required - how the layers are chosen, which Olive requires too: kld_gradient, snr, "
     "snr_relative, iqe or iqe_relative with a ratio, or a high_precision_* heuristic (k_quant_* their former names); "
     "passes.m: int4_block is not an option of ModelBuilder that Grove reads (it reads precision, int4_block_size, "
     "int4_accuracy_level, int4_is_symmetric, int4_algo_config, int4_op_types_to_quantize, metadata_only, search, "
     "use_ort_genai, "
     "use_dynamo_exporter, extra_options, enable_cuda_graph); passes.t: graph surgeries RemoveRopeMultiCache are "
     "not in Grove (it reads TieWordEmbeddings, QuantizeEmbeddingInt8, ShareEmbeddingLmHead)"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {
        "m": {"type": "ModelBuilder", "precision": "int4", "int4_algo_config": "k_quant"},
        "q": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "QuantizeEmbeddingInt8"},
                                                      {"surgeon": "ShareEmbeddingLmHead"}]}}},
     "passes.q: QuantizeEmbeddingInt8, ShareEmbeddingLmHead: Grove writes the 8-bit embedding table (shared with a "
     "tied lm_head) with its int4 algorithms affine (the CPU default), hqq and gptq at 8-bit head_bits, and the "
     "builder's (--embedding_int8), not with int4 k_quant"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"q": {
        "type": "OnnxKQuantQuantization", "bits": 8, "customized_weight_config": {"a/MatMul": {"bits": 8}}}}},
     "passes.q.customized_weight_config: per-node bits raise chosen MatMuls of a 4-bit model to 8 bits; with bits 8 "
     "every MatMul is 8-bit already"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {
        "m": {"type": "ModelBuilder", "precision": "int4", "extra_options": {"exclude_embeds": True}}}},
     "passes.m.extra_options.exclude_embeds: changes the model's inputs or outputs"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"q": {"type": "QuaRot"},
                                                            "m": {"type": "ModelBuilder", "precision": "int4"}}},
     "passes.q (QuaRot): Grove rotates the weights in its GPTQ node; add a Gptq pass after it"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"q": {"type": "QuaRot", "rotate_mode": "random"},
                                                            "g": {"type": "Gptq"}}},
     "passes.q.rotate_mode: Input should be 'hadamard' - Grove rotates by randomized Hadamard matrices"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"q": {"type": "SpinQuant"}, "g": {"type": "Gptq"}}},
     "passes q (SpinQuant): SpinQuant's trained rotations are not in Grove"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"g": {"type": "GptqModel", "group_size": -1}}},
     "passes.g.group_size: Input should be 16, 32, 64, 128 or 256 - weights per group: Grove's int4 is block-wise"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {
        "s": {"type": "SelectiveMixedPrecision", "algorithm": "k_quant_last"},
        "m": {"type": "ModelBuilder", "precision": "int4"}}},
     "passes.s (SelectiveMixedPrecision): Grove keeps the sensitive layers at 8 bits in its GPTQ; add a Gptq pass"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"m": {
        "type": "ModelBuilder", "precision": "int4", "extra_options": {"exclude_embeds": True, "fast_mode": 1}}}},
     "passes.m.extra_options.exclude_embeds: changes the model's inputs or outputs, which Grove's evaluation reads "
     "as the builder writes them by default; not in Grove yet; "
     "passes.m.extra_options.fast_mode is not an option of onnxruntime-genai's model builder"),
    ({"input_model": _MODEL, "passes": {"q": {"type": "OnnxDynamicQuantization", "weight_type": "QUInt8"}},
      "output_dir": "o"}, "passes.q.weight_type: Input should be 'QInt8' - Grove writes signed int8 weights (uint8 "
                          "weights measured slower and no more accurate: "
                          "docs/encoders.md)"),  # a refused value says why
    ({"input_model": _MODEL, "passes": {"mb": {"type": "ModelBuilder", "precision": "int4", "int4_blocksize": 64}},
      "output_dir": "o"},
     "passes.mb: int4_blocksize is not an option of ModelBuilder that Grove reads (it reads precision, "
     "int4_block_size"),
    ({"input_model": _MODEL, "passes": {**_INT4, "q": {"type": "OnnxDynamicQuantization"}}, "output_dir": "o"},
     "passes ask for different precisions: mb int4, q int8; Grove writes one output per run"),
    ({"input_model": _MODEL, "passes": {"q": {"type": "OnnxStaticQuantization", "data_config": "calib"}},
      "output_dir": "o"}, "passes.q.data_config 'calib' is not among data_configs (none)"),
    ({**_EVAL, "data_configs": [{**_MRPC, "user_script": "data.py"}]},
     "data_configs.mrpc.user_script: Grove runs no code from a config; write the rows to a .jsonl, .csv or .parquet "
     "file and set load_dataset_config.data_files to it"),
    ({**_EVAL, "data_configs": [{"name": "mrpc", "type": "TransformersDummyDataContainer"}]},
     "data_configs.mrpc is a TransformersDummyDataContainer, dummy inputs without labels"),
    ({**_EVAL, "data_configs": [{**_MRPC, "load_dataset_config": {"data_name": "my_glue", "subset": "mrpc"}}]},
     "data_configs.mrpc.load_dataset_config.data_name 'my_glue': hub datasets are named org/name (GLUE is "
     "nyu-mll/glue), and the hub could not be asked where it moved; set that name"),  # offline
    ({**_EVAL, "data_configs": [{**_MRPC, "pre_process_data_config": {"input_cols": ["title", "body", "tags"]}}]},
     "data_configs.mrpc.pre_process_data_config.input_cols ['title', 'body', 'tags']: Grove reads one text column "
     "or a sentence pair (two)"),
    ({**_EVAL, "data_configs": [{**_MRPC, "pre_process_data_config": {"label_cols": ["label", "idx"]}}]},
     "data_configs.mrpc.pre_process_data_config.label_cols ['label', 'idx']: Grove scores one label column per "
     "row; keep one"),
    ({**_EVAL, "data_configs": [{**_MRPC, "pre_process_data_config": {"label_col": "stars,5"}}]},
     "data_configs.mrpc.pre_process_data_config: column names ['stars,5'] hold one of # , = + (or are not names)"),
    ({**_EVAL, "data_configs": [{**_MRPC, "load_dataset_config": {"data_name": "nyu-mll/glue",
                                                                 "col_filters": {"label": 1}}}]},
     "data_configs.mrpc.load_dataset_config.col_filters: Grove scores every row it reads"),
    ({**_EVAL, "data_configs": [{**_MRPC, "load_dataset_config": {"data_name": "org/set", "data_dir": "en"}}]},
     "data_configs.mrpc.load_dataset_config.data_dir: Grove reads a hub dataset's Parquet copy by subset and split, "
     "not a folder of its files; set data_files to the file, hf://datasets/org/set/<path in the repo>"),
    ({**_EVAL, "data_configs": [{**_MRPC, "load_dataset_config": {"data_files": ["a.jsonl", "b.jsonl"]}}]},
     "data_configs.mrpc.load_dataset_config.data_files lists 2 files; Grove reads one file: join them into one"),
    ({**_EVAL, "data_configs": [{**_MRPC, "pre_process_data_config": {"max_samples": 0}}]},
     "data_configs.mrpc: max_samples 0 must be a positive whole number"),
    ({**_EVAL, "evaluators": {"e": {"metrics": [_ACCURACY, {**_ACCURACY, "data_config": "other"}]}},
      "data_configs": [_MRPC, {**_MRPC, "name": "other", "load_dataset_config": {"data_files": "o.jsonl"}}]},
     "evaluators.e.metrics[0] and evaluators.e.metrics[1] score different data configs; Grove scores one labelled "
     "set per run"),
    ({"input_model": _MODEL, "output_dir": "o", "data_configs": [{"name": "calib", "load_dataset_config": {
        "data_name": "json", "data_files": "calib.json"}}],
      "passes": {"q": {"type": "OnnxStaticQuantization", "data_config": "calib"}}},
     "data_configs.calib.load_dataset_config.data_files calib.json: Grove reads rows from JSON lines (.jsonl), .csv "
     "or .parquet files; save the rows as JSON lines"),
    ({"input_model": {"type": "ONNXModel"}, "passes": _INT4, "output_dir": "o"},
     "input_model names no graph: set input_model.model_path to the .onnx file"),
    ({"input_model": {"type": "PyTorchModel", "config": {"model_path": "m.pt", "model_loader": "load"}},
      "passes": _INT4, "output_dir": "o"}, "input_model.model_loader: Grove loads Hugging Face models"),
    ({"input_model": _MODEL, "passes": _INT4, "output_dir": "o", "systems": {"s": {"type": "LocalSystem",
      "accelerators": [{"device": "gpu", "execution_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}]}}},
     "systems.s.accelerators[0].execution_providers: Grove optimizes for one execution provider per run, not 2 "
     "(CUDAExecutionProvider, CPUExecutionProvider)"),
    ({"input_model": _MODEL, "passes": _INT4, "output_dir": "o", "systems": {"s": {"type": "LocalSystem",
      "config": {"accelerators": [{"device": "npu", "execution_providers": ["QNNExecutionProvider"]}]}}}},
     "systems.s.accelerators[0].device 'npu': Grove targets cpu or gpu"),
    ({"input_model": _MODEL, "passes": {**_INT4, "fix": {"type": "DynamicToFixedShape"}}, "output_dir": "o",
      "log_severity_level": 7, "systems": {"s": {"type": "LocalSystem", "accelerators": [
          {"device": "npu", "execution_providers": ["VitisAIExecutionProvider"]}]}}},  # every part's problem at once
     "systems.s.accelerators[0].device 'npu': Grove targets cpu or gpu; passes fix (DynamicToFixedShape): not read "
     "by Grove, which reads DoRA, ExtractAdapters, Gptq, "),
    ({"input_model": _MODEL, "passes": _INT4, "output_dir": "o", "systems": {"aml": {"type": "AzureML"}}},
     "systems.aml.type 'AzureML': Grove runs where it is started, or on its Prefect work pools"),
    ({"input_model": _MODEL, "passes": _INT4, "engine": {"target": "gpu_system", "output_dir": "o"}},
     "target 'gpu_system' is not among systems (none)"),
    ({"input_model": _MODEL, "pases": _INT4, "output_dir": "o"}, "'pases' is not an Olive workflow key"),
    ({"input_model": _MODEL, "passes": {}, "output_dir": "o"}, "passes is empty"),
    ({"input_model": {**_MODEL, "load_kwargs": "eager"}, "passes": _INT4, "output_dir": "o"},
     "input_model.load_kwargs must be an object, not str"),
    ({"input_model": _MODEL, "passes": _INT4, "output_dir": "o", "log_severity_level": 5},
     "log_severity_level 5: Olive's levels are 0 (verbose) to 4 (fatal)"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"m": {"type": "MobiusBuilder", "components_to_export": [
        "vision_encoder", "embedding"]}, "q": {"type": "OnnxKQuantQuantization"}}},
     "the auto-opt it amounts to is refused: --components writes fp32 or fp16 graphs, not int4: quantize each one "
     "after"),
    ({"input_model": _MODEL, "output_dir": "o", "passes": {"m": {"type": "MobiusBuilder", "precision": "bf16"}}},
     "passes.m.precision: Input should be 'fp32' or 'fp16' - mobius writes fp32 or fp16"),
    # A config whose passes Grove reads, but whose auto-opt is refused: found at once, a dry run included.
    ({"input_model": {**_MODEL, "task": "audio-classification"}, "output_dir": "o",
      "passes": {"q": {"type": "OnnxDynamicQuantization"}}},
     "the auto-opt it amounts to is refused: --task: Input should be 'feature-extraction', 'text-classification' or "
     "'token-classification'"),
])
def test_what_grove_cannot_honour_is_one_error_naming_the_key(config: dict, expected: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    path = _write(tmp_path, config)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"grove: error: {path}: {expected}"), err
    assert err.count("\n") == 1 and not (tmp_path / "o").exists()
    assert ("log_severity_level 7: Olive's levels are 0" in err) == (config.get("log_severity_level") == 7), err


def test_a_model_grove_cannot_fetch_is_named_and_m_replaces_it(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """olive-recipes' Azure ML configs name a registry model: one error saying so; with -m the rest runs."""
    from grove.shell.cli import main

    registry = {"type": "azureml_registry_model", "registry_name": "azureml", "name": "bert-x", "version": "3"}
    path = _write(tmp_path, {"input_model": {**_MODEL, "model_path": registry, "task": "text-classification"},
                             "passes": {"q": {"type": "OnnxDynamicQuantization"}}, "output_dir": "o"})
    assert main(["run", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"grove: error: {path}: input_model.model_path is an Azure ML resource "
                          "(azureml_registry_model: bert-x 3), which Grove does not fetch"), err
    assert main(["run", "--config", str(path), "--dry-run", "-m", "org/bert-x"]) == 0
    out = capsys.readouterr().out
    assert "--model_name_or_path org/bert-x" in out and "--task text-classification" in out, out


def test_a_config_file_that_cannot_be_read_is_one_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    commented = tmp_path / "commented.json"
    commented.write_text('{\n  "passes": {"mb": {"type": "ModelBuilder",\n    "precision": "int8"  // not int4\n}}}')
    for path, expected in ((tmp_path / "missing.json", "does not exist; pass the path of an Olive workflow config"),
                           (commented, "is not valid JSON: Expecting ',' delimiter at line 3, column 26 (JSON has "
                            "no comments: remove the // lines)")):
        assert main(["run", "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"grove: error: {path}: config file {path} {expected}"), err


def test_a_fine_tuning_recipe_is_grove_finetune_then_auto_opt_of_its_output(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """olive-recipes' LoRA layout (a fine-tuning pass, the capture passes, ModelBuilder metadata_only,
    ExtractAdapters): grove finetune with the pass's options and data, then auto-opt of its output with the
    adapter kept switchable; without ExtractAdapters, merged."""
    from grove.shell.cli import main

    passes = {"l": {"type": "LoRA", "train_data_config": "train", "eval_data_config": "eval", "r": 8, "alpha": 16,
                    "target_modules": ["q_proj", "k_proj"], "torch_dtype": "float32",
                    "training_args": {"per_device_train_batch_size": 4, "max_steps": 30, "learning_rate": 1e-4}},
              "c": {"type": "OnnxConversion", "torch_dtype": "float32"},
              "e": {"type": "ExtractAdapters"},
              "m": {"type": "ModelBuilder", "metadata_only": True, "precision": "fp32"}}
    config = {"input_model": _MODEL, "output_dir": "models", "passes": passes, "data_configs": [
        {**_TRAIN, "pre_process_data_config": {"text_cols": ["text"], "max_seq_len": 128, "strategy": "join"}},
        {**_TRAIN, "name": "eval", "load_dataset_config": {"data_name": "timdettmers/openassistant-guanaco",
                                                           "split": "train[4096:4224]"}}]}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    finetune, auto_opt = out.strip().split(" && ")
    assert finetune == ("grove finetune --model_name_or_path some/model --output_path models/finetuned --train_split "
                        "'train[:4096]' --data_name timdettmers/openassistant-guanaco --text_field text "
                        "--max_seq_len 128 --method lora --lora_r 8 --lora_alpha 16.0 --lora_dropout 0.05 "
                        "--target_modules q_proj,k_proj --torch_dtype float32 --eval_split 'train[4096:4224]' "
                        "--batch_size 4 --max_steps 30 --learning_rate 0.0001"), finetune
    assert auto_opt == ("grove auto-opt --model_name_or_path models/finetuned --output_path models/model "
                        "--precision fp32"), auto_opt
    assert "the adapter stays switchable" in err and "metadata_only: Grove's builder writes the graph" in err, err
    del passes["e"]
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    assert capsys.readouterr().out.strip().endswith("--precision fp32 --merge_adapter")


def test_a_split_slice_reads_the_rows_datasets_would() -> None:
    from grove.flows.request_finetune import split_rows
    from grove.tasks._finetune_data import row_slice

    rows = list(range(200))
    assert split_rows("train") == ("train", None) and split_rows("train[:]") == ("train", None)
    assert split_rows("train[4096:4224]") == ("train", "4096:4224")
    assert rows[row_slice(":50", 200)] == rows[:50] and rows[row_slice("10%:20%", 200)] == rows[20:40]
    assert rows[row_slice("-5:", 200)] == rows[-5:]
    with pytest.raises(ValueError, match=r"split 'train\[:4k\]': write a split's name, or a slice of its rows"):
        split_rows("train[:4k]")


def test_offline_a_moved_hub_dataset_is_read_under_its_new_name_from_grove_s_list(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """No hub to ask (the tests run offline): 'glue' is read as nyu-mll/glue, and the note says where the
    name came from; a name the list does not hold stays one error (above)."""
    from grove.shell.cli import main

    config = {**_EVAL, "data_configs": [{**_MRPC, "load_dataset_config": {"data_name": "glue", "subset": "mrpc",
                                                                          "split": "validation"}}]}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--eval_data 'hf://datasets/nyu-mll/glue@refs/convert/parquet/mrpc/validation/*.parquet" in out, out
    assert ("data_name 'glue' is 'nyu-mll/glue' on the hub now (the hub could not be asked: from Grove's list of the "
            "datasets the hub moved under their authors in 2024)") in err, err


def test_without_output_dir_the_output_is_a_new_folder_named_after_the_config(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Olive writes into the current folder when output_dir is not set; Grove writes a new folder
    beside, named after the config, and says so."""
    from grove.shell.cli import main

    assert main(["run", "--config", str(_write(tmp_path, {"input_model": _MODEL, "passes": _INT4}, "int4.json")),
                 "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--output_path int4-output" in out, out
    assert "output_dir is not set: Olive writes into the current folder, Grove into a new one, int4-output" in err


def test_the_builders_prune_lm_head_is_auto_opts_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    config = {"input_model": _MODEL, "output_dir": "o", "passes": {"m": {
        "type": "ModelBuilder", "precision": "int4", "extra_options": {"prune_lm_head": True, "filename": "t.onnx"}}}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--prune_lm_head" in out, out
    assert "passes.m: filename=t.onnx not used" in err and "prune_lm_head=True not used" not in err, err


def test_embedding_surgeries_say_what_the_chosen_int4_writes(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """QuantizeEmbeddingInt8 and ShareEmbeddingLmHead are noted as what Grove's affine int4 writes;
    TieWordEmbeddings with k_quant says the tables are not shared, instead of promising one 8-bit table."""
    from grove.shell.cli import main

    surgeries = {"type": "GraphSurgeries", "surgeries": [{"surgeon": "QuantizeEmbeddingInt8"},
                                                         {"surgeon": "ShareEmbeddingLmHead"}]}
    config = {"input_model": _MODEL, "output_dir": "o",
              "passes": {"m": {"type": "ModelBuilder", "precision": "int4"}, "q": surgeries}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "passes.q: QuantizeEmbeddingInt8, ShareEmbeddingLmHead: Grove's affine int4 writes the embedding as 8-bit " \
           "blocks" in err, err
    # On a GPU, the builder's int4 (olive-recipes' Qwen3.5 CUDA layout) writes the 8-bit table with --embedding_int8.
    gpu = {**config, "systems": {"s": {"type": "LocalSystem", "accelerators": [
        {"device": "gpu", "execution_providers": ["CUDAExecutionProvider"]}]}}, "passes": {
        "m": {"type": "ModelBuilder", "precision": "int4", "extra_options": {"exclude_embeds": False}}, "q": surgeries}}
    assert main(["run", "--config", str(_write(tmp_path, gpu)), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "--device gpu" in out and "--embedding_int8" in out, out
    assert "passes.q: QuantizeEmbeddingInt8, ShareEmbeddingLmHead: the builder's int4 with --embedding_int8" in err, err
    config["passes"] = {"m": {"type": "ModelBuilder", "precision": "int4", "int4_algo_config": "k_quant_linear"},
                        "t": {"type": "GraphSurgeries", "surgeries": [{"surgeon": "TieWordEmbeddings"}]}}
    assert main(["run", "--config", str(_write(tmp_path, config)), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "passes.t: TieWordEmbeddings: not applied with int4 k_quant" in err, err
    assert "passes.m.int4_algo_config k_quant_linear: Grove's k_quant quantizes every MatMul at 4 bits, but the " \
           "lm_head, which keeps full precision; the int8 layers k_quant_linear adds" in err, err
