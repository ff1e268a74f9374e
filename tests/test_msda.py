"""MSDA operator: every available backend vs the float64 oracle, gradients, dtypes, edge cases, validation,
opcheck and torch.compile. Parametrized over ``available_backends("cpu")`` so a new backend is tested by
appearing there (CUDA backends: tests/test_msda_cuda.py, Triton: tests/test_msda_triton.py)."""

from __future__ import annotations

import pytest
import torch
from support.oracle import make_inputs, make_level_tensors, oracle_output_and_grads, output_and_grads, rel_err

import deformable_detr as dd
from deformable_detr._extension import extension_loaded, has_kernel

BACKENDS = [b for b in dd.available_backends("cpu") if b != "triton"]
COMPILED = [b for b in BACKENDS if b != "pytorch"]

# (N, level shapes, M, D, Q, P): 1x1 levels, non-square maps, D not a power of two, P = 1, M = 1.
CASES = {
    "basic": (2, [(6, 4), (3, 2)], 2, 8, 5, 2),
    "one_by_one": (1, [(1, 1), (2, 3), (1, 1)], 3, 4, 7, 3),
    "non_square_d7": (2, [(5, 9), (3, 1)], 2, 7, 6, 2),
    "d1_p1": (3, [(4, 4), (2, 2)], 1, 1, 4, 1),
    "d32": (1, [(8, 6), (4, 3), (2, 2), (1, 1)], 2, 32, 9, 4),
    "d16_m8": (1, [(5, 5), (3, 3)], 8, 16, 3, 2),
    "d33": (1, [(3, 7)], 2, 33, 4, 2),
}


_rel_err = rel_err
_grads = output_and_grads
_oracle_grads = oracle_output_and_grads


def test_extension_is_built():
    # CI builds the extension with `make setup`; a silent fall-back to the reference would hide a broken build.
    assert extension_loaded(), dd._extension.load_error()
    assert has_kernel("ms_deform_attn", "CPU") and has_kernel("ms_deform_attn_backward", "CPU")
    assert "cpu" in BACKENDS


def test_available_backends():
    backends = dd.available_backends("cpu")
    assert backends[-1] == "pytorch"
    assert "cuda" not in backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_gradients_match_oracle(backend, case, dtype):
    N, shapes, M, D, Q, P = CASES[case]
    value, ss, lsi, loc, attn = make_inputs(N, shapes, M, D, Q, P, dtype=dtype, seed=hash(case) % 1000)
    grad_out = torch.randn(N, Q, M * D, dtype=torch.float64)
    out, grads = _grads(lambda *a: dd.ms_deform_attn(*a, backend=backend), value, ss, lsi, loc, attn, grad_out)
    ref_out, ref_grads = _oracle_grads(value, ss, lsi, loc, attn, grad_out)
    assert out.dtype == dtype and out.shape == (N, Q, M * D)
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    assert _rel_err(out, ref_out) <= tol
    for name, g, ref in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads):
        assert g.dtype == dtype, name
        assert _rel_err(g, ref) <= tol, f"grad {name}: {_rel_err(g, ref)}"


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_within_twice_reference_error(backend, dtype):
    """flash-attention's rule: error vs float64 <= 2x the error of the PyTorch reference in the same dtype."""
    N, shapes, M, D, Q, P = CASES["d32"]
    value, ss, lsi, loc, attn = make_inputs(N, shapes, M, D, Q, P, dtype=dtype, seed=3)
    grad_out = torch.randn(N, Q, M * D, dtype=torch.float64).to(dtype).double()
    out, grads = _grads(lambda *a: dd.ms_deform_attn(*a, backend=backend), value, ss, lsi, loc, attn, grad_out)
    ref_out, ref_grads = _grads(dd.ms_deform_attn_reference, value, ss, lsi, loc, attn, grad_out)
    exact_out, exact_grads = _oracle_grads(value, ss, lsi, loc, attn, grad_out)
    assert out.dtype == dtype
    atol = 1e-3 if dtype == torch.float16 else 1e-2
    assert (out.double() - exact_out).abs().max() <= 2 * (ref_out.double() - exact_out).abs().max() + atol
    assert grads[0].dtype == dtype and grads[1].dtype == torch.float32 and grads[2].dtype == torch.float32
    for name, g, r, e in zip(("value", "sampling_locations", "attention_weights"), grads, ref_grads, exact_grads):
        err, ref_err = (g.double() - e).abs().max(), (r.double() - e).abs().max()
        assert err <= 2 * ref_err + atol * e.abs().max().clamp_min(1), f"grad {name}: {err} vs reference {ref_err}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,Q", [(0, 5), (2, 0), (0, 0)])
def test_empty_batch_or_queries(backend, N, Q):
    value, ss, lsi, loc, attn = make_inputs(max(N, 1), [(3, 2), (1, 1)], 2, 4, max(Q, 1), 2)
    value, loc, attn = value[:N], loc[:N, :Q], attn[:N, :Q]
    value.requires_grad_(True)
    loc.requires_grad_(True)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
    assert out.shape == (N, Q, 8)
    out.sum().backward()
    assert value.grad.shape == value.shape and bool((value.grad == 0).all())
    assert loc.grad.shape == loc.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    N, shapes, M, D, Q, P = CASES["non_square_d7"]
    value, ss, lsi, loc, attn = make_inputs(N, shapes, M, D, Q, P, dtype=torch.float64)
    # Same numbers, strided memory: value with heads/channels swapped in memory, locations/weights transposed.
    value_nc = value.transpose(2, 3).contiguous().transpose(2, 3)
    loc_nc = loc.transpose(0, 1).contiguous().transpose(0, 1)
    attn_nc = attn.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    assert not value_nc.is_contiguous() and not loc_nc.is_contiguous() and not attn_nc.is_contiguous()
    grad_out = torch.randn(N, Q, M * D, dtype=torch.float64)
    out, grads = _grads(
        lambda *a: dd.ms_deform_attn(*a, backend=backend),
        value_nc,
        ss,
        lsi,
        loc_nc,
        attn_nc,
        grad_out.t().contiguous().t() if grad_out.dim() == 2 else grad_out,
    )
    ref_out, ref_grads = _oracle_grads(value, ss, lsi, loc, attn, grad_out)
    assert _rel_err(out, ref_out) <= 1e-9
    for g, ref in zip(grads, ref_grads):
        assert _rel_err(g, ref) <= 1e-9


@pytest.mark.parametrize("backend", BACKENDS)
def test_locations_far_outside_contribute_zero(backend):
    value, ss, lsi, loc, attn = make_inputs(1, [(4, 5), (2, 2)], 2, 3, 6, 2, dtype=torch.float64)
    loc = torch.full_like(loc, 3.0)
    loc[..., 0] = -2.5
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
    assert bool((out == 0).all())


@pytest.mark.parametrize("backend", COMPILED)
def test_gradcheck_float64(backend):
    value, ss, lsi, loc, attn = make_inputs(2, [(3, 4), (2, 1)], 2, 3, 3, 2, dtype=torch.float64, seed=7)
    inputs = tuple(t.requires_grad_(True) for t in (value, loc, attn))
    assert torch.autograd.gradcheck(
        lambda v, l, a: dd.ms_deform_attn(v, ss, lsi, l, a, backend=backend), inputs, eps=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_deterministic(backend, dtype):
    # N = 1 with M = 1 under 4 threads: fewer (batch, head) slices than threads, so the CPU kernel's chunked
    # private-buffer path runs (M = 4 takes the direct path); both must be repeatable and match the oracle.
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        for M in (1, 4):
            value, ss, lsi, loc, attn = make_inputs(1, [(6, 6), (3, 3)], M, 8, 40, 4, dtype=dtype, seed=11)
            grad_out = torch.randn(1, 40, M * 8, dtype=torch.float64).to(dtype).double()
            results = [
                _grads(lambda *a: dd.ms_deform_attn(*a, backend=backend), value, ss, lsi, loc, attn, grad_out)[1][0]
                for _ in range(2)
            ]
            assert torch.equal(results[0], results[1])
            exact = _oracle_grads(value, ss, lsi, loc, attn, grad_out)[1][0]
            assert _rel_err(results[0], exact) <= (2e-4 if dtype == torch.float32 else 1e-2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
def test_opcheck():
    value, ss, lsi, loc, attn = make_inputs(2, [(4, 3), (2, 2)], 2, 5, 6, 2, seed=5)
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    torch.library.opcheck(torch.ops.deformable_detr.ms_deform_attn.default, (value, ss, lsi, loc, attn))
    grad_out = torch.randn(2, 6, 10)
    torch.library.opcheck(
        torch.ops.deformable_detr.ms_deform_attn_backward.default,
        (grad_out, value.detach(), ss, lsi, loc.detach(), attn.detach()),
    )


@pytest.mark.parametrize("sampling", ["bilinear", "discrete"])
@pytest.mark.parametrize("backend", BACKENDS)  # the pytorch reference too: its level sizes are traced symbols
def test_torch_compile_fullgraph(backend, sampling):
    torch._dynamo.reset()
    value, ss, lsi, loc, attn = make_inputs(2, [(4, 3), (2, 2)], 2, 8, 5, 2, seed=9)

    def fn(v, l, a):
        return (dd.ms_deform_attn(v, ss, lsi, l, a, backend=backend, sampling=sampling) * 2).sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    v1, l1, a1 = (t.clone().requires_grad_(True) for t in (value, loc, attn))
    v2, l2, a2 = (t.clone().requires_grad_(True) for t in (value, loc, attn))
    out_c = compiled(v1, l1, a1)
    out_e = fn(v2, l2, a2)
    torch.testing.assert_close(out_c, out_e)
    out_c.sum().backward()
    out_e.sum().backward()
    for g_c, g_e in ((v1.grad, v2.grad), (l1.grad, l2.grad), (a1.grad, a2.grad)):
        torch.testing.assert_close(g_c, g_e)


def _valid_inputs():
    return make_inputs(2, [(4, 3), (2, 2)], 2, 5, 6, 2)


def _mutate(kind):
    value, ss, lsi, loc, attn = _valid_inputs()
    if kind == "value_rank":
        value = value[0]
    elif kind == "value_int":
        value = value.long()
    elif kind == "spatial_shapes_shape":
        ss = ss[:, :1]
    elif kind == "spatial_shapes_float":
        ss = ss.float()
    elif kind == "sum_hw_mismatch":
        ss = ss.clone()
        ss[0, 0] = 5
    elif kind == "level_count_mismatch":
        lsi = lsi[:1]
    elif kind == "level_start_wrong":
        lsi = lsi + 1
    elif kind == "locations_last_dim":
        loc = torch.cat([loc, loc[..., :1]], -1)
    elif kind == "locations_rank":
        loc = loc[..., 0]
    elif kind == "locations_levels":
        loc = loc[:, :, :, :1]
    elif kind == "locations_int":
        loc = loc.long()
    elif kind == "weights_shape":
        attn = attn[..., :1]
    elif kind == "weights_int":
        attn = attn.long()
    return value, ss, lsi, loc, attn


BAD_INPUTS = {
    "value_rank": "value",
    "value_int": "value",
    "spatial_shapes_shape": "spatial_shapes",
    "spatial_shapes_float": "spatial_shapes",
    "sum_hw_mismatch": "spatial_shapes",
    "level_count_mismatch": "level_start_index",
    "level_start_wrong": "level_start_index",
    "locations_last_dim": "sampling_locations",
    "locations_rank": "sampling_locations",
    "locations_levels": "sampling_locations",
    "locations_int": "sampling_locations",
    "weights_shape": "attention_weights",
    "weights_int": "attention_weights",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(BAD_INPUTS))
def test_malformed_input_raises_naming_argument(backend, kind):
    with pytest.raises((ValueError, TypeError), match=BAD_INPUTS[kind]):
        dd.ms_deform_attn(*_mutate(kind), backend=backend)


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
@pytest.mark.parametrize(
    "kind",
    [
        "value_rank",
        "sum_hw_mismatch",
        "level_start_wrong",
        "locations_last_dim",
        "weights_shape",
        "spatial_shapes_float",
    ],
)
def test_raw_op_rejects_malformed_input(kind):
    # Direct torch.ops calls skip the Python wrapper; the C++ checks must still refuse (no crash, no garbage),
    # with the exception type the wrapper raises for the same fault (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE).
    with pytest.raises((ValueError, TypeError)) as from_python:
        dd.ms_deform_attn(*_mutate(kind), backend="cpu")
    with pytest.raises(from_python.type, match=BAD_INPUTS[kind]):
        torch.ops.deformable_detr.ms_deform_attn(*_mutate(kind))


def test_unavailable_backend_raises_clear_error():
    value, ss, lsi, loc, attn = _valid_inputs()
    with pytest.raises(RuntimeError, match="cuda"):
        dd.ms_deform_attn(value, ss, lsi, loc, attn, backend="cuda")
    with pytest.raises(RuntimeError, match="unknown backend"):
        dd.ms_deform_attn(value, ss, lsi, loc, attn, backend="nope")


def test_level_tensor_helper_matches_contract():
    ss, lsi = make_level_tensors([(4, 3), (2, 2), (1, 1)])
    assert lsi.tolist() == [0, 12, 16]


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
def test_baseline_cpu_kernel_copy_matches_oracle():
    """The CPU kernels are compiled twice (baseline ISA and AVX2+FMA, picked at run time); the in-process tests
    exercise the copy this machine picks, this one forces the baseline copy in a subprocess."""
    import os
    import subprocess
    import sys

    script = """
import torch, deformable_detr as dd
from support.oracle import make_inputs, ms_deform_attn_oracle
for D, dtype in ((32, torch.float32), (7, torch.float64), (16, torch.bfloat16)):
    value, ss, lsi, loc, attn = make_inputs(2, [(5, 4), (2, 3), (1, 1)], 2, D, 6, 3, dtype=dtype, seed=D)
    value.requires_grad_(True); loc.requires_grad_(True)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu")
    out.float().sum().backward()
    v64, l64 = value.detach().double().requires_grad_(True), loc.detach().double().requires_grad_(True)
    ref = ms_deform_attn_oracle(v64, ss, lsi, l64, attn.double())
    ref.sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    for a, b in ((out, ref), (value.grad, v64.grad), (loc.grad, l64.grad)):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < tol, (D, dtype, err)
print("baseline-ok")
"""
    env = dict(os.environ, DEFORMABLE_DETR_DISABLE_AVX2="1")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=tests_dir, capture_output=True, text=True)
    assert result.returncode == 0 and "baseline-ok" in result.stdout, result.stderr[-3000:]


def _built_with_cuda_expected() -> bool:
    """setup.py builds the CUDA kernels whenever torch is a CUDA build and a toolkit is found (see setup.py)."""
    import os
    import shutil

    if os.environ.get("DEFORMABLE_DETR_SKIP_CUDA", "0") == "1" or torch.version.cuda is None:
        return False
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


@pytest.mark.skipif(not _built_with_cuda_expected(), reason="no CUDA toolkit: the extension is CPU-only by design")
def test_cuda_kernels_registered_when_toolkit_present():
    # The CUDA kernels are compiled in CI even without a GPU; their registration is visible without one.
    for op in ("ms_deform_attn", "ms_deform_attn_backward"):
        assert has_kernel(op, "CUDA"), f"deformable_detr::{op} has no CUDA kernel: was the extension built with CUDA?"


def test_cuda_backends_unavailable_without_a_device():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert dd.available_backends("cuda") == ["pytorch"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_backward_honours_deterministic_algorithms(backend):
    """Under use_deterministic_algorithms the CUDA backward switches to its sort + gather grad_value (no atomics):
    it must succeed, bitwise repeatably. The Triton backward sums with float atomics and has no such path: it must
    refuse (or warn in warn_only mode), as PyTorch's own atomic kernels do; its forward stays allowed."""
    if backend not in dd.available_backends("cuda"):
        pytest.skip(f"{backend} backend unavailable")
    value, ss, lsi, loc, attn = make_inputs(1, [(4, 4), (2, 2)], 2, 8, 5, 2, device="cuda")
    value.requires_grad_(True)
    loc.requires_grad_(True)
    attn.requires_grad_(True)
    previous, previous_warn = (
        torch.are_deterministic_algorithms_enabled(),
        (torch.is_deterministic_algorithms_warn_only_enabled()),
    )

    def grads():
        for t in (value, loc, attn):
            t.grad = None
        out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
        (out * torch.linspace(-1, 1, out.numel(), device="cuda").view_as(out)).sum().backward()
        return [t.grad.clone() for t in (value, loc, attn)]

    try:
        torch.use_deterministic_algorithms(True)
        if backend == "cuda":
            first, second = grads(), grads()
            assert all(torch.equal(a, b) for a, b in zip(first, second))
            return
        out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
        with pytest.raises(RuntimeError, match="determinis"):
            out.sum().backward()
        torch.use_deterministic_algorithms(True, warn_only=True)
        out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
        with pytest.warns(UserWarning):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
