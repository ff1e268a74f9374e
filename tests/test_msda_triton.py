"""Triton MSDA backend: values and all three gradients vs the float64 oracle.

CPU tensors run under the Triton interpreter, which must be switched on (``TRITON_INTERPRET=1``) before triton is
imported, and pytest has imported it long before this file runs. So ``test_interpreter_suite`` re-runs this very
file in a subprocess with ``TRITON_INTERPRET=1`` and ``-k interp_``; there the ``test_interp_*`` tests run, and a
failure shows up as that run's pytest report. Running ``TRITON_INTERPRET=1 pytest tests/test_msda_triton.py``
directly runs them in-process instead. GPU tests (``-m gpu``) compare against the oracle and the CUDA backend.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import test_msda_points as points_tests
import torch
from support.oracle import make_inputs, make_points_inputs, oracle_output_and_grads, output_and_grads, rel_err
from test_msda import CASES as CPU_CASES
from test_msda_nan import assert_follows_rule

import deformable_detr as dd
import deformable_detr.ops.triton as triton_ops

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
interp = pytest.mark.skipif(
    not INTERPRETING, reason="runs inside test_interpreter_suite's TRITON_INTERPRET=1 subprocess"
)
gpu = pytest.mark.gpu
not_interpreting = pytest.mark.skipif(INTERPRETING, reason="CUDA tests do not run under the Triton interpreter")

# (N, level shapes, M, D, Q, P): the CPU backend's odd shapes, plus channel counts above the kernels' channel
# tiles (forward 128, backward 64), query counts spanning several query blocks, and the maximum of 8 levels.
CASES = {
    **CPU_CASES,
    "d130_channel_chunks": (1, [(3, 2), (1, 2)], 1, 130, 3, 1),
    "q37_query_blocks": (2, [(4, 5), (2, 3)], 2, 4, 37, 2),
    "eight_levels": (1, [(3, 3), (2, 4), (1, 1), (2, 2), (4, 1), (1, 3), (2, 1), (3, 2)], 1, 3, 4, 2),
}
FP32_TOL = 2e-4


@pytest.fixture
def triton_calls(monkeypatch):
    """Calls that reached the Triton entry (the dispatcher falls back to the reference for a layout or sampling
    mode a backend does not run natively, which these tests must not pass through)."""
    calls = []
    real = triton_ops.ms_deform_attn_triton

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(triton_ops, "ms_deform_attn_triton", counting)
    return calls


def _triton(*args):
    return dd.ms_deform_attn(*args, backend="triton")


_rel_err = rel_err
_run = output_and_grads
_oracle = oracle_output_and_grads


def _assert_matches_oracle(label, value, ss, lsi, loc, attn, grad_out, oracle_inputs=None):
    """Triton output and gradients vs the oracle (on ``oracle_inputs``, default the same inputs)."""
    out, grads = _run(_triton, value, ss, lsi, loc, attn, grad_out)
    ref_out, ref_grads = _oracle(*(oracle_inputs or (value, ss, lsi, loc, attn)), grad_out)
    tol = 1e-9 if value.dtype == torch.float64 else FP32_TOL
    assert _rel_err(out, ref_out) <= tol, f"{label} output: {_rel_err(out, ref_out):.3g}"
    for name, g, ref in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert g.dtype == value.dtype and g.shape == ref.shape, f"{label} grad {name}: {g.dtype} {tuple(g.shape)}"
        assert _rel_err(g, ref) <= tol, f"{label} grad {name}: {_rel_err(g, ref):.3g}"
    return out, grads


def _check_against_oracle(case, dtype, device):
    N, shapes, M, D, Q, P = CASES[case]
    value, ss, lsi, loc, attn = make_inputs(N, shapes, M, D, Q, P, dtype=dtype, device=device, seed=len(case))
    grad_out = torch.randn(N, Q, M * D, dtype=torch.float64, device=device)
    out, _ = _assert_matches_oracle(f"{case} {dtype}", value, ss, lsi, loc, attn, grad_out)
    assert out.dtype == dtype and out.shape == (N, Q, M * D)


def _check_half(case, dtype, device):
    """flash-attention's rule: error vs float64 <= 2x the PyTorch reference's error in the same dtype + atol."""
    N, shapes, M, D, Q, P = CASES[case]
    value, ss, lsi, loc, attn = make_inputs(N, shapes, M, D, Q, P, dtype=dtype, device=device, seed=3)
    grad_out = torch.randn(N, Q, M * D, dtype=torch.float64, device=device).to(dtype).double()
    out, grads = _run(_triton, value, ss, lsi, loc, attn, grad_out)
    ref_out, ref_grads = _run(dd.ms_deform_attn_reference, value, ss, lsi, loc, attn, grad_out)
    exact_out, exact_grads = _oracle(value, ss, lsi, loc, attn, grad_out)
    atol = 1e-3 if dtype == torch.float16 else 1e-2
    assert out.dtype == dtype
    err, ref_err = (out.double() - exact_out).abs().max(), (ref_out.double() - exact_out).abs().max()
    assert err <= 2 * ref_err + atol * exact_out.abs().max().clamp_min(1), f"{case} output: {err} vs {ref_err}"
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    for name, g, r, e in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads, exact_grads):
        err, ref_err = (g.double() - e).abs().max(), (r.double() - e).abs().max()
        assert err <= 2 * ref_err + atol * e.abs().max().clamp_min(1), f"{case} grad {name}: {err} vs {ref_err}"


# --- the interpreter suite (CPU tensors) ---------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu", "-k", "interp_", __file__]
    # Generous: every interpreted launch runs the kernel in Python, and CI machines are shared.
    proc = subprocess.run(
        cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=2400
    )
    report = (proc.stdout + proc.stderr)[-20000:]
    assert proc.returncode == 0, f"TRITON_INTERPRET=1 run failed ({' '.join(cmd)}):\n{report}"
    # A skipped interpreter test would hide exactly what this suite is for.
    assert " passed" in proc.stdout and " skipped" not in proc.stdout, report


@interp
def test_interp_backend_is_available_on_cpu():
    assert "triton" in dd.available_backends("cpu")
    assert torch.ops.deformable_detr.ms_deform_attn_triton.default is not None
    assert torch.ops.deformable_detr.ms_deform_attn_triton_backward.default is not None


@interp
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interp_matches_oracle(case, dtype):
    _check_against_oracle(case, dtype, "cpu")


@interp
@pytest.mark.parametrize("case", ["d32", "non_square_d7"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interp_half_within_twice_reference_error(case, dtype):
    _check_half(case, dtype, "cpu")


@interp
@pytest.mark.parametrize("N,Q", [(0, 5), (2, 0), (0, 0)])
def test_interp_empty_batch_or_queries(N, Q):
    value, ss, lsi, loc, attn = make_inputs(max(N, 1), [(3, 2), (1, 1)], 2, 4, max(Q, 1), 2)
    value, loc, attn = value[:N], loc[:N, :Q], attn[:N, :Q]
    grad_out = torch.randn(N, Q, 8, dtype=torch.float64)
    out, (g_value, g_loc, g_attn) = _run(_triton, value, ss, lsi, loc, attn, grad_out)
    assert out.shape == (N, Q, 8)
    assert g_value.shape == value.shape and bool((g_value == 0).all())
    assert g_loc.shape == loc.shape and g_attn.shape == attn.shape


@interp
def test_interp_empty_level():
    # A 0 x 3 level: every sample there reads nothing; the other level is unaffected.
    value, ss, lsi, loc, attn = make_inputs(2, [(0, 3), (3, 4)], 2, 5, 6, 2, dtype=torch.float64)
    grad_out = torch.randn(2, 6, 10, dtype=torch.float64)
    _, (_, g_loc, g_attn) = _assert_matches_oracle("empty level", value, ss, lsi, loc, attn, grad_out)
    assert bool((g_loc[:, :, :, 0] == 0).all()) and bool((g_attn[:, :, :, 0] == 0).all())


@interp
def test_interp_non_contiguous_inputs():
    N, shapes, M, D, Q, P = CASES["non_square_d7"]
    value, ss, lsi, loc, attn = make_inputs(N, shapes, M, D, Q, P, dtype=torch.float64)
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    attn_nc = attn.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    grad_out = torch.randn(Q, N, M * D, dtype=torch.float64).transpose(0, 1)
    assert not any(t.is_contiguous() for t in (value_nc, loc_nc, attn_nc, grad_out))
    _assert_matches_oracle(
        "non-contiguous", value_nc, ss, lsi, loc_nc, attn_nc, grad_out, oracle_inputs=(value, ss, lsi, loc, attn)
    )


@interp
def test_interp_far_outside_and_infinite_locations_contribute_zero():
    value, ss, lsi, loc, attn = make_inputs(1, [(4, 5), (2, 2)], 2, 3, 6, 2)
    loc = torch.full_like(loc, 3.0)
    loc[..., 0] = -2.5
    loc[0, 0] = float("inf")
    loc[0, 2, 1, 1, 0, 1] = -float("inf")
    loc[0, 1] = 1e30
    loc[0, 3] = -1e30
    grad_out = torch.randn(1, 6, 6, dtype=torch.float64)
    out, (g_value, g_loc, g_attn) = _run(_triton, value, ss, lsi, loc, attn, grad_out)
    for t in (out, g_value, g_loc, g_attn):
        assert bool((t == 0).all())


@interp
def test_interp_nan_locations_follow_the_nan_rule():
    """NaN x or y: every channel of that (n, q, m) head is NaN, the sample's location and weight gradients are NaN,
    and it adds nothing to grad_value; every other entry equals the run with that sample moved off the map."""
    value, ss, lsi, loc, attn = make_inputs(1, [(4, 5), (2, 2)], 2, 3, 6, 2, dtype=torch.float64)
    loc[0, 0, 0, 0, 1, 0] = float("nan")
    loc[0, 4, 1, 1, 0, 1] = float("nan")
    nan_sample = loc.isnan().any(-1)
    moved = loc.clone()
    moved[nan_sample] = -3.0
    grad_out = torch.randn(1, 6, 6, dtype=torch.float64)
    out, (g_value, g_loc, g_attn) = _run(_triton, value, ss, lsi, loc, attn, grad_out)
    c_out, (c_value, c_loc, c_attn) = _run(_triton, value, ss, lsi, moved, attn, grad_out)
    nan_head = nan_sample.any(-1).any(-1)  # (N, Q, M)
    out, c_out = out.reshape(1, 6, 2, 3), c_out.reshape(1, 6, 2, 3)
    assert bool(out[nan_head].isnan().all()) and torch.equal(out[~nan_head], c_out[~nan_head])
    assert bool(g_loc[nan_sample].isnan().all()) and bool(g_attn[nan_sample].isnan().all())
    assert torch.equal(g_loc[~nan_sample], c_loc[~nan_sample]) and torch.equal(g_attn[~nan_sample], c_attn[~nan_sample])
    assert torch.allclose(g_value, c_value, rtol=0, atol=1e-12)


@interp
@pytest.mark.parametrize(
    "dtype, empty_level",
    [(torch.float64, False), (torch.float32, False), (torch.float16, False), (torch.float64, True)],
    ids=["float64", "float32", "float16", "float64_empty_level"],
)
def test_interp_non_finite_rule(dtype, empty_level):
    """The full non-finite rule of test_msda_nan.py (NaN / infinite locations, NaN weights in and off the map,
    optionally on a 0 x 3 level)."""
    D = {torch.float64: 5, torch.float32: 32, torch.float16: 16}[dtype]
    assert_follows_rule(_triton, dtype, D=D, check_values=dtype != torch.float16, empty_level=empty_level)


@interp
def test_interp_corrupt_level_table_reads_as_empty():
    """Regression: the Triton kernels only checked corners against H, W, so a level whose map leaves [0, S) (a
    corrupt spatial_shapes / level_start_index that the host cannot check without a sync) was read and written out
    of bounds. Like the CUDA kernels, such a level now reads as empty: zero output and zero gradients."""
    value, _, _, loc, attn = make_inputs(1, [(4, 4), (2, 2), (1, 1)], 2, 8, 8, 2)
    # value has S = 21 rows; level 1 claims 16 rows from row 16, level 2 starts before 0.
    bad_shapes = torch.tensor([[4, 4], [4, 4], [1, 1]])
    bad_starts = torch.tensor([0, 16, -5])
    grad_out = torch.randn(1, 8, 16)
    op = torch.ops.deformable_detr
    out = op.ms_deform_attn_triton(value, bad_shapes, bad_starts, loc, attn)
    g_value, g_loc, g_attn = op.ms_deform_attn_triton_backward(grad_out, value, bad_shapes, bad_starts, loc, attn)
    first = (value, bad_shapes[:1], bad_starts[:1], loc[:, :, :, :1].contiguous(), attn[:, :, :, :1].contiguous())
    want_out = op.ms_deform_attn_triton(*first)
    want_value, want_loc, want_attn = op.ms_deform_attn_triton_backward(grad_out, *first)
    assert _rel_err(out, want_out) <= 1e-6 and _rel_err(g_value, want_value) <= 1e-6
    assert torch.equal(g_loc[:, :, :, :1], want_loc) and torch.equal(g_attn[:, :, :, :1], want_attn)
    assert not g_loc[:, :, :, 1:].any() and not g_attn[:, :, :, 1:].any()


@interp
def test_interp_locations_on_the_border():
    # x = 0 and x = 1 put the sample half a pixel outside the first / last column: half its weight survives.
    value, ss, lsi, loc, attn = make_inputs(1, [(3, 4)], 1, 2, 4, 1, dtype=torch.float64)
    loc[:, 0, ..., 0], loc[:, 1, ..., 0], loc[:, 2, ..., 1], loc[:, 3, ..., 1] = 0.0, 1.0, 0.0, 1.0
    _assert_matches_oracle("border", value, ss, lsi, loc, attn, torch.randn(1, 4, 2, dtype=torch.float64))


@interp
def test_interp_gradcheck_float64():
    value, ss, lsi, loc, attn = make_inputs(2, [(3, 4), (2, 1)], 2, 3, 3, 2, dtype=torch.float64, seed=7)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    # fast_mode: one random directional derivative per input instead of a full Jacobian, since every
    # interpreted launch costs a fraction of a second.
    assert torch.autograd.gradcheck(
        lambda v, l, a: _triton(v, ss, lsi, l, a), inputs, eps=1e-6, atol=1e-7, fast_mode=True
    )


def _opcheck(device, test_utils):
    value, ss, lsi, loc, attn = make_inputs(2, [(4, 3), (2, 2)], 2, 5, 6, 2, device=device, seed=5)
    for t in (value, loc, attn):
        t.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.deformable_detr.ms_deform_attn_triton.default, (value, ss, lsi, loc, attn), test_utils=test_utils
    )
    grad_out = torch.randn(2, 6, 10, device=device)
    torch.library.opcheck(
        torch.ops.deformable_detr.ms_deform_attn_triton_backward.default,
        (grad_out, value.detach(), ss, lsi, loc.detach(), attn.detach()),
        test_utils=test_utils,
    )


@interp
def test_interp_opcheck_schema_and_autograd_registration():
    # Fake-tensor tracing cannot run the interpreter (it reads data pointers); the GPU test covers it.
    _opcheck("cpu", ("test_schema", "test_autograd_registration"))


@interp
def test_interp_rejects_unsupported_input():
    value, ss, lsi, loc, attn = make_inputs(1, [(2, 2)], 1, 2, 2, 1)
    with pytest.raises(TypeError, match="spatial_shapes"):
        triton_ops.ms_deform_attn_triton(value, ss.int(), lsi, loc, attn)
    with pytest.raises(TypeError, match="value"):
        triton_ops.ms_deform_attn_triton(value.long(), ss, lsi, loc, attn)


# --- points per level and discrete sampling (the CPU backends' tests of test_msda_points, run on Triton) ------


@interp
@pytest.mark.parametrize("sampling", points_tests.SAMPLINGS)
@pytest.mark.parametrize("case", list(points_tests.CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interp_points_match_oracle(sampling, case, dtype, triton_calls):
    points_tests.test_points_match_oracle("triton", sampling, case, dtype)
    assert triton_calls, "the call did not reach the Triton kernels"


@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_interp_discrete_uniform_layout_matches_oracle(dtype, triton_calls):
    points_tests.test_discrete_uniform_layout_matches_oracle("triton", dtype)
    assert triton_calls


@interp
def test_interp_discrete_rounds_half_up_and_clamps_to_the_border(triton_calls):
    points_tests.test_discrete_rounds_half_up_and_clamps_to_the_border("triton")
    assert triton_calls


@interp
@pytest.mark.parametrize("sampling", points_tests.SAMPLINGS)
def test_interp_uniform_points_per_level_equals_the_6d_layout(sampling):
    points_tests.test_uniform_points_per_level_equals_the_6d_layout("triton", sampling)


@interp
@pytest.mark.parametrize("sampling", points_tests.SAMPLINGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interp_points_half_within_twice_reference_error(sampling, dtype):
    points_tests.test_half_precision_within_twice_reference_error("triton", sampling, dtype)


@interp
@pytest.mark.parametrize("sampling", points_tests.SAMPLINGS)
def test_interp_points_gradcheck_float64(sampling):
    counts = [2, 0, 3]
    value, ss, lsi, loc, attn = make_points_inputs(2, [(3, 4), (2, 2), (2, 1)], 2, 3, 3, counts, dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    fn = lambda v, l, a: dd.ms_deform_attn(  # noqa: E731
        v, ss, lsi, l, a, backend="triton", points_per_level=counts, sampling=sampling
    )
    # fast_mode: a full Jacobian is one interpreted launch per input element (test_gradcheck_float64 of
    # test_msda_points, too slow under the interpreter).
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, fast_mode=True)


@interp
@pytest.mark.parametrize("sampling", points_tests.SAMPLINGS)
@pytest.mark.parametrize("N,Q", [(0, 5), (2, 0)])
def test_interp_points_empty_batch_or_queries(sampling, N, Q):
    points_tests.test_empty_batch_or_queries("triton", sampling, N, Q)


@interp
@pytest.mark.parametrize("sampling", points_tests.SAMPLINGS)
def test_interp_points_non_contiguous_inputs(sampling):
    points_tests.test_non_contiguous_inputs("triton", sampling)


@interp
@pytest.mark.parametrize("all_empty", [False, True])
def test_interp_discrete_nan_rule(all_empty, triton_calls):
    points_tests.test_discrete_nan_rule("triton", all_empty)
    assert triton_calls


@interp
@pytest.mark.parametrize("sampling", points_tests.SAMPLINGS)
@pytest.mark.parametrize("shapes", [[(4, 3), (2, 5), (1, 1)], [(0, 3), (2, 0), (0, 0)]], ids=["maps", "all_empty"])
def test_interp_points_non_finite_inputs_as_the_reference(sampling, shapes):
    """NaN / +-inf locations and NaN weights on the points layout: the Triton output and gradients have the
    reference backend's NaN pattern and values (the reference implements the rule for both samplings)."""
    counts = [2, 0, 3]
    value, ss, lsi, loc, attn = make_points_inputs(1, shapes, 2, 3, 4, counts, dtype=torch.float64, seed=6)
    loc[0, 0, 0, 1, 0] = float("nan")
    loc[0, 1, 1, 4, 1] = float("inf")
    loc[0, 2, 0, 2, 0] = -float("inf")
    attn[0, 3, 1, 3] = float("nan")
    grad_out = torch.randn(1, 4, 6, dtype=torch.float64)
    layout = dict(points_per_level=counts, sampling=sampling)
    got = _run(lambda *a: dd.ms_deform_attn(*a, backend="triton", **layout), value, ss, lsi, loc, attn, grad_out)
    want = _run(lambda *a: dd.ms_deform_attn(*a, backend="pytorch", **layout), value, ss, lsi, loc, attn, grad_out)
    for name, g, w in zip(
        ("out", "grad value", "grad locations", "grad weights"), [got[0], *got[1]], [want[0], *want[1]]
    ):
        assert torch.equal(g.isnan(), w.isnan()), f"{name}: NaN pattern differs from the reference"
        finite = ~w.isnan()
        assert torch.allclose(g[finite], w[finite], rtol=1e-9, atol=1e-12), f"{name}: values differ"


@interp
@pytest.mark.parametrize("sampling", points_tests.SAMPLINGS)
def test_interp_nan_location_with_every_level_empty(sampling):
    """S = 0 (every level empty), the 6-D layout: a NaN location still makes its head NaN with NaN location and
    weight gradients; a NaN weight gives NaN location gradients (bilinear) and a zero weight gradient. Failed
    before: the Triton launchers returned zeros without running the kernels whenever S = 0."""
    value = torch.randn(1, 0, 1, 4, dtype=torch.float64)
    ss, lsi = torch.tensor([[0, 1]]), torch.tensor([0])
    loc = torch.tensor([[0.5, float("nan")], [0.3, 0.3]], dtype=torch.float64).view(1, 1, 1, 1, 2, 2)
    attn = torch.tensor([1.0, float("nan")], dtype=torch.float64).view(1, 1, 1, 1, 2)
    grad_out = torch.ones(1, 1, 4, dtype=torch.float64)
    call = lambda *a: dd.ms_deform_attn(*a, backend="triton", sampling=sampling)  # noqa: E731
    out, (g_value, g_loc, g_attn) = _run(call, value, ss, lsi, loc, attn, grad_out)
    assert bool(out.isnan().all()) and g_value.shape == value.shape
    assert bool(g_loc[..., 0, :].isnan().all())
    if sampling == "bilinear":
        assert bool(g_loc[..., 1, :].isnan().all())
    else:
        assert bool((g_loc[..., 1, :] == 0).all())
    assert bool(g_attn[..., 0].isnan().all()) and bool((g_attn[..., 1] == 0).all())


@interp
def test_interp_corrupt_point_table_reads_inside_k():
    """The kernels clamp a point table's ranges into [0, K): a table that overruns K (or runs backwards) reads no
    point outside the row, and a level's range past K is empty."""
    counts = [2, 3]
    value, ss, lsi, loc, attn = make_points_inputs(1, [(3, 3), (2, 2)], 2, 4, 3, counts, dtype=torch.float64)
    op = torch.ops.deformable_detr.ms_deform_attn_triton
    good = op(value, ss, lsi, loc, attn, torch.tensor([0, 2, 5]), False)
    overrun = op(value, ss, lsi, loc, attn, torch.tensor([0, 2, 500]), False)
    assert torch.equal(overrun, good)
    backwards = op(value, ss, lsi, loc, attn, torch.tensor([0, 2, -7]), False)
    level0 = op(value, ss, lsi, loc, attn, torch.tensor([0, 2, 2]), False)
    assert torch.equal(backwards, level0)


@interp
def test_interp_opcheck_points_and_discrete():
    counts = [2, 0, 3]
    value, ss, lsi, loc, attn = make_points_inputs(2, [(3, 4), (2, 2), (2, 1)], 2, 5, 3, counts, seed=4)
    starts = torch.tensor([0, 2, 2, 5])
    for t in (value, loc, attn):
        t.requires_grad_(True)
    for discrete in (False, True):
        torch.library.opcheck(
            torch.ops.deformable_detr.ms_deform_attn_triton.default,
            (value, ss, lsi, loc, attn, starts, discrete),
            test_utils=("test_schema", "test_autograd_registration"),
        )


@interp
def test_interp_rejects_a_bad_point_table():
    value, ss, lsi, loc, attn = make_points_inputs(1, [(2, 2), (1, 1)], 1, 2, 2, [1, 2])
    with pytest.raises(ValueError, match="point_start"):
        triton_ops.ms_deform_attn_triton(value, ss, lsi, loc, attn, point_start=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="point_start"):
        triton_ops.ms_deform_attn_triton(value, ss, lsi, loc, attn, point_start=torch.tensor([0, 1, 3]).int())


# --- outside the interpreter ---------------------------------------------------------------------------------


@pytest.mark.skipif(INTERPRETING, reason="checks the non-interpreted CPU path")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_tensors_without_interpreter_raise_clear_error():
    assert "triton" not in dd.available_backends("cpu")
    value, ss, lsi, loc, attn = make_inputs(1, [(2, 2)], 1, 2, 2, 1)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _triton(value, ss, lsi, loc, attn)


# --- GPU ----------------------------------------------------------------------------------------------------


@gpu
@not_interpreting
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_matches_oracle(case, dtype):
    _check_against_oracle(case, dtype, "cuda")


@gpu
@not_interpreting
@pytest.mark.parametrize("case", ["d32", "non_square_d7", "q37_query_blocks"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_within_twice_reference_error(case, dtype):
    _check_half(case, dtype, "cuda")


@gpu
@not_interpreting
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_encoder_shape_matches_oracle(dtype):
    # Deformable DETR encoder at a small image: 4 levels, Q = S, M = 8, D = 32, P = 4 (autotuned configs).
    shapes = [(32, 40), (16, 20), (8, 10), (4, 5)]
    value, ss, lsi, loc, attn = make_inputs(2, shapes, 8, 32, 1700, 4, dtype=dtype, device="cuda", seed=1)
    grad_out = torch.randn(2, 1700, 256, dtype=torch.float64, device="cuda").to(dtype).double()
    out, grads = _run(_triton, value, ss, lsi, loc, attn, grad_out)
    ref_out, ref_grads = _oracle(value, ss, lsi, loc, attn, grad_out)
    tol = FP32_TOL if dtype == torch.float32 else 2e-2
    assert _rel_err(out, ref_out) <= tol
    for name, g, ref in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert _rel_err(g, ref) <= tol, f"grad {name}: {_rel_err(g, ref):.3g}"


@gpu
@not_interpreting
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_triton_matches_cuda_backend(dtype):
    if "cuda" not in dd.available_backends("cuda"):
        pytest.skip("the extension was built without CUDA kernels")
    shapes = [(20, 24), (10, 12), (5, 6), (3, 3)]
    value, ss, lsi, loc, attn = make_inputs(2, shapes, 8, 32, 300, 4, dtype=dtype, device="cuda", seed=2)
    grad_out = torch.randn(2, 300, 256, dtype=torch.float64, device="cuda")
    out_t, grads_t = _run(_triton, value, ss, lsi, loc, attn, grad_out)
    out_c, grads_c = _run(lambda *a: dd.ms_deform_attn(*a, backend="cuda"), value, ss, lsi, loc, attn, grad_out)
    tol = FP32_TOL if dtype == torch.float32 else 1e-2
    assert _rel_err(out_t, out_c.double()) <= tol
    for name, g_t, g_c in zip(("value", "sampling_locations", "attention_weights"), grads_t, grads_c):
        assert _rel_err(g_t, g_c.double()) <= tol, f"grad {name}: {_rel_err(g_t, g_c.double()):.3g}"


@gpu
@not_interpreting
def test_gpu_auto_backend_uses_triton_without_cuda_extension():
    from deformable_detr.ops.ms_deform_attn import _auto_backend

    backends = dd.available_backends("cuda")
    assert "triton" in backends
    expected = "cuda" if "cuda" in backends else "triton"

    assert _auto_backend(torch.device("cuda")) == expected


@gpu
@not_interpreting
def test_gpu_opcheck():
    _opcheck("cuda", ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@gpu
@not_interpreting
def test_gpu_torch_compile_inductor_fullgraph():
    torch._dynamo.reset()
    value, ss, lsi, loc, attn = make_inputs(2, [(6, 5), (3, 3)], 4, 16, 50, 2, device="cuda", seed=9)

    def fn(v, l, a):
        return (_triton(v, ss, lsi, l, a) * 2).sum(-1)

    compiled = torch.compile(fn, fullgraph=True)
    v1, l1, a1 = (t.clone().requires_grad_(True) for t in (value, loc, attn))
    v2, l2, a2 = (t.clone().requires_grad_(True) for t in (value, loc, attn))
    out_c, out_e = compiled(v1, l1, a1), fn(v2, l2, a2)
    torch.testing.assert_close(out_c, out_e)
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    for g_c, g_e in ((v1.grad, v2.grad), (l1.grad, l2.grad), (a1.grad, a2.grad)):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-4)


class _CudaTargetDriver:
    """Just enough of a Triton driver for TTIR generation: an sm_90 target, no GPU needed."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


@not_interpreting
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("discrete", [False, True], ids=["bilinear", "discrete"])
@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "ragged"])
def test_compile_sees_only_the_outputs_written(ragged, discrete, monkeypatch):
    """torch.compile decides from the kernels' TTIR which arguments they write; an input reported as written is
    copied back after the call, which fails for a leaf that requires grad (the inductor fullgraph test failed
    so on an H200 on 2026-12-04: sampling_locations "mutated" by the backward). Each kernel variant must write
    only its outputs."""
    import triton
    from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

    from deformable_detr.ops.triton import ms_deform_attn as tri

    N, S, M, D, Q, L, P = 2, 39, 4, 16, 50, 2, 2
    value = torch.randn(N, S, M, D)
    shapes = torch.tensor([[6, 5], [3, 3]])
    level_start = torch.tensor([0, 30])
    if ragged:
        point_start = torch.tensor([0, 3, 4])
        loc, attn = torch.rand(N, Q, M, 4, 2), torch.rand(N, Q, M, 4)
    else:
        point_start = None
        loc, attn = torch.rand(N, Q, M, L, P, 2), torch.rand(N, Q, M, L, P)
    sizes = tri._sizes(value, shapes, loc, point_start, discrete)
    sizes["BLOCK_D"] = 16
    tables = dict(
        value_ptr=value,
        shapes_ptr=shapes,
        level_start_ptr=level_start,
        point_start_ptr=tri._point_table(point_start, level_start),
        loc_ptr=loc,
        attn_ptr=attn,
    )
    forward = dict(**tables, out_ptr=torch.empty(N, Q, M * D), **sizes)
    backward = dict(
        grad_out_ptr=torch.randn(N, Q, M * D),
        **tables,
        grad_value_ptr=torch.zeros(N, S, M, D),
        grad_loc_ptr=torch.zeros_like(loc),
        grad_attn_ptr=torch.zeros_like(attn),
        **sizes,
    )
    # The active driver, replaced for this test only (a CPU-only machine has none).
    monkeypatch.setattr(triton.runtime.driver, "_active", _CudaTargetDriver())
    written = {
        kind: {dep.name for dep in identify_accessed_tensors(kernel, kwargs, {}).read_writes.writes}
        for kind, kernel, kwargs in (
            ("forward", tri._forward_autotuned, forward),
            ("backward", tri._backward_autotuned, backward),
        )
    }
    assert written == {
        "forward": {"out_ptr"},
        "backward": {"grad_value_ptr", "grad_loc_ptr", "grad_attn_ptr"},
    }
