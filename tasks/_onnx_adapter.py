"""LoRA adapters for graphs that onnxruntime-genai switches at run time (multi-LoRA).

The onnxruntime-genai model builder, given a peft adapter, writes beside each adapted MatMul a
``lora_A`` MatMul and a ``lora_B`` MatMul whose weights are initializers named
``model.layers.<i>.<attn|mlp>.<proj>.lora_<A|B>.MatMul.weight``: A transposed ([in, r]), B transposed
and multiplied by the adapter's scaling ([r, out]). ``make_switchable`` turns those initializers into
optional graph inputs with a dynamic rank (their default: rank 0, so no adapter = the base model), as
Olive's ExtractAdapters pass does, and ``adapter_tensors`` turns any peft adapter trained on the same
base into the tensors of those inputs. Names are matched by (layer, projection, A/B) against the
graph itself, never spelt out separately, so they cannot drift apart (Olive issue #2277: its
``convert-adapters`` names did not match its own auto-opt graphs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from grove.errors import InvalidRequest

__all__ = ["ADAPTER_FILE", "RANK_DIM", "adapter_tensors", "builder_names", "graph_lora_names", "make_switchable",
           "read_adapter", "save_tensors", "write_adapter"]

ADAPTER_FILE = "adapter_weights.onnx_adapter"
RANK_DIM = "lora_r"
_GRAPH_NAME = re.compile(r"layers\.(\d+)\..*?([A-Za-z0-9_]+)\.lora_([AB])\.MatMul\.weight$")
_PEFT_NAME = re.compile(r"layers\.(\d+)\..*?([A-Za-z0-9_]+)\.lora_([AB])(?:\.default)?\.weight$")


def _key(pattern: re.Pattern[str], name: str) -> tuple[int, str, str] | None:
    m = pattern.search(name)
    return (int(m.group(1)), m.group(2), m.group(3)) if m else None


def graph_lora_names(graph: Any) -> dict[tuple[int, str, str], str]:
    """(layer, projection, A/B) -> the name of its LoRA weight in ``graph`` (initializer or input)."""
    names = [t.name for t in graph.initializer] + [i.name for i in graph.input]
    return {key: n for n in names if (key := _key(_GRAPH_NAME, n)) is not None}


def make_switchable(model: Any) -> dict[str, np.ndarray]:
    """Each LoRA initializer of ``model`` (an onnx ModelProto) becomes an optional input with a dynamic
    rank and a rank-0 default; returns the weights taken out (the adapter the graph was built with)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    lora = {n for n in graph_lora_names(graph).values()}
    taken: dict[str, np.ndarray] = {}
    kept = []
    for t in graph.initializer:
        if t.name not in lora:
            kept.append(t)
            continue
        array = numpy_helper.to_array(t)
        taken[t.name] = array
        is_a = ".lora_A." in t.name
        dims: list[int | str] = [array.shape[0], RANK_DIM] if is_a else [RANK_DIM, array.shape[1]]
        graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, dims))
        empty = np.zeros((array.shape[0], 0) if is_a else (0, array.shape[1]), dtype=array.dtype)
        kept.append(numpy_helper.from_array(empty, t.name))  # the default: rank 0, i.e. no adapter
    if not taken:
        raise InvalidRequest("the captured graph has no LoRA weights: the adapter adapts no layer the builder "
                             "exports; check its target_modules")
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return taken


def read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A peft adapter folder: its config and its weights (fp32 numpy)."""
    from safetensors.numpy import load_file

    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{folder} is not a peft adapter folder ({config_path.name}: {exc}); pass the folder "
                             "holding adapter_config.json and adapter_model.safetensors") from exc
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidRequest(f"{folder}: a {config.get('peft_type')} adapter; Grove reads LoRA adapters")
    weights_path = folder / "adapter_model.safetensors"
    if not weights_path.exists():
        raise InvalidRequest(f"{folder} has no adapter_model.safetensors; save the adapter with peft's "
                             "save_pretrained (safetensors)")
    weights = {k: v.astype(np.float32) for k, v in load_file(str(weights_path)).items()}
    return config, weights


def _scaling(config: dict[str, Any], rank: int, module: str) -> float:
    alpha = float((config.get("alpha_pattern") or {}).get(module, config.get("lora_alpha", 8)))
    r = int((config.get("rank_pattern") or {}).get(module, rank))
    return alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r


def adapter_tensors(folder: Path, graph: Any) -> dict[str, np.ndarray]:
    """The peft adapter in ``folder`` as the tensors of ``graph``'s LoRA inputs (A transposed, B transposed
    and scaled, as the builder writes them). Raises InvalidRequest when the adapter does not fit the
    graph: a layer the graph has no LoRA input for, or one the adapter lacks, or other shapes."""
    config, weights = read_adapter(folder)
    if config.get("use_dora"):
        raise InvalidRequest(f"{folder}: a DoRA adapter (use_dora) rescales the base weights, which a switchable "
                             "LoRA input cannot express; merge it instead (--merge_adapter)")
    names = graph_lora_names(graph)
    shapes = _input_shapes(graph)
    tensors: dict[str, np.ndarray] = {}
    for peft_name, array in weights.items():
        key = _key(_PEFT_NAME, peft_name)
        if key is None:
            continue
        if key not in names:
            raise InvalidRequest(f"{folder}: the adapter adapts {peft_name}, which the base graph has no LoRA input "
                                 "for; capture the base with an adapter of the same target_modules")
        layer, module, part = key
        value = array.T if part == "A" else (array * _scaling(config, array.shape[1], module)).T
        expected = shapes.get(names[key])
        fixed = [d for d in (expected or []) if isinstance(d, int)]
        if expected is not None and [value.shape[0] if part == "A" else value.shape[1]] != fixed:
            raise InvalidRequest(f"{folder}: {peft_name} has shape {list(array.shape)}, which does not fit this "
                                 f"base ({names[key]}: {expected}); the adapter was trained on another model")
        tensors[names[key]] = np.ascontiguousarray(value, dtype=np.float32)
    if missing := sorted(set(names.values()) - set(tensors)):
        raise InvalidRequest(f"{folder}: the adapter has no weights for {missing[0]} (and {len(missing) - 1} more) "
                             "that the graph's adapter inputs expect; its target_modules differ from the base's")
    return tensors


def _input_shapes(graph: Any) -> dict[str, list[int | str]]:
    return {i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
            for i in graph.input}


def write_adapter(tensors: dict[str, np.ndarray], path: Path, dtype: str = "float32") -> None:
    """``tensors`` as an onnxruntime adapter file (``onnxruntime_genai.Adapters.load`` reads it)."""
    import onnxruntime as ort

    values = {k: ort.OrtValue.ortvalue_from_numpy(v.astype(dtype)) for k, v in sorted(tensors.items())}
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters(values)
    adapter.export_adapter(str(path))


def builder_names(folder: Path) -> dict[str, np.ndarray]:
    """A peft adapter's tensors under the names the onnxruntime-genai builder gives LoRA weights in the
    graphs Grove writes (``model.layers.<i>.attn.<proj>.lora_A.MatMul.weight``...), transposed and B
    scaled, for an adapter whose graph is not at hand (``grove convert-adapters`` without ``-m``)."""
    config, weights = read_adapter(folder)
    if config.get("use_dora"):
        raise InvalidRequest(f"{folder}: a DoRA adapter (use_dora) rescales the base weights, which a switchable "
                             "LoRA input cannot express; merge it instead (grove auto-opt --merge_adapter)")
    tensors = {}
    for name, array in weights.items():
        key = _key(_PEFT_NAME, name)
        if key is None:
            continue
        layer, module, part = key
        block = "attn" if ".self_attn." in name or ".attn." in name else "mlp"
        value = array.T if part == "A" else (array * _scaling(config, array.shape[1], module)).T
        tensors[f"model.layers.{layer}.{block}.{module}.lora_{part}.MatMul.weight"] = np.ascontiguousarray(value)
    if not tensors:
        raise InvalidRequest(f"{folder}: the adapter holds no LoRA weights of decoder layers")
    return tensors


def save_tensors(tensors: dict[str, np.ndarray], path: Path, adapter_format: str, dtype: str) -> Path:
    """``tensors`` in ``adapter_format`` (onnx_adapter, safetensors or numpy .npz) at ``path`` (its
    suffix added if missing), written beside and renamed, so a failure leaves nothing."""
    import os
    import tempfile

    suffix = {"onnx_adapter": ".onnx_adapter", "safetensors": ".safetensors", "numpy": ".npz"}[adapter_format]
    path = path if path.suffix == suffix else path.with_name(path.name + suffix)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        cast = {k: v.astype(dtype) for k, v in tensors.items()}
        if adapter_format == "onnx_adapter":
            write_adapter(cast, Path(tmp), dtype)
        elif adapter_format == "safetensors":
            from safetensors.numpy import save_file

            save_file(cast, tmp)
        else:
            np.savez(tmp, **cast)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
