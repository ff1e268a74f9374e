"""Small building blocks shared by DETR and Deformable DETR."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

# Dropout on CPU: ATen's bernoulli_ draws one double per element from the generator (serially, outside MKL on
# non-Intel CPUs), which made each dropout of the encoder FFN (7k x 1024) cost ~25x a multiply. Here the keep
# decision of an element is one 16-bit slice of a 64-bit draw, so a quarter of the draws: keep with probability
# t / 2^16, t = round((1 - p) * 2^16), scaled by 2^16 / t (unbiased for that rate; p = 0.1 keeps 0.899994).
_KEEP_BITS = 16


def _keep_threshold(p: float) -> int:
    return round((1.0 - p) * (1 << _KEEP_BITS))


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with a cheaper mask on CPU (see above); CUDA and compiled graphs use
    ``F.dropout`` itself (fused kernels there)."""
    if not training or p == 0.0:
        return x
    threshold = _keep_threshold(p)
    if x.device.type != "cpu" or torch.compiler.is_compiling() or not 0 < threshold < (1 << _KEEP_BITS):
        return F.dropout(x, p, True)
    words = (x.numel() + 3) // 4
    bits = torch.empty(words, dtype=torch.int64).random_(-(1 << 63), None).view(torch.int16)[: x.numel()]
    keep = bits.view(x.shape) < threshold - (1 << (_KEEP_BITS - 1))
    scale = torch.where(keep, x.new_full((), (1 << _KEEP_BITS) / threshold), x.new_zeros(()))
    return x * scale


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same module tree) running :func:`dropout`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return super().forward(x)
        return dropout(x, self.p, self.training)


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
