"""Float64 oracle of the MSDA contract (README, "Operator contract"), written from the definition: explicit corners and bilinear
weights, gathered with index arithmetic; deliberately not grid_sample. Gradients come from autograd through it
(the floor is locally constant, so d/dx of the fractional part is 1, as in the kernels). Never edit this to match
a kernel."""

from __future__ import annotations

import torch


def ms_deform_attn_oracle(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    *,
    points_per_level=None,
    sampling="bilinear",
):
    """The contract in float64. Without ``points_per_level``: locations (N, Q, M, L, P, 2), weights (N, Q, M, L, P);
    with it: locations (N, Q, M, K, 2), weights (N, Q, M, K), the first P_0 points on level 0, and so on."""
    value = value.double()
    locations = sampling_locations.double()
    weights = attention_weights.double()
    N, S, M, D = value.shape
    Q = locations.shape[1]
    L = spatial_shapes.shape[0]
    if points_per_level is None:
        counts = [locations.shape[4]] * L
        locations, weights = locations.flatten(3, 4), weights.flatten(3, 4)
    else:
        counts = [int(p) for p in points_per_level]
    out = value.new_zeros((N, Q, M, D))
    for level, (H, W) in enumerate(spatial_shapes.tolist()):
        P = counts[level]
        first = sum(counts[:level])  # this level's points: [first, first + P)
        last = first + P
        if H == 0 or W == 0 or N * Q == 0 or P == 0:
            continue
        start = int(level_start_index[level])
        level_value = value[:, start : start + H * W].permute(0, 2, 1, 3)  # (N, M, H*W, D)
        loc_x, loc_y = locations[:, :, :, first:last, 0], locations[:, :, :, first:last, 1]  # (N, Q, M, P)
        a = weights[:, :, :, first:last]
        if sampling == "discrete":
            # Nearest pixel, round half up, clamped to the map; a gather: locations get no gradient.
            xi = torch.clamp(torch.floor(loc_x.detach() * W + 0.5), 0, W - 1).long()
            yi = torch.clamp(torch.floor(loc_y.detach() * H + 0.5), 0, H - 1).long()
            corners = ((yi, xi, a, torch.ones_like(a, dtype=torch.bool)),)
        else:
            x, y = loc_x * W - 0.5, loc_y * H - 0.5
            x0, y0 = torch.floor(x), torch.floor(y)
            fx, fy = x - x0, y - y0
            corners = []
            for dy, dx, bilinear in (
                (0, 0, (1 - fy) * (1 - fx)),
                (0, 1, (1 - fy) * fx),
                (1, 0, fy * (1 - fx)),
                (1, 1, fy * fx),
            ):
                yi, xi = (y0 + dy).long(), (x0 + dx).long()
                inside = (yi >= 0) & (yi < H) & (xi >= 0) & (xi < W)
                corners.append((yi, xi, a * bilinear, inside))
        for yi, xi, coeff, inside in corners:
            index = (yi.clamp(0, H - 1) * W + xi.clamp(0, W - 1)).permute(0, 2, 1, 3).reshape(N, M, Q * P)
            corner = torch.gather(level_value, 2, index[..., None].expand(-1, -1, -1, D))
            corner = corner.reshape(N, M, Q, P, D).permute(0, 2, 1, 3, 4)  # (N, Q, M, P, D)
            coeff = torch.where(inside, coeff, torch.zeros_like(coeff))
            out = out + (coeff[..., None] * corner).sum(3)
    if sampling == "discrete":
        # Zero location gradients of the locations' shape (nan_to_num: an infinite location clamps, adds no NaN).
        out = out + (locations.nan_to_num(0.0, 0.0, 0.0) * 0).sum((-1, -2))[..., None]
    return out.reshape(N, Q, M * D)


def make_level_tensors(shapes, device="cpu"):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64, device=device).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def make_inputs(N, shapes, M, D, Q, P, dtype=torch.float32, device="cpu", spread=(-0.2, 1.2), seed=0):
    """Random inputs; locations uniform in ``spread`` so some fall outside [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = make_level_tensors(shapes, device)
    S = int(spatial_shapes.prod(1).sum())
    L = len(shapes)
    pos_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    value = torch.randn(N, S, M, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    lo, hi = spread
    locations = (torch.rand(N, Q, M, L, P, 2, generator=gen, dtype=torch.float64) * (hi - lo) + lo).to(
        device=device, dtype=pos_dtype
    )
    weights = torch.rand(N, Q, M, L, P, generator=gen, dtype=torch.float64).to(device=device, dtype=pos_dtype)
    return value, spatial_shapes, level_start_index, locations, weights


def make_points_inputs(N, shapes, M, D, Q, counts, dtype=torch.float32, spread=(-0.2, 1.2), seed=0):
    """Random inputs of the points layout: locations (N, Q, M, K, 2), weights (N, Q, M, K), K = sum(counts)."""
    value, spatial_shapes, level_start_index, locations, weights = make_inputs(
        N, shapes, M, D, Q, sum(counts), dtype=dtype, spread=spread, seed=seed
    )
    # Level 0's draw has K points: take it as the K points of every level (any numbers will do).
    return (
        value,
        spatial_shapes,
        level_start_index,
        locations[:, :, :, 0].contiguous(),
        weights[:, :, :, 0].contiguous(),
    )


def rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: a relative error that near-zero entries cannot blow up."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max().clamp_min(1e-12)).item()


def output_and_grads(fn, value, spatial_shapes, level_start_index, locations, weights, grad_out):
    """Output of ``fn`` and its (grad value, grad locations, grad weights) for upstream gradient ``grad_out``."""
    inputs = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]
    out = fn(inputs[0], spatial_shapes, level_start_index, inputs[1], inputs[2])
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [t.grad for t in inputs]


def oracle_output_and_grads(value, spatial_shapes, level_start_index, locations, weights, grad_out, **layout):
    """The oracle's output and gradients, everything in float64 (``layout``: points_per_level / sampling)."""
    return output_and_grads(
        lambda *a: ms_deform_attn_oracle(*a, **layout),
        value.double(),
        spatial_shapes,
        level_start_index,
        locations.double(),
        weights.double(),
        grad_out.double(),
    )
