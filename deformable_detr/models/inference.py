"""Inference-time rewrites of a built model: frozen batch norm folded into the convolutions, channels_last
backbone, and ``torch.compile`` of the whole model (``fullgraph``: our op has a fake kernel, so nothing breaks
the graph).

    model = deformable_detr.models.optimize_for_inference(model)               # fold BN, channels_last
    model = deformable_detr.models.optimize_for_inference(model, compile=True) # ... and torch.compile it

The rewrites change the module tree (each ``FrozenBatchNorm2d`` becomes ``nn.Identity``, its scale and shift
move into the convolution's weight and bias), so save checkpoints from the unoptimised model. Outputs equal the
original's within float32 round-off.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d


def _fold_into(conv: nn.Conv2d, bn: FrozenBatchNorm2d) -> None:
    """conv <- bn(conv(x)) = conv(x) * s + t with s = w / sqrt(var + eps), t = b - mean * s."""
    with torch.no_grad():
        scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
        shift = bn.bias - bn.running_mean * scale
        weight = conv.weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias * scale + shift
    conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
    conv.bias = nn.Parameter(bias, requires_grad=conv.weight.requires_grad)


def _pairs(module: nn.Module):
    """(parent, conv name, bn name) for every conv whose output goes straight into a frozen BN: ``convK``/``bnK``
    siblings (torchvision ResNet stem and blocks) and consecutive children of an ``nn.Sequential``
    (``downsample``)."""
    for parent in module.modules():
        children = dict(parent.named_children())
        if isinstance(parent, nn.Sequential):
            names = list(children)
            for a, b in zip(names, names[1:]):
                if isinstance(children[a], nn.Conv2d) and isinstance(children[b], FrozenBatchNorm2d):
                    yield parent, a, b
            continue
        for name, child in children.items():
            if isinstance(child, FrozenBatchNorm2d) and name.startswith("bn"):
                conv = children.get("conv" + name[2:])
                if isinstance(conv, nn.Conv2d):
                    yield parent, "conv" + name[2:], name


def fold_frozen_batchnorm(model: nn.Module) -> int:
    """Fold every ``FrozenBatchNorm2d`` that directly follows a convolution into it (in place); returns how
    many were folded. Only frozen (statistics-free) batch norms are folded, so training behaviour is unchanged
    for everything else."""
    pairs = list(_pairs(model))
    for parent, conv_name, bn_name in pairs:
        _fold_into(getattr(parent, conv_name), getattr(parent, bn_name))
        setattr(parent, bn_name, nn.Identity())
    return len(pairs)


def _backbone(model: nn.Module) -> nn.Module | None:
    joiner = getattr(model, "backbone", None)
    return joiner[0] if isinstance(joiner, nn.Sequential) and len(joiner) else None


def use_channels_last(model: nn.Module) -> bool:
    """Run the backbone's convolutions in channels_last (NHWC); returns False if the model has no backbone."""
    backbone = _backbone(model)
    if backbone is None:
        return False
    backbone.to(memory_format=torch.channels_last)
    backbone.channels_last = True
    return True


def compile_model(model: nn.Module, **kwargs) -> nn.Module:
    """``torch.compile(model, fullgraph=True, dynamic=False, **kwargs)``: one graph per input size (detection
    inputs come in few sizes; shapes stay static so the level tables are constants)."""
    kwargs.setdefault("fullgraph", True)
    kwargs.setdefault("dynamic", False)
    return torch.compile(model, **kwargs)


def optimize_for_inference(
    model: nn.Module,
    *,
    fold_batchnorm: bool = True,
    channels_last: bool = True,
    compile: bool = False,
    **compile_kwargs,
) -> nn.Module:
    """Put ``model`` in eval mode and apply the inference rewrites (in place); returns the model, or its
    ``torch.compile`` wrapper when ``compile=True`` (``compile_kwargs`` go to :func:`compile_model`)."""
    model.eval()
    if fold_batchnorm:
        fold_frozen_batchnorm(model)
    if channels_last:
        use_channels_last(model)
    return compile_model(model, **compile_kwargs) if compile else model
