"""What Grove supports, as data: every per-architecture fact, by Hugging Face ``model_type``.

Nothing registers itself on import and no other module keeps a table by architecture: adding one
is one entry here plus a tiny model in ``tests/tiny_models.py`` that proves it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from grove.errors import UnsupportedArchitecture

if TYPE_CHECKING:
    from grove.artifacts import Source

__all__ = ["ARCHITECTURES", "GRAPH", "ArchSpec", "arch_spec", "encoder_spec", "from_gguf", "keeps_dense", "source_spec",
           "torch_spec"]

_NO_SEGMENTS = ("input_ids", "attention_mask")


@dataclass(frozen=True)
class ArchSpec:
    # decoder: onnxruntime-genai's model builder; encoder: torch.onnx export; graph: an ONNX graph given as such
    path: Literal["decoder", "encoder", "graph"]
    gguf: bool = False  # transformers can load this architecture from a GGUF file
    gguf_name: str | None = None  # a GGUF file's general.architecture, where it is not the model_type
    # Decoders only: the text decoder of an image-text checkpoint. The builder exports the language model
    # (a text-in, text-out graph genai runs as "<type>_text"); the vision tower is not exported, and the
    # PyTorch-side work (GPTQ, RTN, QuaRot, mixed precision, fine-tuning) is refused by name (torch_spec).
    multimodal: bool = False
    # Decoders only: what writes the graph. "builder": onnxruntime-genai's model builder; "mobius": mobius
    # (tasks/_mobius.py), for what the builder cannot export; it writes fp32 / fp16, quantized on the graph.
    exporter: Literal["builder", "mobius"] = "builder"
    # Decoders only: the builder's own int4 is the only one (the default whatever the device): a mixture of
    # experts, whose expert weights the builder writes into its MoE ops, which the graph quantizers leave in float.
    builder_int4: bool = False
    # Encoders only:
    inputs: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids")  # the graph's inputs
    own_mask: bool = False  # builds its attention mask from the 0 / 1 padding mask itself (see capture_encoder)
    positions_after_padding: bool = False  # position ids start at pad_token_id + 1 (fewer usable positions)
    prefix_space: bool = False  # a BPE tokenizer that needs add_prefix_space for words given one by one
    ort_optimizer: str | None = None  # onnxruntime.transformers' optimizer model_type for the graph


def _encoder(**facts: object) -> ArchSpec:
    return ArchSpec("encoder", ort_optimizer="bert", **facts)  # type: ignore[arg-type]  # all share BERT's graph


# The RoBERTa family: no segment embeddings, positions after the padding id, a byte-level BPE tokenizer.
_ROBERTA = dict(inputs=_NO_SEGMENTS, positions_after_padding=True, prefix_space=True)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("decoder", gguf=True),
    "mistral": ArchSpec("decoder", gguf=True),
    "qwen2": ArchSpec("decoder", gguf=True),
    "qwen3": ArchSpec("decoder", gguf=True),
    "phi3": ArchSpec("decoder", gguf=True),
    "gemma": ArchSpec("decoder"),
    "gemma2": ArchSpec("decoder", gguf=True),
    "gemma3_text": ArchSpec("decoder", gguf=True, gguf_name="gemma3"),
    "smollm3": ArchSpec("decoder"),
    "granite": ArchSpec("decoder"),
    "phi": ArchSpec("decoder"),  # LayerNorm decoders: the builder's epsilon (and OLMo's norm) set right in capture
    "nemotron": ArchSpec("decoder"),
    "olmo": ArchSpec("decoder"),
    "olmo2": ArchSpec("decoder"),  # norms after each block, whole-projection query/key norms (_builder_olmo2)
    "olmo3": ArchSpec("decoder"),  # OLMo 2's layers, sliding-window layers, YaRN on the full layers only
    "ernie4_5": ArchSpec("decoder"),
    "hunyuan_v1_dense": ArchSpec("decoder"),
    "lfm2": ArchSpec("decoder"),  # hybrid: short convolution layers and attention layers
    "gemma3": ArchSpec("decoder", multimodal=True),  # Gemma 3 4B-27B, TranslateGemma
    "mistral3": ArchSpec("decoder", multimodal=True),  # Ministral 3, Mistral Small 3.1+
    "qwen2_5_vl": ArchSpec("decoder", multimodal=True),  # Qwen2.5-VL, Fara: MRoPE, equal sections for text
    "qwen3_vl": ArchSpec("decoder", multimodal=True),
    "qwen3_5": ArchSpec("decoder", multimodal=True),  # hybrid: gated linear-attention and full-attention layers
    "qwen3_5_moe": ArchSpec("decoder", multimodal=True, builder_int4=True),  # Qwen3.5-35B-A3B: experts in QMoE ops
    # Gemma 4 (E2B, E4B, 31B; its 26B-A4B MoE is refused): per-layer inputs, KV shared across layers, full
    # layers with their own head size
    "gemma4": ArchSpec("decoder", multimodal=True, exporter="mobius"),
    "gemma4_text": ArchSpec("decoder", exporter="mobius"),  # Gemma 4's text model saved alone (Gemma4ForCausalLM)
    "bert": _encoder(),
    "electra": _encoder(),
    "roberta": _encoder(**_ROBERTA),
    "xlm-roberta": _encoder(**_ROBERTA),
    "camembert": _encoder(**_ROBERTA),
    "mpnet": _encoder(inputs=_NO_SEGMENTS, positions_after_padding=True),
    "distilbert": _encoder(inputs=_NO_SEGMENTS),
    # DeBERTa v2 and v3 (v3 has no token types: type_vocab_size 0). DeBERTa and ModernBERT build their mask
    # from the 0 / 1 padding mask: given the additive one, DeBERTa's padded rows turn NaN (it also zeroes
    # padded embeddings with the mask) and ModernBERT skips its sliding window (rows past 64 tokens drift).
    "deberta-v2": _encoder(inputs=_NO_SEGMENTS, own_mask=True),
    "modernbert": _encoder(inputs=_NO_SEGMENTS, own_mask=True),
}


# MatMuls (by the node names the model builder gives them) that the builder keeps in float at every
# precision (its exclude_node_from_quantization), and Grove's int4 quantizers too: Qwen3.5's
# linear-attention gates, whose outputs feed an exponential (the state's decay) and a sigmoid (beta).
_DENSE_MATMULS = re.compile(r"/linear_attn/[ab]_proj/MatMul$")


def keeps_dense(node_name: str) -> bool:
    """Whether the MatMul named ``node_name`` keeps its float weights whatever the precision."""
    return _DENSE_MATMULS.search(node_name) is not None


# An ONNX graph given as the model (-m model.onnx): no architecture to know, the graph path serves it.
GRAPH = ArchSpec("graph")


def from_gguf(architecture: str) -> str:
    """The model_type of a GGUF file's ``general.architecture``."""
    return next((m for m, s in ARCHITECTURES.items() if s.gguf_name == architecture), architecture)


def encoder_spec(model_type: str | None) -> ArchSpec | None:
    """The spec of an encoder architecture, or None for anything else (a decoder, an unknown one)."""
    spec = ARCHITECTURES.get(str(model_type))
    return spec if spec is not None and spec.path == "encoder" else None


def arch_spec(model_type: str) -> ArchSpec:
    """The spec for ``model_type``; raises UnsupportedArchitecture listing what is supported."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(model_type, sorted(ARCHITECTURES))
    return spec


def torch_spec(model: str | Path, work: str) -> ArchSpec:
    """The spec for ``model`` (a model_type, or an HF folder) where ``work`` (e.g. "GPTQ") loads the
    checkpoint in PyTorch as a causal LM: the text decoder of a multimodal checkpoint, and what mobius exports
    (which reads no quantize-torch checkpoint, and which Grove's PyTorch-side passes are not tested on), are
    refused by name, with what does run."""
    model_type = model if isinstance(model, str) else json.loads((model / "config.json").read_text())["model_type"]
    spec = arch_spec(model_type)
    torch_side = sorted(m for m, s in ARCHITECTURES.items()
                        if s.path == "decoder" and not s.multimodal and s.exporter == "builder")
    if spec.exporter == "mobius" and not spec.multimodal:
        raise UnsupportedArchitecture(
            model_type, torch_side, path=work,
            fix=f"A {model_type} checkpoint is exported with mobius (auto-opt's default int4, --int4_algorithm "
                "affine / hqq / rtn / k_quant, fp16, fp32), and Grove's PyTorch-side passes do not take it; drop the "
                "PyTorch-side pass.")
    if spec.multimodal:
        builder = spec.exporter == "builder"
        int4 = ("the builder's own int4, its default" if spec.builder_int4 else
                f"auto-opt's default int4, --int4_algorithm affine / hqq / rtn / k_quant{' / builder' * builder}")
        raise UnsupportedArchitecture(
            model_type, torch_side, path=work,
            fix=f"A {model_type} checkpoint is image-text: Grove exports its text decoder with the "
                f"{'model builder' if builder else 'mobius exporter'} ({int4}, fp16, fp32), but loads no "
                "multimodal checkpoint in PyTorch; drop the PyTorch-side pass, or start from a text-only model.")
    return spec


def source_spec(source: Source) -> ArchSpec:
    """The spec for a resolved source's architecture; a GGUF file's must also be one transformers
    dequantizes. Raises UnsupportedArchitecture listing what is supported."""
    if source.kind == "onnx":
        return GRAPH
    model_type = source.model_type
    spec = arch_spec(model_type)
    if source.kind == "gguf" and not spec.gguf:
        raise UnsupportedArchitecture(model_type, sorted(m for m, s in ARCHITECTURES.items() if s.gguf), path="GGUF",
                                      fix=f"transformers cannot read a {model_type} GGUF; pass the model's Hugging "
                                          "Face folder or hub id (safetensors weights) instead.")
    return spec
