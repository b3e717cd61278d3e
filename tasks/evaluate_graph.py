"""Node ``evaluate-graph``: what can be measured of any ONNX graph, whatever it computes: its size, its
latency in onnxruntime, and, given the graph it was made from, how close its outputs stay to that
graph's on the same inputs (cosine and largest difference per output). The inputs are synthetic and
seeded (the same on every run): token ids, masks and positions where the names say so, normal floats
otherwise; a graph Grove cannot feed this way is still measured for size, and its parity is reported
as not measured, with the reason."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, MeasureConfig
from grove.errors import GroveError, ParityError
from grove.node import RECIPE_CACHE, node_logger, run_node

__all__ = ["GraphEvalConfig", "evaluate_graph", "latency_ms", "synthetic_inputs"]

EVAL_JSON = "eval.json"
_SEQUENCE = 8  # tokens (or any other free dimension) fed to the graph
_PAST = 4  # tokens already in a KV cache (a "past" dimension); a "total" one is both


class GraphEvalConfig(MeasureConfig):
    NODE = "evaluate-graph"
    VERSION = 2  # 2: a free dimension written as a sum ("past_seq_len + seq_len") is past and new tokens
    repeat: int = Field(20, ge=1, description="timed runs for the latency")
    min_cosine: float | None = Field(None, ge=-1, le=1, description="fail if an output's cosine to the reference "
                                     "graph's is lower than this")


@task(name="evaluate-graph", cache_policy=RECIPE_CACHE)
def evaluate_graph(model: Artifact, reference: Artifact | None, config: GraphEvalConfig) -> Artifact:
    """A graph's size and latency, and with ``reference`` (the graph it was made from) its parity."""
    return run_node(config, [model, *([reference] if reference else [])], model.store, _evaluate)


def synthetic_inputs(session: Any, seed: int = 0, head_size: int | None = None) -> dict[str, Any]:
    """One seeded feed for every input of an onnxruntime session: a free dimension is 1 for a batch, 4 for a
    past (a KV cache's tokens), 12 for a total (past and new), else 8; integer inputs are ones for masks,
    positions for position ids, token ids below 64 otherwise; floats are standard normal. ``head_size``
    (an onnxruntime-genai folder's genai_config.json says it) sizes a KV cache's head dimension."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in session.get_inputs():
        name = arg.name.lower()
        shape = [d if isinstance(d, int) and d >= 0 else
                 head_size if head_size and ("kv_cache_dim" in str(d) or "head" in str(d).lower()) else
                 _free(str(d).lower()) for d in arg.shape]
        kind = arg.type.removeprefix("tensor(").removesuffix(")")
        if kind in ("int64", "int32"):
            if "mask" in name:
                value: Any = np.ones(shape)
            elif "position" in name:
                value = np.broadcast_to(np.arange(shape[-1] if shape else 1), shape) if shape else np.zeros(())
            else:
                value = rng.integers(0, 64, size=shape)
            feeds[arg.name] = np.asarray(value, dtype=kind)
        elif kind == "bool":
            feeds[arg.name] = np.ones(shape, dtype=bool)
        elif kind in ("float", "float16", "double"):
            dtype = {"float": np.float32, "float16": np.float16, "double": np.float64}[kind]
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            raise ValueError(f"input {arg.name} is {arg.type}, which Grove does not synthesize")
    return feeds


def _head_size(folder: Path) -> int | None:
    config = folder / "genai_config.json"
    if not config.is_file():
        return None
    size = json.loads(config.read_text()).get("model", {}).get("decoder", {}).get("head_size")
    return int(size) if size else None


def _free(dimension: str) -> int:
    if "batch" in dimension:
        return 1
    if "total" in dimension or "+" in dimension:  # e.g. mobius's "past_seq_len + seq_len"
        return _PAST + _SEQUENCE
    return _PAST if "past" in dimension else _SEQUENCE


def _session(folder: Path, provider: str, what: str) -> Any:
    import onnxruntime as ort

    name = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}[provider]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(folder / "model.onnx"), options, providers=[name])
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors name no common base
        message = str(exc).splitlines()[0][-300:]
        raise GroveError(f"{what} does not load in onnxruntime {ort.__version__} ({message})") from None


def _evaluate(inputs: list[Path], config: GraphEvalConfig, out: Path) -> dict[str, object]:
    import numpy as np

    log = node_logger()
    model_dir, *reference_dir = inputs
    metrics: dict[str, Any] = {"size_mb": round(sum(p.stat().st_size for p in model_dir.glob("model.onnx*")) / 1e6,
                                                2)}
    session = _session(model_dir, config.provider, "the graph given as the model" if not reference_dir else
                       "the int4 graph (onnxruntime's quantizer wrote a graph it cannot load: try --int4_algorithm "
                       "rtn, or another --block_size)")
    try:
        feeds = synthetic_inputs(session, head_size=_head_size(model_dir))
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's errors name no common base; reported, not raised
        reason = f"the graph did not run on synthetic inputs ({type(exc).__name__}: {str(exc)[:200]})"
        log.warning("%s: parity and latency not measured", reason)
        metrics["parity"] = {"measured": False, "reason": reason}
        (out / EVAL_JSON).write_text(json.dumps(metrics, indent=2))
        return {"size_mb": metrics["size_mb"], "parity": reason}
    metrics["latency_ms_avg"] = latency_ms(session, feeds, config.repeat)
    if reference_dir:
        expected = _session(reference_dir[0], config.provider, "the graph given as the model").run(None, feeds)
        names = [o.name for o in session.get_outputs()]
        per_output = {name: _closeness(np.asarray(got), np.asarray(want))
                      for name, got, want in zip(names, outputs, expected, strict=True)}
        cosine = min(v["cosine"] for v in per_output.values())
        metrics["parity"] = {"measured": True, "min_cosine": round(cosine, 6), "outputs": per_output}
        log.info("parity with the graph it was made from: min cosine %.5f over %d outputs", cosine, len(names))
        if config.min_cosine is not None and cosine < config.min_cosine:
            raise ParityError("the lowest output cosine to the input graph's", cosine, config.min_cosine,
                              flag="--min_cosine", fix="try --int4_algorithm rtn or a smaller --block_size")
    (out / EVAL_JSON).write_text(json.dumps(metrics, indent=2))
    flat = {k: v for k, v in metrics.items() if k != "parity"}  # eval.json has each output's numbers
    return {**flat, "min_cosine": metrics["parity"]["min_cosine"]} if "parity" in metrics else flat


def latency_ms(session: Any, feeds: dict[str, Any], repeat: int) -> float:
    """The average of ``repeat`` timed runs of ``session`` on ``feeds``, in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(1000 * (time.perf_counter() - start))
    return round(sum(times) / len(times), 3)


def _closeness(got: Any, want: Any) -> dict[str, float]:
    import numpy as np

    a, b = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    cosine = float(a @ b / norm) if norm else float(np.array_equal(a, b))
    return {"cosine": round(cosine, 6), "max_abs": round(float(np.max(np.abs(a - b))) if a.size else 0.0, 6)}
