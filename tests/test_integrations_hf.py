"""``patch_transformers()`` on the families beyond Deformable DETR: RT-DETR, RT-DETRv2 (bilinear and discrete),
D-FINE (ragged points per level, bilinear and discrete), Mask2Former, OneFormer and the deprecated DETA.

Per family, a tiny random model (no downloads) compared patched vs unpatched on the same weights and input:
- float64: every output and every parameter gradient equal within 1e-10 (relative to the tensor's largest entry);
- float32: the MSDA-bearing output (Mask2Former / OneFormer: the pixel decoder's, which their masked attention's
  0.5 threshold cannot flip) and the gradients of a loss on it, within round-off;
- every MSDA module call reaches our op (a counter on ``deformable_detr.ops.ms_deform_attn.ms_deform_attn``) and
  no ``grid_sample`` runs outside it;
- ``torch.export`` of the patched model (RT-DETRv2, Mask2Former, D-FINE with ragged points and discrete sampling;
  OneFormer and DETA do not export in transformers itself) holds one op node per MSDA module call and reproduces
  eager outputs;
- ``unpatch_transformers()`` restores every attribute, D-FINE models built before / during the patch included.
"""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deformable_detr.integrations import hf as hf_integration  # noqa: E402
from deformable_detr.integrations import patch_transformers, unpatch_transformers  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

HEIGHT, WIDTH = 64, 96  # non-square levels: 8x12, 4x6, 2x3 at strides 8, 16, 32 (DETA adds 1x2, Swin 16x24)


def _rt_detr_like(config_class, model_class, **overrides):
    backbone = transformers.RTDetrResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"], out_indices=[2, 3, 4],
    )  # fmt: skip
    config = config_class(
        backbone_config=backbone, encoder_hidden_dim=32, encoder_in_channels=[32, 64, 128], encoder_layers=1,
        encoder_ffn_dim=64, encoder_attention_heads=2, d_model=32, num_queries=20, decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=64, decoder_layers=2, decoder_attention_heads=2, num_denoising=0, num_labels=5, **overrides,
    )  # fmt: skip
    return model_class(config)


def _rt_detr():
    return _rt_detr_like(transformers.RTDetrConfig, transformers.RTDetrForObjectDetection)


def _rt_detr_v2(method):
    return _rt_detr_like(
        transformers.RTDetrV2Config, transformers.RTDetrV2ForObjectDetection, decoder_method=method, decoder_n_points=3
    )


def _d_fine(method):
    backbone = transformers.HGNetV2Config(
        stage_in_channels=[16, 64, 128, 256], stage_mid_channels=[16, 32, 64, 128],
        stage_out_channels=[64, 128, 256, 512], stage_num_blocks=[1, 1, 2, 1],
        stage_downsample=[False, True, True, True], stage_light_block=[False, False, True, True],
        stage_kernel_size=[3, 3, 5, 5], stage_numb_of_layers=[3, 3, 3, 3], embeddings_size=10,
        hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 2, 1], out_features=["stage2", "stage3", "stage4"],
        out_indices=[2, 3, 4], stem_channels=[3, 16, 16], use_lab=True,
    )  # fmt: skip
    config = transformers.DFineConfig(
        backbone_config=backbone, encoder_hidden_dim=32, encoder_in_channels=[128, 256, 512], encoder_layers=1,
        encoder_ffn_dim=64, encoder_attention_heads=2, d_model=32, num_queries=20, decoder_in_channels=[32, 32, 32],
        decoder_ffn_dim=64, decoder_n_points=[3, 6, 2], decoder_layers=2, decoder_attention_heads=2,
        num_denoising=0, layer_scale=1, depth_mult=0.34, hidden_expansion=0.5, num_labels=5, decoder_method=method,
    )  # fmt: skip
    return transformers.DFineForObjectDetection(config)


def _swin():
    return transformers.SwinConfig(
        embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], image_size=HEIGHT,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )  # fmt: skip


def _mask2former():
    config = transformers.Mask2FormerConfig(
        backbone_config=_swin(), hidden_dim=32, feature_size=32, mask_feature_size=32, encoder_layers=2,
        decoder_layers=2, num_queries=10, num_labels=4, encoder_feedforward_dim=64, dim_feedforward=64,
        num_attention_heads=2,
    )  # fmt: skip
    return transformers.Mask2FormerForUniversalSegmentation(config)


def _oneformer():
    config = transformers.OneFormerConfig(
        backbone_config=_swin(), hidden_dim=32, conv_dim=32, mask_dim=32, encoder_layers=2, decoder_layers=2,
        num_queries=10, num_labels=4, encoder_feedforward_dim=64, dim_feedforward=64, num_attention_heads=2,
        text_encoder_width=32, text_encoder_num_layers=1, text_encoder_context_length=8, text_encoder_vocab_size=50,
        task_seq_len=8, max_seq_len=8, text_encoder_proj_layers=1, text_encoder_n_ctx=4, is_training=False,
    )  # fmt: skip
    return transformers.OneFormerForUniversalSegmentation(config)


def _deta():
    from transformers.models.deprecated.deta import DetaConfig, DetaForObjectDetection

    backbone = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic",
        out_features=["stage2", "stage3", "stage4"],
    )  # fmt: skip
    config = DetaConfig(
        backbone_config=backbone, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=12, num_labels=5,
        two_stage=False, with_box_refine=True, num_feature_levels=4,
    )  # fmt: skip
    return DetaForObjectDetection(config)


DETECTION = ("logits", "pred_boxes")
# family -> (builder, outputs compared in float64, outputs compared in float32 ("pixel:" = the pixel-level module's))
FAMILIES = {
    "rt_detr": (_rt_detr, DETECTION, DETECTION),
    "rt_detr_v2": (lambda: _rt_detr_v2("default"), DETECTION, DETECTION),
    "rt_detr_v2-discrete": (lambda: _rt_detr_v2("discrete"), DETECTION, DETECTION),
    "d_fine": (lambda: _d_fine("default"), DETECTION, DETECTION),
    "d_fine-discrete": (lambda: _d_fine("discrete"), DETECTION, DETECTION),
    "mask2former": (
        _mask2former,
        ("class_queries_logits", "masks_queries_logits", "pixel_decoder_last_hidden_state"),
        ("pixel_decoder_last_hidden_state",),
    ),
    "oneformer": (
        _oneformer,
        ("class_queries_logits", "masks_queries_logits", "pixel:decoder_last_feature"),
        ("pixel:decoder_last_feature", "pixel:decoder_features"),
    ),
    "deta": (_deta, DETECTION, DETECTION),
}


def _build(family: str, dtype: torch.dtype, seed: int = 0):
    """(model, inputs) with random weights everywhere (HF zero-inits several), in ``dtype``."""
    torch.manual_seed(seed)
    model = FAMILIES[family][0]().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if "sampling_offsets" in name else 0.05))
    model = model.to(dtype)
    inputs = {"pixel_values": torch.rand(2, 3, HEIGHT, WIDTH, generator=g, dtype=dtype)}
    if family == "oneformer":
        inputs["task_inputs"] = torch.randint(0, 50, (2, 8), generator=g)
    return model, inputs


def _pixel_module(model):
    return model.model.pixel_level_module


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for item in value for t in _tensors(item)]


def _run(model, inputs, names):
    """Named outputs (``pixel:`` names read from the pixel-level module's output) and the parameter gradients of a
    fixed random weighting of them."""
    captured = {}
    handle = None
    if any(n.startswith("pixel:") for n in names):
        handle = _pixel_module(model).register_forward_hook(lambda m, a, out: captured.update(out=out))
    try:
        out = model(**inputs)
    finally:
        if handle is not None:
            handle.remove()
    results = {}
    for name in names:
        source = captured["out"] if name.startswith("pixel:") else out
        for i, t in enumerate(_tensors(source[name.removeprefix("pixel:")])):
            results[f"{name}[{i}]"] = t
    g = torch.Generator().manual_seed(7)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in results.values())
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return {k: v.detach() for k, v in results.items()}, grads


def _assert_relative(actual: dict, expected: dict, rel: float, what: str, floor: float) -> None:
    """Each tensor within ``rel`` of its scale: its largest entry, but at least ``floor`` x the largest entry of all
    the tensors. The floor is for gradients that are zero in exact arithmetic (an attention key bias's) or small
    by cancellation of much larger terms: their round-off is that of the terms, not of the result."""
    assert actual.keys() == expected.keys()
    overall = max((float(e.double().abs().max()) for e in expected.values() if e.numel()), default=0.0)
    worst = []
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape, (what, name)
        if not e.numel():
            continue
        err = float((a.double() - e.double()).abs().max())
        scale = max(float(e.double().abs().max()), floor * overall, 1e-300)
        if not err <= rel * scale:
            worst.append((name, err, scale))
    assert not worst, f"{what}: {len(worst)} tensors differ more than {rel} relative, e.g. {worst[:3]}"


@contextlib.contextmanager
def _op_spy():
    """Count calls of our op (and their keywords) and of grid_sample outside it."""
    op_module = importlib.import_module("deformable_detr.ops.ms_deform_attn")
    original_op, original_grid_sample = op_module.ms_deform_attn, torch.nn.functional.grid_sample
    record = {"op": [], "grid_sample_outside": 0, "inside": False}

    def op(*args, **kwargs):
        record["op"].append(kwargs)
        record["inside"] = True
        try:
            return original_op(*args, **kwargs)
        finally:
            record["inside"] = False

    def grid_sample(*args, **kwargs):
        if not record["inside"]:
            record["grid_sample_outside"] += 1
        return original_grid_sample(*args, **kwargs)

    op_module.ms_deform_attn, torch.nn.functional.grid_sample = op, grid_sample
    try:
        yield record
    finally:
        op_module.ms_deform_attn, torch.nn.functional.grid_sample = original_op, original_grid_sample


def _msda_module_calls(model) -> tuple[list, list]:
    calls = []
    handles = [
        m.register_forward_hook(lambda *_: calls.append(1))
        for m in model.modules()
        if type(m).__name__.endswith("MultiscaleDeformableAttention")
    ]
    return calls, handles


@pytest.fixture
def restore_patch():
    yield
    unpatch_transformers()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_equals_hf_float64_outputs_and_every_gradient(family, restore_patch):
    model, inputs = _build(family, torch.float64)
    names = FAMILIES[family][1]
    expected, expected_grads = _run(model, inputs, names)
    patch_transformers()
    calls, handles = _msda_module_calls(model)
    with _op_spy() as record:
        actual, grads = _run(model, inputs, names)
    for h in handles:
        h.remove()
    assert len(calls) > 0 and len(record["op"]) == len(calls), (len(record["op"]), len(calls))
    assert record["grid_sample_outside"] == 0
    _assert_relative(actual, expected, 1e-10, f"{family} float64 outputs", floor=1e-3)
    _assert_relative(grads, expected_grads, 1e-10, f"{family} float64 parameter gradients", floor=1e-3)
    assert any(float(g.abs().max()) > 0 for n, g in grads.items() if "sampling_offsets" in n) != family.endswith(
        "discrete"
    ), "bilinear sampling gives offsets a gradient, discrete sampling none"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_patched_equals_hf_float32_within_round_off(family, restore_patch):
    model, inputs = _build(family, torch.float32)
    names = FAMILIES[family][2]
    expected, expected_grads = _run(model, inputs, names)
    patch_transformers()
    actual, grads = _run(model, inputs, names)
    _assert_relative(actual, expected, 2e-5, f"{family} float32 outputs", floor=1e-3)
    # Gradients normwise (floor 1): bilinear sampling's gradient jumps where a location crosses a pixel centre, so a
    # rounding difference in a location moves a small tensor's gradient by much more than its own round-off.
    _assert_relative(grads, expected_grads, 1e-4, f"{family} float32 parameter gradients", floor=1.0)


def test_d_fine_models_built_before_and_during_the_patch(restore_patch):
    """D-FINE stores the MSDA function on each instance in __init__: a model built before the patch is patched,
    and one built while patched goes back to transformers' code after unpatch_transformers()."""
    from transformers.models.d_fine import modeling_d_fine

    before, inputs = _build("d_fine", torch.float64)
    patch_transformers()
    during, _ = _build("d_fine", torch.float64)
    for model in (before, during):
        cores = [m.ms_deformable_attn_core for m in model.modules() if hasattr(m, "ms_deformable_attn_core")]
        assert cores and all(getattr(c, "_deformable_detr_patched", False) for c in cores)
        with _op_spy() as record, torch.no_grad():
            model(**inputs)
        assert len(record["op"]) == len(cores)
    unpatch_transformers()
    for model in (before, during):
        cores = [m.ms_deformable_attn_core for m in model.modules() if hasattr(m, "ms_deformable_attn_core")]
        assert all(c is modeling_d_fine.multi_scale_deformable_attention_v2 for c in cores)
        with _op_spy() as record, torch.no_grad():
            model(**inputs)
        assert record["op"] == []
    custom = before.model.decoder.layers[0].encoder_attn
    patch_transformers()
    marker = object()
    custom.ms_deformable_attn_core = marker  # a user's own function is left alone
    assert custom.ms_deformable_attn_core is marker


def test_unpatch_restores_every_attribute_and_backend_is_passed():
    targets = []
    for owner, attribute in [
        *((hf_integration._family_module(f), "MultiScaleDeformableAttention") for f in ("rt_detr",)),
        *((hf_integration._family_module(f), a) for f, a, _ in hf_integration._MODULE_FUNCTIONS),
    ]:
        if owner is not None:
            targets.append((owner, attribute, getattr(owner, attribute)))
    forward = targets[0][2].forward
    try:
        names = patch_transformers(backend="pytorch")
        patch_transformers(backend="pytorch")  # idempotent: the originals are kept from the first call
        assert len(names) == 11, names
        for owner, attribute, original in targets[1:]:
            assert getattr(owner, attribute) is not original
        model, inputs = _build("rt_detr_v2", torch.float32)
        with _op_spy() as record, torch.no_grad():
            model(**inputs)
        assert record["op"] and all(kw.get("backend") == "pytorch" for kw in record["op"])
    finally:
        unpatch_transformers()
    assert targets[0][2].forward is forward
    for owner, attribute, original in targets[1:]:
        assert getattr(owner, attribute) is original
    from transformers.models.d_fine import modeling_d_fine

    assert "ms_deformable_attn_core" not in vars(modeling_d_fine.DFineMultiscaleDeformableAttention)


def test_missing_family_is_skipped(monkeypatch, restore_patch):
    monkeypatch.setattr(
        hf_integration, "_MODULE_FUNCTIONS", (*hf_integration._MODULE_FUNCTIONS, ("no_such_family", "f", "v1"))
    )
    monkeypatch.setattr(
        hf_integration,
        "_INSTANCE_FUNCTIONS",
        (*hf_integration._INSTANCE_FUNCTIONS, ("no_such_family", "C", "core", "f")),
    )
    assert len(patch_transformers()) == 11


def _compiled_op_available() -> bool:
    from deformable_detr.ops.ms_deform_attn import available_backends

    return "cpu" in available_backends("cpu")


# OneFormer and DETA are left out: their own get_reference_points loops over a level-size tensor, which torch.export
# cannot trace (GuardOnDataDependentSymNode in transformers' code, patched or not).
def _native_points_and_sampling() -> bool:
    """Whether the CPU op runs points_per_level / sampling="discrete" itself (else the Python reference runs,
    which reads the level sizes and so cannot be exported)."""
    handles = getattr(importlib.import_module("deformable_detr.ops.ms_deform_attn"), "_handles_points", None)
    return bool(handles and handles("cpu"))


@pytest.mark.skipif(not _compiled_op_available(), reason="export traces the compiled op (deformable_detr._C not built)")
@pytest.mark.parametrize(
    "family",
    [
        "rt_detr_v2",
        "mask2former",
        pytest.param(
            "d_fine-discrete",  # ragged points and discrete sampling
            marks=pytest.mark.xfail(
                not _native_points_and_sampling(),
                reason="points_per_level / discrete run the Python reference until the C++ kernels take them",
                strict=True,
            ),
        ),
    ],
)
def test_torch_export_of_the_patched_model(family, restore_patch):
    model, inputs = _build(family, torch.float32)
    patch_transformers()
    calls, handles = _msda_module_calls(model)
    with torch.no_grad():
        eager = model(**inputs)
    for h in handles:
        h.remove()
    exported = torch.export.export(model, args=(), kwargs=inputs, strict=False)
    ops = [n for n in exported.graph.nodes if n.op == "call_function" and "deformable_detr" in str(n.target)]
    assert len(ops) == len(calls) > 0, (len(ops), len(calls))
    with torch.no_grad():
        replay = exported.module()(**inputs)
    key = "class_queries_logits" if "class_queries_logits" in eager else "logits"
    torch.testing.assert_close(replay[key], eager[key], rtol=1e-5, atol=1e-5)
