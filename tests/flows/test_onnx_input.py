"""An ONNX graph given as the model (`grove auto-opt -m model.onnx`, a folder holding one, or Olive's
ONNXModel input): the graph path imports it into the store, writes int4 weights with onnxruntime's
quantizers, measures the result against the graph itself on the same synthetic inputs, and gives the
graph back under its own name with the files that came with it; a rerun is all Cached."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from grove.flows.launch import request_from_flags
from grove.flows.request_graph import GraphOptRequest
from grove.shell.cli import main
from grove.shell.local_run import run_auto_opt_state
from tests.conftest import grove_cli
from tests.flows.test_auto_opt_flow import _task_states

GRAPH_NODES = {"import-onnx", "quantize-int4", "evaluate-graph", "package-graph"}


def _graph(path: Path, seed: int = 0) -> Path:
    """A two-layer MLP over [batch, seq, 256] (k-quant's super-blocks are 256 wide): two MatMuls with weights
    for int4, the graph's weights in an external data file of another name than Grove's."""
    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array((rng.standard_normal(s) * 0.05).astype(np.float32), n)
               for n, s in (("w1", (256, 256)), ("w2", (256, 32)))]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="layers.0/mlp/up_proj/MatMul"),
         helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", 32])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    return path


def test_a_graph_file_is_quantized_measured_and_given_back_under_its_name(tmp_path: Path, store: str) -> None:
    graph = _graph(tmp_path / "in" / "mlp.onnx")
    out = tmp_path / "out"
    first = grove_cli("auto-opt", "-m", str(graph), "-o", str(out), "--store", store, "--block_size", "32")
    assert first.returncode == 0, first.stderr[-3000:]

    assert {p.name for p in out.iterdir()} == {"mlp.onnx", "mlp.onnx.data", "grove_report.json"}
    model = onnx.load(str(out / "mlp.onnx"))
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 2
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["precision"] == "int4" and report["reference"]["precision"] == "input graph"
    assert report["metrics"]["parity"]["measured"] and report["metrics"]["min_cosine"] > 0.98
    assert report["ratios"]["size_vs_reference"] < 0.35
    assert [s["node"] for s in report["lineage"]][:2] == ["import-onnx", "quantize-int4"]
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 5, 256)).astype(np.float32)
    got = ort.InferenceSession(str(out / "mlp.onnx")).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(graph)).run(None, {"x": x})[0]
    assert got.shape == (2, 5, 32) and np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.98

    second = grove_cli("auto-opt", "-m", str(graph), "-o", str(out), "--store", store, "--block_size", "32")
    assert second.returncode == 0 and "built in" not in second.stderr, second.stderr[-3000:]
    assert second.stderr.count("Cached(type=COMPLETED)") == 5  # import, two evaluations, int4, package


def test_an_onnxruntime_genai_folder_stays_one(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    """A genai decoder folder (here: Grove's own fp32 output) in, a genai folder out: the graph gets int4
    weights, the configs and tokenizer come along, and onnxruntime-genai generates with it."""
    fp32 = tmp_path / "fp32"
    built = grove_cli("auto-opt", "-m", str(tiny_dir("llama")), "-o", str(fp32), "--store", store, "--precision",
                      "fp32", "--eval_tokens", "64")
    assert built.returncode == 0, built.stderr[-3000:]
    request, source = request_from_flags({"model_name_or_path": str(fp32), "output_path": str(tmp_path / "int4"),
                                          "store": store, "int4_algorithm": "k_quant"})
    assert isinstance(request, GraphOptRequest) and source.kind == "onnx"
    assert {"genai_config.json", "tokenizer.json", "model.onnx.data"} <= set(source.files)
    state = run_auto_opt_state(request)

    assert state.is_completed()
    assert set(_task_states(state, GRAPH_NODES)) >= GRAPH_NODES
    report = json.loads((tmp_path / "int4" / "grove_report.json").read_text())
    assert report["metrics"]["min_cosine"] > 0.9, "the KV cache's inputs are sized from genai_config.json"
    import onnxruntime_genai as og

    model = og.Model(str(tmp_path / "int4"))
    tokenizer = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokenizer.encode("hello"))
    generator.generate_next_token()
    assert len(generator.get_sequence(0)) > len(tokenizer.encode("hello"))


def test_an_olive_onnx_model_config_runs_as_the_graph_path(tmp_path: Path, store: str) -> None:
    graph = _graph(tmp_path / "models" / "decoder" / "model.onnx", seed=2)
    config = tmp_path / "text.json"
    config.write_text(json.dumps({  # the shape of olive-recipes' ONNXModel inputs (gemma-4's mixed/text.json)
        "input_model": {"type": "ONNXModel", "model_path": str(graph.parent), "onnx_file_name": "model.onnx"},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {"kquant": {"type": "OnnxKQuantQuantization",  # its per-node bits: this MatMul at 8 bits
                              "customized_weight_config": {"layers.0/mlp/up_proj/MatMul": {"bits": 8}}}},
        "target": "local_system", "output_dir": str(tmp_path / "out"), "log_severity_level": 1}))
    result = grove_cli("run", "--config", str(config), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--int4_algorithm k_quant --block_size 32 --int8_nodes layers.0/mlp/up_proj/MatMul" in result.stderr
    assert json.loads((tmp_path / "out" / "grove_report.json").read_text())["target"]["int4_algorithm"] == "k_quant"
    bits = {n.input[0]: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits"}
    assert bits == {"x": 8}, bits  # the MatMul writing the output is k_quant's to keep in fp32 (onnxruntime 1.32)

    # a node name the graph lacks is one error naming the graph's MatMuls, and no output
    wrong = grove_cli("auto-opt", "-m", str(graph), "-o", str(tmp_path / "wrong"), "--store", store,
                      "--int4_algorithm", "k_quant", "--int8_nodes", "layers.0/mlp/down_proj/MatMul")
    assert wrong.returncode == 2, wrong.stderr[-3000:]
    assert "int8_nodes: layers.0/mlp/down_proj/MatMul is not a MatMul of this graph (2 MatMuls, e.g." \
           in wrong.stderr, wrong.stderr[-3000:]
    assert not (tmp_path / "wrong").exists()


def test_an_8_bit_block_wise_recipe_on_a_graph_writes_8_bit_blocks(tmp_path: Path, store: str) -> None:
    """olive-recipes' vision / audio / embedding configs of Gemma 4 and Ministral 3 (an ONNXModel input, then
    OnnxBlockWiseRtnQuantization at 8 bits, symmetric, block 128): the graph's MatMuls become 8-bit blocks of
    that size, near the graph's outputs (8-bit rounding), and half the size of fp32 or less."""
    graph = _graph(tmp_path / "models" / "vision_encoder" / "model.onnx", seed=3)
    config = tmp_path / "vision.json"
    config.write_text(json.dumps({
        "input_model": {"type": "ONNXModel", "model_path": str(graph)},
        "passes": {"int8": {"type": "OnnxBlockWiseRtnQuantization", "bits": 8, "block_size": 128,
                            "is_symmetric": True, "accuracy_level": 4, "save_as_external_data": True,
                            "external_data_name": "model.onnx.data"}},
        "no_artifacts": True, "output_dir": str(tmp_path / "out")}))
    result = grove_cli("run", "--config", str(config), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--precision int8 --block_size 128 --symmetric --accuracy_level 4" in result.stderr, result.stderr[-2000:]
    assert "holds the input graph" not in result.stderr  # a new folder: no note (the recipe's own writes over it)
    nodes = [n for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nodes]
    assert len(nodes) == 2 and all(a["bits"] == 8 and a["block_size"] == 128 for a in attrs), attrs
    report = json.loads((tmp_path / "out" / "grove_report.json").read_text())
    assert report["target"]["precision"] == "int8", report["target"]
    assert report["metrics"]["min_cosine"] > 0.999, report["metrics"]  # 4-bit blocks: > 0.98
    assert 0.2 < report["ratios"]["size_vs_reference"] < 0.5, report["ratios"]


def test_an_fp16_conversion_of_a_graph_keeps_its_io_and_stays_near_it(tmp_path: Path, store: str) -> None:
    """olive-recipes' SAM 2 mask decoder config (an ONNXModel input, then OnnxFloatToFloat16): onnxruntime's
    float16 conversion of the whole graph, its inputs and outputs kept fp32 (callers feed the same arrays),
    measured against the graph: fp16 rounding of the weights, about half the size, the weights still apart."""
    graph = _graph(tmp_path / "models" / "decoder.onnx", seed=4)
    config = tmp_path / "sam.json"
    config.write_text(json.dumps({"input_model": {"type": "ONNXModel", "model_path": str(graph)},
                                  "systems": {"host_system": {"type": "LocalSystem"}},
                                  "passes": {"f16": {"type": "OnnxFloatToFloat16", "save_as_external_data": True}},
                                  "output_dir": str(tmp_path / "out")}))
    result = grove_cli("run", "--config", str(config), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("--precision fp16") >= 1, result.stderr[-2000:]
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"decoder.onnx", "decoder.onnx.data", "grove_report.json"}
    model = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert set(types.values()) == {TensorProto.FLOAT16}, types
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # inputs and outputs stay fp32
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["precision"] == "fp16" and "int4_algorithm" not in report["target"], report["target"]
    assert report["metrics"]["min_cosine"] > 0.9999, report["metrics"]  # fp16 rounding only
    assert 0.45 < report["ratios"]["size_vs_reference"] < 0.55, report["ratios"]
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, 3, 256)).astype(np.float32)
    got = ort.InferenceSession(str(out / "decoder.onnx")).run(None, {"x": x})[0]
    want = ort.InferenceSession(str(graph)).run(None, {"x": x})[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 1e-2 * np.abs(want).max()


def test_an_olive_config_writing_over_its_input_graph_says_grove_will_not(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """olive-recipes' vision / audio / embedding configs write their output over the input graph's folder;
    Grove writes a new folder (and refuses one holding other files before any work): the dry run says so."""
    graph = _graph(tmp_path / "models" / "vision_encoder" / "model.onnx")
    config = tmp_path / "vision.json"
    config.write_text(json.dumps({"input_model": {"type": "ONNXModel", "model_path": str(graph)},
                                  "passes": {"int8": {"type": "OnnxBlockWiseRtnQuantization", "bits": 8}},
                                  "output_dir": str(graph.parent)}))
    assert main(["run", "--config", str(config), "--dry-run"]) == 0
    assert f"output_dir '{graph.parent}' holds the input graph: Olive writes over it, Grove writes a new folder" \
           in capsys.readouterr().err


@pytest.mark.parametrize(("extra", "expected"), [
    (["--precision", "fp32"], "an ONNX graph given as the model gets int4 or 8-bit block-wise weights (int8), or "
                              "fp16"),
    (["--precision", "fp16", "--block_size", "64"], "--block_size: for int4 or int8 weights, not --precision fp16"),
    (["--precision", "int8", "--int4_algorithm", "k_quant"], "--precision int8 on an ONNX graph is 8-bit blocks"),
    (["--int4_algorithm", "affine"], "an ONNX graph takes rtn or k_quant"),
    (["--eval_tokens", "64"], "--eval_tokens: not for an ONNX graph given as the model"),
    (["--int8_nodes", "a/MatMul"], "--int8_nodes applies to --int4_algorithm k_quant"),
])
def test_what_a_graph_does_not_take_is_one_clear_error(extra: list[str], expected: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    graph = _graph(tmp_path / "mlp.onnx")
    assert main(["auto-opt", "-m", str(graph), "-o", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grove: error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_folder_of_two_graphs_or_a_file_that_is_not_one_is_one_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "two"
    _graph(folder / "a.onnx")
    _graph(folder / "b.onnx", seed=1)
    assert main(["auto-opt", "-m", str(folder), "-o", str(tmp_path / "out")]) == 2
    assert "holds 2 ONNX graphs (a.onnx, b.onnx); pass the one to optimize" in capsys.readouterr().err
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x08\x07not a protobuf at all" * 10)
    assert main(["auto-opt", "-m", str(junk), "-o", str(tmp_path / "out")]) == 2
    assert "is not an ONNX graph onnx can read" in capsys.readouterr().err
