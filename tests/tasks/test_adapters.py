"""Olive's adapter commands: convert-adapters, extract-adapters, generate-adapter. Their files load in
onnxruntime-genai over the graphs Grove writes, under the very names those graphs use (Olive issue
#2277: its convert-adapters names did not match its own auto-opt graphs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import tiny_models
from tests.conftest import grove_cli

TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj"]


@pytest.fixture(scope="module")
def switchable(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, str]:
    """(base model, its adapter, the fp32 auto-opt output keeping that adapter switchable, the store)."""
    root = tmp_path_factory.mktemp("adapters")
    base = tiny_models.build("llama", root / "llama")
    adapter = tiny_models.lora_adapter(base, root / "adapter", 11, TARGETS)
    store = str(root / "store")
    out = root / "fp32"
    result = grove_cli("auto-opt", "-m", str(base), "--adapter_path", str(adapter), "--precision", "fp32", "-o",
                       str(out), "--store", store)
    assert result.returncode == 0, result.stderr[-4000:]
    return base, adapter, out, store


def _parameters(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    adapter = ort.AdapterFormat.read_adapter(str(path))  # its values are views of this object's memory: copied
    return {k: v.numpy().copy() for k, v in adapter.get_parameters().items()}


def test_convert_adapters_writes_the_names_and_values_of_grove_graphs(switchable, tmp_path: Path) -> None:  # noqa: ANN001
    """Without -m, by the builder's naming; with -m, matched against the graph: both equal, name for name and
    bit for bit, the adapter auto-opt extracted from the graph it built with that adapter."""
    _, adapter, out, _ = switchable
    extracted = _parameters(out / "adapter_weights.onnx_adapter")
    for extra in ([], ["-m", str(out)]):
        result = grove_cli("convert-adapters", "-a", str(adapter), "-o", str(tmp_path / f"conv{len(extra)}"), *extra)
        assert result.returncode == 0, result.stderr
        converted = _parameters(tmp_path / f"conv{len(extra)}.onnx_adapter")
        assert sorted(converted) == sorted(extracted)
        assert all(np.array_equal(converted[k], extracted[k]) for k in extracted)


def test_convert_adapters_refuses_an_adapter_that_does_not_fit_the_graph(switchable, tmp_path: Path) -> None:  # noqa: ANN001
    base, _, out, _ = switchable
    other_targets = tiny_models.lora_adapter(base, tmp_path / "k", 12, ["k_proj"])
    wider = tiny_models.build("llama", tmp_path / "wider", hidden_size=96, num_attention_heads=4)
    other_base = tiny_models.lora_adapter(wider, tmp_path / "w", 13, TARGETS)
    for adapter, expected in ((other_targets, "which the base graph has no LoRA input for"),
                              (other_base, "which does not fit this base")):
        result = grove_cli("convert-adapters", "-a", str(adapter), "-o", str(tmp_path / "x"), "-m", str(out))
        assert result.returncode == 2, result.stderr
        [error] = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
        assert expected in error, error
        assert not list(tmp_path.glob("x*")), "nothing written"


def test_extract_adapters_writes_one_file_per_adapter_each_loading_over_the_base(switchable, tmp_path: Path) -> None:  # noqa: ANN001
    import onnxruntime_genai as og

    base, _, out, _ = switchable
    for name, seed in (("legal", 21), ("medical", 22)):
        tiny_models.lora_adapter(base, tmp_path / "adapters" / name, seed, TARGETS)
    result = grove_cli("extract-adapters", "-m", str(tmp_path / "adapters"), "-o", str(tmp_path / "files"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == ["legal.onnx_adapter", "medical.onnx_adapter"]
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    logits = {}
    for name in ("legal", "medical"):
        adapters.load(str(tmp_path / "files" / f"{name}.onnx_adapter"), name)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=16)
        generator = og.Generator(model, params)
        generator.set_active_adapter(adapters, name)
        generator.append_tokens(list(range(3, 12)))
        logits[name] = np.array(generator.get_output("logits"))
    assert np.abs(logits["legal"] - logits["medical"]).max() > 0.05


def test_generate_adapter_makes_a_graph_built_with_an_adapter_switchable(switchable, tmp_path: Path) -> None:  # noqa: ANN001
    """The graph the builder wrote with the adapter inside (capture-adapter's artifact) in, a model whose
    LoRA weights are inputs out: with its adapter active it computes what the built-in graph computes,
    without it the base model."""
    import onnxruntime_genai as og

    _, _, out, store = switchable
    report = json.loads((out / "grove_report.json").read_text())
    (captured,) = [s for s in report["lineage"] if s["node"] == "capture-adapter"]
    built_in = Path(store) / "artifacts" / "capture-adapter" / captured["digest"]
    result = grove_cli("generate-adapter", "-m", str(built_in), "-o", str(tmp_path / "gen"))
    assert result.returncode == 0, result.stderr

    def run(folder: Path, with_adapter: bool) -> np.ndarray:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=20)
        generator = og.Generator(model, params)
        if with_adapter:
            adapters = og.Adapters(model)
            adapters.load(str(folder / "adapter_weights.onnx_adapter"), "a")
            generator.set_active_adapter(adapters, "a")
        generator.append_tokens(list(range(3, 15)))
        return np.array(generator.get_output("logits"))

    assert np.abs(run(tmp_path / "gen", True) - run(built_in, False)).max() < 1e-5
    reference = [s for s in report["lineage"] if s["node"] == "capture-onnx"]
    base_graph = Path(store) / "artifacts" / "capture-onnx" / reference[0]["digest"]
    assert np.abs(run(tmp_path / "gen", False) - run(base_graph, False)).max() < 1e-5


def test_convert_adapters_lays_an_adapter_out_as_a_fused_int4_graph_takes_it(switchable, tmp_path: Path) -> None:  # noqa: ANN001
    """Grove's int4 fuses q/k/v (and gate/up) into one MatMulNBits + Split, and their LoRA paths into one
    (A side by side, B block-diagonal; adapter_layout.json says how): convert-adapters -m that graph writes a
    second adapter in that layout, which equals, bit for bit, what auto-opt extracts for that adapter."""
    base, _, _, store = switchable
    second = tiny_models.lora_adapter(base, tmp_path / "second", 12, TARGETS)
    outputs = {}
    for name, adapter in (("first", switchable[1]), ("second", second)):
        outputs[name] = tmp_path / f"int4-{name}"
        result = grove_cli("auto-opt", "-m", str(base), "--adapter_path", str(adapter), "-o", str(outputs[name]),
                           "--store", store)
        assert result.returncode == 0, result.stderr[-4000:]
    layout = json.loads((outputs["first"] / "adapter_layout.json").read_text())
    assert any("q_proj__v_proj" in name for name in layout), sorted(layout)[:4]
    result = grove_cli("convert-adapters", "-a", str(second), "-o", str(tmp_path / "second"), "-m",
                       str(outputs["first"]))
    assert result.returncode == 0, result.stderr
    converted = _parameters(tmp_path / "second.onnx_adapter")
    extracted = _parameters(outputs["second"] / "adapter_weights.onnx_adapter")
    assert sorted(converted) == sorted(extracted)
    assert all(np.array_equal(converted[k], extracted[k]) for k in extracted)
