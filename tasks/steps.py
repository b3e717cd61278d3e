"""Every node kind that can be dispatched to another pool: its config class and its body.
One explicit table; the ``run-node`` flow looks nodes up here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from grove.artifacts import StepConfig
from tasks import capture_onnx, evaluate, package_genai, quantize_int4

__all__ = ["STEPS", "Step"]


@dataclass(frozen=True)
class Step:
    config: type[StepConfig]
    build: Callable[[list[Path], StepConfig, Path], dict[str, object]]


STEPS: dict[str, Step] = {
    "capture-onnx": Step(capture_onnx.CaptureConfig, capture_onnx._capture),  # noqa: SLF001
    "quantize-int4": Step(quantize_int4.Int4Config, quantize_int4._quantize),  # noqa: SLF001
    "evaluate": Step(evaluate.EvalConfig, evaluate._evaluate),  # noqa: SLF001
    "package-genai": Step(package_genai.PackageConfig, package_genai._package),  # noqa: SLF001
}
