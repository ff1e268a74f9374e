"""ResNet backbone (torchvision) with frozen batch norm, returning C3-C5 (or C5) with their padding masks.

Batch statistics of detection batches (2 images per GPU) are too noisy to train BatchNorm, so every BN is a
``FrozenBatchNorm2d`` and the stem + layer1 are frozen, as in both originals. Module names reproduce the
originals' (``backbone.0.body.layer1.0.conv1.weight``; ``backbone.1`` is the position encoding) so their
checkpoints load strict.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from deformable_detr.models.image_batch import ImageBatch
from deformable_detr.models.position_encoding import PositionEmbeddingSine

# Output channels of layer2, layer3, layer4.
_CHANNELS = {
    "resnet18": (128, 256, 512),
    "resnet34": (128, 256, 512),
    "resnet50": (512, 1024, 2048),
    "resnet101": (512, 1024, 2048),
}


def load_backbone_weights(body: nn.Module, path: str) -> None:
    """Load a local torchvision ResNet state dict (classifier ``fc.*`` ignored) strictly into ``body``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    try:
        result = body.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"backbone_weights {path!r} does not fit this backbone: {error}") from error
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"backbone_weights {path!r} is not a torchvision ResNet state dict for this backbone: "
            f"missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


class Backbone(nn.Module):
    """torchvision ResNet trunk; ``forward(ImageBatch)`` -> list of (feature map, padding mask), finest first."""

    def __init__(
        self,
        name: str = "resnet50",
        *,
        train_backbone: bool = True,
        return_interm_layers: bool = True,
        dilation: bool = False,
        weights_path: str | None = None,
    ):
        super().__init__()
        if name not in _CHANNELS:
            raise ValueError(f"backbone must be one of {tuple(_CHANNELS)}, got {name!r}")
        if dilation and name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation (DC5) needs a bottleneck ResNet (resnet50/101), got backbone={name!r}")
        resnet = getattr(torchvision.models, name)(
            weights=None, replace_stride_with_dilation=[False, False, dilation], norm_layer=FrozenBatchNorm2d
        )
        for param_name, parameter in resnet.named_parameters():
            if not train_backbone or not any(layer in param_name for layer in ("layer2", "layer3", "layer4")):
                parameter.requires_grad_(False)
        channels = _CHANNELS[name]
        if return_interm_layers:
            return_layers = {"layer2": "0", "layer3": "1", "layer4": "2"}
            self.strides = [8, 16, 32]
            self.num_channels = list(channels)
        else:
            return_layers = {"layer4": "0"}
            self.strides = [32]
            self.num_channels = [channels[-1]]
        if dilation:
            self.strides[-1] //= 2
        self.body = IntermediateLayerGetter(resnet, return_layers=return_layers)
        if weights_path:
            load_backbone_weights(self.body, weights_path)

    # Set by models.inference.use_channels_last: convolutions then run in NHWC (measured faster on CPU; the
    # transformer's flatten(2).transpose(1, 2) of an NHWC map is free).
    channels_last = False

    def forward(self, batch: ImageBatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
        images = batch.tensors
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        features = self.body(images)
        return [(feature, batch.mask_at(feature.shape[-2:])) for feature in features.values()]


class Joiner(nn.Sequential):
    """``[0]`` the backbone, ``[1]`` the position encoding (the originals' layout, kept for key names)."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, batch: ImageBatch):
        features = self[0](batch)
        pos = [self.position(feature, mask, batch.padded) for feature, mask in features]
        return features, pos

    def position(self, feature: torch.Tensor, mask: torch.Tensor, padded: bool | None) -> torch.Tensor:
        """Position encoding of one feature map (reused per input size when no pixel is padding)."""
        encoding = self[1]
        if padded is False and isinstance(encoding, PositionEmbeddingSine):
            return encoding.unpadded(feature).to(feature.dtype)
        return encoding(feature, mask).to(feature.dtype)
