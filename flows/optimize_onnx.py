"""``auto-opt-onnx``: an ONNX graph given as the model. Wiring only."""

from __future__ import annotations

from prefect import flow

from grove.flows.request_graph import GraphOptRequest
from grove.tasks.convert_fp16 import convert_fp16
from grove.tasks.download_model import resolve_source
from grove.tasks.evaluate_graph import evaluate_graph
from grove.tasks.import_onnx import import_onnx
from grove.tasks.package_genai import export_output
from grove.tasks.package_graph import package_graph
from grove.tasks.publish_model import publish_model
from grove.tasks.publish_report import publish_report
from grove.tasks.quantize_int4 import quantize_int4

__all__ = ["optimize_onnx"]


@flow(name="auto-opt-onnx", log_prints=False)
def optimize_onnx(request: GraphOptRequest) -> dict[str, object]:
    """Graph -> store -> int4 / int8 weights or fp16 -> measured against the graph -> packaged -> output path."""
    source = resolve_source(request.model_name_or_path)
    graph = import_onnx(source, request.imported, request.store)
    reference_eval = evaluate_graph(graph, None, request.evaluation(gate=False))
    model = convert_fp16(graph, request.fp16) if request.precision == "fp16" else quantize_int4(graph, request.int4)
    evaluation = evaluate_graph(model, graph, request.evaluation(gate=True))
    package = package_graph(model, evaluation, reference_eval, graph, request.package)
    report = export_output(package, request.output_path)
    publish_report(report, request.output_path, package)
    if request.publish_as is not None:
        publish_model(package, *request.publish_as, source_digest=source.digest)
    return report
