"""The capture of the architectures onnxruntime-genai 0.18's model builder cannot export, with mobius
(``mobius-onnx``, the onnxruntime organisation's exporter, which Olive's MobiusBuilder pass runs).

Gemma 4 is the one Grove takes this way. The builder reads its 26B MoE class for every Gemma 4
checkpoint, has no per-layer inputs (E2B / E4B) and no shared KV layers. mobius has all three, and
writes the ``gemma4_text`` graph genai runs: text in, text out, one ``model.onnx`` that Grove's graph
quantizers, evaluation and package take as they take the builder's. The vision and audio towers are
not exported, as for the other image-text checkpoints (tasks/capture_onnx.py).

Two things are adapted, both only for the run:
- transformers 5.24 keeps Gemma 4's full-attention head size and KV heads per layer
  (``per_layer_config``) and refuses a global read; mobius 0.1 reads them as the checkpoint's own
  ``global_head_dim`` / ``num_global_key_value_heads``, which is what the config is given back.
- mobius builds a text-only graph from a text config: it reads a folder whose config.json is the
  checkpoint's text_config (the top-level ``tie_word_embeddings`` carried in, as transformers ties by
  it) and whose other files are hard links to the checkpoint's (mobius refuses symbolic links).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grove.errors import InvalidRequest, MissingExtra, ModelSourceError
from grove.node import node_logger

__all__ = ["TEXT_TYPES", "context_length", "mobius_api", "refuse_moe", "run_mobius"]

# An image-text model_type -> the text-only one mobius and genai know its language model by.
TEXT_TYPES = {"gemma4": "gemma4_text"}
_DTYPES = {"fp32": "f32", "fp16": "f16"}
_MOBIUS = threading.Lock()  # the AutoConfig wrapper is process-wide while it is in place


def run_mobius(hf_dir: Path, hf_config: dict[str, Any], out: Path, precision: str, execution_provider: str,
               options: list[str]) -> str:
    """mobius on ``hf_dir`` (``hf_config``: its config.json): ``model.onnx`` + ``model.onnx.data`` +
    ``genai_config.json`` + tokenizer files in ``out``; returns the checkpoint's model type."""
    model_type = str(hf_config.get("model_type", ""))
    if precision not in _DTYPES:
        raise InvalidRequest(f"{model_type} is exported with mobius, which writes fp32 or fp16 weights, not "
                             f"{precision}: its int4 is a graph quantizer's (--int4_algorithm affine, the CPU default, "
                             "hqq, rtn or k_quant), on the fp32 or fp16 graph")
    if options:
        raise InvalidRequest(f"{model_type} is exported with mobius, which has none of the builder's options "
                             f"({', '.join(o.split('=')[0] for o in options)}); drop them for this model")
    if model_type in TEXT_TYPES:
        node_logger().info("%s is an image-text checkpoint: its text decoder is exported (text in, text out); its "
                           "vision and audio towers are not", model_type)
    with (tempfile.TemporaryDirectory(prefix="grove-mobius-", dir=out.parent) as scratch,
          mobius_api(model_type) as (build, write_ort_genai_config)):
        source = _text_folder(hf_dir, hf_config, Path(scratch) / "model")
        text = json.loads((source / "config.json").read_text())
        package = build(str(source), dtype=_DTYPES[precision], execution_provider=execution_provider,
                        load_weights=True)
        if list(package) != ["model"]:
            raise ValueError(f"mobius built the components {list(package)}, not one text decoder")
        package.save(str(out))
        write_ort_genai_config(package, str(out), ep=execution_provider, local_config_dir=str(source),
                               context_length=context_length(text))
    return model_type


@contextlib.contextmanager
def mobius_api(model_type: str) -> Iterator[tuple[Any, Any]]:
    """mobius's ``build`` and ``write_ort_genai_config``, used inside: Gemma 4's configs read as mobius reads
    them, its chatter kept off the terminal (logged at debug level), and its failures one ModelSourceError
    naming the model."""
    try:
        from mobius import build
        from mobius.integrations.ort_genai import write_ort_genai_config
    except ImportError as exc:
        raise MissingExtra("mobius-onnx", "reinstall Grove (scripts/setup.sh), which installs it") from exc
    chatter = io.StringIO()
    try:
        with _legacy_gemma4_config(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            yield build, write_ort_genai_config
    except (ValueError, NotImplementedError, KeyError, AttributeError) as exc:
        raise ModelSourceError(f"mobius cannot export this {model_type} model "
                               f"({exc.__class__.__name__}: {exc})") from exc
    finally:
        logging.getLogger("grove.mobius").debug(chatter.getvalue()[-4000:])


def refuse_moe(config: dict[str, Any]) -> None:
    """Gemma 4's mixture of experts (26B-A4B), which mobius 0.1 exports wrong, refused by name."""
    if (config.get("text_config") or config).get("enable_moe_block"):
        raise ModelSourceError(f"this {config.get('model_type')} model is a mixture of experts (Gemma 4 26B-A4B), "
                               "which mobius 0.1 does not export right (a tiny one's logits 0.59 off PyTorch's): not "
                               "served; Gemma 4 E2B, E4B and 31B are")


def context_length(config: dict[str, Any]) -> int:
    """The context genai's config gets: the (text) config's max_position_embeddings, else 4096."""
    return int((config.get("text_config") or config).get("max_position_embeddings") or 4096)


def _text_folder(hf_dir: Path, config: dict[str, Any], folder: Path) -> Path:
    """``hf_dir`` as mobius reads a text model: the checkpoint itself when it is one, else a folder of hard
    links (copies across file systems) whose config.json is the text_config."""
    model_type = config.get("model_type")
    refuse_moe(config)
    if model_type not in TEXT_TYPES:
        return hf_dir
    text = {**config["text_config"], "model_type": TEXT_TYPES[model_type],
            "tie_word_embeddings": config.get("tie_word_embeddings", True)}
    folder.mkdir(parents=True)
    for f in hf_dir.iterdir():
        if f.is_file() and f.name != "config.json":
            try:
                os.link(f.resolve(), folder / f.name)
            except OSError:
                shutil.copyfile(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(text))
    return folder


@contextlib.contextmanager
def _legacy_gemma4_config() -> Iterator[None]:
    """While mobius runs, a Gemma 4 config reads as the checkpoint wrote it: the full-attention layers' head
    size and KV heads as ``global_head_dim`` / ``num_global_key_value_heads`` (transformers 5.24 keeps them
    per layer), the sliding layers' as the global ``head_dim``. Other configs pass through as they are."""
    import transformers

    with _MOBIUS:
        shipped = transformers.AutoConfig.from_pretrained

        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            config = shipped(*args, **kwargs)
            for part in (config, getattr(config, "text_config", None)):
                if part is not None and getattr(part, "model_type", "") == "gemma4_text":
                    _global_fields(part)
            return config

        transformers.AutoConfig.from_pretrained = from_pretrained  # type: ignore[method-assign]
        chatty = logging.getLogger("transformers")  # its warning on each global read, which is the point here
        level = chatty.level
        chatty.setLevel(logging.ERROR)
        try:
            yield
        finally:
            transformers.AutoConfig.from_pretrained = shipped  # type: ignore[method-assign]
            chatty.setLevel(level)


def _global_fields(text: Any) -> None:
    if not getattr(text, "is_heterogeneous", False):
        return
    text.allow_global_per_layer_attribute_access = True
    full = [i for i, kind in enumerate(text.layer_types) if kind == "full_attention"]
    if full:
        layer = text.per_layer_config[full[0]]
        text.__dict__["global_head_dim"] = layer.head_dim
        if getattr(text, "attention_k_eq_v", False):
            text.__dict__["num_global_key_value_heads"] = layer.num_key_value_heads
