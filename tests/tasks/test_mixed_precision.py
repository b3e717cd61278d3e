"""Mixed precision's choice of 8-bit layers (tasks/_mixed_precision.py): Olive's SelectiveMixedPrecision
algorithms and Grove's output error, on tiny random decoders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from grove.tasks import _mixed_precision as mp  # noqa: E402
from grove.tasks import quantize_torch as qt  # noqa: E402

CONFIG = dict(calibration_samples=4, calibration_seq_len=64)


def test_promote_keeps_the_most_sensitive_share_of_the_weights_with_fused_projections_together() -> None:
    """Olive's selection: units (q/k/v, gate/up: one MatMulNBits each) most sensitive first, until the
    promoted weights reach (1 - ratio) of all of them; the ratio counts weights, not layers."""
    stats = {"l.self_attn.q_proj": {"iqe": 0.1}, "l.self_attn.k_proj": {"iqe": 9.0}, "l.self_attn.v_proj": {"iqe": 0.2},
             "l.self_attn.o_proj": {"iqe": 0.5}, "l.mlp.gate_proj": {"iqe": 3.0}, "l.mlp.up_proj": {"iqe": 0.1},
             "l.mlp.down_proj": {"iqe": 1.0}}
    numels = {"l.self_attn.q_proj": 100, "l.self_attn.k_proj": 50, "l.self_attn.v_proj": 50, "l.self_attn.o_proj": 100,
              "l.mlp.gate_proj": 300, "l.mlp.up_proj": 300, "l.mlp.down_proj": 300}  # 1200 in all
    qkv = ("l.self_attn.k_proj", "l.self_attn.q_proj", "l.self_attn.v_proj")
    assert mp.promote("iqe", stats, numels, 0.9) == qkv  # 200 weights >= 120: k's group goes whole
    assert mp.promote("iqe", stats, numels, 0.75) == ("l.mlp.gate_proj", "l.mlp.up_proj", *qkv)  # 200 < 300
    assert mp.promote("iqe", stats, numels, 1.0) == ()
    everything = tuple(sorted(stats))
    assert mp.promote("iqe", stats, numels, 0.01) == everything
    # kld_gradient's score is per weight: o_proj's 3.0 over 100 weights outranks down_proj's 4.0 over 300
    kld = {n: {"alignment": 0.1} for n in stats} | {"l.self_attn.o_proj": {"alignment": 3.0},
                                                    "l.mlp.down_proj": {"alignment": 4.0}}
    assert mp.promote("kld_gradient", kld, numels, 0.95) == ("l.self_attn.o_proj",)
    assert mp.promote("kld_gradient", kld, numels, 0.8) == ("l.mlp.down_proj", "l.self_attn.o_proj")


def test_the_fixed_heuristics_pick_the_k_quant_layers() -> None:
    """llama.cpp's mixes as Olive picks them: the first and last eighth of the layers and every third
    between; _mlp_down keeps down_proj there, _mlp_down_qkv q/k/v too, _lm_head none of the decoder's."""
    assert [i for i in range(16) if mp.selected_by_position(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    assert [i for i in range(30) if mp.selected_by_position(i, 30)] == [0, 1, 2, 3, 5, 8, 11, 14, 17, 20, 23, 26, 27,
                                                                        28, 29]
    layers = [[f"model.layers.{i}.{leaf}" for leaf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                       "mlp.down_proj")] for i in range(16)]
    down = mp.heuristic("high_precision_mlp_down", layers)
    assert down == tuple(sorted(f"model.layers.{i}.mlp.down_proj" for i in (0, 1, 4, 7, 10, 13, 14, 15)))
    assert len(mp.heuristic("high_precision_mlp_down_qkv", layers)) == 4 * 8
    assert mp.heuristic("high_precision_lm_head", layers) == ()


def _tiny_llama(tmp_path: Path, outlier: str | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    from tests import tiny_models

    src = tiny_models.build("llama", tmp_path / "src")
    if outlier:
        weights = load_file(str(src / "model.safetensors"))
        w = weights[f"{outlier}.weight"].clone()
        w[:, ::32] = 3.0  # one outlier in every group of 32 stretches that group's 4-bit grid
        weights[f"{outlier}.weight"] = w
        save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src


def test_kld_gradient_predicts_which_layer_at_8_bits_lowers_the_divergence_most(tmp_path: Path) -> None:
    """kld_gradient's alignment is a first-order estimate of how much the 4-bit model's KL divergence
    from the original drops when one layer goes to 8 bits: measured here by doing it for each layer,
    the estimate ranks the layers as the real drops do, and names the same best layer."""
    import torch.nn.functional as F  # noqa: N812
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(_tiny_llama(tmp_path)), dtype=torch.float32).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, ::32] = 0.5
    tokens = torch.randint(0, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    fake = qt.fake_quantize(32, False)
    stats = mp.kld_stats(model, modules, tokens, fake, 4)

    def divergence(student: torch.nn.Module) -> float:
        with torch.no_grad():
            return float(np.mean([F.kl_div(F.log_softmax(student(input_ids=r[None]).logits, -1),
                                            F.log_softmax(model(input_ids=r[None]).logits, -1), log_target=True,
                                            reduction="none").sum(-1).mean() for r in tokens]))

    low = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in dict(low.named_modules()).items():
            if name in modules:
                module.weight.data = fake(modules[name].weight.data, 4)
    base = divergence(low)
    drop = {}
    for name in modules:
        one = copy.deepcopy(low)
        with torch.no_grad():
            dict(one.named_modules())[name].weight.data = fake(modules[name].weight.data, 8)
        drop[name] = base - divergence(one)
    names = list(modules)
    predicted, real = [stats[n]["alignment"] for n in names], [drop[n] for n in names]
    assert all(p > 0 for p in predicted) and all(r > 0 for r in real), (predicted, real)
    assert max(names, key=lambda n: stats[n]["alignment"]) == max(names, key=drop.__getitem__)
    rank = np.corrcoef(np.argsort(np.argsort(predicted)), np.argsort(np.argsort(real)))[0, 1]
    assert rank > 0.9, (rank, predicted, real)


def test_kld_gradient_without_a_copy_matches_autograd_on_a_4_bit_copy(tmp_path: Path) -> None:
    """The alignments, computed in place (16-bit low weights, each layer's gradient folded in during the
    backward), against the plain way: a deep copy with 4-bit weights whose weight gradients autograd sums
    over the windows. The model is left as it was: same outputs, same requires_grad, no gradients."""
    import torch.nn.functional as F  # noqa: N812
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(_tiny_llama(tmp_path)), dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    fake = qt.fake_quantize(32, False)
    before = model(input_ids=tokens[:1]).logits.detach()

    student = copy.deepcopy(model)
    copies = dict(student.named_modules())
    student.requires_grad_(False)
    for name, module in modules.items():
        copies[name].weight.data = fake(module.weight.data, 4)
        copies[name].weight.requires_grad_(True)
    for row in tokens:
        with torch.no_grad():
            teacher = F.log_softmax(model(input_ids=row[None]).logits, -1)
        F.kl_div(F.log_softmax(student(input_ids=row[None]).logits, -1), teacher, log_target=True,
                 reduction="none").sum(-1).mean().backward()
    expected = {n: float((copies[n].weight.grad * (copies[n].weight.data - fake(m.weight.data, 8))).sum()) / len(tokens)
                for n, m in modules.items()}

    # As quantize-torch runs it: the decoder layers checkpointed (run again in the backward), the same numbers.
    got = {n: s["alignment"] for n, s in mp.kld_stats(model, modules, tokens, fake, 4,
                                                      layers=model.model.layers).items()}
    kept = {n: s["alignment"] for n, s in mp.kld_stats(model, modules, tokens, fake, 4).items()}
    scale = max(abs(v) for v in expected.values())  # the 16-bit low weights: 0.08% of it measured
    assert all(abs(got[n] - expected[n]) <= 0.005 * scale for n in modules), (got, expected)
    assert all(abs(got[n] - kept[n]) <= 1e-5 * scale for n in modules), (got, kept)
    assert sorted(modules, key=got.__getitem__) == sorted(modules, key=expected.__getitem__)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in [*modules.values(), *model.model.layers])
    assert torch.equal(model(input_ids=tokens[:1]).logits.detach(), before)


@pytest.mark.parametrize("algorithm", ["output_error", "snr", "iqe", "kld_gradient"])
def test_each_score_keeps_a_layer_with_outliers_at_8_bits_in_the_graph(tmp_path: Path, algorithm: str) -> None:
    """A tiny llama whose layer-1 down_proj has outlier weights: the score ranks it first, it keeps 8
    bits in the checkpoint and in the built graph, and the others stay at 4."""
    import onnx

    from grove.tasks.capture_onnx import CaptureConfig, _capture

    name = "model.layers.1.mlp.down_proj"
    src = _tiny_llama(tmp_path, outlier=name)
    config = qt.TorchQuantConfig(mixed_precision_ratio=0.9, mixed_precision_algorithm=algorithm, **CONFIG)
    checkpoint, onnx_dir = tmp_path / "q", tmp_path / "onnx"
    checkpoint.mkdir()
    onnx_dir.mkdir()
    stats = qt._quantize([src], config, checkpoint)
    overrides = json.loads((checkpoint / "config.json").read_text())["quantization_config"]["overrides"]
    assert name in overrides and overrides[name] == {"bits": 8}, overrides
    assert 1 <= stats["layers_8bit"] <= 3, stats  # 10% of the weights: the outlier layer and at most a small one
    _capture([checkpoint], CaptureConfig(precision="int4"), onnx_dir)
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.node
            if n.op_type == "MatMulNBits"}
    assert bits["/model/layers.1/mlp/down_proj/MatMulNBits"] == 8
    assert bits["/model/layers.0/mlp/down_proj/MatMulNBits"] == 4


def test_a_heuristic_needs_no_ratio_and_a_score_needs_one() -> None:
    from typing import get_args

    from grove.tasks._choices import MixedPrecisionAlgorithm

    assert set(get_args(MixedPrecisionAlgorithm)) == {*mp.SCORED, *mp.HEURISTICS} == set(mp._RANK) | set(mp.HEURISTICS)
    with pytest.raises(ValueError, match="picks its layers by position"):
        qt.TorchQuantConfig(mixed_precision_algorithm="high_precision_mlp_down", mixed_precision_ratio=0.5)
    with pytest.raises(ValueError, match="ranks the layers"):
        qt.TorchQuantConfig(mixed_precision_algorithm="kld_gradient")
    assert qt.TorchQuantConfig(mixed_precision_ratio=0.5).mixed_precision_algorithm == "kld_gradient"
    assert "mixed_precision_algorithm" not in qt.TorchQuantConfig().recipe()  # the key of unmixed runs unchanged


def test_kld_gradient_without_the_memory_for_its_copy_is_one_clear_error(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine with less free memory than kld_gradient's 16-bit low weights and their distance to 8
    bits: one error naming the need and the way out, before they are made (not the kernel's OOM kill
    halfway through)."""
    from transformers import AutoModelForCausalLM

    from grove.errors import InvalidRequest

    model = AutoModelForCausalLM.from_pretrained(str(_tiny_llama(tmp_path)), dtype=torch.float32)
    modules = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    assert (mp.available_bytes() or 0) > 1e8, "this machine's MemAvailable is read"
    monkeypatch.setattr(mp, "available_bytes", lambda _device="cpu": 1000)
    with pytest.raises(InvalidRequest, match=r"kld_gradient needs 0\.0 GB more memory .* choose "
                                             "--mixed_precision_algorithm snr or output_error"):
        mp.kld_stats(model, modules, torch.zeros(1, 8, dtype=torch.long), qt.fake_quantize(32, False), 4)
