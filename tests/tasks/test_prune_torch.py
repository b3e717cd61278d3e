"""prune-torch (tasks/prune_torch.py): SparseGPT on the PyTorch weights before the capture (auto-opt
--sparsity, Olive's SparseGPT pass); on random weights with correlated inputs, and end to end on a tiny
random decoder through grove run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

torch = pytest.importorskip("torch")

from grove.tasks import prune_torch as pt  # noqa: E402
from grove.tasks import quantize_torch as qt  # noqa: E402
from tests.tasks.test_quantize_torch import _correlated_inputs  # noqa: E402


@pytest.mark.parametrize(("sparsity", "n", "m"), [(0.5, 0, 0), (0.5, 2, 4), (0.75, 0, 0), (0.25, 1, 4)])
def test_sparsegpt_prunes_the_share_asked_with_less_output_error_than_magnitude_pruning(
        sparsity: float, n: int, m: int) -> None:
    """The share asked is zero (N:M: exactly N of every M inputs of each row), and the layer's output on the
    calibration inputs moves less than when the same share of smallest weights is zeroed (the paper's claim,
    here by at least a fifth on every shape)."""
    torch.manual_seed(2)
    for k, rows in ((64, 48), (128, 96), (256, 64)):
        w = torch.distributions.StudentT(3).sample((rows, k)) * 0.02
        x = _correlated_inputs(k, seed=k)
        h = 2 * x.T @ x / x.shape[0]
        pruned = pt.sparsegpt(w, h, sparsity, n, m, block=64)
        baseline = pt.magnitude_prune(w, sparsity, n, m)
        for out in (pruned, baseline):
            assert (out == 0).float().mean().item() == pytest.approx(sparsity, abs=1 / k)
            if n:
                assert ((out.reshape(rows, -1, m) == 0).sum(-1) == n).all()
        err, err_magnitude = qt.output_error(w, pruned, h), qt.output_error(w, baseline, h)
        assert torch.linalg.norm(x @ (pruned - w).T) ** 2 / x.shape[0] == pytest.approx(err / 2, rel=1e-3)
        assert err < 0.8 * err_magnitude, (k, rows, sparsity, n, err, err_magnitude)


def test_sparsity_is_a_share_or_n_of_m_and_anything_else_is_one_clear_error() -> None:
    assert pt.parse_sparsity("0.5") == (0.5, 0, 0) and pt.parse_sparsity(".3") == (0.3, 0, 0)
    assert pt.parse_sparsity("2:4") == (0.5, 2, 4)
    from grove.flows.request import AutoOptRequest

    for bad in ("1.5", "4:4", "2/4", "half"):
        with pytest.raises(ValidationError, match=f"--sparsity '{bad}': a share of the weights to prune, 0 < s < 1 "
                                                  r"\(e.g. 0.5\), or N:M"):
            AutoOptRequest(model_name_or_path="m", output_path="o", sparsity=bad)
    with pytest.raises(ValidationError, match="--sparsity with --int4_algorithm gptq: GPTQ's updates would fill"):
        AutoOptRequest(model_name_or_path="m", output_path="o", sparsity="2:4", int4_algorithm="gptq")
    request = AutoOptRequest(model_name_or_path="m", output_path="o", sparsity="2:4", calibration_data="c.txt",
                             calibration_samples=8)
    pruning = request.pruning("abc")
    assert pruning is not None and (pruning.sparsity, pruning.calibration, pruning.calibration_samples) == (
        "2:4", "c.txt", 8)
    assert AutoOptRequest(model_name_or_path="m", output_path="o").pruning("abc") is None


def test_an_olive_sparsegpt_config_prunes_before_the_capture_and_genai_runs_the_model(
        tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    """olive-recipes' SparseGPT config (2:4, its data config's text for calibration) on a tiny Llama: the
    prune-torch node runs before the capture, every linear weight of the decoder layers is 2:4 in the fp32
    graph genai runs, the lm_head is untouched, and the report names the sparsity and measures the cost."""
    import onnx
    from onnx import numpy_helper

    from tests.conftest import grove_cli

    text = tmp_path / "calibration.jsonl"
    paragraphs = (Path(__file__).parents[2] / "grove" / "data" / "GPL-3.txt").read_text().split("\n\n")
    text.write_text("\n".join(json.dumps({"text": p}) for p in paragraphs))
    config = tmp_path / "sparsegpt.json"
    config.write_text(json.dumps({
        "input_model": {"type": "HfModel", "model_path": str(tiny_dir("llama")), "task": "text-generation"},
        "systems": {"local_system": {"type": "LocalSystem", "accelerators": [
            {"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "data_configs": [{"name": "train_data", "type": "HuggingfaceContainer",
                          "load_dataset_config": {"data_files": str(text)}}],
        "passes": {"s": {"type": "SparseGPT", "device": "cpu", "sparsity": [2, 4], "data_config": "train_data"}},
        "host": "local_system", "target": "local_system", "output_dir": str(tmp_path / "out")}))
    result = grove_cli("run", "--config", str(config), "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--precision fp32" in result.stderr and "--sparsity 2:4" in result.stderr, result.stderr[-3000:]
    assert "SparseGPT 2:4 calibration:" in result.stderr and "calibration.jsonl" in result.stderr

    out = tmp_path / "out"
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["sparsity"] == "2:4" and report["target"]["precision"] == "fp32", report["target"]
    assert "prune-torch" in [s["node"] for s in report["lineage"]], report["lineage"]
    assert report["metrics"]["perplexity"] > 0
    graph = onnx.load(str(out / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    layers = {n: w for n, w in weights.items() if w.ndim == 2 and "layers." in n and "norm" not in n}
    assert len(layers) >= 10, sorted(weights)  # per layer: q, k, v fused, o, gate, up, down
    for name, w in layers.items():  # the builder writes [in, out]: 2 of every 4 consecutive inputs per output
        groups = (w.T.reshape(w.shape[1], -1, 4) == 0).sum(-1)
        assert (groups >= 2).all(), name
    head = next(w for n, w in weights.items() if "lm_head" in n)
    assert (head == 0).mean() < 0.01, "the lm_head is not pruned"


def test_a_layer_whose_inputs_split_into_no_whole_groups_is_refused_before_calibration(
        tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    from grove.errors import InvalidRequest

    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidRequest, match="its inputs are not a multiple of 7, so 3:7 sparsity has no whole "
                                             "groups"):
        pt._prune([tiny_dir("llama")], pt.PruneConfig(sparsity="3:7", calibration=str(tmp_path / "missing.txt")),
                  out)
    assert not np.any([p.name.endswith(".safetensors") for p in out.iterdir()])
