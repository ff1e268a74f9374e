"""GPU tests of the CUDA MSDA kernels (csrc/ms_deform_attn/cuda/). Every test needs a CUDA device and is skipped
without one; benchmarks/gpu_check.sh runs them on a GPU machine.

Judged against a float64 oracle written from the README's operator contract (tests/support/cuda_cases.py:
explicit corners, index arithmetic, not grid_sample; gradients by autograd through it). Half types follow the flash-attention rule: kernel error vs
float64 <= 2 x (error of the PyTorch reference run in the same dtype) + a small tolerance.

The shapes are chosen to reach every launch path of the kernel: vector widths 1/2/4/8 (odd D, small problems,
misaligned storage force the narrow ones), several groups per warp, more than one channel tile (D = 256 in
fp32/fp64), a partial last block, 16 levels, a 1x1 level and locations outside [0, 1].
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from support.cuda_cases import (
    CASES,
    DTYPES,
    REL_TOL,
    assert_close_to_oracle,
    forward_backward,
    max_err,
    oracle,
    position_dtype,
    random_inputs,
)

import deformable_detr as dd
from deformable_detr.ops.reference import ms_deform_attn_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _op():
    return torch.ops.deformable_detr


def cuda_op(value, spatial_shapes, level_start_index, locations, weights):
    return dd.ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend="cuda")


def test_cuda_kernels_registered():
    for name in ("ms_deform_attn", "ms_deform_attn_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deformable_detr::{name}", "CUDA"), name
    assert "cuda" in dd.available_backends("cuda")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_oracle(case, dtype):
    N, Q, M, D, shapes, P = CASES[case]
    inputs = random_inputs(N, Q, M, D, shapes, P, dtype)
    grad_output = torch.randn(N, Q, M * D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad_output = grad_output.to("cuda", dtype)
    got = forward_backward(cuda_op, inputs, grad_output)
    want = forward_backward(oracle, inputs, grad_output, as_double=True)
    ref = forward_backward(ms_deform_attn_reference, inputs, grad_output) if dtype != torch.float64 else want
    assert_close_to_oracle(dtype, got, want, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_matches_cpu_kernel(dtype):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("deformable_detr::ms_deform_attn", "CPU"):
        pytest.skip("extension built without the CPU kernel")
    N, Q, M, D, shapes, P = CASES["d32_1x1_level"]
    inputs = random_inputs(N, Q, M, D, shapes, P, dtype)
    cpu_inputs = [t.cpu() for t in inputs]
    grad_output = torch.randn(N, Q, M * D, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = forward_backward(cuda_op, inputs, grad_output.cuda())
    want = forward_backward(lambda *a: dd.ms_deform_attn(*a, backend="cpu"), cpu_inputs, grad_output, as_double=False)
    # Same inputs, same math, fp32 (fp64) accumulation in both: only summation order differs.
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, g, w in zip(("out", "grad_value", "grad_locations", "grad_weights"), got, want):
        bound = tol * (1.0 + w.abs().max().item())
        assert max_err(g, w) <= bound, f"{name}: CUDA vs CPU {max_err(g, w):.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("float32", "float16"))
def test_non_contiguous_inputs(dtype):
    N, Q, M, D, shapes, P = 2, 6, 2, 16, [(5, 4), (2, 3)], 3
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(N, Q, M, D, shapes, P, dtype)
    value_nc = value.transpose(1, 2).contiguous().transpose(1, 2)  # (N, S, M, D) view of (N, M, S, D) storage
    locations_nc = torch.stack([locations, torch.zeros_like(locations)], -1)[..., 0]
    weights_nc = weights.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (value_nc.is_contiguous() or locations_nc.is_contiguous() or weights_nc.is_contiguous())
    grad_output = torch.randn(N, M * D, Q, device="cuda").to(dtype).transpose(1, 2)  # non-contiguous too
    inputs_nc = (value_nc, spatial_shapes, level_start_index, locations_nc, weights_nc)
    inputs = (value, spatial_shapes, level_start_index, locations, weights)
    got = forward_backward(cuda_op, inputs_nc, grad_output)
    want = forward_backward(cuda_op, inputs, grad_output.contiguous())
    for g, w in zip(got, want):
        assert max_err(g, w) <= REL_TOL[dtype] * (1.0 + w.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_misaligned_storage_uses_narrow_vectors(dtype):
    """value / grad_output starting one element into their storage cannot take vector loads; same answer."""
    N, Q, M, D, shapes, P = CASES["wide_vectors"]
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(N, Q, M, D, shapes, P, dtype)
    shifted = torch.empty(value.numel() + 1, device="cuda", dtype=dtype)[1:].view(value.shape)
    shifted.copy_(value)
    assert shifted.is_contiguous() and shifted.data_ptr() % 16 != 0
    grad_output = torch.randn(N, Q, M * D, device="cuda").to(dtype)
    grad_shifted = torch.empty(grad_output.numel() + 1, device="cuda", dtype=dtype)[1:].view(grad_output.shape)
    grad_shifted.copy_(grad_output)
    op = _op()
    for v, go in ((value, grad_output), (shifted, grad_shifted)):
        out = op.ms_deform_attn(v, spatial_shapes, level_start_index, locations, weights)
        grads = op.ms_deform_attn_backward(go, v, spatial_shapes, level_start_index, locations, weights)
        if v is value:
            expected = (out, *grads)
        else:
            for g, w in zip((out, *grads), expected):
                assert max_err(g.double(), w.double()) <= REL_TOL[dtype] * (1.0 + w.double().abs().max().item())


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("float32", "float16"))
@pytest.mark.parametrize("dims", [(0, 5), (2, 0)], ids=("N0", "Q0"))
def test_empty_batch_or_queries(dims, dtype):
    N, Q = dims
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(N, Q, 2, 8, [(3, 3)], 2, dtype)
    out = _op().ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
    assert out.shape == (N, Q, 16) and out.dtype == dtype and out.device.type == "cuda"
    grads = _op().ms_deform_attn_backward(out, value, spatial_shapes, level_start_index, locations, weights)
    for g, t in zip(grads, (value, locations, weights)):
        assert g.shape == t.shape and g.dtype == t.dtype
        assert not g.any()


def test_output_and_gradient_dtypes():
    for dtype in DTYPES:
        value, spatial_shapes, level_start_index, locations, weights = random_inputs(1, 3, 2, 4, [(3, 3)], 2, dtype)
        out = _op().ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        assert out.dtype == dtype
        grads = _op().ms_deform_attn_backward(out, value, spatial_shapes, level_start_index, locations, weights)
        assert [g.dtype for g in grads] == [dtype, position_dtype(dtype), position_dtype(dtype)]


def test_grad_value_under_atomic_contention():
    """Every query samples the same spot, so all atomics hit the same four rows: order-insensitive checks only."""
    N, Q, M, D, shapes, P = 1, 4096, 2, 32, [(4, 4), (2, 2)], 4
    for dtype in (torch.float32, torch.float16):
        value, spatial_shapes, level_start_index, locations, weights = random_inputs(N, Q, M, D, shapes, P, dtype)
        locations = torch.full_like(locations, 0.4)
        inputs = (value, spatial_shapes, level_start_index, locations, weights)
        grad_output = torch.randn(N, Q, M * D, device="cuda").to(dtype) / Q
        first = forward_backward(cuda_op, inputs, grad_output)
        second = forward_backward(cuda_op, inputs, grad_output)
        want = forward_backward(oracle, inputs, grad_output, as_double=True)
        ref = forward_backward(ms_deform_attn_reference, inputs, grad_output)
        assert_close_to_oracle(dtype, first[1:2], want[1:2], ref[1:2], names=("grad_value",))
        scale = 1.0 + want[1].abs().max().item()
        assert max_err(first[1], second[1]) <= 4 * REL_TOL[dtype] * scale


def test_inconsistent_levels_never_read_out_of_bounds():
    """Shapes the host cannot check without a sync: a level that leaves value's S rows is read as empty."""
    value, _, _, locations, weights = random_inputs(1, 8, 2, 8, [(4, 4), (2, 2), (1, 1)], 2, torch.float32)
    # value has S = 21 rows; level 1 claims 16 rows from 16, level 2 starts before 0.
    bad_shapes = torch.tensor([[4, 4], [4, 4], [1, 1]], device="cuda")
    bad_starts = torch.tensor([0, 16, -5], device="cuda")
    grad_output = torch.randn(1, 8, 16, device="cuda")
    out = _op().ms_deform_attn(value, bad_shapes, bad_starts, locations, weights)
    grads = _op().ms_deform_attn_backward(grad_output, value, bad_shapes, bad_starts, locations, weights)
    torch.cuda.synchronize()
    only_first = weights.clone()
    only_first[:, :, :, 1:] = 0
    expected = oracle(value, bad_shapes[:1], bad_starts[:1], locations[:, :, :, :1], only_first[:, :, :, :1])
    assert max_err(out.cpu().double(), expected) <= 1e-5
    assert all(torch.isfinite(g).all() for g in grads)
    assert not grads[2][:, :, :, 1:].any() and not grads[1][:, :, :, 1:].any()


@contextlib.contextmanager
def deterministic_algorithms(warn_only=False):
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def assert_deterministic_path(inputs, grad_output, dtype):
    """Deterministic backward (sort + gather for grad_value): bitwise repeatable, within the oracle tolerance,
    close to the atomic path for grad_value and identical to it for the other two gradients (same kernel)."""
    with deterministic_algorithms():
        first = forward_backward(cuda_op, inputs, grad_output)
        second = forward_backward(cuda_op, inputs, grad_output)
    for name, a, b in zip(("out", "grad_value", "grad_locations", "grad_weights"), first, second):
        assert torch.equal(a, b), f"{name} ({dtype}) differs between two deterministic runs"
    want = forward_backward(oracle, inputs, grad_output, as_double=True)
    ref = forward_backward(ms_deform_attn_reference, inputs, grad_output) if dtype != torch.float64 else want
    assert_close_to_oracle(dtype, first, want, ref)
    fast = forward_backward(cuda_op, inputs, grad_output)
    scale = 1.0 + want[1].abs().max().item()
    assert max_err(first[1], fast[1]) <= 4 * REL_TOL[dtype] * scale, "grad_value: deterministic vs atomic path"
    assert torch.equal(first[2], fast[2]) and torch.equal(first[3], fast[3])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", list(CASES))
def test_deterministic_backward(case, dtype):
    N, Q, M, D, shapes, P = CASES[case]
    inputs = random_inputs(N, Q, M, D, shapes, P, dtype)
    grad_output = torch.randn(N, Q, M * D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert_deterministic_path(inputs, grad_output.to("cuda", dtype), dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("float32", "float16"))
def test_deterministic_backward_under_heavy_contention(dtype):
    """Every sample lands on the same four pixels: runs of 4096 * 2 * 4 entries per destination row, where the
    atomic path's order (and so its rounding) changes from run to run."""
    N, Q, M, D, shapes, P = 1, 4096, 2, 32, [(4, 4), (2, 2)], 4
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(N, Q, M, D, shapes, P, dtype)
    locations = torch.full_like(locations, 0.4)
    grad_output = torch.randn(N, Q, M * D, generator=torch.Generator().manual_seed(2)).to("cuda", dtype) / Q
    assert_deterministic_path((value, spatial_shapes, level_start_index, locations, weights), grad_output, dtype)


def test_deterministic_backward_edge_cases():
    """No alert (error or warning) from the deterministic path; every corner off the map gives zero runs; an
    inconsistent level is read as empty; a misaligned grad_output takes the narrow vectors; empty batch."""
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(
        1, 6, 2, 8, [(4, 4), (2, 2)], 2, torch.float32
    )
    with deterministic_algorithms(warn_only=True), warnings.catch_warnings():
        warnings.simplefilter("error")
        outside = _op().ms_deform_attn_backward(
            torch.randn(1, 6, 16, device="cuda"), value, spatial_shapes, level_start_index, locations + 5.0, weights
        )
        assert not outside[0].any() and not outside[1].any() and not outside[2].any()
        bad_starts = torch.tensor([0, 17], device="cuda")  # level 1 would end past S = 20
        bad = _op().ms_deform_attn_backward(
            torch.randn(1, 6, 16, device="cuda"), value, spatial_shapes, bad_starts, locations, weights
        )
        assert not bad[0][:, 16:].any() and not bad[1][:, :, :, 1:].any()
        storage = torch.randn(1 + 6 * 16, device="cuda")
        misaligned = storage[1:].view(1, 6, 16)
        got = _op().ms_deform_attn_backward(misaligned, value, spatial_shapes, level_start_index, locations, weights)
        want = _op().ms_deform_attn_backward(
            misaligned.clone(), value, spatial_shapes, level_start_index, locations, weights
        )
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        empty = random_inputs(0, 6, 2, 8, [(4, 4)], 2, torch.float32)
        grads = _op().ms_deform_attn_backward(torch.zeros(0, 6, 16, device="cuda"), *empty)
        assert [tuple(g.shape) for g in grads] == [(0, 16, 2, 8), (0, 6, 2, 1, 2, 2), (0, 6, 2, 1, 2)]


def test_gradcheck_float64():
    inputs = random_inputs(1, 3, 2, 3, [(3, 4), (2, 2)], 2, torch.float64)
    value, spatial_shapes, level_start_index, locations, weights = (
        t.detach().requires_grad_(t.is_floating_point()) for t in inputs
    )
    assert torch.autograd.gradcheck(
        lambda v, loc, a: cuda_op(v, spatial_shapes, level_start_index, loc, a),
        (value, locations, weights),
        eps=1e-6,
        atol=1e-6,
    )


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16), ids=("float32", "float16"))
def test_opcheck(dtype):
    value, spatial_shapes, level_start_index, locations, weights = random_inputs(2, 5, 2, 8, [(3, 4), (2, 2)], 2, dtype)
    args = (
        value.requires_grad_(),
        spatial_shapes,
        level_start_index,
        locations.requires_grad_(),
        weights.requires_grad_(),
    )
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    inputs = random_inputs(2, 7, 2, 16, [(5, 4), (2, 3)], 2, torch.float32)
    grad_output = torch.randn(2, 7, 32, device="cuda")
    eager = forward_backward(cuda_op, inputs, grad_output)
    compiled_op = torch.compile(
        lambda v, s, i, loc, a: torch.ops.deformable_detr.ms_deform_attn(v, s, i, loc, a) * 2, fullgraph=True
    )
    compiled_api = torch.compile(cuda_op, fullgraph=True)
    via_op = forward_backward(compiled_op, inputs, grad_output)  # every output and gradient doubles
    via_api = forward_backward(compiled_api, inputs, grad_output)
    for e, o, a in zip(eager, via_op, via_api):
        bound = 1e-6 * (1 + e.abs().max().item())
        assert max_err(2 * e, o) <= 2 * bound
        assert max_err(e, a) <= bound


def test_current_stream_is_used():
    inputs = random_inputs(2, 64, 4, 32, [(8, 8), (4, 4)], 4, torch.float32)
    expected = cuda_op(*inputs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = cuda_op(*inputs)
    side.synchronize()
    assert torch.equal(out, expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_second_device_index():
    N, Q, M, D, shapes, P = CASES["d32_1x1_level"]
    for dtype in (torch.float32, torch.bfloat16):
        inputs = random_inputs(N, Q, M, D, shapes, P, dtype, device="cuda:0")
        grad_output = torch.randn(N, Q, M * D, device="cuda:0").to(dtype)
        on_0 = forward_backward(cuda_op, inputs, grad_output)
        with torch.cuda.device(0):  # current device stays 0: the kernel must follow the tensors to device 1
            on_1 = forward_backward(cuda_op, [t.to("cuda:1") for t in inputs], grad_output.to("cuda:1"))
        for a, b in zip(on_0, on_1):
            assert max_err(a, b) <= REL_TOL[dtype] * (1 + a.abs().max().item())


_SANITIZER_SCRIPT = textwrap.dedent(
    """
    import torch
    import deformable_detr  # noqa: F401 (registers the ops)
    op = torch.ops.deformable_detr
    shapes = torch.tensor([[5, 7], [2, 3], [1, 1]], device="cuda")
    starts = torch.tensor([0, 35, 41], device="cuda")
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        pos = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
        for D in (1, 7, 32, 256):
            value = torch.randn(2, 42, 3, D, device="cuda").to(dtype)
            loc = (torch.rand(2, 9, 3, 3, 2, 2, device="cuda") * 1.6 - 0.3).to(pos)
            att = torch.rand(2, 9, 3, 3, 2, device="cuda").to(pos)
            out = op.ms_deform_attn(value, shapes, starts, loc, att)
            op.ms_deform_attn_backward(torch.randn_like(out), value, shapes, starts, loc, att)
            shifted = torch.empty(value.numel() + 1, device="cuda", dtype=dtype)[1:].view(value.shape)
            shifted.copy_(value)
            op.ms_deform_attn_backward(out, shifted, shapes, starts, loc, att)
        bad = torch.tensor([0, 40, 50], device="cuda")
        op.ms_deform_attn_backward(out, value, torch.tensor([[5, 7], [3, 3], [9, 9]], device="cuda"), bad, loc, att)
    torch.cuda.synchronize()
    print("sanitizer script done")
    """
)


def _compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = os.path.join(home, "bin", "compute-sanitizer")
    return candidate if os.path.exists(candidate) else None


def _already_sanitized():
    """True inside a compute-sanitizer run (gpu_check.sh sanitizes this whole file): a nested one cannot attach."""
    injected = os.environ.get("CUDA_INJECTION64_PATH", "") + os.environ.get("LD_PRELOAD", "")
    return "sanitizer" in injected.lower() or any("SANITIZER" in key for key in os.environ)


@pytest.mark.slow
def test_compute_sanitizer_memcheck_clean():
    if _already_sanitized():
        pytest.skip("already running under compute-sanitizer")
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (set CUDA_HOME)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Without the caching allocator every tensor is its own allocation, so memcheck sees any stray byte.
    env = dict(
        os.environ,
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTORCH_NO_CUDA_MEMORY_CACHING="1",
    )
    result = subprocess.run(
        [sanitizer, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, "-c", _SANITIZER_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=400,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0 and "sanitizer script done" in log, log[-4000:]
    assert "ERROR SUMMARY: 0 errors" in log, log[-4000:]


def test_nan_and_infinite_locations():
    """NaN rule (README, "Backends"): a NaN x or y makes its head's output NaN in every channel and its location / weight
    gradients NaN, adding nothing to grad_value; +-inf and 1e30 locations are outside the map (zero). The same rule
    runs on the CPU under the SIMT emulator (tests/test_simt_msda.py::test_nan_inf_locations)."""
    value, shapes, starts, locations, weights = random_inputs(1, 6, 2, 4, [(4, 5), (2, 3)], 2, torch.float32)
    locations[0, 0, 0, 0, 0, 0] = float("nan")
    locations[0, 2, 0, 0, 1, 0] = float("inf")
    locations[0, 4, 0, 0, 0, 0] = 1e30
    nan_sample = locations.isnan().any(-1)
    moved = locations.clone()
    moved[nan_sample | ~torch.isfinite(moved).all(-1) | (moved.abs() > 10).any(-1)] = -5.0
    grad_output = torch.randn(1, 6, 8, device="cuda")
    out = _op().ms_deform_attn(value, shapes, starts, locations, weights).reshape(1, 6, 2, 4)
    grads = _op().ms_deform_attn_backward(grad_output, value, shapes, starts, locations, weights)
    clean_out = _op().ms_deform_attn(value, shapes, starts, moved, weights).reshape(1, 6, 2, 4)
    clean = _op().ms_deform_attn_backward(grad_output, value, shapes, starts, moved, weights)
    nan_head = nan_sample.any(-1).any(-1)
    assert out[nan_head].isnan().all() and torch.equal(out[~nan_head], clean_out[~nan_head])
    assert grads[1][nan_sample].isnan().all() and grads[2][nan_sample].isnan().all()
    assert torch.equal(grads[1][~nan_sample], clean[1][~nan_sample])
    assert torch.allclose(grads[0], clean[0], rtol=0, atol=1e-6)
