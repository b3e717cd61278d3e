"""The GPU target end to end: a tiny decoder to an int4 onnxruntime-genai folder for CUDA (the
builder's own int4), measured on the GPU. Needs a CUDA GPU with onnxruntime-gpu and
onnxruntime-genai-cuda installed; everywhere else it is skipped (the CPU-only refusal is tested
in test_cli_errors.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import grove_cli


def _cuda() -> bool:
    import onnxruntime as ort
    import onnxruntime_genai as og

    return "CUDAExecutionProvider" in ort.get_available_providers() and og.is_cuda_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU with onnxruntime-gpu and onnxruntime-genai-cuda")
def test_cuda_int4_output_is_built_by_the_builder_and_measured_on_the_gpu(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                          store: str) -> None:
    import onnxruntime_genai as og

    out = tmp_path / "out"
    result = grove_cli("auto-opt", "-m", str(tiny_dir("qwen2")), "-o", str(out), "--device", "gpu", "--provider",
                       "CUDAExecutionProvider", "--precision", "int4", "--eval_tokens", "64", "--store", store)

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"] == {"device": "gpu", "provider": "cuda", "precision": "int4", "int4_algorithm": "builder",
                                "block_size": 32}
    assert report["metrics"]["decode_tok_s"] > 0 and report["reference"]["perplexity"] > 1
    assert report["reference"]["precision"] == "fp16"  # the builder's CUDA reference, named as such
    config = og.Config(str(out))
    config.clear_providers()
    config.append_provider("cuda")
    model = og.Model(config)  # the folder loads and generates on CUDA
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(og.Tokenizer(model).encode("hello"))
    while not generator.is_done():
        generator.generate_next_token()
    assert len(generator.get_sequence(0)) == 16
