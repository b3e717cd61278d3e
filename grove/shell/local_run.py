"""Running a flow from the command line: checks that need no Prefect first (so bad input fails
in a second), then the embedded API, and the flow itself configured by :mod:`grove.flows.launch`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from grove.errors import InvalidRequest
from grove.flows.launch import check_provider, configured_flow, result_storage
from grove.flows.request import AutoOptRequest
from grove.flows.request_encoder import EncoderOptRequest
from grove.flows.request_graph import GraphOptRequest
from grove.store import ArtifactStore

if TYPE_CHECKING:
    from prefect.states import State

    from grove.artifacts import Source
    from grove.flows.request_benchmark import BenchmarkRequest
    from grove.flows.request_finetune import FinetuneRequest

__all__ = ["preflight", "preflight_finetune", "run_auto_opt", "run_auto_opt_state", "run_benchmark", "run_finetune",
           "run_finetune_state"]


def preflight(request: AutoOptRequest | EncoderOptRequest | GraphOptRequest, source: Source) -> None:
    """Everything that can be checked before any work, given the source ``request_from_flags`` resolved: model
    architecture, output path, store, evaluation text. Raises a GroveError naming the cause and the fix."""
    from grove.tasks._data_sources import BUILTIN_TEXT, read_text
    from grove.tasks._encoder_io import calibration_texts
    from grove.tasks.architectures import arch_spec, torch_spec
    from grove.tasks.download_model import check_safetensors
    from grove.tasks.package_genai import REPORT

    path = ("decoder" if isinstance(request, AutoOptRequest) else
            "graph" if isinstance(request, GraphOptRequest) else "encoder")
    if path != "graph" and arch_spec(source.model_type).path != path:
        raise InvalidRequest(f"{request.model_name_or_path} is a {source.model_type} model, which Grove optimizes "
                             f"on the {arch_spec(source.model_type).path} path, not the {path} path")
    if isinstance(request, AutoOptRequest):  # what loads the checkpoint in PyTorch (not image-text ones)
        if request.int4_algorithm_used == "gptq":
            torch_spec(source.model_type, "GPTQ / RTN / QuaRot / mixed-precision")
        if request.adapter_path is not None and request.merge_adapter:
            torch_spec(source.model_type, "merging an adapter")
        if arch_spec(source.model_type).builder_int4 and request.int4_algorithm_used not in (None, "builder"):
            raise InvalidRequest(f"--int4_algorithm {request.int4_algorithm_used}: a {source.model_type} model's "
                                 "experts are weights of the model builder's MoE ops, which only the builder's own "
                                 "int4 quantizes: drop --int4_algorithm (its default is builder)")
        if arch_spec(source.model_type).exporter == "mobius" and (request.int4_algorithm_used == "builder"
                                                                  or request.include_hidden_states
                                                                  or request.prune_lm_head or request.adapter_path):
            asked = ("--int4_algorithm builder" if request.int4_algorithm_used == "builder" else
                     "--include_hidden_states / --prune_lm_head" if not request.adapter_path else "--adapter_path")
            raise InvalidRequest(f"{asked}: a {source.model_type} model is exported with mobius, not the model "
                                 "builder, and mobius writes an fp32 / fp16 graph with none of the builder's "
                                 "options; its int4 is onnxruntime's (--int4_algorithm k_quant or rtn; on CPU also "
                                 "affine, the default, or hqq)")
    if source.kind == "local":
        check_safetensors(Path(source.location))
    out = Path(request.output_path).expanduser() if request.output_path is not None else None
    if out is not None and out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / REPORT).exists())):
        raise InvalidRequest(f"output path {out} exists and is not an earlier Grove output; choose a new folder")
    if out is not None:
        _check_writable_beside(out.absolute())
    check_provider(request.execution_provider, "encoder" if path == "graph" else path)  # onnxruntime alone
    ArtifactStore(request.store).check_reachable()
    if not isinstance(request, GraphOptRequest) and request.eval_data:
        _check_regular_file("--eval_data", request.eval_data)
        try:
            if path == "decoder":
                if not read_text(request.eval_data).strip():
                    raise InvalidRequest(f"--eval_data {request.eval_data} is empty: perplexity needs a text; pass "
                                         "a UTF-8 file with at least a few paragraphs, or leave --eval_data out "
                                         "for the built-in text")
            else:  # labelled rows for a classifier: their labels are checked against the model later
                from grove.tasks._encoder_io import read_labelled, read_labelled_tokens, read_scored_pairs

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
    from grove.tasks._data_sources import split_columns

    local = split_columns(uri, flag)[0].removeprefix("file://")
    if "://" not in local and Path(local).expanduser().exists() and not Path(local).expanduser().is_file():
        raise InvalidRequest(f"{flag} {uri} is not a regular file (a folder, pipe or device); the text is read "
                             "more than once: save it to a file and pass that")


def run_auto_opt(request: AutoOptRequest | EncoderOptRequest | GraphOptRequest) -> dict[str, object]:
    """Run the auto-opt flow for the request's path against the configured (or embedded) Prefect
    API; returns the report."""
    report: dict[str, object] = run_auto_opt_state(request).result()
    return report


def run_auto_opt_state(request: AutoOptRequest | EncoderOptRequest | GraphOptRequest) -> State:
    """Like run_auto_opt, but returns the flow run's final state (tests read its task runs)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.shell.server import ensure_api

    # Prefect reads its settings at import, which may have happened before the API was known.
    with temporary_settings(updates={PREFECT_API_URL: ensure_api()}):
        return cast("State", configured_flow(request)(request, return_state=True))


def run_finetune(request: FinetuneRequest) -> dict[str, object]:
    """Run the finetune flow against the configured (or embedded) Prefect API; returns the report."""
    report: dict[str, object] = run_finetune_state(request).result()
    return report


def run_finetune_state(request: FinetuneRequest) -> State:
    """Like run_finetune, but returns the flow run's final state (tests read its artifacts)."""
    from grove.flows.finetune import finetune

    return _run_state(finetune, request)


def run_benchmark(request: BenchmarkRequest) -> dict[str, object]:
    """Run the benchmark flow (lm-eval tasks) against the configured (or embedded) Prefect API; returns
    the report."""
    from grove.flows.benchmark import benchmark

    report: dict[str, object] = _run_state(benchmark, request).result()
    return report


def _run_state(flow: Any, request: FinetuneRequest | BenchmarkRequest) -> State:
    """``flow(request)`` with its node results in the request's store, against the embedded API."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from grove.node import RESULT_SERIALIZER
    from grove.shell.server import ensure_api

    with temporary_settings(updates={PREFECT_API_URL: ensure_api()}):
        configured = flow.with_options(result_storage=result_storage(request.store),
                                       result_serializer=RESULT_SERIALIZER, persist_result=True)
        return cast("State", configured(request, return_state=True))


def preflight_finetune(request: FinetuneRequest) -> None:
    """What can be checked before any work: the base model (found, a decoder Grove trains), the output
    path, the store, QLoRA's GPU, and the data (found, readable, and its first row holding what the text
    recipe reads). Raises a GroveError naming the cause and the fix."""
    from grove.tasks import _finetune_data as fd
    from grove.tasks import _sources
    from grove.tasks._report import REPORT
    from grove.tasks.architectures import source_spec, torch_spec
    from grove.tasks.package_finetune import MODEL_CONFIG

    source = _sources.resolve(request.model_name_or_path, request.revision)
    if source_spec(source).path != "decoder":
        raise InvalidRequest(f"{request.model_name_or_path} is a {source.model_type} model; grove finetune trains "
                             "decoder LLMs (text generation)")
    torch_spec(source.model_type, "fine-tuning")
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
        from grove.tasks.train_adapter import resolve_targets, skeleton

        if (model := skeleton(source)) is not None:
            resolve_targets(model, request.train(cuda=False).target_modules)
    ArtifactStore(request.store).check_reachable()
    for which in ("train", "eval"):
        files = request.files(which)
        if not files:
            continue
        fd.data_sha256(files)  # found and readable (a hub split's shards are kept in this machine's cache)
        rows = fd.read_rows(files)
        if not rows:
            raise InvalidRequest(f"-d {request.data_name}: the {which} split ({', '.join(files)}) holds no rows")
        if not request.use_chat_template:
            next(iter(fd.render(rows[:1], text_field=request.text_field, text_template=request.text_template,
                                input_cols=request.input_cols, train_on_responses=request.train_on_responses)))


