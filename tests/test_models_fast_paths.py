"""The CPU fast paths of the model code equal what they replace: the dropout with 16-bit keep decisions
(``models.layers.dropout``) and the one-GEMM sampling locations of ``MSDeformAttn``."""

from __future__ import annotations

import pytest
import torch

from deformable_detr import MSDeformAttn
from deformable_detr.models.layers import Dropout, _keep_threshold, dropout
from deformable_detr.ops import levels


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.randn(1000, 1001, requires_grad=True)  # odd size: the 64-bit draws do not divide it
    y = dropout(x, 0.1, True)
    kept = y != 0
    threshold = _keep_threshold(0.1)
    rate = kept.double().mean().item()
    assert abs(rate - threshold / 65536) < 5 * (0.1 * 0.9 / x.numel()) ** 0.5  # 5 sigma
    torch.testing.assert_close(y[kept], x[kept] * (65536 / threshold), rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() * (65536 / threshold), rtol=0, atol=0)
    # E[y] = x: the scale belongs to the realised keep rate, not to 1 - p.
    assert abs(threshold / 65536 * (65536 / threshold) - 1) < 1e-12


def test_dropout_keep_decisions_are_independent_of_position():
    torch.manual_seed(1)
    y = dropout(torch.ones(4, 250_000), 0.5, True)
    # Each of the four 16-bit slices of a draw decides one element: every slice position keeps half.
    rates = (y != 0).view(-1, 4).double().mean(0)
    assert torch.all((rates - 0.5).abs() < 0.005), rates


def test_dropout_seeded_eval_and_edge_probabilities():
    x = torch.randn(64, 33)
    torch.manual_seed(3)
    a = dropout(x, 0.2, True)
    torch.manual_seed(3)
    b = dropout(x, 0.2, True)
    assert torch.equal(a, b)
    assert dropout(x, 0.2, False) is x
    assert dropout(x, 0.0, True) is x
    assert torch.equal(dropout(x, 1.0, True), torch.zeros_like(x))  # F.dropout's rule at p = 1
    module = Dropout(0.3)
    module.eval()
    assert module(x) is x
    module.train()
    assert (module(x) == 0).any()


@pytest.mark.parametrize("levels_in_reference", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_point_locations_equal_the_direct_formula(levels_in_reference, dtype):
    torch.manual_seed(0)
    attn = MSDeformAttn(d_model=64, n_levels=3, n_heads=4, n_points=5).to(dtype)
    with torch.no_grad():
        attn.sampling_offsets.weight.normal_()
        attn.sampling_offsets.bias.normal_()
    shapes = torch.tensor([[7, 9], [4, 5], [1, 1]])
    starts = torch.tensor([0, 63, 83])
    query = torch.randn(2, 11, 64, dtype=dtype, requires_grad=True)
    reference = torch.rand(2, 11, levels_in_reference, 2, dtype=dtype, requires_grad=True)
    got = attn._point_locations(query, reference, shapes, levels.lookup(shapes, starts, 84))
    offsets = attn.sampling_offsets(query).view(2, 11, 4, 3, 5, 2)
    normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1).to(dtype)
    want = reference[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(got, want, **tol)
    grad = torch.randn_like(got)
    g_got = torch.autograd.grad(got, (query, reference, attn.sampling_offsets.weight), grad)
    g_want = torch.autograd.grad(want, (query, reference, attn.sampling_offsets.weight), grad)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, **tol)
