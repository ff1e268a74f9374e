"""Shared pieces of the tree-crown experiments (``dense``, ``peer``, ``convergence``): the DETR-family preset and
training step every run starts from, max-dets-aware COCO metrics, one prediction interface for DETR-family checkpoints and torchvision detectors, a
training loop with a CPU-time budget and per-epoch held-out evaluation, and the prediction drawing.

Metrics are computed here with pycocotools directly (``params.maxDets = [1, 10, max_dets]``, AP read at the ``max_dets``
setting), so AP and recall at 450 detections are exact whatever the package evaluator does with ``max_dets``.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision import tv_tensors

from benchmarks import report
from deformable_detr.data import make_transforms
from deformable_detr.engine.config import demo_preset, model_config, trees_preset
from deformable_detr.engine.modeling import build_components
from deformable_detr.engine.optim import build_optimizer

TILE_SIZE = 1000  # neon-trees tiles, in source pixels


def environment() -> dict:
    """The header of an experiment's result file (a compact form of ``benchmarks.report.environment``)."""
    return {
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "cpu": report.cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": report.git("rev-parse", "--short", "HEAD") or "unknown",
    }


def preset_for(data: str, model: str):
    base = "detr" if model == "detr" else "deformable_detr"
    if data == "neon-trees":
        cfg = trees_preset(base)
        if model == "deformable_detr_100q":
            cfg.model_overrides["num_queries"] = 100
    else:
        cfg = demo_preset(base)
    if model == "deformable_detr_refine":
        cfg.model_overrides["with_box_refine"] = True
    return cfg


def backbone_checksum(body: torch.nn.Module) -> float:
    return round(float(sum(p.double().sum() for p in body.state_dict().values() if p.is_floating_point())), 6)


def build_detr_family(data: str, model: str, num_classes: int, seed: int):
    cfg = preset_for(data, model)
    torch.manual_seed(seed)
    mcfg = model_config(cfg, num_classes)
    net, criterion, postprocess = build_components(mcfg, 100)
    optimizer = build_optimizer(
        net, cfg.lr, cfg.lr_backbone, cfg.weight_decay, lr_linear_proj_mult=cfg.lr_linear_proj_mult
    )
    weights = criterion.weight_dict

    def step(batch):
        images, targets = batch
        net.train()
        criterion.train()
        losses = criterion(net(images), targets)
        loss = sum(losses[k] * weights[k] for k in losses if k in weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.clip_max_norm)
        optimizer.step()

    def predictor(scale, max_dets):
        return DetrPredictor(net, postprocess, scale, max_dets)

    return cfg, step, predictor, backbone_checksum(net.backbone[0].body)


def coco_metrics(annotation_file, detections: list[dict], image_ids, max_dets: int) -> dict:
    """AP, AP50, AP75 with up to ``max_dets`` detections per image, ``AR@max_dets`` (COCO recall averaged over
    IoU 0.5:0.95) and ``R50@max_dets`` (recall at IoU 0.5). ``detections``: COCO result dicts."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    keys = ("AP", "AP50", "AP75", f"AR@{max_dets}", f"R50@{max_dets}")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotation_file))
    if not detections:
        return {k: 0.0 for k in keys}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()  # sorts params.maxDets, so max_dets is looked up below rather than assumed last
        ev.accumulate()
    column = list(ev.params.maxDets).index(max_dets)
    precision = ev.eval["precision"][:, :, :, 0, column]  # [IoU, recall, class] at area "all", max_dets
    recall = ev.eval["recall"][:, :, 0, column]  # [IoU, class]

    def mean(values):
        values = values[values > -1]
        return float(np.mean(values)) if values.size else -1.0

    values = (mean(precision), mean(precision[0]), mean(precision[5]), mean(recall), mean(recall[0]))
    return {k: round(v, 6) for k, v in zip(keys, values)}


def model_input(image: Image.Image, scale: float) -> torch.Tensor:
    """The eval transform (resize by ``scale``, ImageNet normalisation) of one PIL image."""
    side = max(1, round(min(image.size) * scale))
    empty = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(image.height, image.width))
    transform = make_transforms(False, image_size=side, max_size=None)
    tensor, _ = transform(image, {"boxes": empty, "labels": torch.zeros(0, dtype=torch.int64)})
    return tensor


class DetrPredictor:
    """A DETR / Deformable DETR model on PIL images, at a fixed pixel ``scale`` (model pixels per image pixel)."""

    def __init__(self, model, postprocess, scale: float, max_dets: int):
        self.model, self.postprocess, self.scale = model.eval(), postprocess, scale
        self.postprocess.num_select = max_dets

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> dict:
        tensor = model_input(image, self.scale)
        outputs = self.model([tensor])
        result = self.postprocess(outputs, torch.tensor([[image.height, image.width]]))[0]
        return {k: v.detach().cpu() for k, v in result.items()}


class TorchvisionPredictor:
    """A torchvision detection model (its own resize and normalisation disabled) at a fixed pixel ``scale``."""

    def __init__(self, model, scale: float, max_dets: int):
        self.model, self.scale = model.eval(), scale
        self.model.roi_heads.detections_per_img = max_dets

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> dict:
        tensor = model_input(image, self.scale)
        set_identity_transform(self.model, tensor.shape[-2:])
        result = self.model([tensor])[0]
        factor = torch.tensor([image.width / tensor.shape[-1], image.height / tensor.shape[-2]] * 2)
        # torchvision labels count from 1 (0 is background); the single class becomes label 0.
        return {"boxes": result["boxes"] * factor, "scores": result["scores"], "labels": result["labels"] - 1}


def set_identity_transform(model, size) -> None:
    """Make a torchvision detector's GeneralizedRCNNTransform a no-op: images arrive resized and normalized."""
    model.transform.min_size = (int(min(size)),)
    model.transform.max_size = int(max(size)) + 1
    model.transform.image_mean = [0.0, 0.0, 0.0]
    model.transform.image_std = [1.0, 1.0, 1.0]


def predict_split(predictor, image_dir, annotation_file, label_to_category=(1,)):
    """``(COCO result dicts, image ids, {image_id: detections})`` of ``predictor`` over a COCO split;
    ``label_to_category`` maps the predictor's labels to the file's category ids."""
    coco = json.loads(Path(annotation_file).read_text())
    results, raw = [], {}
    for info in coco["images"]:
        with Image.open(Path(image_dir) / info["file_name"]) as im:
            image = im.convert("RGB")
        pred = predictor(image)
        raw[info["id"]] = pred
        for box, score, label in zip(pred["boxes"].tolist(), pred["scores"].tolist(), pred["labels"].tolist()):
            x0, y0, x1, y1 = box
            bbox = [x0, y0, x1 - x0, y1 - y0]
            results.append(
                {"image_id": info["id"], "category_id": label_to_category[label], "bbox": bbox, "score": score}
            )
    return results, [im["id"] for im in coco["images"]], raw


def detect_split(predictor, image_dir, annotation_file, max_dets: int, label_to_category=(1,)) -> dict:
    """COCO metrics of ``predictor`` on a split, ``max_dets`` detections per image."""
    results, ids, _ = predict_split(predictor, image_dir, annotation_file, label_to_category)
    return coco_metrics(annotation_file, results, ids, max_dets)


def train_budgeted(step, batches, evaluate, cpu_budget_s: float, max_epochs: int = 1000, log=print) -> list[dict]:
    """Run ``step(batch)`` over ``batches(epoch)`` until this process has spent ``cpu_budget_s`` CPU seconds in
    training steps (checked after every step, so the last epoch may be partial); after each epoch record
    ``evaluate()`` with the cumulative training CPU and wall seconds (evaluation time is not counted).

    The budget is process CPU time, not wall time, because the machine is shared: another user's load stretches
    wall time but hardly the CPU seconds a run needs."""
    history, cpu, wall = [], 0.0, 0.0
    for epoch in range(max_epochs):
        cpu0, wall0, steps = time.process_time(), time.perf_counter(), 0
        for batch in batches(epoch):
            step(batch)
            steps += 1
            if cpu + time.process_time() - cpu0 >= cpu_budget_s:
                break
        cpu += time.process_time() - cpu0
        wall += time.perf_counter() - wall0
        eval_wall0 = time.perf_counter()
        metrics = evaluate()
        record = {"epoch": epoch, "steps": steps, "train_cpu_s": round(cpu, 1), "train_wall_s": round(wall, 1)}
        record.update(metrics, eval_wall_s=round(time.perf_counter() - eval_wall0, 1))
        history.append(record)
        log(json.dumps(record))
        if cpu >= cpu_budget_s:
            break
    return history


def draw_predictions(image: Image.Image, detections: dict, threshold: float, title: str, gt_boxes=None) -> Image.Image:
    """Detections with ``score >= threshold`` as yellow boxes with a two-digit score (thin ground-truth boxes in
    cyan underneath when given) and a title bar with the counts."""
    canvas = image.convert("RGB").copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for box in gt_boxes or []:
        draw.rectangle(tuple(box), outline=(0, 230, 255), width=1)
    keep = detections["scores"] >= threshold
    boxes, scores = detections["boxes"][keep].tolist(), detections["scores"][keep].tolist()
    for (x0, y0, x1, y1), score in zip(boxes, scores):
        draw.rectangle((x0, y0, x1, y1), outline=(255, 215, 0), width=2)
        text = f"{score:.2f}"[1:] if score < 1 else "1.0"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx, ty = max(0.0, x0), max(0.0, y0 - (bottom - top) - 2)
        draw.rectangle((tx, ty, tx + right - left + 2, ty + bottom - top + 2), fill=(255, 215, 0))
        draw.text((tx + 1, ty - top + 1), text, fill=(0, 0, 0), font=font)
    bar = Image.new("RGB", (canvas.width, 22), (0, 0, 0))
    ImageDraw.Draw(bar).text(
        (6, 5), f"{title} | {len(boxes)} boxes with score >= {threshold}", fill=(255, 255, 255), font=font
    )
    out = Image.new("RGB", (canvas.width, canvas.height + bar.height))
    out.paste(bar, (0, 0))
    out.paste(canvas, (0, bar.height))
    return out
