"""Timing on a shared machine. Grove's measurements on one machine take turns (runs measuring at
once, such as a worker's concurrent flow runs or a fleet's targets, slowed each other's figures),
and each says how busy the rest of the machine was meanwhile, so that a slow figure can be told
from a busy hour."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from grove.store import cache_home, file_lock

__all__ = ["timed_alone"]


def _busy_and_total() -> tuple[float, float] | None:
    """Seconds of CPU time the whole machine spent busy, and in all, since boot (Linux /proc/stat:
    busy is everything but idle and iowait, so a hypervisor's steal counts as busy)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - fields[3] - fields[4]) / tick, total / tick


def _own() -> float:
    t = os.times()
    return t.user + t.system


@contextlib.contextmanager
def timed_alone(what: str) -> Iterator[dict[str, float | None]]:
    """Hold this machine's timing turn for the block (logs once if it has to wait). The dict it
    yields holds, after the block, ``cpu_busy_elsewhere``: the share of the machine's CPU time that
    other processes used while the block ran (0 = an otherwise idle machine; None where the
    machine does not say, or for a block too short to sample: under ~0.1 s on 2 CPUs)."""

    def waiting() -> None:
        from grove.node import node_logger  # the run's logger (grove.node imports the store)

        node_logger().info("timing %s after the Grove measurement already running on this machine", what)

    result: dict[str, float | None] = {"cpu_busy_elsewhere": None}
    cache_home().mkdir(parents=True, exist_ok=True)
    with file_lock(cache_home() / "timing.lock", waiting):
        before, own_before = _busy_and_total(), _own()
        yield result
        after, own_after = _busy_and_total(), _own()
    # /proc/stat counts in ticks (10 ms): a block shorter than a few of them says nothing reliable
    if before is not None and after is not None and after[1] - before[1] >= 0.2:
        elsewhere = (after[0] - before[0]) - (own_after - own_before)
        result["cpu_busy_elsewhere"] = round(min(max(elsewhere / (after[1] - before[1]), 0.0), 1.0), 3)
