"""What travels between nodes: small, frozen references into the store, never model bytes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Artifact", "Device", "MeasureConfig", "Metric", "Source", "StepConfig", "recipe_digest"]

Device = Literal["cpu", "gpu"]
Metric = float | int | str | bool | None | list[float] | list[str] | dict[str, float | str | None]


class StepConfig(BaseModel):
    """Base of every node's typed config. ``NODE`` and ``VERSION`` name the node kind and the
    version of its code: bump ``VERSION`` whenever the node's output would change for the same
    config, so old cache entries are not reused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    NODE: ClassVar[str]
    VERSION: ClassVar[int]
    PREFERS: ClassVar[Device | None] = None  # runs anywhere, but this device's pool is faster (training: a GPU)
    placement: Device | None = Field(None, description="run on this pool's device; None = wherever the node "
                                     "can run. Placement is policy, not recipe: it is not in the digest")

    @property
    def device(self) -> Device | None:
        """The device this node must run on: its placement, else what its config needs (see
        MeasureConfig); None = any pool, i.e. where the flow runs."""
        return self.placement

    def recipe(self) -> dict[str, object]:
        return self.model_dump(mode="json", exclude={"placement"})


class MeasureConfig(StepConfig):
    """Base of the nodes that measure a model on an execution provider (the evaluations)."""

    provider: Literal["cpu", "cuda", "dml"] = Field("cpu", description="execution provider to measure on")

    @property
    def device(self) -> Device | None:
        """Measuring on CUDA or DirectML needs a GPU box; on the CPU provider, any pool will do."""
        return self.placement or ("gpu" if self.provider != "cpu" else None)


class Source(BaseModel):
    """A resolved model source: where it is and what exactly it is (the root of every digest)."""

    model_config = ConfigDict(frozen=True)
    kind: Literal["hub", "local", "gguf", "s3", "onnx"]
    location: str = Field(description="hub id, absolute local path, or s3:// URI")
    digest: str = Field(description="hub commit sha, or sha256 over the source files")
    revision: str | None = Field(None, description="hub commit the digest pins")
    files: list[str] = Field(default_factory=list, description="files the source consists of")
    model_type: str = Field(description="Hugging Face model_type (from config.json or GGUF metadata)")
    architectures: list[str] = Field(default_factory=list, description="config.json's architectures: the head "
                                     "the weights carry (e.g. BertForSequenceClassification)")


class Artifact(BaseModel):
    """A committed artifact: ``<store>/artifacts/<node>/<digest>/`` with a manifest."""

    model_config = ConfigDict(frozen=True)
    node: str
    digest: str
    store: str
    metrics: dict[str, Metric] = Field(default_factory=dict)

    @property
    def short(self) -> str:
        return f"{self.node}/{self.digest[:12]}"

    @property
    def location(self) -> str:
        """Where its files are: a folder, or an s3:// prefix."""
        return f"{self.store}/artifacts/{self.node}/{self.digest}/"


def recipe_digest(config: StepConfig, parents: Sequence[Artifact | Source]) -> str:
    """sha256 of (node kind, node version, config, parent digests): the artifact's address."""
    payload = {
        "node": config.NODE,
        "version": config.VERSION,
        "config": config.recipe(),
        "inputs": [p.digest for p in parents],
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
