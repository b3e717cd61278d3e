"""Node ``evaluate-adapter``: the base model's and the adapted model's loss and perplexity on the
evaluation blocks (the eval split, or the blocks held out of training), in PyTorch fp32: what the
fine-tuning changed, measured on tokens it did not train on. Writes ``eval.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from prefect import task

from grove.artifacts import Artifact, StepConfig
from grove.node import RECIPE_CACHE, node_logger, report_progress, run_node
from grove.tasks.architectures import torch_spec
from grove.tasks.prepare_data import load_blocks

__all__ = ["AdapterEvalConfig", "evaluate_adapter", "mean_loss"]


class AdapterEvalConfig(StepConfig):
    NODE = "evaluate-adapter"
    VERSION = 1


@task(name="evaluate-adapter", cache_policy=RECIPE_CACHE)
def evaluate_adapter(model: Artifact, data: Artifact, adapter: Artifact, config: AdapterEvalConfig) -> Artifact:
    return run_node(config, [model, data, adapter], model.store, _evaluate)


def mean_loss(model: Any, blocks: Any, on_block: Any = None) -> float:
    """Cross-entropy per trained token (labels other than -100) over ``blocks``, in one pass."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(blocks)):
            block = blocks[i]
            labels = block["labels"][None]
            logits = model(input_ids=block["input_ids"][None], attention_mask=block["attention_mask"][None]).logits
            targets = labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets,
                                                       ignore_index=-100, reduction="sum")
            total += float(losses)
            count += int((targets != -100).sum())
            if on_block is not None:
                on_block(i + 1)
    return total / max(1, count)


def _evaluate(inputs: list[Path], config: AdapterEvalConfig, out: Path) -> dict[str, object]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, data_dir, adapter_dir = inputs
    blocks = load_blocks(data_dir, "eval")
    torch_spec(model_dir, "evaluating an adapter")
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    n = len(blocks)
    before = mean_loss(base, blocks, lambda i: report_progress(i / (2 * n), f"base model, block {i}/{n}"))
    adapted = PeftModel.from_pretrained(base, str(adapter_dir / "adapter")).eval()
    after = mean_loss(adapted, blocks, lambda i: report_progress(0.5 + i / (2 * n), f"adapted, block {i}/{n}"))
    eval_on = json.loads((data_dir / "data.json").read_text())["eval_on"]
    metrics = {"eval_loss_before": round(before, 5), "eval_loss_after": round(after, 5),
               "perplexity_before": round(math.exp(before), 4), "perplexity_after": round(math.exp(after), 4),
               "eval_loss_change": round(after - before, 5), "eval_blocks": n, "eval_on": eval_on}
    (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    node_logger().info("eval loss %.4f -> %.4f (perplexity %.2f -> %.2f) on %s", before, after,
                       metrics["perplexity_before"], metrics["perplexity_after"], eval_on)
    return metrics
