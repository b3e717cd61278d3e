"""Fleet refresh: only what changed upstream is rebuilt, the registry's `latest` moves only for
it, a broken model fails alone, and an encoder in the fleet takes the encoder path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from grove.flows.fleet import FleetManifest
from grove.tasks.publish_model import read_latest
from tests import tiny_models

FAMILIES = {"alpha": "llama", "beta": "qwen2", "gamma": "gemma"}


def _manifest(models: dict[str, Path], store: str) -> FleetManifest:
    return FleetManifest.model_validate({
        "store": store, "eval_tokens": 64, "concurrency": 2,
        "targets": {"cpu": {"device": "cpu"}},
        "models": [{"name": n, "source": str(p), "targets": ["cpu"]} for n, p in models.items()],
    })


def _run(manifest: FleetManifest) -> dict[str, dict[str, str]]:
    from grove.flows.fleet_refresh import fleet_refresh

    return {row["model"]: row for row in fleet_refresh(manifest)}


def test_only_changed_models_refresh_and_a_broken_one_fails_alone(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    models = {name: shutil.copytree(tiny_dir(family), tmp_path / name) for name, family in FAMILIES.items()}
    broken = shutil.copytree(tiny_dir("llama"), tmp_path / "delta")
    (broken / "model.safetensors").write_bytes(b"\0" * 64)
    models["delta"] = broken
    models["epsilon"] = tiny_models.build_encoder("bert", tmp_path / "epsilon", head=None)  # an embedding model
    manifest = _manifest(models, store)

    first = _run(manifest)
    assert {n: r["status"] for n, r in first.items()} == {
        "alpha": "refreshed", "beta": "refreshed", "gamma": "refreshed", "delta": "failed", "epsilon": "refreshed"}
    assert "safetensors" in first["delta"]["reason"]
    encoder = json.loads((Path(read_latest(store, "epsilon", "cpu")["path"]) / "grove_report.json").read_text())
    assert encoder["target"]["task"] == "feature-extraction" and encoder["target"]["precision"] == "int8", \
        "a target without a precision gives each model its path's default"
    before = {n: read_latest(store, n, "cpu") for n in FAMILIES}

    config = models["beta"] / "config.json"  # upstream change: beta's weights are re-saved differently
    config.write_text(json.dumps({**json.loads(config.read_text()), "rms_norm_eps": 1e-5}))
    second = _run(manifest)

    assert {n: r["status"] for n, r in second.items()} == {
        "alpha": "unchanged", "beta": "refreshed", "gamma": "unchanged", "delta": "failed", "epsilon": "unchanged"}
    after = {n: read_latest(store, n, "cpu") for n in FAMILIES}
    assert after["alpha"] == before["alpha"] and after["gamma"] == before["gamma"]
    assert after["beta"]["version"] != before["beta"]["version"]
    version_dir = Path(after["beta"]["path"])
    assert (version_dir / "model.onnx").exists() and (version_dir / "grove_report.json").exists()


@pytest.mark.parametrize(("content", "expected"), [
    ("targets: [\n", "is not valid YAML: expected the node content, but found '<stream end>' at line 2"),
    ("- a\n- b\n", "is invalid: top level: Input should be a valid dictionary"),
    ("targets: {cpu: {device: cpu}}\nmodels: [{name: Bad Name, source: x, targets: [cpu]}]\n",
     "is invalid: models.0.name: String should match pattern"),
    ("targets: {cpu: {device: cpu}}\nmodels: [{name: a, source: x, targets: [gpu]}]\n",
     "is invalid: top level: model 'a' names unknown target 'gpu'; known: cpu"),
    ("targets: {cpu: {int4_algorithm: gptq, mixed_precision_algorithm: kld}}\nmodels: []\n",
     "is invalid: targets.cpu.mixed_precision_algorithm: Input should be 'output_error', 'kld_gradient'"),
    (None, "cannot be read: No such file or directory"),
])
def test_a_bad_manifest_is_one_line_and_exit_2(content: str | None, expected: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    path = tmp_path / "fleet.yaml"
    if content is not None:
        path.write_text(content)
    for command in (["fleet", "refresh", str(path)], ["deploy", "--fleet-manifest", str(path)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"grove: error: fleet manifest {path} ") and expected in err and err.count("\n") == 1, err


def test_a_decoder_and_a_classifier_refresh_side_by_side(tiny_dir, tmp_path: Path, store: str) -> None:  # noqa: ANN001
    """One batch of two, in a fresh `grove fleet refresh` process: the entries are checked in
    threads of that process, and before in-process runs took turns, the decoder's capture failed
    every time while the encoder was exported ("cannot import name 'AutoModelForCausalLM' from
    'transformers'", or a KeyError inside the model builder). The classifier keeps its head."""
    from tests.conftest import grove_cli

    classifier = tiny_models.build_encoder("bert", tmp_path / "classifier")  # BertForSequenceClassification
    manifest = tmp_path / "fleet.yaml"
    manifest.write_text(f"store: {store}\neval_tokens: 64\nconcurrency: 2\ntargets: {{cpu: {{device: cpu}}}}\n"
                        f"models:\n  - {{name: cls, source: {classifier}, targets: [cpu]}}\n"
                        f"  - {{name: dec, source: {tiny_dir('llama')}, targets: [cpu]}}\n")

    result = grove_cli("fleet", "refresh", str(manifest))

    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "| INFO    |" not in result.stderr, "Grove's one-line log format, as auto-opt's"
    assert "refresh-entry-" in result.stderr and " | Finished in state Completed()" in result.stderr
    assert [line.split() for line in result.stdout.splitlines() if line.startswith("model ")] == [
        ["model", "target", "status", "version", "reason"]]
    rows = {line.split()[0]: line.split()[2] for line in result.stdout.splitlines()
            if line.split()[:1] in (["cls"], ["dec"])}
    assert rows == {"cls": "refreshed", "dec": "refreshed"}, result.stdout
    report = json.loads((Path(read_latest(store, "cls", "cpu")["path"]) / "grove_report.json").read_text())
    assert report["target"]["task"] == "text-classification"


def test_the_example_manifest_is_valid_and_its_models_resolve_offline() -> None:
    """deployments/fleet.example.yaml is what the README points users to: it must stay loadable."""
    from grove.tasks._sources import resolve

    manifest = FleetManifest.from_yaml(Path(__file__).parents[2] / "deployments" / "fleet.example.yaml")

    assert {m.name: m.targets for m in manifest.models} == {"smollm2-135m": ["cpu", "gpu-int4"],
                                                            "minilm-l6": ["cpu", "cpu-fp32"]}
    assert manifest.targets["cpu"].precision is None, "the path's default precision"
    assert {resolve(m.source).model_type for m in manifest.models} == {"llama", "bert"}


def test_a_gpu_target_on_a_machine_without_cuda_fails_its_row_before_any_work(tiny_dir, store: str) -> None:  # noqa: ANN001
    """Run locally (no deployed gpu pool), the entry is checked as `grove auto-opt` checks a run: before,
    it captured the model and then failed on onnxruntime-genai's missing CUDA library."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the gpu target would run")
    manifest = FleetManifest.model_validate({
        "store": store, "eval_tokens": 64, "targets": {"gpu": {"device": "gpu"}},
        "models": [{"name": "tiny", "source": str(tiny_dir("llama")), "targets": ["gpu"]}]})

    [row] = _run(manifest).values()

    assert row["status"] == "failed"
    assert "CUDAExecutionProvider is not available on this machine" in row["reason"]
    assert "auto-opt-gpu deployment" in row["reason"], "says where such a target runs"
    assert not Path(store).exists() or not any(Path(store).rglob("manifest.json")), "nothing was built"


def test_a_gptq_target_and_the_versions_of_targets_that_do_not_use_it() -> None:
    """A target may ask for GPTQ (and its mixed precision); a target that does not keeps the version it had
    before the field existed, so an upgrade refreshes nothing."""
    import hashlib
    import json

    from grove import __version__
    from grove.flows.fleet import Target, entry_version
    from grove.flows.request import AutoOptRequest

    digest = "d" * 64
    before = {"device": "cpu", "provider": None, "precision": "int4", "int4_algorithm": None, "block_size": 32}
    expected = hashlib.sha256(json.dumps([digest, before, __version__], sort_keys=True).encode()).hexdigest()[:16]
    assert entry_version(digest, Target(precision="int4")) == expected
    gptq = Target(int4_algorithm="gptq", mixed_precision_ratio=0.7)
    assert entry_version(digest, gptq) != entry_version(digest, Target(int4_algorithm="gptq"))
    request = AutoOptRequest(model_name_or_path="m", output_path="o",
                             **gptq.model_dump(exclude_none=True, exclude_defaults=True))
    assert request.int4_algorithm_used == "gptq" and request.mixed_precision_ratio == 0.7
    heuristic = Target(int4_algorithm="gptq", mixed_precision_algorithm="high_precision_mlp_down")
    assert entry_version(digest, heuristic) != entry_version(digest, Target(int4_algorithm="gptq"))
    fields = heuristic.model_dump(exclude_none=True, exclude_defaults=True)
    chosen = AutoOptRequest(model_name_or_path="m", output_path="o", **fields).torch_quant("c")
    assert chosen.mixed_precision_algorithm == "high_precision_mlp_down"
