"""Small building blocks shared by DETR and Deformable DETR."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Feed-forward network with ReLU between ``num_layers`` linear layers (the box head: 3 layers)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        dims = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + dims, dims + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    # Clamped so refined boxes at the [0, 1] border stay finite.
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies (box refinement gives every decoder layer its own head)."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


def activation(name: str):
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "glu":
        return F.glu
    raise ValueError(f"activation must be relu, gelu or glu, got {name!r}")


class ShapeCache:
    """Parameter-free tensors that depend only on an input size (position encodings, level tables, reference
    points), made once per key instead of on every forward.

    Bypassed under ``torch.compile`` (the graph computes them and the compiler folds them). Entries are made
    outside inference mode and without autograd, so a cache filled under ``torch.inference_mode()`` still serves
    a later training step. Small and bounded: detection inputs come in few sizes.
    """

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self._entries: dict = {}

    def get(self, key, make):
        if torch.compiler.is_compiling():
            return make()
        value = self._entries.get(key)
        if value is None:
            with torch.inference_mode(False), torch.no_grad():
                value = make()
            if len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[key] = value
        return value

    def clear(self) -> None:
        self._entries.clear()
