"""Parity with HF transformers 4.x: same weights (converted by load_checkpoint) -> same outputs; and
``patch_transformers()`` leaves HF's outputs unchanged while routing MSDA through our op."""

from __future__ import annotations

import importlib

import pytest
import torch

import deformable_detr.models as M

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")


# Tiny ops: handing them to other threads costs more than it saves.
pytestmark = pytest.mark.usefixtures("one_thread")


TINY = dict(hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=20, num_classes=5)


def _hf_deformable(refine=False, two_stage=False, backbone="resnet18", levels=4):
    config = transformers.DeformableDetrConfig(
        use_timm_backbone=True, use_pretrained_backbone=False, backbone=backbone, d_model=TINY["hidden_dim"],
        encoder_layers=TINY["enc_layers"], decoder_layers=TINY["dec_layers"], encoder_ffn_dim=TINY["dim_feedforward"],
        decoder_ffn_dim=TINY["dim_feedforward"], encoder_attention_heads=TINY["nheads"],
        decoder_attention_heads=TINY["nheads"], num_queries=TINY["num_queries"], num_labels=TINY["num_classes"],
        with_box_refine=refine, two_stage=two_stage, two_stage_num_proposals=TINY["num_queries"],
        num_feature_levels=levels,
    )  # fmt: skip
    return transformers.DeformableDetrForObjectDetection(config).eval()


def _hf_detr(position="sine"):
    config = transformers.DetrConfig(
        use_timm_backbone=True, use_pretrained_backbone=False, backbone="resnet18", d_model=TINY["hidden_dim"],
        encoder_layers=TINY["enc_layers"], decoder_layers=TINY["dec_layers"], encoder_ffn_dim=TINY["dim_feedforward"],
        decoder_ffn_dim=TINY["dim_feedforward"], encoder_attention_heads=TINY["nheads"],
        decoder_attention_heads=TINY["nheads"], num_queries=TINY["num_queries"], num_labels=TINY["num_classes"],
        position_embedding_type=position,
        # HF feeds the normed intermediate state forward when auxiliary_loss=True; the original (and we) do not.
        auxiliary_loss=False,
    )  # fmt: skip
    return transformers.DetrForObjectDetection(config).eval()


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (HF zero-inits some heads), so every parameter influences the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.02 if "sampling_offsets" not in name else 0.2))


def _batch():
    g = torch.Generator().manual_seed(1)
    return M.to_image_batch([torch.rand(3, 64, 96, generator=g), torch.rand(3, 48, 72, generator=g)])


def _compare(ours, hf):
    batch = _batch()
    with torch.no_grad():
        mine = ours(batch)
        theirs = hf(pixel_values=batch.tensors, pixel_mask=(~batch.mask).long())
    torch.testing.assert_close(mine["pred_logits"], theirs.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(mine["pred_boxes"], theirs.pred_boxes, atol=1e-4, rtol=0)
    return mine, theirs


@pytest.mark.parametrize(
    "refine, two_stage, levels",
    [(False, False, 4), (True, False, 4), (True, True, 4), (False, False, 1)],
    ids=["deformable", "refine", "two_stage", "single_level"],
)
def test_deformable_matches_hf(refine, two_stage, levels):
    torch.manual_seed(0)
    hf = _hf_deformable(refine, two_stage, levels=levels)
    _perturb(hf, 0)
    config = M.DeformableDETRConfig(
        backbone="resnet18", with_box_refine=refine, two_stage=two_stage, num_feature_levels=levels, **TINY
    )
    ours = M.build(config).eval()
    report = M.load_checkpoint(ours, hf.state_dict())
    assert report.layout == "hf" and report.ok
    mine, theirs = _compare(ours, hf)
    if two_stage:
        torch.testing.assert_close(mine["enc_outputs"]["pred_logits"], theirs.enc_outputs_class, atol=1e-4, rtol=0)


@pytest.mark.parametrize("position", ["sine", "learned"])
def test_detr_matches_hf(position):
    torch.manual_seed(0)
    hf = _hf_detr(position)
    _perturb(hf, 1)
    ours = M.build(M.DETRConfig(backbone="resnet18", position_embedding=position, **TINY)).eval()
    report = M.load_checkpoint(ours, hf.state_dict())
    assert report.layout == "hf" and report.ok
    _compare(ours, hf)


def test_hf_checkpoint_file_with_dedup_heads(tmp_path):
    """A file saved with tied heads listed once (as hub checkpoints are) loads strict into the shared heads."""
    hf = _hf_deformable()
    _perturb(hf, 2)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith(("class_embed.1", "bbox_embed.1"))}
    torch.save(state, tmp_path / "hf.bin")
    ours = M.build(M.DeformableDETRConfig(backbone="resnet18", **TINY)).eval()
    assert M.load_checkpoint(ours, tmp_path / "hf.bin").ok
    _compare(ours, hf)


def test_hf_r50_layout_converts_to_exact_original_keys():
    """The converted key set of an R50 HF model equals ours (strict load), head sharing included."""
    with torch.device("meta"):
        hf = _hf_deformable(refine=True, backbone="resnet50")
        ours = M.build(M.DeformableDETRConfig(backbone="resnet50", with_box_refine=True, **TINY))
    converted = M.convert_hf_state_dict(hf.state_dict())
    assert sorted(converted) == sorted(ours.state_dict())


def test_patch_transformers_keeps_hf_outputs():
    from transformers.models.deformable_detr import modeling_deformable_detr as hf_module

    from deformable_detr.integrations import patch_transformers, unpatch_transformers

    torch.manual_seed(0)
    hf = _hf_deformable(refine=True)
    _perturb(hf, 3)
    batch = _batch()
    inputs = dict(pixel_values=batch.tensors, pixel_mask=(~batch.mask).long())
    with torch.no_grad():
        before = hf(**inputs)
    calls = []
    op_module = importlib.import_module("deformable_detr.ops.ms_deform_attn")

    original_op = op_module.ms_deform_attn

    def counting(*args, **kwargs):
        calls.append(1)
        return original_op(*args, **kwargs)

    try:
        patched = patch_transformers()
        assert any("deformable_detr" in name for name in patched)
        assert getattr(hf_module.MultiScaleDeformableAttention.forward, "_deformable_detr_patched", False)
        op_module.ms_deform_attn = counting
        with torch.no_grad():
            after = hf(**inputs)
    finally:
        op_module.ms_deform_attn = original_op
        unpatch_transformers()
    assert len(calls) == TINY["enc_layers"] + TINY["dec_layers"]
    assert not getattr(hf_module.MultiScaleDeformableAttention.forward, "_deformable_detr_patched", False)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(after.pred_boxes, before.pred_boxes, atol=1e-4, rtol=0)
