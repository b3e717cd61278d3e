"""The auto-opt-encoder flow through Prefect: the real all-MiniLM-L6-v2 to int8 with its report, and a
tiny classifier's first run and fully cached rerun."""


from __future__ import annotations

import json
from pathlib import Path

import pytest

from grove.artifacts import Artifact
from tests.encoders import (
    ENCODER_NODES,
    INT8_MIN_COSINE,
    TINY_INT8_MIN_TOP1,
    _labelled_files,
    _minilm,
)


@pytest.mark.slow
def test_auto_opt_encoder_flow_minilm_int8(minilm: dict[str, Artifact], tmp_path: Path, enc_store: str) -> None:
    from grove.flows.request_encoder import EncoderOptRequest
    from grove.shell.local_run import run_auto_opt_state as run_encoder_state

    out = tmp_path / "minilm-int8"
    request = EncoderOptRequest(model_name_or_path=str(_minilm()), output_path=str(out), store=enc_store,
                                precision="int8", eval_repeat=20)
    state = run_encoder_state(request)

    assert state.is_completed()
    report = json.loads((out / "grove_report.json").read_text())
    assert set(report) >= {"model", "target", "metrics", "reference", "ratios", "lineage", "files"}
    assert {"model.onnx", "tokenizer.json", "vocab.txt", "grove_encoder.json", "grove_report.json"} <= set(
        report["files"]) <= {p.name for p in out.iterdir()}
    assert report["metrics"]["cosine_vs_pytorch"] >= INT8_MIN_COSINE
    assert report["metrics"]["parity"]["mean_cosine"] >= INT8_MIN_COSINE
    assert report["ratios"]["size_vs_reference"] < 0.3
    assert [s["node"] for s in report["lineage"]] == [
        "download-model", "capture-encoder", "optimize-graph", "quantize-int8", "evaluate-encoder", "evaluate-encoder",
        "check-parity", "check-parity"], "every node behind the output, upstream first, both parity checks"
    assert report["reference"]["parity"]["mean_cosine"] > 0.9999, "the fused fp32 graph vs the export"
    from grove.tasks._report_text import table_rows

    rows = {r["metric"]: r for r in table_rows(report)}
    assert rows["pytorch fp32 latency ms avg"]["ratio"] is None, "two timings of PyTorch: a drift, not a result"
    assert not [m for m in rows if m.startswith("pytorch latency ms p")], "PyTorch's percentiles: the JSON's"
    assert rows["latency vs pytorch"]["ratio"] == round(report["metrics"]["latency_vs_pytorch"]
                                                        / report["reference"]["latency_vs_pytorch"], 3)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert "sentence_embedding" in [o.name for o in sess.get_outputs()]


def test_auto_opt_encoder_flow_rerun_is_all_cached(tiny_bert: dict[str, object], tmp_path: Path) -> None:
    import hashlib

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from grove.flows.request_encoder import EncoderOptRequest
    from grove.shell.local_run import run_auto_opt_state
    from tests.flows.test_auto_opt_flow import _task_states

    csv_path, _, expected = _labelled_files(tiny_bert["folder"], tmp_path)  # type: ignore[arg-type]
    out = tmp_path / "out"
    request = EncoderOptRequest(model_name_or_path=str(tiny_bert["folder"]), output_path=str(out),
                                store=str(tmp_path / "store"), task="text-classification", precision="int8",
                                eval_data=str(csv_path), eval_repeat=5)
    first_state = run_auto_opt_state(request)
    first = _task_states(first_state, ENCODER_NODES)
    onnx_sha = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    second = _task_states(run_auto_opt_state(request), ENCODER_NODES)

    assert first_state.is_completed()
    assert all("Cached" not in first[n] for n in ENCODER_NODES), first
    assert all(set(second[n]) == {"Cached"} for n in ENCODER_NODES), second
    assert len(second["check-parity"]) == len(second["evaluate-encoder"]) == 2
    assert hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest() == onnx_sha
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["task"] == "text-classification"
    assert report["reference"]["accuracy"] == round(expected, 4)  # fp32 ONNX = PyTorch's argmax
    assert report["metrics"]["top1_vs_pytorch"] >= TINY_INT8_MIN_TOP1
    with get_client(sync_client=True) as client:  # publish-report: the dashboard's table and report
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[first_state.state_details.flow_run_id])))
    assert {"table", "markdown"} <= {a.type for a in artifacts}
    table = json.dumps(next(a for a in artifacts if a.type == "table").data)
    assert "latency ms avg" in table and "accuracy" in table
