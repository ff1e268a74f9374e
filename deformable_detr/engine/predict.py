"""Load a training checkpoint for inference; run it on image files and draw the detections onto PNGs."""

from __future__ import annotations

import colorsys
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision import tv_tensors

from deformable_detr.data import make_transforms
from deformable_detr.engine.checkpoint import load_checkpoint_file
from deformable_detr.engine.config import TrainConfig
from deformable_detr.engine.modeling import build_components, model_config_from_dict
from deformable_detr.models.inference import optimize_for_inference


class Predictor:
    """A trained model, its eval transform and its label names, from a checkpoint written by ``train``."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", compile: bool = False):
        ckpt = load_checkpoint_file(checkpoint)
        self.train_config = TrainConfig.from_dict(ckpt.get("config", {}))
        self.model_name = ckpt.get("model_name", self.train_config.model)
        self.model_config = model_config_from_dict(self.model_name, ckpt["model_config"])
        self.device = torch.device(device)
        self.model, _, self.postprocess = build_components(self.model_config, self.train_config.max_dets)
        self.model.load_state_dict(ckpt["model"])
        self.model.to(self.device).eval()
        # Folded BN + channels_last (outputs equal within fp32 round-off); compile=True adds torch.compile.
        self.model = optimize_for_inference(self.model, compile=compile, fullgraph=False, dynamic=None)
        self.label_to_category = ckpt.get("label_to_category", list(range(self.model_config.num_classes)))
        names = ckpt.get("category_names") or {}
        self.category_names = {int(k): v for k, v in names.items()}
        self.transform = make_transforms(
            False, image_size=self.train_config.image_size, max_size=self.train_config.max_size
        )

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> dict:
        """Detections for one PIL image: ``scores`` [K], ``labels`` [K], ``boxes`` [K, 4] xyxy in its pixels."""
        image = image.convert("RGB")
        empty = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.zeros(0, 4), format="XYXY", canvas_size=(image.height, image.width)
            ),
            "labels": torch.zeros(0, dtype=torch.int64),
        }
        tensor, _ = self.transform(image, empty)
        outputs = self.model([tensor.to(self.device)])
        size = torch.tensor([[image.height, image.width]], device=self.device)
        result = self.postprocess(outputs, size)[0]
        return {k: v.cpu() for k, v in result.items()}

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


def predict(
    checkpoint: str | Path,
    images: list[str | Path],
    output_dir: str | Path,
    threshold: float = 0.5,
    device: str | None = None,
    compile: bool = False,
) -> list[dict]:
    """Write ``output_dir/<image stem>.png`` with drawn detections and ``output_dir/predictions.json`` (boxes in
    the input image's pixels; small images are drawn enlarged, see :func:`draw_detections`)."""
    if not images:
        raise ValueError("predict: no images given")
    missing = [str(p) for p in images if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"predict: image file(s) not found: {missing}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"predict: threshold must be in [0, 1], got {threshold}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    predictor = Predictor(checkpoint, device, compile=compile)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for path in images:
        path = Path(path)
        with Image.open(path) as im:
            image = im.convert("RGB")
        detections = predictor(image)
        out_path = out_dir / f"{path.stem}.png"
        draw_detections(image, detections, predictor.label_name, threshold).save(out_path)
        keep = detections["scores"] >= threshold
        records.append(
            {
                "image": str(path),
                "output": str(out_path),
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
