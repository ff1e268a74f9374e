"""Loading of the compiled extension ``deformable_detr._C``.

Importing ``_C`` runs the C++ ``TORCH_LIBRARY`` registrations (``torch.ops.deformable_detr.*``). When the
extension was not built (a source checkout without an in-place build, a metadata-only install, a failed build) or
does not load (built against another torch), everything keeps working through the PyTorch reference and Triton;
one :class:`ExtensionNotLoadedWarning` per process says why and how to build, and :func:`load_error` returns the
same sentence.

A source checkout is what Python imports when it runs from the checkout's root (``python -m deformable_detr``
puts the current folder first on ``sys.path``), even after ``pip install --no-build-isolation .`` installed a
built copy elsewhere: pip builds in the tree, but leaves the compiled ``_C`` in ``build/lib.*/`` and in
site-packages, not in ``deformable_detr/``. So an unbuilt checkout loads such a ``_C`` when one exists that is newer
than every file under ``csrc/`` (built from these sources); otherwise the message names the one command to run
there (``make build``) or to run from outside the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import torch

_LOADED: bool | None = None
_ERROR: str | None = None
_LOADED_FROM: str | None = None
_PACKAGE_DIR = Path(__file__).resolve().parent
BUILD_HINT = (
    "build it with `pip install --no-build-isolation .` (from a source checkout: `make build`, or "
    "`python setup.py build_ext --inplace`)"
)


class ExtensionNotLoadedWarning(UserWarning):
    """The compiled kernels are unavailable; the slower PyTorch reference (or Triton on GPU) is used instead."""


def source_checkout(package_dir: Path = _PACKAGE_DIR) -> Path | None:
    """The checkout's root when ``package_dir`` is the package inside a source checkout (setup.py and csrc/ next to
    it), else None."""
    root = package_dir.parent
    return root if (root / "setup.py").is_file() and (root / "csrc").is_dir() else None


def _built_elsewhere(root: Path) -> list[Path]:
    """Compiled ``_C`` files built from the checkout at ``root``: pip's in-tree ``build/lib.*`` and an installed
    (non-editable) copy's, newest first."""
    found = list(root.glob("build/lib*/deformable_detr/_C*.so")) + list(root.glob("build/lib*/deformable_detr/_C*.pyd"))
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        dist = distribution("deformable-detr")
        for file in dist.files or []:
            if file.name.startswith("_C") and file.suffix in (".so", ".pyd") and file.parent.name == "deformable_detr":
                found.append(Path(dist.locate_file(file)).resolve())
    except (ImportError, PackageNotFoundError):
        pass
    existing = [p for p in dict.fromkeys(found) if p.is_file() and p.parent != _PACKAGE_DIR]
    return sorted(existing, key=lambda p: p.stat().st_mtime, reverse=True)


def _sources_mtime(root: Path) -> float:
    return max((p.stat().st_mtime for p in (root / "csrc").rglob("*") if p.is_file()), default=0.0)


def _load_from(path: Path) -> None:
    spec = importlib.util.spec_from_file_location("deformable_detr._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["deformable_detr._C"] = module


def _diagnose_and_load() -> str | None:
    """Import ``_C``; None on success, else a sentence saying why it is unavailable."""
    global _LOADED_FROM
    spec = importlib.util.find_spec("deformable_detr._C")
    if spec is None:
        # Nothing to import: without this check the import error reads "partially initialized module ... (most
        # likely due to a circular import)", which sends people looking for the wrong problem.
        root = source_checkout()
        if root is None:
            return f"deformable_detr._C is not built (no _C*.so in {_PACKAGE_DIR})"
        newest_source = _sources_mtime(root)
        for candidate in _built_elsewhere(root):
            if candidate.stat().st_mtime < newest_source:
                continue  # built from older sources
            try:
                _load_from(candidate)
            except ImportError:
                continue
            _LOADED_FROM = str(candidate)
            return None
        return (
            f"deformable_detr._C is not built in the source checkout {root}, which Python imports when run from "
            f"there: run `make build` in {root} (or run from outside the checkout to use an installed copy)"
        )
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
            hint = "" if "make build" in _ERROR else f" To use them, {BUILD_HINT}."
            warnings.warn(
                f"{_ERROR}; the compiled CPU/CUDA kernels are unavailable and the slower PyTorch reference (or Triton "
                f"on GPU) is used.{hint}",
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
    if _LOADED_FROM:
        text += f" loaded from {_LOADED_FROM} (this source checkout is not built in place)"
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
