"""deployments/prefect.yaml (for container users: `prefect deploy --all`) and `grove deploy` (from
Python) declare the same deployments: each flow on each pool, with the worker's device, the fleet
refresh on the cpu pool. Nothing else keeps the two tables in step."""

from __future__ import annotations

from pathlib import Path

import yaml

from grove.shell.deploy import DEPLOYMENTS, FLEET, POOLS

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> set[tuple[str, str, str, str]]:
    deployments = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())["deployments"]
    return {(d["name"], d["entrypoint"], d["work_pool"]["name"], d["work_pool"]["job_variables"]["env"]["GROVE_DEVICE"])
            for d in deployments}


def test_prefect_yaml_declares_what_grove_deploy_applies() -> None:
    applied = {(f"{d.name}-{pool.device}", d.entrypoint, pool.name, pool.device) for d in DEPLOYMENTS for pool in POOLS}
    applied.add((FLEET.name, FLEET.entrypoint, POOLS[0].name, POOLS[0].device))
    assert _declared() == applied


def test_every_entrypoint_names_a_flow_that_exists() -> None:
    import importlib

    from prefect import Flow

    for _, entrypoint, _, _ in _declared():
        path, name = entrypoint.split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert isinstance(getattr(module, name), Flow), entrypoint
