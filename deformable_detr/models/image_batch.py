"""A padded image batch with its padding mask (the originals' ``NestedTensor``, as a small typed class)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ImageBatch:
    """``tensors`` [B, C, H, W]; ``mask`` [B, H, W] bool, True where a pixel is padding.

    ``padded``: False when it is known on the host that no pixel is padding (a batch tensor, or a list of
    same-size images); the model then skips mask arithmetic and reuses position encodings and level tables per
    input size. None (unknown) for masks given by the caller.
    """

    tensors: torch.Tensor
    mask: torch.Tensor
    padded: bool | None = None

    def to(self, device) -> ImageBatch:
        return ImageBatch(self.tensors.to(device), self.mask.to(device), self.padded)

    def mask_at(self, size: Sequence[int]) -> torch.Tensor:
        """The padding mask resized (nearest) to a feature map's ``(h, w)``, as the originals do it."""
        if self.padded is False:
            return self.mask.new_zeros((self.mask.shape[0], *size))
        return F.interpolate(self.mask[None].float(), size=tuple(size)).to(torch.bool)[0]


def to_image_batch(images) -> ImageBatch:
    """Accept a float tensor [B, 3, H, W] (all pixels valid), a list of [3, Hi, Wi] tensors (zero-padded
    bottom/right to the largest size), or an :class:`ImageBatch`."""
    if isinstance(images, ImageBatch):
        return images
    if isinstance(images, (tuple, list)) and len(images) == 2 and isinstance(images[1], torch.Tensor):
        if images[1].dtype == torch.bool and images[0].dim() == 4:
            return ImageBatch(images[0], images[1])
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images must be a float tensor [B, C, H, W], got {tuple(images.shape)} {images.dtype}")
        b, _, h, w = images.shape
        return ImageBatch(images, torch.zeros((b, h, w), dtype=torch.bool, device=images.device), padded=False)
    if isinstance(images, (tuple, list)):
        if len(images) == 0:
            raise ValueError("images is an empty list")
        for i, img in enumerate(images):
            if not isinstance(img, torch.Tensor) or img.dim() != 3 or not img.is_floating_point():
                raise ValueError(
                    f"images[{i}] must be a float tensor [C, H, W], got {getattr(img, 'shape', type(img))}"
                )
        channels = {img.shape[0] for img in images}
        if len(channels) != 1:
            raise ValueError(f"images must all have the same number of channels, got {sorted(channels)}")
        h = max(img.shape[1] for img in images)
        w = max(img.shape[2] for img in images)
        first = images[0]
        tensors = first.new_zeros((len(images), first.shape[0], h, w))
        mask = torch.ones((len(images), h, w), dtype=torch.bool, device=first.device)
        for img, pad_img, m in zip(images, tensors, mask):
            pad_img[:, : img.shape[1], : img.shape[2]].copy_(img)
            m[: img.shape[1], : img.shape[2]] = False
        padded = any(img.shape[1] != h or img.shape[2] != w for img in images)
        return ImageBatch(tensors, mask, padded=padded)
    raise TypeError(f"images must be a Tensor, a list of Tensors or an ImageBatch, got {type(images).__name__}")
