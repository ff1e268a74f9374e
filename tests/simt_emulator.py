"""Loader of the SIMT emulator (tests/simt/): the project's CUDA device code and host launch logic compiled by the
host compiler as a torch extension, built once into build/simt (ninja rebuilds only what changed).

``load()`` returns the extension; ``run(fn, *args, seed=..., poison=..., placement=..., arch=...)`` configures it
and calls one of its entry points. See tests/simt/simt.h for what is and is not emulated."""

from __future__ import annotations

import functools
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ["simt.cpp", "device.cpp", "msda.cpp", "lsap.cpp", "selftest.cpp", "module.cpp"]
PLACEMENTS = {"aligned": 0, "flush_front": 1, "flush_end": 2}


@functools.cache
def load():
    from torch.utils import cpp_extension

    build_dir = ROOT / "build" / "simt"
    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 2))
    return cpp_extension.load(
        name="deformable_detr_simt",
        sources=[str(ROOT / "tests" / "simt" / s) for s in SOURCES],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "simt")],
        extra_cflags=["-O1", "-std=c++20", "-DDEFORMABLE_DETR_SIMT=1"],
        build_directory=str(build_dir),
        with_cuda=False,
        verbose=False,
    )


def run(fn: str, *args, seed=0, poison=0xA5, placement="aligned", arch=900, min_threads=0, **op_kwargs):
    """Call entry point ``fn`` of the emulator under one configuration (min_threads=0: the real threshold);
    ``op_kwargs`` go to the entry point (the MSDA ops' ``point_start`` / ``discrete``)."""
    ext = load()
    ext.configure(seed, poison, PLACEMENTS[placement], arch, min_threads)
    return getattr(ext, fn)(*args, **op_kwargs)
