"""capture-onnx's ``embedding_int8`` (Olive's QuantizeEmbeddingInt8 + ShareEmbeddingLmHead on the builder's
int4): the embedding becomes one 8-bit table re-rounded from the checkpoint's float rows, a tied lm_head
reads that same table at 8 bits, an untied one keeps the builder's 4 bits; onnxruntime-genai runs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from grove.errors import InvalidRequest
from grove.tasks import _genai_runtime as runtime
from grove.tasks.capture_onnx import CaptureConfig, _capture, _float_embedding

TOKENS = list(range(3, 40))


def _build(hf: Path, out: Path, config: CaptureConfig) -> Path:
    out.mkdir()
    _capture([hf], config, out)
    return out


def _nodes(folder: Path) -> tuple[dict[str, onnx.NodeProto], dict[str, onnx.TensorProto]]:
    model = onnx.load(str(folder / "model.onnx"))
    embed_or_head = {n.name: n for n in model.graph.node if n.name.startswith(("/model/embed_tokens/", "/lm_head/"))}
    return embed_or_head, {t.name: t for t in model.graph.initializer}


def _error(folder: Path, reference: np.ndarray) -> float:
    logits = runtime.logits(runtime.genai_model(folder), TOKENS, runtime.kv_floor(folder))
    return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tied, untied
def test_the_embedding_is_one_8bit_table_a_tied_lm_head_reads_too(family: str, tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    hf = tiny_dir(family)
    fp32 = _build(hf, tmp_path / "fp32", CaptureConfig.cpu())
    plain = _build(hf, tmp_path / "int4", CaptureConfig(precision="int4"))
    table8 = _build(hf, tmp_path / "int4-e8", CaptureConfig(precision="int4", embedding_int8=True))
    table, tied = _float_embedding(hf)
    assert tied == (family == "qwen2")

    nodes, inits = _nodes(table8)
    (gather,) = [n for n in nodes.values() if n.op_type == "GatherBlockQuantized"]
    (head,) = [n for n in nodes.values() if n.op_type == "MatMulNBits"]
    bits = {n.name: next(a.i for a in n.attribute if a.name == "bits") for n in (gather, head)}
    assert bits[gather.name] == 8 and bits[head.name] == (8 if tied else 4)
    assert not [n for n in nodes.values() if n.op_type == "Gather"], "the float embedding is gone"
    # The rows are the checkpoint's float table on a symmetric 8-bit grid: within half a step of each block.
    q = numpy_helper.to_array(inits["model.embed_tokens.weight_Q8"]).astype(np.float32) - 128
    scales = numpy_helper.to_array(inits[gather.input[2]])
    rows = (q * scales[..., None]).reshape(table.shape)
    step = np.repeat(scales, 32, axis=1)
    assert np.all(np.abs(rows - table) <= step / 2 + 1e-7)
    if tied:  # one table: the lm_head reads the embedding's integers and scales, no 4-bit copy is left
        assert head.input[1] == "model.embed_tokens.weight_Q8" and head.input[2] == gather.input[2]
        assert not [name for name in inits if name.startswith("lm_head.")]

    reference = runtime.logits(runtime.genai_model(fp32), TOKENS, runtime.kv_floor(fp32))
    error, before = _error(table8, reference), _error(plain, reference)
    if tied:  # 8-bit rows instead of the builder's 4-bit ones, for the lookup and the logits
        assert error < 0.9 * before
    else:  # the float table became 8 bits (a quarter of its bytes) and the 4-bit lm_head is the builder's
        assert abs(error - before) < 0.02 * before
        assert runtime.model_size(table8) < runtime.model_size(plain)
    timing = runtime.generation_timing(table8, "What is machine learning?", new_tokens=8)
    assert timing["generated_tokens"] == 8


def test_a_gpu_build_keeps_fp16_scales(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    """The builder's CUDA graph computes in fp16: the table's scales are fp16, as GatherBlockQuantized's and
    MatMulNBits' outputs must be (written here; run on CUDA by tests/tasks/test_gpu.py)."""
    out = _build(tiny_dir("qwen2"), tmp_path / "cuda",
                 CaptureConfig(precision="int4", execution_provider="cuda", embedding_int8=True))
    nodes, inits = _nodes(out)
    scales = {inits[n.input[2]].data_type for n in nodes.values() if n.op_type in ("GatherBlockQuantized",
                                                                                   "MatMulNBits")}
    assert scales == {onnx.TensorProto.FLOAT16}


def test_only_the_builders_int4_takes_it(tiny_dir, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="embedding_int8 applies to precision int4"):
        CaptureConfig(precision="fp16", embedding_int8=True)
    checkpoint = Path(shutil.copytree(tiny_dir("qwen2"), tmp_path / "gptq"))
    config = (checkpoint / "config.json").read_text()
    (checkpoint / "config.json").write_text(config.replace('"model_type"', '"quantization_config": '
                                                           '{"quant_method": "olive"}, "model_type"', 1))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidRequest, match="quantized before the capture"):
        _capture([checkpoint], CaptureConfig(precision="int4", embedding_int8=True), out)
