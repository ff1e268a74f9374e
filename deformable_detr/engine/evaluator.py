"""COCO box evaluation with pycocotools, gathering predictions from every process."""

from __future__ import annotations

import contextlib
import io

import numpy as np

from deformable_detr.engine.distributed import all_gather_objects


class CocoEvaluator:
    """Collect detections per image (``update``), then ``summarize`` on every rank -> dict of COCO metrics.

    ``label_to_category[label]`` maps the model's labels back to the annotation file's category ids.
    ``max_dets`` is the per-image detection cap (COCO's 100): every AP and the size-wise ARs are computed with at
    most that many detections per image, and the recall key says it (``AR@300``); raise it for crowded images with
    more than 100 objects.
    """

    def __init__(self, annotation_file, label_to_category, max_dets: int = 100):
        self.annotation_file = str(annotation_file)
        self.label_to_category = list(label_to_category)
        self.max_dets = max_dets
        self.results: dict[int, list[dict]] = {}

    def update(self, image_ids, predictions) -> None:
        """``predictions``: per image a dict with ``scores`` [K], ``labels`` [K], ``boxes`` [K, 4] absolute xyxy
        in the original image's pixels (what ``PostProcess`` returns for ``orig_size``)."""
        for image_id, pred in zip(image_ids, predictions):
            boxes = pred["boxes"].detach().float().cpu().numpy()
            scores = pred["scores"].detach().float().cpu().numpy()
            labels = pred["labels"].detach().cpu().numpy()
            dets = []
            for box, score, label in zip(boxes, scores, labels):
                if not 0 <= int(label) < len(self.label_to_category):
                    continue
                x0, y0, x1, y1 = (float(v) for v in box)
                dets.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(self.label_to_category[int(label)]),
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(score),
                    }
                )
            self.results[int(image_id)] = dets

    def summarize(self, verbose: bool = True) -> dict[str, float]:
        """COCO box metrics at ``max_dets`` detections per image (see :func:`metric_names`), plus
        ``score_threshold``: the score above which detections give the best F1 at IoU 0.5 on these images
        (``predict``'s default)."""
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        # A distributed sampler pads with repeated images; keying by image id drops the repeats.
        merged: dict[int, list[dict]] = {}
        for part in all_gather_objects(self.results):
            merged.update(part)
        detections = [d for dets in merged.values() for d in dets]
        names = metric_names(self.max_dets)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(self.annotation_file)
        if not detections:
            return dict.fromkeys(names, 0.0)
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(detections)
        coco_eval = COCOeval(gt, dt, iouType="bbox")
        coco_eval.params.imgIds = sorted(merged)
        # COCOeval's own summary reads AP at maxDets=100 whatever the list holds (AP -1 at 300), so the numbers are
        # read from its accumulated arrays at the configured cap instead.
        coco_eval.params.maxDets = [1, 10, self.max_dets]
        with contextlib.redirect_stdout(io.StringIO()):
            coco_eval.evaluate()
            coco_eval.accumulate()
        stats = _stats(coco_eval)
        if verbose:
            print(format_table(stats, self.max_dets))
        metrics = {name: float(np.round(v, 6)) for name, v in zip(names, stats)}
        threshold = f1_optimal_threshold(coco_eval)
        if threshold is not None:
            metrics["score_threshold"] = round(threshold, 4)
        return metrics


def metric_names(max_dets: int = 100) -> tuple[str, ...]:
    """Keys of the metrics, in COCOeval.stats order; recall keys carry their detection cap (``AR@300``)."""
    return ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", f"AR@{max_dets}", "ARs", "ARm", "ARl")


# (is AP, IoU threshold or None for 0.50:0.95, area label, index into maxDets) per entry of metric_names.
_STAT_SPECS = (
    (True, None, "all", 2),
    (True, 0.5, "all", 2),
    (True, 0.75, "all", 2),
    (True, None, "small", 2),
    (True, None, "medium", 2),
    (True, None, "large", 2),
    (False, None, "all", 0),
    (False, None, "all", 1),
    (False, None, "all", 2),
    (False, None, "small", 2),
    (False, None, "medium", 2),
    (False, None, "large", 2),
)


def _stats(coco_eval) -> list[float]:
    """The twelve COCO numbers from ``coco_eval.eval`` (precision [T,R,K,A,M], recall [T,K,A,M]); -1 where no
    ground truth exists in that setting, as pycocotools reports it."""
    params = coco_eval.params
    out = []
    for is_ap, iou, area, det_index in _STAT_SPECS:
        values = coco_eval.eval["precision" if is_ap else "recall"]
        area_index = params.areaRngLbl.index(area)
        if iou is None:
            values = values[..., area_index, det_index]
        else:
            values = values[np.isclose(params.iouThrs, iou)][..., area_index, det_index]
        valid = values[values > -1]
        out.append(float(valid.mean()) if valid.size else -1.0)
    return out


def format_table(stats: list[float], max_dets: int) -> str:
    """COCOeval's printed summary, with each line's real detection cap."""
    lines = []
    for value, (is_ap, iou, area, det_index) in zip(stats, _STAT_SPECS):
        title, short = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        iou_text = "0.50:0.95" if iou is None else f"{iou:0.2f}     "
        cap = (1, 10, max_dets)[det_index]
        lines.append(
            f" {title:<18} {short} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={cap:>3d} ] = {value:0.3f}"
        )
    return "\n".join(lines)


def f1_optimal_threshold(coco_eval) -> float | None:
    """The detection score that maximises F1 at IoU 0.5 over all classes and images of ``coco_eval`` (after
    ``evaluate()``); None without ground truth or detections. Returned halfway between the last kept score and the
    next lower one, so that float noise in a re-run does not flip the boundary detection."""
    params = coco_eval.params
    iou_index = int(np.argmin(np.abs(np.asarray(params.iouThrs) - 0.5)))
    all_range = params.areaRng[params.areaRngLbl.index("all")]
    scores, hits, num_gt = [], [], 0
    for item in coco_eval.evalImgs:
        if item is None or list(item["aRng"]) != list(all_range) or item["maxDet"] != params.maxDets[-1]:
            continue
        num_gt += int(np.count_nonzero(~np.asarray(item["gtIgnore"], dtype=bool)))
        keep = ~np.asarray(item["dtIgnore"], dtype=bool)[iou_index]
        scores.append(np.asarray(item["dtScores"], dtype=np.float64)[keep])
        hits.append(np.asarray(item["dtMatches"])[iou_index][keep] > 0)
    if num_gt == 0 or not scores or sum(len(s) for s in scores) == 0:
        return None
    scores_all, hits_all = np.concatenate(scores), np.concatenate(hits)
    order = np.argsort(-scores_all, kind="stable")
    scores_all, true_pos = scores_all[order], np.cumsum(hits_all[order])
    precision = true_pos / np.arange(1, len(true_pos) + 1)
    recall = true_pos / num_gt
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    best = int(np.argmax(f1))
    lower = scores_all[best + 1] if best + 1 < len(scores_all) else 0.0
    return float((scores_all[best] + lower) / 2)
