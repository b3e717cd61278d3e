"""Running a flow from the command line: checks that need no Prefect first (so bad input fails
in a second), then the embedded API, the store's result-storage block, and the flow itself."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grove.errors import InvalidRequest
from grove.request import EP_SHORT, AutoOptRequest
from grove.request_encoder import EncoderOptRequest
from grove.store import ArtifactStore

if TYPE_CHECKING:
    from prefect.states import State

    from grove.artifacts import Source

__all__ = ["check_provider", "preflight", "request_from_flags", "result_storage", "run_auto_opt",
           "run_auto_opt_state"]


def request_from_flags(fields: dict[str, Any], source: Source | None = None,
                       decoder_fields: dict[str, Any] | None = None
                       ) -> tuple[AutoOptRequest | EncoderOptRequest, Source]:
    """auto-opt's flags (argparse dest -> value, those given) as the request of the path that serves
    the model (an unsupported architecture raises, naming the supported ones), with the resolved
    source (``source``: already resolved; ``decoder_fields``: added when the model is a decoder, e.g.
    a fleet's eval_tokens). Raises a GroveError, or pydantic's ValidationError naming the flags."""
    from grove.request_encoder import refuse_encoder_flags
    from tasks import _sources
    from tasks.registry import source_spec

    if source is None:
        source = _sources.resolve(str(fields["model_name_or_path"]), fields.get("revision"))
    if source_spec(source).path == "decoder":
        refuse_encoder_flags(fields, str(fields["model_name_or_path"]))
        return AutoOptRequest(**fields, **(decoder_fields or {})), source
    return EncoderOptRequest.from_flags(fields).resolved(source), source


def preflight(request: AutoOptRequest | EncoderOptRequest, source: Source) -> None:
    """Everything that can be checked before any work, given the source ``request_from_flags`` resolved: model
    architecture, output path, store, evaluation text. Raises a GroveError naming the cause and the fix."""
    from tasks._decoder_io import BUILTIN_TEXT, read_text
    from tasks._encoder_io import calibration_texts
    from tasks.download_model import check_safetensors
    from tasks.package_genai import REPORT
    from tasks.registry import arch_spec

    path = "decoder" if isinstance(request, AutoOptRequest) else "encoder"
    if arch_spec(source.model_type).path != path:
        raise InvalidRequest(f"{request.model_name_or_path} is a {source.model_type} model, which Grove optimizes "
                             f"on the {arch_spec(source.model_type).path} path, not the {path} path")
    if source.kind == "local":
        check_safetensors(Path(source.location))
    out = Path(request.output_path).expanduser() if request.output_path is not None else None
    if out is not None and out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).exists())):
        raise InvalidRequest(f"output path {out} exists and is not an earlier Grove output; choose a new folder")
    if out is not None:
        _check_writable_beside(out.absolute())
    check_provider(request.execution_provider, path)
    ArtifactStore(request.store).check_reachable()
    if request.eval_data:
        _check_regular_file("--eval_data", request.eval_data)
        try:
            if path == "decoder":
                if not read_text(request.eval_data).strip():
                    raise InvalidRequest(f"--eval_data {request.eval_data} is empty: perplexity needs a text; pass "
                                         "a UTF-8 file with at least a few paragraphs, or leave --eval_data out "
                                         "for the built-in text")
            else:  # labelled rows for a classifier: their labels are checked against the model later
                from tasks._encoder_io import read_labelled, read_labelled_tokens, read_scored_pairs

                reader = {"token-classification": read_labelled_tokens, "feature-extraction": read_scored_pairs}
                reader.get(getattr(request, "task", None) or "", read_labelled)(request.eval_data)
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"--eval_data {request.eval_data} cannot be read as UTF-8 text ({exc})") from exc
    quantize = request.int8 if isinstance(request, EncoderOptRequest) else None
    if quantize is not None and quantize.mode == "static" and quantize.calibration_data != BUILTIN_TEXT:
        _check_regular_file("--calibration_data", quantize.calibration_data)
        calibration_texts(quantize.calibration_data, quantize.calibration_samples)


def _check_writable_beside(out: Path) -> None:
    """The output is staged beside its final place, at the end of the run: make sure a folder can be
    created there now (in the nearest existing parent; the probe is removed), not after all the work."""
    import tempfile

    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    try:
        Path(tempfile.mkdtemp(prefix=".grove-probe-", dir=parent)).rmdir()
    except OSError as exc:
        raise InvalidRequest(f"output path {out} cannot be written: {parent} does not take new folders "
                             f"({exc.strerror or exc}); choose another --output_path") from exc


def _check_regular_file(flag: str, uri: str) -> None:
    """A local text that is a folder, pipe or device is refused (reading a pipe would wait forever)."""
    from tasks._decoder_io import split_columns

    local = split_columns(uri, flag)[0].removeprefix("file://")
    if "://" not in local and Path(local).expanduser().exists() and not Path(local).expanduser().is_file():
        raise InvalidRequest(f"{flag} {uri} is not a regular file (a folder, pipe or device); the text is read "
                             "more than once: save it to a file and pass that")


_EP_NAMES = {short: name for name, short in EP_SHORT.items()}


def check_provider(provider: str, path: str) -> None:
    """A run in this process measures on ``provider`` here: refuse before any work if this
    onnxruntime (and, for decoders, onnxruntime-genai) cannot run it, instead of a traceback
    after the capture (or, for encoders, onnxruntime's silent fallback to the CPU)."""
    if provider == "cpu":
        return
    import onnxruntime as ort
    import onnxruntime_genai as og

    name = _EP_NAMES[provider]
    missing = [] if name in ort.get_available_providers() else [f"onnxruntime {ort.__version__} has only "
                                                                  f"{', '.join(ort.get_available_providers())}"]
    if path == "decoder" and not getattr(og, f"is_{provider}_available")():
        missing.append(f"onnxruntime-genai {og.__version__} was built without {provider.upper()}")
    if missing:
        packages = ("onnxruntime-gpu and onnxruntime-genai-cuda" if provider == "cuda"
                    else "onnxruntime-directml and onnxruntime-genai-directml")
        raise InvalidRequest(f"--provider {name} is not available on this machine ({'; '.join(missing)}); run on "
                             f"a machine with {packages} installed, or trigger the auto-opt-gpu deployment so that "
                             "the gpu pool runs it (grove deploy)")


def result_storage(store_uri: str) -> object:
    """A saved Prefect block for the store's ``prefect-results/`` folder (Prefect needs a saved
    block so that workers elsewhere resolve the same place).

    The block saved by an earlier run is read, not written again: every run needs it, and runs
    started together on one server would otherwise queue on the same write (one waited ~8 s).
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    store = ArtifactStore(store_uri)
    name = "grove-results-" + hashlib.sha256(store.uri.encode()).hexdigest()[:12]
    kind = LocalFileSystem if store.is_local else RemoteFileSystem
    try:
        saved = kind.load(name)
    except ValueError:  # not saved yet (or by another block type): saved below
        saved = None
    if saved is not None and saved.basepath == store.results_uri:
        return saved
    block = kind(basepath=store.results_uri)
    block.save(name, overwrite=True)
    return block


def run_auto_opt(request: AutoOptRequest | EncoderOptRequest) -> dict[str, object]:
    """Run the auto-opt flow for the request's path against the configured (or embedded) Prefect
    API; returns the report."""
    report: dict[str, object] = run_auto_opt_state(request).result()
    return report


def run_auto_opt_state(request: AutoOptRequest | EncoderOptRequest) -> State:
    """Like run_auto_opt, but returns the flow run's final state (tests read its task runs)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.server import ensure_api

    # Prefect reads its settings at import, which may have happened before the API was known.
    with temporary_settings(updates={PREFECT_API_URL: ensure_api()}):
        return configured_flow(request)(request, return_state=True)  # type: ignore[no-any-return]


def configured_flow(request: AutoOptRequest | EncoderOptRequest) -> Any:
    """The request's flow, with its node results (cache records) in the request's store."""
    from grove.node import RESULT_SERIALIZER

    if isinstance(request, AutoOptRequest):
        from flows.optimize_model import auto_opt as flow
    else:
        from flows.optimize_encoder import optimize_encoder as flow
    return flow.with_options(result_storage=result_storage(request.store),  # type: ignore[attr-defined]
                             result_serializer=RESULT_SERIALIZER, persist_result=True)
