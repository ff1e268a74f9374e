"""COCO-format detection dataset (images folder + ``instances_*.json``), for real data and the synthetic set alike.

Each item is ``(image, target)``: ``image`` a normalized float tensor [3, H, W]; ``target`` a dict with
``boxes`` [n, 4] normalized cxcywh (relative to the image's own size, before any batch padding), ``labels`` [n]
int64, ``image_id`` int64, ``orig_size`` and ``size`` [2] int64 ``(h, w)`` before and after the transforms.
Crowd annotations (``iscrowd=1``) and empty boxes are dropped for training, as in DETR.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torchvision import tv_tensors

LABEL_MAPS = ("contiguous", "category_id")


def resolve_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """``(image_dir, annotation_file)`` of a split in the official layout: ``root/annotations/instances_<split>.json``
    with images in ``root/<split>/`` (``split`` like ``train2017``); ``train`` also finds ``train2017``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data: {root} is not a directory (expected a COCO-format folder or 'synthetic')")
    for name in (split, f"{split}2017"):
        ann = root / "annotations" / f"instances_{name}.json"
        if ann.is_file():
            image_dir = root / name
            if not image_dir.is_dir():
                raise FileNotFoundError(f"data: found {ann} but no image folder {image_dir}")
            return image_dir, ann
    raise FileNotFoundError(
        f"data: no annotations for split {split!r} under {root}: expected "
        f"{root / 'annotations' / f'instances_{split}.json'} (or {split}2017)"
    )


_IMAGE_KEYS = ("id", "file_name", "width", "height")
_ANNOTATION_KEYS = ("image_id", "bbox", "category_id")


def read_annotation_file(path: str | Path) -> dict:
    """Parse a COCO instances file; a ValueError naming the file (and the first bad entry) for anything that is not
    one: empty, invalid JSON, no ``images`` list, entries without the keys the loader reads."""
    path = Path(path)
    text = path.read_text()
    if not text.strip():
        raise ValueError(f"annotations: {path} is empty (expected a COCO instances JSON file)")
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"annotations: {path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        found = sorted(coco)[:6] if isinstance(coco, dict) else type(coco).__name__
        raise ValueError(f"annotations: {path} has no 'images' list (found {found}); is it a COCO instances file?")
    for section, keys in (("images", _IMAGE_KEYS), ("annotations", _ANNOTATION_KEYS), ("categories", ("id",))):
        for index, entry in enumerate(coco.get(section, [])):
            lacking = [k for k in keys if not isinstance(entry, dict) or k not in entry]
            if lacking:
                raise ValueError(f"annotations: {path}: {section}[{index}] has no {lacking} (needs {list(keys)})")
    return coco


class CocoDetection(torch.utils.data.Dataset):
    """``label_map="contiguous"`` numbers the categories 0..C-1 in id order (``num_classes = C``);
    ``"category_id"`` uses the raw ids as labels, as the original DETR code does on COCO (``num_classes = 91``) —
    use it with official checkpoints."""

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Callable | None = None,
        label_map: str = "contiguous",
    ):
        if label_map not in LABEL_MAPS:
            raise ValueError(f"CocoDetection: label_map must be one of {LABEL_MAPS}, got {label_map!r}")
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.label_map = label_map
        coco = read_annotation_file(self.annotation_file)
        self.categories = sorted(coco.get("categories", []), key=lambda c: c["id"])
        if not self.categories:
            raise ValueError(f"CocoDetection: {self.annotation_file} has no categories")
        category_ids = [c["id"] for c in self.categories]
        if label_map == "contiguous":
            self.label_to_category = category_ids
        else:
            self.label_to_category = list(range(max(category_ids) + 1))
        self._category_to_label = {cid: i for i, cid in enumerate(self.label_to_category)}
        self.images = sorted(coco["images"], key=lambda im: im["id"])
        self._annotations: dict[int, list[dict]] = {im["id"]: [] for im in self.images}
        for ann in coco.get("annotations", []):
            if ann["image_id"] in self._annotations:
                self._annotations[ann["image_id"]].append(ann)

    def missing_images(self) -> list[Path]:
        """Image files the annotation file lists that do not exist (checked before training starts)."""
        return [
            self.image_dir / im["file_name"] for im in self.images if not (self.image_dir / im["file_name"]).is_file()
        ]

    def drop_images(self, indices) -> None:
        """Leave the images at ``indices`` out (``--skip-bad-images``); evaluation then scores only the others."""
        drop = set(indices)
        self.images = [im for i, im in enumerate(self.images) if i not in drop]

    @property
    def num_classes(self) -> int:
        return len(self.label_to_category)

    @property
    def category_names(self) -> dict[int, str]:
        """label -> category name (for drawing predictions)."""
        names = {c["id"]: c["name"] for c in self.categories}
        return {label: names.get(cid, str(cid)) for label, cid in enumerate(self.label_to_category)}

    def __len__(self) -> int:
        return len(self.images)

    def load_target(self, index: int) -> tuple[list[list[float]], list[int]]:
        info = self.images[index]
        width, height = info["width"], info["height"]
        boxes, labels = [], []
        for ann in self._annotations[info["id"]]:
            if ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(width), x + w), min(float(height), y + h)
            if x1 <= x0 or y1 <= y0:
                continue
            boxes.append([x0, y0, x1, y1])
            labels.append(self._category_to_label[ann["category_id"]])
        return boxes, labels

    def __getitem__(self, index: int):
        info = self.images[index]
        with Image.open(self.image_dir / info["file_name"]) as im:
            image = im.convert("RGB")
        if image.size != (info["width"], info["height"]):
            raise ValueError(
                f"CocoDetection: {info['file_name']} is {image.size[0]}x{image.size[1]}, annotations say "
                f"{info['width']}x{info['height']}"
            )
        boxes, labels = self.load_target(index)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                format=tv_tensors.BoundingBoxFormat.XYXY,
                canvas_size=(image.height, image.width),
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
        }
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        out = {
            "boxes": target["boxes"].as_subclass(torch.Tensor).float(),
            "labels": target["labels"],
            "image_id": torch.tensor(info["id"], dtype=torch.int64),
            "orig_size": torch.tensor([info["height"], info["width"]], dtype=torch.int64),
            "size": torch.tensor(image.shape[-2:], dtype=torch.int64),
        }
        return image, out


def collate(batch):
    """Images stay a list of [3, Hi, Wi] tensors (the models pad and mask them), targets a list of dicts."""
    images, targets = zip(*batch)
    return list(images), list(targets)
