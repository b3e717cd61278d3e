"""Every node kind that can be dispatched to another pool: its config class and its body.
One explicit table; the ``run-node`` flow looks nodes up here. ``download-model`` is not in it:
its config never needs a particular device, so it always runs where its flow runs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grove.artifacts import StepConfig
from grove.tasks import (
    capture_adapter,
    capture_encoder,
    capture_onnx,
    check_parity,
    convert_fp16,
    evaluate,
    evaluate_adapter,
    evaluate_components,
    evaluate_encoder,
    evaluate_graph,
    export_components,
    extract_adapter,
    merge_adapter,
    optimize_graph,
    package_components,
    package_encoder,
    package_finetune,
    package_genai,
    prepare_data,
    prune_torch,
    quantize_int4,
    quantize_int8,
    quantize_torch,
    train_adapter,
)

__all__ = ["STEPS", "Step"]


@dataclass(frozen=True)
class Step:
    config: type[StepConfig]
    build: Callable[[list[Path], Any, Path], Mapping[str, object]]  # the body of ``config``'s node


STEPS: dict[str, Step] = {
    "capture-onnx": Step(capture_onnx.CaptureConfig, capture_onnx._capture),  # noqa: SLF001
    "quantize-int4": Step(quantize_int4.Int4Config, quantize_int4._quantize),  # noqa: SLF001
    "quantize-torch": Step(quantize_torch.TorchQuantConfig, quantize_torch._quantize),  # noqa: SLF001
    "prune-torch": Step(prune_torch.PruneConfig, prune_torch._prune),  # noqa: SLF001
    "evaluate": Step(evaluate.EvalConfig, evaluate._evaluate),  # noqa: SLF001
    "package-genai": Step(package_genai.PackageConfig, package_genai._package),  # noqa: SLF001
    "capture-encoder": Step(capture_encoder.CaptureEncoderConfig, capture_encoder._capture),  # noqa: SLF001
    "optimize-graph": Step(optimize_graph.GraphConfig, optimize_graph._optimize),  # noqa: SLF001
    "check-parity": Step(check_parity.ParityConfig, check_parity._check),  # noqa: SLF001
    "quantize-int8": Step(quantize_int8.Int8Config, quantize_int8._quantize),  # noqa: SLF001
    "convert-fp16": Step(convert_fp16.Fp16Config, convert_fp16._convert),  # noqa: SLF001
    "evaluate-encoder": Step(evaluate_encoder.EncoderEvalConfig, evaluate_encoder._evaluate),  # noqa: SLF001
    "package-encoder": Step(package_encoder.EncoderPackageConfig, package_encoder._package),  # noqa: SLF001
    "prepare-data": Step(prepare_data.PrepareDataConfig, prepare_data._prepare),  # noqa: SLF001
    "train-adapter": Step(train_adapter.TrainConfig, train_adapter._train),  # noqa: SLF001
    "evaluate-adapter": Step(evaluate_adapter.AdapterEvalConfig, evaluate_adapter._evaluate),  # noqa: SLF001
    "merge-adapter": Step(merge_adapter.MergeConfig, merge_adapter._merge),  # noqa: SLF001
    "package-finetune": Step(package_finetune.FinetunePackageConfig, package_finetune._package),  # noqa: SLF001
    "capture-adapter": Step(capture_adapter.CaptureAdapterConfig, capture_adapter._capture),  # noqa: SLF001
    "extract-adapter": Step(extract_adapter.ExtractAdapterConfig, extract_adapter._extract),  # noqa: SLF001
    "evaluate-graph": Step(evaluate_graph.GraphEvalConfig, evaluate_graph._evaluate),  # noqa: SLF001
    "export-components": Step(export_components.ExportComponentsConfig, export_components._export),  # noqa: SLF001
    "evaluate-components": Step(evaluate_components.ComponentsEvalConfig, evaluate_components._evaluate),  # noqa: SLF001
    "package-components": Step(package_components.ComponentsPackageConfig, package_components._package),  # noqa: SLF001
}
