"""quantize-torch (tasks/quantize_torch.py): GPTQ, round-to-nearest and mixed precision on the
PyTorch weights, written as a checkpoint the model builder turns into MatMulNBits without rounding
again; on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from grove.tasks import quantize_torch as qt  # noqa: E402

CONFIG = dict(calibration_samples=4, calibration_seq_len=64)


def _correlated_inputs(k: int, n: int = 512, seed: int = 0) -> torch.Tensor:
    """Inputs whose features are correlated and of unequal scale, as a layer's activations are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k ** 0.5
    scale = torch.exp(torch.randn(k, generator=g))
    return (torch.randn(n, k, generator=g) @ mix) * scale


def test_gptq_output_error_is_below_round_to_nearest_on_the_same_weights_and_inputs() -> None:
    torch.manual_seed(1)
    for k, out in ((64, 48), (128, 96), (256, 64)):
        w = torch.distributions.StudentT(3).sample((out, k)) * 0.02  # heavy-tailed, as trained weights
        x = _correlated_inputs(k)
        h = 2 * x.T @ x / x.shape[0]
        for symmetric in (False, True):
            rtn = qt.dequantize(*qt.rtn(w, 4, 32, symmetric), 32)
            gptq = qt.dequantize(*qt.gptq(w, h, 4, 32, symmetric), 32)
            err_rtn, err_gptq = qt.output_error(w, rtn, h), qt.output_error(w, gptq, h)
            # the error on the calibration inputs themselves, measured directly
            assert torch.linalg.norm(x @ (gptq - w).T) ** 2 / x.shape[0] == pytest.approx(err_gptq / 2, rel=1e-3)
            assert err_gptq < 0.8 * err_rtn, (k, out, symmetric, err_gptq, err_rtn)


def test_gptq_keeps_its_grid() -> None:
    """Every GPTQ weight is on its group's grid: (q - zero) * scale with integer q in 0..15."""
    w = torch.randn(32, 64)
    x = _correlated_inputs(64)
    q, s, z = qt.gptq(w, 2 * x.T @ x / 512, 4, 32, False)
    assert q.min() >= 0 and q.max() <= 15 and torch.equal(q, q.round()) and torch.equal(z, z.round())
    assert s.shape == z.shape == (32, 2)


def test_a_symmetric_group_puts_its_largest_weight_on_the_grid_whatever_its_sign() -> None:
    """Symmetric groups have the levels -8..7 (times the scale): the weight of largest magnitude is the
    -8 level exactly, through a negative scale when it is positive, so no group clips its extreme."""
    w = torch.randn(16, 64)
    w[0, 5], w[1, 40] = 9.0, -9.0  # one positive and one negative extreme
    q, s, z = qt.rtn(w, 4, 32, True)
    back = qt.dequantize(q, s, z, 32)
    assert torch.equal(z, torch.full_like(z, 8))
    assert back[0, 5] == pytest.approx(9.0) and back[1, 40] == pytest.approx(-9.0)
    assert s[0, 0] < 0 < s[1, 1] and q[0, 5] == q[1, 40] == 0
    top = w.reshape(16, 2, 32).abs().argmax(-1)  # every group's extreme is exact
    assert torch.allclose(back.reshape(16, 2, 32).gather(-1, top[..., None]), w.reshape(16, 2, 32).gather(
        -1, top[..., None]), atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_rounds_no_worse_than_min_max_and_keeps_gptq_ahead_of_rtn(symmetric: bool) -> None:
    """The range search tries the min/max range itself (factor 1.0), so a group's rounding error (sum of
    |error|^2.4, what it minimizes) is never larger; on heavy-tailed weights it is smaller overall, and
    GPTQ on the searched grid still beats round to nearest on the calibration inputs."""
    torch.manual_seed(3)
    w = torch.distributions.StudentT(3).sample((96, 128)) * 0.02

    def group_error(search: bool) -> torch.Tensor:
        back = qt.dequantize(*qt.rtn(w, 4, 32, symmetric, search), 32)
        return (back - w).abs().pow(2.4).reshape(96, 4, 32).sum(-1)

    plain, searched = group_error(False), group_error(True)
    assert bool((searched <= plain * (1 + 1e-5)).all())
    assert float(searched.sum()) < 0.97 * float(plain.sum())
    x = _correlated_inputs(128)
    h = 2 * x.T @ x / x.shape[0]
    rtn = qt.output_error(w, qt.dequantize(*qt.rtn(w, 4, 32, symmetric, True), 32), h)
    gptq = qt.output_error(w, qt.dequantize(*qt.gptq(w, h, 4, 32, symmetric, search=True), 32), h)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_pack_puts_the_first_value_in_the_low_bits() -> None:
    values = torch.tensor([[1, 2, 3, 15, 0]])
    assert qt.pack(values, 4).tolist() == [[0x21, 0xF3, 0x00]]
    assert qt.pack(values, 8).tolist() == [[1, 2, 3, 15, 0]]


def _genai_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    from grove.tasks import _genai_runtime as runtime

    return runtime.logits(runtime.genai_model(folder), tokens, runtime.kv_floor(folder))


def _dequantized_model(src: Path, checkpoint: Path) -> torch.nn.Module:
    """The source model with the checkpoint's integers, dequantized, in place of its linear weights."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(checkpoint / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    fused = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # written apart
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        parts = [name] if f"{name}.qweight" in tensors else [f"{parent}.{p}" for p in fused.get(leaf, ())]
        if not parts or not all(f"{part}.qweight" in tensors for part in parts):
            continue
        rows = []
        for part in parts:
            bits = (config["overrides"] or {}).get(part, {}).get("bits", config["bits"])
            q = _unpack(tensors[f"{part}.qweight"], bits, module.weight.shape[1])
            z = _unpack(tensors[f"{part}.qzeros"], bits, tensors[f"{part}.scales"].shape[1])
            group = module.weight.shape[1] // tensors[f"{part}.scales"].shape[1]
            rows.append(qt.dequantize(q.float(), tensors[f"{part}.scales"], z.float(), group))
        module.weight.data = torch.cat(rows)
    return model.eval()


def _unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    per = 8 // bits
    parts = [(packed >> (bits * i)) & (2 ** bits - 1) for i in range(per)]
    return torch.stack(parts, -1).reshape(packed.shape[0], -1)[:, :n].to(torch.int32)


@pytest.mark.parametrize(("family", "symmetric"), [
    ("llama", False), ("qwen2", False),  # an lm_head of its own; one tied to the embedding
    ("phi3", False),  # fused qkv_proj and gate_up_proj, written as the q/k/v and gate/up the builder reads
    ("olmo3", False),  # Grove's own builder class (norms after each block) reading a quantized checkpoint
    ("qwen2", True)])  # symmetric groups with signed scales, searched ranges, the tied 8-bit table too
def test_the_builder_writes_the_checkpoints_integers_and_genai_runs_them(family: str, symmetric: bool,
                                                                        tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    import onnx
    from onnx import numpy_helper

    from grove.tasks.capture_onnx import CaptureConfig, _capture

    src = tiny_dir(family)
    checkpoint, onnx_dir = tmp_path / "q", tmp_path / "onnx"
    checkpoint.mkdir()
    onnx_dir.mkdir()
    stats = qt._quantize([src], qt.TorchQuantConfig(**CONFIG, symmetric=symmetric, clip_search=symmetric),
                         checkpoint)
    assert stats["layers_quantized"] == (8 if family == "phi3" else 14) and "GPL-3" in stats["calibration"]
    # a head of its own is GPTQ's too; one tied to the embedding keeps round to nearest (the embedding reads it)
    assert stats["lm_head"] == ("rtn" if family == "qwen2" else "gptq"), stats
    _capture([checkpoint], CaptureConfig(precision="int4"), onnx_dir)

    graph = onnx.load(str(onnx_dir / "model.onnx"))
    weights = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    from safetensors.torch import load_file

    ours = load_file(str(checkpoint / "model.safetensors"))
    down = ours["model.layers.1.mlp.down_proj.qweight"].numpy()
    onnx_down = weights["model.layers.1.mlp.down_proj.MatMulNBits.qweight"]
    assert np.array_equal(onnx_down.reshape(down.shape), down), "the builder rounded the weights again"
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in graph.graph.node
            if n.op_type == "MatMulNBits"}
    assert bits["/lm_head/MatMulNBits"] == 8 and bits["/model/layers.1/mlp/down_proj/MatMulNBits"] == 4
    # symmetric: the builder's all-8 (all-128) zero points are dropped, the kernel's zero-point-free path
    assert {len(n.input) for n in graph.graph.node if n.op_type == "MatMulNBits"} == {3 if symmetric else 4}
    if family == "qwen2":  # tied: the embedding reads the lm_head's 8-bit rows, no float table
        assert any(n.op_type == "GatherBlockQuantized" for n in graph.graph.node)

    tokens = list(range(3, 40))
    with torch.no_grad():
        expected = _dequantized_model(src, checkpoint)(torch.tensor([tokens])).logits[0].numpy()
    got = _genai_logits(onnx_dir, tokens)
    spread = float(np.abs(expected).mean())
    assert np.abs(got - expected).mean() < 0.05 * spread, "genai does not compute with the checkpoint's weights"
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_shortlisted_8_bit_head_gives_the_full_heads_logits_for_its_best_tokens(family: str, tiny_dir,  # noqa: ANN001
                                                                                  tmp_path: Path) -> None:
    """capture-onnx's head_shortlist on a GPTQ checkpoint: a 4-bit pass picks each position's best
    tokens and their logits are the whole 8-bit head's; so is every position's argmax, and the graph
    still loads the tied embedding's rows from the same 8-bit table."""
    from grove.tasks.capture_onnx import CaptureConfig, _capture

    checkpoint = tmp_path / "q"
    checkpoint.mkdir()
    qt._quantize([tiny_dir(family)], qt.TorchQuantConfig(**CONFIG, symmetric=True), checkpoint)
    logits = {}
    for shortlist in (0, 8):
        out = tmp_path / f"onnx{shortlist}"
        out.mkdir()
        # fp32 activations (accuracy level 0): the whole head's logits are exact, as the rescored ones are
        _capture([checkpoint], CaptureConfig(precision="int4", head_shortlist=shortlist, accuracy_level=0), out)
        logits[shortlist] = _genai_logits(out, list(range(3, 40)))
    full, short = logits[0], logits[8]
    exact = (np.abs(short - full) < 1e-4).sum(-1)  # the 8 rescored logits of each position (or a few more)
    assert (exact >= 8).all() and (exact < full.shape[-1] // 2).all(), exact
    assert (short.argmax(-1) == full.argmax(-1)).all()
    assert 0 < np.abs(short - full).max() < 0.5 * np.abs(full).max(), "the others are the 4-bit pass's"


def test_a_calibration_text_shorter_than_one_window_is_one_clear_error(tiny_dir,  # noqa: ANN001
                                                                      tmp_path: Path) -> None:
    from grove.errors import InvalidRequest

    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    out = tmp_path / "q"
    out.mkdir()
    with pytest.raises(InvalidRequest, match="fewer than one calibration window"):
        qt._quantize([tiny_dir("llama")], qt.TorchQuantConfig(calibration=str(short), **CONFIG), out)


def test_a_group_size_that_does_not_divide_the_layers_is_refused_before_calibration(tiny_dir,  # noqa: ANN001
                                                                                     tmp_path: Path) -> None:
    """olive-recipes' group_size 128 on a model 64 wide (SmolLM2 is 576): one error naming the layer and a
    group size that fits every layer, raised before the calibration text is even read (here too short to
    calibrate on), so a large model does not score and calibrate for an hour first."""
    from grove.errors import InvalidRequest

    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    out = tmp_path / "q"
    out.mkdir()
    config = qt.TorchQuantConfig(calibration=str(short), group_size=128, mixed_precision_ratio=0.65, **CONFIG)
    with pytest.raises(InvalidRequest, match=r"model\.layers\.0\.self_attn\.q_proj: 64 inputs are not a multiple "
                                             r"of the group size 128 \(12 layers of 14\); choose a group size .*: 64$"):
        qt._quantize([tiny_dir("llama")], config, out)
    assert not list(out.iterdir()), "nothing half-written"


def test_auto_opt_gptq_flags_reach_the_nodes_and_calibration_flags_need_gptq() -> None:
    from pydantic import ValidationError

    from grove.flows.request import AutoOptRequest

    request = AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="gptq", block_size=64,
                             symmetric=True, accuracy_level=0, head_bits=4, mixed_precision_ratio=0.8,
                             calibration_data="c.txt", calibration_samples=8)
    assert request.int4 is None, "gptq is not the graph quantizer's"
    assert request.capture.recipe() == {"precision": "int4", "execution_provider": "cpu", "accuracy_level": 0}
    config = request.torch_quant("abc")
    assert (config.group_size, config.symmetric, config.head_bits, config.mixed_precision_ratio, config.calibration,
            config.calibration_samples) == (64, True, 4, 0.8, "c.txt", 8)
    assert AutoOptRequest(model_name_or_path="m", output_path="o", device="gpu", int4_algorithm="gptq").capture \
        .execution_provider == "cuda"
    fast = AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="gptq", symmetric=True,
                          clip_search=True)
    assert fast.torch_quant("abc").clip_search and fast.capture.head_shortlist == 32, "the 8-bit head's shortlist"
    assert AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="gptq", head_shortlist=0).capture \
        .recipe().get("head_shortlist") is None, "no shortlist: the capture keeps its cache key"
    with pytest.raises(ValidationError, match="--clip_search: for a decoder, calibration is GPTQ's"):
        AutoOptRequest(model_name_or_path="m", output_path="o", clip_search=True)
    with pytest.raises(ValidationError, match="--mixed_precision_ratio, --calibration_data: for a decoder, "
                                              "calibration is GPTQ's; pass --int4_algorithm gptq"):
        AutoOptRequest(model_name_or_path="m", output_path="o", mixed_precision_ratio=0.8, calibration_data="c.txt")
    kld = AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="gptq", mixed_precision_ratio=0.65,
                         mixed_precision_algorithm="kld_gradient")
    assert kld.torch_quant("abc").recipe()["mixed_precision_algorithm"] == "kld_gradient"
    with pytest.raises(ValidationError, match="--mixed_precision_algorithm kld_gradient ranks the layers: pass "
                                              "--mixed_precision_ratio"):
        AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="gptq",
                       mixed_precision_algorithm="kld_gradient")
    with pytest.raises(ValidationError, match="high_precision_mlp_down picks its layers by position: drop "
                                              "--mixed_precision_ratio"):
        AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="gptq", mixed_precision_ratio=0.5,
                       mixed_precision_algorithm="high_precision_mlp_down")


def test_a_missing_calibration_file_stops_auto_opt_before_any_work(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                    store: str) -> None:
    from tests.conftest import grove_cli

    result = grove_cli("auto-opt", "-m", str(tiny_dir("llama")), "-o", str(tmp_path / "out"), "--int4_algorithm",
                       "gptq", "--calibration_data", str(tmp_path / "missing.txt"), env={"GROVE_STORE": store})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"grove: error: --calibration_data {tmp_path}/missing.txt")
    assert not (tmp_path / "out").exists() and not any(Path(store).rglob("manifest.json"))


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])  # an lm_head of its own; one tied; fused projections
def test_rotating_first_lowers_the_int4_error_of_weights_with_outlier_channels(family: str, tmp_path: Path) -> None:
    """QuaRot before GPTQ (--rotate) on a tiny decoder whose linear layers have outlier input channels,
    as trained LLMs do: the rotated checkpoint is the same function (the builder captures it as it is,
    the lm_head untied from the embedding), and its int4 graph in onnxruntime-genai is closer to the
    fp32 model's logits than the unrotated GPTQ one."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from grove.tasks.capture_onnx import CaptureConfig, _capture
    from tests import tiny_models

    src = tiny_models.build(family, tmp_path / "src")
    weights = load_file(str(src / "model.safetensors"))
    for name, w in weights.items():  # a few input channels 20x larger in every linear layer of the layers
        if name.startswith("model.layers.") and name.endswith("_proj.weight"):
            w[:, [3, 17, 40]] *= 20
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    tokens = list(range(3, 40))
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)(
            torch.tensor([tokens])).logits[0].numpy()

    errors = {}
    for rotate in (False, True):
        checkpoint, onnx_dir = tmp_path / f"q{rotate}", tmp_path / f"onnx{rotate}"
        checkpoint.mkdir()
        onnx_dir.mkdir()
        stats = qt._quantize([src], qt.TorchQuantConfig(rotate=rotate, **CONFIG), checkpoint)
        assert stats.get("rotated", False) == rotate
        if rotate:
            assert json.loads((checkpoint / "config.json").read_text())["tie_word_embeddings"] is False
        _capture([checkpoint], CaptureConfig(precision="int4"), onnx_dir)
        errors[rotate] = float(np.abs(_genai_logits(onnx_dir, tokens) - reference).mean())
        if rotate or family == "llama":  # an embedding of its own: 8-bit rows, not the builder's fp32 table
            import onnx

            [gather] = [n for n in onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False).graph.node
                        if n.op_type in ("Gather", "GatherBlockQuantized") and "embed_tokens" in n.name]
            assert gather.op_type == "GatherBlockQuantized"
            assert {a.name: a.i for a in gather.attribute}["bits"] == 8
    assert errors[True] < 0.8 * errors[False], errors


def test_rotate_needs_gptq_and_changes_the_key_only_when_on() -> None:
    from pydantic import ValidationError

    from grove.flows.request import AutoOptRequest

    assert "rotate" not in qt.TorchQuantConfig().recipe() and qt.TorchQuantConfig(rotate=True).recipe()["rotate"]
    with pytest.raises(ValidationError, match="--rotate: for a decoder, calibration is GPTQ's; pass --int4_algorithm"):
        AutoOptRequest(model_name_or_path="m", output_path="o", rotate=True)


def test_a_gpu_node_without_cuda_in_its_torch_says_so_and_runs_on_the_cpu(caplog: pytest.LogCaptureFixture) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine's torch has CUDA: tests/tasks/test_gpu.py runs the GPU path")
    import logging

    with caplog.at_level(logging.WARNING):
        assert qt._compute_device(qt.TorchQuantConfig(placement="gpu")) == "cpu"
    assert "placed on the GPU pool, but this torch has no CUDA: running on the CPU" in caplog.text
    assert qt._compute_device(qt.TorchQuantConfig()) == "cpu"
