"""grove benchmark (Olive's): lm-evaluation-harness tasks on a Hugging Face model (PyTorch) and on a
grove auto-opt output (onnxruntime-genai), a task of our own from YAML with local rows (the hub's task
data is not reachable here), and an evaluation-only Olive config read as the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import tiny_models
from tests.conftest import grove_cli

ROWS = [{"question": f"Box {i} holds", "choices": ["red", "blue", "green"], "answer": i % 3} for i in range(12)]
GEN_ROWS = [{"prompt": f"Count {i}:", "target": "x"} for i in range(4)]


def _tasks(folder: Path) -> Path:
    """Two tasks of our own: a multiple choice one (log-likelihoods) and a generation one."""
    folder.mkdir()
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN_ROWS))
    (folder / "grove_choice.yaml").write_text(f"""task: grove_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'rows.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    (folder / "grove_gen.yaml").write_text(f"""task: grove_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'gen.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 5
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_models.build("llama", tmp_path_factory.mktemp("bench") / "llama")


def test_pytorch_and_onnxruntime_genai_score_the_same_log_likelihoods(tiny_llama: Path, tmp_path: Path,
                                                                     store: str) -> None:
    """The same tasks on the Hugging Face model and on its fp32 auto-opt output: the multiple choice
    accuracy is the same (the log-likelihoods agree, so every argmax does), the generation task runs in
    onnxruntime-genai, and the rerun is Cached. results.json is the harness's; grove_report.json says
    which backend scored it."""
    tasks = _tasks(tmp_path / "tasks")
    fp32 = tmp_path / "fp32"
    built = grove_cli("auto-opt", "-m", str(tiny_llama), "--precision", "fp32", "-o", str(fp32), "--store", store)
    assert built.returncode == 0, built.stderr[-3000:]
    scores = {}
    for name, model in (("hf", tiny_llama), ("genai", fp32)):
        out = tmp_path / f"scores-{name}"
        command = ("benchmark", "-m", str(model), "--tasks", "grove_choice", "grove_gen", "--include_path",
                   str(tasks), "-o", str(out), "--store", store)
        result = grove_cli(*command)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "grove_choice: acc" in result.stdout, result.stdout
        report = json.loads((out / "grove_report.json").read_text())
        assert report["backend"] == ("pytorch" if name == "hf" else "onnxruntime-genai")
        assert set(report["metrics"]) == {"grove_choice", "grove_gen"}, report["metrics"]
        harness = json.loads((out / "results.json").read_text())
        assert harness["n-samples"]["grove_choice"]["effective"] == len(ROWS)
        scores[name] = report["metrics"]
        if name == "genai":
            again = grove_cli(*command)
            assert again.returncode == 0 and "evaluate-lm" in again.stderr
            assert "already in the store" in again.stderr or "Cached" in again.stderr, again.stderr[-2000:]
    assert scores["hf"]["grove_choice"]["acc"] == scores["genai"]["grove_choice"]["acc"], scores
    assert 0 <= scores["genai"]["grove_gen"]["exact_match"] <= 1


def test_genai_log_likelihoods_match_pytorch(tiny_llama: Path, tmp_path: Path) -> None:
    """Grove's model class for the harness, request by request against the PyTorch model's sums."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from grove.tasks._lm_eval_genai import GenaiLM
    from grove.tasks.capture_onnx import CaptureConfig, _capture

    folder = tmp_path / "genai"
    folder.mkdir()
    _capture([tiny_llama], CaptureConfig(precision="fp32"), folder)
    lm = GenaiLM(folder)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    requests = [(None, [5, 9, 13], [21, 7]), (None, [3], [44]), (None, list(range(4, 30)), [8, 8, 8])]
    got = lm._loglikelihood_tokens(requests)
    for (_, context, continuation), (logprob, greedy) in zip(requests, got, strict=True):
        ids = torch.tensor([context + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        rows = logp[len(context) - 1:-1]
        expected = float(rows[np.arange(len(continuation)), continuation].sum())
        assert abs(logprob - expected) < 1e-3, (logprob, expected)
        assert greedy == bool((rows.argmax(-1) == torch.tensor(continuation)).all())


def test_an_evaluation_only_config_is_grove_benchmark(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """olive-recipes' *_pytorch_with_eval.json shape: no passes, an LMEvaluator."""
    from grove.shell.cli import main

    config = {"input_model": {"type": "HfModel", "model_path": "org/model"}, "output_dir": "scores",
              "evaluators": {"e": {"type": "LMEvaluator", "tasks": ["hellaswag"], "batch_size": 1, "limit": 4,
                                   "max_length": 128, "device": "gpu"}}, "evaluator": "e"}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["run", "--config", str(tmp_path / "c.json"), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == ("grove benchmark --model_name_or_path org/model --output_path scores --tasks hellaswag "
                           "--batch_size 1 --max_length 128 --limit 4.0"), out
    assert "no passes, so the input model is scored on lm-eval's hellaswag" in err and "device not used" in err
    config["evaluators"]["e"]["type"] = "MTEBEvaluator"
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["run", "--config", str(tmp_path / "c.json"), "--dry-run"]) == 2
    assert "passes is empty: a config that only evaluates the input model runs in Grove with an LMEvaluator " \
           "(lm-eval tasks, grove benchmark), not evaluators.e (MTEBEvaluator: hellaswag" in capsys.readouterr().err


def test_a_config_with_passes_and_an_lm_evaluator_scores_the_output_after_auto_opt(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """olive-recipes' *_int4_with_eval.json shape: the passes' output, once written, is scored on the
    evaluator's lm-eval tasks (grove benchmark -m <output>), its results in <output>/lm-eval."""
    from grove.shell.cli import _expand_run, main

    config = {"input_model": {"type": "HfModel", "model_path": "org/model"}, "output_dir": "models/int4",
              "passes": {"mb": {"type": "ModelBuilder", "precision": "int4"}},
              "evaluators": {"e": {"type": "LMEvaluator", "tasks": ["arc_easy"], "limit": 0.1,
                                   "model_class": "ortgenai",
                                   "provider_options": {"enable_skip_layer_norm_strict_mode": "1"}}}, "evaluator": "e"}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(config))
    assert main(["run", "--config", str(path), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    auto_opt, benchmark = out.strip().split(" && ")
    assert auto_opt.startswith("grove auto-opt --model_name_or_path org/model --output_path models/int4"), out
    assert benchmark == ("grove benchmark --model_name_or_path models/int4 --output_path models/int4/lm-eval "
                         "--tasks arc_easy --limit 0.1"), benchmark
    assert "the output is scored after auto-opt on lm-eval's arc_easy" in err and "not computed" not in err, err
    assert "provider_options not used" in err, err
    steps = _expand_run(["run", "--config", str(path)])
    assert [s[0] for s in steps] == ["auto-opt", "benchmark"]  # type: ignore[index, union-attr]


def test_an_inline_task_of_a_config_is_scored_and_kept_with_its_results(tiny_llama: Path, tmp_path: Path,
                                                                         store: str) -> None:
    """olive-recipes' HY-MT shape: an LMEvaluator whose task is a whole lm-eval config inside the Olive
    config. `grove run` scores the model on it (the node writes it as the harness's YAML, which the
    artifact keeps), with the same accuracy as the same task from a YAML folder; a changed definition is
    a new node, not the cached one."""
    folder = _tasks(tmp_path / "tasks")
    task = {"task": "inline_choice", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(folder / "rows.jsonl")}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{answer}}", "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                             "higher_is_better": True}], "metadata": {"version": 1.0}}
    config = {"input_model": {"type": "HfModel", "model_path": str(tiny_llama)}, "output_dir": "scores",
              "evaluators": {"e": {"type": "LMEvaluator", "tasks": [task], "batch_size": 1}}, "evaluator": "e"}
    (tmp_path / "c.json").write_text(json.dumps(config))
    env = {"GROVE_STORE": store}
    result = grove_cli("run", "--config", str(tmp_path / "c.json"), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "inline_choice defined in the config, passed whole" in result.stderr, result.stderr[-3000:]
    report = json.loads((tmp_path / "scores" / "grove_report.json").read_text())
    assert set(report["metrics"]) == {"inline_choice"}
    reference = grove_cli("benchmark", "-m", str(tiny_llama), "--tasks", "grove_choice", "--include_path",
                          str(folder), "-o", str(tmp_path / "reference"), "--store", store)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = json.loads((tmp_path / "reference" / "grove_report.json").read_text())["metrics"]["grove_choice"]
    assert report["metrics"]["inline_choice"]["acc"] == expected["acc"]
    import yaml

    [kept] = Path(store).glob("artifacts/evaluate-lm/*/tasks/inline_choice.yaml")  # the reference has no tasks/
    assert yaml.safe_load(kept.read_text()) == task
    task["metadata"] = {"version": 2.0}
    config["evaluators"]["e"]["tasks"] = [task]
    (tmp_path / "c.json").write_text(json.dumps(config))
    again = grove_cli("run", "--config", str(tmp_path / "c.json"), env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(list(Path(store).glob("artifacts/evaluate-lm/*/tasks/inline_choice.yaml"))) == 2, "a new node"


def test_a_task_definition_that_is_not_a_named_task_config_is_one_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from grove.shell.cli import main

    for definition, expected in (('{"task": "a"', "--task_definitions: not a JSON object"),
                                 ('["a"]', 'an lm-eval task config is a JSON object with a "task" name'),
                                 ('{"task": "../x"}', "task name '../x': a plain name")):
        assert main(["benchmark", "-m", "org/model", "--tasks", "a", "--task_definitions", definition,
                     "--dry_run"]) == 2
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
    config = {"input_model": {"type": "HfModel", "model_path": "org/model"}, "output_dir": "scores",
              "evaluators": {"e": {"type": "LMEvaluator", "tasks": [{"dataset_path": "json"}]}}, "evaluator": "e"}
    (tmp_path / "c.json").write_text(json.dumps(config))
    assert main(["run", "--config", str(tmp_path / "c.json"), "--dry-run"]) == 2
    assert 'evaluators.e.tasks[0]: an inline task config needs its "task" name' in capsys.readouterr().err
