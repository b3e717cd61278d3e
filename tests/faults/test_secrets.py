"""No credential from the environment lands anywhere Grove writes: the command's output, the logs of the
local server and warm runner, the Prefect database (run logs, parameters, artifacts), the output folder,
this machine's caches and every object in the store."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from tests.conftest import grove_cli


def _files_holding(root: Path, secret: bytes) -> list[str]:
    found = []
    for path in root.rglob("*"):
        try:
            if path.is_file() and secret in path.read_bytes():
                found.append(str(path))
        except OSError:  # a socket, or a file removed meanwhile
            continue
    return found


def test_no_credential_from_the_environment_appears_in_logs_reports_or_artifacts(s3_store: str, tiny_dir,  # noqa: ANN001
                                                                                  tmp_path: Path) -> None:
    import s3fs

    secret = f"grove-secret-{uuid.uuid4().hex}"
    out = tmp_path / "out"
    run = grove_cli("auto-opt", "-m", str(tiny_dir("llama")), "-o", str(out), "--store", s3_store,
                    "--eval_tokens", "64", "--log_level", "0", env={"AWS_SECRET_ACCESS_KEY": secret}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    bad = grove_cli("auto-opt", "-m", str(tiny_dir("llama")), "-o", str(tmp_path / "bad"), "--store", s3_store,
                    "--min_top1_agreement", "1.0", env={"AWS_SECRET_ACCESS_KEY": secret}, timeout=300)  # a failure
    assert bad.returncode == 2, bad.stderr[-3000:]

    assert secret not in run.stdout + run.stderr + bad.stdout + bad.stderr
    for root in (out, Path(os.environ["GROVE_HOME"]), Path(os.environ["XDG_CACHE_HOME"])):
        assert _files_holding(root, secret.encode()) == [], f"the secret is in files under {root}"
    fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    objects = fs.find(s3_store.removeprefix("s3://"))
    assert any(o.endswith("manifest.json") for o in objects)
    assert [o for o in objects if secret.encode() in fs.cat_file(o)] == []
