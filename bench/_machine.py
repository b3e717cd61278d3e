"""What the figures were measured on: int8 and int4 CPU kernels differ by instruction set (an
AVX2-only CPU runs onnxruntime's int8 GEMMs about half as fast as one with VNNI), so every
benchmark prints this beside its ratios."""

from __future__ import annotations

import platform

__all__ = ["machine"]

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def machine() -> dict[str, object]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    from grove.tasks._genai_runtime import available_cpus
    from grove.timing import thp_mode

    # thp: the transparent huge pages mode, which decides whether Grove's processes get them
    return {"cpu": model, "cpus": available_cpus(), "isa": [f for f in _FLAGS if f in flags], "thp": thp_mode()}
