"""The batched LSAP CUDA kernel (csrc/assignment/cuda/) executed on the CPU by the SIMT emulator (tests/simt/)
against scipy: the quick campaign of `make test` (the long one: tests/support/simt_campaign.py). Covers the three state
layouts the launcher picks (costs cached in shared memory, state in shared memory, state in global memory), 32 to
256 threads, both orientations, padded num_cols and the status codes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from support.lsap_oracle import scipy_rows
from support.simt_emulator import load, run
from support.simt_lsap_check import check_against_scipy, emulate, lsap_batches

import deformable_detr as dd
from deformable_detr._extension import has_kernel

KINDS = ("uniform", "ties", "constant", "duplicate_rows", "signed", "subnormal")
SHAPES = [(1, 1), (2, 2), (5, 5), (3, 8), (8, 3), (17, 17), (40, 40), (7, 130), (130, 7), (30, 100)]


def test_random_problems_vs_scipy():
    rng = np.random.default_rng(0)
    total = sum(check_against_scipy(c) for c in lsap_batches(rng, SHAPES, KINDS, lambda n, m: 2))
    assert total >= 200


@pytest.mark.parametrize("shape", [(2000, 3), (3, 2000)])
def test_long_rectangular(shape):
    """2000 x 3 is solved transposed; the state no longer fits shared memory (global-memory layout)."""
    rng = np.random.default_rng(1)
    for kind in ("uniform", "ties"):
        check_against_scipy(
            torch.tensor(
                np.stack([rng.random(shape) if kind == "uniform" else rng.integers(0, 2, shape).astype(float)]),
                dtype=torch.float32,
            )
        )


def test_state_layouts_covered():
    load().reset_coverage()
    rng = np.random.default_rng(2)
    for N, M in [(4, 6), (30, 60), (100, 400), (3, 2000)]:
        check_against_scipy(torch.tensor(rng.random((1, N, M))))
    kernels = {key.split("|")[0] for key, _ in load().coverage()}
    assert kernels == {"lsap_cached", "lsap_shared", "lsap_global"}


def test_padded_num_cols():
    rng = np.random.default_rng(3)
    cost = torch.tensor(rng.random((6, 5, 9)), dtype=torch.float32)
    num_cols = torch.tensor([9, 5, 3, 1, 0, 7])
    got, status = emulate(cost, num_cols)
    assert (status == 0).all()
    for b in range(6):
        m = int(num_cols[b])
        want = scipy_rows(cost[b, :, :m].double().numpy()) if m else np.full(5, -1)
        np.testing.assert_array_equal(got[b].numpy(), want)
    _, status = emulate(cost, torch.tensor([9, 10, -1, 3, 3, 3]))
    assert status.tolist() == [0, 3, 3, 0, 0, 0]


def test_status_codes():
    cost = torch.rand(5, 3, 3, dtype=torch.float64)
    cost[1, 0, 2] = float("nan")
    cost[2, 2, 2] = -float("inf")
    cost[3, :, 0] = float("inf")  # feasible: columns 1, 2 remain for... 3 rows need 3 columns -> infeasible
    cost[4, 0, 1] = float("inf")  # one forbidden edge: still feasible
    got, status = emulate(cost)
    assert status.tolist() == [0, 1, 1, 2, 0]
    assert (got[1:4] == -1).all()
    np.testing.assert_array_equal(got[4].numpy(), scipy_rows(cost[4].numpy()))


@pytest.mark.parametrize("backend", ["emulated_cuda", "cpu"])
def test_float32_subnormal_costs(backend):
    """Regression: --use_fast_math made the float32 -> float64 widening flush subnormal costs to zero on the GPU
    (cvt.ftz.f64.f32), so ties broke unlike scipy. The emulator runs float32 kernels with FTZ|DAZ set."""
    cost = torch.tensor([[[2e-39, 1e-39], [1e-39, 2e-39]]], dtype=torch.float32)
    assert cost[0, 0, 1].item() != 0  # subnormal, not flushed on the host
    if backend == "cpu":
        if not has_kernel("batched_lsap", "CPU"):
            pytest.skip("extension not built")
        got = dd.batched_linear_sum_assignment(cost).numpy()
    else:
        got, status = emulate(cost)
        assert status.item() == 0
        got = got.numpy()
    np.testing.assert_array_equal(got[0], [1, 0])
    np.testing.assert_array_equal(got[0], scipy_rows(cost[0].double().numpy()))


def test_emulated_matches_cpu_op():
    if not has_kernel("batched_lsap", "CPU"):
        pytest.skip("extension not built")
    rng = np.random.default_rng(4)
    cost = torch.tensor(rng.integers(0, 4, (8, 12, 9)).astype(np.float32))
    got, _ = emulate(cost)
    assert torch.equal(got, dd.batched_linear_sum_assignment(cost))
    _ = run  # the module's entry point, used through emulate
