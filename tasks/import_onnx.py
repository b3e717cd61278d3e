"""Node ``import-onnx``: an ONNX graph given as the model (``grove auto-opt -m model.onnx``, or Olive's
``ONNXModel`` input) into the store, as the graph nodes read one: ``model.onnx`` with its weights in
``model.onnx.data``, the files beside it (configs, tokenizer), and ``graph.json`` (the graph's own file
name, which the output gets back, and its inputs and outputs). The download of the graph path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task

from grove.artifacts import Artifact, Source, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node

__all__ = ["GRAPH_JSON", "ImportOnnxConfig", "import_onnx", "io_names"]

GRAPH_JSON = "graph.json"


class ImportOnnxConfig(StepConfig):
    NODE = "import-onnx"
    VERSION = 1


@task(name="import-onnx", cache_policy=RECIPE_CACHE, retries=0)
def import_onnx(source: Source, config: ImportOnnxConfig, store: str) -> Artifact:
    if source.kind != "onnx":
        raise InvalidRequest(f"{source.location} is not an ONNX graph")
    return run_node(config, [source], store, lambda _inputs, _cfg, out: _import(source, out))


def io_names(graph: Path) -> dict[str, list[str]]:
    """The graph's input and output names (initializers listed as inputs by old exporters left out)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}
    return {"inputs": [i.name for i in model.graph.input if i.name not in weights],
            "outputs": [o.name for o in model.graph.output]}


def _import(source: Source, out: Path) -> dict[str, object]:
    import onnx

    location = Path(source.location)
    folder = location.parent if location.is_file() else location
    from grove.tasks._sources import graph_data_files

    graph = source.files[0]
    rest = [f for f in source.files[1:] if f not in set(graph_data_files(folder / graph))]
    model = onnx.load(str(folder / graph))  # its external data too, from beside it
    onnx.save_model(model, str(out / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    for rel in rest:
        if rel not in ("manifest.json", GRAPH_JSON):
            shutil.copy2(folder / rel, out / rel)
    (out / GRAPH_JSON).write_text(json.dumps({"filename": graph, **io_names(out / "model.onnx")}, indent=2))
    size = sum(p.stat().st_size for p in out.glob("model.onnx*")) / 1e6
    ops = sorted({n.op_type for n in model.graph.node})
    node_logger().info("ONNX graph %s ready: %.1f MB, %d nodes", graph, size, len(model.graph.node))
    return {"size_mb": round(size, 2), "nodes": len(model.graph.node), "matmuls": sum(
        n.op_type == "MatMul" for n in model.graph.node), "op_types": len(ops), "source_digest": source.digest}
