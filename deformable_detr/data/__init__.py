"""Detection data: COCO-format datasets, DETR transforms, the built-in synthetic dataset, collate."""

from __future__ import annotations

from pathlib import Path

from deformable_detr.data.coco import LABEL_MAPS, CocoDetection, collate, resolve_split
from deformable_detr.data.neon_trees import NEON_TREES, prepare_neon_trees
from deformable_detr.data.synthetic import (
    CATEGORIES,
    SYNTHETIC_CROWDED,
    SyntheticSpec,
    crowded_spec,
    prepare_synthetic,
    render_image,
)
from deformable_detr.data.transforms import AUGMENTATIONS, make_transforms


def resolve_data_root(data: str, synthetic_spec: SyntheticSpec | None = None) -> Path:
    """``"synthetic"`` / ``"synthetic-crowded"`` / ``"neon-trees"`` -> the generated COCO folder (created on first
    use); anything else is a COCO folder path."""
    if data == "synthetic":
        return prepare_synthetic(synthetic_spec)
    if data == SYNTHETIC_CROWDED:
        return prepare_synthetic(crowded_spec())
    if data == NEON_TREES:
        return prepare_neon_trees()
    return Path(data)


def build_dataset(
    data: str,
    split: str,
    train: bool,
    image_size: int = 800,
    max_size: int | None = 1333,
    augmentation: str = "detr",
    label_map: str = "contiguous",
    synthetic_spec: SyntheticSpec | None = None,
) -> CocoDetection:
    """A split of ``data`` (``"synthetic"``, ``"neon-trees"`` or a COCO folder) with train or eval transforms."""
    image_dir, ann = resolve_split(resolve_data_root(data, synthetic_spec), split)
    transforms = make_transforms(train, image_size=image_size, max_size=max_size, augmentation=augmentation)
    return CocoDetection(image_dir, ann, transforms=transforms, label_map=label_map)


__all__ = [
    "AUGMENTATIONS",
    "CATEGORIES",
    "LABEL_MAPS",
    "NEON_TREES",
    "SYNTHETIC_CROWDED",
    "CocoDetection",
    "SyntheticSpec",
    "build_dataset",
    "collate",
    "crowded_spec",
    "make_transforms",
    "prepare_neon_trees",
    "prepare_synthetic",
    "render_image",
    "resolve_data_root",
    "resolve_split",
]
