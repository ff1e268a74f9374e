"""2-D position encodings of feature maps, computed from the padding mask so padding never shifts coordinates.

``PositionEmbeddingSine`` is "Attention is all you need"'s sinusoid over the cumulative count of valid pixels
along y and x. DETR normalises the count by the valid extent; Deformable DETR first subtracts 0.5 so a pixel is
encoded at its centre (``offset=-0.5``). The two variants are kept apart because their checkpoints were
trained with their own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deformable_detr.models.layers import ShapeCache


class PositionEmbeddingSine(nn.Module):
    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: float | None = None,
        offset: float = 0.0,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset
        self._unpadded = ShapeCache()

    def unpadded(self, x: torch.Tensor) -> torch.Tensor:
        """The encoding of a feature map with no padding: a function of its size only, made once per size and
        shared by the batch ([1, ...] expanded to [B, 2*num_pos_feats, H, W])."""
        b, _, h, w = x.shape

        def make():
            return self.forward(x[:1], torch.zeros((1, h, w), dtype=torch.bool, device=x.device))

        return self._unpadded.get((h, w, x.device), make).expand(b, -1, -1, -1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] (for shape/device only); mask [B, H, W] True at padding -> [B, 2*num_pos_feats, H, W]."""
        not_mask = ~mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)
        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Absolute learned row/column embeddings (feature maps up to 50x50, as in the originals)."""

    max_size = 50

    def __init__(self, num_pos_feats: int = 256):
        super().__init__()
        self.row_embed = nn.Embedding(self.max_size, num_pos_feats)
        self.col_embed = nn.Embedding(self.max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"learned position embedding supports feature maps up to {self.max_size}, got {h}x{w}")
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).expand(h, -1, -1), y_emb.unsqueeze(1).expand(-1, w, -1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).expand(x.shape[0], -1, -1, -1)


def build_position_encoding(kind: str, hidden_dim: int, *, deformable: bool, scale: float = 2 * math.pi) -> nn.Module:
    num_pos_feats = hidden_dim // 2
    if kind == "sine":
        if deformable:
            return PositionEmbeddingSine(num_pos_feats, normalize=True, scale=scale, offset=-0.5)
        return PositionEmbeddingSine(num_pos_feats, normalize=True)
    if kind == "learned":
        return PositionEmbeddingLearned(num_pos_feats)
    raise ValueError(f"position_embedding must be 'sine' or 'learned', got {kind!r}")
