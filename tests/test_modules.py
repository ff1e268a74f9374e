"""MSDeformAttn drop-in module: original parameter names and init, reference points of last dim 2 and 4, padding
mask, backends agreeing, the MSDeformAttnFunction shim, autocast."""

from __future__ import annotations

import math

import pytest
import torch
from support.oracle import make_level_tensors, ms_deform_attn_oracle

import deformable_detr as dd

BACKENDS = [b for b in dd.available_backends("cpu") if b != "triton"]
SHAPES = [(6, 5), (3, 3), (2, 1)]


def _module_inputs(batch=2, len_q=7, d_model=32, seed=0, ref_dim=2):
    gen = torch.Generator().manual_seed(seed)
    ss, lsi = make_level_tensors(SHAPES)
    len_in = int(ss.prod(1).sum())
    query = torch.randn(batch, len_q, d_model, generator=gen)
    flat = torch.randn(batch, len_in, d_model, generator=gen)
    if ref_dim == 2:
        ref = torch.rand(batch, len_q, len(SHAPES), 2, generator=gen)
    else:
        ref = torch.cat(
            [
                torch.rand(batch, len_q, len(SHAPES), 2, generator=gen),
                0.1 + 0.3 * torch.rand(batch, len_q, len(SHAPES), 2, generator=gen),
            ],
            -1,
        )
    return query, ref, flat, ss, lsi


def _randomize(module, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module


def _manual_forward(module, query, ref, flat, ss, lsi, mask=None):
    """The original module's arithmetic spelled out on top of the float64 oracle."""
    N, Lq, C = query.shape
    M, L, P = module.n_heads, module.n_levels, module.n_points
    value = flat @ module.value_proj.weight.t() + module.value_proj.bias
    if mask is not None:
        value = value.masked_fill(mask[..., None], 0.0)
    value = value.view(N, -1, M, C // M)
    offsets = (query @ module.sampling_offsets.weight.t() + module.sampling_offsets.bias).view(N, Lq, M, L, P, 2)
    logits = (query @ module.attention_weights.weight.t() + module.attention_weights.bias).view(N, Lq, M, L * P)
    weights = logits.softmax(-1).view(N, Lq, M, L, P)
    if ref.shape[-1] == 2:
        normalizer = torch.stack([ss[:, 1], ss[:, 0]], -1).to(query.dtype)
        loc = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + offsets / P * ref[:, :, None, :, None, 2:] * 0.5
    out = ms_deform_attn_oracle(value, ss, lsi, loc, weights).to(query.dtype)
    return out @ module.output_proj.weight.t() + module.output_proj.bias


def test_parameter_names_shapes_and_init_match_original():
    m = dd.MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (256, 256),
        "sampling_offsets.bias": (256,),
        "attention_weights.weight": (128, 256),
        "attention_weights.bias": (128,),
        "value_proj.weight": (256, 256),
        "value_proj.bias": (256,),
        "output_proj.weight": (256, 256),
        "output_proj.bias": (256,),
    }
    assert m.im2col_step == 64
    assert bool((m.sampling_offsets.weight == 0).all()) and bool((m.attention_weights.weight == 0).all())
    bias = m.sampling_offsets.bias.view(8, 4, 4, 2)
    # head 0 looks along +x, head 2 along +y (angle 2*pi*h/8), point i at distance i+1, same for every level
    assert torch.allclose(bias[0, :, 0], torch.tensor([1.0, 0.0]).expand(4, 2))
    assert torch.allclose(bias[2, 1, 3], torch.tensor([0.0, 4.0]), atol=1e-6)
    assert torch.allclose(bias[1, 0, 1], torch.tensor([2.0, 2.0 * math.tan(math.pi / 4)]))


def test_non_power_of_two_head_dim_warns_and_bad_d_model_raises():
    with pytest.warns(UserWarning):
        dd.MSDeformAttn(d_model=24, n_levels=1, n_heads=4, n_points=1)
    with pytest.raises(ValueError, match="divisible"):
        dd.MSDeformAttn(d_model=30, n_heads=8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("use_mask", [False, True])
def test_module_forward_matches_manual_computation(backend, ref_dim, use_mask):
    module = _randomize(dd.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2, backend=backend)).double()
    query, ref, flat, ss, lsi = (t.double() if t.is_floating_point() else t for t in _module_inputs(ref_dim=ref_dim))
    mask = None
    if use_mask:
        mask = torch.zeros(flat.shape[:2], dtype=torch.bool)
        mask[1, ::3] = True
    out = module(query, ref, flat, ss, lsi, mask)
    expected = _manual_forward(module, query, ref, flat, ss, lsi, mask)
    assert out.shape == query.shape
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_module_backends_agree_and_backprop():
    results = {}
    for backend in BACKENDS:
        torch.manual_seed(0)
        module = _randomize(dd.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2, backend=backend))
        query, ref, flat, ss, lsi = _module_inputs(ref_dim=4)
        query.requires_grad_(True)
        out = module(query, ref, flat, ss, lsi)
        out.square().sum().backward()
        results[backend] = (out.detach(), query.grad, module.sampling_offsets.weight.grad)
    base = results[BACKENDS[-1]]
    for backend, res in results.items():
        for a, b in zip(res, base):
            torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=backend)


def test_bad_reference_points_raise():
    module = dd.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, ref, flat, ss, lsi = _module_inputs()
    with pytest.raises(ValueError, match="reference_points"):
        module(query, ref[..., :1], flat, ss, lsi)


def test_function_shim_signature_and_result():
    query, ref, flat, ss, lsi = _module_inputs()
    gen = torch.Generator().manual_seed(3)
    value = torch.randn(2, flat.shape[1], 4, 8, generator=gen)
    loc = torch.rand(2, 7, 4, 3, 2, 2, generator=gen)
    attn = torch.rand(2, 7, 4, 3, 2, generator=gen)
    out = dd.MSDeformAttnFunction.apply(value, ss, lsi, loc, attn, 64)
    # any batch size works: im2col_step that does not divide N is accepted (and ignored)
    out3 = dd.MSDeformAttnFunction.apply(value[:1], ss, lsi, loc[:1], attn[:1], 64)
    torch.testing.assert_close(out, ms_deform_attn_oracle(value, ss, lsi, loc, attn).float(), rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(out3, out[:1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_under_cpu_autocast_bfloat16(backend):
    module = _randomize(dd.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2, backend=backend))
    query, ref, flat, ss, lsi = _module_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, ref, flat, ss, lsi)
    expected = module(query, ref, flat, ss, lsi)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_wrong_number_of_levels_is_a_named_error():
    module = dd.MSDeformAttn(d_model=32, n_levels=4, n_heads=4, n_points=2)
    query, ref, flat, ss, lsi = _module_inputs()  # 3 levels
    with pytest.raises(ValueError, match=r"input_spatial_shapes .*n_levels=4"):
        module(query, torch.cat([ref, ref[:, :, :1]], 2), flat, ss, lsi)
    module3 = dd.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    with pytest.raises(ValueError, match="reference_points .*n_levels=3"):
        module3(query, torch.cat([ref, ref[:, :, :1]], 2), flat, ss, lsi)


@pytest.mark.parametrize("ref_dim", [2, 4])
def test_module_accepts_int32_level_tables(ref_dim):
    module = _randomize(dd.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2))
    query, ref, flat, ss, lsi = _module_inputs(ref_dim=ref_dim)
    torch.testing.assert_close(module(query, ref, flat, ss.int(), lsi.int()), module(query, ref, flat, ss, lsi))


def test_module_on_meta_tensors():
    with torch.device("meta"):
        module = dd.MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query, ref, flat, ss, lsi = (t.to("meta") for t in _module_inputs())
    out = module(query, ref, flat, ss, lsi)
    assert out.device.type == "meta" and out.shape == query.shape
