"""``grove store usage`` and ``grove store prune``: what an artifact store holds, and removing what
is old.

Pruning never breaks a later run: artifacts are addressed by their recipe and every run checks an
artifact (manifest and file sizes) before reusing it, so a pruned one that is needed again is
rebuilt, at the cost of the time it took. The fleet registry (``models/``) is separate: its older
published versions go only with ``--keep-versions``, never the one ``latest.json`` points at.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from grove.lease import HeldLease
from grove.store import MANIFEST, ArtifactStore, Manifest, cache_home

__all__ = ["LEFTOVER_GRACE_S", "CachedCopy", "RegistryVersion", "StoredArtifact", "format_cache_prune",
           "format_caches", "format_leases", "format_prune", "format_registry_prune", "format_usage", "prune",
           "prune_caches", "prune_registry", "scan", "scan_caches", "scan_registry"]

# A folder without a manifest may be a build that is still uploading: it is never removed before this.
LEFTOVER_GRACE_S = 3600.0


@dataclass(frozen=True)
class StoredArtifact:
    """One folder under ``artifacts/<node>/``."""

    node: str
    name: str  # the recipe digest; for a leftover, whatever the interrupted build left
    size: int  # bytes on the store
    built_at: float  # the manifest's build time; for a leftover, its newest file's
    complete: bool  # False: a build that never committed (no valid manifest, or files missing)


def _mtime(info: dict[str, object]) -> float:
    value = info.get("mtime") or info.get("LastModified") or info.get("created") or 0.0
    return value.timestamp() if isinstance(value, datetime) else float(value)  # type: ignore[arg-type]


def _folders(store: ArtifactStore, base: str) -> dict[tuple[str, str], dict[str, dict[str, object]]]:
    """One listing of ``base``: {its first two path parts: {the rest of the path: its listing info}}."""
    folders: dict[tuple[str, str], dict[str, dict[str, object]]] = {}
    prefix = len(base.replace("\\", "/")) + 1
    for path, info in store.listing(base).items():
        parts = path.replace("\\", "/")[prefix:].split("/", 2)
        if len(parts) == 3:
            folders.setdefault((parts[0], parts[1]), {})[parts[2]] = info
    return folders


def scan(store: ArtifactStore) -> list[StoredArtifact]:
    """Every folder under the store's ``artifacts/``, from one listing plus one read per manifest."""
    base = f"{store.root}/artifacts"
    found = []
    for (node, name), files in sorted(_folders(store, base).items()):
        size = sum(int(info.get("size") or 0) for info in files.values())  # type: ignore[call-overload]
        manifest = None
        if MANIFEST in files:
            try:
                manifest = Manifest.model_validate_json(store.fs.cat_file(f"{base}/{node}/{name}/{MANIFEST}"))
            except (FileNotFoundError, ValueError):
                manifest = None
        complete = manifest is not None and all(
            int(files.get(f.path, {}).get("size", -1)) == f.size for f in manifest.files)  # type: ignore[call-overload]
        built_at = manifest.created_at if manifest is not None else max(_mtime(i) for i in files.values())
        found.append(StoredArtifact(node, name, size, built_at, complete))
    return found


@dataclass(frozen=True)
class RegistryVersion:
    """One published version of a fleet entry: ``models/<name>/<target>/<version>/``."""

    name: str
    target: str
    version: str
    size: int
    published_at: float  # when its files were copied there (their newest modification time)
    latest: bool  # what models/<name>/<target>/latest.json points at


def scan_registry(store: ArtifactStore) -> list[RegistryVersion]:
    """Every published version in the store's fleet registry."""
    import json

    base = f"{store.root}/models"
    found = []
    for (name, target), files in sorted(_folders(store, base).items()):  # files: latest.json, <version>/...
        latest = None
        if "latest.json" in files:
            try:
                latest = str(json.loads(store.fs.cat_file(f"{base}/{name}/{target}/latest.json"))["version"])
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                latest = None
        versions: dict[str, list[dict[str, object]]] = {}
        for rest, info in files.items():
            version, inside, _ = rest.partition("/")
            if inside:
                versions.setdefault(version, []).append(info)
        found += [RegistryVersion(name, target, version, sum(int(i.get("size") or 0) for i in infos),  # type: ignore[call-overload]
                                  max(_mtime(i) for i in infos), version == latest)
                  for version, infos in sorted(versions.items())]
    return found


def prune_registry(store: ArtifactStore, keep: int, dry_run: bool = False) -> list[RegistryVersion]:
    """Remove all but the ``keep`` newest versions of each fleet entry; the version ``latest``
    points at is always kept (and counts as one of them), and so is any version written in the last
    LEFTOVER_GRACE_S (a refresh may be publishing it). Returns what was (would be) removed."""
    by_entry: dict[tuple[str, str], list[RegistryVersion]] = {}
    for v in scan_registry(store):
        by_entry.setdefault((v.name, v.target), []).append(v)
    now, doomed = time.time(), []
    for versions in by_entry.values():
        newest_first = sorted(versions, key=lambda v: (v.latest, v.published_at), reverse=True)
        doomed += [v for v in newest_first[max(keep, 1):] if now - v.published_at > LEFTOVER_GRACE_S]
    if not dry_run:
        for v in doomed:
            store.fs.rm(f"{store.root}/models/{v.name}/{v.target}/{v.version}", recursive=True)
    return doomed


def prune(store: ArtifactStore, older_than_s: float, nodes: list[str] | None = None, dry_run: bool = False,
          artifacts: list[StoredArtifact] | None = None) -> list[StoredArtifact]:
    """Remove the artifacts built more than ``older_than_s`` seconds ago (only ``nodes``' if given),
    and leftovers of builds that never committed (never younger than LEFTOVER_GRACE_S). Returns
    what was (or, with ``dry_run``, would be) removed, each by ``ArtifactStore.remove`` (manifest
    first, then cache record, files and fetched copy). ``artifacts``: the store's ``scan``, if the
    caller has it already."""
    now = time.time()
    doomed = [a for a in (scan(store) if artifacts is None else artifacts)
              if (nodes is None or a.node in nodes) and now - a.built_at > older_than_s
              and (a.complete or now - a.built_at > LEFTOVER_GRACE_S)]
    if not dry_run:
        for artifact in doomed:
            store.remove(artifact.node, artifact.name)
    return doomed


@dataclass(frozen=True)
class CachedCopy:
    """One folder of this machine's caches: a fetched copy of a remote store's artifact
    (``fetched/<node>/<digest>``), of an s3:// model source (``s3-sources/<digest>``) or of a remote
    evaluation text (``texts/<key>``)."""

    kind: str  # "fetched" | "s3-sources" | "texts"
    path: Path
    size: int
    used_at: float  # when it was last fetched or used: the newest mtime of its folder (mark_used) and files


_CACHES = {"fetched": 2, "s3-sources": 1, "texts": 1}  # cache folder -> depth of its entries


def scan_caches(home: Path | None = None) -> list[CachedCopy]:
    """The copies in this machine's caches (``cache_home()``): re-fetched from their store or
    bucket when needed again, so removing them frees disk without breaking a run."""
    home = home or cache_home()
    found = []
    for kind, depth in _CACHES.items():
        for entry in sorted((home / kind).glob("/".join(["*"] * depth))):
            if not entry.is_dir() or entry.name.startswith("."):  # a fetch in progress stages in a .folder
                continue
            stats = [p.stat() for p in entry.rglob("*") if p.is_file()]
            found.append(CachedCopy(kind, entry, sum(s.st_size for s in stats),
                                    max([entry.stat().st_mtime, *(s.st_mtime for s in stats)])))
    return found


def prune_caches(older_than_s: float, dry_run: bool = False,
                 copies: list[CachedCopy] | None = None) -> list[CachedCopy]:
    """Remove the cached copies not fetched nor used for ``older_than_s`` seconds; returns them."""
    now = time.time()
    doomed = [c for c in (scan_caches() if copies is None else copies) if now - c.used_at > older_than_s]
    if not dry_run:
        for copy in doomed:
            shutil.rmtree(copy.path, ignore_errors=True)
            (copy.path.parent / f".{copy.path.name}.lock").unlink(missing_ok=True)  # ArtifactStore.fetch's
    return doomed


def format_caches(copies: list[CachedCopy]) -> str:
    """One line: this machine's cached copies by kind, with their sizes."""
    kinds = {"fetched": "fetched remote artifacts", "s3-sources": "s3:// model sources",
             "texts": "remote evaluation texts"}
    parts = [f"{kinds[k]} {sum(c.kind == k for c in copies)}, {_size(sum(c.size for c in copies if c.kind == k))}"
             for k in _CACHES]
    return f"this machine's caches ({cache_home()}): {'; '.join(parts)}"


def format_cache_prune(removed: list[CachedCopy], older_than_days: float, dry_run: bool) -> str:
    """One line saying which of this machine's cached copies were (or would be) removed."""
    verb = "would remove" if dry_run else "removed"
    return (f"this machine's caches: {verb} {len(removed)} cop{'y' if len(removed) == 1 else 'ies'} unused for more "
            f"than {older_than_days:g} days, {_size(sum(c.size for c in removed))} (fetched again when needed)")


def _size(n: float) -> str:
    units = ("B", "kB", "MB", "GB", "TB")
    i = 0
    while n >= 1000 and i < len(units) - 1:
        n, i = n / 1000, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def format_usage(store: ArtifactStore, artifacts: list[StoredArtifact], versions: list[RegistryVersion]) -> str:
    """A table: per node, how many artifacts, their size and the oldest build's age; then the registry."""
    now = time.time()
    lines = [f"store {store.uri}", f"{'node':<26} {'artifacts':>9} {'size':>10}  oldest build"]
    rows: dict[str, list[StoredArtifact]] = {}
    for a in artifacts:
        rows.setdefault(a.node if a.complete else "(unfinished builds)", []).append(a)
    for node, group in sorted(rows.items(), key=lambda kv: -sum(a.size for a in kv[1])):
        oldest = now - min(a.built_at for a in group)
        lines.append(f"{node:<26} {len(group):>9} {_size(sum(a.size for a in group)):>10}  {_age(oldest)} ago")
    lines.append(f"{'total':<26} {len(artifacts):>9} {_size(sum(a.size for a in artifacts)):>10}")
    if versions:
        entries = len({(v.name, v.target) for v in versions})
        lines.append(f"fleet registry (models/): {len(versions)} published version(s) of {entries} entr"
                     f"{'y' if entries == 1 else 'ies'}, {_size(sum(v.size for v in versions))}")
    return "\n".join(lines)


def format_leases(leases: list[HeldLease]) -> str:
    """One line: the builds in progress (their leases), and the leases left by runs that stopped."""
    now = time.time()
    live = [f"{h.node}/{h.digest[:12]} by {h.holder} for {_age(now - h.since)}" for h in leases if not h.stale]
    line = f"builds in progress: {'; '.join(live) if live else 'none'}"
    if stale := [h for h in leases if h.stale]:
        line += (f"; {len(stale)} lease(s) left by runs that stopped (taken over by the next run that needs the "
                 "artifact; prune removes them after an hour)")
    return line


def format_registry_prune(removed: list[RegistryVersion], keep: int, dry_run: bool) -> str:
    """One line saying which registry versions were (or would be) removed."""
    if not removed:
        return (f"registry: nothing to prune: no fleet entry has versions beyond its {keep} newest, the one "
                "latest.json points at and those written in the last hour")
    entries = sorted({f"{v.name}/{v.target}" for v in removed})
    return (f"registry: {'would remove' if dry_run else 'removed'} {len(removed)} old version(s) of "
            f"{', '.join(entries)}, {_size(sum(v.size for v in removed))} (kept the {keep} newest of each, "
            "and the one latest.json points at)")


def format_prune(removed: list[StoredArtifact], older_than_days: float, dry_run: bool,
                 nodes: list[str] | None, present: set[str]) -> str:
    """One line saying what was (or would be) removed, and how much it frees."""
    if not removed:
        missing = sorted(set(nodes or ()) - present)
        holds = (f"; this store holds no {', '.join(missing)} artifacts "
                 f"(it holds: {', '.join(sorted(present)) or 'none'})")
        return (f"nothing to prune: no artifact built more than {older_than_days:g} days ago"
                + (holds if missing else ""))
    counts = Counter(a.node if a.complete else "unfinished" for a in removed)
    what = ", ".join(f"{node} {n}" for node, n in counts.most_common())
    verb = "would remove" if dry_run else "removed"
    return (f"{verb} {len(removed)} artifact(s) built more than {older_than_days:g} days ago, "
            f"{_size(sum(a.size for a in removed))}: {what}")
