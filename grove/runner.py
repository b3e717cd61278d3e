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
    from grove.request_finetune import FinetuneRequest

__all__ = ["check_provider", "preflight", "request_from_flags", "result_storage", "run_auto_opt",
           "preflight_finetune", "run_auto_opt_state", "run_finetune", "run_finetune_state"]


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

    _read_model_config(fields)
    if source is None:
        source = _sources.resolve(str(fields["model_name_or_path"]), fields.get("revision"))
    if fields.get("adapter_path"):
        _check_adapter_base(str(fields["adapter_path"]), source)
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
    if isinstance(request, AutoOptRequest) and request.calibration_data:  # a decoder's GPTQ calibration text
        _check_regular_file("--calibration_data", request.calibration_data)
        if not read_text(request.calibration_data, "--calibration_data").strip():
            raise InvalidRequest(f"--calibration_data {request.calibration_data} is empty; pass a UTF-8 text of a "
                                 "few thousand tokens, or leave it out for the built-in text")


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


def run_finetune(request: FinetuneRequest) -> dict[str, object]:
    """Run the finetune flow against the configured (or embedded) Prefect API; returns the report."""
    report: dict[str, object] = run_finetune_state(request).result()
    return report


def run_finetune_state(request: FinetuneRequest) -> State:
    """Like run_finetune, but returns the flow run's final state (tests read its artifacts)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.finetune import finetune
    from grove.node import RESULT_SERIALIZER
    from grove.server import ensure_api

    with temporary_settings(updates={PREFECT_API_URL: ensure_api()}):
        flow = finetune.with_options(result_storage=result_storage(request.store), result_serializer=RESULT_SERIALIZER,
                                     persist_result=True)
        return flow(request, return_state=True)  # type: ignore[no-any-return]


def preflight_finetune(request: FinetuneRequest) -> None:
    """What can be checked before any work: the base model (found, a decoder Grove trains), the output
    path, the store, QLoRA's GPU, and the data (found, readable, and its first row holding what the text
    recipe reads). Raises a GroveError naming the cause and the fix."""
    from tasks import _finetune_data as fd
    from tasks import _sources
    from tasks._report import REPORT
    from tasks.package_finetune import MODEL_CONFIG
    from tasks.registry import source_spec

    source = _sources.resolve(request.model_name_or_path, request.revision)
    if source_spec(source).path != "decoder":
        raise InvalidRequest(f"{request.model_name_or_path} is a {source.model_type} model; grove finetune trains "
                             "decoder LLMs (text generation)")
    out = Path(request.output_path).expanduser()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).exists()
                                              and not (out / MODEL_CONFIG).exists())):
        raise InvalidRequest(f"output path {out} exists and is not an earlier Grove output; choose a new folder")
    _check_writable_beside(out.absolute())
    if request.method == "qlora":
        import torch

        if not torch.cuda.is_available():
            raise InvalidRequest("--method qlora loads the base in 4 bits with bitsandbytes, which needs a CUDA GPU, "
                                 "and this machine has none; use --method lora, or trigger the finetune deployment "
                                 "with method qlora so that the gpu pool runs it (grove deploy)")
    if request.target_modules:
        from tasks.train_adapter import resolve_targets, skeleton

        if (model := skeleton(source)) is not None:
            resolve_targets(model, request.train(cuda=False).target_modules)
    ArtifactStore(request.store).check_reachable()
    for which in ("train", "eval"):
        files = request.files(which)  # type: ignore[arg-type]
        if not files:
            continue
        fd.data_sha256(files)  # found and readable (a hub split's shards are kept in this machine's cache)
        rows = fd.read_rows(files)
        if not rows:
            raise InvalidRequest(f"-d {request.data_name}: the {which} split ({', '.join(files)}) holds no rows")
        if not request.use_chat_template:
            next(iter(fd.render(rows[:1], text_field=request.text_field, text_template=request.text_template,
                                input_cols=request.input_cols, train_on_responses=request.train_on_responses)))


def _read_model_config(fields: dict[str, Any]) -> None:
    """``-m`` naming a fine-tuning output (Olive's layout: model_config.json, adapter/) is its base model
    with ``--adapter_path`` its adapter, as Olive's commands read it."""
    from tasks.package_finetune import MODEL_CONFIG, read_model_config

    folder = Path(str(fields["model_name_or_path"])).expanduser()
    if not (folder / MODEL_CONFIG).is_file() or (folder / "config.json").exists():
        return
    base, adapter, _ = read_model_config(folder)
    fields["model_name_or_path"] = base
    if adapter is not None:
        if fields.get("adapter_path") and Path(str(fields["adapter_path"])).resolve() != adapter.resolve():
            raise InvalidRequest(f"-m {folder} names its adapter ({adapter}), and --adapter_path names another; "
                                 "pass one of them")
        fields["adapter_path"] = str(adapter)


def _check_adapter_base(adapter_path: str, source: Source) -> None:
    """An adapter Grove trained records its base's digest (model_config.json beside ``adapter/``): a base
    that is not that one is refused before any work (peft would fail on other shapes, or silently adapt
    another model of the same shapes)."""
    from tasks.import_adapter import resolve_adapter
    from tasks.package_finetune import MODEL_CONFIG, read_model_config

    adapter = resolve_adapter(adapter_path)  # a LoRA adapter folder, or one line saying what is wrong
    beside = Path(adapter.location).parent
    if not (beside / MODEL_CONFIG).is_file():
        return
    base, _, digest = read_model_config(beside)
    if digest is not None and digest != source.digest:
        raise InvalidRequest(f"the adapter {adapter_path} was trained on {base}, not on {source.location} (another "
                             f"model, or another version of it); pass -m {base}, or an adapter trained on this model")
