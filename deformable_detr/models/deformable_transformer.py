"""Deformable DETR's transformer, built on our ``MSDeformAttn``.

Instead of attending to every pixel, each query looks at ``n_points`` learned offsets around a reference point
on every level, so the encoder can afford all of C3-C6 and the model converges ~10x faster than DETR.
Encoder queries are the pixels themselves (reference = pixel centre); decoder queries are the object slots
(reference = a learned point, a refined box with ``with_box_refine``, or an encoder proposal with ``two_stage``).
Batch-first layout; module names match the original so its checkpoints load strict.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from deformable_detr.models.layers import Dropout, ShapeCache, activation, inverse_sigmoid
from deformable_detr.modules import MSDeformAttn


def _with_pos(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


def _pixels(size, device) -> torch.Tensor:
    """``0, 1, ..., size - 1`` as float32 (exactly the originals' ``linspace(0, size - 1, size)``). ``arange``, not
    ``linspace``: linspace's step count is a plain int, so torch.export bakes the example's size into the graph,
    while arange's end stays a symbolic size and the exported graph serves every input size."""
    return torch.arange(size, dtype=torch.float32, device=device)


def level_tables(spatial_shapes_list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``spatial_shapes`` [L, 2] and ``level_start_index`` [L] (int64, on ``device``) from the host's level sizes:
    no device arithmetic, and on CUDA a non-blocking copy instead of a synchronising one."""
    starts, start = [], 0
    for h, w in spatial_shapes_list:
        starts.append(start)
        start += h * w
    spatial_shapes = torch.tensor(spatial_shapes_list, dtype=torch.long).reshape(-1, 2)
    level_start_index = torch.tensor(starts, dtype=torch.long)
    device = torch.device(device)
    if device.type == "cuda" and not torch.compiler.is_compiling():
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in (spatial_shapes, level_start_index))
    return spatial_shapes.to(device), level_start_index.to(device)


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(
        self, d_model=256, d_ffn=1024, dropout=0.1, act="relu", n_levels=4, n_heads=8, n_points=4, backend=None
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation(act)
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        src2 = self.self_attn(
            _with_pos(src, pos), reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(
        self, d_model=256, d_ffn=1024, dropout=0.1, act="relu", n_levels=4, n_heads=8, n_points=4, backend=None
    ):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, backend=backend)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation(act)
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self, tgt, query_pos, reference_points, src, src_spatial_shapes, level_start_index, src_padding_mask=None
    ):
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(
            _with_pos(tgt, query_pos), reference_points, src, src_spatial_shapes, level_start_index, src_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer_fn, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(layer_fn() for _ in range(num_layers))
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes, valid_ratios, device) -> torch.Tensor:
        """Centre of every valid-normalised pixel of every level, seen from every level: [B, S, L, 2]."""
        reference_points_list = []
        for lvl, (h, w) in enumerate(spatial_shapes):
            ref_y, ref_x = torch.meshgrid(_pixels(h, device) + 0.5, _pixels(w, device) + 0.5, indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, spatial_shapes_list, level_start_index, valid_ratios, pos, padding_mask,
                reference_points=None):  # fmt: skip
        if reference_points is None:
            reference_points = self.get_reference_points(spatial_shapes_list, valid_ratios, src.device)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableTransformerDecoder(nn.Module):
    def __init__(self, layer_fn, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(layer_fn() for _ in range(num_layers))
        self.num_layers = num_layers
        # Set by DeformableDETR: per-layer box heads for iterative refinement, class heads for two-stage.
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index, src_valid_ratios,
                query_pos=None, src_padding_mask=None):  # fmt: skip
        """Returns (hs [num_layers, B, Q, D], reference points after each layer [num_layers, B, Q, 2|4])."""
        output = tgt
        intermediate, intermediate_reference_points = [], []
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                scale = torch.cat([src_valid_ratios, src_valid_ratios], -1)[:, None]
            else:
                scale = src_valid_ratios[:, None]
            reference_points_input = reference_points[:, :, None] * scale
            output = layer(
                output, query_pos, reference_points_input, src, src_spatial_shapes, src_level_start_index,
                src_padding_mask,
            )  # fmt: skip
            if self.bbox_embed is not None:
                # Each layer predicts a correction in logit space; detached so every layer learns its own step.
                delta = self.bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference_points = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    new_reference_points = torch.cat(
                        [delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1
                    ).sigmoid()
                reference_points = new_reference_points.detach()
            intermediate.append(output)
            intermediate_reference_points.append(reference_points)
        return torch.stack(intermediate), torch.stack(intermediate_reference_points)


class DeformableTransformer(nn.Module):
    def __init__(
        self,
        d_model=256,
        nhead=8,
        num_encoder_layers=6,
        num_decoder_layers=6,
        dim_feedforward=1024,
        dropout=0.1,
        act="relu",
        num_feature_levels=4,
        dec_n_points=4,
        enc_n_points=4,
        two_stage=False,
        two_stage_num_proposals=300,
        backend=None,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        self.encoder = DeformableTransformerEncoder(
            lambda: DeformableTransformerEncoderLayer(
                d_model, dim_feedforward, dropout, act, num_feature_levels, nhead, enc_n_points, backend
            ),
            num_encoder_layers,
        )
        self.decoder = DeformableTransformerDecoder(
            lambda: DeformableTransformerDecoderLayer(
                d_model, dim_feedforward, dropout, act, num_feature_levels, nhead, dec_n_points, backend
            ),
            num_decoder_layers,
        )
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._static = ShapeCache()
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def _static_tables(self, spatial_shapes_list, batch: int, device):
        """(spatial_shapes, level_start_index, valid_ratios, encoder reference points) of an unpadded batch: a
        function of the level sizes only, made once per size. The level tables keep their identity across
        forwards, so each layer's one lookup (``deformable_detr.ops.levels.lookup``) finds them checked."""

        def make():
            spatial_shapes, level_start_index = level_tables(spatial_shapes_list, device)
            valid_ratios = torch.ones((1, len(spatial_shapes_list), 2), device=device)
            reference_points = DeformableTransformerEncoder.get_reference_points(
                spatial_shapes_list, valid_ratios, device
            )
            return spatial_shapes, level_start_index, valid_ratios, reference_points

        spatial_shapes, level_start_index, valid_ratios, reference_points = self._static.get(
            (tuple(spatial_shapes_list), torch.device(device)), make
        )
        return (
            spatial_shapes,
            level_start_index,
            valid_ratios.expand(batch, -1, -1),
            reference_points.expand(batch, -1, -1, -1),
        )

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """Sine embedding of proposal boxes (logits) [B, K, 4] -> [B, K, 2*d_model]."""
        num_pos_feats = self.d_model // 2
        temperature = 10000
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        proposals = proposals.sigmoid() * scale
        pos = proposals[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes_list):
        """One fixed-size box per encoder pixel (size 0.05 * 2^level), as logits; invalid ones set to +inf."""
        n = memory.shape[0]
        proposals = []
        cur = 0
        for lvl, (h, w) in enumerate(spatial_shapes_list):
            mask_flatten = memory_padding_mask[:, cur : cur + h * w].view(n, h, w, 1)
            valid_h = torch.sum(~mask_flatten[:, :, 0, 0], 1)
            valid_w = torch.sum(~mask_flatten[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(_pixels(h, memory.device), _pixels(w, memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0**lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            cur += h * w
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(memory_padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~valid, float("inf"))
        output_memory = memory.masked_fill(memory_padding_mask.unsqueeze(-1), 0.0)
        output_memory = output_memory.masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs, masks, pos_embeds, query_embed=None):
        """srcs/masks/pos_embeds: per level [B, D, H, W] / [B, H, W] / [B, D, H, W]; query_embed [Q, 2D].
        ``masks=None`` means no pixel is padding (no masking; tables reused per input size).

        Returns hs [num_dec_layers, B, Q, D], init_reference [B, Q, 2|4], inter_references
        [num_dec_layers, B, Q, 2|4], and for two-stage the encoder's class logits and box logits (else None).
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("query_embed is required unless two_stage=True")
        src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes_list = [], [], [], []
        for lvl, (src, pos_embed) in enumerate(zip(srcs, pos_embeds)):
            bs, c, h, w = src.shape
            spatial_shapes_list.append((h, w))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            if masks is not None:
                mask_flatten.append(masks[lvl].flatten(1))
            lvl_pos_embed_flatten.append(pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        lvl_pos_embed_flatten = torch.cat(lvl_pos_embed_flatten, 1)
        encoder_reference_points = None
        if masks is None:
            mask_flatten = None
            spatial_shapes, level_start_index, valid_ratios, encoder_reference_points = self._static_tables(
                spatial_shapes_list, bs, src_flatten.device
            )
        else:
            mask_flatten = torch.cat(mask_flatten, 1)
            spatial_shapes, level_start_index = level_tables(spatial_shapes_list, src_flatten.device)
            valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(
            src_flatten, spatial_shapes, spatial_shapes_list, level_start_index, valid_ratios,
            lvl_pos_embed_flatten, mask_flatten, encoder_reference_points,
        )  # fmt: skip

        bs, _, c = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            if mask_flatten is None:
                memory_padding_mask = memory.new_zeros(memory.shape[:2], dtype=torch.bool)
            else:
                memory_padding_mask = mask_flatten
            output_memory, output_proposals = self.gen_encoder_output_proposals(
                memory, memory_padding_mask, spatial_shapes_list
            )
            # The extra (last) heads score every encoder pixel; the top-k become the decoder's queries.
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            topk = min(self.two_stage_num_proposals, enc_outputs_class.shape[1])
            topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).expand(-1, -1, 4))
            topk_coords_unact = topk_coords_unact.detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        init_reference_out = reference_points

        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_pos, mask_flatten
        )
        return hs, init_reference_out, inter_references, enc_outputs_class, enc_outputs_coord_unact
