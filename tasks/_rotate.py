"""QuaRot's offline rotations of a Hugging Face decoder's weights (Ashkboos et al., 2024, "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", arXiv:2404.00456), applied before int4 quantization.

A few input channels of a trained decoder's linear layers carry weights many times larger than the
rest; a 4-bit grid stretched over them rounds everything else coarsely. Multiplying the residual
stream by an orthogonal matrix Q (a randomized Hadamard) spreads every channel over all the others,
so the weights lose those outliers, while the model computes the same function: RMSNorm commutes
with an orthogonal map once its scale is folded into the layers that read it, so each layer that
reads the stream takes W Q, each one that writes it takes Q^T W, and the embedding takes E Q (R1).
A per-head Hadamard on v_proj's outputs and o_proj's inputs (R2) does the same inside attention.

Only the offline rotations are done: the result is a plain checkpoint of the same architecture that
``save_pretrained`` writes and onnxruntime-genai's model builder captures unchanged (QuaRot's online
Hadamards on the down_proj inputs and the KV cache would need graph ops the builder does not emit).
This is written here because no maintained library offers these rotations for plain HF checkpoints
without CUDA kernels: QuaRot's and SpinQuant's code bases rotate inside their own model classes with
fast-Hadamard CUDA extensions.

Only RMSNorm decoders are supported (llama, mistral, qwen2, qwen3, and phi3, whose q/k/v and gate/up
projections are each one fused linear: its value rows are a slice of qkv_proj's): a LayerNorm subtracts the mean
and adds a bias, which do not commute with a rotation without rewriting the model, and Gemma's norm
scales by (1 + w) on a scaled embedding."""

from __future__ import annotations

import math
from typing import Any, Literal

from grove.errors import InvalidRequest

__all__ = ["SUPPORTED", "hadamard", "orthogonal", "qkv_rows", "rotate_model"]

# config.model_type of the decoders whose layers are the llama layout with RMSNorm (qwen2: q/k/v biases;
# qwen3: per-head q/k norms after q_proj/k_proj, which a rotation of their inputs leaves alone).
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3")

_REASONS = {  # why some well-known families are refused, beyond "not in the list"
    "gemma": "its norm scales by (1 + w) and its embedding is scaled by sqrt(hidden)",
    "gemma2": "its norm scales by (1 + w), with norms after attention and the MLP too",
    "gemma3_text": "its norm scales by (1 + w), with norms after attention and the MLP too",
    # OLMo 2 / 3: each block's output is normalized before the residual add, and nothing normalizes its
    # input, so no norm scale can be folded into the layers that read the stream.
    "olmo2": "its norms follow attention and the MLP (none precedes them)",
    "olmo3": "its norms follow attention and the MLP (none precedes them)",
}
# The linears that read input_layernorm's output (q, k, v; phi3's fused qkv_proj) and post_attention_layernorm's
# (gate, up; phi3's gate_up_proj): a layer has one spelling or the other.
_READ_ATTN = (("q_proj", "k_proj", "v_proj"), ("qkv_proj",))
_READ_MLP = (("gate_proj", "up_proj"), ("gate_up_proj",))
_MAX_PALEY = 1024  # the largest Paley order tried: larger ones are rare in hidden sizes and slow to check
_CHUNK = 4096  # rows (or columns) rotated at a time: float64 copies of a whole lm_head would be gigabytes


def rotate_model(model: Any, *, seed: int = 0, mode: Literal["hadamard", "random"] = "hadamard") -> dict[str, object]:
    """Rotate a loaded HF causal LM (torch, float32, eval mode) IN PLACE so that its function is unchanged
    (same logits up to float rounding) but its linear layers' weights have far smaller outliers, as QuaRot's
    offline rotations do (Ashkboos et al. 2024), before int4 quantization. Returns a small JSON-able summary
    (what was rotated, the hidden size, the mode, the seed).

    The norms' scales are folded into the layers that read them (and set to ones), a tied lm_head is
    untied first (``config.tie_word_embeddings`` becomes False, so a save and load keeps both), then the
    residual stream is rotated by R1 (hidden x hidden) and each attention head's values by R2 (head_dim
    x head_dim). ``mode="hadamard"`` takes randomized Hadamard matrices (random signs from ``seed``) where
    one of that size can be built, else a random orthogonal matrix; ``mode="random"`` always the latter."""
    import torch

    if mode not in ("hadamard", "random"):
        raise InvalidRequest(f"rotation mode must be 'hadamard' or 'random', not {mode!r}")
    parts = _parts(model)
    hidden, head_dim = parts["embed"].weight.shape[1], parts["head_dim"]
    with torch.no_grad():
        untied = _untie(model, parts)
        _fuse_norms(parts)
        r1, r1_kind = orthogonal(hidden, seed, mode)
        r2, r2_kind = orthogonal(head_dim, seed + 1, mode)
        _rotate_residual(parts, r1)
        _rotate_heads(parts, r2)
    return {
        "method": "quarot-offline",
        "model_type": model.config.model_type,
        "hidden_size": hidden,
        "head_dim": head_dim,
        "layers": len(parts["layers"]),
        "mode": mode,
        "seed": seed,
        "r1": r1_kind,
        "r2": r2_kind,
        "untied_lm_head": untied,
        "rotated": ["embed_tokens", *_names(parts["layers"][0].self_attn, _READ_ATTN), "o_proj",
                    *_names(parts["layers"][0].mlp, _READ_MLP), "down_proj", "lm_head"],
        "norms_fused": ["input_layernorm", "post_attention_layernorm", "norm"],
    }


# -- the model's parts ------------------------------------------------------------------------------

def _parts(model: Any) -> dict[str, Any]:
    """The modules the rotation touches, after checking that the model is a supported RMSNorm decoder."""
    import torch

    config: Any = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    arch = f"{model_type} ({type(model).__name__})"
    if model_type not in SUPPORTED:
        has_layernorm = any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
        reason = _REASONS.get(str(model_type)) or (
            "it uses LayerNorm, whose mean and bias do not commute with a rotation" if has_layernorm else
            "its layer layout is not one this rotation knows")
        raise InvalidRequest(f"cannot rotate {arch}: QuaRot here supports RMSNorm decoders only "
                             f"({', '.join(SUPPORTED)} families), and {reason}")
    decoder, lm_head = getattr(model, "model", None), getattr(model, "lm_head", None)
    layers = getattr(decoder, "layers", None)
    if decoder is None or not isinstance(lm_head, torch.nn.Linear) or layers is None or \
            not isinstance(getattr(decoder, "embed_tokens", None), torch.nn.Embedding):
        raise InvalidRequest(f"cannot rotate {arch}: expected a causal LM with model.embed_tokens, model.layers, "
                             "model.norm and lm_head")
    _check_norm(decoder.norm, "model.norm", arch)
    head_dim = None
    for i, layer in enumerate(layers):
        _check_norm(layer.input_layernorm, f"layers.{i}.input_layernorm", arch)
        _check_norm(layer.post_attention_layernorm, f"layers.{i}.post_attention_layernorm", arch)
        for name, module in [*((n, getattr(layer.self_attn, n, None)) for n in (*_names(layer.self_attn, _READ_ATTN),
                                                                              "o_proj")),
                             *((n, getattr(layer.mlp, n, None)) for n in (*_names(layer.mlp, _READ_MLP), "down_proj"))]:
            if not isinstance(module, torch.nn.Linear) or not module.weight.is_floating_point():
                raise InvalidRequest(f"cannot rotate {arch}: layers.{i}.{name} is not a plain floating-point "
                                     "Linear (already quantized?)")
        dim = getattr(layer.self_attn, "head_dim", None) or getattr(config, "head_dim", None) or \
            config.hidden_size // config.num_attention_heads
        if head_dim not in (None, dim):
            raise InvalidRequest(f"cannot rotate {arch}: its layers have different head sizes")
        head_dim = dim
    return {"embed": decoder.embed_tokens, "layers": list(layers), "norm": decoder.norm, "lm_head": lm_head,
            "head_dim": int(head_dim or 0), "config": config}


def _names(block: Any, spellings: tuple[tuple[str, ...], ...]) -> tuple[str, ...]:
    """The spelling of ``block``'s input linears that it has (the separate ones, else the fused one)."""
    return next((names for names in spellings if all(hasattr(block, n) for n in names)), spellings[0])


def _readers(block: Any, spellings: tuple[tuple[str, ...], ...]) -> list[Any]:
    return [getattr(block, n) for n in _names(block, spellings)]


def qkv_rows(config: Any, head_dim: int | None = None) -> tuple[slice, slice, slice]:
    """The query, key and value rows of a fused qkv_proj (phi3's layout: the queries, then the keys, then
    the values, num_key_value_heads x head_dim each for the last two)."""
    heads = config.num_attention_heads
    d = head_dim or getattr(config, "head_dim", None) or config.hidden_size // heads
    q, kv = heads * d, (getattr(config, "num_key_value_heads", None) or heads) * d
    return slice(0, q), slice(q, q + kv), slice(q + kv, q + 2 * kv)


def _values(attn: Any, config: Any, head_dim: int) -> tuple[Any, slice]:
    """The linear whose output rows are the values, and which rows: v_proj's all, or qkv_proj's last."""
    if hasattr(attn, "v_proj"):
        return attn.v_proj, slice(None)
    return attn.qkv_proj, qkv_rows(config, head_dim)[2]


def _check_norm(norm: Any, name: str, arch: str) -> None:
    """An RMSNorm with a weight vector and no bias: y = w * x / rms(x)."""
    weight = getattr(norm, "weight", None)
    if not type(norm).__name__.endswith("RMSNorm") or weight is None or getattr(norm, "bias", None) is not None:
        raise InvalidRequest(f"cannot rotate {arch}: {name} is {type(norm).__name__}, not an RMSNorm with a weight "
                             "and no bias")


def _untie(model: Any, parts: dict[str, Any]) -> bool:
    """Give lm_head its own copy of a tied embedding: the embedding is rotated on its output side (E Q)
    and the lm_head on its input side after the final norm is folded into it, so they stop being equal.
    The config and transformers' tied-key map are updated so that saving writes both and loading keeps
    them apart. Returns whether anything was tied."""
    import torch

    embed, lm_head = parts["embed"].weight, parts["lm_head"].weight
    shared = lm_head is embed or lm_head.data_ptr() == embed.data_ptr()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) or shared
    if shared:
        parts["lm_head"].weight = torch.nn.Parameter(embed.detach().clone(), requires_grad=embed.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers >= 5 ties from this map, not the config
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return tied


def _fuse_norms(parts: dict[str, Any]) -> None:
    """W (w * x_hat) = (W diag(w)) x_hat: each norm's scale moves into the columns of the layers that
    read it, and the norm keeps only x / rms(x), which a rotation of x does not change."""
    for layer in parts["layers"]:
        _fold(layer.input_layernorm, _readers(layer.self_attn, _READ_ATTN))
        _fold(layer.post_attention_layernorm, _readers(layer.mlp, _READ_MLP))
    _fold(parts["norm"], [parts["lm_head"]])


def _fold(norm: Any, readers: list[Any]) -> None:
    scale = norm.weight.detach().double()
    for linear in readers:
        linear.weight.copy_((linear.weight.double() * scale[None, :]).to(linear.weight.dtype))
    norm.weight.fill_(1.0)


# -- the rotations ----------------------------------------------------------------------------------

def _rotate_residual(parts: dict[str, Any], q: Any) -> None:
    """R1 on the residual stream (a row vector x becomes x Q): the embedding's rows E Q, the readers'
    weights W Q (W is [out, in]), the writers' weights and biases Q^T W and Q^T b."""
    _right(parts["embed"].weight, q)
    for layer in parts["layers"]:
        for linear in [*_readers(layer.self_attn, _READ_ATTN), *_readers(layer.mlp, _READ_MLP)]:
            _right(linear.weight, q)
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            _left(linear.weight, q)
            if linear.bias is not None:
                linear.bias.copy_((q.T @ linear.bias.double()).to(linear.bias.dtype))
    _right(parts["lm_head"].weight, q)


def _rotate_heads(parts: dict[str, Any], h: Any) -> None:
    """R2 inside attention: each value head's outputs v_h become H^T v_h (v_proj's rows and bias per kv
    head), and o_proj's columns of every query head become W_o,h H, so W_o,h H H^T v_h = W_o,h v_h. One
    H for all heads makes grouped-query attention exact: a kv head and each query head reading it agree."""
    d = h.shape[0]
    for layer in parts["layers"]:
        (v, rows), o = _values(layer.self_attn, parts["config"], d), layer.self_attn.o_proj
        values = v.weight[rows]
        w = values.double().reshape(-1, d, values.shape[1])  # [kv heads, head_dim, hidden]
        v.weight[rows] = (h.T @ w).reshape(values.shape).to(v.weight.dtype)
        if v.bias is not None:
            v.bias[rows] = (v.bias[rows].double().reshape(-1, d) @ h).reshape(-1).to(v.bias.dtype)
        w = o.weight.double().reshape(o.weight.shape[0], -1, d)  # [hidden, heads, head_dim]
        o.weight.copy_((w @ h).reshape(o.weight.shape).to(o.weight.dtype))


def _right(w: Any, q: Any) -> None:
    """w <- w Q in place, computed in float64 a block of rows at a time."""
    for start in range(0, w.shape[0], _CHUNK):
        block = w[start:start + _CHUNK]
        block.copy_((block.double() @ q).to(w.dtype))


def _left(w: Any, q: Any) -> None:
    """w <- Q^T w in place, computed in float64 a block of columns at a time."""
    for start in range(0, w.shape[1], _CHUNK):
        block = w[:, start:start + _CHUNK]
        block.copy_((q.T @ block.double()).to(w.dtype))


def orthogonal(n: int, seed: int, mode: Literal["hadamard", "random"] = "hadamard") -> tuple[Any, str]:
    """An n x n orthogonal matrix (torch float64) and what it is. ``hadamard``: H diag(s) / sqrt(n) with
    random signs s from ``seed``, where ``hadamard(n)`` can build H; otherwise (and for ``random``) the Q of
    a seeded Gaussian's QR, its columns' signs set by R's diagonal so that it is uniformly distributed."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    h = hadamard(n) if mode == "hadamard" else None
    if h is not None:
        signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.float64) * 2 - 1
        return torch.from_numpy(h).double() * signs[None, :] / math.sqrt(n), "hadamard"
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :], "random"


def hadamard(n: int) -> Any:
    """A Hadamard matrix of order n (numpy int8, H H^T = n I), or None where none is built here:
    Sylvester's for n a power of 2, else H_(2^k) kron a Paley matrix of order m = n / 2^k (m = p + 1
    for a prime p = 3 mod 4, or 2 (p + 1) for a prime p = 1 mod 4), the smallest such m. That covers
    the usual hidden sizes that are not powers of 2 (576 = 16 x 36, 896 = 32 x 28, 960 = 16 x 60,
    1536 = 128 x 12, 3584 = 128 x 28, 5120 = 256 x 20), for which QuaRot ships hard-coded matrices."""
    import numpy as np

    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # the power of 2 in n
    for a in range(k, -1, -1):
        m = n >> a
        if m > _MAX_PALEY:
            break
        base = np.ones((1, 1), dtype=np.int8) if m == 1 else _paley(m)
        # kron of two Hadamard matrices is one: checking the base (exactly, in float64) checks the whole
        if base is not None and np.array_equal(base.astype(np.float64) @ base.T.astype(np.float64), m * np.eye(m)):
            return np.kron(_sylvester(1 << a), base).astype(np.int8)
    return None


def _sylvester(n: int) -> Any:
    import numpy as np

    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley(m: int) -> Any:
    """Paley's construction I (order p + 1, p prime = 3 mod 4) or II (order 2 (p + 1), p prime = 1 mod
    4), from the Jacobsthal matrix Q[i, j] = chi(j - i) of the quadratic residues mod p; None otherwise."""
    import numpy as np

    if m % 4:
        return None
    if _prime(m - 1) and (m - 1) % 4 == 3:
        p, second = m - 1, False
    elif _prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        p, second = m // 2 - 1, True
    else:
        return None
    squares = {x * x % p for x in range(1, p)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, p)], dtype=np.int64)
    idx = np.arange(p)
    jac = chi[(idx[None, :] - idx[:, None]) % p]
    c = np.zeros((p + 1, p + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1 if second else -1
    c[1:, 1:] = jac
    if not second:  # Q antisymmetric: H = I + C
        return (np.eye(p + 1, dtype=np.int64) + c).astype(np.int8)
    # Q symmetric: each 0 of C becomes [[1, -1], [-1, -1]], each +-1 becomes +-[[1, 1], [1, -1]]
    h = np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(np.eye(p + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]]))
    return h.astype(np.int8)


def _prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))
