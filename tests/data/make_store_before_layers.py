"""Build tests/data/store-before-layers.tar.gz: a store filled by an auto-opt run of a tiny random decoder
(an encoder's store would be 37 MB: its 30k-token vocabulary), for the test that a store filled before
a code move is reused after it (every node Cached). Run it with the code whose store is to be kept,
from the project root:

    .venv/bin/python tests/data/make_store_before_layers.py

The store holds absolute paths (each result record names its store), so it is built, and extracted by
the test, at one fixed place: /tmp/grove-store-before-layers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PLACE = Path("/tmp/grove-store-before-layers")
ARCHIVE = ROOT / "tests" / "data" / "store-before-layers.tar.gz"
# What the test reruns, exactly (the CLI's flags are the stable interface across the move).
RUNS = {"decoder": ["--precision", "int4", "--eval_tokens", "128"]}


def auto_opt(model: Path, out: Path, extra: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    grove = Path(sys.executable).with_name("grove")
    return subprocess.run([str(grove), "auto-opt", "-m", str(model), "-o", str(out), "--store", str(PLACE / "store"),
                           "--log_level", "1", *extra], capture_output=True, text=True, env=env, timeout=900)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from tests import tiny_models

    shutil.rmtree(PLACE, ignore_errors=True)
    tiny_models.build("llama", PLACE / "decoder")
    home = Path(tempfile.mkdtemp(prefix="grove-fixture-home-"))
    env = {**os.environ, "GROVE_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    try:
        for name, extra in RUNS.items():
            run = auto_opt(PLACE / name, home / f"out-{name}", extra, env)
            if run.returncode:
                sys.exit(f"{name}: {run.stderr[-3000:]}")
    finally:
        subprocess.run([str(Path(sys.executable).with_name("grove")), "server", "stop"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    with tarfile.open(ARCHIVE, "w:gz") as tar:
        tar.add(PLACE, arcname=PLACE.name)
    print(f"{ARCHIVE.relative_to(ROOT)}: {ARCHIVE.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
