"""The ``neon-trees`` dataset builder: VOC reading, tiling and the clip rule, the train/held-out split, the aerial
augmentations and the missing-package error. Synthetic VOC files are written here; the real files are only
checked when the optional ``deepforest`` wheel is installed (``make setup`` installs it with ``--no-deps``)."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from deformable_detr.data import CocoDetection, make_transforms, resolve_split
from deformable_detr.data import neon_trees as nt
from deformable_detr.data.transforms import RandomRot90


def write_voc(path, width, height, boxes, names=None):
    objects = "".join(
        f"<object><name>{(names or ['Tree'] * len(boxes))[i]}</name><difficult>0</difficult><bndbox>"
        f"<xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for i, b in enumerate(boxes)
    )
    path.write_text(
        f"<annotation><filename>{path.stem}.png</filename><size><width>{width}</width><height>{height}</height>"
        f"<depth>3</depth></size>{objects}</annotation>"
    )


def random_boxes(rng, width, height, count, min_side=6, max_side=30):
    boxes = []
    for _ in range(count):
        w, h = rng.integers(min_side, max_side + 1, size=2)
        x0, y0 = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
        boxes.append((int(x0), int(y0), int(x0 + w), int(y0 + h)))
    return boxes


def test_read_voc_clips_drops_and_keeps_names(tmp_path):
    path = tmp_path / "a.xml"
    write_voc(
        path,
        50,
        40,
        [(1, 2, 11, 12), (45, 30, 60, 45), (20, 20, 20, 30), (-3, 5, 4, 9)],
        ["Tree", "Dead", "x", "Alive"],
    )
    width, height, objects = nt.read_voc(path)
    assert (width, height) == (50, 40)
    # Out-of-image parts are cut off; the zero-width box is dropped.
    assert objects == [(1, 2, 11, 12, "Tree"), (45, 30, 50, 40, "Dead"), (0, 5, 4, 9, "Alive")]


def test_read_voc_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.xml"
    bad.write_text(
        "<annotation><size><width>10</width><height>10</height></size>"
        "<object><bndbox><xmin>1</xmin></bndbox></object></annotation>"
    )
    with pytest.raises(ValueError, match="bad.xml object 0"):
        nt.read_voc(bad)
    nosize = tmp_path / "nosize.xml"
    nosize.write_text("<annotation></annotation>")
    with pytest.raises(ValueError, match="nosize.xml"):
        nt.read_voc(nosize)


@pytest.mark.parametrize(
    "length,tile,overlap", [(1000, 400, 120), (401, 400, 120), (400, 400, 0), (250, 400, 100), (2299, 400, 120)]
)
def test_overlapping_origins_cover_with_overlap(length, tile, overlap):
    origins = nt.overlapping_origins(length, tile, overlap)
    assert origins[0] == 0 and origins == sorted(set(origins))
    assert min(origins[-1] + tile, length) == length
    for a, b in zip(origins, origins[1:]):
        assert a + tile - b >= overlap  # neighbours share at least `overlap` pixels
        assert b - a <= tile - overlap


def test_grid_origins_do_not_overlap():
    for length, tile in [(1249, 400), (1035, 400), (400, 400), (399, 400), (1600, 400)]:
        origins = nt.grid_origins(length, tile)
        assert len(origins) == max(1, length // tile)
        assert all(b - a >= tile for a, b in zip(origins, origins[1:]))
        assert origins[0] >= 0 and origins[-1] + min(tile, length) <= length


def test_clip_rule_keeps_exactly_the_mostly_visible_boxes():
    rng = np.random.default_rng(0)
    boxes = [tuple(float(v) for v in b) for b in random_boxes(rng, 300, 300, 200)]
    tile = (100, 50, 200, 170)
    clipped = nt.clip_to_tile(boxes, tile, 0.5)
    indices = [i for _, _, i in clipped]
    assert len(indices) == len(set(indices))  # no box twice in one tile
    for index, (x0, y0, x1, y1) in enumerate(boxes):
        iw = max(0.0, min(x1, tile[2]) - max(x0, tile[0]))
        ih = max(0.0, min(y1, tile[3]) - max(y0, tile[1]))
        visible = iw * ih / ((x1 - x0) * (y1 - y0))
        found = [c for c in clipped if c[2] == index]
        assert bool(found) == (visible > 0)
        if found:
            box, kept, _ = found[0]
            assert kept == (visible >= 0.5)
            assert box == [
                max(x0, tile[0]) - tile[0],
                max(y0, tile[1]) - tile[1],
                min(x1, tile[2]) - tile[0],
                min(y1, tile[3]) - tile[1],
            ]


@pytest.fixture
def fake_source(tmp_path):
    """Two small 'orthophotos' with VOC files: A is split by region into train (left) and val (right), B is
    the dense image."""
    rng = np.random.default_rng(1)
    source = tmp_path / "data"
    source.mkdir()
    truth = {}
    for stem, (w, h, n) in {"A": (500, 240, 80), "B": (220, 180, 150)}.items():
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(source / f"{stem}.png")
        truth[stem] = random_boxes(rng, w, h, n)
        write_voc(source / f"{stem}.xml", w, h, truth[stem])
    plan = (("A", "train", (0, 0, 300, 240)), ("A", "val", (300, 0, 500, 240)), ("B", "dense", None))
    spec = nt.NeonTreesSpec(tile_size=100, overlap=35, min_visible=0.5, plan=plan)
    return source, spec, truth


def _load(root, split):
    with open(root / "annotations" / f"instances_{split}2017.json") as f:
        return json.load(f)


def test_prepare_tiles_splits_and_clip_rule(tmp_path, fake_source):
    source, spec, truth = fake_source
    root = nt.prepare_neon_trees(spec, root=tmp_path / "cache", source_dir=source)
    assert nt.prepare_neon_trees(spec, root=tmp_path / "cache", source_dir=source) == root  # cached
    train, val, dense = (_load(root, s) for s in ("train", "val", "dense"))

    # No training pixel in a held-out tile: train tiles stay left of x=300, val tiles right of it.
    train_tiles = [im["source"]["tile"] for im in train["images"]]
    val_tiles = [im["source"]["tile"] for im in val["images"]]
    for a in train_tiles:
        assert a[2] <= 300
        for b in val_tiles:
            assert min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
    assert all(b[0] >= 300 for b in val_tiles) and len(val_tiles) == 4  # a 2 x 2 grid of 100-px tiles fits 200x240

    # Each tile holds exactly the crowns the clip rule gives it (none lost, none twice; < 50 % visible -> crowd),
    # and every crown inside the training region is whole in some tile (overlap 35 > largest side 30).
    seen_whole = set()
    for image in train["images"]:
        tile = image["source"]["tile"]
        actual = sorted((tuple(a["bbox"]), a["iscrowd"]) for a in train["annotations"] if a["image_id"] == image["id"])
        expected = []
        for box, kept, index in nt.clip_to_tile(truth["A"], tile, 0.5):
            expected.append(((box[0], box[1], box[2] - box[0], box[3] - box[1]), int(not kept)))
            if [v + o for v, o in zip(box, tile[:2] * 2)] == list(truth["A"][index]):
                seen_whole.add(index)
        assert actual == sorted(expected)
    assert {i for i, b in enumerate(truth["A"]) if b[2] <= 300} <= seen_whole

    # The dense split is image B whole, every crown once, none marked crowd.
    assert [(im["width"], im["height"]) for im in dense["images"]] == [(220, 180)]
    assert sorted(tuple(a["bbox"]) for a in dense["annotations"]) == sorted(
        (x0, y0, x1 - x0, y1 - y0) for x0, y0, x1, y1 in truth["B"]
    )
    assert not any(a["iscrowd"] for a in dense["annotations"])

    # Tiles hold the source pixels, and the standard loader reads the folder (crowd boxes dropped).
    first = train["images"][0]
    x0, y0, x1, y1 = first["source"]["tile"]
    with Image.open(source / "A.png") as im:
        expected = np.asarray(im.convert("RGB"))[y0:y1, x0:x1]
    assert np.array_equal(np.asarray(Image.open(root / "train2017" / first["file_name"])), expected)
    dataset = CocoDetection(*resolve_split(root, "train"), label_map="contiguous")
    assert dataset.num_classes == 1 and dataset.category_names == {0: "tree"}
    boxes, _ = dataset.load_target(0)
    assert len(boxes) == sum(1 for a in train["annotations"] if a["image_id"] == first["id"] and not a["iscrowd"])


def test_plan_that_leaks_training_pixels_is_refused(tmp_path, fake_source):
    source, spec, _ = fake_source
    leaky = nt.NeonTreesSpec(tile_size=100, overlap=35, plan=(("A", "train", None), ("A", "dense", None)))
    with pytest.raises(ValueError, match="overlaps dense"):
        nt.prepare_neon_trees(leaky, root=tmp_path / "cache", source_dir=source)


def test_missing_package_is_one_clear_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(nt.MissingPackageError) as err:
        nt.find_data_dir("no_such_package_for_neon_trees")
    message = str(err.value)
    assert "pip install --no-deps deepforest==2.1.0" in message and "\n" not in message

    # Through the CLI: exit status 2 and the same single line, whether or not deepforest is installed here.
    from deformable_detr import cli

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepforest" else real_find_spec(name, *a)
    )
    monkeypatch.setenv("DEFORMABLE_DETR_CACHE", str(tmp_path))
    code = cli.main(["train", "--data", "neon-trees", "--output-dir", str(tmp_path / "run"), "--epochs", "1"])
    stderr = capsys.readouterr().err.strip()
    assert code == 2
    assert len(stderr.splitlines()) == 1 and "pip install --no-deps deepforest==2.1.0" in stderr


def test_package_is_located_but_never_imported(tmp_path, monkeypatch):
    package = tmp_path / "site" / "deepforest"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('deepforest must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert nt.find_data_dir() == package / "data"


def _painted(image_tensor):
    ys, xs = torch.nonzero(image_tensor[0] > image_tensor[0].mean(), as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_rot90_moves_boxes_with_pixels():
    image = torch.zeros(1, 30, 50)
    image[0, 5:12, 20:41] = 1
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[20.0, 5.0, 41.0, 12.0]]), format="XYXY", canvas_size=(30, 50))
    rot = RandomRot90()
    for k in range(4):
        out_image = rot.transform(tv_tensors.Image(image), {"k": k})
        out_boxes = rot.transform(boxes, {"k": k})
        assert out_boxes.canvas_size == tuple(out_image.shape[-2:])
        assert out_boxes.tolist()[0] == _painted(out_image)
    assert rot.transform(boxes, {"k": 1}).canvas_size == (50, 30)


def test_aerial_augmentation_gives_all_symmetries_and_consistent_boxes():
    canvas = np.zeros((40, 40, 3), dtype=np.uint8)
    canvas[3:10, 22:35] = 255
    picture = Image.fromarray(canvas)
    transform = make_transforms(True, image_size=40, max_size=None, augmentation="aerial")
    positions = set()
    for seed in range(64):
        torch.manual_seed(seed)
        target = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor([[22.0, 3.0, 35.0, 10.0]]), format="XYXY", canvas_size=(40, 40)
            ),
            "labels": torch.tensor([0]),
        }
        tensor, out = transform(picture, target)
        cx, cy, w, h = (out["boxes"][0] * 40).tolist()
        box = [round(cx - w / 2), round(cy - h / 2), round(cx + w / 2), round(cy + h / 2)]
        assert box == _painted(tensor)
        positions.add(tuple(box))
    assert len(positions) == 8  # the eight symmetries of the square, flips and quarter turns combined


@pytest.mark.skipif(importlib.util.find_spec("deepforest") is None, reason="optional deepforest wheel not installed")
def test_real_files_and_default_plan():
    source = nt.find_data_dir()
    counts = {stem: len(nt.read_voc(source / f"{stem}.xml")[2]) for stem, _, _ in nt.DEFAULT_PLAN}
    assert counts == {"2019_YELL_2_528000_4978000_image_crop2": 574, "2019_YELL_2_541000_4977000_image_crop": 279}
    sizes = {stem: nt._image_size(source / f"{stem}.png") for stem in counts}
    assert sizes["2019_YELL_2_541000_4977000_image_crop"] == (1249, 1035)
    nt.check_plan_disjoint(nt.NeonTreesSpec(), sizes)
    # The default overlap exceeds the largest training crown, so each is whole in some tile.
    largest = max(
        max(b[2] - b[0], b[3] - b[1])
        for stem, split, _ in nt.DEFAULT_PLAN
        if split == "train"
        for b in nt.read_voc(source / f"{stem}.xml")[2]
    )
    assert largest <= nt.NeonTreesSpec().overlap


def test_trees_metrics_count_up_to_max_dets(tmp_path):
    from experiments.trees.common import coco_metrics

    boxes = [[0, 0, 10, 10], [20, 20, 10, 10], [40, 0, 10, 10]]
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "width": 60, "height": 40}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": 100, "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
        "categories": [{"id": 1, "name": "tree"}],
    }
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    dets = [{"image_id": 1, "category_id": 1, "bbox": b, "score": 0.9 - 0.1 * i} for i, b in enumerate(boxes)]
    full = coco_metrics(path, dets, [1], 3)
    assert full["AP"] == full["AP50"] == full["AR@3"] == full["R50@3"] == 1.0
    capped = coco_metrics(path, dets, [1], 2)  # the lowest-scoring correct box falls past the cap
    assert capped["R50@2"] == pytest.approx(2 / 3) and capped["AP50"] < 1.0
    assert coco_metrics(path, [], [1], 2)["AP50"] == 0.0


def test_budgeted_training_stops_at_the_cpu_budget():
    from experiments.trees.common import train_budgeted

    def step(_):
        end = time.process_time() + 0.02
        while time.process_time() < end:
            pass

    history = train_budgeted(step, lambda epoch: range(5), lambda: {"val_AP50": 0.5}, 0.25, log=lambda _: None)
    assert [h["steps"] for h in history][:2] == [5, 5] and sum(h["steps"] for h in history) in (13, 14)
    assert history[-1]["train_cpu_s"] >= 0.25 and all(h["val_AP50"] == 0.5 for h in history)
