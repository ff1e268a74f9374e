"""Drop-in ``MSDeformAttn``: the original Deformable DETR module (constructor, forward signature, parameter
names and initialisation), running on :func:`deformable_detr.ms_deform_attn`.

Swapping ``from models.ops.modules import MSDeformAttn`` for ``from deformable_detr import MSDeformAttn`` is
the whole migration; official checkpoints load unchanged.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from deformable_detr.ops.levels import LevelTable, lookup
from deformable_detr.ops.ms_deform_attn import ms_deform_attn, ms_deform_attn_with_levels


def _is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class MSDeformAttnFunction:
    """Signature-compatible stand-in for the original ``MSDeformAttnFunction`` (an autograd.Function).

    ``im2col_step`` is accepted and ignored: the kernels handle any batch size in one launch.
    """

    @staticmethod
    def apply(
        value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights, im2col_step=64
    ):
        return ms_deform_attn(
            value, value_spatial_shapes, value_level_start_index, sampling_locations, attention_weights
        )


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module.

    Args:
        d_model: hidden dimension.
        n_levels: number of feature levels.
        n_heads: number of attention heads.
        n_points: sampling points per attention head per feature level.
        backend: kernel backend passed to :func:`ms_deform_attn` (None picks the fastest for the device).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4, *, backend=None):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        if not _is_power_of_2(d_model // n_heads):
            # Kept from the original for familiarity; our kernels handle any head dim, power of 2 is just fastest.
            warnings.warn(
                "You'd better set d_model in MSDeformAttn to make the dimension of each attention head a power of 2 "
                "which is more efficient in our CUDA implementation.",
                stacklevel=2,
            )
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.backend = backend

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Each head starts looking in its own direction; point i of a head sits i+1 steps out along it.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = (grid_init / grid_init.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid_init = grid_init.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid_init[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def _point_locations(self, query, reference_points, spatial_shapes, level_table: LevelTable) -> torch.Tensor:
        """``reference_points[..., l, :] + sampling_offsets(query)[..., l, p, :] / (W_l, H_l)`` as one GEMM.

        The division moves into the (tiny) weight and bias, and the reference point joins the product as extra
        input columns times a 0/1 selection matrix: the two broadcasts over the (N, Q, M, L, P, 2) result (each
        as slow as the GEMM itself on CPU, innermost extent 2) and their backward passes disappear. Equal to
        the direct formula up to float rounding.
        """
        N, Len_q, C = query.shape
        M, L, P = self.n_heads, self.n_levels, self.n_points
        # (W_l, H_l) per level, made once per level table (cached with the table's checks).
        normalizer = level_table.normalizer(spatial_shapes, query.device, query.dtype)
        weight = self.sampling_offsets.weight.view(M, L, P, 2, C) / normalizer[None, :, None, :, None]
        bias = self.sampling_offsets.bias.view(M, L, P, 2) / normalizer[None, :, None, :]
        select = torch.eye(L * 2, dtype=query.dtype, device=query.device).view(1, L, 1, 2, L * 2)
        weight = torch.cat([weight, select.expand(M, L, P, 2, L * 2)], -1).view(M * L * P * 2, C + L * 2)
        points = reference_points.to(query.dtype).expand(N, Len_q, L, 2).reshape(N, Len_q, L * 2)
        locations = F.linear(torch.cat([query, points], -1), weight, bias.view(-1))
        return locations.view(N, Len_q, M, L, P, 2)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: torch.Tensor,
        input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        query (N, Len_q, C); reference_points (N, Len_q, n_levels, 2) in [0, 1] (top-left (0,0)), or
        (N, Len_q, n_levels, 4) boxes (cx, cy, w, h); input_flatten (N, sum H_l*W_l, C);
        input_spatial_shapes (n_levels, 2); input_level_start_index (n_levels,);
        input_padding_mask (N, sum H_l*W_l), True for padding. Returns (N, Len_q, C).
        """
        N, Len_q, _ = query.shape
        N, Len_in, _ = input_flatten.shape
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(
                f"MSDeformAttn: input_spatial_shapes must have shape (n_levels, 2) = ({self.n_levels}, 2) for this "
                f"module (n_levels={self.n_levels}), got {tuple(input_spatial_shapes.shape)}"
            )
        if reference_points.dim() != 4 or reference_points.shape[2] not in (1, self.n_levels):
            raise ValueError(
                f"MSDeformAttn: reference_points must have shape (N, Len_q, n_levels, 2 or 4) with "
                f"n_levels={self.n_levels}, got {tuple(reference_points.shape)}"
            )
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(N, Len_in, self.n_heads, self.d_model // self.n_heads)
        attention_weights = self.attention_weights(query).view(N, Len_q, self.n_heads, self.n_levels * self.n_points)
        attention_weights = F.softmax(attention_weights, -1).view(N, Len_q, self.n_heads, self.n_levels, self.n_points)
        # The one level-table lookup of this call: the normalizer and the op both use it.
        level_table = lookup(input_spatial_shapes, input_level_start_index, Len_in, value.device)
        if reference_points.shape[-1] == 2:
            sampling_locations = self._point_locations(query, reference_points, input_spatial_shapes, level_table)
        elif reference_points.shape[-1] == 4:
            sampling_offsets = self.sampling_offsets(query).view(
                N, Len_q, self.n_heads, self.n_levels, self.n_points, 2
            )
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"Last dim of reference_points must be 2 or 4, but get {reference_points.shape[-1]} instead."
            )
        output = ms_deform_attn_with_levels(
            value,
            input_spatial_shapes,
            input_level_start_index,
            sampling_locations,
            attention_weights,
            level_table,
            backend=self.backend,
        )
        return self.output_proj(output)
