"""``benchmark``: lm-evaluation-harness tasks on one model (Olive's ``benchmark`` command and its
LMEvaluator). Reads like the DAG: wiring only."""

from __future__ import annotations

from prefect import flow

from grove.flows.request_benchmark import BenchmarkRequest
from grove.tasks.download_model import DownloadConfig, download_model, resolve_source
from grove.tasks.evaluate_lm import evaluate_lm, include_sha256
from grove.tasks.import_onnx import ImportOnnxConfig, import_onnx
from grove.tasks.package_genai import export_output

__all__ = ["benchmark"]


@flow(name="benchmark", log_prints=False)
def benchmark(request: BenchmarkRequest) -> dict[str, object]:
    """Model (Hugging Face, or an onnxruntime-genai folder) -> lm-eval scores -> output path."""
    source = resolve_source(request.model_name_or_path, request.revision)
    model = (import_onnx(source, ImportOnnxConfig(), request.store) if source.kind == "onnx" else
             download_model(source, DownloadConfig(trust_remote_code=request.trust_remote_code), request.store))
    scores = evaluate_lm(model, request.lm_eval(include_sha256(request.include_path)))
    return export_output(scores, request.output_path)
