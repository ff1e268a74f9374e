"""The MSDA CUDA kernels (csrc/ms_deform_attn/cuda/) executed on the CPU by the SIMT emulator (tests/simt/): the
quick campaign of `make test`. Every (VEC, group size, tiles) that launch_shape can pick, per dtype, for the
forward, both backward paths and the deterministic path's key / run-flag / gather kernels, against the float64
oracle, under two schedules x two poison bytes (simt_msda_check.py). The long campaign: tests/support/simt_campaign.py
(`make test-emulated`)."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from support.cuda_cases import CASES, forward_backward, max_err, oracle, random_inputs
from support.simt_emulator import load, run
from support.simt_msda_check import check_case, emulate_all, launch_shape_cases, max_vec, offset_view

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
IDS = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
PLACEMENTS = ("aligned", "flush_front", "flush_end")


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_every_launch_shape(dtype):
    """Threshold override 1 keeps the widest aligned vector: D = VEC x k reaches every (VEC, group, tiles), for
    the forward, both backward kernels and the deterministic gather; the vector atomics run as sm_90 and sm_80."""
    load().reset_coverage()
    for i, D in enumerate(launch_shape_cases(dtype)):
        config = dict(placement=PLACEMENTS[i % 2], arch=(900, 800)[i % 2], min_threads=1)
        check_case(1, 5, 2, D, [(3, 4), (1, 1)], 2, dtype, seed=i, **config)
    covered = defaultdict(set)
    for key, _ in load().coverage():
        kernel, _, vec, group, tiles, _ = key.split("|")
        covered[kernel].add((int(vec), int(group), int(tiles)))
    vecs = [max_vec(dtype) >> k for k in range(max_vec(dtype).bit_length())]
    expected = {(v, g, 1) for v in vecs for g in (1, 4, 8, 16, 32)} | {(v, 32, 2) for v in vecs}
    expected.add((max_vec(dtype), 2, 1))
    for kernel in ("forward", "backward_atomics", "backward_no_atomics", "gather_grad_value"):
        assert expected <= covered[kernel], f"{kernel}: missing {sorted(expected - covered[kernel])}"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("case", [c for c in CASES if c != "wide_vectors"])
def test_cuda_test_cases(case, dtype):
    """The CASES of support.cuda_cases (the GPU tests' table) with their tolerance rule and the real launch threshold
    (narrow groups)."""
    N, Q, M, D, shapes, P = CASES[case]
    check_case(N, Q, M, D, shapes, P, dtype, placement=PLACEMENTS[len(case) % 3])


def test_wide_vectors_case():
    N, Q, M, D, shapes, P = CASES["wide_vectors"]
    check_case(1, 64, M, D, shapes, P, torch.float16, min_threads=1)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=IDS.get)
def test_views_offset_and_non_contiguous(dtype):
    """Offset (misaligned) storage narrows the vectors; non-contiguous views are densified by the host flow."""

    def transposed(inputs):
        value, shapes, starts, locations, weights = inputs
        value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)
        weights_nc = weights.transpose(1, 2).contiguous().transpose(1, 2)
        return [value_nc, shapes, starts, locations, weights_nc]

    for view in (offset_view, transposed):
        for placement in PLACEMENTS:
            check_case(2, 6, 2, 16, [(5, 4), (2, 3)], 3, dtype, view=view, placement=placement, min_threads=1)


# (N, Q, M, D, level shapes, points per level): D-FINE's ragged decoder points; a P_l = 0 level, an empty (0 x W)
# level and 1x1 levels.
LAYOUT_CASES = {
    "dfine": (2, 7, 2, 8, [(6, 4), (3, 5), (2, 2)], [3, 6, 3]),
    "zero_points_empty_level": (1, 5, 3, 5, [(4, 4), (0, 3), (2, 3), (1, 1)], [2, 2, 0, 3]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
@pytest.mark.parametrize("case", list(LAYOUT_CASES))
def test_points_per_level_and_discrete(case, sampling, dtype):
    """points_per_level (point_start table) and sampling="discrete" through the forward, both backward paths
    and the deterministic key / gather kernels, at the real threshold and with the widest vectors."""
    N, Q, M, D, shapes, counts = LAYOUT_CASES[case]
    discrete = sampling == "discrete"
    check_case(N, Q, M, D, shapes, None, dtype, counts=counts, discrete=discrete, placement=PLACEMENTS[len(case) % 3])
    check_case(N, Q, M, 16, shapes, None, dtype, seed=1, counts=counts, discrete=discrete, min_threads=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_discrete_uniform_layout(dtype):
    check_case(2, 6, 2, 16, [(5, 4), (2, 3), (1, 1)], 3, dtype, discrete=True, min_threads=1, placement="flush_end")


def test_discrete_ties_borders_and_infinities():
    """Round half up at pixel boundaries (exact in binary for W = H = 4), border clamp, +-inf clamped to the
    border: the gathered pixel equals the oracle's, both backward paths; location gradients exactly 0."""
    shapes, starts = torch.tensor([[4, 4]]), torch.tensor([0])
    value = torch.arange(16, dtype=torch.float64).reshape(1, 16, 1, 1)
    xs = [0.125, 0.375, 0.3749, -3.0, 7.0, float("inf"), float("-inf"), 1.0]
    loc = torch.tensor([[x, 0.625] for x in xs], dtype=torch.float64).reshape(1, len(xs), 1, 1, 2)
    weights = torch.ones(1, len(xs), 1, 1, dtype=torch.float64)
    point_start = torch.tensor([0, 1])
    grad_output = torch.ones(1, len(xs), 1, dtype=torch.float64)
    for out, grad_value, grad_loc, grad_w in emulate_all(
        [value, shapes, starts, loc, weights, point_start, True], grad_output
    ).values():
        assert out.flatten().tolist() == [12 + x for x in (1, 2, 1, 0, 3, 3, 0, 3)]
        assert not grad_loc.any() and grad_w.flatten().tolist() == out.flatten().tolist()
        assert grad_value.flatten().tolist() == [0.0] * 12 + [2.0, 2.0, 1.0, 3.0]


def test_partial_last_block_and_many_blocks():
    """N * Q * M not a multiple of the groups per block, several blocks in random order."""
    check_case(2, 37, 3, 4, [(4, 5), (2, 2)], 2, torch.float32, min_threads=1)
    check_case(1, 41, 5, 3, [(3, 3)], 1, torch.float64)


@pytest.mark.parametrize("dims", [(0, 5, 2, 8), (2, 0, 2, 8), (2, 5, 0, 8), (2, 5, 2, 0)])
def test_empty_sizes(dims):
    N, Q, M, D = dims
    value, shapes, starts, locations, weights = random_inputs(
        max(N, 1), max(Q, 1), max(M, 1), max(D, 1), [(3, 3)], 2, torch.float32, device="cpu"
    )
    value = value[:N, :, :M, :D].contiguous()
    locations = locations[:N, :Q, :M].contiguous()
    weights = weights[:N, :Q, :M].contiguous()
    out = run("ms_deform_attn", value, shapes, starts, locations, weights)
    assert out.shape == (N, Q, M * D) and out.numel() == 0 or not out.any()
    grads = run("ms_deform_attn_backward", torch.zeros(N, Q, M * D), value, shapes, starts, locations, weights, False)
    assert [g.shape for g in grads] == [value.shape, locations.shape, weights.shape]


def test_corrupt_level_table_reads_as_empty():
    """A level whose map leaves [0, S) is read as empty: zeros, never a stray access (guard pages would fault)."""
    value, _, _, locations, weights = random_inputs(
        1, 8, 2, 8, [(4, 4), (2, 2), (1, 1)], 2, torch.float32, device="cpu"
    )
    bad_shapes = torch.tensor([[4, 4], [4, 4], [1, 1]])
    bad_starts = torch.tensor([0, 16, -5])
    grad_output = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(3))
    for placement in ("flush_front", "flush_end"):
        results = emulate_all([value, bad_shapes, bad_starts, locations, weights], grad_output, placement=placement)
        only_first = weights.clone()
        only_first[:, :, :, 1:] = 0
        expected = oracle(value, bad_shapes[:1], bad_starts[:1], locations[:, :, :, :1], only_first[:, :, :, :1])
        for got in results.values():
            assert max_err(got[0], expected) <= 1e-5
            assert not got[2][:, :, :, 1:].any() and not got[3][:, :, :, 1:].any()


def nan_inf_inputs(dtype):
    value, shapes, starts, locations, weights = random_inputs(1, 6, 2, 4, [(4, 5), (2, 3)], 2, dtype, device="cpu")
    special = locations.clone()
    special[0, 0, 0, 0, 0, 0] = float("nan")  # head (q=0, m=0): NaN x
    special[0, 1, 1, 1, 1, 1] = float("nan")  # head (q=1, m=1): NaN y
    special[0, 2, 0, 0, 1, 0] = float("inf")
    special[0, 3, 1, 1, 0, 1] = -float("inf")
    special[0, 4, 0, 0, 0, 0] = 1e30
    special[0, 5, 1, 0, 1, 1] = -1e30
    return value, shapes, starts, special, weights


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS.get)
def test_nan_inf_locations(dtype):
    """NaN location: its head's output is NaN in every channel, its location/weight gradients NaN, nothing added to
    grad_value. +-inf and +-1e30: outside the map, zero contribution and zero gradients."""
    value, shapes, starts, locations, weights = nan_inf_inputs(dtype)
    nan_x = locations[..., 0].isnan() | locations[..., 1].isnan()  # (N, Q, M, L, P)
    outside = locations.clone()
    outside[nan_x] = -5.0  # the same sample, but outside: contributes zero
    outside[~torch.isfinite(outside)] = -5.0
    outside[outside.abs() > 10] = -5.0
    grad_output = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(5)).to(dtype)
    results = emulate_all([value, shapes, starts, locations, weights], grad_output)
    clean = emulate_all([value, shapes, starts, outside, weights], grad_output)
    nan_heads = nan_x.any(-1).any(-1)  # (N, Q, M)
    for deterministic in (False, True):
        out, gv, gl, gw = results[deterministic]
        c_out, c_gv, c_gl, c_gw = clean[deterministic]
        out = out.reshape(1, 6, 2, 4)
        assert out[nan_heads].isnan().all() and not out[~nan_heads].isnan().any()
        assert torch.equal(out[~nan_heads], c_out.reshape(1, 6, 2, 4)[~nan_heads])
        assert gl[nan_x].isnan().all() and gw[nan_x].isnan().all()
        assert torch.equal(gl[~nan_x], c_gl[~nan_x]) and torch.equal(gw[~nan_x], c_gw[~nan_x])
        assert torch.allclose(gv, c_gv, rtol=0, atol=1e-6) and torch.isfinite(gv).all()
    # The +-inf / 1e30 samples: zero gradients.
    far = ~torch.isfinite(locations).all(-1) & ~nan_x | (locations.abs() > 10).any(-1)
    assert not results[True][2][far].any() and not results[True][3][far].any()


def test_exact_pixel_edges():
    """Locations on pixel centres (integer h_im, w_im) and on h_im = -1 / w_im = -1 exactly. At integer positions
    every backend and the oracle take floor(), i.e. the right-hand one-sided location gradient; at -1 exactly the
    kernels read the sample as outside (gradient 0) while the oracle takes the right-hand side. Those entries, and
    only those, are excluded; everything else must match at the usual tolerance."""
    H, W = 4, 8
    value, shapes, starts, locations, weights = random_inputs(1, 8, 1, 4, [(H, W)], 4, torch.float64, device="cpu")
    grid = torch.tensor([-0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 7.5, 8.5], dtype=torch.float64)  # pixel units + 0.5 -> h_im
    g = torch.Generator().manual_seed(9)
    locations[..., 0] = (grid[torch.randint(0, 8, locations[..., 0].shape, generator=g)]) / W
    locations[..., 1] = (grid[torch.randint(0, 6, locations[..., 1].shape, generator=g)]) / H
    grad_output = torch.randn(1, 8, 4, generator=g, dtype=torch.float64)
    want = forward_backward(oracle, [value, shapes, starts, locations, weights], grad_output, as_double=True)
    got = emulate_all([value, shapes, starts, locations, weights], grad_output)
    edge_x = locations[..., 0] * W - 0.5 == -1
    edge_y = locations[..., 1] * H - 0.5 == -1
    assert edge_x.any() and edge_y.any()
    for result in got.values():
        for i in range(2):
            assert max_err(result[i], want[i]) <= 1e-12
        assert max_err(result[3], want[3]) <= 1e-12
        keep = torch.stack([~edge_x, ~edge_y], -1)
        assert max_err(result[2][keep], want[2][keep]) <= 1e-12
        # At -1 the kernel's one-sided gradient is the outside one: exactly zero.
        assert not result[2][..., 0][edge_x].any() and not result[2][..., 1][edge_y].any()


def test_exact_pixel_edges_float32_rounding():
    """float32 pixel centres x = (i + 0.5) / W with W not a power of two: the emulator (host build, no FMA) forms
    w_im = round(round(x * W) - 0.5), the oracle the exact float64 value, so near an integer they can floor to
    different sides. Exactly the entries where the two floors differ (or either is -1) are excluded."""
    W_H = [(5, 3), (7, 6)]
    value, shapes, starts, locations, weights = random_inputs(
        1, 16, 1, 4, [(h, w) for w, h in W_H], 3, torch.float32, device="cpu"
    )
    g = torch.Generator().manual_seed(11)
    sizes = torch.tensor([[w, h] for w, h in W_H], dtype=torch.float32)  # (L, 2): x scales with W, y with H
    for level, (w, h) in enumerate(W_H):
        for axis, n in ((0, w), (1, h)):
            idx = torch.randint(-1, n + 1, locations[:, :, :, level, :, axis].shape, generator=g)
            locations[:, :, :, level, :, axis] = ((idx.double() + 0.5) / n).float()
    im32 = locations * sizes[None, None, None, :, None, :] - 0.5  # float32, two roundings (as the emulator)
    im64 = locations.double() * sizes.double()[None, None, None, :, None, :] - 0.5
    one_sided = (im32.floor() != im64.floor()) | (im32 == -1) | (im64 == -1)
    assert (im32.floor() != im64.floor()).any() and one_sided.any()
    grad_output = torch.randn(1, 16, 4, generator=g)
    inputs = [value, shapes, starts, locations, weights]
    want = forward_backward(oracle, inputs, grad_output, as_double=True)
    for result in emulate_all(inputs, grad_output).values():
        for i in (0, 1, 3):
            assert max_err(result[i], want[i]) <= 2e-5 * (1 + want[i].abs().max().item())
        keep = ~one_sided
        assert max_err(result[2][keep], want[2][keep]) <= 2e-5 * (1 + want[2].abs().max().item())


@pytest.mark.parametrize("what", ["P=0", "S=0"])
def test_no_samples_or_empty_maps(what):
    """P = 0 (no points) or S = 0 (every level 0 x W): the output and every gradient are zero."""
    shapes = [(0, 3), (0, 2)] if what == "S=0" else [(3, 3)]
    value, sh, st, locations, weights = random_inputs(
        1, 4, 2, 8, shapes, 0 if what == "P=0" else 2, torch.float32, device="cpu"
    )
    grad_output = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(2))
    for got in emulate_all([value, sh, st, locations, weights], grad_output).values():
        assert all(not t.any() for t in got)
        assert [t.shape for t in got[1:]] == [value.shape, locations.shape, weights.shape]
