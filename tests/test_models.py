"""DETR / Deformable DETR: shapes of every variant, the original key layout, configs, criterion, postprocess."""

from __future__ import annotations

import pytest
import torch
import torchvision

import deformable_detr.models as M
from deformable_detr.models.deformable_transformer import DeformableTransformer

# Tiny ops: handing them to other threads costs more than it saves.
pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = dict(
    backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=12,
    num_classes=7, dropout=0.0,
)  # fmt: skip
VARIANTS = {
    "detr": lambda **kw: M.DETRConfig(**{**SMALL, **kw}),
    "deformable": lambda **kw: M.DeformableDETRConfig(**{**SMALL, **kw}),
    "deformable_refine": lambda **kw: M.DeformableDETRConfig(**{**SMALL, "with_box_refine": True, **kw}),
    "deformable_two_stage": lambda **kw: M.DeformableDETRConfig(
        **{**SMALL, "with_box_refine": True, "two_stage": True, **kw}
    ),
}


def _images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 96, generator=g), torch.rand(3, 40, 72, generator=g)]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_output_shapes(variant):
    torch.manual_seed(0)
    config = VARIANTS[variant]()
    model = M.build(config).eval()
    with torch.no_grad():
        out = model(_images())
    num_logits = config.num_classes + (1 if variant == "detr" else 0)
    assert out["pred_logits"].shape == (2, config.num_queries, num_logits)
    assert out["pred_boxes"].shape == (2, config.num_queries, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out["aux_outputs"]) == config.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == out["pred_logits"].shape
        assert aux["pred_boxes"].shape == out["pred_boxes"].shape
    if variant == "deformable_two_stage":
        enc = out["enc_outputs"]
        # one proposal per encoder pixel over the 4 levels (strides 8, 16, 32, 64) of the 64x96 padded batch
        assert enc["pred_logits"].shape == (2, 8 * 12 + 4 * 6 + 2 * 3 + 1 * 2, config.num_classes)
        assert enc["pred_boxes"].shape[:2] == enc["pred_logits"].shape[:2]
    else:
        assert "enc_outputs" not in out


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_feature_levels=1),
        dict(num_feature_levels=3, position_embedding="learned"),
        dict(backbone="resnet34", aux_loss=False),
    ],
)
def test_deformable_options(overrides):
    model = M.build(VARIANTS["deformable"](**overrides)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 96, 128))
    assert out["pred_logits"].shape == (1, SMALL["num_queries"], SMALL["num_classes"])
    assert ("aux_outputs" in out) == overrides.get("aux_loss", True)


def test_detr_learned_position_and_dc5():
    model = M.build(VARIANTS["detr"](backbone="resnet50", dilation=True, position_embedding="learned")).eval()
    assert model.backbone.strides == [16]
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert out["pred_boxes"].shape == (1, SMALL["num_queries"], 4)


def test_image_list_is_padded_and_masked():
    small, large = torch.rand(3, 20, 30), torch.rand(3, 40, 24)
    batch = M.to_image_batch([small, large])
    assert batch.tensors.shape == (2, 3, 40, 30)
    torch.testing.assert_close(batch.tensors[0, :, :20, :30], small)
    assert batch.tensors[0, :, 20:].abs().sum() == 0 and batch.tensors[1, :, :, 24:].abs().sum() == 0
    assert batch.mask.sum().item() == 40 * 30 * 2 - 20 * 30 - 40 * 24
    assert not batch.mask[0, :20, :30].any() and batch.mask[0, 20:].all() and batch.mask[1, :, 24:].all()
    # nearest resize to a feature map samples rows 0, 4, .., 36 and columns 0, 6, .., 24 -> valid (w, h) ratios
    ratios = DeformableTransformer.get_valid_ratio(batch.mask_at((10, 5)))
    torch.testing.assert_close(ratios, torch.tensor([[1.0, 0.5], [0.8, 1.0]]))


def test_image_batch_inputs_equivalent():
    model = M.build(VARIANTS["deformable"]()).eval()
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a = model(images)
        b = model(list(images))
        c = model(M.to_image_batch(images))
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"])
    torch.testing.assert_close(a["pred_logits"], c["pred_logits"])


def test_bad_inputs_raise():
    model = M.build(VARIANTS["deformable"]())
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="images"):
        model([])
    with pytest.raises(TypeError, match="images"):
        model("not an image")


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(backbone="vgg16"), "backbone"),
        (dict(position_embedding="fourier"), "position_embedding"),
        (dict(hidden_dim=36, nheads=4), "hidden_dim"),
        (dict(num_queries=0), "num_queries"),
        (dict(pretrained=True), "backbone_weights"),
        (dict(two_stage=True), "with_box_refine"),
        (dict(num_feature_levels=2), "num_feature_levels"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        M.build(M.DeformableDETRConfig(**{**SMALL, **kwargs}))


def test_dilation_needs_bottleneck():
    with pytest.raises(ValueError, match="dilation"):
        M.build(M.DETRConfig(**{**SMALL, "dilation": True}))


def test_backbone_freezing_and_local_weights(tmp_path):
    resnet = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for p in resnet.parameters():
            p.normal_()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = M.build(M.DeformableDETRConfig(**{**SMALL, "backbone_weights": str(path), "pretrained": True}))
    body = model.backbone[0].body
    torch.testing.assert_close(body.layer3[1].conv2.weight, resnet.layer3[1].conv2.weight)
    torch.testing.assert_close(body.bn1.running_var, resnet.bn1.running_var)
    for name, p in model.backbone.named_parameters():
        trainable = any(f"layer{i}" in name for i in (2, 3, 4))
        assert p.requires_grad == trainable, name
    frozen = M.build(M.DETRConfig(**{**SMALL, "lr_backbone": 0.0}))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="backbone_weights"):
        M.build(M.DETRConfig(**{**SMALL, "backbone_weights": str(tmp_path / "bad.pth")}))


# -- the original repos' key layout, spelled out from their module structure --------------------------------
def _linear(prefix):
    return [f"{prefix}.weight", f"{prefix}.bias"]


def _mha(prefix):
    return [f"{prefix}.in_proj_weight", f"{prefix}.in_proj_bias", *_linear(f"{prefix}.out_proj")]


def _msda(prefix):
    return [
        k
        for n in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for k in _linear(f"{prefix}.{n}")
    ]


def _mlp(prefix):
    return [k for i in range(3) for k in _linear(f"{prefix}.layers.{i}")]


def _resnet50_keys():
    keys = torchvision.models.resnet50(weights=None).state_dict().keys()
    return [f"backbone.0.body.{k}" for k in keys if not k.startswith("fc.") and not k.endswith("num_batches_tracked")]


def _original_deformable_keys(refine: bool, two_stage: bool, layers=6, levels=4):
    keys = _resnet50_keys() + ["transformer.level_embed"]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}"
        keys += _msda(f"{p}.self_attn") + _linear(f"{p}.norm1") + _linear(f"{p}.linear1") + _linear(f"{p}.linear2")
        keys += _linear(f"{p}.norm2")
        p = f"transformer.decoder.layers.{i}"
        keys += _msda(f"{p}.cross_attn") + _linear(f"{p}.norm1") + _mha(f"{p}.self_attn") + _linear(f"{p}.norm2")
        keys += _linear(f"{p}.linear1") + _linear(f"{p}.linear2") + _linear(f"{p}.norm3")
    num_pred = layers + (1 if two_stage else 0)
    for i in range(num_pred):
        keys += _linear(f"class_embed.{i}") + _mlp(f"bbox_embed.{i}")
        if refine:
            keys += _mlp(f"transformer.decoder.bbox_embed.{i}")
        if two_stage:
            keys += _linear(f"transformer.decoder.class_embed.{i}")
    for lvl in range(levels):
        keys += _linear(f"input_proj.{lvl}.0") + _linear(f"input_proj.{lvl}.1")
    if two_stage:
        for n in ("enc_output", "enc_output_norm", "pos_trans", "pos_trans_norm"):
            keys += _linear(f"transformer.{n}")
    else:
        keys += ["query_embed.weight"] + _linear("transformer.reference_points")
    return keys


def _original_detr_keys(layers=6):
    keys = _resnet50_keys()
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}"
        keys += _mha(f"{p}.self_attn") + [
            k for n in ("linear1", "linear2", "norm1", "norm2") for k in _linear(f"{p}.{n}")
        ]
        p = f"transformer.decoder.layers.{i}"
        keys += _mha(f"{p}.self_attn") + _mha(f"{p}.multihead_attn")
        keys += [k for n in ("linear1", "linear2", "norm1", "norm2", "norm3") for k in _linear(f"{p}.{n}")]
    keys += _linear("transformer.decoder.norm") + _linear("class_embed") + _mlp("bbox_embed")
    return keys + ["query_embed.weight"] + _linear("input_proj")


@pytest.mark.parametrize(
    "config, expected",
    [
        (M.DETRConfig(), _original_detr_keys()),
        (M.DeformableDETRConfig(), _original_deformable_keys(False, False)),
        (M.DeformableDETRConfig(with_box_refine=True), _original_deformable_keys(True, False)),
        (M.DeformableDETRConfig(with_box_refine=True, two_stage=True), _original_deformable_keys(True, True)),
    ],
    ids=["detr", "deformable", "refine", "two_stage"],
)
def test_r50_state_dict_keys_match_original_layout(config, expected):
    with torch.device("meta"):  # layout only: no memory, no init cost
        model = M.build(config)
    state = model.state_dict()
    assert sorted(state) == sorted(expected)
    if isinstance(config, M.DeformableDETRConfig):
        assert state["class_embed.0.weight"].shape == (91, 256)
        if not config.two_stage:
            assert state["query_embed.weight"].shape == (300, 512)
        assert state["input_proj.3.0.weight"].shape == (256, 2048, 3, 3)
        assert state["transformer.encoder.layers.0.linear1.weight"].shape == (1024, 256)
    else:
        assert state["class_embed.weight"].shape == (92, 256)
        assert state["query_embed.weight"].shape == (100, 256)
        assert state["transformer.encoder.layers.0.linear1.weight"].shape == (2048, 256)


def test_shared_heads_alias_and_refine_heads_do_not():
    plain = M.build(VARIANTS["deformable"]())
    assert plain.class_embed[0] is plain.class_embed[1]
    refine = M.build(VARIANTS["deformable_refine"]())
    assert refine.class_embed[0] is not refine.class_embed[1]
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    # the original's bias init: first refine head predicts small boxes; two-stage heads predict around proposals
    assert torch.all(refine.bbox_embed[0].layers[-1].bias[2:] == -2.0)
    assert torch.all(refine.bbox_embed[1].layers[-1].bias[2:] == 0.0)
    two = M.build(VARIANTS["deformable_two_stage"]())
    assert len(two.class_embed) == SMALL["dec_layers"] + 1
    assert two.transformer.decoder.class_embed is two.class_embed
    assert all(torch.all(h.layers[-1].bias[2:] == 0.0) for h in two.bbox_embed)
    assert torch.allclose(plain.class_embed[0].bias, torch.full((SMALL["num_classes"],), -4.59511985))


# -- checkpoint loading, original layout ---------------------------------------------------------------------
def test_load_checkpoint_original_layouts(tmp_path):
    torch.manual_seed(0)
    source = M.build(VARIANTS["deformable_refine"]())
    state = source.state_dict()
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    wrapped["model"]["total_ops"] = torch.zeros(1)
    wrapped["model"]["backbone.0.body.total_params"] = torch.zeros(1)
    import argparse

    wrapped["args"] = argparse.Namespace(lr=1e-4)
    path = tmp_path / "checkpoint.pth"
    torch.save(wrapped, path)
    target = M.build(VARIANTS["deformable_refine"]())
    report = M.load_checkpoint(target, path)
    assert report.ok and report.layout == "original"
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, state[k], msg=k)


def test_load_checkpoint_reports_and_raises():
    model = M.build(VARIANTS["deformable"]())
    state = model.state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("transformer.level_embed")}
    partial["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing"):
        M.load_checkpoint(model, partial)
    report = M.load_checkpoint(model, partial, strict=False)
    assert report.missing_keys == ["transformer.level_embed"] and report.unexpected_keys == ["extra.weight"]
    bad = dict(state)
    bad["query_embed.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="shape mismatch"):
        M.load_checkpoint(model, bad, strict=False)
    # a checkpoint that lists a shared head once (as HF's dedup'd files do) still loads strict
    dedup = {k: v for k, v in state.items() if not k.startswith(("class_embed.1", "bbox_embed.1"))}
    assert M.load_checkpoint(model, dedup).ok


# -- postprocess ---------------------------------------------------------------------------------------------
def test_postprocess_focal_topk_and_scaling():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 3)
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    sizes = torch.tensor([[100, 200], [50, 80]])
    results = M.PostProcess(focal=True, num_select=4)({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    for b, r in enumerate(results):
        flat = [(logits[b, q, c].sigmoid().item(), q, c) for q in range(5) for c in range(3)]
        best = sorted(flat, reverse=True)[:4]
        assert r["scores"].tolist() == pytest.approx([s for s, _, _ in best])
        assert r["labels"].tolist() == [c for _, _, c in best]
        h, w = sizes[b].tolist()
        for (_, q, _), box in zip(best, r["boxes"]):
            cx, cy, bw, bh = boxes[b, q].tolist()
            expected = [(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h]
            assert box.tolist() == pytest.approx(expected, rel=1e-5)


def test_postprocess_softmax_ignores_no_object():
    logits = torch.tensor([[[0.0, 1.0, 9.0], [3.0, 0.0, 0.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5]]])
    (r,) = M.PostProcess(focal=False)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[10, 20]]))
    assert r["labels"].tolist() == [1, 0]
    assert r["scores"][0] == pytest.approx(torch.softmax(logits[0, 0], -1)[1].item())
    assert r["boxes"][0].tolist() == pytest.approx([0, 0, 20, 10])
    with pytest.raises(ValueError, match="target_sizes"):
        M.PostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([10, 20]))


def test_build_postprocess_matches_head():
    assert M.build_postprocess(VARIANTS["deformable"]()).focal
    assert not M.build_postprocess(VARIANTS["detr"]()).focal


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_and_cuda_forward_agree(variant):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model = M.build(VARIANTS[variant]()).eval()
    images = _images()
    with torch.no_grad():
        cpu = model(images)
        gpu = model.cuda()([im.cuda() for im in images])
    torch.testing.assert_close(gpu["pred_logits"].cpu(), cpu["pred_logits"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu["pred_boxes"].cpu(), cpu["pred_boxes"], atol=1e-4, rtol=1e-4)
