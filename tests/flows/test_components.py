"""auto-opt --components (Olive's MobiusBuilder export of a multimodal checkpoint): the components as mobius
lays them out, then olive-recipes' per-component configs on them (Gemma 4's mixed/ recipes, Ministral 3's
vision_embedding_export.json); on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest

from grove.shell.cli import main
from tests.conftest import grove_cli

GEMMA4_PARTS = {"decoder", "vision_encoder", "audio_encoder", "embedding"}


def _config(tmp_path: Path, name: str, config: dict) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def test_gemma4s_mixed_recipes_export_every_component_then_quantize_each(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                          store: str) -> None:
    """export.json (a MobiusBuilder alone) writes every component in its folder with genai's config beside
    them; each loads in onnxruntime and the report says which ran on synthetic inputs. Then text.json
    (k-quant int4 with mobius's node names at 8 bits) and vision.json (8-bit blocks) take the decoder and
    the vision encoder as ONNX graphs, as olive-recipes chains them."""
    models = tmp_path / "cpu" / "mixed" / "models"
    export = _config(tmp_path, "export.json", {
        "input_model": {"type": "HfModel", "model_path": str(tiny_dir("gemma4"))},
        "passes": {"export": {"type": "MobiusBuilder", "precision": "fp32"}},
        "no_artifacts": True, "output_dir": str(models)})
    result = grove_cli("run", "--config", str(export), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--precision fp32 --components all" in result.stderr
    assert {p.name for p in models.iterdir() if p.is_dir()} == GEMMA4_PARTS
    assert all((models / part / "model.onnx.data").is_file() for part in GEMMA4_PARTS)
    genai = json.loads((models / "genai_config.json").read_text())["model"]
    assert (genai["decoder"]["filename"], genai["vision"]["filename"]) == ("decoder/model.onnx",
                                                                            "vision_encoder/model.onnx")
    report = json.loads((models / "grove_report.json").read_text())
    parts = report["metrics"]["components"]
    assert set(parts) == GEMMA4_PARTS and all(p["loads"] and p["size_mb"] > 0 for p in parts.values()), parts
    assert parts["decoder"]["runs"] and parts["embedding"]["runs"], parts  # a KV cache, token ids: fed
    assert "component" in result.stdout and "next: grove auto-opt -m" in result.stdout, result.stdout

    decoder = onnx.load(str(models / "decoder" / "model.onnx"), load_external_data=False).graph
    down = next(n.name for n in decoder.node if n.op_type == "MatMul" and "layers.0/mlp/down_proj" in n.name)
    assert down.startswith("decoder/model/layers.0/"), down  # the names olive-recipes' text.json gives
    text = _config(tmp_path, "text.json", {
        "input_model": {"type": "ONNXModel", "model_path": str(models / "decoder" / "model.onnx")},
        "passes": {"int4_quantize": {"type": "OnnxKQuantQuantization", "bits": 4, "block_size": 32,
                                     "customized_weight_config": {down: {"bits": 8}}}},
        "no_artifacts": True, "output_dir": str(tmp_path / "cpu" / "mixed" / "text")})
    result = grove_cli("run", "--config", str(text), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in onnx.load(
        str(tmp_path / "cpu" / "mixed" / "text" / "model.onnx"), load_external_data=False).graph.node
        if n.op_type == "MatMulNBits"}
    assert len(bits) >= 8 and sorted(set(bits.values())) == [4, 8], bits

    vision = _config(tmp_path, "vision.json", {
        "input_model": {"type": "ONNXModel", "model_path": str(models / "vision_encoder" / "model.onnx")},
        "passes": {"int8": {"type": "OnnxBlockWiseRtnQuantization", "bits": 8, "block_size": 32,
                            "is_symmetric": True}},
        "no_artifacts": True, "output_dir": str(tmp_path / "cpu" / "mixed" / "vision")})
    result = grove_cli("run", "--config", str(vision), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "cpu" / "mixed" / "vision" / "grove_report.json").read_text())
    assert report["target"]["precision"] == "int8" and report["ratios"]["size_vs_reference"] < 1, report
    assert any(n.op_type == "MatMulNBits" for n in onnx.load(str(tmp_path / "cpu" / "mixed" / "vision" / "model.onnx"),
                                                             load_external_data=False).graph.node)


def test_ministrals_vision_embedding_export_writes_those_two_alone(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                   store: str) -> None:
    """components_to_export (and the recipe's runtime key): only the components named, and no genai config,
    as Olive writes a subset (the text decoder comes from the model builder's text.json)."""
    config = _config(tmp_path, "vision_embedding_export.json", {
        "input_model": {"type": "HfModel", "model_path": str(tiny_dir("mistral3"))},
        "passes": {"export": {"type": "MobiusBuilder", "precision": "fp32", "runtime": "none",
                              "components_to_export": ["vision_encoder", "embedding"]}},
        "no_artifacts": True, "output_dir": str(tmp_path / "models")})
    result = grove_cli("run", "--config", str(config), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "models"
    assert {p.name for p in out.iterdir()} == {"vision_encoder", "embedding", "grove_report.json"}
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["components"] == ["vision_encoder", "embedding"], report["target"]
    assert report["metrics"]["components"]["embedding"]["runs"], report["metrics"]


@pytest.mark.parametrize(("family", "extra", "expected"), [
    ("llama", ["--components", "vision_encoder"], "--components: this llama model is a text model, one component"),
    ("gemma4", ["--components", "all", "--precision", "int4"], "--components writes fp32 or fp16 graphs, not int4"),
    ("gemma4", ["--components", "all", "--sparsity", "0.5"], "--sparsity: for auto-opt's text decoder, not "
                                                             "--components"),
])
def test_what_components_cannot_do_is_one_clear_error_and_nothing_written(
        family: str, extra: list[str], expected: str, tiny_dir, tmp_path: Path,  # noqa: ANN001
        store: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["auto-opt", "-m", str(tiny_dir(family)), "-o", str(tmp_path / "out"), "--store", store,
                 *extra]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (after the tiny model's build, on the first use)
    assert last.startswith("grove: error: ") and expected in last, err[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_component_the_model_lacks_is_named_with_those_it_has(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                store: str) -> None:
    result = grove_cli("auto-opt", "-m", str(tiny_dir("gemma4")), "-o", str(tmp_path / "out"), "--store", store,
                       "--components", "vision")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == ("grove: error: --components vision: not a component of this "
                                                       "gemma4 model; it has decoder, vision_encoder, audio_encoder, "
                                                       "embedding"), result.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_a_mobius_builder_alone_is_every_component_and_a_text_models_one_is_its_decoder(
        tiny_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    """A MobiusBuilder alone reads as every component (Olive's export); a quantizer after it, as the text
    decoder Grove quantizes; components_to_export as those components. Every component of a text model is
    its text decoder: auto-opt's own path, evaluated."""
    from grove.flows.launch import request_from_flags
    from grove.flows.request import AutoOptRequest

    request, _ = request_from_flags({"model_name_or_path": str(tiny_dir("llama")), "output_path": "o",
                                     "precision": "fp32", "components": ["all"]})
    assert isinstance(request, AutoOptRequest) and request.components is None and request.precision == "fp32"

    def dry(passes: dict) -> str:
        path = _config(tmp_path, "c.json", {"input_model": {"type": "HfModel", "model_path": "some/model"},
                                            "passes": passes, "output_dir": "o"})
        assert main(["run", "--config", str(path), "--dry-run"]) == 0
        return capsys.readouterr().out.strip()

    assert dry({"m": {"type": "MobiusBuilder", "precision": "fp16"}}).endswith("--precision fp16 --components all")
    assert dry({"m": {"type": "MobiusBuilder"}, "q": {"type": "OnnxKQuantQuantization"}}).endswith(
        "--precision int4 --int4_algorithm k_quant --block_size 32")
    assert dry({"m": {"type": "MobiusBuilder", "components_to_export": ["embedding"]}}).endswith(
        "--precision fp32 --components embedding")
