"""Bad input: one clear error naming the cause and the fix, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import grove_cli, smollm2_gguf


def _bad_inputs(tmp_path: Path, tiny_dir) -> dict[str, tuple[list[str], str]]:  # noqa: ANN001
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf().read_bytes()[:2_000_000])
    corrupt = shutil.copytree(tiny_dir("llama"), tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:4096])
    mamba = shutil.copytree(tiny_dir("llama"), tmp_path / "mamba")
    config = json.loads((mamba / "config.json").read_text())
    (mamba / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    return {
        "missing path": (["-m", str(tmp_path / "nope")], "does not exist"),
        "unknown hub id offline": (["-m", "nobody/not-a-model"], "huggingface-cli download"),
        "corrupt safetensors": (["-m", str(corrupt)], "not a valid safetensors file"),
        "truncated gguf": (["-m", str(cut)], "truncated or corrupt"),
        "unsupported architecture": (["-m", str(mamba)], "model_type 'mamba' is not supported; supported: "),
        "contradictory flags": (["-m", str(tiny_dir("llama")), "--provider", "CUDAExecutionProvider",
                                 "--device", "cpu"], "pass --device gpu"),
        "fp16 on cpu": (["-m", str(tiny_dir("llama")), "--precision", "fp16"], "targets GPUs"),
        "gpu target without CUDA": (["-m", str(tiny_dir("llama")), "--device", "gpu", "--provider",
                                     "CUDAExecutionProvider"], "CUDAExecutionProvider is not available on this machine"),
    }


CASES = ["missing path", "unknown hub id offline", "corrupt safetensors", "truncated gguf",
         "unsupported architecture", "contradictory flags", "fp16 on cpu", "gpu target without CUDA"]


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_cleanly(case: str, tmp_path: Path, tiny_dir, store: str) -> None:  # noqa: ANN001
    if case == "gpu target without CUDA" and _has_cuda():
        pytest.skip("this machine has CUDA: there is nothing for the check to refuse")
    args, expected = _bad_inputs(tmp_path, tiny_dir)[case]
    out = tmp_path / "out"

    result = grove_cli("auto-opt", *args, "-o", str(out), "--store", store)

    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists(), "nothing may be written at the output path"
    assert not Path(store).exists() or not any(Path(store).rglob("manifest.json"))


@pytest.mark.parametrize(("command", "hint"), [("finetune", "grove auto-opt -m <merged model folder>"),
                                               ("run", "grove fleet refresh")])
def test_tutorial_commands_grove_lacks_say_what_to_do(command: str, hint: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """The tutorial's `olive finetune` / `olive run --config` typed as grove: one line naming what
    is missing and what to run instead, exit 2 (not argparse's bare 'invalid choice')."""
    from grove.cli import main

    with pytest.raises(SystemExit) as exc:
        main([command, "--config", "config.json"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"grove: error: 'grove {command}'") and hint in err and err.count("\n") == 1
