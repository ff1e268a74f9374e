"""The ``neon-trees`` dataset: real aerial RGB images with tree-crown boxes, from the ``deepforest`` wheel.

``deepforest`` 2.1.0 (MIT licence) ships four NEON airborne orthophoto crops with Pascal VOC annotations under
``deepforest/data/``. Importing ``deepforest`` pulls heavy dependencies, so it is never imported: the installed
package folder is located with ``importlib.util.find_spec`` (which does not run the package) and only its PNG and
XML files are read. Install it with ``pip install --no-deps deepforest==2.1.0``.

The files become an ordinary COCO-format folder in the data cache (``neon-trees-<hash>/``, one class ``tree``):

- ``train2017``: overlapping tiles (``tile_size`` squares, ``overlap`` pixels shared by neighbours) of the training
  images. An overlap at least as large as the largest crown means every crown lies whole inside some tile.
- ``val2017``: a non-overlapping grid of full tiles of the held-out image (same size as the training tiles, so the
  model sees the same scale); the strips left between grid tiles are simply not evaluated.
- ``dense2017``: held-out images whole (hundreds of crowns each), for models with many queries.

Clip rule (every tiled split): a crown is cut to the tile; it is kept when at least ``min_visible`` (default 50 %)
of its area lies inside the tile. A smaller fragment is written with ``iscrowd=1``: training drops it (as DETR
drops crowd boxes) and COCO evaluation ignores detections on it, so a half-seen crown at a tile edge is neither a
target nor a false positive.

Which pixels are held out (``DEFAULT_PLAN``): the whole ``2019_YELL_2_541000_4977000_image_crop`` (1249×1035, 279
crowns) is val (its centred 1000×1000 tile) and dense (all of it); training uses the 9 overlapping 1000-pixel tiles
of ``2019_YELL_2_528000_4978000_image_crop2`` (2299×2472, 574 crowns). A whole-image hold-out, rather than a region
of each image, is what makes ``dense`` possible at all (a dense image must be seen whole, so it cannot share pixels
with training), and no tile near a split border can leak context.

Why 1000-pixel tiles: DETR-family heads predict box sizes relative to the image, so a model trained on small
tiles learns crown sizes for small images (in a short trial, 4 epochs on 400-pixel tiles scored AP50 0.015 on the
held-out tiles but 0.0001 on the whole held-out image). Training tiles as large as the dense image keep crowns at
the same relative size in both, and each tile holds 100+ crowns, the regime where the number of queries matters.
``OSBS_029`` and ``SOAP_061`` (400×400, other sites, 98 crowns) are not used: at a 1000-pixel tile size they would
be seen at a different relative scale.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

NEON_TREES = "neon-trees"
PACKAGE = "deepforest"
PACKAGE_VERSION = "2.1.0"
INSTALL_HINT = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "dense")
CATEGORY = {"id": 1, "name": "tree", "supercategory": "plant"}

# (source image stem, split, region (x0, y0, x1, y1) in pixels or None for the whole image).
DEFAULT_PLAN = (
    ("2019_YELL_2_528000_4978000_image_crop2", "train", None),
    ("2019_YELL_2_541000_4977000_image_crop", "val", None),
    ("2019_YELL_2_541000_4977000_image_crop", "dense", None),
)


class MissingPackageError(FileNotFoundError):
    """The optional data package is not installed (a FileNotFoundError: the CLI prints it as one line)."""


@dataclass(frozen=True)
class NeonTreesSpec:
    """How to cut the images. The cache folder is named after a hash of this (and the package version)."""

    tile_size: int = 1000
    overlap: int = 120
    min_visible: float = 0.5
    plan: tuple = DEFAULT_PLAN

    def validate(self) -> None:
        if self.tile_size < 1 or not 0 <= self.overlap < self.tile_size:
            raise ValueError(f"NeonTreesSpec: need tile_size >= 1 and 0 <= overlap < tile_size, got {self}")
        if not 0 < self.min_visible <= 1:
            raise ValueError(f"NeonTreesSpec: min_visible must be in (0, 1], got {self.min_visible}")
        for entry in self.plan:
            if len(entry) != 3 or entry[1] not in SPLITS:
                raise ValueError(f"NeonTreesSpec: plan entries are (stem, split in {SPLITS}, region), got {entry}")

    def digest(self, package_version: str) -> str:
        payload = {"v": FORMAT_VERSION, "package": package_version, **asdict(self)}
        return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def find_data_dir(package: str = PACKAGE) -> Path:
    """``<site-packages>/deepforest/data`` without importing the package; a one-line error naming the pip
    command when it is absent."""
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / "data").is_dir():
            return Path(location) / "data"
    raise MissingPackageError(
        f"data 'neon-trees' reads the images shipped in the {package!r} package, which is not installed: "
        f"run `{INSTALL_HINT}` (it is never imported, so its dependencies are not needed)"
    )


def read_voc(path: str | os.PathLike) -> tuple[int, int, list[tuple[float, float, float, float, str]]]:
    """``(width, height, objects)`` of a Pascal VOC file; each object ``(xmin, ymin, xmax, ymax, name)``.

    Coordinates are taken as continuous pixel coordinates (as DeepForest writes and reads them: ``xmax`` may equal
    the width), clipped to the image; a box with no area after clipping is dropped."""
    root = ET.parse(path).getroot()
    try:
        width = int(root.findtext("size/width"))
        height = int(root.findtext("size/height"))
    except (TypeError, ValueError):
        raise ValueError(f"read_voc: {path} has no valid <size><width>/<height>") from None
    objects = []
    for index, obj in enumerate(root.iter("object")):
        try:
            coords = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError):
            raise ValueError(f"read_voc: {path} object {index} lacks a numeric <bndbox> xmin/ymin/xmax/ymax") from None
        x0, y0 = max(0.0, coords[0]), max(0.0, coords[1])
        x1, y1 = min(float(width), coords[2]), min(float(height), coords[3])
        if x1 > x0 and y1 > y0:
            objects.append((x0, y0, x1, y1, (obj.findtext("name") or "").strip()))
    return width, height, objects


def overlapping_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering ``[0, length)`` with neighbours sharing at least ``overlap`` pixels; the last tile is
    flush with the end. A side shorter than the tile gives one (short) tile."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    origins = list(range(0, length - tile, stride))
    return origins + [length - tile]


def grid_origins(length: int, tile: int) -> list[int]:
    """Starts of the most full tiles that fit in ``[0, length)`` without overlap, spread evenly from end to end."""
    count = length // tile
    if count <= 1:
        return [max(0, (length - tile) // 2)]
    return [round(i * (length - tile) / (count - 1)) for i in range(count)]


def clip_to_tile(boxes, tile, min_visible: float) -> list[tuple[list[float], bool, int]]:
    """Boxes (xyxy) that touch ``tile`` (x0, y0, x1, y1), cut to it and shifted to its origin:
    ``(box, kept, index)`` with ``kept`` = at least ``min_visible`` of the box's area is inside."""
    tx0, ty0, tx1, ty1 = tile
    out = []
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        cx0, cy0, cx1, cy1 = max(x0, tx0), max(y0, ty0), min(x1, tx1), min(y1, ty1)
        if cx1 <= cx0 or cy1 <= cy0:
            continue
        visible = (cx1 - cx0) * (cy1 - cy0) / ((x1 - x0) * (y1 - y0))
        out.append(([cx0 - tx0, cy0 - ty0, cx1 - tx0, cy1 - ty0], visible >= min_visible - 1e-9, index))
    return out


def split_tiles(spec: NeonTreesSpec, split: str, width: int, height: int, region=None) -> list[tuple[int, ...]]:
    """Tiles (x0, y0, x1, y1) of one image region for ``split``: overlapping for train, a grid for val, the whole
    region for dense."""
    rx0, ry0, rx1, ry1 = region if region is not None else (0, 0, width, height)
    if split == "dense":
        return [(rx0, ry0, rx1, ry1)]
    rw, rh = rx1 - rx0, ry1 - ry0
    if split == "train":
        xs, ys = (
            overlapping_origins(rw, spec.tile_size, spec.overlap),
            overlapping_origins(rh, spec.tile_size, spec.overlap),
        )
    else:
        xs, ys = grid_origins(rw, spec.tile_size), grid_origins(rh, spec.tile_size)
    tw, th = min(spec.tile_size, rw), min(spec.tile_size, rh)
    return [(rx0 + x, ry0 + y, rx0 + x + tw, ry0 + y + th) for y in ys for x in xs]


def check_plan_disjoint(spec: NeonTreesSpec, sizes: dict[str, tuple[int, int]]) -> None:
    """Raise if a training region shares a pixel with a val or dense region of the same image."""
    regions: dict[str, list] = {}
    for stem, split, region in spec.plan:
        box = tuple(region) if region is not None else (0, 0, *sizes[stem])
        regions.setdefault(stem, []).append((split, box))
    for stem, entries in regions.items():
        for split_a, a in entries:
            for split_b, b in entries:
                if split_a == "train" and split_b != "train":
                    if min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1]):
                        raise ValueError(f"NeonTreesSpec: {stem}: train region {a} overlaps {split_b} region {b}")


def _image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def _write_split(spec: NeonTreesSpec, source_dir: Path, root: Path, split: str) -> dict:
    image_dir = root / f"{split}2017"
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for stem, entry_split, region in spec.plan:
        if entry_split != split:
            continue
        width, height, objects = read_voc(source_dir / f"{stem}.xml")
        boxes = [obj[:4] for obj in objects]
        with Image.open(source_dir / f"{stem}.png") as im:
            picture = im.convert("RGB")
        if picture.size != (width, height):
            raise ValueError(f"neon-trees: {stem}.png is {picture.size}, its XML says {(width, height)}")
        for tile in split_tiles(spec, split, width, height, region):
            image_id = len(images) + 1
            file_name = f"{stem}_{tile[0]}_{tile[1]}.png"
            picture.crop(tile).save(image_dir / file_name)
            size = {"width": tile[2] - tile[0], "height": tile[3] - tile[1]}
            images.append({"id": image_id, "file_name": file_name, **size, "source": {"image": stem, "tile": tile}})
            for box, kept, _ in clip_to_tile(boxes, tile, spec.min_visible):
                w, h = box[2] - box[0], box[3] - box[1]
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": CATEGORY["id"],
                        "bbox": [box[0], box[1], w, h],
                        "area": w * h,
                        "iscrowd": 0 if kept else 1,
                    }
                )
    coco = {"images": images, "annotations": annotations, "categories": [CATEGORY]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(coco, f)
    return coco


def _package_version() -> str:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def prepare_neon_trees(
    spec: NeonTreesSpec | None = None,
    root: str | os.PathLike | None = None,
    source_dir: str | os.PathLike | None = None,
) -> Path:
    """Write the COCO folder (once; reused when complete) and return its path. ``source_dir`` defaults to the
    installed ``deepforest/data``; ``root`` to ``$DEFORMABLE_DETR_CACHE`` or ``~/.cache/deformable_detr``."""
    from deformable_detr.data.synthetic import default_cache_dir, publish_folder

    spec = spec or NeonTreesSpec()
    spec.validate()
    source = Path(source_dir) if source_dir is not None else find_data_dir()
    version = _package_version() if source_dir is None else f"dir:{source.resolve()}"
    base = Path(root) if root is not None else default_cache_dir()
    target = base / f"neon-trees-{spec.digest(version)}"
    if (target / "COMPLETE").exists():
        return target
    stems = sorted({stem for stem, _, _ in spec.plan})
    missing = [f"{s}.{ext}" for s in stems for ext in ("png", "xml") if not (source / f"{s}.{ext}").is_file()]
    if missing:
        raise FileNotFoundError(f"neon-trees: {source} lacks {missing} (expected {PACKAGE}=={PACKAGE_VERSION})")
    check_plan_disjoint(spec, {stem: _image_size(source / f"{stem}.png") for stem in stems})
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f".neon-trees-{os.getpid()}-{spec.digest(version)}"
    for split in SPLITS:
        _write_split(spec, source, tmp, split)
    record = {"package": PACKAGE, "version": version, **asdict(spec)}
    return publish_folder(tmp, target, record, "prepare_neon_trees")
