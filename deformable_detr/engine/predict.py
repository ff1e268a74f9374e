"""Load a training checkpoint for inference; run it on image files and draw the detections onto PNGs."""

from __future__ import annotations

import colorsys
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torchvision import tv_tensors

from deformable_detr.data import make_transforms
from deformable_detr.engine.checkpoint import load_checkpoint_file, load_model_weights
from deformable_detr.engine.config import TrainConfig
from deformable_detr.engine.modeling import build_components, describe_backend, model_config_from_dict
from deformable_detr.engine.safety import OutputExistsError, unique_stems
from deformable_detr.models.inference import optimize_for_inference

# predict's score threshold when the checkpoint carries none (one trained before thresholds were stored, or never
# evaluated); checkpoints written by train hold the F1-optimal threshold of their last evaluation.
DEFAULT_THRESHOLD = 0.5


class Predictor:
    """A trained model, its eval transform and its label names, from a checkpoint written by ``train``.

    ``predictor(image)`` takes one PIL image and returns one dict; ``predictor([im1, im2, ...])`` runs them as one
    batch and returns a list. ``score_threshold`` is the checkpoint's F1-optimal threshold on its validation split
    (``DEFAULT_THRESHOLD`` when it has none); the returned detections are not filtered by it.
    """

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", compile: bool = False):
        ckpt = load_checkpoint_file(checkpoint, purpose="predict")
        self.train_config = TrainConfig.from_dict(ckpt.get("config", {}))
        self.model_name = ckpt.get("model_name", self.train_config.model)
        self.model_config = model_config_from_dict(self.model_name, ckpt["model_config"])
        self.device = torch.device(device)
        self.model, _, self.postprocess = build_components(self.model_config, self.train_config.max_dets)
        load_model_weights(self.model, ckpt)
        self.model.to(self.device).eval()
        # Folded BN + channels_last (outputs equal within fp32 round-off); compile=True adds torch.compile.
        self.model = optimize_for_inference(self.model, compile=compile, fullgraph=False, dynamic=None)
        self.label_to_category = ckpt.get("label_to_category", list(range(self.model_config.num_classes)))
        names = ckpt.get("category_names") or {}
        self.category_names = {int(k): v for k, v in names.items()}
        self.score_threshold = float(ckpt.get("score_threshold", DEFAULT_THRESHOLD))
        self.transform = make_transforms(
            False, image_size=self.train_config.image_size, max_size=self.train_config.max_size
        )

    def _prepare(self, image: Image.Image) -> torch.Tensor:
        empty = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.zeros(0, 4), format="XYXY", canvas_size=(image.height, image.width)
            ),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
        tensor, _ = self.transform(image.convert("RGB"), empty)
        return tensor.to(self.device)

    @torch.no_grad()
    def __call__(self, images: Image.Image | Sequence[Image.Image]) -> dict | list[dict]:
        """Detections per PIL image: ``scores`` [K], ``labels`` [K], ``boxes`` [K, 4] xyxy in that image's pixels.
        One image -> one dict; a list (a batch, any sizes) -> a list of dicts."""
        single = isinstance(images, Image.Image)
        batch = [images] if single else list(images)
        if not batch:
            return []
        outputs = self.model([self._prepare(im) for im in batch])
        sizes = torch.tensor([[im.height, im.width] for im in batch], device=self.device)
        results = [{k: v.cpu() for k, v in r.items()} for r in self.postprocess(outputs, sizes)]
        return results[0] if single else results

    def label_name(self, label: int) -> str:
        return self.category_names.get(label, str(label))


def _colour(label: int) -> tuple[int, int, int]:
    # Golden-ratio hue steps keep neighbouring labels visually distinct.
    r, g, b = colorsys.hsv_to_rgb((label * 0.618034) % 1.0, 0.85, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_detections(image: Image.Image, detections: dict, names, threshold: float, min_side: int = 480) -> Image.Image:
    """Boxes with ``score >= threshold`` drawn with a ``name score`` tag on a copy of ``image``. Images whose
    shorter side is below ``min_side`` are enlarged first (nearest neighbour), so that the tags stay legible
    instead of covering a small image."""
    scale = max(1.0, min_side / max(1, min(image.size)))
    canvas = image.convert("RGB")
    if scale > 1.0:
        canvas = canvas.resize((round(image.width * scale), round(image.height * scale)), Image.NEAREST)
    else:
        canvas = canvas.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    width = max(1, round(min(canvas.size) / 200))
    keep = detections["scores"] >= threshold
    for box, score, label in zip(detections["boxes"][keep], detections["scores"][keep], detections["labels"][keep]):
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        colour = _colour(int(label))
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = f"{names(int(label))} {float(score):.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tag_y = y0 - (bottom - top) - 2 if y0 - (bottom - top) - 2 >= 0 else y0
        x0 = max(0.0, min(x0, canvas.width - (right - left) - 2))
        draw.rectangle((x0, tag_y, x0 + right - left + 2, tag_y + bottom - top + 2), fill=colour)
        draw.text((x0 + 1, tag_y - top + 1), text, fill=(0, 0, 0), font=font)
    return canvas


def _open_image(path: Path) -> Image.Image:
    """The RGB image at ``path``, or a ValueError saying in one line why it is not one."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; pass image files (e.g. {path}/*.png)")
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL: unknown format, truncated data
        reason = "not an image PIL can read" if isinstance(err, UnidentifiedImageError) else str(err)
        raise ValueError(f"{path} is not a readable image ({reason})") from None


def predict(
    checkpoint: str | Path,
    images: list[str | Path],
    output_dir: str | Path,
    threshold: float | None = None,
    device: str | None = None,
    on_skip: Callable[[str], None] | None = None,
    verbose: bool = False,
    compile: bool = False,
    overwrite: bool = False,
) -> list[dict]:
    """Write ``output_dir/<image stem>.png`` with drawn detections and ``output_dir/predictions.json`` (boxes in
    the input image's pixels; small images are drawn enlarged, see :func:`draw_detections`). Images whose stems
    collide (``a/0.png``, ``b/0.png``) get their folder names in front (``a_0.png``, ``b_0.png``). Files already in
    ``output_dir`` are never replaced unless ``overwrite``: that is checked before the model is loaded.

    ``threshold`` None -> the checkpoint's F1-optimal threshold (see :class:`Predictor`). A file that is not a
    readable image is skipped: ``on_skip`` (default: print to stderr) gets one line naming it; a ValueError only
    when no image could be read. ``verbose`` prints which attention backend runs."""
    if not images:
        raise ValueError("predict: no images given")
    if threshold is not None and not 0.0 <= threshold <= 1.0:
        raise ValueError(f"predict: threshold must be in [0, 1], got {threshold}")
    on_skip = on_skip or (lambda message: print(message, file=sys.stderr))
    out_dir = Path(output_dir)
    # Unreadable files are found first (a cheap decode each), so that no output is claimed for them and the
    # existing-output check below names only files this call would write.
    readable = []
    for path in map(Path, images):
        try:
            _open_image(path)
        except ValueError as err:
            on_skip(f"predict: skipped {err}")
            continue
        readable.append(path)
    if not readable:
        raise ValueError(f"predict: none of the {len(images)} file(s) is a readable image")
    out_paths = [out_dir / f"{stem}.png" for stem in unique_stems(readable)]
    if not overwrite:
        existing = [p for p in [*out_paths, out_dir / "predictions.json"] if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise OutputExistsError(
                f"predict: {existing[0]} already exists{more}; pass --overwrite to replace, or choose another --output"
            )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(checkpoint, device, compile=compile)
    if verbose:
        print(describe_backend(predictor.model_config, predictor.device), flush=True)
    threshold = predictor.score_threshold if threshold is None else threshold
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path, out_path in zip(readable, out_paths):
        image = _open_image(path)
        detections = predictor(image)
        draw_detections(image, detections, predictor.label_name, threshold).save(out_path)
        keep = detections["scores"] >= threshold
        records.append(
            {
                "image": str(path),
                "output": str(out_path),
                "threshold": threshold,
                "detections": [
                    {
                        "label": predictor.label_name(int(label)),
                        "category_id": int(predictor.label_to_category[int(label)]),
                        "score": round(float(score), 4),
                        "box_xyxy": [round(float(v), 2) for v in box],
                    }
                    for box, score, label in zip(
                        detections["boxes"][keep], detections["scores"][keep], detections["labels"][keep]
                    )
                ],
            }
        )
    (out_dir / "predictions.json").write_text(json.dumps(records, indent=1) + "\n")
    return records
