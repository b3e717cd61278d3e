"""The benchmark request: Olive's ``benchmark`` flags (lm-evaluation-harness tasks on a model), validated
before any work and turned into the evaluate-lm node's config."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from grove.flows.request import local_output_path
from grove.store import default_store_uri

__all__ = ["BenchmarkRequest"]


class BenchmarkRequest(BaseModel):
    """What ``grove benchmark`` was asked to do."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_name_or_path: str = Field(description="the model: hub id, local HF folder, .gguf file, s3:// folder, or an "
                                    "onnxruntime-genai folder (a grove auto-opt output)")
    output_path: str | None = Field("benchmark-results", description="folder to write results.json (the "
                                    "harness's results) and grove_report.json to (a deployed run without one: "
                                    "they stay in the store)")
    tasks: list[str] = Field(min_length=1, description="lm-eval tasks or groups (mmlu, hellaswag, arc_easy...)")
    device: Literal["cpu", "gpu"] = Field("cpu", description="where the model runs: cpu, or gpu (CUDA)")
    batch_size: int = Field(1, ge=1, description="requests per forward pass (PyTorch models)")
    max_length: int = Field(1024, ge=16, description="longest input + output in tokens (Olive's default)")
    limit: float | None = Field(None, gt=0, description="samples per task: a count, or a share of the task when "
                                "below 1 (default: every sample; Olive's command defaults to 1)")
    num_fewshot: int | None = Field(None, ge=0, description="few-shot examples per prompt (default: each task's)")
    apply_chat_template: bool = Field(False, description="prompts through the model's chat template")
    fewshot_as_multiturn: bool = Field(False, description="with --apply_chat_template: few-shot examples as turns")
    include_path: str | None = Field(None, description="a folder of lm-eval task YAML files of one's own (their "
                                     "data local files or hub datasets)")
    task_definitions: list[str] | None = Field(None, description="tasks of one's own given whole, each an lm-eval "
                                               "task config as a JSON object (its task name joins --tasks): what an "
                                               "Olive config's inline LMEvaluator tasks become")
    revision: str | None = Field(None, description="hub revision of the model")
    trust_remote_code: bool = Field(False, description="Olive's flag, accepted: Grove loads native transformers "
                                    "architectures only")
    store: str = Field(default_factory=default_store_uri, description="artifact store URI (file path or s3://)")

    _output_path = field_validator("output_path")(local_output_path)

    @field_validator("task_definitions")
    @classmethod
    def _task_definitions(cls, value: list[str] | None) -> list[str] | None:
        for text in value or []:
            try:
                task = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON object ({exc.msg} at column {exc.colno}): {text[:60]}") from None
            if not isinstance(task, dict) or not isinstance(task.get("task"), str) or not task["task"].strip():
                raise ValueError(f"an lm-eval task config is a JSON object with a \"task\" name: {text[:60]}")
            if "/" in task["task"] or task["task"].startswith("."):
                raise ValueError(f"task name {task['task']!r}: a plain name (it names the task's YAML file)")
        return value

    def definitions(self) -> list[dict[str, Any]]:
        return [json.loads(text) for text in self.task_definitions or []]

    def lm_eval(self, include_sha256: str) -> Any:
        from grove.tasks.evaluate_lm import LmEvalConfig

        definitions = self.definitions()
        defined = [d["task"] for d in definitions if d["task"] not in self.tasks]
        return LmEvalConfig(tasks=[*self.tasks, *defined], task_definitions=definitions, limit=self.limit,
                            num_fewshot=self.num_fewshot,
                            batch_size=self.batch_size, max_length=self.max_length,
                            apply_chat_template=self.apply_chat_template,
                            fewshot_as_multiturn=self.fewshot_as_multiturn, include_path=self.include_path,
                            include_sha256=include_sha256, provider="cuda" if self.device == "gpu" else "cpu")
