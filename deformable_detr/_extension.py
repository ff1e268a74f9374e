"""Loading of the compiled extension ``deformable_detr._C``.

Importing ``_C`` runs the C++ ``TORCH_LIBRARY`` registrations (``torch.ops.deformable_detr.*``). When the
extension was not built (a source checkout without an in-place build, a metadata-only install, a failed build) or
does not load (built against another torch), everything keeps working through the PyTorch reference and Triton;
one :class:`ExtensionNotLoadedWarning` per process says why and how to build, and :func:`load_error` returns the
same sentence.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import torch

_LOADED: bool | None = None
_ERROR: str | None = None
_PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` (from a source checkout: `make build`, or "
    "`python setup.py build_ext --inplace`)"
)


class ExtensionNotLoadedWarning(UserWarning):
    """The compiled kernels are unavailable; the slower PyTorch reference (or Triton on GPU) is used instead."""


def _diagnose_and_load() -> str | None:
    """Import ``_C``; None on success, else a sentence saying why it is unavailable."""
    spec = importlib.util.find_spec("deformable_detr._C")
    if spec is None:
        # Nothing to import: without this check the import error reads "partially initialized module ... (most
        # likely due to a circular import)", which sends people looking for the wrong problem.
        return f"deformable_detr._C is not built (no _C*.so in {_PACKAGE_DIR})"
    try:
        from deformable_detr import _C  # noqa: F401
    except ImportError as exc:  # built against another torch, missing libraries, ...
        info = build_info()
        built = f" (built against torch {info['torch_version']})" if info and info.get("torch_version") else ""
        return f"deformable_detr._C at {spec.origin}{built} failed to load with torch {torch.__version__}: {exc}"
    return None


def extension_loaded() -> bool:
    """Import ``deformable_detr._C`` once; True when its ops are registered. The first failure warns once."""
    global _LOADED, _ERROR
    if _LOADED is None:
        _ERROR = _diagnose_and_load()
        _LOADED = _ERROR is None
        if not _LOADED:
            warnings.warn(
                f"{_ERROR}; the compiled CPU/CUDA kernels are unavailable and the slower PyTorch reference (or Triton "
                f"on GPU) is used. To use them, {BUILD_HINT}.",
                ExtensionNotLoadedWarning,
                stacklevel=2,
            )
    return _LOADED


def load_error() -> str | None:
    """Why the compiled extension is unavailable (None when it loaded)."""
    extension_loaded()
    return _ERROR


def build_info() -> dict | None:
    """What ``setup.py`` decided when it built the extension (``cuda``, ``reason``, ``arch_list``,
    ``torch_version``, ...), or None when there is no record (not built by this package's setup.py)."""
    path = _PACKAGE_DIR / "_build_info.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def build_summary() -> str:
    """One line: which kernels the extension has, how it was built, or why it is not loaded."""
    if not extension_loaded():
        return f"compiled extension not loaded: {_ERROR}"
    kernels = [key.lower() for key in ("CPU", "CUDA") if has_kernel("ms_deform_attn", key)]
    text = f"compiled extension with {' + '.join(kernels) or 'no'} kernels"
    info = build_info()
    if info:
        arch = f", arch {info['arch_list']}" if info.get("arch_list") else ""
        text += f" (built against torch {info.get('torch_version')}{arch}: {info.get('reason')})"
    return text


def op_exists(name: str) -> bool:
    """True when ``deformable_detr::<name>`` has a schema (registered by the extension or from Python)."""
    extension_loaded()
    return torch._C._dispatch_has_kernel(f"deformable_detr::{name}") or any(
        op == f"deformable_detr::{name}" for op in torch._C._dispatch_get_all_op_names()
    )


def has_kernel(name: str, dispatch_key: str) -> bool:
    """True when ``deformable_detr::<name>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not extension_loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"deformable_detr::{name}", dispatch_key)
    except RuntimeError:
        return False
