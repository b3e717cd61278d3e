"""Two identical commands at once (two people, two CI jobs): every node is built once, by one of them;
the other waits for it (its build lease) and reuses it; both outputs are the same bytes."""

from __future__ import annotations

import filecmp
import re
from collections import Counter
from pathlib import Path

from tests.faults.conftest import start_grove


def test_two_identical_auto_opt_commands_at_once_build_every_node_once_and_write_identical_outputs(
        mid_llama: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    runs = [start_grove("auto-opt", "-m", str(mid_llama), "-o", str(tmp_path / f"out{i}"), "--store", str(store),
                        "--eval_tokens", "64", log=tmp_path / f"run{i}.log") for i in (0, 1)]
    assert [run.wait(timeout=600) for run in runs] == [0, 0], [(tmp_path / f"run{i}.log").read_text()[-2000:]
                                                               for i in (0, 1)]
    logs = [(tmp_path / f"run{i}.log").read_text() for i in (0, 1)]
    built = Counter(b for log in logs for b in re.findall(r"\| (\S+/[0-9a-f]{12}) built in", log))
    assert built and set(built.values()) == {1}, f"a node was built twice: {built}"
    nodes = {b.split("/")[0] for b in built}
    assert {"download-model", "capture-onnx", "quantize-int4", "evaluate", "package-genai"} <= nodes, built
    first, second = tmp_path / "out0", tmp_path / "out1"
    for path in first.iterdir():
        if path.name != "grove_report.json":  # its timings are each run's own
            assert filecmp.cmp(path, second / path.name, shallow=False), path.name
    assert sorted(p.name for p in first.iterdir()) == sorted(p.name for p in second.iterdir())
