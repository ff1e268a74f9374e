"""The MSDA case table, input maker, float64 oracle and tolerance rule of the CUDA kernel tests: shared by
tests/test_msda_cuda.py (on a GPU) and the SIMT emulator's tests (tests/test_simt_msda.py,
tests/support/simt_msda_check.py), which judge the same kernels the same way.

The oracle is written from the README's operator contract (explicit corners, index arithmetic, not grid_sample;
gradients by autograd through it). Half types follow the flash-attention rule: kernel error vs float64 <= 2 x
(error of the PyTorch reference run in the same dtype) + a small tolerance.
"""

from __future__ import annotations

import torch

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Allowed error on top of the same-dtype-reference rule, relative to the magnitude of the float64 result.
REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (N, Q, M, D, level shapes, P): tests/test_msda_cuda.py's docstring says what each one reaches.
CASES = {
    "d32_1x1_level": (2, 13, 2, 32, [(7, 5), (3, 4), (1, 1)], 4),
    "d1_p1": (1, 9, 3, 1, [(4, 4), (2, 3)], 1),
    "d7_odd": (1, 7, 2, 7, [(5, 6), (3, 3)], 3),
    "d33_odd": (2, 5, 1, 33, [(6, 4), (1, 1)], 2),
    "d64": (1, 6, 2, 64, [(8, 8), (4, 4)], 2),
    "d256_tiles": (1, 4, 1, 256, [(5, 7), (2, 2)], 2),
    "l16": (1, 5, 2, 8, [(2 + l % 3, 1 + l % 4) for l in range(16)], 2),
    # N * Q * M = 16384 heads: large enough that the launcher keeps the widest vectors.
    "wide_vectors": (1, 2048, 8, 64, [(16, 12), (8, 6)], 2),
}


def position_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def level_tensors(shapes, device):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return spatial_shapes.to(device), level_start_index.to(device)


def random_inputs(N, Q, M, D, shapes, P, dtype, device="cuda", seed=0, lo=-0.15, hi=1.15):
    """Inputs drawn in float64 and rounded once to the kernel's dtypes; the oracle sees the rounded values."""
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index = level_tensors(shapes, device)
    S, L = sum(h * w for h, w in shapes), len(shapes)
    value = torch.randn(N, S, M, D, generator=gen, dtype=torch.float64)
    locations = torch.rand(N, Q, M, L, P, 2, generator=gen, dtype=torch.float64) * (hi - lo) + lo
    weights = torch.rand(N, Q, M, L, P, generator=gen, dtype=torch.float64)
    weights = weights / weights.sum((-1, -2), keepdim=True).clamp_min(1e-6)
    pos = position_dtype(dtype)
    return (
        value.to(device=device, dtype=dtype),
        spatial_shapes,
        level_start_index,
        locations.to(device=device, dtype=pos),
        weights.to(device=device, dtype=pos),
    )


def oracle(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """float64 CPU evaluation of the contract: out = sum over levels, points and the four corners of
    weight x bilinear coefficient x value at the corner; corners off the map contribute nothing."""
    # .cpu() / .double() are differentiable: gradients reach the caller's leaves whatever their device.
    value = value.cpu().double()
    locations, weights = sampling_locations.cpu().double(), attention_weights.cpu().double()
    N, S, M, D = value.shape
    Q, P = locations.shape[1], locations.shape[4]
    heads = value.permute(0, 2, 1, 3).reshape(N * M, S, D)
    out = value.new_zeros((N, Q, M, D))
    for level, (H, W) in enumerate(spatial_shapes.cpu().tolist()):
        if H * W == 0:
            continue
        start = int(level_start_index[level])
        x = locations[:, :, :, level, :, 0] * W - 0.5  # (N, Q, M, P), pixel units
        y = locations[:, :, :, level, :, 1] * H - 0.5
        x0, y0 = x.detach().floor(), y.detach().floor()
        fx, fy = x - x0, y - y0
        for dy in (0, 1):
            for dx in (0, 1):
                cx, cy = x0 + dx, y0 + dy
                coeff = (fx if dx else 1 - fx) * (fy if dy else 1 - fy) * weights[:, :, :, level, :]
                on_map = (cx >= 0) & (cx <= W - 1) & (cy >= 0) & (cy <= H - 1)
                index = start + cy.clamp(0, H - 1).long() * W + cx.clamp(0, W - 1).long()
                index = index.permute(0, 2, 1, 3).reshape(N * M, Q * P, 1).expand(-1, -1, D)
                corner = heads.gather(1, index).reshape(N, M, Q, P, D).permute(0, 2, 1, 3, 4)
                out = out + (torch.where(on_map, coeff, 0.0)[..., None] * corner).sum(3)
    return out.reshape(N, Q, M * D)


def forward_backward(fn, inputs, grad_output, as_double=False):
    """(out, grad_value, grad_locations, grad_weights) of fn on leaf copies of inputs, returned in float64 on CPU."""
    value, spatial_shapes, level_start_index, locations, weights = inputs
    if as_double:
        value, locations, weights = value.cpu().double(), locations.cpu().double(), weights.cpu().double()
        grad_output = grad_output.cpu().double()
    # detach() keeps the caller's strides (clone() would make sparse views contiguous).
    leaves = [t.detach().requires_grad_(True) for t in (value, locations, weights)]
    out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    out.backward(grad_output)
    return [t.detach().cpu().double() for t in (out, *(leaf.grad for leaf in leaves))]


def max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def reference_err(ref, want):
    """Error of the same-dtype PyTorch reference, over its finite entries (torch 2.14's CPU grid_sample returns
    NaN for float16 on strided input; a broken reference must not turn the bound into NaN)."""
    diff = (ref - want).abs()
    diff = diff[torch.isfinite(diff)]
    return diff.max().item() if diff.numel() else 0.0


def assert_close_to_oracle(dtype, got, want, ref, names=("out", "grad_value", "grad_locations", "grad_weights")):
    for name, g, w, r in zip(names, got, want, ref):
        assert g.shape == w.shape, f"{name}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        scale = 1.0 + w.abs().max().item() if w.numel() else 1.0
        bound = REL_TOL[dtype] * scale
        if dtype != torch.float64:
            bound += 2.0 * reference_err(r, w)
        err = max_err(g, w)
        assert err <= bound, f"{name} ({dtype}): max error {err:.3e} > {bound:.3e} (scale {scale:.3g})"
