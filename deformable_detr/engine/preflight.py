"""Checks run before the first training step, so that a run never dies after hours on something knowable upfront:
a missing package (evaluation needs pycocotools, the loss plot matplotlib) or a missing image file."""

from __future__ import annotations

import importlib

# import name -> pip name, for what train / evaluate need beyond the core dependencies (the ``[train]`` extra).
PIPELINE_PACKAGES = {"pycocotools": "pycocotools", "matplotlib": "matplotlib"}
INSTALL_HINT = "pip install 'deformable-detr[train]'"


class MissingPackageError(ImportError):
    """Raised before any work starts when a package the command needs is not installed."""


def check_packages(command: str, packages: dict[str, str] | None = None) -> None:
    """Raise :class:`MissingPackageError` naming every missing package and the one ``pip install`` line."""
    packages = PIPELINE_PACKAGES if packages is None else packages
    missing = []
    for module, pip_name in packages.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(pip_name)
    if missing:
        raise MissingPackageError(
            f"{command} needs {', '.join(missing)} (not installed): {INSTALL_HINT} (or pip install {' '.join(missing)})"
        )


def check_images(dataset, what: str) -> None:
    """Raise FileNotFoundError when image files of ``dataset`` (a CocoDetection) are missing, naming a few."""
    missing = dataset.missing_images()
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{what}: {len(missing)} of {len(dataset)} image files listed in {dataset.annotation_file} are missing: "
            f"{shown}{more}"
        )
