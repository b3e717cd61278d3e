"""Node ``check-parity``: run a candidate ONNX encoder and its reference on fixed sentences and
compare them: max abs difference, mean (and min) cosine of the embedding / logits; for
classifiers also top-1 agreement and the largest change of any class probability. A violation
of the precision's tolerance raises ParityError with the numbers; nothing passes silently.
Writes ``parity.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.errors import ParityError
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks import _encoder_io as eio

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PARITY_LIMITS", "ParityConfig", "Tolerance", "check_parity", "compare"]


@dataclass(frozen=True)
class Tolerance:
    max_abs_diff: float | None  # None: not gated (int8: the logit / embedding scale varies per model)
    min_cosine: float  # embeddings (feature extraction): mean cosine of the output rows
    min_top1: float  # classifiers: share of rows (tokens) whose predicted class is unchanged
    max_prob_diff: float  # classifiers: largest change of any class probability (softmax of the logits)


# fp32 graph rewrites are the same maths (measured ~1e-6 on MiniLM); fp16 rounds to 11-bit
# mantissas (measured cosine > 0.9999); int8 per-channel dynamic measured embedding cosine 0.992
# on MiniLM. For classifiers the gate is what the user gets, the class and its probability:
# the cosine of raw logits is not (logits are shift-invariant under softmax, and a 3-class
# logit vector near zero swings its direction on noise the probabilities do not show).
PARITY_LIMITS: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs_diff=1e-3, min_cosine=0.9999, min_top1=1.0, max_prob_diff=1e-3),
    "fp16": Tolerance(max_abs_diff=5e-2, min_cosine=0.999, min_top1=0.95, max_prob_diff=0.01),
    "int8": Tolerance(max_abs_diff=None, min_cosine=0.98, min_top1=0.75, max_prob_diff=0.10),
}


class ParityConfig(StepConfig):
    NODE = "check-parity"
    VERSION = 2  # 2: classifiers gated on top-1 and class probabilities, not on raw-logit cosine
    precision: Literal["fp32", "fp16", "int8"] = Field(description="precision of the candidate; picks the limits")
    max_abs_diff: float | None = Field(None, gt=0, description="override: largest allowed |candidate - "
                                       "reference| (None: the precision's default)")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="override: smallest allowed mean cosine "
                                     "(embeddings)")
    min_top1: float | None = Field(None, ge=0, le=1, description="override: smallest allowed top-1 agreement "
                                   "(classifiers)")
    max_prob_diff: float | None = Field(None, gt=0, le=1, description="override: largest allowed change of a "
                                        "class probability (classifiers)")
    texts: list[str] = Field(default_factory=lambda: list(eio.PARITY_TEXTS), description="fixed sentences compared")

    def limits(self) -> Tolerance:
        """The precision's tolerance with this config's overrides applied."""
        base = PARITY_LIMITS[self.precision]
        return Tolerance(
            max_abs_diff=self.max_abs_diff if self.max_abs_diff is not None else base.max_abs_diff,
            min_cosine=self.min_cosine if self.min_cosine is not None else base.min_cosine,
            min_top1=self.min_top1 if self.min_top1 is not None else base.min_top1,
            max_prob_diff=self.max_prob_diff if self.max_prob_diff is not None else base.max_prob_diff)


@task(name="check-parity", cache_policy=RECIPE_CACHE)
def check_parity(candidate: Artifact, reference: Artifact, config: ParityConfig) -> Artifact:
    """Compare two ONNX encoder artifacts; raises ParityError on a violation."""
    return run_node(config, [candidate, reference], candidate.store, _check)


def _check(inputs: list[Path], config: ParityConfig, out: Path) -> dict[str, object]:
    candidate_dir, reference_dir = inputs
    numbers = compare(candidate_dir, reference_dir, config.texts)
    (out / "parity.json").write_text(json.dumps({"precision": config.precision, **numbers,
                                                 "limits": vars(config.limits())}, indent=2))
    node_logger().info("parity (%s): %s", config.precision, _summary(numbers))
    _enforce(numbers, config)
    return numbers


def compare(candidate_dir: Path, reference_dir: Path, texts: list[str] | tuple[str, ...]) -> dict[str, object]:
    """The parity numbers of candidate vs reference on ``texts`` (no limits applied)."""
    info = eio.encoder_info(reference_dir)
    output = eio.primary_output(info)
    feeds = eio.encode(reference_dir, texts, info.inputs)
    got = eio.run(eio.session(candidate_dir / "model.onnx"), feeds, output)
    want = eio.run(eio.session(reference_dir / "model.onnx"), feeds, output)
    mask = feeds["attention_mask"]
    real = mask.astype(bool) if got.ndim == 3 else slice(None)  # per-token outputs: real tokens only
    cos = eio.cosine_rows(got, want, mask)
    top1: float | None = None
    prob_diff: float | None = None
    if info.task != "feature-extraction":
        top1 = float((got.argmax(-1) == want.argmax(-1))[real].mean())
        prob_diff = float(abs(_softmax(got) - _softmax(want))[real].max())
    return {"output": output, "texts": len(texts), "max_abs_diff": float(abs(got - want)[real].max()),
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "top1_agreement": top1,
            "max_prob_diff": prob_diff}


def _summary(numbers: dict[str, object]) -> str:
    """The parity numbers in words; a classifier's top-1 and class probabilities only where computed."""
    top1, prob_diff = numbers["top1_agreement"], numbers["max_prob_diff"]
    return (f"max abs diff {numbers['max_abs_diff']:.4g}, mean cosine {numbers['mean_cosine']:.5f} "
            f"(min {numbers['min_cosine']:.5f})"
            + (f", top-1 agreement {top1:.4g}, max class-probability change {prob_diff:.4g}"
               if isinstance(top1, float) and isinstance(prob_diff, float) else ""))


def _softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    shifted = np.exp(logits - logits.max(-1, keepdims=True))
    return shifted / shifted.sum(-1, keepdims=True)


def _enforce(numbers: dict[str, object], config: ParityConfig) -> None:
    limits = config.limits()
    top1, prob_diff = numbers["top1_agreement"], numbers["max_prob_diff"]
    detail = (f"{config.precision} candidate vs reference on {numbers['texts']} fixed sentences, output "
              f"'{numbers['output']}': {_summary(numbers)}")
    fix = _FIXES[config.precision]
    max_abs, mean_cos = float(numbers["max_abs_diff"]), float(numbers["mean_cosine"])  # type: ignore[arg-type]
    if limits.max_abs_diff is not None and max_abs > limits.max_abs_diff:
        raise ParityError("max abs diff", max_abs, limits.max_abs_diff, detail, fix=fix)
    if not isinstance(top1, float):  # embeddings: their direction is the output
        if mean_cos < limits.min_cosine:
            raise ParityError("mean cosine", mean_cos, limits.min_cosine, detail, flag="--min_cosine", fix=fix)
        return
    if top1 < limits.min_top1:
        raise ParityError("top-1 agreement", top1, limits.min_top1, detail, fix=fix)
    if isinstance(prob_diff, float) and prob_diff > limits.max_prob_diff:
        raise ParityError("max class-probability change", prob_diff, limits.max_prob_diff, detail, fix=fix)


# What to change when a precision's check fails, in auto-opt's flags (fp32: the graph optimizer's check).
_FIXES = {
    "int8": "try per-channel weight scales (--per_channel), static int8 with calibration text (--int8_mode static "
            "--calibration_data FILE), leaving the sensitive layers in fp32 (--nodes_to_exclude, "
            "--op_types_to_quantize), or --precision fp16 or fp32",
    "fp16": "try --precision fp32 (on CPU, int8 is the faster choice)",
    "fp32": "the graph optimizer's fusions changed the outputs, which is a bug: please report it with the model id",
}
