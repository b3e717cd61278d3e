"""A config pasted in the dashboard (the olive-run deployment) runs on a shared worker: it reads no file
of the worker's outside the store and writes nowhere but the run's output_path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from grove.errors import InvalidRequest
from tests.conftest import ROOT

TUTORIAL = json.loads((ROOT / "tests" / "data" / "olive_tutorial_config.json").read_text())


def _config(model: str, output_dir: str | None = None) -> dict:
    config = json.loads(json.dumps(TUTORIAL))
    config["input_model"]["config"]["hf_config"]["model_name"] = model
    config.get("engine", {}).pop("output_dir", None)
    config.pop("output_dir", None)
    if output_dir is not None:
        config["output_dir"] = output_dir
    return config


@pytest.mark.parametrize("model", ["/etc", "../../../etc", "~/.ssh", "file:///root", "pkg:os/../../../../etc"])
def test_a_dashboard_config_cannot_read_the_workers_files_outside_the_store(model: str, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from grove.flows.olive_run import olive_run

    monkeypatch.setenv("GROVE_STORE", str(tmp_path / "store"))
    with pytest.raises(InvalidRequest, match="reads no file of the worker's outside the store"):
        olive_run(_config(model), output_path=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "store" / "artifacts").exists()


def test_a_dashboard_data_file_and_an_output_path_that_climbs_out_are_refused(tmp_path: Path) -> None:
    from grove.flows.olive_run import confine_paths

    with pytest.raises(InvalidRequest) as refused:
        confine_paths({"model_name_or_path": "org/model", "eval_data": "/etc/passwd#text=x",
                       "calibration_data": "hf://datasets/org/set/train.parquet", "store": str(tmp_path / "store")},
                      output_path="outputs/../../etc")
    assert "eval_data /etc/passwd" in str(refused.value) and "output_path outputs/../../etc" in str(refused.value)
    assert "calibration_data" not in str(refused.value) and "model_name_or_path" not in str(refused.value)


def test_a_dashboard_config_reads_a_model_in_the_store_and_writes_only_to_its_output_path(
        tiny_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    """The config's output_dir ('../' and all) is not where anything goes: without the run's output_path
    parameter the output stays in the store."""
    from grove.flows.olive_run import olive_run

    store, work = tmp_path / "store", tmp_path / "worker-cwd"
    model = shutil.copytree(tiny_dir("llama"), store / "models" / "tiny")
    work.mkdir()
    monkeypatch.setenv("GROVE_STORE", str(store))
    monkeypatch.chdir(work)
    config = _config(str(model), output_dir="../escaped")
    config["evaluators"] = {}
    config.get("engine", {}).pop("evaluator", None)

    with _as_a_worker_runs_it(str(store)):
        report = olive_run(config)
    assert report["target"]["precision"] == "int4"
    assert not (tmp_path / "escaped").exists() and list(work.iterdir()) == []
    assert list((store / "artifacts" / "package-genai").glob("*/manifest.json")), "the output is in the store"


def _as_a_worker_runs_it(store: str):  # noqa: ANN202
    """The result settings the deployments give their workers (grove/shell/deploy.py): node records in the
    store's own prefect-results, as Grove JSON."""
    from prefect.settings import (
        PREFECT_DEFAULT_RESULT_STORAGE_BLOCK,
        PREFECT_RESULTS_DEFAULT_SERIALIZER,
        PREFECT_RESULTS_PERSIST_BY_DEFAULT,
        temporary_settings,
    )

    from grove.flows.launch import result_storage

    block = result_storage(store)
    slug = f"{block.get_block_type_slug()}/{block._block_document_name}"  # noqa: SLF001
    return temporary_settings(updates={PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: slug,
                                       PREFECT_RESULTS_PERSIST_BY_DEFAULT: True,
                                       PREFECT_RESULTS_DEFAULT_SERIALIZER: "grove-json"})
