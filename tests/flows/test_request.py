"""The auto-opt request: every contradiction in the flags is reported at once, before any work,
and the flags reach the node configs they belong to."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from grove.errors import InvalidRequest
from grove.flows.request import AutoOptRequest
from grove.flows.request_encoder import EncoderOptRequest


def test_every_contradiction_is_reported_together() -> None:
    with pytest.raises(ValidationError) as caught:
        AutoOptRequest(model_name_or_path="m", output_path="o", device="cpu", provider="CUDAExecutionProvider",
                       precision="fp16", accuracy_level=0)
    message = str(caught.value)
    assert "pass --device gpu" in message
    assert "--precision fp16 targets GPUs" in message
    assert "--accuracy_level applies to Grove's int4 quantizer" in message


def test_int4_flags_reach_the_quantizer_and_only_it() -> None:
    request = AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="rtn", block_size=64,
                             symmetric=True, accuracy_level=0)
    assert request.int4 is not None
    assert (request.int4.algorithm, request.int4.block_size, request.int4.symmetric,
            request.int4.accuracy_level) == ("rtn", 64, True, 0)
    gpu = AutoOptRequest(model_name_or_path="m", output_path="o", device="gpu", block_size=64)
    assert gpu.int4 is None, "on GPU the builder quantizes during capture"
    assert gpu.capture.block_size == 64 and gpu.reference_capture.block_size is None
    assert "block_size" not in gpu.reference_capture.recipe(), "captures without int4 keep their cache keys"


def test_int4_flags_with_another_precision_or_algorithm_are_refused_by_flag_name() -> None:
    with pytest.raises(ValidationError, match="--block_size, --symmetric apply to --precision int4, not int8"):
        AutoOptRequest(model_name_or_path="m", output_path="o", precision="int8", block_size=64, symmetric=True)
    with pytest.raises(ValidationError, match="--symmetric applies to --precision int4, not fp32"):
        AutoOptRequest(model_name_or_path="m", output_path="o", precision="fp32", symmetric=True)
    for algorithm in ("affine", "hqq", "k_quant"):
        with pytest.raises(ValidationError, match=f"--symmetric applies to --int4_algorithm rtn; {algorithm} chooses"):
            AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm=algorithm, symmetric=True)
    assert AutoOptRequest(model_name_or_path="m", output_path="o", device="gpu", symmetric=True).int4 is None, \
        "the builder's int4 is symmetric: the flag agrees with it"


def test_int8_nodes_reach_k_quant_and_leave_other_recipes_unchanged() -> None:
    int4 = AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="k_quant",
                          int8_nodes=["/model/layers.0/mlp/down_proj/MatMul"]).int4
    assert int4 is not None and int4.int8_nodes == ["/model/layers.0/mlp/down_proj/MatMul"]
    assert "int8_nodes" in int4.recipe()
    plain = AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="k_quant").int4
    assert plain is not None and "int8_nodes" not in plain.recipe(), "k_quant runs without it keep their cache keys"
    with pytest.raises(ValidationError, match="--int8_nodes applies to --int4_algorithm k_quant"):
        AutoOptRequest(model_name_or_path="m", output_path="o", int8_nodes=["a/MatMul"])


def test_head_bits_default_to_8_and_4_is_affine_or_hqq_only() -> None:
    int4 = AutoOptRequest(model_name_or_path="m", output_path="o").int4
    assert int4 is not None and (int4.algorithm, int4.head_bits) == ("affine", 8)
    int4 = AutoOptRequest(model_name_or_path="m", output_path="o", head_bits=4).int4
    assert int4 is not None and int4.head_bits == 4
    int4 = AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="hqq", head_bits=4).int4
    assert int4 is not None and (int4.algorithm, int4.head_bits) == ("hqq", 4)
    with pytest.raises(ValidationError, match="--head_bits applies to Grove's affine and hqq int4"):
        AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="rtn", head_bits=4)


def test_hqq_on_a_gpu_is_onnxruntimes_on_the_fp16_graph_and_affine_is_refused() -> None:
    """On a GPU the reference is the fp16 graph; hqq quantizes it (onnxruntime's HQQ, float zero points CUDA's
    kernel reads), so Grove's 8-bit heads do not apply. affine's correction is a CPU graph's."""
    gpu = {"model_name_or_path": "m", "output_path": "o", "device": "gpu"}
    int4 = AutoOptRequest(**gpu, int4_algorithm="hqq").int4
    assert int4 is not None and int4.algorithm == "hqq"
    with pytest.raises(ValidationError, match="--head_bits applies to Grove's affine and hqq int4 \\(--precision "
                                              "int4 on cpu\\)"):
        AutoOptRequest(**gpu, int4_algorithm="hqq", head_bits=4)
    with pytest.raises(ValidationError, match="--int4_algorithm affine is for CPU graphs .* or 'hqq' on the fp16"):
        AutoOptRequest(**gpu, int4_algorithm="affine")


def test_head_shortlist_defaults_to_32_on_8bit_heads_and_is_refused_where_nothing_rescores() -> None:
    def shortlist(**flags: object) -> int:
        int4 = AutoOptRequest(model_name_or_path="m", output_path="o", **flags).int4  # type: ignore[arg-type]
        assert int4 is not None
        return int4.head_shortlist

    assert shortlist() == 32 and shortlist(int4_algorithm="hqq", head_shortlist=64) == 64
    assert shortlist(head_shortlist=0) == 0, "0: the whole 8-bit head"
    assert shortlist(head_bits=4) == 0 and shortlist(head_bits=4, head_shortlist=0) == 0
    with pytest.raises(ValidationError, match="--head_shortlist rescores with the 8-bit lm_head, and --head_bits 4"):
        AutoOptRequest(model_name_or_path="m", output_path="o", head_bits=4, head_shortlist=16)
    for flags in ({"int4_algorithm": "rtn"}, {"precision": "int8"}, {"device": "gpu"},
                  {"device": "gpu", "int4_algorithm": "gptq"}):
        with pytest.raises(ValidationError, match="--head_shortlist applies to Grove's affine, hqq and gptq int4 on "
                                                  "cpu"):
            AutoOptRequest(model_name_or_path="m", output_path="o", head_shortlist=16, **flags)  # type: ignore[arg-type]


def test_embedding_int8_reaches_the_builders_capture_and_nothing_else() -> None:
    gpu = AutoOptRequest(model_name_or_path="m", output_path="o", device="gpu", embedding_int8=True)
    assert gpu.int4_algorithm_used == "builder" and gpu.capture.embedding_int8
    assert not gpu.reference_capture.embedding_int8, "the fp16 reference keeps its float tables"
    cpu = AutoOptRequest(model_name_or_path="m", output_path="o", int4_algorithm="builder", embedding_int8=True)
    assert cpu.capture.embedding_int8 and cpu.capture.precision == "int4"
    assert not AutoOptRequest(model_name_or_path="m", output_path="o", device="gpu").capture.embedding_int8
    for flags in ({}, {"int4_algorithm": "rtn"}, {"device": "gpu", "precision": "fp16"}):
        with pytest.raises(ValidationError, match="--embedding_int8 applies to --int4_algorithm builder"):
            AutoOptRequest(model_name_or_path="m", output_path="o", embedding_int8=True, **flags)  # type: ignore[arg-type]


def test_decoder_only_flags_on_an_encoder_are_named() -> None:
    with pytest.raises(InvalidRequest, match="--block_size, --accuracy_level apply to decoder LLMs"):
        EncoderOptRequest.from_flags({"model_name_or_path": "m", "output_path": "o", "block_size": 64,
                                      "accuracy_level": 0})


def test_an_encoder_request_without_task_takes_the_task_of_the_models_head() -> None:
    from grove.artifacts import Source

    def source(*architectures: str) -> Source:
        return Source(kind="local", location="/m", digest="d", model_type="bert", architectures=list(architectures))

    request = EncoderOptRequest.from_flags({"model_name_or_path": "m", "output_path": "o"})
    assert request.task is None  # as the dashboard's run form leaves it
    assert request.resolved(source("BertForSequenceClassification")).capture.task == "text-classification"
    assert request.resolved(source("BertForTokenClassification")).package.target["task"] == "token-classification"
    assert request.resolved(source("BertModel")).task == "feature-extraction"
    asked = EncoderOptRequest.from_flags({"model_name_or_path": "m", "output_path": "o", "task": "feature-extraction"})
    assert asked.resolved(source("BertForSequenceClassification")).task == "feature-extraction", "--task wins"
    # A task whose head the weights lack would get a randomly initialised one: refused, with the choices.
    for asked, weights, choices in (("token-classification", "BertForSequenceClassification",
                                     "pass --task text-classification or feature-extraction"),
                                    ("text-classification", "BertModel", "pass --task feature-extraction, or")):
        request = EncoderOptRequest.from_flags({"model_name_or_path": "m", "output_path": "o", "task": asked})
        with pytest.raises(InvalidRequest, match=f"--task {asked} needs a {asked} head, and m is {weights} "
                           rf"\(.*\): that head would be untrained, random weights; {choices}"):
            request.resolved(source(weights))
    cosine = EncoderOptRequest.from_flags({"model_name_or_path": "m", "output_path": "o", "min_cosine": 0.9})
    with pytest.raises(InvalidRequest, match="--min_cosine limits the embeddings' cosine"):
        cosine.resolved(source("BertForSequenceClassification"))
    assert cosine.resolved(source("BertModel")).parity("int8").min_cosine == 0.9
    labelled = EncoderOptRequest.from_flags({"model_name_or_path": "m", "output_path": "o", "eval_data": "l.csv"})
    with pytest.raises(InvalidRequest, match="--eval_data scores an embedding model on sentence pairs' similarity, "
                       r"and m has no sentence-transformers pooling \(modules.json\)"):
        labelled.resolved(source("BertModel"))
    assert labelled.resolved(source("BertForTokenClassification")).task == "token-classification"
    with pytest.raises(ValueError, match="--eval_samples caps the labelled rows of --eval_data, and no --eval_data"):
        EncoderOptRequest.from_flags({"model_name_or_path": "m", "output_path": "o", "eval_samples": 10})


@pytest.mark.parametrize(("output_path", "expected"), [
    ("s3://bucket/out", "s3://bucket/out is a URI; the output is a local folder"),
    ("  ", "empty; pass the folder"),
    ("~no-such-user-here/out", "~no-such-user-here/out: Could not determine home directory"),
])
def test_an_output_path_that_cannot_be_a_local_folder_is_refused(output_path: str, expected: str) -> None:
    for request in (AutoOptRequest, EncoderOptRequest):
        with pytest.raises(ValidationError, match=expected):
            request(model_name_or_path="m", output_path=output_path)


def test_int8_options_need_int8_and_calibration_options_need_static() -> None:
    base = {"model_name_or_path": "m", "output_path": "o"}
    with pytest.raises(ValidationError, match="--nodes_to_exclude applies to --precision int8, not fp16"):
        EncoderOptRequest.from_flags({**base, "precision": "fp16", "nodes_to_exclude": ["x"]})
    with pytest.raises(ValidationError, match="--calibrate_method, --calibration_samples apply to --int8_mode static"):
        EncoderOptRequest.from_flags({**base, "calibrate_method": "Entropy", "calibration_samples": 8})
    # A dashboard run form sends every field at its default: not an option "given".
    every = {name: field.get_default(call_default_factory=True)
             for name, field in EncoderOptRequest.model_fields.items() if not field.is_required()}
    assert EncoderOptRequest(**{**every, **base, "precision": "fp16"}).fp16 is not None


def test_the_default_int4_follows_what_the_architecture_allows(tiny_dir) -> None:  # noqa: ANN001
    """The GPU's default int4, the builder's own, is not there for Gemma 4 (mobius writes its fp16 graph):
    its default there is onnxruntime's k-quant on that graph, as olive-recipes' Gemma 4 CUDA config asks.
    A mixture of experts (Qwen3.5-35B-A3B) takes the builder's on the CPU too: only it quantizes the
    experts. The others keep the device's default, and an algorithm given is kept."""
    from grove.flows.launch import request_from_flags

    def used(model: str, device: str = "gpu", **flags: object) -> str | None:
        request, _ = request_from_flags({"model_name_or_path": str(tiny_dir(model)), "output_path": "o",
                                         "device": device, **flags})
        assert isinstance(request, AutoOptRequest)
        return request.int4_algorithm_used

    assert used("gemma4") == "k_quant"
    assert used("gemma4", int4_algorithm="rtn") == "rtn"
    assert used("gemma4", "cpu") == "affine"
    assert used("qwen3_5_moe", "cpu") == used("qwen3_5_moe") == "builder"
    assert used("qwen2") == "builder" and used("qwen2", "cpu") == "affine"
