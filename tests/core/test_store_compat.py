"""A store filled by an earlier version of Grove's code is reused by this one: an identical rerun
builds nothing, every node Cached (the cache keys, the result records' format and the names they
decode to have not moved). The store was filled at commit b883530, before the code moved into its
four layers (tests/data/make_store_before_layers.py builds it)."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

from tests.conftest import grove_cli

ARCHIVE = Path(__file__).parents[1] / "data" / "store-before-layers.tar.gz"
PLACE = Path("/tmp/grove-store-before-layers")  # where it was built: each result record names its store
NODES = ["download-model", "capture-onnx", "quantize-int4", "evaluate", "package-genai"]


def test_a_store_filled_before_the_move_is_all_cached(tmp_path: Path) -> None:
    shutil.rmtree(PLACE, ignore_errors=True)
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(PLACE.parent, filter="data")
    try:
        run = grove_cli("auto-opt", "-m", str(PLACE / "decoder"), "-o", str(tmp_path / "out"), "--store",
                        str(PLACE / "store"), "--log_level", "1", "--precision", "int4", "--eval_tokens", "128")
        log = run.stderr + run.stdout
        assert run.returncode == 0, log[-3000:]
        assert "built in" not in log, "a node was rebuilt: the store's keys or records no longer match"
        for node in NODES:
            assert f"{node}-" in log, (node, log[-3000:])
        assert log.count("Cached(type=COMPLETED)") == 6, log[-3000:]  # evaluate runs twice (int4, fp32 reference)
        assert (tmp_path / "out" / "model.onnx").is_file()
    finally:
        shutil.rmtree(PLACE, ignore_errors=True)
