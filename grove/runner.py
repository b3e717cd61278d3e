"""Running a flow from the command line: checks that need no Prefect first (so bad input fails
in a second), then the embedded API, the store's result-storage block, and the flow itself."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from grove.errors import InvalidRequest
from grove.request import AutoOptRequest
from grove.store import ArtifactStore

if TYPE_CHECKING:
    from prefect.states import State

__all__ = ["preflight", "result_storage", "run_auto_opt", "run_auto_opt_state"]


def preflight(request: AutoOptRequest) -> None:
    """Everything that can be checked before any work: model source and architecture, output
    path, store, evaluation text. Raises a GroveError naming the cause and the fix."""
    from tasks import _sources
    from tasks._decoder_io import read_text
    from tasks.package_genai import REPORT
    from tasks.download_model import check_safetensors
    from tasks.registry import arch_spec

    source = _sources.resolve(request.model_name_or_path, request.revision)
    arch_spec(source.model_type)
    if source.kind == "local":
        check_safetensors(Path(source.location))
    out = Path(request.output_path).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).exists())):
        raise InvalidRequest(f"output path {out} exists and is not an earlier Grove output; choose a new folder")
    ArtifactStore(request.store).check_reachable()
    if request.eval_data:
        try:
            read_text(request.eval_data)
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"--eval_data {request.eval_data} cannot be read as UTF-8 text ({exc})") from exc


def result_storage(store_uri: str) -> object:
    """A saved Prefect block for the store's ``prefect-results/`` folder (Prefect needs a saved
    block so that workers elsewhere resolve the same place)."""
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    store = ArtifactStore(store_uri)
    name = "grove-results-" + hashlib.sha256(store.uri.encode()).hexdigest()[:12]
    block = (LocalFileSystem(basepath=store.results_uri) if store.is_local
             else RemoteFileSystem(basepath=store.results_uri))
    block.save(name, overwrite=True)
    return block


def run_auto_opt(request: AutoOptRequest) -> dict[str, object]:
    """Run the auto-opt flow against the configured (or embedded) Prefect API; returns the report."""
    state = run_auto_opt_state(request)
    report: dict[str, object] = state.result()
    return report


def run_auto_opt_state(request: AutoOptRequest) -> State:
    """Like run_auto_opt, but returns the flow run's final state (tests read its task runs)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.server import ensure_api

    # Prefect reads its settings at import, which may have happened before the API was known.
    with temporary_settings(updates={PREFECT_API_URL: ensure_api()}):
        from flows.optimize_model import auto_opt
        from grove.node import RESULT_SERIALIZER

        flow = auto_opt.with_options(result_storage=result_storage(request.store),  # type: ignore[arg-type]
                                     result_serializer=RESULT_SERIALIZER, persist_result=True)
        return flow(request, return_state=True)
