"""Pure-PyTorch multi-scale deformable attention built on ``F.grid_sample``: the benchmark baseline and the
fallback that runs everywhere. It computes the operator contract (README, "Operator contract") in the dtype of ``value``."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """value (N, S, M, D), sampling_locations (N, Q, M, L, P, 2), attention_weights (N, Q, M, L, P) -> (N, Q, M*D).

    ``level_start_index`` is accepted for signature parity; levels are split by ``spatial_shapes``. NaN and
    infinite sampling locations follow the contract's non-finite rule (see ``deformable_detr.ms_deform_attn``).
    """
    N, S, M, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if N == 0 or Q == 0 or M * D == 0:
        # Keep the (empty) result attached to the inputs so backward still yields zero gradients of their shapes.
        anchor = value.sum() + sampling_locations.sum().to(value.dtype) + attention_weights.sum().to(value.dtype)
        return value.new_zeros((N, Q, M * D)) + anchor * 0
    dtype = value.dtype
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # The contract's non-finite rule on top of grid_sample, which returns NaN for an infinite grid, gives a NaN grid
    # a NaN gradient in that coordinate only, and (in its half-precision kernel) scatters a NaN sample's gradient
    # into value[0]. So every non-finite coordinate moves to -1, outside every map; a NaN sample then carries its
    # NaN through its attention weight (out row NaN, weight gradient 0 * NaN). nan_to_num's gradient is
    # grad * isfinite, a product, so the NaN upstream gradient of such a sample (and of a NaN weight at an
    # infinite location) still reaches both coordinates as NaN * 0, as the kernels give. Eager mode applies this
    # only when some location is not finite (one isfinite pass and a sync on the common path: the fix-up itself
    # measured +6 % on the benchmark's forward+backward); compiled graphs always apply it (no data-dependent branch).
    locations = sampling_locations
    if torch.compiler.is_compiling() or not bool(torch.isfinite(sampling_locations).all()):
        locations = torch.nan_to_num(sampling_locations, nan=-1.0, posinf=-1.0, neginf=-1.0)
        nan_factor = torch.where(sampling_locations.isnan().any(-1), float("nan"), 1.0).to(attention_weights.dtype)
        attention_weights = attention_weights * nan_factor
    # grid_sample wants grids in [-1, 1] with align_corners=False: g = 2 * loc - 1.
    grids = (2 * locations - 1).to(dtype)
    sampled = []
    for level, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        # .contiguous(): torch 2.14's CPU grid_sample returns NaN for strided float16 input.
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w).contiguous()
        # (N, Q, M, P, 2) -> (N*M, Q, P, 2)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        if h == 0 or w == 0:
            # Nothing to sample, but keep the grid in the graph (x 0): a NaN weight or location of a sample on an
            # empty level still reaches its location gradient as NaN * 0, as in the kernels.
            sampled.append(value.new_zeros((N * M, D, Q, P)) + grid_l.sum(-1).unsqueeze(1) * 0)
            continue
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # (N, Q, M, L, P) -> (N*M, 1, Q, L*P)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Q, L * P).to(dtype)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(N, M * D, Q)
    return out.transpose(1, 2).contiguous()
