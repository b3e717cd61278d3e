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

__all__ = ["ADAPTER_FILE", "LAYOUT_FILE", "MERGEABLE", "RANK_DIM", "adapter_kind", "adapter_tensors", "builder_names",
           "fuse_lora_groups", "fused_tensors", "graph_lora_names", "make_switchable", "read_adapter", "read_layout",
           "save_tensors", "write_adapter"]

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


# peft's adapter types that merge into the base (merge_and_unload), as Grove names them.
MERGEABLE = ("lora", "dora", "loha", "lokr")


def adapter_kind(config: dict[str, Any]) -> str:
    """An adapter_config.json's method: lora, dora (a LoRA config with use_dora), loha, lokr, or
    peft's own name of another type, lower case."""
    kind = str(config.get("peft_type", "")).lower()
    return "dora" if kind == "lora" and config.get("use_dora") else kind


def read_adapter(folder: Path, *, switchable: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """A peft adapter folder: its config and its weights (fp32 numpy). ``switchable``: it must be a
    plain LoRA (low-rank A and B matrices, what a graph's LoRA inputs carry); otherwise any adapter
    peft merges into the weights (LoRA, DoRA, LoHa, LoKr)."""
    from safetensors.numpy import load_file

    config_path = folder / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{folder} is not a peft adapter folder ({config_path.name}: {exc}); pass the folder "
                             "holding adapter_config.json and adapter_model.safetensors") from exc
    kind = adapter_kind(config)
    if kind not in MERGEABLE:
        raise InvalidRequest(f"{folder}: a {config.get('peft_type')} adapter; Grove reads LoRA, DoRA, LoHa and LoKr "
                             "adapters")
    if switchable and kind != "lora":
        raise InvalidRequest(f"{folder}: a {kind} adapter cannot be kept switchable (a graph's LoRA inputs carry the "
                             f"low-rank A and B of a plain LoRA; {kind}'s update is not of that form); merge it into "
                             "the weights instead (--merge_adapter)")
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


def adapter_tensors(folder: Path, graph: Any, layout: dict[str, dict[str, Any]] | None = None
                    ) -> dict[str, np.ndarray]:
    """The peft adapter in ``folder`` as the tensors of ``graph``'s LoRA inputs (A transposed, B transposed
    and scaled, as the builder writes them; laid out as ``layout`` says for the inputs fuse_lora_groups
    fused). Raises InvalidRequest when the adapter does not fit the graph: a layer the graph has no LoRA
    input for, or one the adapter lacks, or other shapes."""
    config, weights = read_adapter(folder)
    if config.get("use_dora"):
        raise InvalidRequest(f"{folder}: a DoRA adapter (use_dora) rescales the base weights, which a switchable "
                             "LoRA input cannot express; merge it instead (--merge_adapter)")
    layout = layout or {}
    names = {k: n for k, n in graph_lora_names(graph).items() if n not in layout}
    grouped = {_key(_GRAPH_NAME, n): n for spec in layout.values()
               for n in (spec["from"] if spec["part"] == "A" else [b for b, _ in spec["from"] if b])}
    shapes = _input_shapes(graph)
    tensors: dict[str, np.ndarray] = {}
    for peft_name, array in weights.items():
        key = _key(_PEFT_NAME, peft_name)
        if key is None:
            continue
        target = names.get(key) or grouped.get(key)
        if target is None:
            raise InvalidRequest(f"{folder}: the adapter adapts {peft_name}, which the base graph has no LoRA input "
                                 "for; capture the base with an adapter of the same target_modules")
        layer, module, part = key
        tensors[target] = np.ascontiguousarray(
            array.T if part == "A" else (array * _scaling(config, array.shape[1], module)).T, dtype=np.float32)
    if missing := sorted(set(names.values()) - set(tensors)):
        raise InvalidRequest(f"{folder}: the adapter has no weights for {missing[0]} (and {len(missing) - 1} more) "
                             "that the graph's adapter inputs expect; its target_modules differ from the base's")
    tensors = fused_tensors(tensors, layout)
    for name, value in tensors.items():
        fixed = [(axis, d) for axis, d in enumerate(shapes.get(name, [])) if isinstance(d, int)]
        if any(value.shape[axis] != d for axis, d in fixed):
            raise InvalidRequest(f"{folder}: the adapter's weights for {name} have shape {list(value.shape)}, which "
                                 f"does not fit this base ({shapes[name]}); the adapter was trained on another model")
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
            np.savez(tmp, **cast)  # type: ignore[arg-type]  # numpy's stub takes **kwds for allow_pickle
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


LAYOUT_FILE = "adapter_layout.json"


def _lora_add(node: Any, producers: dict[str, Any], inits: set[str]) -> tuple[Any, Any] | None:
    """If ``node`` is a LoRA path's Add (base output + lora_B MatMul of a lora_A MatMul, weights LoRA
    initializers), its (lora_A MatMul, lora_B MatMul); else None."""
    if node.op_type != "Add" or len(node.input) != 2:
        return None
    b = producers.get(node.input[1])
    if b is None or b.op_type != "MatMul" or b.input[1] not in inits or _key(_GRAPH_NAME, b.input[1]) is None:
        return None
    a = producers.get(b.input[0])
    if a is None or a.op_type != "MatMul" or a.input[1] not in inits or _key(_GRAPH_NAME, a.input[1]) is None:
        return None
    return a, b


def fuse_lora_groups(model: Any) -> dict[str, dict[str, Any]]:
    """One LoRA path per group of projections that share their input and whose base outputs are one
    Split's (Grove's int4 fuses q/k/v and gate/up into one MatMulNBits + Split): x @ [A_q | A_k | A_v]
    @ blockdiag(B_q, B_k, B_v), added before the Split, instead of three lora_A / lora_B / Add triples
    (SmolLM2 with q/k/v/o adapted: 360 LoRA nodes per token become 180; each is a tiny op whose
    dispatch, not its arithmetic, is the cost). Call while the LoRA weights are initializers (before
    make_switchable). Returns the layout (fused weight name -> the builder's weights it holds, in
    order), which ``fused_tensors`` applies to any adapter of the same targets."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layout: dict[str, dict[str, Any]] = {}
    drop: set[int] = set()
    new_inits, before = [], {}  # before: id(split) -> nodes to insert ahead of it
    for split in [n for n in graph.node if n.op_type == "Split" and len(n.input) == 2 and n.input[1] in inits]:
        members = []
        for out in split.output:
            paths = [(c, path) for c in consumers.get(out, []) if (path := _lora_add(c, producers, set(inits)))]
            members.append(paths[0] if len(paths) == 1 and len(consumers[out]) == 1 else None)
        present = [m for m in members if m is not None]
        if len(present) < 2 or len({m[1][0].input[0] for m in present}) != 1:
            continue
        widths = [int(w) for w in numpy_helper.to_array(inits[split.input[1]])]
        a_names = [m[1][0].input[1] for m in present]
        a_parts = [numpy_helper.to_array(inits[n]) for n in a_names]
        rank = sum(a.shape[1] for a in a_parts)
        b_fused = np.zeros((rank, sum(widths)), dtype=np.float32)
        b_layout: list[list[Any]] = []
        row, col = 0, 0
        for member, width in zip(members, widths, strict=True):
            name = member[1][1].input[1] if member else None
            if member is not None:
                block = numpy_helper.to_array(inits[name])
                b_fused[row:row + block.shape[0], col:col + width] = block
                row += block.shape[0]
            b_layout.append([name, width])
            col += width
        layer, _, _ = _key(_GRAPH_NAME, a_names[0])  # type: ignore[misc]
        group = "__".join(_key(_GRAPH_NAME, n)[1] for n in a_names)  # type: ignore[index]
        prefix = a_names[0].split(f".{_key(_GRAPH_NAME, a_names[0])[1]}.")[0]  # type: ignore[index]
        fused_a, fused_b = f"{prefix}.{group}.lora_A.MatMul.weight", f"{prefix}.{group}.lora_B.MatMul.weight"
        new_inits += [numpy_helper.from_array(np.concatenate(a_parts, axis=1), fused_a),
                      numpy_helper.from_array(b_fused, fused_b)]
        layout[fused_a] = {"part": "A", "from": a_names}
        layout[fused_b] = {"part": "B", "from": b_layout}
        x, base = present[0][1][0].input[0], split.input[0]
        stem = f"{split.name}/lora"
        before[id(split)] = [helper.make_node("MatMul", [x, fused_a], [f"{stem}/A"], name=f"{stem}/A"),
                             helper.make_node("MatMul", [f"{stem}/A", fused_b], [f"{stem}/B"], name=f"{stem}/B"),
                             helper.make_node("Add", [base, f"{stem}/B"], [f"{stem}/sum"], name=f"{stem}/Add")]
        split.input[0] = f"{stem}/sum"
        for out, member in zip(split.output, members, strict=True):
            if member is None:
                continue
            add, (a, b) = member
            drop.update({id(add), id(a), id(b)})
            for c in consumers.get(add.output[0], []):
                c.input[:] = [out if i == add.output[0] else i for i in c.input]
            for o in graph.output:
                if o.name == add.output[0]:
                    o.name = out
    if not layout:
        return layout
    nodes = []
    for n in graph.node:
        nodes += before.get(id(n), [])
        if id(n) not in drop:
            nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    fused_from = {n for spec in layout.values() for n in (spec["from"] if spec["part"] == "A" else
                                                        [b for b, _ in spec["from"] if b])}
    kept = [t for t in graph.initializer if t.name not in fused_from] + new_inits
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return layout


def fused_tensors(tensors: dict[str, np.ndarray], layout: dict[str, dict[str, Any]]) -> dict[str, np.ndarray]:
    """An adapter's tensors under the builder's names, laid out for a graph whose groups
    ``fuse_lora_groups`` fused: A's side by side, B's block-diagonal. A projection of a group that the
    adapter does not adapt contributes rank 0."""
    out = {k: v for k, v in tensors.items()}
    for name, spec in layout.items():
        if spec["part"] == "A":
            parts = [out.pop(n, None) for n in spec["from"]]
            inputs = {p.shape[0] for p in parts if p is not None}
            if not inputs:
                raise InvalidRequest(f"the adapter adapts none of the projections {name} holds")
            width = inputs.pop()
            out[name] = np.concatenate([p if p is not None else np.zeros((width, 0), np.float32) for p in parts],
                                       axis=1)
    for name, spec in layout.items():
        if spec["part"] == "B":
            blocks = [(out.pop(n, None) if n else None, width) for n, width in spec["from"]]
            rank = sum(b.shape[0] for b, _ in blocks if b is not None)
            fused = np.zeros((rank, sum(w for _, w in blocks)), dtype=np.float32)
            row, col = 0, 0
            for block, width in blocks:
                if block is not None:
                    if block.shape[1] != width:
                        raise InvalidRequest(f"the adapter's {name} part is {block.shape[1]} wide, the graph's "
                                             f"{width}; the adapter was trained on another model")
                    fused[row:row + block.shape[0], col:col + width] = block
                    row += block.shape[0]
                col += width
            out[name] = fused
    return out


def read_layout(model_dir: Path) -> dict[str, dict[str, Any]]:
    """The fused LoRA layout a model folder records (none: every LoRA input is the builder's own)."""
    path = model_dir / LAYOUT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
