"""The drop-in functions of ``deformable_detr.integrations``: ``deformable_attention_core_func_v2`` (RT-DETRv2 /
D-FINE / DEIM signature, both value layouts, ragged points per level, "default" and "discrete") and
``multi_scale_deformable_attention`` (the 4-argument function), judged against transformers' own pure-PyTorch
functions in float64 (output and every input gradient), plus the level-table cache and the argument errors."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from deformable_detr.integrations import (
    deformable_attention_core_func_v2,
    level_tables,
    multi_scale_deformable_attention,
)

SHAPES = [(6, 9), (3, 5), (1, 1), (2, 3)]  # non-square, a 1x1 level
M, D, Q = 3, 5, 7


def _hf(module: str, name: str):
    pytest.importorskip("transformers")
    return getattr(importlib.import_module(f"transformers.models.{module}"), name)


def _inputs(points, seed=0, spread=(-0.3, 1.3)):
    g = torch.Generator().manual_seed(seed)
    S, K = sum(h * w for h, w in SHAPES), sum(points)
    value = torch.randn(2, S, M, D, generator=g, dtype=torch.float64)
    locations = torch.rand(2, Q, M, K, 2, generator=g, dtype=torch.float64) * (spread[1] - spread[0]) + spread[0]
    weights = torch.rand(2, Q, M, K, generator=g, dtype=torch.float64)
    return value, locations, weights


def _output_and_grads(fn, value, shapes, locations, weights, grad_out, *args):
    leaves = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    out = fn(leaves[0], shapes, leaves[1], leaves[2], *args)
    grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]


@contextlib.contextmanager
def _op_keywords():
    op_module = importlib.import_module("deformable_detr.ops.ms_deform_attn")
    original, seen = op_module.ms_deform_attn, []

    def spy(*args, **kwargs):
        seen.append((args[3].dim(), kwargs))
        return original(*args, **kwargs)

    op_module.ms_deform_attn = spy
    try:
        yield seen
    finally:
        op_module.ms_deform_attn = original


@pytest.mark.parametrize("method", ["default", "discrete"])
@pytest.mark.parametrize("points", [[2, 4, 1, 3], [3, 3, 3, 3], [2, 0, 1, 2]], ids=["ragged", "uniform", "empty-level"])
def test_v2_equals_transformers_v2_function_float64(points, method):
    reference = _hf("rt_detr_v2.modeling_rt_detr_v2", "multi_scale_deformable_attention_v2")
    value, locations, weights = _inputs(points)
    grad_out = torch.randn(2, Q, M * D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    args = (points, method)
    expected, expected_grads = _output_and_grads(reference, value, SHAPES, locations, weights, grad_out, *args)
    with _op_keywords() as seen:
        actual, grads = _output_and_grads(
            deformable_attention_core_func_v2, value, SHAPES, locations, weights, grad_out, *args
        )
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for name, a, e in zip(("value", "locations", "weights"), grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12, msg=f"grad {name}")
    uniform = len(set(points)) == 1
    assert len(seen) == 1
    dim, kwargs = seen[0]
    # Uniform points take the 6-D layout (the fast path); ragged ones the points-per-level table.
    assert dim == (6 if uniform else 5) and ("points_per_level" in kwargs) != uniform
    assert kwargs.get("sampling", "bilinear") == ("discrete" if method == "discrete" else "bilinear")


@pytest.mark.parametrize("method", ["default", "discrete"])
def test_v2_accepts_d_fine_per_level_value_and_a_shapes_tensor(method):
    """D-FINE / DEIM pass value as per-level (N, M, D, H_l*W_l) views of one (N, M, D, S) tensor."""
    reference = _hf("d_fine.modeling_d_fine", "multi_scale_deformable_attention_v2")
    points = [2, 4, 1, 3]
    value, locations, weights = _inputs(points, seed=1)
    square = [(h, h) for h, _ in SHAPES]  # D-FINE's own code clamps both discrete coordinates to H - 1
    value = value[:, : sum(h * w for h, w in square)]
    expected = reference(value, square, locations, weights, points, method)
    per_level = value.permute(0, 2, 3, 1).split([h * w for h, w in square], dim=-1)
    for levels in (per_level, list(per_level)):
        actual = deformable_attention_core_func_v2(levels, square, locations, weights, points, method)
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    actual = deformable_attention_core_func_v2(value, torch.tensor(square), locations, weights, points, method)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shapes_kind", ["list", "tensor"])
def test_four_argument_function_equals_transformers(shapes_kind):
    reference = _hf("mask2former.modeling_mask2former", "multi_scale_deformable_attention")
    value, locations, weights = _inputs([3] * len(SHAPES), seed=2)
    locations = locations.unflatten(3, (len(SHAPES), 3))
    weights = weights.unflatten(3, (len(SHAPES), 3))
    grad_out = torch.randn(2, Q, M * D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    shapes = SHAPES if shapes_kind == "list" else torch.tensor(SHAPES)
    expected, expected_grads = _output_and_grads(reference, value, SHAPES, locations, weights, grad_out)
    actual, grads = _output_and_grads(multi_scale_deformable_attention, value, shapes, locations, weights, grad_out)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    for a, e in zip(grads, expected_grads):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_level_tables_are_cached_per_shape_list():
    shapes, starts = level_tables([(6, 9), (3, 5)])
    assert shapes.tolist() == [[6, 9], [3, 5]] and starts.tolist() == [0, 54]
    assert shapes.dtype == starts.dtype == torch.int64
    again = level_tables(((6, 9), (3, 5)))  # tuples, lists and a CPU tensor of the same sizes: one pair
    from_tensor = level_tables(torch.tensor([[6, 9], [3, 5]], dtype=torch.int32))
    with torch.inference_mode():
        in_inference = level_tables([[6, 9], [3, 5]])
    for pair in (again, from_tensor, in_inference):
        assert pair[0] is shapes and pair[1] is starts
    assert not shapes.is_inference()  # so the op's own per-table cache keeps it
    assert level_tables([(6, 9), (3, 4)])[0] is not shapes


def test_level_tables_of_a_device_tensor_stay_there():
    shapes = torch.tensor([[6, 9], [3, 5]], device="meta")
    out_shapes, starts = level_tables(shapes)
    assert out_shapes.device.type == starts.device.type == "meta" and starts.shape == (2,)


def test_v2_argument_errors():
    points = [2, 4, 1, 3]
    value, locations, weights = _inputs(points)
    with pytest.raises(ValueError, match="method"):
        deformable_attention_core_func_v2(value, SHAPES, locations, weights, points, "nearest")
    with pytest.raises(ValueError, match="num_points_list"):
        deformable_attention_core_func_v2(value, SHAPES, locations, weights, points[:3], "default")
    with pytest.raises(ValueError, match="sum\\(num_points_list\\)"):
        deformable_attention_core_func_v2(value, SHAPES, locations, weights, [2, 4, 1, 2], "default")
    with pytest.raises(ValueError, match="sampling_locations"):
        deformable_attention_core_func_v2(value, SHAPES, locations[..., 0], weights, points, "default")
    with pytest.raises(ValueError, match="attention_weights"):
        deformable_attention_core_func_v2(value, SHAPES, locations, weights[..., None], points, "default")
    with pytest.raises(TypeError, match="value"):
        deformable_attention_core_func_v2("value", SHAPES, locations, weights, points, "default")
    with pytest.raises(ValueError, match="value_spatial_shapes"):
        level_tables([(6, 9, 1)])
