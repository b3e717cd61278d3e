"""``olive-run``: an Olive workflow config (the JSON of ``olive run --config``) pasted in the
dashboard, run as the auto-opt it amounts to (``grove run --config`` on the command line).

Whoever can open the dashboard can paste a config, and it runs on a shared worker: so a config reads
no file of the worker's outside the store (a model or data file named by an absolute path, ``~``,
``..`` or a relative path that exists there is refused, unless it lies inside a local store; hub ids,
``s3://``, ``hf://`` and ``pkg:`` sources are not the worker's files) and writes only to the run's
``output_path`` parameter (the config's ``output_dir`` is not used: without the parameter the output
stays in the store). ``grove run --config`` on one's own machine has none of these limits.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from grove.errors import InvalidRequest
from grove.flows.auto_opt import auto_opt
from grove.flows.benchmark import benchmark
from grove.flows.finetune import finetune
from grove.flows.launch import request_from_flags
from grove.flows.olive_config import translate
from grove.flows.optimize_encoder import optimize_encoder
from grove.flows.optimize_onnx import optimize_onnx
from grove.flows.request_benchmark import BenchmarkRequest
from grove.flows.request_encoder import EncoderOptRequest
from grove.flows.request_finetune import FinetuneRequest
from grove.flows.request_graph import GraphOptRequest

__all__ = ["olive_run"]


@flow(name="olive-run", log_prints=False)
def olive_run(config: dict[str, Any], output_path: str | None = None) -> dict[str, object]:
    """``config``: the workflow config's JSON; ``output_path``: a folder on the worker, instead of the
    config's output_dir (none: the output stays in the store, linked from the run's page)."""
    translation = translate(config, {"output_path": output_path} if output_path else None)
    log = get_run_logger()
    for note in translation.notes:
        log.info("%s", note)
    flags = {k: v for k, v in translation.flags.items() if k != "log_level"}  # the worker's logging stands
    if not output_path and flags.pop("output_path", None) is not None:
        log.info("output_dir: not used from the dashboard (a config writes only to the run's output_path); the "
                 "output stays in the store, linked from this run's page")
    confine_paths({**flags, **{k: v for k, v in (translation.finetune or {}).items() if k in _READS}}, output_path)
    log.info("the config is: %s", translation.command())
    keep = ("model_name_or_path", "revision", "trust_remote_code", "store", "device")
    if translation.benchmark is not None and not translation.benchmark_after:  # no passes: the input model
        return benchmark(BenchmarkRequest(**{k: v for k, v in flags.items() if k in keep},
                                          output_path=output_path, **translation.benchmark))
    if translation.finetune is None:
        report = _optimize(flags)
    else:
        with tempfile.TemporaryDirectory(prefix="grove-olive-run-") as scratch:
            tuning = {**translation.finetune}
            if not output_path:  # the adapter's folder for auto-opt to read; its nodes' outputs stay in the store
                tuning["output_path"] = flags["model_name_or_path"] = str(Path(scratch) / "finetuned")
            finetune(FinetuneRequest(**tuning))
            report = _optimize(flags)
    if translation.benchmark is not None and output_path:  # the LMEvaluator scores the output
        benchmark(BenchmarkRequest(model_name_or_path=output_path, output_path=f"{output_path}/lm-eval",
                                   **{k: v for k, v in flags.items() if k in ("store", "device")},
                                   **translation.benchmark))
    elif translation.benchmark is not None:
        log.info("lm-eval tasks not scored: the output stays in the store without an output_path; give one, or "
                 "run grove benchmark on the output")
    return report


def _optimize(flags: dict[str, Any]) -> dict[str, object]:
    request, _ = request_from_flags(flags)
    if isinstance(request, EncoderOptRequest):
        return optimize_encoder(request)
    if isinstance(request, GraphOptRequest):
        return optimize_onnx(request)
    return auto_opt(request)


_READS = ("model_name_or_path", "eval_data", "calibration_data", "data_name", "data_files")


def confine_paths(flags: dict[str, Any], output_path: str | None) -> None:
    """Refuse, in one error, every file of the worker's a dashboard config would read outside the store,
    and an ``output_path`` that climbs out of itself with ``..``."""
    from grove.store import ArtifactStore, default_store_uri

    store = ArtifactStore(str(flags.get("store") or default_store_uri()))
    root = Path(store.root).resolve() if store.is_local else None
    refused = [f"{name} {flags[name]}" for name in _READS if flags.get(name) and not _readable(str(flags[name]), root)]
    if output_path and ".." in Path(output_path).parts:
        refused.append(f"output_path {output_path} (it climbs out of itself with '..')")
    if refused:
        raise InvalidRequest(f"a config run from the dashboard reads no file of the worker's outside the store: "
                             f"{'; '.join(refused)}; name the model by its hub id, an s3:// folder or a pkg: source, "
                             "and data by s3:// or hf://datasets/..., or run 'grove run --config' on your own machine")


def _readable(value: str, store_root: Path | None) -> bool:
    """Whether a source (a model or data file) is not the worker's own file, or lies inside a local store."""
    value = value.split("#", 1)[0]  # a data file's column suffix
    if value.startswith("pkg:"):
        return ".." not in Path(value[len("pkg:"):]).parts
    if "://" in value and not value.startswith("file://"):
        return True  # s3://, hf://: read through their clients, not from the worker's disk
    path = Path(value.removeprefix("file://"))
    local = path.is_absolute() or value.startswith("~") or ".." in path.parts or path.exists()
    if not local:
        return True  # a hub id (org/name)
    return store_root is not None and path.expanduser().resolve().is_relative_to(store_root)
