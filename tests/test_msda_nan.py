"""Non-finite inputs (issue 16 item 6): the contract's NaN / infinity rule, checked against the float64 oracle
evaluated on finite stand-ins (``expected_under_rule``) on the CPU backends, on the CUDA kernels under the SIMT
emulator (tests/simt/; both backward paths), on a GPU when there is one, and on the Triton kernels under the
interpreter (tests/test_msda_triton.py, ``test_interp_non_finite_rule``).

The rule (README "Backends", ``deformable_detr.ops.ms_deform_attn`` docstring):
- a sample whose x or y is NaN makes every channel of out[n, q, m, :] NaN; its gradients w.r.t. both coordinates
  and its attention weight are NaN, and it adds nothing to grad_value;
- a sample at x or y = +-inf lies outside every map: it contributes 0 and has zero gradients;
- a NaN attention weight propagates by IEEE arithmetic: out[n, q, m, :] is NaN (also when the sample lies outside
  the map: NaN * 0), the location gradient is NaN, grad_value is NaN at the sample's in-map corners, and the
  weight's own gradient is the finite <grad_out, bilinear value> (0 outside the map).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from oracle import make_inputs, oracle_output_and_grads, output_and_grads
from simt_emulator import run as run_emulated

import deformable_detr as dd
from deformable_detr._extension import extension_loaded

BACKENDS = [b for b in dd.available_backends("cpu") if b != "triton"]
NAN = float("nan")
INF = float("inf")


def expected_under_rule(value, spatial_shapes, level_start_index, locations, weights, grad_out):
    """Output and gradients the rule prescribes, from the oracle run on finite stand-ins: dropped samples (NaN or
    infinite location) get weight 0 at an arbitrary finite location, NaN weights get weight 0; then the entries the
    rule fixes are overwritten."""
    nan_loc = locations.isnan().any(-1)
    inf_loc = locations.isinf().any(-1) & ~nan_loc
    nan_weight = weights.isnan() & ~nan_loc
    dropped = nan_loc | inf_loc
    finite_locations = torch.where(dropped[..., None], torch.full_like(locations, 0.5), locations)
    finite_weights = torch.where(dropped | nan_weight, torch.zeros_like(weights), weights)
    out, (grad_value, grad_locations, grad_weights) = oracle_output_and_grads(
        value, spatial_shapes, level_start_index, finite_locations, finite_weights, grad_out
    )
    N, Q, M = weights.shape[:3]
    out = out.view(N, Q, M, -1).clone()
    out[(nan_loc | nan_weight).flatten(3).any(-1)] = NAN
    grad_locations = grad_locations.clone()
    grad_locations[dropped] = 0
    grad_locations[nan_weight] = NAN
    grad_locations[nan_loc] = NAN
    grad_weights = grad_weights.clone()
    grad_weights[dropped] = 0
    grad_weights[nan_loc] = NAN
    if bool(nan_weight.any()):
        # grad_value is NaN exactly at the in-map corners of NaN-weight samples: where the oracle's grad_value is
        # nonzero when only those samples carry weight and the upstream gradient is positive everywhere.
        _, (corner_hits, _, _) = oracle_output_and_grads(
            value,
            spatial_shapes,
            level_start_index,
            finite_locations,
            (nan_weight & ~dropped).to(weights.dtype),
            grad_out.abs() + 1,
        )
        grad_value = grad_value.clone()
        grad_value[corner_hits != 0] = NAN
    return out.flatten(2), [grad_value, grad_locations, grad_weights]


def poisoned_inputs(dtype, D=5, seed=0, empty_level=False):
    """Random inputs with NaN x, NaN y, both NaN, +-inf x or y, NaN next to inf, and NaN attention weights at
    in-map, out-of-map and infinite locations, in several (n, q, m) rows; other rows stay finite. ``empty_level``:
    level 1 is 0 x 3, so a NaN location, an infinite one and a NaN weight (below) lie on an empty map."""
    shapes = [(5, 4), (0, 3) if empty_level else (3, 3), (1, 2)]
    value, ss, lsi, loc, attn = make_inputs(2, shapes, 2, D, 6, 3, dtype=dtype, seed=seed)
    loc, attn = loc.clone(), attn.clone()
    loc[0, 0, 0, 0, 0, 0] = NAN
    loc[0, 1, 1, 1, 2, 1] = NAN
    loc[1, 2, 0, 2, 1] = NAN
    loc[1, 3, 1, 0, 0, 0] = INF
    loc[1, 3, 1, 1, 1, 1] = -INF
    loc[0, 4, 0, 0, 2] = torch.tensor([-INF, INF])
    loc[0, 5, 1, 1, 0] = torch.tensor([INF, NAN])
    loc[1, 0, 0, 0, 1] = torch.tensor([0.41, 0.37])  # NaN weight in the map
    attn[1, 0, 0, 0, 1] = NAN
    loc[1, 4, 1, 2, 0] = torch.tensor([1.8, 0.5])  # NaN weight outside the map
    attn[1, 4, 1, 2, 0] = NAN
    loc[0, 2, 1, 0, 0, 1] = INF  # NaN weight at an infinite location
    attn[0, 2, 1, 0, 0] = NAN
    if empty_level:
        attn[1, 5, 0, 1, 1] = NAN  # NaN weight on the empty level
    return value, ss, lsi, loc, attn


def assert_follows_rule(fn, dtype, D=5, check_values=True, empty_level=False):
    """NaN pattern and exact zeros as the rule says; the finite values to float32/float64 tolerance when
    ``check_values`` (half-precision accuracy is tested in test_msda.py, not here)."""
    value, ss, lsi, loc, attn = poisoned_inputs(dtype, D=D, empty_level=empty_level)
    grad_out = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * D, dtype=torch.float64)
    out, grads = output_and_grads(fn, value, ss, lsi, loc, attn, grad_out)
    exp_out, exp_grads = expected_under_rule(value, ss, lsi, loc, attn, grad_out)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    for name, actual, expected in zip(
        ("out", "grad value", "grad sampling_locations", "grad attention_weights"), [out, *grads], [exp_out, *exp_grads]
    ):
        assert torch.equal(actual.isnan(), expected.isnan()), f"{name}: NaN pattern differs from the rule"
        assert bool((actual[expected == 0] == 0).all()), f"{name}: nonzero where the rule gives exactly 0"
        if not check_values:
            continue
        finite = ~expected.isnan()
        scale = expected[finite].abs().max().clamp_min(1)
        err = ((actual.double()[finite] - expected[finite]).abs().max() / scale).item()
        assert err <= tol, f"{name}: error {err} on the finite entries"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("D", [5, 32])
def test_non_finite_locations_and_weights_follow_rule(backend, dtype, D):
    assert_follows_rule(lambda *a: dd.ms_deform_attn(*a, backend=backend), dtype, D=D)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_non_finite_rule_on_an_empty_level(backend, dtype):
    # A 0 x W map: the reference once returned location gradients 0 there instead of NaN.
    assert_follows_rule(lambda *a: dd.ms_deform_attn(*a, backend=backend), dtype, D=8, empty_level=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_locations_rule_one_thread(backend, one_thread):
    # One thread: the CPU backward writes grad_value directly instead of through per-chunk buffers.
    assert_follows_rule(lambda *a: dd.ms_deform_attn(*a, backend=backend), torch.float32, D=32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_non_finite_rule_half_precision(backend, dtype):
    assert_follows_rule(lambda *a: dd.ms_deform_attn(*a, backend=backend), dtype, D=16, check_values=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_location_is_not_hidden_by_far_outside_level(backend):
    # The original defect: a NaN location gave finite output and zero gradients on the cpu backend.
    value, ss, lsi, loc, attn = make_inputs(1, [(4, 4)], 1, 3, 1, 1, dtype=torch.float32)
    loc = torch.full_like(loc, NAN)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
    out.sum().backward()
    assert bool(out.isnan().all()) and bool(loc.grad.isnan().all()) and bool(attn.grad.isnan().all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_locations_contribute_zero(backend):
    value, ss, lsi, loc, attn = make_inputs(1, [(4, 5), (2, 2)], 2, 3, 4, 2, dtype=torch.float32)
    signs = torch.randint(0, 2, loc.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loc = (signs * INF).to(loc.dtype).requires_grad_(True)
    attn.requires_grad_(True)
    value.requires_grad_(True)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
    out.sum().backward()
    assert bool((out == 0).all())
    assert bool((loc.grad == 0).all()) and bool((attn.grad == 0).all()) and bool((value.grad == 0).all())


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
def test_non_finite_rule_baseline_cpu_kernel_copy():
    """The in-process tests run the CPU kernel copy this machine picks (AVX2 when present); force the baseline."""
    script = (
        "import torch, deformable_detr as dd, test_msda_nan as t\n"
        "for dtype, D in ((torch.float32, 32), (torch.float64, 5), (torch.bfloat16, 16)):\n"
        "    fn = lambda *a: dd.ms_deform_attn(*a, backend='cpu')\n"
        "    t.assert_follows_rule(fn, dtype, D=D, check_values=dtype != torch.bfloat16)\n"
        "print('baseline-ok')\n"
    )
    env = dict(os.environ, DEFORMABLE_DETR_DISABLE_AVX2="1")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tests_dir, capture_output=True, text=True)
    assert result.returncode == 0 and "baseline-ok" in result.stdout, result.stderr[-3000:]


def test_non_finite_rule_compiled_reference():
    # Eager mode applies the reference's fix-up only when a location is not finite; a compiled graph always does.
    # (Not fullgraph: the reference reads spatial_shapes on the host, a graph break with or without this rule.)
    compiled = torch.compile(dd.ms_deform_attn_reference, dynamic=False)
    assert_follows_rule(compiled, torch.float64, D=5)


class _Emulated(torch.autograd.Function):
    """The CUDA op's host flow and kernels run by the SIMT emulator, as an autograd function of (value, locations,
    weights); ``config``: the emulator's run() options (schedule seed, launch threshold, ...) and the op's
    ``point_start`` / ``discrete``."""

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, locations, weights, deterministic, config):
        ctx.save_for_backward(value, spatial_shapes, level_start_index, locations, weights)
        ctx.deterministic, ctx.config = deterministic, config
        return run_emulated("ms_deform_attn", value, spatial_shapes, level_start_index, locations, weights, **config)

    @staticmethod
    def backward(ctx, grad_out):
        grads = run_emulated(
            "ms_deform_attn_backward", grad_out.contiguous(), *ctx.saved_tensors, ctx.deterministic, **ctx.config
        )
        return grads[0], None, None, grads[1], grads[2], None, None


# (dtype, D, emulator config, empty level): float64 / float32 at the real launch threshold (narrow groups) and, with
# the threshold lowered to 1, the widest vectors in groups of several lanes and two channel tiles; half types for
# the NaN pattern only.
EMULATED_CASES = {
    "float64_d5": (torch.float64, 5, {}, False),
    "float32_d32_wide": (torch.float32, 32, {"min_threads": 1}, False),
    "float64_d66_tiles": (torch.float64, 66, {"min_threads": 1, "seed": 3}, False),
    "float32_d8_empty_level": (torch.float32, 8, {"min_threads": 1}, True),
    "float16_d16": (torch.float16, 16, {"min_threads": 1}, False),
    "bfloat16_d16": (torch.bfloat16, 16, {}, False),
}


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("case", list(EMULATED_CASES))
def test_non_finite_rule_emulated_cuda(case, deterministic):
    """The CUDA kernels (forward, atomic backward, and the deterministic path's key / gather kernels)."""
    dtype, D, config, empty_level = EMULATED_CASES[case]

    def fn(value, ss, lsi, loc, attn):
        return _Emulated.apply(value, ss, lsi, loc, attn, deterministic, config)

    assert_follows_rule(fn, dtype, D=D, check_values=dtype in (torch.float32, torch.float64), empty_level=empty_level)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "backend, deterministic",
    [("cuda", False), ("cuda", True), ("triton", False)],  # Triton refuses deterministic mode (float atomics)
    ids=["cuda-atomics", "cuda-deterministic", "triton"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_finite_rule_gpu(backend, dtype, deterministic):
    if backend not in dd.available_backends("cuda"):
        pytest.skip(f"backend {backend!r} is not available on this GPU machine")

    def fn(value, ss, lsi, loc, attn):
        cuda = [t.cuda() for t in (value, ss, lsi, loc, attn)]
        return dd.ms_deform_attn(*cuda, backend=backend).cpu()

    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        for empty_level in (False, True):
            assert_follows_rule(fn, dtype, D=32, check_values=dtype == torch.float32, empty_level=empty_level)
    finally:
        torch.use_deterministic_algorithms(previous)


def _every_level_empty_inputs():
    """Issue 21 item 7: S = 0 (every level 0 x W); sample 0 has a NaN y, sample 1 a NaN weight."""
    value = torch.randn(1, 0, 1, 4, dtype=torch.float64)
    shapes, starts = torch.tensor([[0, 1]]), torch.tensor([0])
    loc = torch.tensor([[0.5, NAN], [0.3, 0.3]], dtype=torch.float64).view(1, 1, 1, 1, 2, 2)
    weights = torch.tensor([1.0, NAN], dtype=torch.float64).view(1, 1, 1, 1, 2)
    return value, shapes, starts, loc, weights


def assert_rule_when_every_level_is_empty(fn, discrete):
    value, shapes, starts, loc, weights = (t.requires_grad_(t.is_floating_point()) for t in _every_level_empty_inputs())
    out = fn(value, shapes, starts, loc, weights)
    assert out.shape == (1, 1, 4) and bool(out.isnan().all())
    out.backward(torch.ones_like(out))
    grad_loc, grad_w = loc.grad.view(2, 2), weights.grad.view(2)
    assert bool(grad_loc[0].isnan().all()), "NaN location: NaN location gradient"
    # Sample 1 (NaN weight, empty level): a * 0 = NaN for bilinear; discrete sampling has no location gradient.
    assert bool(grad_loc[1].isnan().all()) if not discrete else bool((grad_loc[1] == 0).all())
    assert bool(grad_w[0].isnan()) and grad_w[1].item() == 0
    assert value.grad is not None and value.grad.shape == value.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
def test_nan_rule_when_every_level_is_empty(backend, sampling):
    """Failed first on the CPU backend: its backward returned early with zero gradients when value was empty."""

    def fn(*args):
        return dd.ms_deform_attn(*args, backend=backend, sampling=sampling)

    assert_rule_when_every_level_is_empty(fn, sampling == "discrete")


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomics", "deterministic"])
@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
def test_nan_rule_when_every_level_is_empty_emulated_cuda(deterministic, sampling):
    """Failed first: the CUDA host backward_on returned early with zero gradients when value was empty."""
    config = {"discrete": sampling == "discrete"}

    def fn(value, ss, lsi, loc, attn):
        return _Emulated.apply(value, ss, lsi, loc, attn, deterministic, config)

    assert_rule_when_every_level_is_empty(fn, sampling == "discrete")
