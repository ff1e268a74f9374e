"""The built-in ``synthetic`` detection dataset: solid coloured shapes on a noisy background, in COCO format.

Every image is a pure function of ``(seed, split, index)``, so the dataset is regenerated bit-identically wherever
it is needed and nothing is downloaded. It is written out as an ordinary COCO-format folder
(``annotations/instances_<split>2017.json`` + ``<split>2017/*.png``) so the same loader serves it and real data.

Splits: ``train`` and ``val`` hold a few objects per image (sizes from small to large, some overlapping);
``crowded`` holds a few larger images with more than 100 objects each, for models with ``num_queries > 100``.
``--data synthetic-crowded`` (:func:`crowded_spec`) is the crowd-training variant: its ``train`` split is made of
crowded images too (drawn from their own random stream, so never the held-out ``crowded`` ones), and its held-out
split is the very same ``crowded`` split as ``synthetic``'s.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Each class is a shape with its own base colour; the colour is jittered per object so that shape, not one exact
# RGB value, is what separates the classes.
CATEGORIES = (
    ("square", (220, 60, 60)),
    ("circle", (60, 180, 75)),
    ("triangle", (70, 110, 230)),
    ("diamond", (235, 190, 40)),
)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. The folder name is a hash of this, so changing any field gives a fresh folder."""

    seed: int = 0
    image_size: int = 128
    num_train: int = 1200
    num_val: int = 200
    num_crowded: int = 4
    crowded_image_size: int = 320
    min_objects: int = 1
    max_objects: int = 4
    crowded_min_objects: int = 101
    crowded_max_objects: int = 140
    # Object sides as fractions of the image side (log-uniform in between).
    min_box_fraction: float = 0.12
    max_box_fraction: float = 0.6
    # At most this fraction of the smaller of two objects' boxes may be covered by the other: some occlusion, but
    # no object disappears under a later, larger one.
    max_overlap: float = 0.35
    # The train split holds crowded images (crowded_image_size, crowded object counts) instead of sparse ones.
    crowded_train: bool = False

    def split_sizes(self) -> dict[str, int]:
        return {"train": self.num_train, "val": self.num_val, "crowded": self.num_crowded}

    def digest(self) -> str:
        fields = asdict(self)
        if not self.crowded_train:
            # Absent at its default, so the folders of specs written before the field existed keep their names.
            del fields["crowded_train"]
        payload = json.dumps({"v": FORMAT_VERSION, **fields}, sort_keys=True).encode()
        return hashlib.sha1(payload).hexdigest()[:10]


def _overlap(a, b) -> float:
    """Intersection over the smaller box's area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def _draw_shape(draw: ImageDraw.ImageDraw, category: int, box, colour) -> None:
    x0, y0, x1, y1 = box
    # PIL's shape extents are inclusive; drawing to x1 - 1 makes the filled pixels span exactly [x0, x1).
    xe, ye = x1 - 1, y1 - 1
    name = CATEGORIES[category][0]
    if name == "square":
        draw.rectangle((x0, y0, xe, ye), fill=colour)
    elif name == "circle":
        draw.ellipse((x0, y0, xe, ye), fill=colour)
    elif name == "triangle":
        draw.polygon([((x0 + xe) / 2, y0), (xe, ye), (x0, ye)], fill=colour)
    elif name == "diamond":
        cx, cy = (x0 + xe) / 2, (y0 + ye) / 2
        draw.polygon([(cx, y0), (xe, cy), (cx, ye), (x0, cy)], fill=colour)


def render_image(spec: SyntheticSpec, split: str, index: int) -> tuple[Image.Image, list[dict]]:
    """One image and its annotations (``bbox`` xywh in pixels, ``category_id`` 1-based), deterministic."""
    split_code = {"train": 0, "val": 1, "crowded": 2}[split]
    rng = np.random.default_rng([spec.seed, split_code, index])
    crowded = split == "crowded" or (split == "train" and spec.crowded_train)
    size = spec.crowded_image_size if crowded else spec.image_size
    base = rng.integers(20, 90, size=3)
    noise = rng.normal(0.0, 12.0, size=(size, size, 3))
    background = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(background, mode="RGB")
    draw = ImageDraw.Draw(image)

    if crowded:
        count = int(rng.integers(spec.crowded_min_objects, spec.crowded_max_objects + 1))
        min_box, max_box = 10, 22
    else:
        count = int(rng.integers(spec.min_objects, spec.max_objects + 1))
        min_box = max(4, int(round(spec.min_box_fraction * size)))
        max_box = max(min_box + 1, int(round(spec.max_box_fraction * size)))
    boxes: list[tuple[int, int, int, int]] = []
    annotations = []
    attempts = 0
    while len(boxes) < count and attempts < count * 200:
        attempts += 1
        # Log-uniform sizes give COCO small/medium/large objects in useful proportions.
        w = int(round(np.exp(rng.uniform(np.log(min_box), np.log(max_box)))))
        h = int(np.clip(round(w * np.exp(rng.uniform(-0.35, 0.35))), min_box, max_box))
        x0 = int(rng.integers(0, size - w + 1))
        y0 = int(rng.integers(0, size - h + 1))
        box = (x0, y0, x0 + w, y0 + h)
        if any(_overlap(box, other) > spec.max_overlap for other in boxes):
            continue
        category = int(rng.integers(0, len(CATEGORIES)))
        jitter = rng.integers(-25, 26, size=3)
        colour = tuple(int(c) for c in np.clip(np.array(CATEGORIES[category][1]) + jitter, 0, 255))
        _draw_shape(draw, category, box, colour)
        boxes.append(box)
        annotations.append({"bbox": [x0, y0, w, h], "category_id": category + 1, "area": float(w * h)})
    return image, annotations


def _write_split(spec: SyntheticSpec, root: Path, split: str, count: int) -> None:
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image, objects = render_image(spec, split, index)
        file_name = f"{index:06d}.png"
        image.save(image_dir / file_name)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **obj})
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, (name, _) in enumerate(CATEGORIES)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(coco, f)


SYNTHETIC_CROWDED = "synthetic-crowded"


def crowded_spec() -> SyntheticSpec:
    """``--data synthetic-crowded``: 400 crowded training images (101-140 objects at 320 px, as in the held-out
    split) and the held-out ``crowded`` split of :class:`SyntheticSpec`'s defaults, image for image."""
    return SyntheticSpec(num_train=400, num_val=0, crowded_train=True)


def default_cache_dir() -> Path:
    env = os.environ.get("DEFORMABLE_DETR_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deformable_detr"


def prepare_synthetic(spec: SyntheticSpec | None = None, root: str | os.PathLike | None = None) -> Path:
    """Write the synthetic dataset as a COCO folder (once; reused when complete) and return its path.

    ``root`` defaults to ``$DEFORMABLE_DETR_CACHE`` or ``~/.cache/deformable_detr``; the folder inside it is named
    after the spec's hash. Safe when several processes call it at once: each writes to its own temporary folder and
    the first complete one is renamed into place.
    """
    spec = spec or SyntheticSpec()
    base = Path(root) if root is not None else default_cache_dir()
    target = base / f"synthetic-{spec.digest()}"
    if (target / "COMPLETE").exists():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".synthetic-{spec.digest()}-{os.getpid()}"
    for split, count in spec.split_sizes().items():
        if count > 0:
            _write_split(spec, tmp, split, count)
    return publish_folder(tmp, target, asdict(spec), "prepare_synthetic")


def publish_folder(tmp: Path, target: Path, spec: dict, caller: str) -> Path:
    """Write ``spec.json`` and the ``COMPLETE`` mark into the freshly written ``tmp`` and rename it to ``target``
    (atomic: readers see a complete folder or none)."""
    with open(tmp / "spec.json", "w") as f:
        json.dump(spec, f, indent=1)
    (tmp / "COMPLETE").touch()
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process finished first; its copy is identical (same spec, deterministic), so drop ours.
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "COMPLETE").exists():
        raise RuntimeError(f"{caller}: could not create {target}")
    return target
