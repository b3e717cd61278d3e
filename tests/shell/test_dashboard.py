"""The dashboard, as a person sees it: headless Chromium opens a finished auto-opt run in the
Prefect UI and finds the metrics table among its artifacts."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from grove.flows.request import AutoOptRequest
from grove.shell.local_run import run_auto_opt_state
from grove.shell.server import server_status

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Without the background-networking flags Chromium keeps dialing Google on a closed network.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.mark.slow  # a browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium); "
                    "scripts/test.sh installs it when run as root")
def test_metrics_table_is_on_the_finished_runs_page(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    from playwright.sync_api import expect, sync_playwright

    request = AutoOptRequest(model_name_or_path=str(tiny_dir("llama")), output_path=str(tmp_path / "out"),
                             store=store, eval_tokens=64)
    flow_run_id = run_auto_opt_state(request).state_details.flow_run_id
    ui = str((server_status() or {})["ui_url"])

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{ui}/runs/flow-run/{flow_run_id}", wait_until="networkidle")
        expect(page.get_by_text("Completed").first).to_be_visible(timeout=30_000)
        page.get_by_text("Artifacts", exact=True).click()
        metrics = page.get_by_text("metrics-", exact=False).first
        expect(metrics).to_be_visible(timeout=30_000)
        metrics.click()
        expect(page.get_by_text("perplexity", exact=True).first).to_be_visible(timeout=30_000)
        expect(page.get_by_text("size on disk (MB)").first).to_be_visible()
        page.screenshot(path=str(tmp_path / "metrics.png"))
        browser.close()


def test_run_publishes_table_report_link_and_progress(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    request = AutoOptRequest(model_name_or_path=str(tiny_dir("qwen3")), output_path=str(tmp_path / "out"),
                             store=store, eval_tokens=64)
    flow_run_id = run_auto_opt_state(request).state_details.flow_run_id
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    by_type: dict[str, list] = {}
    for a in artifacts:
        by_type.setdefault(a.type or "", []).append(a)
    assert {"table", "markdown", "progress"} <= set(by_type)
    (link,) = [a for a in artifacts if (a.key or "").startswith("output-")]  # Prefect stores links untyped
    assert store in str(link.data)
    assert all(float(p.data) == 100.0 for p in by_type["progress"]), [p.data for p in by_type["progress"]]
    assert len(by_type["progress"]) == 6, "one progress bar per built node (download to package)"


def test_a_long_node_says_how_far_it_is_and_moves_its_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    """report_progress: the dashboard's bar follows the node's work, and a long node says in the log
    how far it is (every 15 s; here at once), so a 7B model's minutes of int4 are not silent."""
    import logging

    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.context import get_run_context

    from grove import node

    lines: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    monkeypatch.setattr(node, "_LOG_EVERY_S", 0.0)
    monkeypatch.setattr(node, "node_logger", lambda: logging.getLogger("grove.test-progress"))
    logging.getLogger("grove.test-progress").addHandler(Catch())
    logging.getLogger("grove.test-progress").setLevel(logging.INFO)

    @task
    def work() -> None:
        with node._progress_bar("quantize-int4 0123456789ab"):
            for i in range(1, 4):
                node.report_progress(i / 4, f"{i}/4 weights quantized")

    @flow
    def run() -> str:
        work()
        return str(get_run_context().flow_run.id)

    flow_run_id = run()
    assert lines == ["25% done: 1/4 weights quantized", "50% done: 2/4 weights quantized",
                     "75% done: 3/4 weights quantized"]
    with get_client(sync_client=True) as client:
        [bar] = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert bar.type == "progress" and float(bar.data) == 100.0
    assert bar.description == "quantize-int4 0123456789ab: done"
