"""Timing on a shared machine. Grove's measurements on one machine take turns (runs measuring at
once, such as a worker's concurrent flow runs or a fleet's targets, slowed each other's figures),
and each says how busy the rest of the machine was meanwhile, so that a slow figure can be told
from a busy hour. Grove's own processes also ask glibc for transparent huge pages
(``with_huge_pages``), and each figure says whether its process had them (``huge_pages``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from grove.store import cache_home, file_lock

__all__ = ["HUGE_PAGES", "NO_HUGE_PAGES", "huge_pages_available", "huge_pages_in_use", "thp_mode", "timed_alone",
           "with_huge_pages"]

# glibc (2.35+) then advises the kernel to back malloc's memory with 2 MB pages where the machine's
# transparent huge pages are in "madvise" mode (Ubuntu's and Debian's default; "always" needs
# nothing). A decode step reads all of a model's weights, ~70 MB for an int4 SmolLM2, and on 4 KB
# pages the TLB misses on nearly every page: onnxruntime-genai decoded 10-17% faster with it here
# (bench/bench_auto_opt.py's row without it), PyTorch no faster, at ~2% more resident memory.
_TUNABLE = "glibc.malloc.hugetlb"
HUGE_PAGES = f"{_TUNABLE}=1"
NO_HUGE_PAGES = f"{_TUNABLE}=0"  # the user's way to turn them off (bench/bench_auto_opt.py's 4 KB-page row)


def with_huge_pages(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a process Grove starts (the warm runner, a stack's workers): ``GLIBC_TUNABLES``
    gains ``glibc.malloc.hugetlb=1``, unless it sets that tunable already (then the user's value
    stands: ``glibc.malloc.hugetlb=0`` turns it off). glibc reads it once, at the process's start."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0] == _TUNABLE for item in tunables.split(":")):
        return dict(env)
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, (tunables, HUGE_PAGES)))}


def thp_mode() -> str | None:
    """The kernel's transparent huge pages mode: 'madvise' (on where a process asks, as Grove's do),
    'always', 'never'; None where the system does not say."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text and "]" in text else None


def huge_pages_in_use() -> bool | None:
    """Whether malloc's memory in this process (onnxruntime's weights) is on transparent huge pages:
    the kernel's mode is 'always', or 'madvise' and the process started with glibc's tunable (read
    from its initial environment: a warm runner's fork keeps the runner's malloc), and the kernel has
    granted some. Not just any huge page: numpy asks for them itself for its large arrays. None
    where the system does not say."""
    mode = thp_mode()
    if mode is None:
        return None
    if mode == "never" or (mode == "madvise" and not (_glibc_reads_tunable() and _started_with_tunable())):
        return False
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) > 0
    except (OSError, ValueError, IndexError):
        return None
    return None


def huge_pages_available() -> bool:
    """Whether a process Grove starts gets transparent huge pages here: the kernel's mode is
    'always', or 'madvise' with a glibc that reads the tunable (2.35+)."""
    mode = thp_mode()
    return mode == "always" or (mode == "madvise" and _glibc_reads_tunable())


def _glibc_reads_tunable() -> bool:
    libc = os.confstr("CS_GNU_LIBC_VERSION") if "CS_GNU_LIBC_VERSION" in os.confstr_names else None
    try:  # "glibc 2.36"; None or another libc (musl) reads no tunables
        major, minor = (int(v) for v in (libc or "").split()[-1].split(".")[:2])
    except (ValueError, IndexError):
        return False
    return (major, minor) >= (2, 35)


def _started_with_tunable() -> bool:
    """``glibc.malloc.hugetlb`` on in the environment this process started with."""
    try:
        with open("/proc/self/environ", "rb") as f:
            environ = f.read().decode(errors="replace").split("\0")
    except OSError:
        return False
    tunables = next((v.split("=", 1)[1] for v in environ if v.startswith("GLIBC_TUNABLES=")), "")
    setting = dict(item.split("=", 1) for item in tunables.split(":") if "=" in item)
    return setting.get(_TUNABLE, "0") != "0"


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
def timed_alone(what: str) -> Iterator[dict[str, float | bool | None]]:
    """Hold this machine's timing turn for the block (logs once if it has to wait). The dict it
    yields holds, after the block, ``cpu_busy_elsewhere``: the share of the machine's CPU time that
    other processes used while the block ran (0 = an otherwise idle machine; None where the
    machine does not say, or for a block too short to sample: under ~0.1 s on 2 CPUs), and
    ``huge_pages``: whether this process had memory on transparent huge pages (None: unknown)."""

    def waiting() -> None:
        from grove.node import node_logger  # the run's logger (grove.node imports the store)

        node_logger().info("timing %s after the Grove measurement already running on this machine", what)

    result: dict[str, float | bool | None] = {"cpu_busy_elsewhere": None, "huge_pages": None}
    cache_home().mkdir(parents=True, exist_ok=True)
    with file_lock(cache_home() / "timing.lock", waiting):
        before, own_before = _busy_and_total(), _own()
        yield result
        after, own_after = _busy_and_total(), _own()
        result["huge_pages"] = huge_pages_in_use()
    # /proc/stat counts in ticks (10 ms): a block shorter than a few of them says nothing reliable
    if before is not None and after is not None and after[1] - before[1] >= 0.2:
        elsewhere = (after[0] - before[0]) - (own_after - own_before)
        result["cpu_busy_elsewhere"] = round(min(max(elsewhere / (after[1] - before[1]), 0.0), 1.0), 3)
