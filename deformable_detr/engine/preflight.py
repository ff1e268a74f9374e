"""Checks run before the first training step, so that a run never dies after hours on something knowable upfront:
a missing package (evaluation needs pycocotools, the loss plot matplotlib), an image file that is missing or does
not decode, a backbone weights file that is not one."""

from __future__ import annotations

import importlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# import name -> pip name, for what train / evaluate need beyond the core dependencies (the ``[train]`` extra).
PIPELINE_PACKAGES = {"pycocotools": "pycocotools", "matplotlib": "matplotlib"}
# The package is not on PyPI: the extra is installed from the source checkout.
INSTALL_HINT = 'from the source checkout: pip install --no-build-isolation ".[train]"'


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


def _image_problem(path: Path, size: tuple[int, int] | None) -> str | None:
    """None when ``path`` decodes completely (and has the annotated size), else why not."""
    from PIL import Image

    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.load()  # the whole image: a truncated file fails here, not in the middle of an epoch
            actual = im.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return f"does not decode ({str(err).strip() or type(err).__name__})"
    if size is not None and actual != size:
        return f"is {actual[0]}x{actual[1]}, the annotations say {size[0]}x{size[1]}"
    return None


def check_images(dataset, what: str, skip: bool = False) -> None:
    """Decode every image of ``dataset`` (a CocoDetection) once, so that a missing, truncated or mis-sized file stops
    the run before any training, with a FileNotFoundError / ValueError naming a few. ``skip=True`` instead leaves
    those images out of ``dataset``, one line each on stderr (and a ValueError when none is left)."""
    images = dataset.images
    paths = [dataset.image_dir / im["file_name"] for im in images]
    sizes = [(im["width"], im["height"]) if "width" in im and "height" in im else None for im in images]
    # PIL releases the GIL while decoding, so threads decode in parallel.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(_image_problem, paths, sizes))
    bad = [(index, paths[index], problem) for index, problem in enumerate(problems) if problem is not None]
    if not bad:
        return
    if skip:
        for _, path, problem in bad:
            print(f"{what}: skipped {path}: {problem}", file=sys.stderr)
        dataset.drop_images([index for index, _, _ in bad])
        if len(dataset) == 0:
            raise ValueError(f"{what}: no usable image left in {dataset.annotation_file}")
        return
    missing = [path for _, path, problem in bad if problem == "missing"]
    if missing and len(missing) == len(bad):
        shown = ", ".join(str(p) for p in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise FileNotFoundError(
            f"{what}: {len(missing)} of {len(dataset)} image files listed in {dataset.annotation_file} are missing: "
            f"{shown}{more} (--skip-bad-images leaves them out)"
        )
    shown = "; ".join(f"{path}: {problem}" for _, path, problem in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise ValueError(
        f"{what}: {len(bad)} of {len(dataset)} images of {dataset.annotation_file} are unusable: {shown}{more} "
        "(--skip-bad-images leaves them out)"
    )


def check_backbone_weights(path: str | os.PathLike) -> None:
    """``--backbone-weights`` must be a torchvision ResNet state dict; say in one line what the file is instead."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-weights: {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        text = str(err)
        if "numpy" in text or "Unsupported global" in text or "weights_only" in text.lower():
            found = "a pickle with objects beyond tensors (a training checkpoint of this package?"
            found += " its backbone is inside its 'model' entry, not a torchvision ResNet state dict)"
        else:
            found = (
                f"not a readable torch file ({text.strip().splitlines()[0] if text.strip() else type(err).__name__})"
            )
        raise ValueError(f"--backbone-weights: {path} is {found}; pass a torchvision ResNet state dict") from None
    for key in ("model", "state_dict"):  # wrapped state dicts, as the backbone loader accepts them
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    keys = {k.removeprefix("module.") for k in state} if isinstance(state, dict) else set()
    if "conv1.weight" not in keys:
        detector = any(k.startswith("backbone.") for k in keys)
        found = "a detector's state dict (backbone.* keys)" if detector else f"keys {sorted(keys)[:4]}"
        raise ValueError(
            f"--backbone-weights: {path} is not a torchvision ResNet state dict (no 'conv1.weight'; found {found})"
        )
