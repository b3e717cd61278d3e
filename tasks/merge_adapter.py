"""Node ``merge-adapter``: a base model with a LoRA adapter folded into its weights (peft's
``merge_and_unload``), written as a plain Hugging Face folder that every later node takes as any
other model: capture, int4, evaluation, packaging."""

from __future__ import annotations

import shutil
from pathlib import Path

from prefect import task

from grove.artifacts import Artifact, StepConfig
from grove.node import RECIPE_CACHE, node_logger, run_node
from grove.tasks.architectures import torch_spec

__all__ = ["MergeConfig", "merge_adapter"]

_WEIGHTS = (".safetensors", ".bin")


class MergeConfig(StepConfig):
    NODE = "merge-adapter"
    VERSION = 1


@task(name="merge-adapter", cache_policy=RECIPE_CACHE)
def merge_adapter(model: Artifact, adapter: Artifact, config: MergeConfig) -> Artifact:
    """HF model folder + adapter artifact (its ``adapter/`` folder) -> merged HF model folder."""
    return run_node(config, [model, adapter], model.store, _merge)


def _merge(inputs: list[Path], config: MergeConfig, out: Path) -> dict[str, object]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapter_dir = inputs
    torch_spec(model_dir, "merging an adapter")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(adapter_dir / "adapter")).merge_and_unload()
    merged.save_pretrained(str(out))
    for f in model_dir.iterdir():  # tokenizer, chat template, generation config: the base's own
        if f.is_file() and not f.name.endswith(_WEIGHTS) and f.name not in ("manifest.json", "config.json") \
                and not (out / f.name).exists() and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    node_logger().info("merged the adapter into %s", merged.config.model_type)
    return {"model_type": merged.config.model_type}
