"""Use our MSDA kernels inside HF transformers models.

``patch_transformers()`` replaces ``MultiScaleDeformableAttention.forward`` (the pure-PyTorch grid_sample
path) in every transformers model family that defines it (Deformable DETR, Grounding DINO, MM Grounding
DINO, RT-DETR, OmDet-Turbo) with a call to :func:`deformable_detr.ms_deform_attn`. Weights, configs and
outputs are unchanged; existing model instances pick it up immediately because the class is patched.
"""

from __future__ import annotations

import importlib

import torch

_FAMILIES = (
    "deformable_detr",
    "grounding_dino",
    "mm_grounding_dino",
    "rt_detr",
    "omdet_turbo",
)
_ORIGINAL_FORWARDS: dict[type, object] = {}


def _make_forward(backend: str | None):
    def forward(
        self,
        value: torch.Tensor,
        value_spatial_shapes: torch.Tensor,
        value_spatial_shapes_list,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        im2col_step: int = 64,
    ) -> torch.Tensor:
        from deformable_detr.ops.ms_deform_attn import ms_deform_attn

        # int32 tables are accepted as they are; the op checks them once per table (identity + version).
        return ms_deform_attn(
            value,
            value_spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            backend=backend,
        )

    forward._deformable_detr_patched = True
    return forward


def _attention_classes() -> list[type]:
    classes = []
    for family in _FAMILIES:
        try:
            module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        except Exception:  # a family missing from this transformers version, or its optional deps
            continue
        cls = getattr(module, "MultiScaleDeformableAttention", None)
        if cls is not None:
            classes.append(cls)
    return classes


def patch_transformers(backend: str | None = None) -> list[str]:
    """Route transformers' multi-scale deformable attention through our op; returns the patched classes
    (``module.Class`` names). ``backend`` as in :func:`deformable_detr.ms_deform_attn`. Idempotent."""
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError("patch_transformers() needs the transformers package (pip install transformers)") from error
    patched = []
    for cls in _attention_classes():
        _ORIGINAL_FORWARDS.setdefault(cls, cls.forward)
        cls.forward = _make_forward(backend)
        patched.append(f"{cls.__module__}.{cls.__qualname__}")
    if not patched:
        raise RuntimeError("patch_transformers(): no MultiScaleDeformableAttention class found in transformers")
    return patched


def unpatch_transformers() -> None:
    """Restore transformers' own implementation."""
    for cls, forward in _ORIGINAL_FORWARDS.items():
        cls.forward = forward
    _ORIGINAL_FORWARDS.clear()
