"""`grove store usage` / `grove store prune`: what is old goes (manifest first, with its result
record), what is recent or still being written stays, and a run after a prune rebuilds what it needs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from grove.shell import housekeeping
from grove.store import ArtifactStore
from tests.conftest import grove_cli

DAY = 86400.0


def _artifact(store: ArtifactStore, tmp_path: Path, node: str, digest: str, age_days: float) -> None:
    """A committed artifact whose manifest says it was built ``age_days`` ago, with its result record."""
    src = tmp_path / f"src-{node}-{digest[:4]}"
    src.mkdir()
    (src / "model.onnx").write_bytes(b"w" * 1000)
    store.commit(src, node=node, node_version=1, digest=digest, config={}, inputs=[], metrics={}, seconds=0.1)
    path = f"{store.artifact_path(node, digest)}/manifest.json"
    manifest = json.loads(store.fs.cat_file(path))
    store.fs.pipe(path, json.dumps({**manifest, "created_at": time.time() - age_days * DAY}).encode())
    store.fs.makedirs(f"{store.root}/prefect-results", exist_ok=True)
    store.fs.pipe(f"{store.root}/prefect-results/{node}-{digest}", b"{}")


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "store"))
    return ArtifactStore(request.getfixturevalue("s3_store"))


def test_prune_removes_what_was_built_before_the_cutoff_and_nothing_else(any_store: ArtifactStore,
                                                                          tmp_path: Path) -> None:
    store = any_store
    old, new, old_eval = "a" * 64, "b" * 64, "c" * 64
    _artifact(store, tmp_path, "capture-onnx", old, age_days=10)
    _artifact(store, tmp_path, "capture-onnx", new, age_days=1)
    _artifact(store, tmp_path, "evaluate", old_eval, age_days=10)
    store.fs.makedirs(f"{store.root}/models/m/cpu", exist_ok=True)
    store.fs.pipe(f"{store.root}/models/m/cpu/latest.json", b"{}")  # the fleet registry

    planned = housekeeping.prune(store, 7 * DAY, dry_run=True)
    assert {(a.node, a.name) for a in planned} == {("capture-onnx", old), ("evaluate", old_eval)}
    assert store.manifest("capture-onnx", old) is not None, "a dry run removes nothing"

    removed = housekeeping.prune(store, 7 * DAY, nodes=["capture-onnx"])

    assert [(a.node, a.name) for a in removed] == [("capture-onnx", old)]
    assert removed[0].size > 1000, "its files and manifest"
    assert store.manifest("capture-onnx", old) is None and not store.fs.exists(store.artifact_path("capture-onnx", old))
    assert not store.fs.exists(f"{store.root}/prefect-results/capture-onnx-{old}"), "its cache record goes too"
    assert store.manifest("capture-onnx", new) is not None and store.manifest("evaluate", old_eval) is not None
    assert store.fs.exists(f"{store.root}/prefect-results/capture-onnx-{new}")
    assert store.fs.exists(f"{store.root}/models/m/cpu/latest.json"), "the registry is not the cache"
    assert {a.node: a.complete for a in housekeeping.scan(store)} == {"capture-onnx": True, "evaluate": True}


def test_an_unfinished_build_is_removed_only_once_it_is_clearly_abandoned(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    for name, age in (("abandoned", 2 * DAY), ("uploading", 60.0)):
        folder = Path(store.artifact_path("capture-onnx", name))
        folder.mkdir(parents=True)
        (folder / "model.onnx.data").write_bytes(b"x" * 10)  # no manifest: never committed
        os.utime(folder / "model.onnx.data", (time.time() - age, time.time() - age))

    [abandoned, uploading] = sorted(housekeeping.scan(store), key=lambda a: a.name)
    assert (abandoned.complete, uploading.complete) == (False, False)

    removed = housekeeping.prune(store, 0)

    assert [a.name for a in removed] == ["abandoned"]
    assert Path(store.artifact_path("capture-onnx", "uploading")).exists(), "a build may still be writing it"


def test_a_run_after_pruning_everything_rebuilds_the_same_output(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    args = ["auto-opt", "-m", str(tiny_dir("llama")), "-o", str(out), "--store", store, "--eval_tokens", "64"]
    assert grove_cli(*args).returncode == 0
    model = (out / "model.onnx.data").read_bytes()

    usage = grove_cli("store", "usage", "--store", store)
    assert usage.returncode == 0 and "capture-onnx" in usage.stdout and "total" in usage.stdout
    assert "this machine's caches (" in usage.stdout and "s3:// model sources" in usage.stdout
    pruned = grove_cli("store", "prune", "--older-than", "0", "--store", store)
    assert pruned.returncode == 0 and pruned.stdout.startswith("removed "), pruned.stdout + pruned.stderr
    assert "this machine's caches: removed" in pruned.stdout
    assert housekeeping.scan(ArtifactStore(store)) == []

    again = grove_cli(*args)

    assert again.returncode == 0, again.stderr[-3000:]
    assert "download-model/" in again.stderr and "built in" in again.stderr, "rebuilt, not a dangling cache hit"
    assert (out / "model.onnx.data").read_bytes() == model


def test_this_machines_cached_copies_are_counted_and_the_old_ones_pruned(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fetched copies of remote artifacts and of s3:// model sources were never counted nor removed
    (one 7B source is ~30 GB)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    home = tmp_path / "xdg" / "grove"
    for rel, age_days in (("fetched/capture-onnx/" + "a" * 64, 10), ("fetched/evaluate/" + "b" * 64, 0),
                          ("s3-sources/" + "c" * 64, 10), ("fetched/capture-onnx/.staging-x", 10)):
        (home / rel).mkdir(parents=True)
        (home / rel / "model.onnx").write_bytes(b"w" * 1000)
        t = time.time() - age_days * DAY
        os.utime(home / rel / "model.onnx", (t, t))
        os.utime(home / rel, (t, t))

    copies = housekeeping.scan_caches()
    assert sorted((c.kind, c.path.name[0]) for c in copies) == [("fetched", "a"), ("fetched", "b"), ("s3-sources", "c")]
    assert housekeeping.format_caches(copies).endswith("fetched remote artifacts 2, 2.0 kB; s3:// model sources 1, "
                                                       "1.0 kB; remote evaluation texts 0, 0 B")
    assert housekeeping.prune_caches(5 * DAY, dry_run=True) and (home / "s3-sources" / ("c" * 64)).exists()

    removed = housekeeping.prune_caches(5 * DAY)

    assert sorted(c.path.name[0] for c in removed) == ["a", "c"]
    assert [c.path.name[0] for c in housekeeping.scan_caches()] == ["b"]
    assert (home / "fetched/capture-onnx/.staging-x").exists(), "a fetch in progress is left alone"


def test_a_cached_copy_fetched_long_ago_but_used_since_is_kept(s3_store: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning went by when a copy was fetched: a source or artifact used every day was removed
    (and fetched again) once it was older than the cutoff."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = ArtifactStore(s3_store)
    work = tmp_path / "work"
    work.mkdir()
    (work / "model.onnx").write_bytes(b"w" * 1000)
    store.commit(work, node="capture-onnx", node_version=1, digest="d" * 64, config={}, inputs=[], metrics={},
                 seconds=0.0)
    copy = store.fetch("capture-onnx", "d" * 64)
    t = time.time() - 10 * DAY
    for p in [copy, *copy.rglob("*")]:
        os.utime(p, (t, t))
    assert [c.path for c in housekeeping.prune_caches(5 * DAY, dry_run=True)] == [copy]

    assert store.fetch("capture-onnx", "d" * 64) == copy  # a run reads the cached copy today

    assert housekeeping.prune_caches(5 * DAY) == [] and (copy / "model.onnx").exists()
    assert [c.path for c in housekeeping.prune_caches(0)] == [copy]
    assert list(copy.parent.iterdir()) == [], "the copy and its fetch lock are gone"


def _publish(store: ArtifactStore, name: str, target: str, version: str, age_days: float, latest: bool) -> None:
    base = f"{store.root}/models/{name}/{target}"
    store.fs.makedirs(f"{base}/{version}", exist_ok=True)
    store.fs.pipe(f"{base}/{version}/model.onnx", b"m" * 100)
    if store.is_local:  # the publish time is the files' (S3 objects keep the upload time: left as it is)
        t = time.time() - age_days * DAY
        os.utime(f"{base}/{version}/model.onnx", (t, t))
    if latest:
        store.fs.pipe(f"{base}/latest.json", json.dumps({"version": version}).encode())


def test_registry_pruning_keeps_the_newest_versions_and_always_the_latest_one(tmp_path: Path) -> None:
    store = ArtifactStore(str(tmp_path / "store"))
    # smollm2/cpu: latest points at an older version (e.g. a rollback); minilm/cpu has one version.
    for version, age, latest in (("v1", 30, False), ("v2", 20, True), ("v3", 10, False), ("v4", 1, False),
                                 ("v5", 0.001, False)):  # v5: being published right now
        _publish(store, "smollm2", "cpu", version, age, latest)
    _publish(store, "minilm", "cpu", "w1", 40, True)
    assert {(v.name, v.version) for v in housekeeping.scan_registry(store) if v.latest} == {
        ("smollm2", "v2"), ("minilm", "w1")}

    assert [v.version for v in housekeeping.prune_registry(store, keep=3, dry_run=True)] == ["v3", "v1"]
    dry = grove_cli("store", "prune", "--keep-versions", "1", "--dry-run", "--store", store.uri)
    assert dry.returncode == 0 and dry.stdout.startswith("registry: would remove 3 old version(s) of smollm2/cpu, ")
    # keep 1: v2 (latest) only, but v5 is too young to touch
    removed = housekeeping.prune_registry(store, keep=3)

    assert {v.version for v in removed} == {"v1", "v3"}
    assert {v.version for v in housekeeping.scan_registry(store)} == {"v2", "v4", "v5", "w1"}, \
        "the newest, plus the version latest.json points at; a lone version stays"
    assert json.loads(store.fs.cat_file(f"{store.root}/models/smollm2/cpu/latest.json")) == {"version": "v2"}
    usage = housekeeping.format_usage(store, housekeeping.scan(store), housekeeping.scan_registry(store))
    assert "fleet registry (models/): 4 published version(s) of 2 entries" in usage


@pytest.mark.parametrize(("args", "expected"), [
    (["prune"], "grove store prune needs --older-than DAYS"),
    (["prune", "--older-than", "-1"], "--older-than -1: pass a number of days, 0 or more"),
    (["usage", "--dry-run"], "--older-than, --node, --keep-versions and --dry-run apply to 'grove store prune'"),
    (["prune", "--keep-versions", "2", "--node", "evaluate"],
     "--node narrows --older-than: pass --older-than DAYS too"),
    (["prune", "--keep-versions", "0"], "--keep-versions 0: keep at least 1"),
    (["usage"], "artifact store {store} does not exist; check --store or GROVE_STORE"),
])
def test_store_command_misuse_is_one_clear_error(args: list[str], expected: str, tmp_path: Path) -> None:
    result = grove_cli("store", *args, "--store", str(tmp_path / "store"))
    assert result.returncode == 2
    assert result.stderr.startswith(f"grove: error: {expected.format(store=tmp_path / 'store')}"), result.stderr
    assert result.stderr.count("\n") == 1, "one line"


def test_an_s3_store_that_cannot_be_reached_is_one_clear_error() -> None:
    from grove.shell.server import free_port

    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = grove_cli("store", "usage", "--store", "s3://nowhere/grove",
                       env={"AWS_ENDPOINT_URL": down, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})

    assert result.returncode == 2
    assert result.stderr.startswith("grove: error: artifact store s3://nowhere/grove is not usable: "
                                    "EndpointConnectionError") and result.stderr.count("\n") == 1, result.stderr
    assert "check AWS_ENDPOINT_URL" in result.stderr
