"""Fleet refresh at scale and at once: staleness is decided in bulk, so an unchanged entry gets no
Prefect task; two refreshes of one fleet at once build each node once and move `latest` once."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from grove.flows.fleet import FleetManifest, unchanged_rows
from grove.tasks.publish_model import point_latest, read_latest
from tests.conftest import ROOT
from tests.fleet_scale import fill_registry, scale_manifest


def _task_run_names(flow_run_id: object, last: str) -> list[str]:
    """Names of the flow run's own task runs (not its subflows'), once the server has recorded its
    last task (``last``): task runs reach the API as events, a moment after they ran."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    names: list[str] = []
    with get_client(sync_client=True) as client:
        for _ in range(60):
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                         limit=200)
            names = [run.name for run in runs]
            if any(name.startswith(last) for name in names):
                time.sleep(1)  # the last task's event came; let any straggler land too
                return [run.name for run in client.read_task_runs(
                    flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])), limit=200)]
            time.sleep(0.5)
    return names


def test_unchanged_entries_get_no_task_and_the_changed_one_alone_is_rebuilt(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                            store: str) -> None:
    """1,000 entries whose registry is current, one whose upstream changed since its last publish,
    one whose source is gone: two refresh-entry tasks, not 1,002 (before, every entry had one, ~80 ms
    of orchestration each); the rows are what the per-entry tasks made."""
    from grove.flows.fleet_refresh import fleet_refresh

    fleet = scale_manifest(tmp_path / "sources", 1000, store)
    fill_registry(fleet)
    changed = shutil.copytree(tiny_dir("llama"), tmp_path / "changed")
    point_latest(store, "changed", "cpu", "0" * 16, "an-older-package", "older upstream bytes")
    manifest = FleetManifest.model_validate({**fleet.model_dump(), "eval_tokens": 64, "models": [
        *fleet.model_dump()["models"], {"name": "changed", "source": str(changed), "targets": ["cpu"]},
        {"name": "gone", "source": str(tmp_path / "gone"), "targets": ["cpu"]}]})
    before = {(m, t): read_latest(store, m, t) for m, t in [("m00000", "cpu"), ("m00499", "cpu-fp32")]}

    state = fleet_refresh(manifest, return_state=True)

    rows = state.result()
    assert len(rows) == 1002 and Counter(r["status"] for r in rows) == {"unchanged": 1000, "refreshed": 1,
                                                                          "failed": 1}
    assert [r["model"] for r in rows[-2:]] == ["changed", "gone"], "rows in the manifest's order"
    assert rows[-2]["status"] == "refreshed" and read_latest(store, "changed", "cpu")["version"] == rows[-2]["version"]
    assert rows[-1]["status"] == "failed" and "does not exist" in rows[-1]["reason"]
    assert rows[0] == {"model": "m00000", "target": "cpu", "status": "unchanged",
                       "version": before[("m00000", "cpu")]["version"], "reason": ""}
    assert {k: read_latest(store, *k) for k in before} == before, "an unchanged entry's latest is not touched"
    names = _task_run_names(state.state_details.flow_run_id, "publish-fleet-summary")
    assert sum(name.startswith("refresh-entry-") for name in names) == 2, names


@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_the_bulk_check_reads_the_registry_publish_registry_writes(remote: bool, tmp_path: Path, store: str,
                                                                   request: pytest.FixtureRequest) -> None:
    """A current entry is unchanged; one never published, one published from other bytes, one whose
    latest.json is not JSON and one whose source does not resolve are left to their tasks (None)."""
    store = request.getfixturevalue("s3_store") if remote else store
    fleet = scale_manifest(tmp_path / "sources", 40, store)
    fill_registry(fleet, skip=frozenset({"m00003"}))
    point_latest(store, "m00005", "cpu", "0" * 16, "an-older-package", "older upstream bytes")
    from grove.node import store_for

    layout = store_for(store)
    layout.fs.pipe(f"{layout.root}/models/m00007/cpu-fp32/latest.json", b"{not json")
    shutil.rmtree(fleet.models[9].source)

    rows = unchanged_rows(fleet)

    stale = {(m.name, t) for (m, t), row in zip([(m, t) for m in fleet.models for t in m.targets], rows, strict=True)
             if row is None}
    assert stale == {("m00003", "cpu"), ("m00003", "cpu-fp32"), ("m00005", "cpu"), ("m00007", "cpu-fp32"),
                     ("m00009", "cpu"), ("m00009", "cpu-fp32")}
    assert sum(row is not None and row["status"] == "unchanged" for row in rows) == 40 - len(stale)


def test_two_refreshes_at_once_build_each_node_once_and_move_latest_once(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                         store: str) -> None:
    """Two `grove fleet refresh` processes over one manifest, started together: both find the entry
    stale; the build leases give each node one builder, the other waits and reuses it; the second
    publisher finds latest already at the version and leaves it (before, it copied the version again
    and moved latest a second time). Both print the same rows."""
    model = shutil.copytree(tiny_dir("llama"), tmp_path / "tiny")
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text(f"store: {store}\neval_tokens: 64\ntargets: {{cpu: {{device: cpu}}}}\n"
                        f"models:\n  - {{name: tiny, source: {model}, targets: [cpu]}}\n")
    command = [sys.executable, "-m", "grove.shell.cli", "fleet", "refresh", str(manifest)]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                             env=os.environ.copy()) for _ in range(2)]
    outputs = [run.communicate(timeout=600) for run in runs]

    for run, (out, err) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, out[-2000:] + err[-3000:]
    rows = [[line.split() for line in out.splitlines() if line.startswith("tiny ")] for out, _ in outputs]
    assert rows[0] == rows[1] and len(rows[0]) == 1 and rows[0][0][2] == "refreshed", rows
    logs = "".join(err for _, err in outputs)
    built = Counter(re.findall(r"([a-z0-9-]+/[0-9a-f]{12}) built in", logs))
    assert built and set(built.values()) == {1}, built
    assert logs.count("published tiny/cpu version") == 1, logs[-4000:]
    assert logs.count("tiny/cpu version") == 2 and "was already published by another run; latest not moved" in logs
    latest = read_latest(store, "tiny", "cpu")
    assert latest is not None and latest["version"] == rows[0][0][3]
    assert json.loads((Path(str(latest["path"])) / "manifest.json").read_text())["digest"] == latest["package"]
