"""DETR's train / eval transforms on torchvision.transforms.v2 (images and boxes move together).

The original recipe at ``image_size=800``: random horizontal flip, then with probability 1/2 either a random
shortest-side resize to one of 480..800 (step 32, longest side ≤ 1333), or a resize to 400/500/600, a random crop
of 384..600 pixels per side and the random resize again; then ImageNet normalisation. Eval resizes the shortest
side to 800. ``aerial`` (nadir imagery, e.g. ``neon-trees``): horizontal and vertical flips and 90-degree
rotations, then the eval resize. Smaller ``image_size`` values scale every number in proportion (the CPU demo uses
128).
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("detr", "flip", "aerial", "none")


class RandomSizeCrop(v2.Transform):
    """Crop a random ``h x w`` window with each side uniform in ``[min_size, min(side, max_size)]`` (DETR's crop)."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        crop_w = int(torch.randint(min(self.min_size, width), min(width, self.max_size) + 1, ()).item())
        crop_h = int(torch.randint(min(self.min_size, height), min(height, self.max_size) + 1, ()).item())
        top = int(torch.randint(0, height - crop_h + 1, ()).item())
        left = int(torch.randint(0, width - crop_w + 1, ()).item())
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt, params):
        return self._call_kernel(F.crop, inpt, **params)


class RandomRot90(v2.Transform):
    """Rotate by ``k`` x 90 degrees counter-clockwise, ``k`` uniform in 0..3 (exact: no interpolation). With the
    flips this gives all eight symmetries of the square, valid for nadir aerial imagery."""

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(0, 4, ()).item())}

    def transform(self, inpt, params):
        k = params["k"]
        if k == 0:
            return inpt
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            boxes = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.XYXY)
            height, width = inpt.canvas_size
            xyxy = boxes.as_subclass(torch.Tensor)
            for _ in range(k):
                # One quarter turn maps a point (x, y) of a W-wide image to (y, W - x); the canvas becomes H x W.
                xyxy = torch.stack([xyxy[:, 1], width - xyxy[:, 2], xyxy[:, 3], width - xyxy[:, 0]], dim=1)
                height, width = width, height
            out = tv_tensors.BoundingBoxes(xyxy, format=tv_tensors.BoundingBoxFormat.XYXY, canvas_size=(height, width))
            return F.convert_bounding_box_format(out, new_format=inpt.format)
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            return tv_tensors.wrap(torch.rot90(inpt.as_subclass(torch.Tensor), k, dims=(-2, -1)), like=inpt)
        return inpt


class NormalizeBoxes(v2.Transform):
    """Last step: boxes become normalized cxcywh relative to the (un-padded) image, as the models expect."""

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.BoundingBoxes):
            return inpt
        height, width = inpt.canvas_size
        # Integer boxes would be halved with integer division in the cxcywh conversion.
        inpt = tv_tensors.wrap(inpt.as_subclass(torch.Tensor).float(), like=inpt)
        boxes = F.convert_bounding_box_format(inpt, new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([width, height, width, height], dtype=boxes.dtype)
        return tv_tensors.wrap(boxes / scale, like=boxes)


def _scaled(values, image_size: int) -> list[int]:
    return sorted({max(8, int(round(v * image_size / 800))) for v in values})


def make_transforms(
    train: bool, image_size: int = 800, max_size: int | None = 1333, augmentation: str = "detr"
) -> v2.Compose:
    """Transforms taking ``(PIL image, {"boxes": BoundingBoxes xyxy, "labels": ...})`` to a normalized tensor
    and a target with normalized cxcywh boxes; boxes cut to nothing by a crop are removed with their labels."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"make_transforms: augmentation must be one of {AUGMENTATIONS}, got {augmentation!r}")
    if image_size <= 0:
        raise ValueError(f"make_transforms: image_size must be positive, got {image_size}")
    max_size = None if max_size is None else max(max_size * image_size // 800, image_size + 1)
    steps: list = [v2.ToImage()]
    if train and augmentation != "none":
        steps.append(v2.RandomHorizontalFlip())
    if train and augmentation == "aerial":
        steps += [v2.RandomVerticalFlip(), RandomRot90()]
    if train and augmentation == "detr":
        scales = _scaled(range(480, 801, 32), image_size)
        crop_min, crop_max = _scaled([384, 600], image_size)
        steps.append(
            v2.RandomChoice(
                [
                    v2.RandomShortestSize(scales, max_size=max_size),
                    v2.Compose(
                        [
                            v2.RandomShortestSize(_scaled([400, 500, 600], image_size)),
                            RandomSizeCrop(crop_min, crop_max),
                            v2.RandomShortestSize(scales, max_size=max_size),
                        ]
                    ),
                ]
            )
        )
    else:
        steps.append(v2.Resize(image_size, max_size=max_size))
    steps += [
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        NormalizeBoxes(),
    ]
    return v2.Compose(steps)
