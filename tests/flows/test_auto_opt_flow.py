"""The auto-opt flow on a real Prefect server: outputs, report, and the cache contract
(identical rerun = every node Cached; a deleted artifact is rebuilt, never dangling)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from grove.flows.request import AutoOptRequest
from grove.shell.local_run import run_auto_opt_state
from grove.store import ArtifactStore
from grove.tasks._sources import resolve
from tests.conftest import task_states

CACHED_NODES = {"download-model", "capture-onnx", "quantize-int4", "evaluate", "package-genai"}
GENAI_FILES = {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "tokenizer_config.json",
               "grove_report.json"}


def _request(model: Path, out: Path, store: str, **kw: object) -> AutoOptRequest:
    return AutoOptRequest(model_name_or_path=str(model), output_path=str(out), store=store, eval_tokens=128, **kw)


def _task_states(state, expect: Iterable[str] = ()) -> dict[str, list[str]]:  # noqa: ANN001
    """{node name: [state name of each of its task runs]} of the flow run behind ``state``."""
    return task_states(state.state_details.flow_run_id, expect)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_auto_opt_outputs_a_genai_folder_with_a_report(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    state = run_auto_opt_state(_request(tiny_dir("qwen2"), out, store))

    assert state.is_completed()
    assert {p.name for p in out.iterdir()} >= GENAI_FILES
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["precision"] == "int4"
    assert report["metrics"]["perplexity"] > 1 and report["reference"]["perplexity"] > 1
    assert report["reference"]["precision"] == "fp32"
    assert 0 <= report["metrics"]["top1_agreement"] <= 1
    assert report["ratios"]["size_vs_reference"] < 0.6
    # Every node behind the output, upstream first, down to the source's digest.
    lineage = report["lineage"]
    assert [step["node"] for step in lineage] == ["download-model", "capture-onnx", "quantize-int4", "evaluate",
                                                  "evaluate"]
    assert lineage[0]["inputs"] == [resolve(str(tiny_dir("qwen2"))).digest]
    built = {step["digest"] for step in lineage} | set(lineage[0]["inputs"])
    assert all(set(step["inputs"]) <= built for step in lineage), "each step's inputs are in the lineage"

    import onnxruntime_genai as og

    og.Model(str(out))  # the tutorial's step 3 loads exactly this folder


def test_identical_rerun_is_all_cached_with_identical_output(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    request = _request(tiny_dir("llama"), out, store)
    first = _task_states(run_auto_opt_state(request), CACHED_NODES)
    files = _hashes(out)
    second = _task_states(run_auto_opt_state(request), CACHED_NODES)

    assert all("Cached" not in first[n] for n in CACHED_NODES), first
    assert all(set(second[n]) == {"Cached"} for n in CACHED_NODES), second
    assert _hashes(out) == files


def test_deleted_artifact_is_recomputed_not_dangling(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    request = _request(tiny_dir("llama"), out, store)
    run_auto_opt_state(request)
    files = _hashes(out)
    artifacts = Path(ArtifactStore(store).root) / "artifacts"
    (quantized,) = (artifacts / "quantize-int4").iterdir()
    (quantized / "model.onnx.data").unlink()  # incomplete: a file is missing
    shutil.rmtree(next((artifacts / "package-genai").iterdir()))  # gone entirely

    states = _task_states(run_auto_opt_state(request), CACHED_NODES)

    assert states["quantize-int4"] == ["Completed"] and states["package-genai"] == ["Completed"]
    assert states["capture-onnx"] == ["Cached"]
    files.pop("grove_report.json")  # its lineage records how long the rebuilt node took
    assert {k: v for k, v in _hashes(out).items() if k != "grove_report.json"} == files


def test_s3_store_end_to_end(tiny_dir, tmp_path: Path, s3_store: str) -> None:  # noqa: ANN001
    out = tmp_path / "out"
    request = _request(tiny_dir("gemma"), out, s3_store)
    run_auto_opt_state(request)
    store = ArtifactStore(s3_store)

    manifests = store.fs.glob(f"{store.root}/artifacts/*/*/manifest.json")
    assert {m.split("/")[-3] for m in manifests} == CACHED_NODES
    assert store.fs.glob(f"{store.root}/prefect-results/*")
    assert set(_task_states(run_auto_opt_state(request), CACHED_NODES)["quantize-int4"]) == {"Cached"}
    assert {p.name for p in out.iterdir()} >= GENAI_FILES


def test_without_an_output_path_the_output_stays_in_the_store(tiny_dir, tmp_path: Path, s3_store: str,  # noqa: ANN001
                                                              monkeypatch) -> None:  # noqa: ANN001
    """Fleet entries and dashboard runs on a worker: no copy on the worker's disk; the report comes
    from the package in the (here S3) store, and the run's page links to it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    monkeypatch.chdir(tmp_path)
    request = AutoOptRequest(model_name_or_path=str(tiny_dir("gemma")), store=s3_store, eval_tokens=128)
    state = run_auto_opt_state(request)

    assert state.is_completed()
    report = state.result()
    store = ArtifactStore(s3_store)
    [package] = store.fs.glob(f"{store.root}/artifacts/package-genai/*/grove_report.json")
    assert report == json.loads(store.fs.cat_file(package)) and report["metrics"]["perplexity"] > 1
    assert list(tmp_path.iterdir()) == [], "nothing written outside the store"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    (link,) = [a for a in artifacts if (a.key or "").startswith("output-")]
    location = f"{s3_store}/artifacts/package-genai/{package.split('/')[-2]}/"
    assert str(link.data) == f"[{location}]({location})"  # a markdown link on the run's page


def test_a_short_context_model_is_scored_in_chunks_that_fit_it(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    """The tiny models hold 256 positions; the default 512-token perplexity chunk does not fit
    (onnxruntime-genai refuses max_length > context_length). Chunks shrink to the context."""
    out = tmp_path / "out"
    state = run_auto_opt_state(_request(tiny_dir("llama"), out, store).model_copy(update={"eval_tokens": 600}))

    assert state.is_completed()
    metrics = json.loads((out / "grove_report.json").read_text())["metrics"]
    assert metrics["ppl_tokens"] == 600 and metrics["ppl_chunk"] == 255
    assert metrics["perplexity"] > 1 and metrics["generated_tokens"] == 64


def test_builder_int4_takes_the_block_size(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    """--int4_algorithm builder (the GPU default) quantizes inside the model builder; --block_size
    must reach it, not be dropped silently."""
    import onnx

    out = tmp_path / "out"
    state = run_auto_opt_state(_request(tiny_dir("qwen2"), out, store, int4_algorithm="builder", block_size=16))

    assert state.is_completed()
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    blocks = {a.i for n in graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    assert blocks == {16}
    target = json.loads((out / "grove_report.json").read_text())["target"]
    assert (target["int4_algorithm"], target["block_size"]) == ("builder", 16)


def test_builder_int4_with_embedding_int8_says_so_in_its_report(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                 store: str) -> None:
    """--embedding_int8 (the builder's int4 with Olive's embedding surgeries) reaches the capture: one 8-bit
    table for the embedding and the tied lm_head, and the report's target names it."""
    import onnx

    from grove.tasks._report_text import format_report

    out = tmp_path / "out"
    state = run_auto_opt_state(_request(tiny_dir("qwen2"), out, store, int4_algorithm="builder", embedding_int8=True))

    assert state.is_completed()
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    bits = {n.op_type: a.i for n in graph.node if n.op_type in ("GatherBlockQuantized", "MatMulNBits")
            and n.name.startswith(("/model/embed_tokens/", "/lm_head/")) for a in n.attribute if a.name == "bits"}
    assert bits == {"GatherBlockQuantized": 8, "MatMulNBits": 8}
    report = json.loads((out / "grove_report.json").read_text())
    assert report["target"]["embedding_int8"] is True
    assert "int4 (builder, block 32, 8-bit embedding)" in format_report(report, str(out))


def test_a_pruned_lm_head_scores_the_same_perplexity_a_token_at_a_time(tiny_dir, tmp_path: Path,  # noqa: ANN001
                                                                        store: str) -> None:
    """--prune_lm_head (the builder's prune_lm_head, olive-recipes' Qwen3.5 configs): the graph's logits
    hold the last position only, so the evaluation feeds a token at a time; the int4 output's perplexity
    and top-1 agreement are the unpruned output's (same weights, same scores up to kernel rounding)."""
    import onnx
    import onnxruntime_genai as og

    from grove.tasks._genai_runtime import logits

    full, pruned = tmp_path / "full", tmp_path / "pruned"
    assert run_auto_opt_state(_request(tiny_dir("llama"), full, store)).is_completed()
    assert run_auto_opt_state(_request(tiny_dir("llama"), pruned, store, prune_lm_head=True)).is_completed()
    ids = [3, 14, 15, 92, 65, 35]
    generator_logits = logits(og.Model(str(pruned)), ids)
    assert generator_logits.shape[0] == len(ids)
    np_full = logits(og.Model(str(full)), ids)
    assert abs(generator_logits - np_full).max() < 1e-3 * abs(np_full).max()
    for folder, positions in ((full, "sequence_length"), (pruned, 1)):
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        [out] = [o for o in graph.output if o.name == "logits"]
        dim = out.type.tensor_type.shape.dim[1]
        assert (dim.dim_param or dim.dim_value) == positions
    a = json.loads((full / "grove_report.json").read_text())["metrics"]
    b = json.loads((pruned / "grove_report.json").read_text())["metrics"]
    assert abs(a["perplexity"] - b["perplexity"]) < 1e-3 * a["perplexity"], (a, b)
    assert b["top1_agreement"] >= a["top1_agreement"] - 0.02
