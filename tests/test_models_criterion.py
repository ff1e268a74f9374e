"""SetCriterion: loss values against direct formulas, loss keys/weights of the originals, training signal."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from support.overfit import SMALL, THRESHOLD, VARIANTS, judged_ratio, overfit_history, total_loss

import deformable_detr.models as M
from deformable_detr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from deformable_detr.models.criterion import SetCriterion

# Tiny ops: handing them to other threads costs more than it saves.
pytestmark = pytest.mark.usefixtures("one_thread")


class DiagonalMatcher:
    """Matches query i to target i: makes the loss values checkable by hand, independent of the real matcher."""

    def __call__(self, outputs, targets):
        return [(torch.arange(len(t["labels"])), torch.arange(len(t["labels"]))) for t in targets]

    def match_many(self, outputs_list, targets):
        return [self(o, targets) for o in outputs_list]


def _outputs(batch=2, queries=5, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "pred_logits": torch.randn(batch, queries, classes, generator=g),
        "pred_boxes": torch.rand(batch, queries, 2, generator=g).mul(0.4).add(0.3).repeat(1, 1, 2) * 0.5
        + torch.tensor([0.25, 0.25, 0.1, 0.1]),
    }


TARGETS = [
    {"labels": torch.tensor([2, 0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.6, 0.1, 0.1]])},
    {"labels": torch.tensor([3]), "boxes": torch.tensor([[0.4, 0.4, 0.5, 0.5]])},
]


def test_focal_and_box_losses_match_formulas():
    outputs = _outputs()
    criterion = SetCriterion(4, DiagonalMatcher(), {"loss_ce": 2.0}, use_focal=True, focal_alpha=0.25)
    losses = criterion(outputs, TARGETS)
    num_boxes = 3.0
    logits = outputs["pred_logits"]
    onehot = torch.zeros_like(logits)
    onehot[0, 0, 2] = onehot[0, 1, 0] = onehot[1, 0, 3] = 1
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    alpha_t = 0.25 * onehot + 0.75 * (1 - onehot)
    focal = (alpha_t * ce * (1 - p_t) ** 2).sum() / num_boxes  # mean over queries * num_queries == sum
    torch.testing.assert_close(losses["loss_ce"], focal)

    src = torch.cat([outputs["pred_boxes"][0, :2], outputs["pred_boxes"][1, :1]])
    tgt = torch.cat([TARGETS[0]["boxes"], TARGETS[1]["boxes"]])
    torch.testing.assert_close(losses["loss_bbox"], (src - tgt).abs().sum() / num_boxes)
    giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
    torch.testing.assert_close(losses["loss_giou"], (1 - giou).sum() / num_boxes)
    assert {"class_error", "cardinality_error"} <= set(losses)


def test_cross_entropy_with_eos_weight():
    outputs = _outputs(classes=5)  # 4 classes + "no object"
    criterion = SetCriterion(4, DiagonalMatcher(), {}, losses=("labels",), use_focal=False, eos_coef=0.1)
    losses = criterion(outputs, TARGETS)
    target_classes = torch.full((2, 5), 4)
    target_classes[0, 0], target_classes[0, 1], target_classes[1, 0] = 2, 0, 3
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1])
    expected = F.cross_entropy(outputs["pred_logits"].transpose(1, 2), target_classes, weight)
    torch.testing.assert_close(losses["loss_ce"], expected)


def test_aux_and_encoder_losses_are_keyed_like_the_original():
    outputs = _outputs()
    outputs["aux_outputs"] = [_outputs(seed=1), _outputs(seed=2)]
    outputs["enc_outputs"] = _outputs(queries=9, seed=3)
    losses = SetCriterion(4, DiagonalMatcher(), {})(outputs, TARGETS)
    for suffix in ("", "_0", "_1", "_enc"):
        for name in ("loss_ce", "loss_bbox", "loss_giou", "cardinality_error"):
            assert name + suffix in losses
    assert "class_error_0" not in losses and "class_error_enc" not in losses
    # encoder proposals are class-agnostic: their target is class 0
    enc = outputs["enc_outputs"]
    onehot = torch.zeros_like(enc["pred_logits"])
    onehot[0, 0, 0] = onehot[0, 1, 0] = onehot[1, 0, 0] = 1
    p = enc["pred_logits"].sigmoid()
    ce = F.binary_cross_entropy_with_logits(enc["pred_logits"], onehot, reduction="none")
    p_t = p * onehot + (1 - p) * (1 - onehot)
    expected = ((0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2).sum() / 3
    torch.testing.assert_close(losses["loss_ce_enc"], expected)


def test_empty_targets_and_bad_targets():
    outputs = _outputs()
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}] * 2
    losses = SetCriterion(4, DiagonalMatcher(), {})(outputs, empty)
    assert losses["loss_bbox"] == 0 and torch.isfinite(losses["loss_ce"])
    with pytest.raises(ValueError, match="labels"):
        SetCriterion(4, DiagonalMatcher(), {})(outputs, [{"boxes": torch.zeros(0, 4)}] * 2)
    with pytest.raises(ValueError, match="labels must be in"):
        SetCriterion(4, DiagonalMatcher(), {})(outputs, [{"labels": torch.tensor([9]), "boxes": torch.rand(1, 4)}] * 2)
    with pytest.raises(ValueError, match="targets"):
        SetCriterion(4, DiagonalMatcher(), {})(outputs, TARGETS[:1])


def test_build_criterion_uses_the_originals_defaults():
    deformable = M.build_criterion(M.DeformableDETRConfig(with_box_refine=True, two_stage=True))
    assert deformable.use_focal and deformable.focal_alpha == 0.25
    assert (deformable.weight_dict["loss_ce"], deformable.weight_dict["loss_bbox"]) == (2.0, 5.0)
    assert deformable.weight_dict["loss_giou"] == 2.0 and deformable.weight_dict["loss_giou_4"] == 2.0
    assert "loss_ce_enc" in deformable.weight_dict and "loss_ce_5" not in deformable.weight_dict
    m = deformable.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (2.0, 5.0, 2.0)
    detr = M.build_criterion(M.DETRConfig())
    assert not detr.use_focal and detr.eos_coef == 0.1
    assert (detr.weight_dict["loss_ce"], detr.weight_dict["loss_bbox"], detr.weight_dict["loss_giou"]) == (1, 5, 2)
    assert detr.matcher.cost_class == 1.0 and "loss_ce_enc" not in detr.weight_dict


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_decreases_on_tiny_overfit_batch(variant):
    """The loss falls on a batch the model can memorise. Judged STEPS steps in, well past the step where the seeded
    trajectory falls, which moves with the CPU's vector width: the margin, measured over every capability and three
    seeds by tests/support/overfit.py, is in benchmarks/results/overfit-margin-*.md."""
    history = overfit_history(variant)
    assert all(torch.isfinite(torch.tensor(history)))
    assert judged_ratio(history) < THRESHOLD, history


def test_600_queries_with_574_targets():
    """Dense scenes: more objects than DETR's default 100 queries need num_queries raised; all are matched."""
    torch.manual_seed(0)
    config = M.DeformableDETRConfig(**{**SMALL, "num_queries": 600})
    model, criterion = M.build(config), M.build_criterion(config)
    g = torch.Generator().manual_seed(0)
    centers = torch.rand(574, 2, generator=g) * 0.8 + 0.1
    sizes = torch.rand(574, 2, generator=g) * 0.08 + 0.01
    targets = [{"labels": torch.randint(0, 7, (574,), generator=g), "boxes": torch.cat([centers, sizes], -1)}]
    outputs = model(torch.rand(1, 3, 128, 128))
    assert outputs["pred_logits"].shape == (1, 600, 7)
    (pred_idx, tgt_idx), *_ = criterion.matcher(outputs, targets)
    assert len(pred_idx) == 574 and sorted(tgt_idx.tolist()) == list(range(574))
    assert len(set(pred_idx.tolist())) == 574
    losses = criterion(outputs, targets)
    loss = total_loss(criterion, losses)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.query_embed.weight.grad.abs().sum() > 0
