"""What Grove supports, as data: architectures by Hugging Face ``model_type``.

Nothing registers itself on import; adding an architecture is one line here plus a tiny
model in ``tests/tiny_models.py`` that proves it (an encoder also names its graph inputs in
``capture_encoder._INPUTS`` and its onnxruntime optimizer type in ``optimize_graph._ORT_MODEL_TYPE``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from grove.errors import UnsupportedArchitecture

if TYPE_CHECKING:
    from grove.artifacts import Source

__all__ = ["ARCHITECTURES", "ArchSpec", "arch_spec", "source_spec"]


@dataclass(frozen=True)
class ArchSpec:
    path: str  # "decoder": onnxruntime-genai model builder; "encoder": torch.onnx export
    gguf: bool = False  # transformers can load this architecture from a GGUF file


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("decoder", gguf=True),
    "mistral": ArchSpec("decoder", gguf=True),
    "qwen2": ArchSpec("decoder", gguf=True),
    "qwen3": ArchSpec("decoder", gguf=True),
    "phi3": ArchSpec("decoder", gguf=True),
    "gemma": ArchSpec("decoder"),
    "gemma2": ArchSpec("decoder", gguf=True),
    "gemma3_text": ArchSpec("decoder", gguf=True),
    "smollm3": ArchSpec("decoder"),
    "granite": ArchSpec("decoder"),
    "phi": ArchSpec("decoder"),  # LayerNorm decoders: the builder's epsilon (and OLMo's norm) set right in capture
    "nemotron": ArchSpec("decoder"),
    "olmo": ArchSpec("decoder"),
    "ernie4_5": ArchSpec("decoder"),
    "hunyuan_v1_dense": ArchSpec("decoder"),
    "lfm2": ArchSpec("decoder"),  # hybrid: short convolution layers and attention layers
    "bert": ArchSpec("encoder"),
    "electra": ArchSpec("encoder"),
    "roberta": ArchSpec("encoder"),
    "xlm-roberta": ArchSpec("encoder"),
    "camembert": ArchSpec("encoder"),
    "mpnet": ArchSpec("encoder"),
    "distilbert": ArchSpec("encoder"),
    "deberta-v2": ArchSpec("encoder"),  # DeBERTa v2 and v3
    "modernbert": ArchSpec("encoder"),
}


def arch_spec(model_type: str) -> ArchSpec:
    """The spec for ``model_type``; raises UnsupportedArchitecture listing what is supported."""
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitecture(model_type, sorted(ARCHITECTURES))
    return spec


def source_spec(source: Source) -> ArchSpec:
    """The spec for a resolved source's architecture; a GGUF file's must also be one transformers
    dequantizes. Raises UnsupportedArchitecture listing what is supported."""
    model_type = source.model_type
    spec = arch_spec(model_type)
    if source.kind == "gguf" and not spec.gguf:
        raise UnsupportedArchitecture(model_type, sorted(m for m, s in ARCHITECTURES.items() if s.gguf), path="GGUF",
                                      fix=f"transformers cannot read a {model_type} GGUF; pass the model's Hugging "
                                          "Face folder or hub id (safetensors weights) instead.")
    return spec
