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
@pytest.mark.parametrize("embedding_int8", [False, True])  # True: 8-bit GatherBlockQuantized + MatMulNBits on CUDA
def test_cuda_int4_output_is_built_by_the_builder_and_measured_on_the_gpu(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                          store: str, embedding_int8: bool) -> None:
    import onnxruntime_genai as og

    out = tmp_path / "out"
    result = grove_cli("auto-opt", "-m", str(tiny_dir("qwen2")), "-o", str(out), "--device", "gpu", "--provider",
                       "CUDAExecutionProvider", "--precision", "int4", "--eval_tokens", "64", "--store", store,
                       *(["--embedding_int8"] if embedding_int8 else []))

    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"] == {"device": "gpu", "provider": "cuda", "precision": "int4", "int4_algorithm": "builder",
                                "block_size": 32, **({"embedding_int8": True} if embedding_int8 else {})}
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


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="needs a CUDA GPU with onnxruntime-gpu and onnxruntime-genai-cuda")
@pytest.mark.parametrize("algorithm", ["rtn", "k_quant", "hqq"])
def test_onnxruntimes_int4_of_the_fp16_cuda_graph_runs_on_the_gpu(algorithm: str, tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                  store: str) -> None:
    """olive-recipes' CUDA chains (a builder at fp16, then OnnxBlockWiseRtnQuantization or
    OnnxKQuantQuantization): the int4 graph is measured on the GPU, near the fp16 reference."""
    out = tmp_path / "out"
    result = grove_cli("auto-opt", "-m", str(tiny_dir("qwen2")), "-o", str(out), "--device", "gpu", "--provider",
                       "CUDAExecutionProvider", "--precision", "int4", "--int4_algorithm", algorithm,
                       "--eval_tokens", "64", "--store", store)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["int4_algorithm"] == algorithm and report["reference"]["precision"] == "fp16"
    assert report["metrics"]["decode_tok_s"] > 0
    assert report["metrics"]["perplexity"] < 1.2 * report["reference"]["perplexity"]


def _torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _torch_cuda(), reason="needs a CUDA GPU and the CUDA build of torch")
def test_gptq_on_a_gpu_node_runs_on_cuda_and_matches_the_cpu(tmp_path: Path) -> None:
    """quantize-torch on the GPU pool takes each decoder layer to CUDA (GPTQ, its Hessians, the kld_gradient
    scores): the checkpoint it writes is the CPU run's up to float rounding (nearly every integer the same,
    the same layers at 8 bits), and the GPU run says where it ran."""
    import torch
    from safetensors.torch import load_file

    from grove.tasks import quantize_torch as qt
    from tests import tiny_models

    src = tiny_models.build("llama", tmp_path / "src")
    outs = {}
    for placement in ("cpu", "gpu"):
        out = tmp_path / placement
        out.mkdir()
        config = qt.TorchQuantConfig(rotate=True, symmetric=True, clip_search=True, mixed_precision_ratio=0.8,
                                     calibration_samples=4, calibration_seq_len=64, placement=placement)
        outs[placement] = (qt._quantize([src], config, out), load_file(str(out / "model.safetensors")))
    (cpu_stats, cpu), (gpu_stats, gpu) = outs["cpu"], outs["gpu"]
    assert cpu_stats["layers_8bit"] == gpu_stats["layers_8bit"] and set(cpu) == set(gpu)
    for name in (n for n in cpu if n.endswith(".qweight")):
        same = (cpu[name] == gpu[name]).float().mean().item()
        assert same > 0.9, (name, same)
    assert gpu_stats["output_error"] == pytest.approx(cpu_stats["output_error"], rel=0.05)
    assert torch.cuda.max_memory_allocated() > 0, "the work ran on the GPU"
