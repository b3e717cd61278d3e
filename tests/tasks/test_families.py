"""Every claimed decoder family, as a tiny random model: the fp32 ONNX matches PyTorch and the
int4 output loads in onnxruntime-genai and generates."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from grove.node import store_for
from grove.tasks import _data_sources as data_io
from grove.tasks import _genai_runtime as runtime
from grove.tasks._sources import resolve
from grove.tasks.architectures import ARCHITECTURES
from grove.tasks.capture_onnx import CaptureConfig, capture_onnx
from grove.tasks.download_model import DownloadConfig, download_model
from grove.tasks.evaluate import EvalConfig, evaluate
from grove.tasks.quantize_int4 import Int4Config, quantize_int4
from tests import tiny_models
from tests.tiny_models import FAMILIES

FP32_ATOL = 1e-4  # measured ~2e-6 on these models: same math, different kernels
# Qwen3.5 at init: its gated norm divides its linear attention's output (RMS ~4e-4) by sqrt(mean square + 1e-6),
# so the epsilon dominates and float noise shows magnified (1.4e-3); with wider taps the export is within 1e-4
# (test_qwen3_5_export_matches_pytorch_once_its_linear_attention_outgrows_the_norm_epsilon).
FP32_ATOL_FAMILY = {"qwen3_5": 3e-3, "qwen3_5_moe": 5e-3}  # the MoE: 2.5e-3 at init, 5e-6 with wider taps
INT4_MIN_COSINE = 0.8
# Gemma 4's attention is its query and key norms' alone (scaling 1.0), which a random model's 4-bit q / k rounding
# moves most: measured 0.75 (affine) and 0.78 (hqq) at the worst of 57 positions, median 0.95.
INT4_MIN_COSINE_FAMILY = {"gemma4": 0.7, "gemma4_text": 0.7}
TOKENS = list(range(3, 60))
# Each int4 quantizer on at least one family (tied and untied embeddings), the rest on rtn.
ALGORITHM = {"qwen2": "affine", "gemma": "hqq", "phi3": "hqq", "gemma2": "affine", "gemma3_text": "affine",
             "granite": "affine", "smollm3": "affine", "phi": "affine", "nemotron": "hqq", "olmo": "affine",
             "ernie4_5": "affine", "hunyuan_v1_dense": "hqq", "lfm2": "affine", "gemma3": "affine",
             "mistral3": "hqq", "qwen2_5_vl": "affine", "qwen3_vl": "affine", "olmo2": "affine", "olmo3": "hqq",
             "gemma4": "hqq", "gemma4_text": "affine"}


def test_every_decoder_architecture_has_its_tiny_model() -> None:
    """Adding an architecture is its ArchSpec plus a tiny model here (FAMILIES), which the test below runs;
    every encoder one is run by tests/tasks/test_encoders.py from the table itself."""
    assert set(FAMILIES) == {m for m, spec in ARCHITECTURES.items() if spec.path == "decoder"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_fp32_parity_and_int4_generates(family: str, tiny_dir, store: str) -> None:  # noqa: ANN001
    import torch

    folder = tiny_dir(family)
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), store)
    fp32 = capture_onnx.fn(hf, CaptureConfig.cpu())
    if ARCHITECTURES[family].builder_int4:  # experts in the builder's MoE ops: its own int4 (QMoE)
        algorithm = "builder"
        int4 = capture_onnx.fn(hf, CaptureConfig(precision="int4", execution_provider="cpu"))
    else:
        algorithm = ALGORITHM.get(family, "rtn")
        int4 = quantize_int4.fn(fp32, Int4Config(algorithm=algorithm))
    fp32_dir = store_for(store).fetch(fp32.node, fp32.digest)
    int4_dir = store_for(store).fetch(int4.node, int4.digest)

    onnx_logits = runtime.logits(runtime.genai_model(fp32_dir), TOKENS, runtime.kv_floor(fp32_dir))
    model = tiny_models.torch_class(family).from_pretrained(folder).eval()
    with torch.no_grad():
        torch_logits = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(onnx_logits - torch_logits).max() < FP32_ATOL_FAMILY.get(family, FP32_ATOL)

    timing = runtime.generation_timing(int4_dir, "What is machine learning?", new_tokens=12)
    assert timing["generated_tokens"] == 12 and timing["decode_tok_s"] > 0
    busy = timing["cpu_busy_elsewhere"]  # the machine's state while timed (None: too short to sample)
    assert busy is None or 0 <= busy <= 1
    assert runtime.model_size(int4_dir) < runtime.model_size(fp32_dir)
    if algorithm not in ("rtn", "builder"):  # Grove's grids: the lm_head found (gemma2's sits before its
        # soft-capping) and given the default 8-bit shortlist, its weight shared with the embedding's 8-bit table
        # (Gemma 4's per-layer embedding table is a third)
        ops = [n.op_type for n in onnx.load(str(int4_dir / "model.onnx"), load_external_data=False).graph.node]
        tables = 3 if family.startswith("gemma4") else 2
        assert ops.count("TopK") == 1 and ops.count("GatherBlockQuantized") == tables, family
    # Random Gaussian weights are the worst case for 4-bit blocks (measured: logit cosine
    # 0.89-0.99 with rtn, affine or hqq); a broken quantizer lands near 0.
    a, b = runtime.logits(runtime.genai_model(int4_dir), TOKENS, runtime.kv_floor(int4_dir)), onnx_logits
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    floor = INT4_MIN_COSINE_FAMILY.get(family, INT4_MIN_COSINE)
    assert cosine.min() > floor, f"int4 {algorithm} {family}: logit cosine vs fp32 down to {cosine.min():.3f}"

    # The evaluate node as auto-opt runs it, in perplexity chunks shorter than gemma2's sliding
    # window (as a real Gemma 2's 512-token chunks are shorter than its 4096): the fp32 perplexity
    # is PyTorch's over the same chunks, and int4 stays near it.
    measure = EvalConfig(ppl_tokens=64, ppl_chunk=16, new_tokens=4, threads=1)
    reference = evaluate.fn(fp32, measure)
    scored = evaluate.fn(int4, measure, reference).metrics
    tokens = runtime.tokenize(fp32_dir, data_io.read_text(data_io.BUILTIN_TEXT), limit=64)
    nll = 0.0
    with torch.no_grad():
        for start in range(0, 64, 16):
            piece = torch.tensor([tokens[start:start + 16]])
            nll += float(torch.nn.functional.cross_entropy(model(piece).logits[0, :-1], piece[0, 1:], reduction="sum"))
    assert reference.metrics["perplexity"] == pytest.approx(np.exp(nll / 60), rel=1e-4)
    assert scored["ppl_chunk"] == 16 and scored["generated_tokens"] == 4
    assert scored["perplexity"] == pytest.approx(reference.metrics["perplexity"], rel=0.1)  # measured 0.97-1.02x
    assert scored["top1_agreement"] > 0.5  # measured 0.58-1.0


@pytest.mark.parametrize("family", ["gemma3_text", "gemma3"])
def test_gemma3_with_scaled_rope_matches_pytorch(family: str, tmp_path, store: str) -> None:  # noqa: ANN001
    """Gemma 3 4B and larger scale their global layers' RoPE (linear x8) and not their sliding layers'; the
    builder scaled both (logits 2.4 off): Grove makes the sliding caches unscaled, text-only and image-text."""
    import torch

    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    folder = tiny_models.build(family, tmp_path / f"{family}-linear", rope_parameters=rope)
    fp32 = capture_onnx.fn(download_model.fn(resolve(str(folder)), DownloadConfig(), store), CaptureConfig.cpu())
    fp32_dir = store_for(store).fetch(fp32.node, fp32.digest)
    onnx_logits = runtime.logits(runtime.genai_model(fp32_dir), TOKENS, runtime.kv_floor(fp32_dir))
    model = tiny_models.torch_class(family).from_pretrained(folder).eval()
    with torch.no_grad():
        torch_logits = model(torch.tensor([TOKENS])).logits[0].numpy()
    assert np.abs(onnx_logits - torch_logits).max() < FP32_ATOL


def test_gemma4_with_one_projection_for_keys_and_values_matches_pytorch(tmp_path, store: str) -> None:  # noqa: ANN001
    """Gemma 4 31B's full layers read keys and values from one projection with fewer heads
    (attention_k_eq_v, num_global_key_value_heads), which transformers 5.24 keeps per layer: mobius is
    handed them as the checkpoint's fields, and the export matches PyTorch."""
    import torch

    folder = tiny_models.build("gemma4", tmp_path / "gemma4-k-eq-v", attention_k_eq_v=True,
                               num_global_key_value_heads=1)
    fp32 = capture_onnx.fn(download_model.fn(resolve(str(folder)), DownloadConfig(), store), CaptureConfig.cpu())
    fp32_dir = store_for(store).fetch(fp32.node, fp32.digest)
    onnx_logits = runtime.logits(runtime.genai_model(fp32_dir), TOKENS, runtime.kv_floor(fp32_dir))
    with torch.no_grad():
        torch_logits = tiny_models.torch_class("gemma4").from_pretrained(folder).eval()(torch.tensor([TOKENS])).logits
    assert np.abs(onnx_logits - torch_logits[0].numpy()).max() < FP32_ATOL


def test_gemma4s_mixture_of_experts_is_refused_by_name(tmp_path, store: str) -> None:  # noqa: ANN001
    """mobius 0.1 exports Gemma 4 26B-A4B's mixture of experts wrong (a tiny one's logits 0.59 off PyTorch's):
    one error naming it, not a wrong model."""
    from grove.errors import ModelSourceError

    folder = tiny_models.build("gemma4", tmp_path / "gemma4-moe", enable_moe_block=True, num_experts=4,
                               top_k_experts=2, moe_intermediate_size=32)
    with pytest.raises(ModelSourceError, match=r"mixture of experts \(Gemma 4 26B-A4B\), which mobius 0.1 does not "
                                               r"export right"):
        capture_onnx.fn(download_model.fn(resolve(str(folder)), DownloadConfig(), store), CaptureConfig.cpu())


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if ARCHITECTURES[f].multimodal
                                           or ARCHITECTURES[f].exporter == "mobius"))
def test_image_text_and_mobius_checkpoints_refuse_pytorch_side_work_by_name(family: str, tiny_dir,  # noqa: ANN001
                                                                           store: str) -> None:
    """An image-text checkpoint's text decoder is the exporter's; what loads it in PyTorch as a causal LM (GPTQ
    and the other passes on the weights, fine-tuning) is one error naming the architecture and what does run,
    in the node itself (a preflight also catches it: tests/shell/test_cli_errors.py). So is it for a text model
    mobius exports (Gemma 4's alone): mobius reads no quantize-torch checkpoint, and those passes are untested
    on it."""
    from grove.errors import UnsupportedArchitecture
    from grove.tasks.quantize_torch import TorchQuantConfig, quantize_torch
    from grove.tasks.train_adapter import skeleton

    why = "is image-text" if ARCHITECTURES[family].multimodal else "is exported with mobius"
    folder = tiny_dir(family)
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), store)
    with pytest.raises(UnsupportedArchitecture, match=rf"'{family}' is not supported for the GPTQ / RTN / QuaRot / "
                                                      rf"mixed-precision path; .* A {family} checkpoint {why}"):
        quantize_torch.fn(hf, TorchQuantConfig())
    with pytest.raises(UnsupportedArchitecture, match=rf"'{family}' is not supported for the fine-tuning path"):
        skeleton(resolve(str(folder)))


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_export_matches_pytorch_once_its_linear_attention_outgrows_the_norm_epsilon(
        family: str, tmp_path, store: str) -> None:  # noqa: ANN001
    """The family test's tolerance for Qwen3.5 (and its mixture of experts) is the tiny model's numerics, not
    the export's: with its convolution taps wider (the gated norm's input RMS 4e-3 instead of 4e-4, above its
    1e-6 epsilon) the fp32 logits are within the other families' 1e-4 of PyTorch's (measured 5.6e-5, the MoE
    5e-6; at init 1.4e-3 and 2.5e-3)."""
    import torch

    folder = tiny_models.build(family, tmp_path / f"{family}-wide", conv_std=3.0)
    fp32 = capture_onnx.fn(download_model.fn(resolve(str(folder)), DownloadConfig(), store), CaptureConfig.cpu())
    fp32_dir = store_for(store).fetch(fp32.node, fp32.digest)
    onnx_logits = runtime.logits(runtime.genai_model(fp32_dir), TOKENS, runtime.kv_floor(fp32_dir))
    with torch.no_grad():
        torch_logits = tiny_models.torch_class(family).from_pretrained(folder).eval()(torch.tensor([TOKENS])).logits
    assert np.abs(onnx_logits - torch_logits[0].numpy()).max() < FP32_ATOL


def test_a_graph_quantizer_refuses_a_graph_whose_experts_it_would_leave_in_float(tiny_dir,  # noqa: ANN001
                                                                                   store: str) -> None:
    """The builder writes a mixture of experts' expert weights into its MoE ops, which no graph quantizer
    reads: quantize-int4 on such a graph is one error naming the builder's int4, not a model with its
    experts (most of its weights) still fp32."""
    from grove.errors import InvalidRequest

    fp32 = capture_onnx.fn(download_model.fn(resolve(str(tiny_dir("qwen3_5_moe"))), DownloadConfig(), store),
                           CaptureConfig.cpu())
    with pytest.raises(InvalidRequest, match=r"this graph's experts are weights of 2 MoE op\(s\).*"
                                             r"--int4_algorithm builder"):
        quantize_int4.fn(fp32, Int4Config(algorithm="affine"))


@pytest.mark.parametrize("algorithm", ["affine", "hqq", "rtn", "k_quant"])
def test_qwen3_5_linear_attention_gates_stay_dense(algorithm: str, tiny_dir, store: str) -> None:  # noqa: ANN001
    """The builder keeps Qwen3.5's decay and beta gate projections in float at every precision (they feed an
    exponential and a sigmoid); each of Grove's int4 quantizers keeps them too, and quantizes the rest."""
    fp32 = capture_onnx.fn(download_model.fn(resolve(str(tiny_dir("qwen3_5"))), DownloadConfig(), store),
                           CaptureConfig.cpu())
    int4 = quantize_int4.fn(fp32, Int4Config(algorithm=algorithm))
    graph = onnx.load(str(store_for(store).fetch(int4.node, int4.digest) / "model.onnx"),
                      load_external_data=False).graph
    gates = ("a_proj/MatMul", "b_proj/MatMul")
    dense = {n.name for n in graph.node if n.op_type == "MatMul" and n.name.endswith(gates)}
    assert dense == {"/model/layers.0/linear_attn/a_proj/MatMul", "/model/layers.0/linear_attn/b_proj/MatMul"}
    assert sum(n.op_type == "MatMulNBits" for n in graph.node) >= 5  # the other projections, 4-bit


def test_ministral3_context_stops_where_its_query_scaling_starts(tiny_dir, store: str) -> None:  # noqa: ANN001
    """Past its pretraining context Ministral 3 scales its queries (llama_4_scaling_beta), which the builder
    does not export: the output's context ends there (the parity above holds inside it), and genai refuses a
    longer sequence instead of drifting."""
    import json

    fp32 = capture_onnx.fn(download_model.fn(resolve(str(tiny_dir("mistral3"))), DownloadConfig(), store),
                           CaptureConfig.cpu())
    folder = store_for(store).fetch(fp32.node, fp32.digest)
    genai = json.loads((folder / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 64 and genai["search"]["max_length"] == 64
    with pytest.raises(RuntimeError, match="cannot be greater than model context_length"):
        runtime.logits(runtime.genai_model(folder), list(range(3, 80)), 80)


def test_olmo_with_clip_qkv_is_refused(tmp_path, store: str) -> None:  # noqa: ANN001
    """The builder does not export OLMo's clamping of queries, keys and values: refused by name."""
    from grove.errors import ModelSourceError

    folder = tiny_models.build("olmo", tmp_path / "olmo-clip", clip_qkv=8.0)
    hf = download_model.fn(resolve(str(folder)), DownloadConfig(), store)
    with pytest.raises(ModelSourceError, match=r"OLMo with clip_qkv \(8.0\) clamps its queries"):
        capture_onnx.fn(hf, CaptureConfig.cpu())


def test_the_builder_fixes_are_undone_after_each_run(tiny_dir, tmp_path, store: str) -> None:  # noqa: ANN001
    """Grove's fixes of the model builder (its AutoConfig, its OLMo and Gemma 3 classes, its YaRN) hold while
    Grove runs it, and are put back after a run, a failed one too: other code in the process sees the builder
    as shipped."""
    from onnxruntime_genai.models import builder

    from grove.errors import ModelSourceError

    def fixed() -> tuple[object, ...]:
        return (builder.AutoConfig, builder.OLMoModel, builder.Gemma3Model,
                builder.Model.make_inv_freq_rescaled_with_ntk)

    shipped = fixed()
    capture_onnx.fn(download_model.fn(resolve(str(tiny_dir("olmo"))), DownloadConfig(), store), CaptureConfig.cpu())
    assert fixed() == shipped
    clipped = tiny_models.build("olmo", tmp_path / "olmo-clip", clip_qkv=8.0)
    with pytest.raises(ModelSourceError):
        capture_onnx.fn(download_model.fn(resolve(str(clipped)), DownloadConfig(), store), CaptureConfig.cpu())
    assert fixed() == shipped


def test_eval_text_is_tokenized_only_as_far_as_it_is_scored(tiny_dir, store: str,  # noqa: ANN001
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--eval_data may be a whole corpus: its first --eval_tokens tokens are the same as before, and
    the tokenizer sees only a prefix (it saw the whole file: 7 s and 11M tokens for 50 MB here)."""
    import onnxruntime_genai as og

    hf = download_model.fn(resolve(str(tiny_dir("llama"))), DownloadConfig(), store)
    fp32 = capture_onnx.fn(hf, CaptureConfig.cpu())
    model_dir = store_for(store).fetch(fp32.node, fp32.digest)
    model = runtime.genai_model(model_dir)
    text = data_io.read_text(data_io.BUILTIN_TEXT) * 40
    full = runtime.tokenize(model_dir, text, model)
    seen: list[int] = []
    real = og.Tokenizer

    class Recording:  # the real tokenizer, recording how much text it is given
        def __init__(self, m: object) -> None:
            self.tokenizer = real(m)

        def encode(self, s: str) -> object:
            seen.append(len(s))
            return self.tokenizer.encode(s)

    monkeypatch.setattr(og, "Tokenizer", Recording)
    for limit in (16, 1024, 5000):
        seen.clear()
        assert runtime.tokenize(model_dir, text, model, limit=limit) == full[:limit]
        assert max(seen) < len(text) / 10, (limit, seen, len(text))
    short = "a short text"
    assert runtime.tokenize(model_dir, short, model, limit=1024) == runtime.tokenize(model_dir, short, model)


@pytest.mark.parametrize(("family", "algorithm"), [("llama", "rtn"), ("llama", "k_quant"), ("llama", "hqq"),
                                                   ("gemma4", "k_quant")])
def test_onnxruntimes_int4_quantizers_take_the_fp16_graph_of_a_gpu_target(family: str, algorithm: str,
                                                                          tiny_dir, store: str) -> None:  # noqa: ANN001
    """On a GPU the reference is the fp16 CUDA graph, and olive-recipes' CUDA configs quantize it with
    onnxruntime's rtn, k-quant or HQQ (auto-opt --device gpu --int4_algorithm rtn / k_quant / hqq; HQQ's zero
    points are fp16 too, which CUDA's MatMulNBits reads natively). That graph is written
    here without a GPU (Gemma 4's by mobius, for CUDA), and genai runs it on the CPU with its providers
    cleared: the int4 graph's MatMulNBits read fp16 and its last logits stay near the fp16 graph's (measured
    cosine 0.97 on a tiny Llama, 0.95 on a tiny Gemma 4: olive-recipes' Gemma 4 cuda/int4 config). The CUDA
    kernels themselves run in tests/tasks/test_gpu.py where a GPU is present."""
    import onnxruntime_genai as og

    fp16 = capture_onnx.fn(download_model.fn(resolve(str(tiny_dir(family))), DownloadConfig(), store),
                           CaptureConfig.cuda())
    int4 = quantize_int4.fn(fp16, Int4Config(algorithm=algorithm))

    def last_logits(artifact) -> np.ndarray:  # noqa: ANN001
        config = og.Config(str(store_for(store).fetch(artifact.node, artifact.digest)))
        config.clear_providers()  # the CUDA graph on the CPU
        model = og.Model(config)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=64)
        generator = og.Generator(model, params)
        generator.append_tokens(TOKENS[:37])
        return np.array(generator.get_logits())[0, -1].astype(np.float32)

    graph = onnx.load(str(store_for(store).fetch(int4.node, int4.digest) / "model.onnx"), load_external_data=False)
    types = {i.name: i.data_type for i in graph.graph.initializer}
    quantized = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(quantized) >= 10  # every layer's, the lm_head too (k_quant keeps the one that writes the logits)
    assert {types[n.input[2]] for n in quantized} == {onnx.TensorProto.FLOAT16}  # the scales: fp16, as the graph
    if algorithm == "hqq":
        assert {types[n.input[3]] for n in quantized} == {onnx.TensorProto.FLOAT16}  # HQQ's float zero points
    a, b = last_logits(int4), last_logits(fp16)
    assert float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9
