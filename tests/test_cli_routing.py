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
