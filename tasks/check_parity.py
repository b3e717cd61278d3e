"""Node ``check-parity``: run a candidate ONNX encoder and its reference on fixed sentences and
compare them: max abs difference, mean (and min) cosine of the embedding / logits, top-1
agreement for classifiers. A violation of the precision's tolerance raises ParityError with
the numbers; nothing passes silently. Writes ``parity.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.errors import ParityError
from grove.node import RECIPE_CACHE, node_logger, run_node
from tasks import _encoder_io as eio

__all__ = ["PARITY_LIMITS", "ParityConfig", "check_parity"]

# (max abs diff, min mean cosine, min top-1 agreement) per precision. fp32 graph rewrites are
# the same maths (measured ~1e-6 on MiniLM); fp16 rounds to 11-bit mantissas (measured cosine
# > 0.9999); int8 per-channel dynamic measured cosine 0.993 on MiniLM, top-1 flips only
# where logits nearly tie. max abs is not gated for int8: logit scales vary per model.
PARITY_LIMITS: dict[str, tuple[float | None, float, float]] = {
    "fp32": (1e-3, 0.9999, 1.0),
    "fp16": (5e-2, 0.999, 0.95),
    "int8": (None, 0.98, 0.75),
}


class ParityConfig(StepConfig):
    NODE = "check-parity"
    VERSION = 1
    precision: Literal["fp32", "fp16", "int8"] = Field(description="precision of the candidate; picks the limits")
    max_abs_diff: float | None = Field(None, gt=0, description="override: largest allowed |candidate - "
                                       "reference| (None: the precision's default)")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="override: smallest allowed mean cosine")
    min_top1: float | None = Field(None, ge=0, le=1, description="override: smallest allowed top-1 agreement "
                                   "(classifiers)")
    texts: list[str] = Field(default_factory=lambda: list(eio.PARITY_TEXTS), description="fixed sentences compared")

    def limits(self) -> tuple[float | None, float, float]:
        abs_limit, cos_limit, top1_limit = PARITY_LIMITS[self.precision]
        return (self.max_abs_diff if self.max_abs_diff is not None else abs_limit,
                self.min_cosine if self.min_cosine is not None else cos_limit,
                self.min_top1 if self.min_top1 is not None else top1_limit)


@task(name="check-parity", cache_policy=RECIPE_CACHE)
def check_parity(candidate: Artifact, reference: Artifact, config: ParityConfig) -> Artifact:
    """Compare two ONNX encoder artifacts; raises ParityError on a violation."""
    return run_node(config, [candidate, reference], candidate.store, _check)


def _check(inputs: list[Path], config: ParityConfig, out: Path) -> dict[str, object]:
    candidate_dir, reference_dir = inputs
    numbers = compare(candidate_dir, reference_dir, config.texts)
    (out / "parity.json").write_text(json.dumps({"precision": config.precision, **numbers,
                                                 "limits": list(config.limits())}, indent=2))
    node_logger().info("parity (%s): max abs %.3g, mean cosine %.5f (min %.5f), top-1 %s", config.precision,
                       numbers["max_abs_diff"], numbers["mean_cosine"], numbers["min_cosine"], numbers["top1_agreement"])
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
    real = mask.astype(bool)[..., None] if got.ndim == 3 else slice(None)
    cos = eio.cosine_rows(got, want, mask)
    top1: float | None = None
    if info.task != "feature-extraction":
        agree = got.argmax(-1) == want.argmax(-1)
        top1 = float(agree[mask.astype(bool)].mean() if agree.ndim == 2 else agree.mean())
    diff = abs(got - want)
    return {"output": output, "texts": len(texts), "max_abs_diff": float((diff * real).max() if got.ndim == 3
                                                                         else diff.max()),
            "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "top1_agreement": top1}


def _enforce(numbers: dict[str, object], config: ParityConfig) -> None:
    abs_limit, cos_limit, top1_limit = config.limits()
    detail = (f"{config.precision} candidate vs reference on {numbers['texts']} fixed sentences, output "
              f"'{numbers['output']}': max abs diff {numbers['max_abs_diff']:.4g}, mean cosine "
              f"{numbers['mean_cosine']:.5f} (min {numbers['min_cosine']:.5f}), top-1 agreement "
              f"{numbers['top1_agreement']}")
    max_abs, mean_cos, top1 = numbers["max_abs_diff"], numbers["mean_cosine"], numbers["top1_agreement"]
    assert isinstance(max_abs, float) and isinstance(mean_cos, float)
    if abs_limit is not None and max_abs > abs_limit:
        raise ParityError("max abs diff", max_abs, abs_limit, detail)
    if mean_cos < cos_limit:
        raise ParityError("mean cosine", mean_cos, cos_limit, detail)
    if isinstance(top1, float) and top1 < top1_limit:
        raise ParityError("top-1 agreement", top1, top1_limit, detail)
