"""Node ``capture-onnx`` for decoder LLMs: onnxruntime-genai's model builder turns a Hugging
Face folder into ``model.onnx`` + ``model.onnx.data`` + ``genai_config.json`` + tokenizer
files, the layout onnxruntime-genai loads (what Olive's ModelBuilder pass produces)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import Field, model_validator

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest, ModelSourceError
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks._builder_olmo2 import OLMO2_TYPES, olmo2_model, split_rope_caches
from grove.tasks._mobius import run_mobius
from grove.tasks.architectures import arch_spec

__all__ = ["CaptureConfig", "capture_onnx", "run_builder"]

BuilderPrecision = Literal["fp32", "fp16", "int8", "int4"]
BuilderProvider = Literal["cpu", "cuda", "dml"]


class CaptureConfig(StepConfig):
    NODE = "capture-onnx"
    VERSION = 1
    precision: BuilderPrecision = Field("fp32", description="weight precision the builder writes")
    execution_provider: BuilderProvider = Field("cpu", description="provider the graph is built for")
    block_size: Literal[16, 32, 64, 128, 256] | None = Field(None, description="precision int4 (the builder "
                                                             "quantizes): weights per block; None: the builder's 32")
    accuracy_level: Literal[0, 1, 2, 3, 4] | None = Field(None, description="int4 MatMulNBits compute type the "
                                                          "builder writes; None: its default (4 on cpu)")
    include_hidden_states: bool = Field(False, description="also output the last hidden states (the final norm's "
                                        "output), as embedding models built as decoders read them")
    prune_lm_head: bool = Field(False, description="the logits of the last position only (the builder's "
                                "prune_lm_head): a prefill skips the lm_head for the prompt's other tokens")
    head_shortlist: int = Field(0, ge=0, le=1024, description="a quantize-torch checkpoint's 8-bit lm_head: a "
                                "4-bit copy scores the vocabulary and this many best tokens get their logits from "
                                "the 8-bit rows (quantize-int4's head_shortlist); 0 = the whole 8-bit head")
    embedding_int8: bool = Field(False, description="precision int4 (the builder quantizes): the embedding as "
                                 "8-bit blocks of 32 (GatherBlockQuantized, re-rounded from the checkpoint's "
                                 "float table), which a tied lm_head reads too as an 8-bit MatMulNBits (Olive's "
                                 "QuantizeEmbeddingInt8 and ShareEmbeddingLmHead surgeries)")

    def recipe(self) -> dict[str, object]:
        recipe = super().recipe()
        for key in ("head_shortlist", "embedding_int8"):
            if not recipe[key]:  # at the default: as the recipes written before it
                del recipe[key]
        for key in ("block_size", "include_hidden_states", "accuracy_level", "prune_lm_head"):
            if recipe[key] is None or recipe[key] is False:  # at the default: as the recipes written before it
                del recipe[key]
        return recipe

    @model_validator(mode="after")
    def _check(self) -> CaptureConfig:
        if self.embedding_int8 and self.precision != "int4":
            raise ValueError(f"embedding_int8 applies to precision int4 (the builder's), not {self.precision}")
        return self

    @classmethod
    def cpu(cls) -> CaptureConfig:
        return cls(precision="fp32", execution_provider="cpu")

    @classmethod
    def cuda(cls) -> CaptureConfig:
        return cls(precision="fp16", execution_provider="cuda")


@task(name="capture-onnx", cache_policy=RECIPE_CACHE)
def capture_onnx(model: Artifact, config: CaptureConfig) -> Artifact:
    """HF folder artifact -> genai model folder artifact."""
    return run_node(config, [model], model.store, _capture)


def _capture(inputs: list[Path], config: CaptureConfig, out: Path) -> dict[str, object]:
    (hf_dir,) = inputs
    if config.embedding_int8 and _quantized(hf_dir):
        raise InvalidRequest("embedding_int8 re-rounds the builder's int4 embedding; this checkpoint was quantized "
                             "before the capture (quantize-torch), whose head_bits set its tables")
    options = [f"block_size={config.block_size}"] if config.block_size else []
    options += _prequantized_options(hf_dir) + (["include_hidden_states=true"] if config.include_hidden_states
                                                 else []) + (["prune_lm_head=true"] if config.prune_lm_head else [])
    if config.accuracy_level is not None:
        options.append(f"accuracy_level={config.accuracy_level}")
    model_type = run_builder(hf_dir, out, config.precision, config.execution_provider, options)
    if config.embedding_int8:
        _table_int8(out / "model.onnx", hf_dir)
    if _prequantized_options(hf_dir):
        _gather_scales_as_rows(out / "model.onnx")
    elif _untied_quantized(hf_dir):
        _embedding_8bit(out / "model.onnx")
    if _quantized(hf_dir):  # a symmetric checkpoint's zero points dropped (the kernel's faster path); the shortlist
        from grove.tasks._int4_grids import rewrite_quantized

        rewrite_quantized(out / "model.onnx", config.head_shortlist)
    node_logger().info("captured %s at %s for %s", model_type, config.precision, config.execution_provider)
    return {"model_type": model_type, "precision": config.precision, "nodes": _node_count(out / "model.onnx")}


def run_builder(hf_dir: Path, out: Path, precision: str, execution_provider: str, options: list[str]) -> str:
    """The onnxruntime-genai model builder on ``hf_dir`` with its ``extra_options`` (``key=value``), its
    chatter kept for the debug log, the chat template copied; returns the model type. An architecture
    Grove does not support, or one the builder cannot export, is one error. The architectures the builder
    cannot export go to mobius (tasks/_mobius.py) instead."""
    from onnxruntime_genai.models import builder

    hf_config = json.loads((hf_dir / "config.json").read_text())
    model_type = hf_config.get("model_type", "")
    spec = arch_spec(model_type)  # raises UnsupportedArchitecture with the supported list
    if spec.exporter == "mobius":  # it copies the tokenizer files and chat template itself
        return run_mobius(hf_dir, hf_config, out, precision, execution_provider, options)
    if spec.multimodal:
        node_logger().info("%s is an image-text checkpoint: its text decoder is exported (text in, text out); "
                           "its vision tower is not", model_type)
    chatter = io.StringIO()
    # The builder prints progress to stdout; keep it for the log instead of the terminal.
    with (_builder_adapted(builder), tempfile.TemporaryDirectory(prefix="grove-builder-") as cache,
          _text_tie_for_builder(hf_dir, hf_config, Path(cache)) as source,
          contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter)):
        try:
            extra = builder.parse_extra_options(None, str(source), str(out), precision, execution_provider,
                                                str(cache), options)
            builder.create_model(None, str(source), str(out), precision, execution_provider, str(cache), **extra)
        except (ValueError, NotImplementedError, KeyError) as exc:
            raise ModelSourceError(f"the onnxruntime-genai model builder cannot export this {model_type} model "
                                   f"({exc.__class__.__name__}: {exc})") from exc
    logging.getLogger("grove.builder").debug(chatter.getvalue()[-4000:])
    _copy_chat_template(hf_dir, out)
    _keep_tokenizer_class(hf_dir, out)
    _llama4_scaled_context(hf_config, out)
    return str(model_type)


def _prequantized_options(hf_dir: Path) -> list[str]:
    """A checkpoint quantize-torch wrote (Olive's format) for a model whose embedding is its lm_head:
    the embedding reads the lm_head's quantized rows (GatherBlockQuantized), as Olive's
    TieWordEmbeddings surgery makes it, instead of a float copy of the table (SmolLM2: 113 MB)."""
    config = json.loads((hf_dir / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "olive" or not quant.get("lm_head") or not config.get("tie_word_embeddings"):
        return []
    return ["shared_embeddings=true", "int4_op_types_to_quantize=MatMul/Gather"]


def _untied_quantized(hf_dir: Path) -> bool:
    """A checkpoint quantize-torch wrote whose embedding is not its lm_head (a model with its own head, or
    one QuaRot's rotation untied): the builder leaves that table in fp32 (its GatherBlockQuantized takes
    4 bits only), the largest tensor of a small model."""
    config = json.loads((hf_dir / "config.json").read_text())
    quant = config.get("quantization_config") or {}
    return quant.get("quant_method") == "olive" and not config.get("tie_word_embeddings")


def _quantized(hf_dir: Path) -> bool:
    """A checkpoint quantize-torch wrote (Olive's format)."""
    config = json.loads((hf_dir / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "olive"


_EMBED_BLOCK = 32


def _embedding_8bit(path: Path) -> None:
    """The embedding's fp32 Gather as an 8-bit GatherBlockQuantized: rows rounded to nearest in blocks of
    32 (asymmetric, as the lm_head's 8 bits), a quarter of the bytes; the rows the graph reads are those
    of Olive's Rtn pass with ``embeds`` at 8 bits."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from grove.tasks._int4_grids import save_in_place

    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for index, node in enumerate(graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or table.data_type != onnx.TensorProto.FLOAT or len(table.dims) != 2 \
                or table.dims[1] % _EMBED_BLOCK:
            continue
        w = numpy_helper.to_array(table).astype(np.float32)
        blocks = w.reshape(w.shape[0], -1, _EMBED_BLOCK)
        low, high = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)  # the range holds 0
        scale = np.where(high > low, (high - low) / 255, 1).astype(np.float32)
        zero = np.clip(np.round(-low / scale), 0, 255)
        q = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, 255).astype(np.uint8)
        names = [f"{table.name}_q8", f"{table.name}_q8_scales", f"{table.name}_q8_zeros"]
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(q.reshape(w.shape), names[0]),
                                  numpy_helper.from_array(scale, names[1]),
                                  numpy_helper.from_array(zero.astype(np.uint8), names[2])])
        graph.node.remove(node)
        graph.node.insert(index, helper.make_node(
            "GatherBlockQuantized", [names[0], node.input[1], names[1], names[2]], list(node.output),
            name=f"{node.name}_q8", domain="com.microsoft", bits=8, block_size=_EMBED_BLOCK, gather_axis=0,
            quantize_axis=1))
        save_in_place(model, path)
        node_logger().info("embedding %s: 8-bit blocks of %d (%.0f MB instead of %.0f)", table.name, _EMBED_BLOCK,
                           q.nbytes / 1e6 + scale.nbytes / 1e6 * 1.25, w.nbytes / 1e6)
        return


def _float_embedding(hf_dir: Path) -> tuple[Any, bool]:
    """The checkpoint's token embedding [vocab, hidden] in fp32, and whether the lm_head is that table
    (tied: no ``lm_head.weight`` of its own, or the config says so)."""
    import numpy as np
    from safetensors import safe_open

    config = json.loads((hf_dir / "config.json").read_text())
    found: dict[str, Path] = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            found.update({key: shard for key in f.keys() if key.endswith("embed_tokens.weight")  # noqa: SIM118
                          or key == "lm_head.weight"})
    tables = sorted(k for k in found if k.endswith("embed_tokens.weight"))
    # the decoder's own table first (a multimodal checkpoint's text model is model.language_model)
    key = next((k for k in ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight") if k in found),
               tables[0] if len(tables) == 1 else None)
    if key is None:
        raise ModelSourceError(f"{hf_dir.name}: {'no' if not tables else 'more than one'} *.embed_tokens.weight "
                               f"in its safetensors files ({', '.join(tables) or 'none'}), so the embedding cannot "
                               "be re-rounded to 8 bits; build without embedding_int8")
    with safe_open(str(found[key]), framework="pt") as f:
        table = f.get_tensor(key).float().numpy().astype(np.float32)
    return table, bool(config.get("tie_word_embeddings")) or "lm_head.weight" not in found


def _table_int8(path: Path, hf_dir: Path) -> None:
    """The builder's int4 graph with an 8-bit embedding table (symmetric blocks of 32, the Q8_0 grid of
    Grove's 8-bit heads) that a tied lm_head reads too, as an 8-bit MatMulNBits: Olive's
    QuantizeEmbeddingInt8 + ShareEmbeddingLmHead. The builder writes a tied model's embedding as its 4-bit
    lm_head's rows (or a float Gather when untied); the rows are re-rounded from the checkpoint's float
    table, not from those 4 bits. An untied lm_head keeps the builder's 4-bit weights (reading the
    embedding's would change its logits)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from grove.tasks._int4_grids import keep_live, quantize_weight, save_in_place

    table, tied = _float_embedding(hf_dir)
    vocab, hidden = table.shape
    if hidden % _EMBED_BLOCK:
        raise ModelSourceError(f"{hf_dir.name}: hidden size {hidden} is not a multiple of {_EMBED_BLOCK}, the "
                               "8-bit table's block; build without embedding_int8")
    model = onnx.load(str(path))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    embed = next((n for n in graph.node if n.name.startswith("/model/embed_tokens/")
                  and n.op_type in ("Gather", "GatherBlockQuantized")), None)
    head = next((n for n in graph.node if n.name.startswith("/lm_head/") and n.op_type == "MatMulNBits"), None)
    if embed is None or (tied and head is None):
        raise ModelSourceError("the builder's graph has no embedding Gather or no lm_head MatMulNBits where "
                               "embedding_int8 expects them; build without embedding_int8")
    # The io dtype (fp16 on GPU): the scales' dtype is GatherBlockQuantized's and MatMulNBits' output dtype.
    io = inits[head.input[2]].data_type if head is not None else inits[embed.input[0]].data_type
    qw = quantize_weight(table.T, _EMBED_BLOCK, bits=8)  # packed [vocab, blocks, 32], scales [vocab, blocks]
    name = "model.embed_tokens.weight_Q8"
    graph.initializer.extend([
        numpy_helper.from_array(qw.packed, name),
        numpy_helper.from_array(qw.scales.astype(helper.tensor_dtype_to_np_dtype(io)), name + "_scales"),
        numpy_helper.from_array(np.array([vocab, hidden], np.int64), name + "_rows_shape")])
    rows = helper.make_node("Reshape", [name, name + "_rows_shape"], [name + "_rows"], name=name + "/Reshape")
    gather = helper.make_node("GatherBlockQuantized", [name + "_rows", embed.input[1], name + "_scales"],
                              list(embed.output), name="/model/embed_tokens/GatherBlockQuantized_Q8",
                              domain="com.microsoft", bits=8, block_size=_EMBED_BLOCK, gather_axis=0, quantize_axis=1)
    replaced = {id(embed): gather}
    if tied and head is not None:
        level = [a.i for a in head.attribute if a.name == "accuracy_level"]
        replaced[id(head)] = helper.make_node(
            "MatMulNBits", [head.input[0], name, name + "_scales"], list(head.output), name="/lm_head/MatMul_Q8",
            domain="com.microsoft", K=hidden, N=vocab, bits=8, block_size=_EMBED_BLOCK,
            **({"accuracy_level": level[0]} if level else {}))
    keep_live(graph, [rows, *(replaced.get(id(node), node) for node in graph.node)])
    save_in_place(model, path)
    size = qw.packed.nbytes + qw.scales.size * (2 if io == onnx.TensorProto.FLOAT16 else 4)
    node_logger().info("embedding: 8-bit blocks of %d (%.0f MB)%s", _EMBED_BLOCK, size / 1e6,
                       ", read by the tied lm_head as an 8-bit MatMulNBits" if tied else
                       "; the untied lm_head keeps the builder's 4-bit weights")


def _gather_scales_as_rows(path: Path) -> None:
    """onnxruntime-genai 0.18's builder hands the embedding's GatherBlockQuantized the quantized
    lm_head's scales and zero points flattened, as MatMulNBits reads them, and onnxruntime refuses the
    graph ("scales must have the same rank as data"); they are reshaped to [rows, -1] in front of it."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    dims = {t.name: list(t.dims) for t in graph.initializer}
    nodes = []
    for node in graph.node:
        if node.op_type == "GatherBlockQuantized" and node.input[0] in producers:
            rows = dims[producers[node.input[0]].input[0]][0]  # the lm_head's qweight: [rows, blocks, bytes]
            shape = f"{node.name}/rows_shape"
            graph.initializer.append(numpy_helper.from_array(np.array([rows, -1], dtype=np.int64), shape))
            for slot in range(2, len(node.input)):
                if node.input[slot] and len(dims.get(node.input[slot], [0, 0])) == 1:
                    reshaped = f"{node.name}/input{slot}_rows"
                    nodes.append(helper.make_node("Reshape", [node.input[slot], shape], [reshaped],
                                                  name=f"{node.name}/Reshape{slot}"))
                    node.input[slot] = reshaped
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(path))


# One builder run at a time in a process: the fixes below replace module globals of the builder while it
# runs (and the builder's own module state is not thread-safe either).
_BUILDER = threading.Lock()


@contextlib.contextmanager
def _builder_adapted(builder: Any) -> Iterator[None]:
    """While the builder (onnxruntime-genai 0.18) runs, let it read what it misreads: a LayerNorm model's
    epsilon (``_norm_eps_for_builder``), transformers 5's Gemma 3 config, Gemma 3's sliding RoPE, YaRN, and
    OLMo's norms; and let it build OLMo 2 and 3, which it does not know (``_builder_olmo2``). The builder
    expects transformers 4's layout, the global layers' RoPE in
    ``rope_parameters`` and the sliding layers' theta in ``rope_local_base_freq``; transformers 5 nests
    both by layer type and the builder stops (``KeyError: 'rope_type'``). Its ``AutoConfig`` is wrapped
    (other configs pass through as they are) so that it sees the old layout; fp32 logits then match
    PyTorch's (tests/tasks/test_families). What it replaces is put back on exit: nothing else in the
    process sees the builder changed."""
    with _BUILDER:
        auto, olmo, gemma3 = builder.AutoConfig, builder.OLMoModel, builder.Gemma3Model
        base_model = builder.Model  # every builder class's base: its YaRN ramp (see _yarn_inv_freq)
        ntk = base_model.make_inv_freq_rescaled_with_ntk

        class AdaptedAutoConfig:
            @staticmethod
            def from_pretrained(*args: Any, **kwargs: Any) -> Any:
                config = _olmo2_for_builder(_gemma3_rope_for_builder(auto.from_pretrained(*args, **kwargs)))
                return _norm_eps_for_builder(_yarn_for_builder(config))

        class OLMoLayerNormModel(olmo):  # type: ignore[misc,valid-type]
            """OLMo's norms are LayerNorms without weights, at epsilon 1e-5 (transformers' OlmoLayerNorm);
            the builder made them RMSNorms at 1e-6 (a tiny OLMo's logits 1.26 off PyTorch's)."""

            def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
                if getattr(config, "clip_qkv", None) is not None:
                    raise NotImplementedError(f"OLMo with clip_qkv ({config.clip_qkv}) clamps its queries, "
                                              "keys and values, which this builder does not export; "
                                              "OLMo without it is supported")
                super().__init__(config, *args, **kwargs)
                self.layernorm_attrs["simple"] = False
                self.layernorm_attrs["epsilon"] = 1e-5

        class Gemma3SlidingRoPEModel(gemma3):  # type: ignore[misc,valid-type]
            """Gemma 3's RoPE scaling (linear x8 on the 4B and larger) is the global layers' only: the
            sliding layers keep plain RoPE at their own theta. The builder scaled both (a tiny Gemma 3's
            logits 2.4 off PyTorch's); the sliding caches are made unscaled here."""

            def make_rotary_embedding_multi_cache(self) -> None:
                # The caches as Gemma 2 makes them (Gemma 3's own maker picks a cache by layer).
                base: Any = super(gemma3, self)
                split_rope_caches(self, base.make_rotary_embedding_caches)

        olmo2 = olmo2_model(builder)

        def olmo_family(config: Any, *args: Any, **kwargs: Any) -> Any:
            """OLMo 2 and 3 reach the builder as OLMo (_olmo2_for_builder) and are built by their own class."""
            return (olmo2 if config.model_type in OLMO2_TYPES else OLMoLayerNormModel)(config, *args, **kwargs)

        builder.AutoConfig, builder.OLMoModel, builder.Gemma3Model = (AdaptedAutoConfig, olmo_family,
                                                                      Gemma3SlidingRoPEModel)
        base_model.make_inv_freq_rescaled_with_ntk = _yarn_inv_freq
        try:
            yield
        finally:
            builder.AutoConfig, builder.OLMoModel, builder.Gemma3Model = auto, olmo, gemma3
            base_model.make_inv_freq_rescaled_with_ntk = ntk


# Where configs other than RMSNorm models' keep their norms' epsilon (phi: layer_norm_eps; nemotron: norm_eps).
_NORM_EPS_FIELDS = ("layer_norm_eps", "norm_eps", "layer_norm_epsilon")


def _norm_eps_for_builder(config: Any) -> Any:
    """The builder reads every norm's epsilon from ``rms_norm_eps`` and falls back to 1e-6 where a
    config has none, so a LayerNorm model (phi: 1e-5) was exported with the wrong epsilon (a tiny
    phi's logits 2.6e-3 off PyTorch's; 2e-6 with it). Such a config gets ``rms_norm_eps`` from the
    field it keeps its epsilon in."""
    if getattr(config, "rms_norm_eps", None) is None:
        for field in _NORM_EPS_FIELDS:
            if isinstance(value := getattr(config, field, None), float):
                config.rms_norm_eps = value
                break
    return config


def _text_config(config: Any) -> Any:
    """An image-text config's text decoder part (text_config, which the builder copies to the top level
    after the fixes below), or a text model's config itself."""
    return getattr(config, "text_config", None) or config


def _gemma3_rope_for_builder(config: Any) -> Any:
    text = _text_config(config)
    rope: Any = getattr(text, "rope_parameters", None)
    if getattr(text, "model_type", "") != "gemma3_text" or not isinstance(rope, dict) or "full_attention" not in rope:
        return config
    full: dict[str, Any] = rope["full_attention"]
    local: dict[str, Any] = rope.get("sliding_attention", full)
    if full.get("rope_type", "default") not in ("default", "linear") or local.get("rope_type", "default") != "default":
        raise NotImplementedError(f"Gemma 3 with {full.get('rope_type')} RoPE on its global layers and "
                                  f"{local.get('rope_type', 'default')} on its sliding ones is not exported by this "
                                  "builder; Gemma 3 with plain or linear-scaled global RoPE (270M to 27B) is")
    text.rope_local_base_freq = local["rope_theta"]
    text.rope_parameters = dict(full)
    return config


@contextlib.contextmanager
def _text_tie_for_builder(hf_dir: Path, config: dict[str, Any], scratch: Path) -> Iterator[Path]:
    """The folder the builder reads. transformers ties an image-text model's lm_head to its embedding by the
    top-level ``tie_word_embeddings``; the builder loads some of them (Qwen3.5) as their text model, which
    reads text_config's (False by default): a tied checkpoint's lm_head was then a random matrix (a tiny
    Qwen3.5's logits 3.0 off PyTorch's). Where the two differ, the builder gets a folder of links to
    ``hf_dir`` whose config.json carries the top-level value into text_config; elsewhere ``hf_dir`` itself."""
    text, tied = config.get("text_config"), config.get("tie_word_embeddings")
    if not isinstance(text, dict) or not isinstance(tied, bool) or text.get("tie_word_embeddings", False) == tied:
        yield hf_dir
        return
    folder = scratch / "model"
    folder.mkdir()
    for f in hf_dir.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f.resolve())
    (folder / "config.json").write_text(json.dumps({**config, "text_config": {**text, "tie_word_embeddings": tied}}))
    yield folder


def _olmo2_for_builder(config: Any) -> Any:
    """OLMo 2 / 3 go to the builder as OLMo, whose class Grove swaps for _builder_olmo2's; OLMo 3's RoPE,
    nested by layer type in transformers 5, is handed over as the full layers' (scaling included) plus the
    sliding layers' theta, as Gemma 3's is."""
    if getattr(config, "model_type", "") not in OLMO2_TYPES:
        return config
    config.architectures = ["OlmoForCausalLM"]
    rope: Any = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict) and "full_attention" in rope:
        local: dict[str, Any] = rope.get("sliding_attention") or rope["full_attention"]
        if local.get("rope_type", "default") != "default":
            raise NotImplementedError(f"OLMo 3 with {local['rope_type']} RoPE on its sliding layers is not exported "
                                      "by Grove's OLMo 3 builder; scaling on the full layers is")
        if any(t == "sliding_attention" for t in getattr(config, "layer_types", None) or ()):
            config.rope_local_base_freq = local["rope_theta"]
        config.rope_parameters = dict(rope["full_attention"])
    return config


def _yarn_for_builder(config: Any) -> Any:
    """The builder reads YaRN's pretraining context from the config's ``original_max_position_embeddings``
    (transformers 4's place) and, without it, takes ``max_position_embeddings``: transformers 5 keeps it in
    ``rope_parameters`` (Ministral 3: 16,384 of 262,144), so the ramp was placed for the wrong context."""
    text = _text_config(config)
    rope: Any = getattr(text, "rope_parameters", None)
    if not isinstance(rope, dict) or rope.get("rope_type") != "yarn":
        return config
    if rope.get("truncate") is False:
        raise NotImplementedError("YaRN with truncate false (an unrounded ramp) is not exported by Grove's fix of "
                                  "the builder's YaRN, which rounds it as transformers does by default")
    if rope.get("original_max_position_embeddings") and getattr(text, "original_max_position_embeddings", None) is None:
        text.original_max_position_embeddings = rope["original_max_position_embeddings"]
    return config


def _yarn_inv_freq(self: Any, inv_freq: Any) -> Any:
    """YaRN's frequencies as transformers computes them (``_compute_yarn_parameters``): the ramp between the
    dimensions that turn beta_fast and beta_slow times over the pretraining context, its ends rounded out to
    whole dimensions (transformers' ``truncate``; a config that turns it off is refused in _yarn_for_builder)
    and kept inside the rotary half. The builder (0.18) left them unrounded and asserted they fell strictly
    inside, which a small head fails."""
    import math

    import torch

    attrs = self.rope_attrs["rescale_inv_freq"]
    half = len(inv_freq)
    theta, context = self.rope_attrs["theta"], self.original_context_length

    def dimension(turns: float) -> float:
        return half * math.log(context / (turns * 2 * math.pi)) / math.log(theta)

    low = max(math.floor(dimension(attrs["ntk_beta"])), 0)  # beta_fast
    high = min(math.ceil(dimension(attrs["ntk_alpha"])), 2 * half - 1)  # beta_slow
    ramp = ((torch.arange(half, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    return inv_freq / attrs["factor"] * ramp + inv_freq * (1 - ramp)


def _llama4_scaled_context(config: dict[str, Any], out: Path) -> None:
    """Ministral 3 scales its queries by 1 + beta * log(1 + floor(position / the pretraining context))
    (``llama_4_scaling_beta``), which the builder does not export: below that context the factor is 1 and
    the export is exact, so the model's context is capped there (genai stops a longer sequence) instead of
    drifting past it."""
    rope = config.get("text_config", config).get("rope_parameters") or {}
    if not rope.get("llama_4_scaling_beta") or not (limit := rope.get("original_max_position_embeddings")):
        return
    path = out / "genai_config.json"
    genai = json.loads(path.read_text())
    if genai["model"].get("context_length", limit + 1) > limit:
        genai["model"]["context_length"] = limit
        genai.setdefault("search", {})["max_length"] = min(genai.get("search", {}).get("max_length", limit), limit)
        path.write_text(json.dumps(genai, indent=4))
        node_logger().info("context capped at %d tokens: past it the model scales its queries (llama_4_scaling_beta "
                           "%s), which the model builder does not export", limit, rope["llama_4_scaling_beta"])


def _keep_tokenizer_class(hf_dir: Path, out: Path) -> None:
    """The builder re-saves the tokenizer through transformers, which names its class after the model
    (Qwen3.5's: ``Qwen3_5Tokenizer``) where the checkpoint named a class genai reads; onnxruntime-genai then
    refuses to load it ("Unsupported tokenizer class"). The checkpoint's own name is put back."""
    src, dst = hf_dir / "tokenizer_config.json", out / "tokenizer_config.json"
    if not src.is_file() or not dst.is_file():
        return
    shipped = json.loads(src.read_text()).get("tokenizer_class")
    written = json.loads(dst.read_text())
    if shipped and written.get("tokenizer_class") != shipped:
        dst.write_text(json.dumps({**written, "tokenizer_class": shipped}, indent=2))


def _copy_chat_template(hf_dir: Path, out: Path) -> None:
    # genai reads the template from tokenizer_config.json; some models keep it in a .jinja file.
    src = hf_dir / "chat_template.jinja"
    if src.exists() and not (out / src.name).exists():
        (out / src.name).write_text(src.read_text())


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)
