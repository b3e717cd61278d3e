"""``olive-run``: an Olive workflow config (the JSON of ``olive run --config``) pasted in the
dashboard, run as the auto-opt it amounts to (``grove run --config`` on the command line)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows.optimize_encoder import optimize_encoder
from flows.optimize_model import auto_opt
from grove.olive_config import translate
from grove.request_encoder import EncoderOptRequest
from grove.runner import request_from_flags

__all__ = ["olive_run"]


@flow(name="olive-run", log_prints=False)
def olive_run(config: dict[str, Any], output_path: str | None = None) -> dict[str, object]:
    """``config``: the workflow config's JSON; ``output_path``: a folder on the worker, instead of the
    config's output_dir (none: the output stays in the store, linked from the run's page)."""
    translation = translate(config, {"output_path": output_path} if output_path else None, require_output=False)
    log = get_run_logger()
    for note in translation.notes:
        log.info("%s", note)
    log.info("the config is: %s", translation.command())
    flags = {k: v for k, v in translation.flags.items() if k != "log_level"}  # the worker's logging stands
    request, _ = request_from_flags(flags)
    if isinstance(request, EncoderOptRequest):
        return optimize_encoder(request)
    return auto_opt(request)
