"""One MSDA case through the SIMT emulator (tests/simt/), judged like tests/test_msda_cuda.py judges the GPU:
float64 oracle, half types within 2 x the same-dtype reference error + REL_TOL. Every case runs under two schedule
seeds x two poison bytes, which must agree bitwise (forward, the atomic-free gradients, the deterministic
grad_value); the atomic grad_value may differ only in summation order. Shared by tests/test_simt_msda.py (quick
campaign) and tests/support/simt_campaign.py (long campaign)."""

from __future__ import annotations

import functools
import itertools

import torch

from deformable_detr.ops.reference import ms_deform_attn_reference
from support.cuda_cases import REL_TOL, assert_close_to_oracle, forward_backward, max_err, oracle, random_inputs
from support.oracle import ms_deform_attn_oracle
from support.simt_emulator import run

# (seed, poison): two schedules, two poison bytes.
SCHEDULES = ((1, 0xA5), (2, 0x5A))


def emulated(inputs, grad_output, deterministic, **config):
    """One forward + one backward under the emulator: [out, grad_value, grad_locations, grad_weights].
    ``inputs``: the five op tensors, optionally followed by the layout (point_start or None, discrete); ``config``:
    simt_emulator.run's (seed, poison, placement, arch, min_threads)."""
    value, shapes, starts, locations, weights = inputs[:5]
    layout = dict(zip(("point_start", "discrete"), inputs[5:]))
    out = run("ms_deform_attn", value, shapes, starts, locations, weights, **layout, **config)
    grads = run(
        "ms_deform_attn_backward",
        grad_output,
        value,
        shapes,
        starts,
        locations,
        weights,
        deterministic,
        **layout,
        **config,
    )
    return [out, *grads]


def bitwise_equal(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.numel() else True


def emulate_all(inputs, grad_output, repeat=True, **config):
    """{deterministic: [out, grad_value, grad_locations, grad_weights]} after the two-schedule agreement checks
    (repeat: also rerun the deterministic path under the first schedule, which must be bitwise equal)."""
    results = {}
    for deterministic in (False, True):
        runs = [emulated(inputs, grad_output, deterministic, seed=s, poison=p, **config) for s, p in SCHEDULES]
        names = ("out", "grad_value", "grad_locations", "grad_weights")
        for name, a, b in zip(names, *runs):
            if name == "grad_value" and not deterministic:
                continue  # atomics: order-dependent rounding, judged against the oracle below
            assert bitwise_equal(a.contiguous(), b.contiguous()), f"{name} differs between schedules/poison {config}"
        if deterministic and repeat:  # the same schedule twice: bitwise equal as well
            seed, poison = SCHEDULES[0]
            again = emulated(inputs, grad_output, True, seed=seed, poison=poison, **config)
            assert all(bitwise_equal(a, b) for a, b in zip(runs[0], again))
        results[deterministic] = [t.double() for t in runs[0]]
    return results


def layout_inputs(N, Q, M, D, shapes, P, dtype, seed=0, counts=None, discrete=False):
    """random_inputs plus the layout: ``counts`` (points per level) gives locations (N, Q, M, K, 2), weights
    (N, Q, M, K) and an (L + 1,) point_start table; returns (inputs + [point_start, discrete], oracle, reference)."""
    K = sum(counts) if counts is not None else P
    inputs = list(random_inputs(N, Q, M, D, shapes, K, dtype, device="cpu", seed=seed))
    point_start = None
    if counts is not None:
        # Level 0's draw of K points serves as the K points of the row (any numbers will do).
        inputs[3], inputs[4] = inputs[3][:, :, :, 0].contiguous(), inputs[4][:, :, :, 0].contiguous()
        point_start = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int64)
    layout = dict(points_per_level=counts, sampling="discrete" if discrete else "bilinear")
    fn = functools.partial(ms_deform_attn_oracle, **layout)
    ref = functools.partial(ms_deform_attn_reference, **layout)
    return [*inputs, point_start, discrete], fn, ref


def check_case(N, Q, M, D, shapes, P, dtype, seed=0, view=None, repeat=True, counts=None, discrete=False, **config):
    """Runs one case, asserts it, returns {output name: max abs error vs the oracle}. ``counts`` / ``discrete``:
    the op's points_per_level layout (P is then ignored) and discrete sampling, judged by tests/support/oracle.py."""
    if counts is None and not discrete:
        inputs = list(random_inputs(N, Q, M, D, shapes, P, dtype, device="cpu", seed=seed))
        fn, ref_fn = oracle, ms_deform_attn_reference
    else:
        inputs, fn, ref_fn = layout_inputs(N, Q, M, D, shapes, P, dtype, seed, counts, discrete)
    if view is not None:
        inputs = view(inputs)
    grad_output = torch.randn(N, Q, M * D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grad_output = grad_output.to(dtype)
    want = forward_backward(fn, inputs[:5], grad_output, as_double=True)
    ref = forward_backward(ref_fn, inputs[:5], grad_output) if dtype != torch.float64 else want
    results = emulate_all(inputs, grad_output, repeat=repeat, **config)
    errors = {}
    for got in results.values():
        assert_close_to_oracle(dtype, got, want, ref)
        for name, g, w in zip(("out", "grad_value", "grad_locations", "grad_weights"), got, want):
            errors[name] = max(errors.get(name, 0.0), max_err(g, w))
    # Both backward paths agree with each other within the dtype tolerance (grad_value: summation order only).
    scale = 1.0 + want[1].abs().max().item() if want[1].numel() else 1.0
    assert max_err(results[False][1], results[True][1]) <= 4 * REL_TOL[dtype] * scale
    return errors


def max_vec(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def launch_shape_cases(dtype):
    """D values that make launch_shape pick every (VEC, group size, tiles) for `dtype` (threshold override 1, so
    the widest aligned vector is kept): D = VEC x k with k odd gives VEC lanes-wide vectors and next_pow2(k) lanes."""
    vec = max_vec(dtype)
    cases = [vec * 2]  # two lanes of the widest vector
    while vec >= 1:
        for k in (1, 3, 7, 15, 31, 33):
            cases.append(vec * k)
        vec //= 2
    return cases


__all__ = ["SCHEDULES", "check_case", "emulate_all", "launch_shape_cases", "layout_inputs", "max_vec", "bitwise_equal"]


def offset_view(inputs):
    """``inputs`` with ``value`` moved one element into a larger buffer: misaligned storage, as a user's slice gives."""
    value = inputs[0]
    flat = torch.empty(value.numel() + 1, dtype=value.dtype)
    shifted = flat[1:].view(value.shape)
    shifted.copy_(value)
    return [shifted, *inputs[1:]]
