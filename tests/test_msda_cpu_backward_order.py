"""The CPU backward runs value / grad_value in the op's (N, S, M, D) order or head-major (N, M, S, D), chosen by
shape (head-major when a head's samples outnumber its rows, Q * L * P >= S, and M > 1), with or without query
chunks (more threads than (batch, head) slices). Every combination against the float64 oracle, on both sides of
the threshold, and the two orders bit-identical to each other for the same samples."""

from __future__ import annotations

import pytest
import torch
from support.oracle import make_inputs, oracle_output_and_grads, output_and_grads, rel_err

import deformable_detr as dd
from deformable_detr._extension import extension_loaded

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")

SHAPES = [(6, 5), (3, 2), (1, 1)]  # S = 37, D = 12: not a power of two, the generic channel path
S = 37
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _op(*args):
    return dd.ms_deform_attn(*args, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [12, 32])  # generic and compile-time channel paths (D = 32 batches samples)
@pytest.mark.parametrize("Q", [2, 20])  # Q * L * P = 18 < S: (N, S, M, D); 180 >= S: head-major
@pytest.mark.parametrize("threads", [1, 5])  # 5 threads > N * M = 4 slices: query chunks
def test_backward_orders_match_the_oracle(dtype, D, Q, threads):
    value, ss, lsi, loc, attn = make_inputs(2, SHAPES, 2, D, Q, 2, dtype=dtype, seed=Q + D)
    assert (Q * len(SHAPES) * 2 >= S) == (Q == 20)
    grad_out = torch.randn(2, Q, 2 * D, dtype=torch.float64).to(dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out, grads = output_and_grads(_op, value, ss, lsi, loc, attn, grad_out)
    finally:
        torch.set_num_threads(previous)
    exact_out, exact_grads = oracle_output_and_grads(value, ss, lsi, loc, attn, grad_out)
    assert rel_err(out, exact_out) <= TOL[dtype]
    for got, exact in zip(grads, exact_grads):
        assert got.dtype == (dtype if got.shape == value.shape else loc.dtype)
        assert rel_err(got, exact) <= TOL[dtype] * 10


def test_head_major_matches_the_op_order_bit_for_bit(one_thread):
    """The same samples through both orders: head-major is the same sums in the same order (one head's rows per
    task either way), only where the rows live in memory changes. A single head (M = 1) is never head-major, and
    splitting M = 2 heads into two single-head calls runs the (N, S, M, D) order (one thread: no query chunks,
    whose partial sums would add in another order)."""
    value, ss, lsi, loc, attn = make_inputs(1, SHAPES, 2, 32, 20, 2, dtype=torch.float32, seed=5)
    grad_out = torch.randn(1, 20, 64)
    op = torch.ops.deformable_detr.ms_deform_attn_backward
    together = op(grad_out, value, ss, lsi, loc, attn, None, False)  # Q * K = 120 >= S, M = 2: head-major
    for m in range(2):
        alone = op(
            grad_out.view(1, 20, 2, 32)[:, :, m].contiguous(),
            value[:, :, m : m + 1].contiguous(),
            ss,
            lsi,
            loc[:, :, m : m + 1].contiguous(),
            attn[:, :, m : m + 1].contiguous(),
            None,
            False,
        )
        assert torch.equal(alone[0][:, :, 0], together[0][:, :, m])
        assert torch.equal(alone[1][:, :, 0], together[1][:, :, m])
        assert torch.equal(alone[2][:, :, 0], together[2][:, :, m])
