"""Node ``export-components``: an image-text (or image-audio-text) checkpoint's ONNX components as mobius
writes them (Olive's ``MobiusBuilder``, ``auto-opt --components``): ``decoder/``, ``vision_encoder/``,
``audio_encoder/``, ``embedding/``, each a ``model.onnx`` with its weights in ``model.onnx.data``, at fp32 or
fp16. All of them come with mobius's ``genai_config.json`` and the tokenizer and processor files, the folder
onnxruntime-genai loads; a subset comes alone, as Olive writes it (mobius cannot scope a genai config to
part of a package), for olive-recipes' pipelines that export the text decoder another way.

This is the first step of olive-recipes' per-component configs (Gemma 4's ``mixed/``, Ministral 3's
``vision_embedding_export.json``): their later configs take each component as an ONNX graph (the graph
path: 8-bit or int4 weights, measured against the component). Grove's own decoder path exports the text
decoder alone (tasks/capture_onnx.py), which it evaluates and quantizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from prefect import task
from pydantic import Field

from grove.artifacts import Artifact, StepConfig
from grove.errors import InvalidRequest
from grove.node import RECIPE_CACHE, node_logger, run_node

__all__ = ["ExportComponentsConfig", "export_components"]

_DTYPES = {"fp32": "f32", "fp16": "f16"}


class ExportComponentsConfig(StepConfig):
    NODE = "export-components"
    VERSION = 1
    components: list[str] = Field(default_factory=list, description="the components to write (mobius's names: "
                                  "decoder, vision_encoder, audio_encoder, embedding); empty: all of them, with "
                                  "the genai config")
    precision: Literal["fp32", "fp16"] = Field("fp32", description="the weights mobius writes")
    execution_provider: Literal["cpu", "cuda"] = Field("cpu", description="the provider the graphs are built for "
                                                       "(its fused ops)")


@task(name="export-components", cache_policy=RECIPE_CACHE)
def export_components(model: Artifact, config: ExportComponentsConfig) -> Artifact:
    """HF folder of a multimodal checkpoint -> a folder of its ONNX components."""
    return run_node(config, [model], model.store, _export)


def _export(inputs: list[Path], config: ExportComponentsConfig, out: Path) -> dict[str, object]:
    from grove.tasks._genai_runtime import model_size
    from grove.tasks._mobius import context_length, mobius_api, refuse_moe

    (hf_dir,) = inputs
    hf_config = json.loads((hf_dir / "config.json").read_text())
    model_type = str(hf_config.get("model_type", ""))
    refuse_moe(hf_config)
    with mobius_api(model_type) as (build, write_ort_genai_config):
        package = build(str(hf_dir), dtype=_DTYPES[config.precision], execution_provider=config.execution_provider,
                        load_weights=True)
        available = list(package)
        if len(available) == 1:
            raise InvalidRequest(f"this {model_type} model is one component ({available[0]}): drop --components "
                                 "(Olive's components_to_export) and auto-opt exports, quantizes and evaluates it")
        if unknown := sorted(set(config.components) - set(available)):
            raise InvalidRequest(f"--components {', '.join(unknown)}: not a component of this {model_type} model; "
                                 f"it has {', '.join(available)}")
        wanted = [c for c in available if not config.components or c in config.components]
        package.save(str(out), components=lambda name: name in wanted)
        if not config.components:
            write_ort_genai_config(package, str(out), ep=config.execution_provider, local_config_dir=str(hf_dir),
                                   context_length=context_length(hf_config))
    sizes = {c: round(model_size(out / c) / 1e6, 2) for c in wanted}
    node_logger().info("%s: exported %s at %s for %s%s", model_type,
                       ", ".join(f"{c} ({mb} MB)" for c, mb in sizes.items()), config.precision,
                       config.execution_provider, "" if config.components else ", with genai_config.json")
    return {"model_type": model_type, "components": wanted, "available": available, "size_mb": sizes,
            "genai_config": not config.components}
