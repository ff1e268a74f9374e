"""Batched linear sum assignment vs scipy.optimize.linear_sum_assignment (the oracle), on CPU and (marked) CUDA."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment as scipy_lsa
from support.lsap_oracle import scipy_rows

import deformable_detr as dd
from deformable_detr._extension import has_kernel
from deformable_detr.ops import assignment as assignment_mod

needs_cpu_kernel = pytest.mark.skipif(not has_kernel("batched_lsap", "CPU"), reason="extension not built")
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_kernel("batched_lsap", "CUDA"), reason="needs CUDA and the CUDA kernel"
)


def random_costs(rng, B, N, M, kind):
    if kind == "uniform":
        return rng.random((B, N, M))
    if kind == "logspan":  # 1e-3 .. 1e3
        return np.exp(rng.uniform(np.log(1e-3), np.log(1e3), (B, N, M)))
    if kind == "signed":
        return rng.normal(0, 100, (B, N, M))
    raise ValueError(kind)


SHAPES = [(1, 1), (2, 2), (5, 5), (17, 17), (3, 8), (8, 3), (1, 9), (9, 1), (30, 7), (7, 30), (40, 40), (300, 20)]


def check_against_scipy(cost: torch.Tensor, num_cols=None, device="cpu"):
    got = dd.batched_linear_sum_assignment(cost.to(device), num_cols, validate=True).cpu().numpy()
    c = cost.double().numpy()
    for b in range(c.shape[0]):
        m = c.shape[2] if num_cols is None else int(num_cols[b])
        np.testing.assert_array_equal(got[b], scipy_rows(c[b, :, :m]), err_msg=f"problem {b} ({c.shape[1]}x{m})")
    return got


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_identical_to_scipy_on_random_problems(dtype):
    rng = np.random.default_rng(0 if dtype == torch.float32 else 1)
    total = 0
    for N, M in SHAPES:
        for kind in ("uniform", "logspan", "signed"):
            B = 2 if N * M > 1000 else 20
            check_against_scipy(torch.tensor(random_costs(rng, B, N, M, kind), dtype=dtype))
            total += B
    assert total >= 600  # x2 dtypes: >= 1200 problems


@needs_cpu_kernel
def test_integer_ties_reach_the_optimal_cost():
    rng = np.random.default_rng(2)
    for N, M in [(4, 4), (6, 3), (3, 6), (12, 12), (20, 50), (50, 20)]:
        c = rng.integers(0, 3, (25, N, M)).astype(np.float64)
        got = dd.batched_linear_sum_assignment(torch.from_numpy(c)).numpy()
        for b in range(c.shape[0]):
            rows = np.flatnonzero(got[b] >= 0)
            cols = got[b, rows]
            assert len(rows) == min(N, M) and len(set(cols.tolist())) == len(cols)
            r, k = scipy_lsa(c[b])
            assert c[b, rows, cols].sum() == c[b, r, k].sum()
            # scipy's tie rule is reproduced too, so even with ties the indices agree
            np.testing.assert_array_equal(got[b], scipy_rows(c[b]))


def test_constant_matrix_gives_identity_like_scipy():
    got = dd.batched_linear_sum_assignment(torch.ones(1, 5, 7))
    assert got.tolist() == [[0, 1, 2, 3, 4]]
    row_ind, col_ind = dd.linear_sum_assignment(np.ones((7, 5)))
    np.testing.assert_array_equal(row_ind, np.arange(5))
    np.testing.assert_array_equal(col_ind, np.arange(5))


@needs_cpu_kernel
def test_mixed_num_cols_and_empty_problems():
    rng = np.random.default_rng(3)
    cost = torch.tensor(rng.random((6, 9, 12)))
    num_cols = [12, 0, 1, 9, 5, 11]
    got = check_against_scipy(cost, num_cols)
    assert (got[1] == -1).all()
    # num_cols as an int64 tensor gives the same
    assert (dd.batched_linear_sum_assignment(cost, torch.tensor(num_cols)).numpy() == got).all()


def test_empty_shapes():
    assert dd.batched_linear_sum_assignment(torch.rand(3, 300, 0)).eq(-1).all()
    assert dd.batched_linear_sum_assignment(torch.rand(2, 0, 5)).shape == (2, 0)
    assert dd.batched_linear_sum_assignment(torch.rand(0, 4, 5)).shape == (0, 4)
    r, c = dd.linear_sum_assignment(np.zeros((300, 0)))
    assert r.shape == c.shape == (0,)


@needs_cpu_kernel
def test_forbidden_edges_that_leave_a_feasible_problem():
    rng = np.random.default_rng(4)
    c = rng.random((30, 6, 9))
    c[rng.random(c.shape) < 0.3] = np.inf
    feasible = []
    for b in range(c.shape[0]):
        try:
            scipy_lsa(c[b])
            feasible.append(b)
        except ValueError:
            pass
    assert len(feasible) > 5
    check_against_scipy(torch.tensor(c[feasible]))


def test_invalid_entries_raise_naming_the_problem():
    cost = torch.rand(4, 3, 3)
    cost[2, 1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"invalid numeric entries.*problem 2"):
        dd.batched_linear_sum_assignment(cost)
    cost = torch.rand(4, 3, 3, dtype=torch.float64)
    cost[3, 0, 2] = -float("inf")
    with pytest.raises(ValueError, match=r"invalid numeric entries.*problem 3"):
        dd.batched_linear_sum_assignment(cost)
    # NaN in a padded column (outside num_cols) is not part of the problem
    cost = torch.rand(2, 3, 4)
    cost[1, :, 3] = float("nan")
    dd.batched_linear_sum_assignment(cost, [4, 3])


def test_infeasible_problem_raises_naming_it():
    cost = torch.rand(3, 3, 3)
    cost[1, :, 0] = float("inf")
    cost[1, :, 1] = float("inf")
    with pytest.raises(ValueError, match=r"infeasible.*problem 1"):
        dd.batched_linear_sum_assignment(cost)
    assignment, status = dd.batched_linear_sum_assignment(cost, validate=False, return_status=True)
    assert status.tolist() == [0, 2, 0]
    assert assignment[1].eq(-1).all() and assignment[0].ge(0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="cost must have shape"):
        dd.batched_linear_sum_assignment(torch.rand(3, 3))
    with pytest.raises(ValueError, match=r"num_cols\[1\] = 5"):
        dd.batched_linear_sum_assignment(torch.rand(2, 3, 4), [4, 5])
    with pytest.raises(ValueError, match="num_cols must have"):
        dd.batched_linear_sum_assignment(torch.rand(2, 3, 4), [4])
    with pytest.raises(ValueError, match="2-D"):
        dd.linear_sum_assignment(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="invalid numeric entries"):
        dd.linear_sum_assignment(np.array([[1.0, np.nan]]))


def test_linear_sum_assignment_matches_scipy_api():
    rng = np.random.default_rng(5)
    for shape in [(6, 4), (4, 6), (5, 5)]:
        c = rng.random(shape)
        for maximize in (False, True):
            r, k = dd.linear_sum_assignment(c, maximize=maximize)
            er, ek = scipy_lsa(c, maximize=maximize)
            assert isinstance(r, np.ndarray) and r.dtype == np.int64
            np.testing.assert_array_equal(r, er)
            np.testing.assert_array_equal(k, ek)
        rt, kt = dd.linear_sum_assignment(torch.tensor(c, dtype=torch.float32))
        assert rt.dtype == torch.int64 and kt.dtype == torch.int64
        er, ek = scipy_lsa(c.astype(np.float32))
        np.testing.assert_array_equal(rt.numpy(), er)
        np.testing.assert_array_equal(kt.numpy(), ek)
    # integer input is solved in float64, like scipy
    ci = rng.integers(0, 100, (7, 5))
    np.testing.assert_array_equal(dd.linear_sum_assignment(ci)[1], scipy_lsa(ci)[1])


def test_scipy_fallback_reports_the_same(monkeypatch):
    rng = np.random.default_rng(6)
    cost = torch.tensor(rng.random((5, 6, 8)))
    cost[3, 0, 0] = float("nan")
    expected = assignment_mod._scipy_batched(cost, torch.tensor([8, 8, 2, 8, 7]))
    monkeypatch.setattr(assignment_mod, "has_kernel", lambda *a: False)
    got = dd.batched_linear_sum_assignment(cost, [8, 8, 2, 8, 7], validate=False, return_status=True)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert expected[1].tolist() == [0, 0, 0, 1, 0]


@needs_cpu_kernel
def test_opcheck():
    cost = torch.rand(3, 5, 4)
    torch.library.opcheck(torch.ops.deformable_detr.batched_lsap.default, (cost, torch.tensor([4, 2, 0])))
    torch.library.opcheck(torch.ops.deformable_detr.batched_lsap.default, (cost.double(), None))


# ----------------------------------------------------------------------------------------------- CUDA (marked gpu)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_identical_to_scipy(dtype):
    rng = np.random.default_rng(10)
    # 300x20 uses the shared-memory cost cache, 300x100 shared state only, 1100x1100 state in global memory.
    for N, M, B in [*[(n, m, 8) for n, m in SHAPES], (300, 100, 4), (100, 600, 2), (1100, 1100, 1)]:
        for kind in ("uniform", "logspan"):
            check_against_scipy(torch.tensor(random_costs(rng, B, N, M, kind), dtype=dtype), device="cuda")
    c = rng.integers(0, 3, (40, 12, 30)).astype(np.float64)  # ties: the CPU kernel and scipy agree, so must CUDA
    cpu = dd.batched_linear_sum_assignment(torch.from_numpy(c))
    assert torch.equal(dd.batched_linear_sum_assignment(torch.from_numpy(c).cuda()).cpu(), cpu)


@pytest.mark.gpu
@needs_cuda
def test_cuda_mixed_num_cols_and_status_without_sync():
    rng = np.random.default_rng(11)
    cost = torch.tensor(rng.random((6, 9, 12)))
    cost[4, 0, 0] = float("nan")
    cost[5, :, :2] = float("inf")
    num_cols = torch.tensor([12, 0, 1, 9, 2, 13])  # 13 > M: reported, not read
    gpu_cost, gpu_cols = cost.cuda(), num_cols.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        assignment, status = dd.batched_linear_sum_assignment(gpu_cost, gpu_cols, return_status=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert status.tolist() == [0, 0, 0, 0, 1, 3]
    for b in range(4):
        m = int(num_cols[b])
        np.testing.assert_array_equal(assignment[b].cpu().numpy(), scipy_rows(cost[b, :, :m].numpy()))
    assert assignment[4:].eq(-1).all()
    with pytest.raises(ValueError, match=r"problem 4"):
        dd.batched_linear_sum_assignment(gpu_cost, gpu_cols, validate=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(
    os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1",
    reason="CUDA graph capture needs the caching allocator (compute-sanitizer runs turn it off)",
)
def test_cuda_graph_capture():
    cost = torch.rand(16, 300, 20, device="cuda")
    num_cols = torch.randint(0, 21, (16,), device="cuda")
    dd.batched_linear_sum_assignment(cost, num_cols)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = dd.batched_linear_sum_assignment(cost, num_cols)
    cost.copy_(torch.rand_like(cost))
    graph.replay()
    torch.cuda.synchronize()
    check = dd.batched_linear_sum_assignment(cost.cpu(), num_cols.cpu())
    assert torch.equal(out.cpu(), check)


@needs_cuda
@pytest.mark.gpu
def test_cuda_float32_subnormal_costs():
    """Regression (found by the SIMT emulator, tests/test_simt_lsap.py): under --use_fast_math the float32 ->
    float64 widening flushed subnormal costs to zero (cvt.ftz.f64.f32) and ties broke unlike scipy."""
    cost = torch.tensor([[[2e-39, 1e-39], [1e-39, 2e-39]]], dtype=torch.float32)
    got = dd.batched_linear_sum_assignment(cost.cuda()).cpu().numpy()
    np.testing.assert_array_equal(got[0], scipy_rows(cost[0].double().numpy()))
    np.testing.assert_array_equal(got[0], [1, 0])
