"""Peer kernels, built from their published sources at benchmark time (nothing of theirs is committed).

``make peers`` (a machine with the package registry) runs ``python -m benchmarks.peers fetch``: the
``transformers==4.46.3`` wheel, whose ``transformers/kernels/deformable_detr/`` is the original Deformable-DETR
op, and the ``dcnv4`` sdist land in the ignored ``.peers/dist/``. Everything after that is offline:
``unpack_original`` copies the original kernel's sources into ``.peers/src/original/`` with the substitutions
today's torch needs (``substitute``), and ``original_status`` JIT-builds them with ``torch.utils.cpp_extension.load``
into ``.peers/build/`` and returns ``(callable or None, reason)``. A reason is one line that says what to do.

The original's host entry (``ms_deform_attn.h``) raises "Not implemented on the CPU" for a CPU tensor: its
``cpu/ms_deform_attn_cpu.cpp`` is a stub that is never called. Its CUDA dispatch is
``AT_DISPATCH_FLOATING_TYPES_AND2(Half, BFloat16, ...)`` in the transformers copy (fp64, fp32, fp16, bf16).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("DEFORMABLE_DETR_PEERS", ROOT / ".peers"))
TRANSFORMERS_PIN = "transformers==4.46.3"
DCNV4_PIN = "dcnv4==1.0.0.post2"
LSAP_PINS = ("lap", "lapjv")
_KERNEL_DIR = "transformers/kernels/deformable_detr/"
_SOURCES_CPU = ("vision.cpp",)
_SOURCES_CUDA = ("vision.cpp", "cuda/ms_deform_attn_cuda.cu")

# APIs removed from torch since the original was written, and their replacements. Applied to the unpacked copy only.
SUBSTITUTIONS: tuple[tuple[str, str], ...] = (
    (r"\.type\(\)\.is_cuda\(\)", ".is_cuda()"),
    (r"\.type\(\)(?=\s*,)", ".scalar_type()"),  # AT_DISPATCH_...(value.type(), "name", ...)
    (r"\.data<", ".data_ptr<"),
)


def substitute(text: str) -> tuple[str, int]:
    """``text`` with the removed-API substitutions applied, and how many were made."""
    total = 0
    for pattern, replacement in SUBSTITUTIONS:
        text, count = re.subn(pattern, replacement, text)
        total += count
    return text, total


def _wheel(dist: Path, prefix: str) -> Path | None:
    found = sorted(dist.glob(f"{prefix}-*.whl"))
    return found[-1] if found else None


_SHIM = """# Written by benchmarks/peers.py for `pip download dcnv4` only: its setup.py asks torch for a GPU
# before pip can read its metadata. Nothing is built with this.
import torch.cuda

torch.cuda.is_available = lambda: True
"""


def _metadata_shim(peers: Path) -> Path:
    shim = peers / "shim"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "sitecustomize.py").write_text(_SHIM)
    return shim


def fetch(dist: Path | None = None, python: str = sys.executable) -> list[str]:
    """Download the peers' wheels/sdists into ``dist`` (skipping what is there); the lines to print."""
    dist = dist or PEERS / "dist"
    dist.mkdir(parents=True, exist_ok=True)
    lines = []
    wanted = [(TRANSFORMERS_PIN, "transformers-4.46.3-"), (DCNV4_PIN, "dcnv4-1.0.0.post2")]
    wanted += [(name, f"{name}-") for name in LSAP_PINS]
    for pin, stem in wanted:
        if any(p.name.lower().startswith(stem) for p in dist.iterdir()):
            lines.append(f"{pin}: already in {dist}")
            continue
        # --no-build-isolation: an sdist's metadata step imports torch (dcnv4), which only this python has.
        cmd = [python, "-m", "pip", "download", "--no-deps", "--no-build-isolation", pin, "-d", str(dist)]
        env = dict(os.environ)
        if pin == DCNV4_PIN:  # its setup.py raises "Cuda is not available" even for pip's metadata step
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_metadata_shim(dist.parent)), env.get("PYTHONPATH")]))
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        except OSError as exc:
            done = subprocess.CompletedProcess(cmd, 1, "", f"{python}: {exc.strerror}")
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            lines.append(
                f"{pin}: download failed ({last[:160]}); run `make peers` where the package registry is reachable"
            )
        else:
            lines.append(f"{pin}: downloaded into {dist}")
    return lines


def unpack_original(peers: Path | None = None) -> tuple[Path | None, str]:
    """(source dir, "ok") with the original kernel unpacked and substituted, or (None, reason). Idempotent."""
    peers = peers or PEERS
    wheel = _wheel(peers / "dist", "transformers-4.46.3")
    if wheel is None:
        return None, f"not fetched: run `make peers` (no transformers-4.46.3 wheel in {peers / 'dist'})"
    out = peers / "src" / "original"
    stamp = out / ".unpacked"
    if stamp.exists() and stamp.read_text() == wheel.name:
        return out, "ok"
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.startswith(_KERNEL_DIR) and not n.endswith("/")]
        if not names:
            return None, f"no {_KERNEL_DIR} in {wheel.name}: delete it and run `make peers`"
        for name in names:
            text, _ = substitute(archive.read(name).decode())
            target = out / name[len(_KERNEL_DIR) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    stamp.write_text(wheel.name)
    return out, "ok"


def _load_original(cuda: bool, peers: Path):
    from torch.utils.cpp_extension import load

    src, reason = unpack_original(peers)
    if src is None:
        return None, reason
    name = "peer_original_cuda" if cuda else "peer_original_cpu"
    build = peers / "build" / name
    build.mkdir(parents=True, exist_ok=True)
    sources = [str(src / s) for s in (_SOURCES_CUDA if cuda else _SOURCES_CPU)]
    flags = ["-DWITH_CUDA"] if cuda else []
    includes = [str(src), *(_cuda_wheel_includes() if cuda else [])]
    try:
        module = load(name, sources, extra_cflags=["-O3", *flags], extra_cuda_cflags=["-O3", *flags],
                      extra_include_paths=includes, build_directory=str(build), verbose=False)  # fmt: skip
    except Exception as exc:
        return None, f"build failed ({_first_error(str(exc))}); rerun `python -m benchmarks.peers build` for the log"
    return module, "ok"


def _cuda_wheel_includes() -> list[str]:
    """Include dirs of the CUDA library wheels (nvidia/*/include): torch's ATen/cuda headers include cusparse.h,
    which a toolkit without the math libraries (and pip-installed torch) keeps there."""
    try:
        import nvidia  # type: ignore[import-not-found]
    except ImportError:
        return []
    roots = [Path(p) for p in getattr(nvidia, "__path__", [])]
    return sorted(str(d.parent) for root in roots for d in root.glob("*/include/cusparse.h"))


def _first_error(text: str) -> str:
    """The compiler's first error line from a build exception (its first line is only the command)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line.lower()] or [line for line in lines if "error" in line.lower()]
    return (errors or lines or ["no output"])[0][:200]


_CACHE: dict[tuple[bool, str], tuple[object | None, str]] = {}


def original_module(cuda: bool, peers: Path | None = None):
    """(compiled module or None, reason) for the original op built for CPU only or with its CUDA kernels."""
    peers = peers or PEERS
    key = (cuda, str(peers))
    if key not in _CACHE:
        _CACHE[key] = _load_original(cuda, peers)
    return _CACHE[key]


def im2col_step(batch: int) -> int:
    """The original requires ``batch % im2col_step == 0`` (and im2col_step ≤ 64, its default)."""
    return max(d for d in range(1, min(batch, 64) + 1) if batch % d == 0)


def original_function(module) -> Callable:
    """apply(value, spatial_shapes, level_start_index, locations, weights) -> [N, Q, M*D], differentiable in value,
    locations and weights through the original's own backward."""
    import torch

    class OriginalMSDA(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, spatial_shapes, level_start_index, locations, weights):
            ctx.step = im2col_step(value.shape[0])
            ctx.save_for_backward(value, spatial_shapes, level_start_index, locations, weights)
            return module.ms_deform_attn_forward(value, spatial_shapes, level_start_index, locations, weights, ctx.step)

        @staticmethod
        def backward(ctx, grad_output):
            value, shapes, start, locations, weights = ctx.saved_tensors
            grad_value, grad_locations, grad_weights = module.ms_deform_attn_backward(
                value, shapes, start, locations, weights, grad_output.contiguous(), ctx.step
            )
            return grad_value, None, None, grad_locations, grad_weights

    return OriginalMSDA.apply


def original_status(device: str, peers: Path | None = None) -> tuple[Callable | None, str]:
    """(``original_function`` apply or None, reason) on ``device``.

    On CPU the module builds but its entry raises: the reason is its own message, found by calling it."""
    import torch

    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        return None, "no CUDA device"
    module, reason = original_module(cuda, peers)
    if module is None:
        return None, reason
    if not cuda:
        try:
            module.ms_deform_attn_forward(*_probe_inputs(torch), 64)
        except RuntimeError as exc:
            return None, f"original CPU path raises: {str(exc).strip().splitlines()[0][:120]}"
    return original_function(module), "ok"


def _probe_inputs(torch):
    shapes = torch.tensor([[2, 2]], dtype=torch.int64)
    start = torch.tensor([0], dtype=torch.int64)
    return (torch.zeros(1, 4, 1, 2), shapes, start, torch.zeros(1, 1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1, 1))


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "status"
    if command == "fetch":
        for line in fetch():
            print(line)
        return 0
    if command in ("build", "status"):
        src, reason = unpack_original()
        print(f"original sources: {src if src else reason}")
        for device in ("cpu", "cuda"):
            _, reason = original_status(device)
            print(f"original {device}: {reason}")
        return 0
    print("usage: python -m benchmarks.peers [fetch|build|status]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
