"""Olive's adapter commands, with its flags: ``convert-adapters`` (a peft adapter as the tensors of a
switchable graph's LoRA inputs), ``extract-adapters`` (every adapter under a folder, one file each) and
``generate-adapter`` (an ONNX model built with a LoRA adapter, its LoRA weights made switchable inputs).

They are file conversions of seconds, run in this process (no Prefect run, nothing cached). Names are
those of the graphs Grove writes: with ``-m`` naming such a graph (a ``grove auto-opt --adapter_path``
output) they are matched against it and every shape is checked, so an adapter that does not fit is an
error here, not at ``Adapters.load`` time (Olive issue #2277: its convert-adapters names did not match
its own auto-opt graphs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from grove.errors import InvalidRequest

__all__ = ["add_parsers"]

_FORMATS = ["onnx_adapter", "safetensors", "numpy"]


def add_parsers(sub: Any) -> None:
    c = sub.add_parser("convert-adapters", help="a peft LoRA adapter as a file onnxruntime-genai loads (Olive's "
                       "convert-adapters)")
    c.add_argument("-a", "--adapter_path", required=True, help="peft adapter folder (adapter_config.json, "
                   "adapter_model.safetensors)")
    c.add_argument("-o", "--output_path", required=True, help="file to write (its format's suffix is added)")
    c.add_argument("--adapter_format", choices=_FORMATS, default="onnx_adapter", help="onnx_adapter (default: "
                   "onnxruntime_genai.Adapters loads it), safetensors or numpy (.npz)")
    c.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="the weights' type: that of "
                   "the graph's LoRA inputs (float32 for Grove's CPU graphs)")
    c.add_argument("-m", "--model", help="the graph the adapter is for (a grove auto-opt --adapter_path output): "
                   "names matched against its LoRA inputs and shapes checked")
    c.add_argument("--quantize_int4", action="store_true", help="Olive's option: refused (Grove's graphs take "
                   "float LoRA inputs; an int4 adapter would not load in them)")
    c.set_defaults(run=_convert)

    e = sub.add_parser("extract-adapters", help="every LoRA adapter under a folder, one file each (Olive's "
                       "extract-adapters)")
    e.add_argument("-m", "--model_name_or_path", required=True, help="a folder holding peft adapters (each a folder "
                   "with adapter_config.json), e.g. several grove finetune outputs")
    e.add_argument("-o", "--output_path", default="adapters", help="folder to write <adapter name>.<format> to "
                   "(default: adapters)")
    e.add_argument("-f", "--format", choices=_FORMATS, default="onnx_adapter", dest="adapter_format")
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    e.set_defaults(run=_extract)

    g = sub.add_parser("generate-adapter", help="an ONNX model built with a LoRA adapter: its LoRA weights become "
                       "switchable inputs, the adapter a file beside it (Olive's generate-adapter)")
    g.add_argument("-m", "--model_name_or_path", required=True, help="ONNX model folder (model.onnx) built with an "
                   "adapter, e.g. by the onnxruntime-genai builder with adapter_path")
    g.add_argument("-o", "--output_path", default="optimized-model", help="folder to write the model and "
                   "adapter_weights.<format> to (default: optimized-model)")
    g.add_argument("--adapter_format", choices=_FORMATS, default="onnx_adapter")
    g.add_argument("--adapter_type", choices=["lora"], default="lora", help="lora (Olive also lists dora and "
                   "loha, whose weights a switchable input cannot carry)")
    g.set_defaults(run=_generate)


def _graph(folder: str) -> Any:
    import onnx

    path = Path(folder).expanduser()
    model_file = path / "model.onnx" if path.is_dir() else path
    if not model_file.is_file():
        raise InvalidRequest(f"-m {folder}: no model.onnx there; pass the folder of an ONNX model")
    return onnx.load(str(model_file), load_external_data=False)


def _convert(args: argparse.Namespace) -> int:
    from grove.tasks import _onnx_adapter as oa

    if args.quantize_int4:
        raise InvalidRequest("--quantize_int4: Grove's graphs take float LoRA inputs (the LoRA path is a small "
                             "share of the work), so an int4 adapter would not load in them; drop the flag")
    folder = Path(args.adapter_path).expanduser()
    if args.model:
        graph = _graph(args.model).graph
        if not any(i.name.endswith(".lora_A.MatMul.weight") for i in graph.input):
            raise InvalidRequest(f"-m {args.model}: the graph has no switchable LoRA inputs; build it with "
                                 "grove auto-opt --adapter_path (without --merge_adapter)")
        tensors = oa.adapter_tensors(folder, graph, oa.read_layout(Path(args.model).expanduser()))
    else:
        tensors = oa.builder_names(folder)
    path = oa.save_tensors(tensors, Path(args.output_path).expanduser(), args.adapter_format, args.dtype)
    print(f"wrote {path} ({len(tensors)} LoRA weights{', checked against ' + args.model if args.model else ''})")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from grove.tasks import _onnx_adapter as oa

    root = Path(args.model_name_or_path).expanduser()
    folders = sorted({p.parent for p in root.rglob("adapter_config.json")}) if root.is_dir() else []
    if not folders:
        raise InvalidRequest(f"-m {args.model_name_or_path}: no peft adapter (adapter_config.json) under it; pass a "
                             "folder holding adapter folders")
    converted = [(f, oa.builder_names(f)) for f in folders]  # every one read before anything is written
    names = [f.name if f.name != "adapter" else f.parent.name for f in folders]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"-m {args.model_name_or_path}: two adapters would be written under one name "
                             f"({', '.join(names)}); give them folders of different names")
    out = Path(args.output_path).expanduser()
    for name, (_, tensors) in zip(names, converted, strict=True):
        print(f"wrote {oa.save_tensors(tensors, out / name, args.adapter_format, args.dtype)}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    import onnx

    from grove.tasks import _onnx_adapter as oa

    src = Path(args.model_name_or_path).expanduser()
    if not (src / "model.onnx").is_file():
        raise InvalidRequest(f"-m {args.model_name_or_path}: no model.onnx there; pass the folder of an ONNX model")
    out = Path(args.output_path).expanduser()
    if out.exists() and any(out.iterdir()):
        raise InvalidRequest(f"output path {out} exists and is not empty; choose a new folder")
    model = onnx.load(str(src / "model.onnx"))
    weights = oa.make_switchable(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.grove-", dir=out.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("model.onnx"):
                shutil.copy2(f, staging / f.name)
        onnx.save(model, str(staging / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                  location="model.onnx.data", size_threshold=1024)
        adapter = oa.save_tensors(weights, staging / "adapter_weights", args.adapter_format, "float32")
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"wrote {out} ({len(weights)} LoRA inputs; the adapter it was built with: {out / adapter.name})")
    return 0
