"""Node ``capture-encoder``: a Hugging Face encoder folder (BERT, RoBERTa, DistilBERT) ->
``model.onnx`` with dynamic batch and sequence axes, the tokenizer files, and
``grove_encoder.json`` (task, inputs, outputs, pooling) that the later nodes read.

For sentence-transformers folders (``modules.json`` + ``1_Pooling/config.json``) the mean
pooling over ``attention_mask`` and the L2 normalisation go into the graph as the extra output
``sentence_embedding``, so the ONNX embedding equals ``SentenceTransformer.encode()``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.errors import GroveError, InvalidRequest, UnsupportedArchitecture
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks._choices import EncoderTask
from grove.tasks._encoder_io import ENCODER_JSON
from grove.tasks.architectures import ARCHITECTURES, encoder_spec

__all__ = ["CaptureEncoderConfig", "EncoderTask", "ExportFailed", "capture_encoder", "sentence_transformers_pipeline"]

_WEIGHTS = (".safetensors", ".bin", ".pt", ".h5", ".msgpack", ".onnx")


class CaptureEncoderConfig(StepConfig):
    NODE = "capture-encoder"
    VERSION = 2  # 2: Normalize only when modules.json lists it (was: every mean-pooled model)
    task: EncoderTask = Field("feature-extraction", description="what the head computes: hidden states "
                              "(+ sentence embedding), sequence logits or token logits")
    opset: int = Field(18, ge=17, le=21, description="ONNX opset of the exported graph")
    example_length: int = Field(16, ge=4, le=512, description="tokens in the example input used for tracing; the "
                                "sequence axis stays dynamic")
    exporter: Literal["auto", "dynamo", "torchscript"] = Field("auto", description="auto: the dynamo exporter, "
                                                               "falling back to TorchScript where it fails; "
                                                               "dynamo / torchscript: that exporter only")


class ExportFailed(GroveError):
    """torch.onnx.export failed with every exporter tried; the message names each failure."""


@task(name="capture-encoder", cache_policy=RECIPE_CACHE)
def capture_encoder(model: Artifact, config: CaptureEncoderConfig) -> Artifact:
    """HF folder artifact -> ONNX encoder artifact. Raises UnsupportedArchitecture for decoders."""
    return run_node(config, [model], model.store, _capture)


def _capture(inputs: list[Path], config: CaptureEncoderConfig, out: Path) -> dict[str, object]:
    (src,) = inputs
    hf_config = json.loads((src / "config.json").read_text())
    model_type = str(hf_config.get("model_type"))
    if (spec := encoder_spec(model_type)) is None:
        encoders = sorted(k for k, v in ARCHITECTURES.items() if v.path == "encoder")
        raise UnsupportedArchitecture(model_type, encoders, path="encoder")
    pooling, normalize = sentence_transformers_pipeline(src) if config.task == "feature-extraction" else (None, False)
    names = list(spec.inputs)
    outputs = (["last_hidden_state"] + (["sentence_embedding"] if pooling else [])
               if config.task == "feature-extraction" else ["logits"])
    exporter = _export(src, config, names, outputs, out / "model.onnx", pooling, normalize)
    for f in src.iterdir():  # tokenizer + config files; the weights now live in the graph
        if f.is_file() and not f.name.endswith(_WEIGHTS) and f.name not in ("manifest.json", "README.md"):
            shutil.copy2(f, out / f.name)
    info = {"task": config.task, "model_type": model_type, "inputs": names, "outputs": outputs, "pooling": pooling,
            "normalize": normalize, "num_heads": _field(hf_config, "num_attention_heads", "n_heads"),
            "hidden_size": _field(hf_config, "hidden_size", "dim"), "exporter": exporter, "opset": config.opset}
    (out / ENCODER_JSON).write_text(json.dumps(info, indent=2))
    return {"model_type": model_type, "task": config.task, "exporter": exporter, "pooling": pooling,
            "outputs": outputs, "nodes": _node_count(out / "model.onnx")}


_ST_MODULES = ("Transformer", "Pooling", "Normalize")  # the sentence-transformers modules the graph computes
# The sentence-transformers pooling modes the graph computes (one at a time): mean (all-MiniLM,
# e5, gte), the first token's state (bge, mxbai), the largest value over the tokens.
_POOLING = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


def sentence_transformers_pipeline(src: Path) -> tuple[str | None, bool]:
    """(pooling, normalize) of the model's sentence-transformers pipeline (``modules.json``):
    ('mean', 'cls' or 'max', whether a Normalize module follows); (None, False) for a plain
    transformers folder (hidden states only). A module the graph would not compute (Dense, another
    pooling) is refused: the embedding would silently differ from the library's."""
    listing = src / "modules.json"
    if not listing.exists():
        return None, False
    try:
        modules = {str(m.get("type", "")).rsplit(".", 1)[-1]: m for m in json.loads(listing.read_text())}
    except (ValueError, TypeError, AttributeError) as exc:
        raise InvalidRequest(f"{listing} is not a sentence-transformers module list ({exc.__class__.__name__}: "
                             f"{exc}); the model folder is corrupt: download it again") from None
    other = [m.get("type") for kind, m in modules.items() if kind not in _ST_MODULES]
    if other:
        raise InvalidRequest(f"sentence-transformers module(s) {other} are not supported (Grove's graph computes "
                             f"{' + '.join(_ST_MODULES)}); to export the transformer's hidden states only, pass a "
                             "copy of the folder without modules.json")
    if "Pooling" not in modules:
        return None, False
    pooling = src / str(modules["Pooling"].get("path") or "1_Pooling") / "config.json"
    if not pooling.exists():
        raise InvalidRequest(f"modules.json lists a Pooling module but {pooling.relative_to(src)} is missing; the "
                             "model folder is incomplete: download it again with its subfolders")
    modes = json.loads(pooling.read_text())
    active = [k for k, v in modes.items() if k.startswith("pooling_mode") and v]
    if len(active) != 1 or active[0] not in _POOLING:
        raise InvalidRequest(f"sentence-transformers pooling {active} is not supported: Grove's graph computes one of "
                             f"{', '.join(_POOLING)} (to export the transformer's hidden states only, pass a copy of "
                             "the folder without modules.json)")
    return _POOLING[active[0]], "Normalize" in modules


def _field(config: dict[str, Any], *names: str) -> int:
    return int(next(config[n] for n in names if n in config))


def _export(src: Path, config: CaptureEncoderConfig, names: list[str], outputs: list[str], dst: Path,
            pooling: str | None = None, normalize: bool = False) -> str:
    """Export with the dynamo exporter; fall back to TorchScript where dynamo fails (``exporter``
    'auto'), or use the one exporter asked for. Returns which one wrote ``dst``."""
    import torch

    log = node_logger()
    wrapper = _wrapper(src, config.task, len(names), pooling=pooling, normalize=normalize)
    args = _example(src, names, config.example_length)
    tried = ["dynamo", "torchscript"] if config.exporter == "auto" else [config.exporter]
    failures: list[str] = []
    for exporter in tried:
        try:
            if exporter == "dynamo":
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
                torch.onnx.export(wrapper, args, str(dst), dynamo=True, external_data=False,
                                  opset_version=config.opset, input_names=names, output_names=outputs, verbose=False,
                                  dynamic_shapes={n: {0: batch, 1: seq} for n in names})
            else:
                axes = {n: {0: "batch", 1: "sequence"} for n in names} | {o: {0: "batch"} for o in outputs}
                torch.onnx.export(wrapper, args, str(dst), dynamo=False, opset_version=config.opset,
                                  input_names=names, output_names=outputs, dynamic_axes=axes)
            return exporter
        except Exception as exc:  # noqa: BLE001 - the exporters raise many types; the next may still work
            failures.append(f"{exporter} exporter: {exc.__class__.__name__}: {' '.join(str(exc).split())[:300]}")
            dst.unlink(missing_ok=True)
            if exporter != tried[-1]:
                log.warning("%s; falling back to the %s exporter", failures[-1], tried[-1])
    src_type = json.loads((src / "config.json").read_text()).get("model_type")
    raise ExportFailed(f"cannot export this {src_type} {config.task} model to ONNX; " + "; ".join(failures)
                       + ". Its PyTorch code traces with neither exporter under this torch / transformers; "
                       "try another --task, or open an issue with the model id and this message")


def _example(src: Path, names: list[str], length: int) -> tuple[Any, ...]:
    import torch

    from grove.tasks._encoder_io import encode

    # Two rows of different length, so padding (and the mask) is exercised while tracing.
    feeds = encode(src, ["Grove exports encoders.", "A longer second sentence " * 8], names, pad_to=length)
    return tuple(torch.from_numpy(feeds[n]) for n in names)


def _wrapper(src: Path, task_name: str, n_inputs: int, pooling: str | None, normalize: bool = False) -> Any:
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoModelForTokenClassification

    auto = {"feature-extraction": AutoModel, "text-classification": AutoModelForSequenceClassification,
            "token-classification": AutoModelForTokenClassification}[task_name]
    # Eager attention with a prepared additive 4D mask gives the graph onnxruntime's BERT fuser
    # recognises (transformers 5's own mask builder exports as gathers the fuser does not match).
    model = auto.from_pretrained(str(src), attn_implementation="eager", dtype=torch.float32).eval()
    raw_mask = ARCHITECTURES[model.config.model_type].own_mask  # see ArchSpec.own_mask

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            extended = attention_mask if raw_mask else (1.0 - attention_mask.unsqueeze(1).unsqueeze(2).to(
                torch.float32)) * torch.finfo(torch.float32).min
            kwargs = {"token_type_ids": token_type_ids} if n_inputs == 3 else {}
            result = self.model(input_ids=input_ids, attention_mask=extended, **kwargs)
            if task_name != "feature-extraction":
                return result.logits
            hidden = result.last_hidden_state
            if pooling is None:
                return hidden
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            if pooling == "cls":
                pooled = hidden[:, 0]
            elif pooling == "max":  # padding cannot win: sentence-transformers sets it to -1e9 first
                pooled = torch.where(mask > 0, hidden, torch.full_like(hidden, -1e9)).amax(1)
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            if not normalize:
                return hidden, pooled
            # sqrt(sum(x^2)) rather than F.normalize: its Expand / ReduceL2 leave the output without
            # a static shape, which stops onnxruntime's symbolic shape inference (and so fusion).
            return hidden, pooled / torch.sqrt((pooled * pooled).sum(1, keepdim=True)).clamp(min=1e-12)

    return Encoder().eval()


def _node_count(path: Path) -> int:
    import onnx

    return len(onnx.load(str(path), load_external_data=False).graph.node)
