"""The peer on the tree crowns: torchvision's Faster R-CNN (RPN + RoI head, NMS) from the same backbone init.

``python -m experiments.trees.convergence peer --budget 500 --out DIR`` trains Faster R-CNN and Deformable DETR
(the preset's 450 queries) on ``neon-trees`` under the same CPU budget and scores both the same way (held-out AP50
per epoch, then the dense split at 450 and 100 detections); it is ``convergence run`` for those two models. Only
torchvision is needed.

Like for like: the ResNet-18 weights are copied from a Deformable DETR built with the same seed (random init:
no pretrained weights are available offline), with the same layers trainable (layer2-4; stem, layer1 and every
batch norm frozen); same data, augmentation (flips, quarter turns), image scale (0.5), batch size and CPU
budget. What Faster R-CNN gets that DETR does not need: an FPN on C3-C5 (+ max-pooled P6), anchors sized for
crowns of 10-50 pixels at this scale (16-128 px, three aspect ratios) and torchvision's recipe of SGD with
momentum and a short warm-up rather than AdamW.
"""

from __future__ import annotations

import torch
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from experiments.trees import common as tc

SGD_LR = 0.01
WARMUP_STEPS = 50


def build_faster_rcnn(data: str, num_classes: int, seed: int):
    """``(train config, step, predictor factory, backbone checksum)`` as ``convergence.run`` expects."""
    cfg = tc.preset_for(data, "deformable_detr")
    # The backbone of the Deformable DETR that the same seed builds, so both start from identical weights.
    _, _, ddetr_predictor, checksum = tc.build_detr_family(data, "deformable_detr", num_classes, seed)
    source_body = ddetr_predictor(1.0, 1).model.backbone[0].body
    backbone = resnet_fpn_backbone(
        backbone_name=cfg.model_overrides["backbone"],
        weights=None,
        norm_layer=FrozenBatchNorm2d,
        trainable_layers=3,
        returned_layers=[2, 3, 4],
    )
    backbone.body.load_state_dict(source_body.state_dict())
    anchors = AnchorGenerator(sizes=((16,), (32,), (64,), (128,)), aspect_ratios=((0.5, 1.0, 2.0),) * 4)
    model = FasterRCNN(
        backbone,
        num_classes=num_classes + 1,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=7, sampling_ratio=2),
        box_score_thresh=0.001,
        box_detections_per_img=100,
    )
    assert tc.backbone_checksum(model.backbone.body) == checksum
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=SGD_LR, momentum=0.9, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / WARMUP_STEPS))

    def step(batch):
        images, targets = batch
        model.train()
        size = images[0].shape[-2:]
        tv_targets = []
        for image, target in zip(images, targets):
            h, w = image.shape[-2:]
            cx, cy, bw, bh = target["boxes"].unbind(-1)
            xyxy = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], -1)
            tv_targets.append({"boxes": xyxy, "labels": target["labels"] + 1})
        tc.set_identity_transform(model, size)
        losses = model(images, tv_targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        warmup.step()

    def predictor(scale, max_dets):
        return tc.TorchvisionPredictor(model, scale, max_dets)

    return cfg, step, predictor, checksum
