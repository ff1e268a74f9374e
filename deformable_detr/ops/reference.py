"""Pure-PyTorch multi-scale deformable attention built on ``F.grid_sample`` (bilinear) and ``torch.gather``
(discrete): the benchmark baseline and the fallback that runs everywhere. It computes the operator contract
(README, "Operator contract") in the dtype of ``value``, for both layouts (uniform 6-D and ``points_per_level``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import guard_or_false

SAMPLING_MODES = ("bilinear", "discrete")


def check_sampling(sampling) -> bool:
    """True for ``"discrete"``, False for ``"bilinear"``; a clear error naming ``sampling`` otherwise."""
    if sampling == "bilinear":
        return False
    if sampling == "discrete":
        return True
    if not isinstance(sampling, str):
        raise TypeError(
            f'ms_deform_attn: sampling must be a str, "bilinear" or "discrete", got {type(sampling).__name__}'
        )
    raise ValueError(f'ms_deform_attn: sampling must be "bilinear" or "discrete", got {sampling!r}')


def ms_deform_attn_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    points_per_level=None,
    sampling: str = "bilinear",
) -> torch.Tensor:
    """value (N, S, M, D), sampling_locations (N, Q, M, L, P, 2), attention_weights (N, Q, M, L, P) -> (N, Q, M*D);
    with ``points_per_level`` (L counts, K = sum): sampling_locations (N, Q, M, K, 2), attention_weights (N, Q, M, K).

    ``level_start_index`` is accepted for signature parity; levels are split by ``spatial_shapes``. NaN and
    infinite sampling locations follow the contract's non-finite rule (see ``deformable_detr.ms_deform_attn``).
    """
    discrete = check_sampling(sampling)
    if points_per_level is None:
        L, P = sampling_locations.shape[3], sampling_locations.shape[4]
        counts = (P,) * L
        sampling_locations = sampling_locations.flatten(3, 4)
        attention_weights = attention_weights.flatten(3, 4)
    else:
        from deformable_detr.ops.levels import prepare_points

        counts = prepare_points(points_per_level, spatial_shapes.shape[0], sampling_locations.shape[3]).counts
    return reference_forward(value, spatial_shapes, sampling_locations, attention_weights, counts, discrete)


def reference_forward(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    counts: tuple,
    discrete: bool,
) -> torch.Tensor:
    """The reference on the points layout: sampling_locations (N, Q, M, K, 2), attention_weights (N, Q, M, K),
    ``counts`` the host P_l (level-major points), ``discrete`` the sampling mode."""
    N, S, M, D = value.shape
    Q = sampling_locations.shape[1]
    if N == 0 or Q == 0 or M * D == 0:
        # Keep the (empty) result attached to the inputs so backward still yields zero gradients of their shapes.
        anchor = value.sum() + sampling_locations.sum().to(value.dtype) + attention_weights.sum().to(value.dtype)
        return value.new_zeros((N, Q, M * D)) + anchor * 0
    dtype = value.dtype
    shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
    if torch.compiler.is_compiling():
        # Under torch.compile the sizes are data-dependent symbols: state what the checks outside the graph hold
        # (non-negative sizes adding up to S) so that the split and the per-level reshapes trace, and treat a
        # level as non-empty unless its size is known (guard_or_false): an empty level inside a compiled graph
        # raises grid_sample's "non-empty spatial dimensions" error at run time; eager mode handles it.
        for h, w in shapes:
            torch._check(h >= 0)
            torch._check(w >= 0)
        torch._check(sum(h * w for h, w in shapes) == S)
    value_list = value.split([h * w for h, w in shapes], dim=1)
    # The contract's non-finite rule on top of grid_sample, which returns NaN for an infinite grid, gives a NaN grid
    # a NaN gradient in that coordinate only, and (in its half-precision kernel) scatters a NaN sample's gradient
    # into value[0]. So every non-finite coordinate moves to -1, outside every map; a NaN sample then carries its
    # NaN through its attention weight (out row NaN, weight gradient 0 * NaN). nan_to_num's gradient is
    # grad * isfinite, a product, so the NaN upstream gradient of such a sample (and of a NaN weight at an
    # infinite location) still reaches both coordinates as NaN * 0, as the kernels give. Eager mode applies this
    # only when some location is not finite (one isfinite pass and a sync on the common path: the fix-up itself
    # measured +6 % on the benchmark's forward+backward); compiled graphs always apply it (no data-dependent branch).
    # Discrete sampling has no "outside": +-inf clamps to the border pixel like any far location (+inf -> 2, a
    # location past the far edge), and a NaN sample gathers nothing (masked to 0, so grad_value gets nothing).
    locations = sampling_locations
    nan_samples = None
    if torch.compiler.is_compiling() or not bool(torch.isfinite(sampling_locations).all()):
        far = 2.0 if discrete else -1.0
        locations = torch.nan_to_num(sampling_locations, nan=-1.0, posinf=far, neginf=-1.0)
        nan_samples = sampling_locations.isnan().any(-1)
        nan_factor = torch.where(nan_samples, float("nan"), 1.0).to(attention_weights.dtype)
        attention_weights = attention_weights * nan_factor
    if discrete:
        sampled = _discrete_levels(value_list, shapes, locations, counts, nan_samples)
    else:
        sampled = _bilinear_levels(value_list, shapes, (2 * locations - 1).to(dtype), counts)
    K = sampling_locations.shape[3]
    # (N, Q, M, K) -> (N*M, 1, Q, K)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Q, K).to(dtype)
    out = (torch.cat(sampled, dim=-1) * weights).sum(-1).view(N, M * D, Q).transpose(1, 2)
    if S == 0 or K == 0:
        out = out + value[:, :0].sum()  # nothing sampled: still a (zero) grad_value of value's shape
    if discrete:
        # No gradient reaches a discrete location, but it stays in the graph: a zero gradient of its shape, NaN
        # (0 * NaN) for a NaN location as the NaN rule wants.
        term = locations * 0
        if nan_samples is not None:
            term = term * nan_factor.unsqueeze(-1)
        out = (out.view(N, Q, M, D) + term.sum((-1, -2)).to(dtype).unsqueeze(-1)).view(N, Q, M * D)
    return out.contiguous()


def _level_slices(counts):
    start = 0
    for level, p in enumerate(counts):
        yield level, start, start + p
        start += p


def _bilinear_levels(value_list, shapes, grids, counts):
    """Per level (N*M, D, Q, P_l) samples; ``grids`` (N, Q, M, K, 2) in grid_sample's [-1, 1] convention."""
    N, Q, M = grids.shape[:3]
    D = value_list[0].shape[-1] if value_list else 0
    sampled = []
    for level, start, end in _level_slices(counts):
        h, w = shapes[level]
        # (N, Q, M, P_l, 2) -> (N*M, Q, P_l, 2)
        grid_l = grids[:, :, :, start:end].transpose(1, 2).flatten(0, 1)
        if guard_or_false(h == 0) or guard_or_false(w == 0) or end == start:
            # Nothing to sample, but keep the grid in the graph (x 0): a NaN weight or location of a sample on an
            # empty level still reaches its location gradient as NaN * 0, as in the kernels.
            sampled.append(grids.new_zeros((N * M, D, Q, end - start)) + grid_l.sum(-1).unsqueeze(1) * 0)
            continue
        # (N, H*W, M, D) -> (N*M, D, H, W)
        # .contiguous(): torch 2.14's CPU grid_sample returns NaN for strided float16 input.
        value_l = value_list[level].flatten(2).transpose(1, 2).reshape(N * M, D, h, w).contiguous()
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    return sampled


def _discrete_levels(value_list, shapes, locations, counts, nan_samples):
    """Per level (N*M, D, Q, P_l) nearest-pixel gathers: ix = clamp(floor(x * W + 0.5), 0, W - 1), same for y."""
    N, Q, M = locations.shape[:3]
    value0 = value_list[0]
    D = value0.shape[-1]
    sampled = []
    for level, start, end in _level_slices(counts):
        h, w = shapes[level]
        P = end - start
        if guard_or_false(h == 0) or guard_or_false(w == 0) or P == 0:
            sampled.append(value0.new_zeros((N * M, D, Q, P)))
            continue
        with torch.no_grad():
            loc = locations[:, :, :, start:end].detach()
            # Clamped in floating point before the integer conversion (an infinite float has no integer).
            ix = torch.floor(loc[..., 0] * w + 0.5).clamp(0, w - 1).long()
            iy = torch.floor(loc[..., 1] * h + 0.5).clamp(0, h - 1).long()
            index = (iy * w + ix).transpose(1, 2).reshape(N, M, Q * P, 1).expand(-1, -1, -1, D)
        level_value = value_list[level].transpose(1, 2)  # (N, M, H*W, D)
        gathered = torch.gather(level_value, 2, index).view(N, M, Q, P, D)
        if nan_samples is not None:
            mask = nan_samples[:, :, :, start:end].transpose(1, 2).unsqueeze(-1)
            gathered = torch.where(mask, torch.zeros((), dtype=gathered.dtype), gathered)
        sampled.append(gathered.permute(0, 1, 4, 2, 3).reshape(N * M, D, Q, P))
    return sampled
