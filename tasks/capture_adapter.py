"""Node ``capture-adapter``: capture-onnx with a LoRA adapter built into the graph, as the
onnxruntime-genai builder writes it (``adapter_path``): beside each adapted MatMul, a lora_A and a
lora_B MatMul whose weights extract-adapter then turns into switchable inputs."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
from pathlib import Path

from prefect import task

from grove.artifacts import Artifact
from grove.errors import InvalidRequest, ModelSourceError
from grove.node import RECIPE_CACHE, node_logger, run_node
from tasks.capture_onnx import CaptureConfig
from tasks.registry import arch_spec

__all__ = ["CaptureAdapterConfig", "capture_adapter"]


class CaptureAdapterConfig(CaptureConfig):
    NODE = "capture-adapter"
    VERSION = 1


@task(name="capture-adapter", cache_policy=RECIPE_CACHE)
def capture_adapter(model: Artifact, adapter: Artifact, config: CaptureAdapterConfig) -> Artifact:
    """HF folder + adapter -> genai model folder with the LoRA MatMuls in the graph."""
    return run_node(config, [model, adapter], model.store, _capture)


def _capture(inputs: list[Path], config: CaptureAdapterConfig, out: Path) -> dict[str, object]:
    from onnxruntime_genai.models import builder

    from tasks import capture_onnx

    hf_dir, adapter_dir = inputs
    model_type = json.loads((hf_dir / "config.json").read_text()).get("model_type", "")
    arch_spec(model_type)
    capture_onnx._adapt_builder_configs(builder)  # noqa: SLF001 - the same builder fixes as capture-onnx
    chatter = io.StringIO()
    with (tempfile.TemporaryDirectory(prefix="grove-builder-") as cache, contextlib.redirect_stdout(chatter),
          contextlib.redirect_stderr(chatter)):
        options = [f"adapter_path={adapter_dir / 'adapter'}"]
        try:
            extra = builder.parse_extra_options(None, str(hf_dir), str(out), config.precision,
                                                config.execution_provider, str(cache), options)
            builder.create_model(None, str(hf_dir), str(out), config.precision, config.execution_provider,
                                 str(cache), **extra)
        except RuntimeError as exc:  # peft's "size mismatch for ...": an adapter of another base
            raise InvalidRequest(f"the adapter does not fit this base model ({str(exc).splitlines()[-1].strip()}); "
                                 "pass the base it was trained on (its adapter_config.json names it)") from exc
        except (ValueError, NotImplementedError, KeyError) as exc:
            raise ModelSourceError(f"the onnxruntime-genai model builder cannot export this {model_type} model with "
                                   f"a LoRA adapter ({exc.__class__.__name__}: {exc})") from exc
    logging.getLogger("grove.builder").debug(chatter.getvalue()[-4000:])
    capture_onnx._copy_chat_template(hf_dir, out)  # noqa: SLF001
    node_logger().info("captured %s with its LoRA adapter at %s for %s", model_type, config.precision,
                       config.execution_provider)
    return {"model_type": model_type, "precision": config.precision}
