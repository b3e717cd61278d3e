"""Launching the flows: a request from auto-opt's flags (the path that serves the model, the adapter and
fine-tuning outputs it names), the runtime check of the request's provider, the store's result-storage
block, and the flow configured to keep its node results there. On a deployed stack a flow launches
another as a deployment on a pool (``run_auto_opt_on_pool``: a fleet entry); in one process it runs the
flow itself. The shell's commands and the flows that launch flows (olive-run, fleet-refresh) call this."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from grove.errors import GroveError, InvalidRequest
from grove.flows.request import EP_SHORT, AutoOptRequest
from grove.flows.request_encoder import EncoderOptRequest
from grove.flows.request_graph import GraphOptRequest
from grove.store import ArtifactStore

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem, WritableFileSystem

    from grove.artifacts import Source

__all__ = ["check_provider", "configured_flow", "request_from_flags", "result_storage", "run_auto_opt_on_pool"]


def request_from_flags(fields: dict[str, Any], source: Source | None = None,
                       decoder_fields: dict[str, Any] | None = None
                       ) -> tuple[AutoOptRequest | EncoderOptRequest | GraphOptRequest, Source]:
    """auto-opt's flags (argparse dest -> value, those given) as the request of the path that serves
    the model (an unsupported architecture raises, naming the supported ones), with the resolved
    source (``source``: already resolved; ``decoder_fields``: added when the model is a decoder, e.g.
    a fleet's eval_tokens). Raises a GroveError, or pydantic's ValidationError naming the flags."""
    from grove.flows.request_encoder import refuse_encoder_flags
    from grove.tasks import _sources
    from grove.tasks.architectures import source_spec

    _read_model_config(fields)
    if source is None:
        source = _sources.resolve(str(fields["model_name_or_path"]), fields.get("revision"))
    if source.kind == "onnx":  # a graph given as such: the graph path
        return GraphOptRequest.from_flags(fields), source
    if fields.get("adapter_path"):
        _check_adapter_base(str(fields["adapter_path"]), source, switchable=not fields.get("merge_adapter"))
    if source_spec(source).path == "decoder":
        refuse_encoder_flags(fields, str(fields["model_name_or_path"]))
        if fields.get("components") == ["all"] and not source_spec(source).multimodal:
            logging.getLogger("grove").info("%s is a text model: its one component is the text decoder, which "
                                            "auto-opt exports and evaluates", source.model_type)
            fields = {k: v for k, v in fields.items() if k != "components"}
        if fields.get("components"):  # exported as they are: no int4 default to choose
            if not source_spec(source).multimodal:
                raise InvalidRequest(f"--components: this {source.model_type} model is a text model, one component; "
                                     "drop --components (Olive's components_to_export) and auto-opt exports, quantizes "
                                     "and evaluates it")
            return AutoOptRequest(**fields, **(decoder_fields or {})), source
        if (source_spec(source).builder_int4 and fields.get("precision", "int4") == "int4"
                and not fields.get("int4_algorithm")):  # its experts: only the builder's int4 quantizes them
            logging.getLogger("grove").info("%s: its int4 is the model builder's, which quantizes its experts",
                                            source.model_type)
            fields = {**fields, "int4_algorithm": "builder"}
        if (source_spec(source).exporter == "mobius" and fields.get("device") == "gpu"
                and fields.get("precision", "int4") == "int4" and not fields.get("int4_algorithm")):
            # The GPU default, the builder's own int4, is not there for what mobius exports: onnxruntime's
            # k-quant on its fp16 graph instead (olive-recipes' Gemma 4 CUDA config).
            logging.getLogger("grove").info("%s is exported with mobius: its int4 on the GPU is onnxruntime's "
                                            "k_quant (--int4_algorithm rtn for round to nearest)", source.model_type)
            fields = {**fields, "int4_algorithm": "k_quant"}
        return AutoOptRequest(**fields, **(decoder_fields or {})), source
    return EncoderOptRequest.from_flags(fields).resolved(source), source


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


def result_storage(store_uri: str) -> WritableFileSystem:
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
        saved = cast("LocalFileSystem | RemoteFileSystem", kind.load(name))  # sync here (Prefect's dual API)
    except ValueError:  # not saved yet (or by another block type): saved below
        saved = None
    if saved is not None and saved.basepath == store.results_uri:
        return saved
    block = kind(basepath=store.results_uri)
    block.save(name, overwrite=True)
    return block


def configured_flow(request: AutoOptRequest | EncoderOptRequest | GraphOptRequest) -> Any:
    """The request's flow, with its node results (cache records) in the request's store."""
    from grove.flows.auto_opt import auto_opt
    from grove.flows.optimize_encoder import optimize_encoder
    from grove.flows.optimize_onnx import optimize_onnx
    from grove.node import RESULT_SERIALIZER

    flow: Any = (auto_opt if isinstance(request, AutoOptRequest) else
                 optimize_onnx if isinstance(request, GraphOptRequest) else optimize_encoder)
    return flow.with_options(result_storage=result_storage(request.store), result_serializer=RESULT_SERIALIZER,
                             persist_result=True)


def _read_model_config(fields: dict[str, Any]) -> None:
    """``-m`` naming a fine-tuning output (Olive's layout: model_config.json, adapter/) is its base model
    with ``--adapter_path`` its adapter, as Olive's commands read it."""
    from grove.tasks.package_finetune import MODEL_CONFIG, read_model_config

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


def _check_adapter_base(adapter_path: str, source: Source, *, switchable: bool) -> None:
    """An adapter Grove trained records its base's digest (model_config.json beside ``adapter/``): a base
    that is not that one is refused before any work (peft would fail on other shapes, or silently adapt
    another model of the same shapes). ``switchable``: kept beside the base, so it must be a plain LoRA."""
    from grove.tasks._onnx_adapter import read_adapter
    from grove.tasks.import_adapter import resolve_adapter
    from grove.tasks.package_finetune import MODEL_CONFIG, read_model_config

    adapter = resolve_adapter(adapter_path)  # an adapter folder, or one line saying what is wrong
    if switchable:
        read_adapter(Path(adapter.location))  # a DoRA, LoHa or LoKr adapter: one line naming --merge_adapter
    beside = Path(adapter.location).parent
    if not (beside / MODEL_CONFIG).is_file():
        return
    base, _, digest = read_model_config(beside)
    if digest is not None and digest != source.digest:
        raise InvalidRequest(f"the adapter {adapter_path} was trained on {base}, not on {source.location} (another "
                             f"model, or another version of it); pass -m {base}, or an adapter trained on this model")


# In-process runs (no deployed stack) take turns. A fleet's entries are checked concurrently, in
# threads of one process; two optimizations at once there share the process's import machinery
# and the exporters' global registries, which are not thread-safe: a decoder and an encoder
# refreshed together failed every time (the model builder's "cannot import name
# 'AutoModelForCausalLM' from 'transformers'", then, with the imports done first, a KeyError
# inside the builder). On a deployed stack each run is its own process on a worker.
_IN_PROCESS = threading.Lock()


def run_auto_opt_on_pool(request: AutoOptRequest | EncoderOptRequest | GraphOptRequest, device: str) -> None:
    """Run the request's auto-opt flow: on a deployed stack as the ``auto-opt-<device>`` (or
    ``auto-opt-encoder-<device>``, ``auto-opt-onnx-<device>``) deployment, a subflow; in-process otherwise.
    Raises GroveError if the run did not complete."""
    if os.environ.get("GROVE_DEVICE") and os.environ.get("PREFECT_API_URL"):
        from prefect.deployments import run_deployment

        flow = ("auto-opt" if isinstance(request, AutoOptRequest) else
                "auto-opt-onnx" if isinstance(request, GraphOptRequest) else "auto-opt-encoder")
        flow_run = cast("FlowRun", run_deployment(f"{flow}/{flow}-{device}", as_subflow=True,  # sync here
                                                  parameters={"request": request.model_dump(mode="json")}))
        state = flow_run.state
    else:
        # In this process, as `grove auto-opt` checks it: a gpu target on a machine without CUDA is one
        # line saying so, not the runtime's failure to load its CUDA library after the capture.
        check_provider(request.execution_provider, "decoder" if isinstance(request, AutoOptRequest) else "encoder")
        with _IN_PROCESS:
            state = configured_flow(request)(request, return_state=True)
    if state is None or not state.is_completed():
        raise GroveError(f"auto-opt did not complete: {state.message if state else 'no state'}")
