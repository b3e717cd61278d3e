"""``auto-opt-encoder``: one encoder model, one target. Reads like the DAG: wiring only."""

from __future__ import annotations

from prefect import flow

from grove.flows.request_encoder import EncoderOptRequest
from grove.tasks.capture_encoder import capture_encoder
from grove.tasks.check_parity import check_parity
from grove.tasks.convert_fp16 import convert_fp16
from grove.tasks.download_model import download_model, resolve_source
from grove.tasks.evaluate import fingerprint_text
from grove.tasks.evaluate_encoder import evaluate_encoder
from grove.tasks.optimize_graph import optimize_graph
from grove.tasks.package_encoder import package_encoder
from grove.tasks.package_genai import export_output
from grove.tasks.publish_model import publish_model
from grove.tasks.publish_report import publish_report
from grove.tasks.quantize_int8 import quantize_int8

__all__ = ["optimize_encoder"]


@flow(name="auto-opt-encoder", log_prints=False)
def optimize_encoder(request: EncoderOptRequest) -> dict[str, object]:
    """Source -> HF folder -> ONNX -> fused (fp32 reference) -> int8 | fp16 -> evaluated -> output (and the
    metrics table and report as Prefect artifacts on the flow run's page)."""
    source = resolve_source(request.model_name_or_path, request.revision)
    request = request.resolved(source)  # a run from the dashboard may leave the task to the model
    labelled_sha = fingerprint_text(request.eval_data) if request.eval_data else ""
    hf_model = download_model(source, request.download, request.store)
    captured = capture_encoder(hf_model, request.capture)
    reference = optimize_graph(captured, request.graph)
    graph_parity = parity = check_parity(reference, captured, request.parity("fp32"))
    reference_eval = evaluate_encoder(reference, request.evaluation(labelled_sha), reference=hf_model)

    if (int8 := request.int8) is not None:
        if int8.mode == "static":  # what it calibrates on is part of the recipe, as the evaluation's text is
            int8 = int8.model_copy(update={"calibration_sha256": fingerprint_text(int8.calibration_data)})
        model = quantize_int8(reference, int8)
    elif request.fp16 is not None:
        model = convert_fp16(reference, request.fp16)
    else:
        model = reference
    if model is not reference:
        parity = check_parity(model, reference, request.parity(request.precision))
        evaluation = evaluate_encoder(model, request.evaluation(labelled_sha), reference=hf_model)
    else:
        evaluation = reference_eval
    package = package_encoder(model, evaluation, reference_eval, parity,
                              graph_parity if model is not reference else None, request.package)
    report = export_output(package, request.output_path)
    publish_report(report, request.output_path, package)
    if request.publish_as is not None:
        publish_model(package, *request.publish_as, source_digest=source.digest)
    return report
