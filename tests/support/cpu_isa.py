"""The CPU capability levels (ATen's ATEN_CPU_CAPABILITY names, which also pick this project's kernel copy) that
this CPU runs, lowest first. ``python tests/support/cpu_isa.py --below-best`` prints the levels under the best one,
space-separated: the Makefile's test-isa runs the rounding-sensitive tests once under each."""

from __future__ import annotations

import platform
import sys

ORDER = ("default", "avx2", "avx512")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def supported_capabilities() -> list[str]:
    """Levels this CPU runs (x86-64 builds compile every copy; other machines run the default one)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["default"]
    flags = cpu_flags()
    levels = ["default"]
    if {"avx2", "fma"} <= flags:
        levels.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            levels.append("avx512")
    return levels


if __name__ == "__main__":
    levels = supported_capabilities()
    print(" ".join(levels[:-1] if sys.argv[1:] == ["--below-best"] else levels))
