"""`grove auto-opt` picks the decoder or encoder path from the model's config."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import grove_cli
from tests.tiny_models import MINILM


def test_encoder_model_takes_the_encoder_path(tmp_path: Path, store: str) -> None:
    out = tmp_path / "out"
    result = grove_cli("auto-opt", "-m", MINILM, "-o", str(out), "--store", store, "--log_level", "3")

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["precision"] == "int8" and report["target"]["task"] == "feature-extraction"
    assert (out / "model.onnx").exists()
    assert "size on disk (MB)" in result.stdout


def test_decoder_only_flags_on_an_encoder_are_one_clear_error(tmp_path: Path, store: str) -> None:
    result = grove_cli("auto-opt", "-m", MINILM, "-o", str(tmp_path / "out"), "--store", store,
                       "--int4_algorithm", "affine")
    assert result.returncode == 2
    assert "--int4_algorithm applies to decoder LLMs" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_classifier_without_task_is_served_as_the_classifier_it_is(tmp_path: Path, store: str) -> None:
    """No --task: the weights' head (config.json's architectures) picks it, so the classifier head
    is exported and scored, not dropped for hidden states."""
    from tests.tiny_models import build_encoder

    model = build_encoder("bert", tmp_path / "classifier")  # BertForSequenceClassification, 3 labels
    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text('{"text": "a short row", "label": "LABEL_1"}\n{"text": "another row", "label": 2}\n')
    out = tmp_path / "out"

    result = grove_cli("auto-opt", "-m", str(model), "-o", str(out), "--store", store, "--eval_data",
                       str(labelled), "--log_level", "3", "--use_ort_genai")

    assert result.returncode == 0, result.stderr[-3000:]
    assert "--task text-classification: the head of BertForSequenceClassification" in result.stderr
    assert "--use_ort_genai applies to decoder LLMs; this encoder is written for onnxruntime" in result.stderr
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["task"] == "text-classification"
    assert 0 <= report["metrics"]["accuracy"] <= 1 and report["metrics"]["top1_vs_pytorch"] >= 0.5
    assert ", text-classification" in result.stdout.splitlines()[1]  # the report's target line


def test_infer_task_from_architectures() -> None:
    from grove.flows.request_encoder import infer_task

    assert infer_task(["BertForSequenceClassification"]) == "text-classification"
    assert infer_task(["RobertaForTokenClassification"]) == "token-classification"
    assert infer_task(["BertModel"]) == infer_task(["BertForMaskedLM"]) == infer_task([]) == "feature-extraction"


def test_encoder_flags_reach_the_int8_node_and_are_refused_for_decoders(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    from grove.flows.request_encoder import EncoderOptRequest
    from grove.shell.cli import _parser

    args = _parser().parse_args(["auto-opt", "-m", "m", "-o", "o", "--int8_mode", "static", "--no-per_channel",
                                 "--quant_format", "QOperator", "--calibrate_method", "Entropy",
                                 "--calibration_samples", "8", "--nodes_to_exclude", "a", "b",
                                 "--op_types_to_quantize", "MatMul"])
    fields = {k: v for k, v in vars(args).items() if k not in ("run", "log_level") and v is not None}
    int8 = EncoderOptRequest.from_flags(fields).int8
    assert int8 is not None
    assert (int8.mode, int8.per_channel, int8.quant_format, int8.calibrate_method, int8.calibration_samples,
            int8.nodes_to_exclude, int8.op_types_to_quantize) == ("static", False, "QOperator", "Entropy", 8,
                                                                  ["a", "b"], ["MatMul"])

    result = grove_cli("auto-opt", "-m", str(tiny_dir("llama")), "-o", str(tmp_path / "out"), "--int8_mode", "static")
    assert result.returncode == 2
    assert "--int8_mode applies to encoders;" in result.stderr and "is a decoder LLM" in result.stderr
    assert not (tmp_path / "out").exists()


def test_building_the_command_line_imports_neither_prefect_nor_the_nodes() -> None:
    """Every command's logging is configured after its parser is built; a parser that imported Prefect
    (auto-opt's and finetune's flags come from their request models) left Prefect's own log format on
    `grove fleet`'s lines."""
    import subprocess
    import sys

    light = ("grove.tasks", "grove.tasks._choices", "grove.tasks.architectures")  # what the flags' models need
    code = ("import sys, grove.shell.cli; grove.shell.cli._parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'torch', 'onnx') "
            f"or (m.startswith('grove.tasks') and m not in {light!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_log_level_0_shows_the_runs_debug_lines_without_prefects_event_transport() -> None:
    """olive-recipes mostly set log_severity_level 0: Grove's and Prefect's run DEBUG lines show, the
    event client's five lines per event sent do not, even after Prefect's own logging setup (which resets
    its loggers' levels) runs."""
    import subprocess
    import sys

    code = ("import logging, grove.shell.cli as c; c._configure_logging(0); import prefect.logging.configuration as p; "
            "p.setup_logging(incremental=False); "
            "[logging.getLogger(n).debug('line from %s', n) for n in "
            "('prefect.events.clients', 'prefect.flow_runs', 'grove.tasks')]; "
            "logging.getLogger('prefect.events.clients').warning('a warning from the event client')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stderr
    assert "DEBUG: line from prefect.flow_runs" in err and "DEBUG: line from grove.tasks" in err, err
    assert "line from prefect.events.clients" not in err, err
    assert "WARNING: a warning from the event client" in err, err
