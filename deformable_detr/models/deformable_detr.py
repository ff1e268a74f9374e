"""Deformable DETR: multi-scale features (C3-C5 + a stride-2 C6), deformable attention, a sigmoid focal head.

Head sharing follows the original exactly, because checkpoints depend on it:
- plain: one class head and one box head, shared by all decoder layers (listed once per layer in the
  state dict, as ``class_embed.0`` ... ``class_embed.5``);
- ``with_box_refine``: an independent head per decoder layer, and the decoder uses the box heads to refine its
  reference boxes layer by layer;
- ``two_stage`` (needs box refine): one more head pair (index ``dec_layers``) scores encoder pixels to propose
  the decoder's queries; the encoder proposals are supervised too (``enc_outputs``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deformable_detr.models.backbone import Joiner
from deformable_detr.models.deformable_transformer import DeformableTransformer
from deformable_detr.models.detr import aux_outputs
from deformable_detr.models.image_batch import to_image_batch
from deformable_detr.models.layers import MLP, clones, inverse_sigmoid


class DeformableDETR(nn.Module):
    """``forward(images)`` -> dict:

    - ``pred_logits`` [B, Q, num_classes] (sigmoid scores, no "no object" class),
    - ``pred_boxes`` [B, Q, 4] normalised (cx, cy, w, h),
    - ``aux_outputs``: per earlier decoder layer (when ``aux_loss``),
    - ``enc_outputs``: the encoder's proposals {pred_logits [B, S, num_classes], pred_boxes} (two-stage only).
    """

    def __init__(
        self,
        backbone: Joiner,
        transformer: DeformableTransformer,
        num_classes: int,
        num_queries: int,
        num_feature_levels: int,
        aux_loss: bool = True,
        with_box_refine: bool = False,
        two_stage: bool = False,
    ):
        super().__init__()
        if two_stage and not with_box_refine:
            raise ValueError("two_stage=True needs with_box_refine=True (as in the original Deformable DETR)")
        self.num_queries = num_queries
        self.num_classes = num_classes
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_feature_levels = num_feature_levels
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        if num_feature_levels > 1:
            in_channels = list(backbone.num_channels)
            projections = [
                nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                for c in in_channels
            ]
            # Levels beyond C5 come from stride-2 3x3 convs, the first on C5 itself.
            previous = in_channels[-1]
            for _ in range(num_feature_levels - len(in_channels)):
                projections.append(
                    nn.Sequential(
                        nn.Conv2d(previous, hidden_dim, kernel_size=3, stride=2, padding=1),
                        nn.GroupNorm(32, hidden_dim),
                    )
                )
                previous = hidden_dim
            self.input_proj = nn.ModuleList(projections)
        else:
            self.input_proj = nn.ModuleList(
                [
                    nn.Sequential(
                        nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim)
                    )
                ]
            )
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        # Focal-loss prior: every class starts at p = 0.01 so the many negatives don't swamp early training.
        prior_prob = 0.01
        bias_value = -math.log((1 - prior_prob) / prior_prob)
        nn.init.constant_(self.class_embed.bias, bias_value)
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = clones(self.class_embed, num_pred)
            self.bbox_embed = clones(self.bbox_embed, num_pred)
            # Only the first layer predicts from scratch; small initial boxes (sigmoid(-2) ~ 0.12).
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(self.bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([self.class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([self.bbox_embed for _ in range(num_pred)])
            self.transformer.decoder.bbox_embed = None
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            # Proposals already carry a size, so heads predict size corrections around zero.
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias[2:], 0.0)

    def forward(self, images) -> dict:
        batch = to_image_batch(images)
        features, pos = self.backbone(batch)
        srcs, masks = [], []
        for lvl, (feature, mask) in enumerate(features):
            srcs.append(self.input_proj[lvl](feature))
            masks.append(mask)
        for lvl in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1][0] if lvl == len(features) else srcs[-1])
            mask = batch.mask_at(src.shape[-2:])
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone.position(src, mask, batch.padded))

        query_embeds = None if self.two_stage else self.query_embed.weight
        # No padding (known on the host): the transformer skips the per-layer masking and reuses its tables.
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, None if batch.padded is False else masks, pos, query_embeds
        )
        outputs_classes, outputs_coords = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if lvl == 0 else inter_references[lvl - 1])
            outputs_classes.append(self.class_embed[lvl](hs[lvl]))
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                coord_unact = delta + reference
            else:
                coord_unact = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            outputs_coords.append(coord_unact.sigmoid())
        outputs_class = torch.stack(outputs_classes)
        outputs_coord = torch.stack(outputs_coords)

        out = {"pred_logits": outputs_class[-1], "pred_boxes": outputs_coord[-1]}
        if self.aux_loss:
            out["aux_outputs"] = aux_outputs(outputs_class, outputs_coord)
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out
