"""``auto-opt``: one model, one target. Reads like the DAG: wiring only, no I/O, no numerics."""

from __future__ import annotations

from prefect import flow

from grove.flows.request import AutoOptRequest
from grove.tasks.capture_adapter import CaptureAdapterConfig, capture_adapter
from grove.tasks.capture_onnx import capture_onnx
from grove.tasks.download_model import download_model, resolve_source
from grove.tasks.evaluate import evaluate, fingerprint_text
from grove.tasks.evaluate_components import evaluate_components
from grove.tasks.export_components import export_components
from grove.tasks.extract_adapter import ExtractAdapterConfig, extract_adapter
from grove.tasks.import_adapter import ImportAdapterConfig, import_adapter, resolve_adapter
from grove.tasks.merge_adapter import MergeConfig, merge_adapter
from grove.tasks.package_components import package_components
from grove.tasks.package_genai import export_output, package_genai
from grove.tasks.prune_torch import prune_torch
from grove.tasks.publish_model import publish_model
from grove.tasks.publish_report import publish_report
from grove.tasks.quantize_int4 import quantize_int4
from grove.tasks.quantize_torch import quantize_torch

__all__ = ["auto_opt"]


@flow(name="auto-opt", log_prints=False)
def auto_opt(request: AutoOptRequest) -> dict[str, object]:
    """Source -> HF folder -> ONNX (reference) -> quantized -> evaluated -> packaged -> output path."""
    source = resolve_source(request.model_name_or_path, request.revision)
    text_sha = fingerprint_text(request.eval_data or "builtin:GPL-3")
    hf_model = download_model(source, request.download, request.store)
    if request.components is not None:  # a multimodal checkpoint's components, as mobius writes them
        exported = export_components(hf_model, request.exported)
        package = package_components(exported, evaluate_components(exported, request.components_evaluation),
                                     request.components_package)
        report = export_output(package, request.output_path)
        publish_report(report, request.output_path, package)
        return report
    adapter = (import_adapter(resolve_adapter(request.adapter_path), ImportAdapterConfig(), request.store)
               if request.adapter_path is not None else None)
    if adapter is not None and request.merge_adapter:
        hf_model = merge_adapter(hf_model, adapter, MergeConfig())
    reference = capture_onnx(hf_model, request.reference_capture)
    reference_eval = evaluate(reference, request.evaluation(text_sha, gate=False))
    calibration_sha = (fingerprint_text(request.calibration_data or "builtin:GPL-3")
                       if request.sparsity is not None or request.int4_algorithm_used == "gptq" else "")
    if (pruning := request.pruning(calibration_sha)) is not None:
        hf_model = prune_torch(hf_model, pruning)  # SparseGPT: the output is built from the pruned weights

    if adapter is not None and request.keeps_adapter:  # the LoRA path stays beside the base, switchable
        with_lora = capture_adapter(hf_model, adapter, CaptureAdapterConfig(**request.reference_capture.model_dump()))
        model = extract_adapter(quantize_int4(with_lora, request.int4) if request.int4 is not None else with_lora,
                                ExtractAdapterConfig())
    elif request.int4 is not None:
        model = quantize_int4(reference if pruning is None else capture_onnx(hf_model, request.reference_capture),
                              request.int4)
    elif request.int4_algorithm_used == "gptq":  # quantized before the capture; the builder keeps its integers
        model = capture_onnx(quantize_torch(hf_model, request.torch_quant(calibration_sha)), request.capture)
    elif request.capture != request.reference_capture or pruning is not None:
        model = capture_onnx(hf_model, request.capture)
    else:
        model = reference
    evaluation = (
        evaluate(model, request.evaluation(text_sha, gate=True), reference=reference_eval)
        if model is not reference
        else reference_eval
    )
    package = package_genai(model, evaluation, reference_eval, request.package)
    report = export_output(package, request.output_path)
    publish_report(report, request.output_path, package)
    if request.publish_as is not None:
        publish_model(package, *request.publish_as, source_digest=source.digest)
    return report
