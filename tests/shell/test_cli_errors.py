"""Bad input: one clear error naming the cause and the fix, exit code 2, nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import tiny_models
from tests.conftest import grove_cli, smollm2_gguf


def _bad_inputs(tmp_path: Path, tiny_dir) -> dict[str, tuple[list[str] | Callable[[], list[str]], str]]:  # noqa: ANN001
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm2_gguf().read_bytes()[:2_000_000])
    corrupt = shutil.copytree(tiny_dir("llama"), tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:4096])
    mamba = shutil.copytree(tiny_dir("llama"), tmp_path / "mamba")
    config = json.loads((mamba / "config.json").read_text())
    (mamba / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    pipe = tmp_path / "pipe.txt"
    os.mkfifo(pipe)  # nothing writes it: reading it would wait forever
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
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
                                     "CUDAExecutionProvider"],
                                    "CUDAExecutionProvider is not available on this machine"),
        "eval text is a pipe": (["-m", str(tiny_dir("llama")), "--eval_data", str(pipe)], "is not a regular file"),
        "empty eval text": (["-m", str(tiny_dir("llama")), "--eval_data", str(blank)], "blank.txt is empty"),
        "revision of a folder": (["-m", str(tiny_dir("llama")), "--revision", "main"], "is not a hub id"),
        "too few eval tokens": (["-m", str(tiny_dir("llama")), "--eval_tokens", "5"],
                                "--eval_tokens: Input should be greater than or equal to 16"),
        "hub eval text offline": (["-m", str(tiny_dir("llama")), "--eval_data", "hf://datasets/nobody/none/t.txt"],
                                  "a hub dataset file needs the hub: offline, copy the file to this machine"),
        "output where no folder can be made": (["-m", str(tiny_dir("llama")), "-o", "/proc/grove-out"],
                                               "output path /proc/grove-out cannot be written: /proc does not take"),
        "flag of another int4 algorithm": (["-m", str(tiny_dir("llama")), "--symmetric"],
                                           "--symmetric applies to --int4_algorithm rtn; affine chooses"),
        "gguf transformers cannot read": (  # a Gemma (1) GGUF, built only for its case
            lambda: ["-m", str(tiny_models.write_gguf(tiny_dir("gemma"), tmp_path / "gemma.gguf"))],
            "model_type 'gemma' is not supported for the GGUF path; supported: gemma2, gemma3_text, llama, mistral, "
            "phi3, qwen2, qwen3. transformers cannot read a gemma GGUF; pass the model's Hugging Face folder"),
        "gptq on an image-text checkpoint": (["-m", str(tiny_dir("qwen2_5_vl")), "--int4_algorithm", "gptq"],
                                             "model_type 'qwen2_5_vl' is not supported for the GPTQ / RTN / QuaRot / "
                                             "mixed-precision path; supported: ernie4_5, gemma, gemma2, gemma3_text,"),
        "the builder's int4 on a model mobius exports": (
            ["-m", str(tiny_dir("gemma4")), "--int4_algorithm", "builder"],
            "--int4_algorithm builder: a gemma4 model is exported with mobius, not the model builder"),
        "a graph int4 on a mixture of experts": (["-m", str(tiny_dir("qwen3_5_moe")), "--int4_algorithm", "rtn"],
                                                 "--int4_algorithm rtn: a qwen3_5_moe model's experts are weights of "
                                                 "the model builder's MoE ops"),
        "sentence-transformers module not computed": (  # built only for its case (a torch model)
            lambda: ["-m", str(tiny_models.build_sentence_transformer(tmp_path / "st-dense", ["Pooling", "Dense"]))],
            "sentence-transformers module(s) ['sentence_transformers.models.Dense'] are not supported"),
    }


CASES = ["missing path", "unknown hub id offline", "corrupt safetensors", "truncated gguf",
         "unsupported architecture", "contradictory flags", "fp16 on cpu", "gpu target without CUDA",
         "eval text is a pipe", "empty eval text", "revision of a folder", "too few eval tokens",
         "hub eval text offline", "output where no folder can be made", "flag of another int4 algorithm",
         "sentence-transformers module not computed", "gguf transformers cannot read",
         "gptq on an image-text checkpoint", "the builder's int4 on a model mobius exports",
         "a graph int4 on a mixture of experts"]


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_cleanly(case: str, tmp_path: Path, tiny_dir, store: str) -> None:  # noqa: ANN001
    if case == "gpu target without CUDA" and _has_cuda():
        pytest.skip("this machine has CUDA: there is nothing for the check to refuse")
    args, expected = _bad_inputs(tmp_path, tiny_dir)[case]
    args = args() if callable(args) else args
    out = tmp_path / "out"

    result = grove_cli("auto-opt", *args, *([] if "-o" in args else ["-o", str(out)]), "--store", store)

    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "Encountered exception" not in result.stderr, "refused before any flow runs, not from inside one"
    assert not out.exists(), "nothing may be written at the output path"
    assert not Path(store).exists() or not any(Path(store).rglob("manifest.json"))


def test_an_eval_text_too_short_to_score_is_refused_with_its_length(tmp_path: Path, tiny_dir, store: str) -> None:  # noqa: ANN001
    """Only the model's tokenizer can count the text's tokens, so this is found in the evaluate node
    (after download and capture, which stay cached): one error with the count, no output."""
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    out = tmp_path / "out"

    result = grove_cli("auto-opt", "-m", str(tiny_dir("llama")), "--eval_data", str(short), "-o", str(out),
                       "--store", store)

    assert result.returncode == 2, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
    counted = re.search(r"short\.txt is (\d+) tokens long for this model's tokenizer; at least 16 are needed", error)
    assert counted and 1 < int(counted[1]) < 16, error
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(("content", "expected"), [
    (None, "--calibration_data {} cannot be read as UTF-8 text ([Errno 2] No such file or directory"),
    (b"\xff\xfe\x00caf\xe9 latin-1 text, long enough to be a paragraph of calibration text", "cannot be read as UTF-8"),
    (b"short\n\nlines\n", "--calibration_data {} holds no paragraph longer than 40 characters"),
])
def test_a_calibration_text_that_cannot_serve_is_refused_before_any_work(
        content: bytes | None, expected: str, tmp_path: Path, store: str) -> None:
    from tests.tiny_models import build_encoder

    model = build_encoder("bert", tmp_path / "bert")
    text = tmp_path / "calib.txt"
    if content is not None:
        text.write_bytes(content)
    out = tmp_path / "out"

    result = grove_cli("auto-opt", "-m", str(model), "-o", str(out), "--store", store, "--int8_mode", "static",
                       "--calibration_data", str(text))

    assert result.returncode == 2, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
    assert expected.format(text) in error
    assert "Traceback" not in result.stderr and "Encountered exception" not in result.stderr
    assert not out.exists()
    assert not Path(store).exists() or not any(Path(store).rglob("manifest.json")), "refused before any node ran"


def test_the_top1_gate_fails_the_run_with_the_measured_agreement(tmp_path: Path, tiny_dir, store: str) -> None:  # noqa: ANN001
    """A tiny random model's int4 output cannot agree with fp32 everywhere: --min_top1_agreement 1
    stops the run after the evaluation, with the figure and the flag to relax, and writes no output."""
    out = tmp_path / "out"

    result = grove_cli("auto-opt", "-m", str(tiny_dir("llama")), "-o", str(out), "--store", store,
                       "--min_top1_agreement", "1")

    assert result.returncode == 2, result.stderr[-3000:]
    [error] = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
    measured = re.search(r"top-1 agreement with the reference = ([0-9.]+), limit 1; over the (\d+) scored", error)
    assert measured and 0 < float(measured[1]) < 1 and int(measured[2]) > 16, error
    assert ("pass a lower --min_top1_agreement" in error
            and "a smaller --block_size or another --int4_algorithm" in error)
    assert not out.exists()


def test_a_prefect_api_that_does_not_answer_is_one_clear_error(tmp_path: Path, tiny_dir) -> None:  # noqa: ANN001
    from grove.shell.server import free_port

    down = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    out = tmp_path / "out"
    for args in (["auto-opt", "-m", str(tiny_dir("llama")), "-o", str(out)], ["deploy"]):
        result = grove_cli(*args, env={"PREFECT_API_URL": down, "GROVE_WARM": "0"})

        assert result.returncode == 2, result.stderr[-3000:]
        [error] = [line for line in result.stderr.splitlines() if line.startswith("grove: error:")]
        assert f"the Prefect API at PREFECT_API_URL={down} does not answer" in error and "Connection refused" in error
        assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize(("flags", "expected"), [
    (["--cron", "61 * * * *"], "--cron '61 * * * *' is not valid for the fleet schedule; give five fields"),
    (["--timezone", "Mars/Base"], "--timezone 'Mars/Base' is not valid for the fleet schedule; give an IANA"),
    ([], "--cron and --timezone schedule the fleet refresh: give the fleet with --fleet-manifest FILE"),
])
def test_a_bad_fleet_schedule_is_refused_before_anything_is_deployed(
        flags: list[str], expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    manifest = tmp_path / "fleet.yaml"
    manifest.write_text("targets: {cpu-int4: {device: cpu}}\nmodels: [{name: m, source: /x, targets: [cpu-int4]}]\n")
    args = ["--fleet-manifest", str(manifest), *flags] if flags else ["--cron", "0 3 * * *"]
    # A server that does not answer: the input is checked first, so its error is the one reported.
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert main(["deploy", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"grove: error: {expected}") and err.count("\n") == 1, err


def test_ctrl_c_stops_with_one_line_and_leaves_the_output(tmp_path: Path, tiny_dir) -> None:  # noqa: ANN001
    """Ctrl-C during a run (SIGINT to the grove process, which forwards it to its fork of the warm
    runner): exit 130, one line saying what was kept, no traceback, the earlier output untouched.

    The run is held at a known point without timing: its store is an S3 endpoint that accepts the
    connection and never answers, so grove waits for the store until the signal comes."""
    import signal
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "out"
    out.mkdir()
    (out / "grove_report.json").write_text('{"earlier": true}')  # an earlier Grove output
    with socket.create_server(("127.0.0.1", 0)) as silent:
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{silent.getsockname()[1]}",
               "AWS_ACCESS_KEY_ID": "grove-test", "AWS_SECRET_ACCESS_KEY": "grove-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}
        proc = subprocess.Popen([sys.executable, "-m", "grove.shell.cli", "auto-opt", "-m", str(tiny_dir("llama")),
                                 "-o", str(out), "--store", "s3://grove-test/store"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
        try:
            silent.settimeout(300)  # a safety net for a broken run, not a timing assertion
            connection, _ = silent.accept()  # grove is now waiting for the store's answer
            with connection:
                proc.send_signal(signal.SIGINT)
                _, stderr = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()

    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("grove:")]
    assert lines[-1].startswith("grove: interrupted;") and "resumes" in lines[-1], stderr
    assert json.loads((out / "grove_report.json").read_text()) == {"earlier": True}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "no staging folder left behind"
