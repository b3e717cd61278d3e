"""QuaRot's offline rotations (tasks/_rotate.py): the rotated model computes the same logits, before
and after a save and load, its weights lose their outliers and round to int4 with less error, and
models that are not RMSNorm decoders are refused; on tiny random models built here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from grove.errors import InvalidRequest  # noqa: E402
from grove.tasks import _rotate as rot  # noqa: E402
from grove.tasks import quantize_torch as qt  # noqa: E402

_SIZES: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
TOKENS = torch.tensor([[5, 17, 99, 3, 64, 127, 8, 42, 11, 77, 31, 2]])


def _tiny(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A tiny random decoder of ``family`` (eval, float32), its weights and biases widened so that the
    logits are far from uniform and its norm scales random, so that folding them is exercised."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **{**_SIZES, **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.05)
            elif "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits[0]


def _relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


CASES = {  # name: (family, config overrides, mode, expected R1 kind, expected R2 kind)
    "llama-untied": ("llama", dict(tie_word_embeddings=False), "hadamard", "hadamard", "hadamard"),
    "llama-tied": ("llama", dict(tie_word_embeddings=True), "hadamard", "hadamard", "hadamard"),
    "llama-biases": ("llama", dict(attention_bias=True, mlp_bias=True), "hadamard", "hadamard", "hadamard"),
    "qwen2-biases-tied": ("qwen2", dict(tie_word_embeddings=True), "hadamard", "hadamard", "hadamard"),
    "qwen3-qk-norms": ("qwen3", dict(head_dim=16, tie_word_embeddings=True), "hadamard", "hadamard", "hadamard"),
    "mistral": ("mistral", dict(sliding_window=None), "hadamard", "hadamard", "hadamard"),
    # fused qkv_proj (the values its last rows) and gate_up_proj; tied, as Phi-4-mini; partial rotary too
    "phi3-fused": ("phi3", dict(tie_word_embeddings=True, original_max_position_embeddings=64), "hadamard",
                   "hadamard", "hadamard"),
    "phi3-partial-rotary": ("phi3", dict(partial_rotary_factor=0.5, original_max_position_embeddings=64),
                            "hadamard", "hadamard", "hadamard"),
    # 96 = 8 x 12: Sylvester's 8 kron Paley's 12; head_dim 24 = Paley's (p = 23)
    "llama-96": ("llama", dict(hidden_size=96), "hadamard", "hadamard", "hadamard"),
    # 90 = 2 x 45 and head_dim 30: no Hadamard matrix of either order exists, so random orthogonal ones
    "llama-90-gqa3": ("llama", dict(hidden_size=90, num_attention_heads=3, num_key_value_heads=1,
                                    tie_word_embeddings=True), "hadamard", "random", "random"),
    "llama-random": ("llama", dict(tie_word_embeddings=True), "random", "random", "random"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_rotated_model_computes_the_same_logits(case: str) -> None:
    family, overrides, mode, r1, r2 = CASES[case]
    model = _tiny(family, **overrides)
    before = _logits(model)
    summary = rot.rotate_model(model, seed=3, mode=mode)
    after = _logits(model)
    assert _relative_diff(after, before) < 1e-4, case
    assert json.loads(json.dumps(summary)) == summary
    assert (summary["r1"], summary["r2"], summary["mode"], summary["seed"]) == (r1, r2, mode, 3)
    assert summary["hidden_size"] == model.config.hidden_size
    assert model.config.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            assert torch.equal(p, torch.ones_like(p)), name


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_rotation_survives_save_and_load_with_the_lm_head_untied(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = _tiny(family, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # one tensor
    before = _logits(model)
    summary = rot.rotate_model(model, seed=0)
    assert summary["untied_lm_head"] is True
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert _relative_diff(_logits(loaded), before) < 1e-4


_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")


def _linears(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _int4_error(w: torch.Tensor) -> float:
    """||W - RTN4(W)|| / ||W||, asymmetric groups of 32 (the capture's default grid)."""
    w_q = qt.dequantize(*qt.rtn(w, 4, 32, False), 32)
    return float(torch.linalg.norm(w - w_q) / torch.linalg.norm(w))


def _peak_ratio(w: torch.Tensor) -> float:
    """max |w| / rms(w): how far the largest weight stands out."""
    return float(w.abs().max() / w.pow(2).mean().sqrt())


def test_rotation_spreads_planted_outliers_and_lowers_the_int4_error() -> None:
    """Input channels 3, 17 and 40 of every linear 20x larger, as trained decoders' outlier features:
    each layer that reads the residual stream (its inputs rotated by R1) loses its outliers and rounds
    to 4 bits with less error, and so do the model's linears taken together. (down_proj's inputs are
    not rotated offline: QuaRot rotates them online, which a plain checkpoint cannot do.)"""
    model = _tiny("llama", tie_word_embeddings=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight[:, [3, 17, 40]] *= 20.0
    before_logits, before = _logits(model), _linears(model)
    rot.rotate_model(model, seed=0)
    after = _linears(model)
    assert _relative_diff(_logits(model), before_logits) < 1e-4
    for name in before:
        if name.endswith(_READERS):
            assert _int4_error(after[name]) < 0.7 * _int4_error(before[name]), name
            assert _peak_ratio(after[name]) < 0.5 * _peak_ratio(before[name]), name
    total = {k: sum(_int4_error(w) for w in ws.values()) / len(ws) for k, ws in (("before", before), ("after", after))}
    assert total["after"] < 0.7 * total["before"], total


def test_the_same_seed_gives_the_same_weights_and_another_seed_other_ones() -> None:
    a, b, c = _tiny("llama"), _tiny("llama"), _tiny("llama")
    rot.rotate_model(a, seed=1)
    rot.rotate_model(b, seed=1)
    rot.rotate_model(c, seed=2)
    assert torch.equal(a.model.layers[0].self_attn.q_proj.weight, b.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)


@pytest.mark.parametrize("n", [1, 2, 12, 20, 28, 36, 64, 96, 576, 896, 960])
def test_hadamard_matrices_are_built_for_powers_of_2_times_paley_orders(n: int) -> None:
    h = rot.hadamard(n)
    assert h is not None and set(np.unique(h)) <= {-1, 1}
    assert np.array_equal(h.astype(np.int64) @ h.T.astype(np.int64), n * np.eye(n, dtype=np.int64))
    q, kind = rot.orthogonal(n, seed=0)
    assert kind == "hadamard"
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("n", [6, 30, 52, 90])
def test_orders_without_a_hadamard_matrix_here_fall_back_to_a_random_orthogonal_one(n: int) -> None:
    assert rot.hadamard(n) is None
    q, kind = rot.orthogonal(n, seed=0)
    assert kind == "random"
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)


def test_a_layernorm_model_is_refused_naming_its_architecture() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)).eval()
    with pytest.raises(InvalidRequest, match=r"gpt2.*RMSNorm decoders.*llama, mistral, qwen2, qwen3.*LayerNorm"):
        rot.rotate_model(model)


def test_gemma_is_refused_for_its_one_plus_w_norm() -> None:
    model = _tiny("gemma", head_dim=16, tie_word_embeddings=True)
    with pytest.raises(InvalidRequest, match=r"gemma.*\(1 \+ w\)"):
        rot.rotate_model(model)


@pytest.mark.parametrize("family", ["olmo2", "olmo3"])
def test_olmo_2_and_3_are_refused_for_their_norms_after_each_block(family: str) -> None:
    model = _tiny(family, tie_word_embeddings=False)
    with pytest.raises(InvalidRequest, match=rf"{family}.*norms follow attention and the MLP"):
        rot.rotate_model(model)


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="mode"):
        rot.rotate_model(_tiny("llama"), mode="walsh")  # type: ignore[arg-type]
