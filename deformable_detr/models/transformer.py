"""DETR's transformer: post-norm encoder/decoder over the flattened C5 map, object queries as learned slots.

The decoder starts from zeros; what distinguishes the queries is their learned positional embedding
(``query_embed``), added to queries and keys of every attention. Each query ends up owning one object (or
"no object"), so no NMS is needed. The decoder returns every layer's output (normed) for the auxiliary losses.
Sequence-first layout [S, B, D] and ``nn.MultiheadAttention`` keep the original parameter names
(``self_attn.in_proj_weight``).
"""

from __future__ import annotations

import torch
from torch import nn

from deformable_detr.models.layers import Dropout, activation


def _with_pos(tensor: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, act="relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = activation(act)

    def forward(self, src, src_key_padding_mask=None, pos=None):
        q = k = _with_pos(src, pos)
        src2 = self.self_attn(q, k, value=src, key_padding_mask=src_key_padding_mask, need_weights=False)[0]
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout2(src2))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1, act="relu"):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = activation(act)

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None):
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, value=tgt, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.multihead_attn(
            query=_with_pos(tgt, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(tgt2))


class TransformerEncoder(nn.Module):
    def __init__(self, layer_fn, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(layer_fn() for _ in range(num_layers))
        self.num_layers = num_layers

    def forward(self, src, src_key_padding_mask=None, pos=None):
        for layer in self.layers:
            src = layer(src, src_key_padding_mask=src_key_padding_mask, pos=pos)
        return src


class TransformerDecoder(nn.Module):
    def __init__(self, layer_fn, num_layers: int, d_model: int):
        super().__init__()
        self.layers = nn.ModuleList(layer_fn() for _ in range(num_layers))
        self.num_layers = num_layers
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, memory_key_padding_mask=None, pos=None, query_pos=None) -> torch.Tensor:
        """Returns [num_layers, Q, B, D]: each layer's output after the shared final norm (for aux losses)."""
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask=memory_key_padding_mask, pos=pos, query_pos=query_pos)
            intermediate.append(self.norm(tgt))
        return torch.stack(intermediate)


class Transformer(nn.Module):
    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        act: str = "relu",
    ):
        super().__init__()
        self.encoder = TransformerEncoder(
            lambda: TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, act), num_encoder_layers
        )
        self.decoder = TransformerDecoder(
            lambda: TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, act), num_decoder_layers, d_model
        )
        self.d_model = d_model
        self.nhead = nhead
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src, mask, query_embed, pos_embed) -> tuple[torch.Tensor, torch.Tensor]:
        """src [B, D, H, W], mask [B, H, W] (True = padding), query_embed [Q, D], pos_embed [B, D, H, W].

        Returns (hs [num_layers, B, Q, D], memory [B, D, H, W]).
        """
        bs, c, h, w = src.shape
        src = src.flatten(2).permute(2, 0, 1)
        pos_embed = pos_embed.flatten(2).permute(2, 0, 1)
        query_embed = query_embed.unsqueeze(1).expand(-1, bs, -1)
        mask = mask.flatten(1)
        tgt = torch.zeros_like(query_embed)
        memory = self.encoder(src, src_key_padding_mask=mask, pos=pos_embed)
        hs = self.decoder(tgt, memory, memory_key_padding_mask=mask, pos=pos_embed, query_pos=query_embed)
        return hs.transpose(1, 2), memory.permute(1, 2, 0).view(bs, c, h, w)
