"""MSDA ``points_per_level`` (ragged points, (N, Q, M, K, 2) layout) and ``sampling="discrete"`` on every CPU
backend against the float64 oracle: gradients, dtypes, empty levels / P_l = 0, the NaN rule, validation, the
point-table cache. CUDA under the emulator: tests/test_simt_msda.py; Triton: tests/test_msda_triton.py."""

from __future__ import annotations

import pytest
import torch
from support.oracle import (
    make_inputs,
    make_level_tensors,
    make_points_inputs,
    ms_deform_attn_oracle,
    oracle_output_and_grads,
    output_and_grads,
    rel_err,
)

import deformable_detr as dd
from deformable_detr.ops import levels

BACKENDS = [b for b in dd.available_backends("cpu") if b != "triton"]
COMPILED = [b for b in BACKENDS if b != "pytorch"]
SAMPLINGS = ["bilinear", "discrete"]

# (N, level shapes, M, D, Q, points per level): D-FINE's [3, 6, 3], a P_l = 0 level, an empty (0 x W) level,
# 1x1 levels, non-square maps, D not a power of two.
CASES = {
    "dfine": (2, [(6, 4), (3, 5), (2, 2)], 2, 8, 5, [3, 6, 3]),
    "zero_points": (1, [(4, 4), (2, 3), (1, 1)], 3, 5, 4, [2, 0, 3]),
    "empty_level": (2, [(3, 3), (0, 4), (2, 1)], 2, 7, 3, [1, 2, 2]),
    "one_by_one": (1, [(1, 1), (5, 2), (1, 1)], 1, 3, 6, [4, 1, 2]),
    "single_level": (2, [(5, 7)], 2, 33, 3, [5]),
}


def _call(backend, sampling, counts):
    return lambda *a: dd.ms_deform_attn(*a, backend=backend, points_per_level=counts, sampling=sampling)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_points_match_oracle(backend, sampling, case, dtype):
    N, shapes, M, D, Q, counts = CASES[case]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts, dtype=dtype, seed=len(case))
    grad_out = torch.randn(N, Q, M * D, dtype=torch.float64)
    out, grads = output_and_grads(_call(backend, sampling, counts), value, ss, lsi, loc, attn, grad_out)
    layout = dict(points_per_level=counts, sampling=sampling)
    ref_out, ref_grads = oracle_output_and_grads(value, ss, lsi, loc, attn, grad_out, **layout)
    assert out.dtype == dtype and out.shape == (N, Q, M * D)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert rel_err(out, ref_out) <= tol
    for name, g, ref in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert g is not None and g.dtype == dtype and g.shape == ref.shape, name
        if name == "sampling_locations" and sampling == "discrete":
            assert bool((g == 0).all()), "discrete sampling: no location gradient"
        else:
            assert rel_err(g, ref) <= tol, f"grad {name}: {rel_err(g, ref)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_discrete_uniform_layout_matches_oracle(backend, dtype):
    value, ss, lsi, loc, attn = make_inputs(2, [(5, 3), (2, 4), (1, 1)], 2, 6, 7, 3, dtype=dtype, seed=11)
    grad_out = torch.randn(2, 7, 12, dtype=torch.float64)
    call = lambda *a: dd.ms_deform_attn(*a, backend=backend, sampling="discrete")  # noqa: E731
    out, grads = output_and_grads(call, value, ss, lsi, loc, attn, grad_out)
    ref_out, ref_grads = oracle_output_and_grads(value, ss, lsi, loc, attn, grad_out, sampling="discrete")
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert rel_err(out, ref_out) <= tol
    assert rel_err(grads[0], ref_grads[0]) <= tol and rel_err(grads[2], ref_grads[2]) <= tol
    assert grads[1].shape == loc.shape and bool((grads[1] == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_discrete_rounds_half_up_and_clamps_to_the_border(backend):
    # W = H = 4: x * 4 + 0.5 is exact in binary. x = 0.125 is the boundary between pixels 0 and 1 (-> 1),
    # x = 0.375 between 1 and 2 (-> 2); -3 and 7 clamp to the border pixels 0 and 3; +-inf clamp likewise.
    ss, lsi = make_level_tensors([(4, 4)])
    value = torch.arange(16, dtype=torch.float64).reshape(1, 16, 1, 1)
    xs = [0.125, 0.375, 0.3749, -3.0, 7.0, float("inf"), float("-inf"), 1.0]
    expected_x = [1, 2, 1, 0, 3, 3, 0, 3]
    loc = torch.tensor([[x, 0.625] for x in xs], dtype=torch.float64).reshape(1, len(xs), 1, 1, 2)  # y -> row 3
    attn = torch.ones(1, len(xs), 1, 1, dtype=torch.float64)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend, points_per_level=[1], sampling="discrete")
    assert out.flatten().tolist() == [3 * 4 + x for x in expected_x]
    oracle = ms_deform_attn_oracle(value, ss, lsi, loc, attn, points_per_level=[1], sampling="discrete")
    assert oracle.flatten().tolist() == out.flatten().tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_uniform_points_per_level_equals_the_6d_layout(backend, sampling):
    value, ss, lsi, loc, attn = make_inputs(2, [(6, 4), (3, 2)], 2, 8, 5, 3, dtype=torch.float32, seed=5)
    out6 = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend, sampling=sampling)
    for table in ([3, 3], (3, 3), torch.tensor([3, 3]), torch.tensor([3, 3], dtype=torch.int32)):
        out5 = dd.ms_deform_attn(
            value,
            ss,
            lsi,
            loc.flatten(3, 4),
            attn.flatten(3, 4),
            backend=backend,
            points_per_level=table,
            sampling=sampling,
        )
        assert torch.equal(out5, out6)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_reference_error(backend, sampling, dtype):
    N, shapes, M, D, Q, counts = CASES["dfine"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts, dtype=dtype, seed=3)
    grad_out = torch.randn(N, Q, M * D, dtype=torch.float64).to(dtype).double()
    layout = dict(points_per_level=counts, sampling=sampling)
    out, grads = output_and_grads(_call(backend, sampling, counts), value, ss, lsi, loc, attn, grad_out)
    ref = lambda *a: dd.ms_deform_attn_reference(*a, **layout)  # noqa: E731
    ref_out, ref_grads = output_and_grads(ref, value, ss, lsi, loc, attn, grad_out)
    exact_out, exact_grads = oracle_output_and_grads(value, ss, lsi, loc, attn, grad_out, **layout)
    atol = 1e-3 if dtype == torch.float16 else 1e-2
    assert out.dtype == dtype
    assert (out.double() - exact_out).abs().max() <= 2 * (ref_out.double() - exact_out).abs().max() + atol
    for name, g, r, e in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads, exact_grads):
        err, ref_err = (g.double() - e).abs().max(), (r.double() - e).abs().max()
        assert err <= 2 * ref_err + atol * e.abs().max().clamp_min(1), f"grad {name}: {err} vs reference {ref_err}"


def test_reference_half_precision_close_to_oracle():
    for sampling in SAMPLINGS:
        N, shapes, M, D, Q, counts = CASES["dfine"]
        value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts, dtype=torch.bfloat16, seed=3)
        out = dd.ms_deform_attn_reference(value, ss, lsi, loc, attn, points_per_level=counts, sampling=sampling)
        exact = ms_deform_attn_oracle(value, ss, lsi, loc, attn, points_per_level=counts, sampling=sampling)
        assert out.dtype == torch.bfloat16 and rel_err(out, exact) <= 2e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_gradcheck_float64(backend, sampling):
    counts = [2, 0, 3]
    value, ss, lsi, loc, attn = make_points_inputs(2, [(3, 4), (2, 2), (2, 1)], 2, 3, 3, counts, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    fn = lambda v, l, a: dd.ms_deform_attn(  # noqa: E731
        v, ss, lsi, l, a, backend=backend, points_per_level=counts, sampling=sampling
    )
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling", SAMPLINGS)
@pytest.mark.parametrize("N,Q", [(0, 5), (2, 0)])
def test_empty_batch_or_queries(backend, sampling, N, Q):
    counts = [1, 3]
    value, ss, lsi, loc, attn = make_points_inputs(max(N, 1), [(3, 2), (1, 1)], 2, 4, max(Q, 1), counts)
    value, loc, attn = value[:N], loc[:N, :Q], attn[:N, :Q]
    value.requires_grad_(True)
    loc.requires_grad_(True)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend, points_per_level=counts, sampling=sampling)
    assert out.shape == (N, Q, 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and bool((value.grad == 0).all())
    assert loc.grad.shape == loc.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_non_contiguous_inputs(backend, sampling):
    N, shapes, M, D, Q, counts = CASES["dfine"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts, dtype=torch.float64, seed=9)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 3).contiguous().transpose(0, 3)
    attn_nc = attn.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous() and not attn_nc.is_contiguous()
    grad_out = torch.randn(N, Q, M * D, dtype=torch.float64)
    out, grads = output_and_grads(_call(backend, sampling, counts), value_nc, ss, lsi, loc_nc, attn_nc, grad_out)
    layout = dict(points_per_level=counts, sampling=sampling)
    ref_out, ref_grads = oracle_output_and_grads(value, ss, lsi, loc, attn, grad_out, **layout)
    assert rel_err(out, ref_out) <= 1e-9
    for g, ref in zip(grads, ref_grads):
        assert rel_err(g, ref) <= 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("all_empty", [False, True])
def test_discrete_nan_rule(backend, all_empty):
    """A NaN location: NaN out row, NaN location and weight gradients, nothing gathered into grad_value; every
    other location gradient is 0 (also under a NaN weight). Also when every level is empty (S = 0)."""
    shapes = [(0, 3), (2, 0)] if all_empty else [(3, 3), (2, 2)]
    counts = [2, 1]
    value, ss, lsi, loc, attn = make_points_inputs(1, shapes, 2, 3, 3, counts, dtype=torch.float64, seed=2)
    loc[0, 1, 0, 2, 0] = float("nan")  # query 1, head 0, level 1's point
    attn[0, 2, 1, 0] = float("nan")  # query 2, head 1: a NaN weight at a finite location
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend, points_per_level=counts, sampling="discrete")
    out = out.view(1, 3, 2, 3)
    nan_rows = torch.zeros(1, 3, 2, dtype=torch.bool)
    nan_rows[0, 1, 0] = nan_rows[0, 2, 1] = True
    assert bool(out.isnan().all(-1)[nan_rows].all()) and not bool(out.isnan().any(-1)[~nan_rows].any())
    out.nansum().backward()
    nan_loc = torch.zeros_like(loc, dtype=torch.bool)
    nan_loc[0, 1, 0, 2] = True
    assert bool(loc.grad[nan_loc].isnan().all()) and bool((loc.grad[~nan_loc] == 0).all())
    assert bool(attn.grad[0, 1, 0, 2].isnan())
    assert not bool(value.grad.isnan().any()) or not all_empty
    if not all_empty:
        # Only head 1 (the NaN weight's head) has NaN in grad_value: the NaN location gathered nothing.
        assert not bool(value.grad[:, :, 0].isnan().any())


def test_meta_tensors_give_the_contract_shape():
    N, shapes, M, D, Q, counts = CASES["dfine"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts)
    out = dd.ms_deform_attn(
        value.to("meta"), ss, lsi, loc.to("meta"), attn.to("meta"), points_per_level=counts, sampling="discrete"
    )
    assert out.device.type == "meta" and out.shape == (N, Q, M * D) and out.dtype == value.dtype


@pytest.mark.parametrize(
    "table,error,match",
    [
        ([3, 6], ValueError, "points_per_level must have L = 3"),
        ([3, -1, 10], ValueError, "points_per_level must be non-negative"),
        ([3, 6, 4], ValueError, "points_per_level must sum to K = 12"),
        (torch.tensor([3.0, 6.0, 3.0]), TypeError, "points_per_level must be an int64"),
        ([3.0, 6, 3], TypeError, "points_per_level must hold integers"),
        ("363", TypeError, "points_per_level must be a sequence"),
        (torch.tensor([[3, 6, 3]]), ValueError, r"points_per_level must have shape \(L,\)"),
    ],
)
def test_bad_points_per_level(table, error, match):
    N, shapes, M, D, Q, counts = CASES["dfine"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts)
    with pytest.raises(error, match=match):
        dd.ms_deform_attn(value, ss, lsi, loc, attn, points_per_level=table)


def test_bad_layout_and_sampling():
    N, shapes, M, D, Q, counts = CASES["dfine"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts)
    with pytest.raises(ValueError, match=r"sampling_locations must have shape \(N, Q, M, K, 2\)"):
        dd.ms_deform_attn(value, ss, lsi, loc.unsqueeze(3), attn, points_per_level=counts)
    with pytest.raises(ValueError, match=r"attention_weights must have shape \(N, Q, M, K\)"):
        dd.ms_deform_attn(value, ss, lsi, loc, attn[..., :-1], points_per_level=counts)
    with pytest.raises(ValueError, match=r"pass points_per_level"):
        dd.ms_deform_attn(value, ss, lsi, loc, attn)
    with pytest.raises(ValueError, match='sampling must be "bilinear" or "discrete"'):
        dd.ms_deform_attn(value, ss, lsi, loc, attn, points_per_level=counts, sampling="nearest")
    with pytest.raises(TypeError, match="sampling must be a str"):
        dd.ms_deform_attn(value, ss, lsi, loc, attn, points_per_level=counts, sampling=None)
    with pytest.raises(ValueError, match="sampling must be"):
        dd.ms_deform_attn_reference(value, ss, lsi, loc, attn, points_per_level=counts, sampling="nearest")


def test_point_table_checked_once_per_tensor_and_rechecked_after_an_edit():
    N, shapes, M, D, Q, counts = CASES["dfine"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts)
    table = torch.tensor(counts)
    first = levels.prepare_points(table, 3, 12)
    assert levels.prepare_points(table, 3, 12) is first and levels.prepare_points(list(counts), 3, 12) is first
    assert first.start_on(torch.device("cpu")).tolist() == [0, 3, 9, 12]
    assert first.start_on(torch.device("cpu")) is first.start_on(torch.device("cpu"))
    table[1] = 7  # in-place edit: version bump, checked again
    with pytest.raises(ValueError, match="sum to K = 12"):
        dd.ms_deform_attn(value, ss, lsi, loc, attn, points_per_level=table)


@pytest.mark.skipif(not COMPILED, reason="compiled extension not built")
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_opcheck(sampling):
    N, shapes, M, D, Q, counts = CASES["zero_points"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts, seed=5)
    point_start = torch.tensor([0, 2, 2, 5])
    discrete = sampling == "discrete"
    inputs = [t.requires_grad_(True) for t in (value, loc, attn)]
    op = torch.ops.deformable_detr
    torch.library.opcheck(op.ms_deform_attn.default, (inputs[0], ss, lsi, inputs[1], inputs[2], point_start, discrete))
    grad_out = torch.randn(N, Q, M * D)
    args = (grad_out, value.detach(), ss, lsi, loc.detach(), attn.detach(), point_start, discrete)
    torch.library.opcheck(op.ms_deform_attn_backward.default, args)
    # The uniform 6-D layout with discrete sampling.
    value, ss, lsi, loc, attn = make_inputs(1, [(3, 3), (2, 1)], 2, 4, 3, 2, seed=6)
    torch.library.opcheck(op.ms_deform_attn.default, (value, ss, lsi, loc, attn, None, discrete))


@pytest.mark.skipif(not COMPILED, reason="compiled extension not built")
def test_raw_op_rejects_bad_point_start():
    N, shapes, M, D, Q, counts = CASES["dfine"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts)
    op = torch.ops.deformable_detr.ms_deform_attn
    with pytest.raises(ValueError, match="point_start must have shape"):
        op(value, ss, lsi, loc, attn, torch.tensor([0, 3, 12]))
    with pytest.raises(TypeError, match="point_start must be int64"):
        op(value, ss, lsi, loc, attn, torch.tensor([0, 3, 9, 12], dtype=torch.int32))
    with pytest.raises(ValueError, match="point_start must be non-decreasing"):
        op(value, ss, lsi, loc, attn, torch.tensor([0, 9, 3, 12]))
    with pytest.raises(ValueError, match=r"point_start\[L\] must equal K"):
        op(value, ss, lsi, loc, attn, torch.tensor([0, 3, 9, 11]))
    with pytest.raises(ValueError, match=r"with point_start, sampling_locations must have shape \(N, Q, M, K, 2\)"):
        op(value, ss, lsi, loc.unsqueeze(3), attn, torch.tensor([0, 3, 9, 12]))


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_torch_compile_fullgraph(backend, sampling):
    torch._dynamo.reset()
    N, shapes, M, D, Q, counts = CASES["dfine"]
    value, ss, lsi, loc, attn = make_points_inputs(N, shapes, M, D, Q, counts, seed=9)

    def fn(v, l, a):
        return dd.ms_deform_attn(v, ss, lsi, l, a, backend=backend, points_per_level=counts, sampling=sampling) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    v1, l1, a1 = (t.clone().requires_grad_(True) for t in (value, loc, attn))
    v2, l2, a2 = (t.clone().requires_grad_(True) for t in (value, loc, attn))
    out1, out2 = fn(v1, l1, a1), compiled(v2, l2, a2)
    assert torch.equal(out1, out2)
    out1.sum().backward()
    out2.sum().backward()
    for g1, g2 in ((v1.grad, v2.grad), (l1.grad, l2.grad), (a1.grad, a2.grad)):
        assert torch.equal(g1, g2)
