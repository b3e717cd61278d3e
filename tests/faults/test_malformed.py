"""Malformed input, as a new user brings it: every malformed file is one line (``grove: error: ...``, exit
2) and nothing is written; a model that lacks an optional part (a chat template) is run without it."""

from __future__ import annotations

import json
import random
import shutil
import struct
from pathlib import Path

import pytest

from grove.errors import ModelSourceError
from grove.tasks.download_model import check_safetensors
from tests.conftest import grove_cli
from tests.faults.conftest import one_error_line


def _model_with_weights(tiny: Path, folder: Path, weights: bytes) -> Path:
    shutil.copytree(tiny, folder)
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_random_bytes_as_model_safetensors_are_one_line_error_exit_2_and_nothing_written(tiny_dir,  # noqa: ANN001
                                                                                          tmp_path: Path) -> None:
    noise = random.Random(26).randbytes(4096)
    past_2_63 = struct.pack("<Q", 2**63 + 12345) + noise  # as about half of all random files declare
    model = _model_with_weights(tiny_dir("llama"), tmp_path / "model", past_2_63)
    out, store = tmp_path / "out", tmp_path / "store"

    result = grove_cli("auto-opt", "-m", str(model), "-o", str(out), "--store", str(store))
    error = one_error_line(result.stderr)
    assert result.returncode == 2, result.stderr[-3000:]
    assert error.startswith("grove: error: 'model.safetensors' is not a valid safetensors file"), error
    assert "download the model again" in error
    assert not out.exists() and not (store / "artifacts").exists()


@pytest.mark.parametrize("weights", [
    pytest.param(struct.pack("<Q", 2**64 - 1) + b"x" * 64, id="header-length-2^64-1"),
    pytest.param(struct.pack("<Q", 100) + b"x" * 64, id="header-longer-than-the-file"),
    pytest.param(struct.pack("<Q", 64) + random.Random(1).randbytes(64), id="header-of-random-bytes"),
    pytest.param(struct.pack("<Q", 6) + b"[1, 2]", id="header-a-json-list"),
    pytest.param(struct.pack("<Q", 27) + b'{"w": {"data_offsets": 7}}', id="offsets-not-a-pair"),
    pytest.param(struct.pack("<Q", 37) + b'{"w": {"data_offsets": [0, 1000000]}}', id="data-past-the-end"),
    pytest.param(b"\x01\x02", id="shorter-than-its-length-field"),
])
def test_every_malformed_safetensors_file_is_the_one_error(tmp_path: Path, weights: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(weights)
    with pytest.raises(ModelSourceError, match="'model.safetensors' is not a valid safetensors file"):
        check_safetensors(tmp_path)


def test_a_model_without_a_chat_template_is_evaluated_with_a_plain_prompt(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    """A base model (no chat template anywhere) ran download, capture and the fp32 evaluation, then
    failed in evaluate with onnxruntime-genai's 'Empty chat template'."""
    model = shutil.copytree(tiny_dir("llama"), tmp_path / "base")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"

    result = grove_cli("auto-opt", "-m", str(model), "-o", str(out), "--store", str(tmp_path / "store"),
                       "--eval_tokens", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "grove_report.json").read_text())
    assert report["metrics"]["decode_tok_s"] and report["metrics"]["sample"], report["metrics"]
    assert not (out / "chat_template.jinja").exists()
