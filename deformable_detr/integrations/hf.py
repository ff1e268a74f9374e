"""Use our MSDA kernels inside HF transformers models.

``patch_transformers()`` routes every transformers model family that defines multi-scale deformable attention
through :func:`deformable_detr.ms_deform_attn`. Weights, configs and outputs are unchanged, and models built
before the call are covered too. Each family keeps its MSDA in one of three places, and is patched there:

- a class ``MultiScaleDeformableAttention`` whose ``forward`` is the op (Deformable DETR, Grounding DINO,
  MM Grounding DINO, RT-DETR, OmDet-Turbo): the class's ``forward`` is replaced;
- a module-level function looked up at call time (Mask2Former, OneFormer and DETA's
  ``multi_scale_deformable_attention``, DETA's ``MultiScaleDeformableAttentionFunction`` for its JIT kernel,
  RT-DETRv2's ``multi_scale_deformable_attention_v2``): the module attribute is replaced;
- a function stored on each instance in ``__init__`` (D-FINE's ``self.ms_deformable_attn_core``), which a
  module-level replacement would miss for models built earlier — and would leave behind in models built while
  patched. The class gets a property of that name instead: it takes precedence over the instance's own
  attribute, answers our function while the instance holds transformers' original (anything else a user stored
  is returned as is), and is deleted by ``unpatch_transformers()``, which makes the stored original visible again.

A family missing from the installed transformers (older or newer versions, or optional dependencies absent) is
skipped.
"""

from __future__ import annotations

import importlib

import torch

from deformable_detr.integrations.functional import (
    deformable_attention_core_func_v2,
    multi_scale_deformable_attention,
)

# Families whose MultiScaleDeformableAttention.forward(value, shapes, shapes_list, starts, loc, attn, im2col) is the op.
_CLASS_FORWARD_FAMILIES = ("deformable_detr", "grounding_dino", "mm_grounding_dino", "rt_detr", "omdet_turbo")
# (family, module-level attribute, kind of replacement)
_MODULE_FUNCTIONS = (
    ("mask2former", "multi_scale_deformable_attention", "v1"),
    ("oneformer", "multi_scale_deformable_attention", "v1"),
    ("deprecated.deta", "multi_scale_deformable_attention", "v1"),
    ("deprecated.deta", "MultiScaleDeformableAttentionFunction", "function"),
    ("rt_detr_v2", "multi_scale_deformable_attention_v2", "v2"),
)
# (family, class, instance attribute, the module-level function the instance stores there)
_INSTANCE_FUNCTIONS = (
    ("d_fine", "DFineMultiscaleDeformableAttention", "ms_deformable_attn_core", "multi_scale_deformable_attention_v2"),
)

_MISSING = object()
# (owner, attribute) -> what was there before the first patch (_MISSING: nothing in the owner's own __dict__).
_ORIGINALS: dict[tuple[object, str], object] = {}


def _family_module(family: str):
    name = family.rsplit(".", 1)[-1]
    try:
        return importlib.import_module(f"transformers.models.{family}.modeling_{name}")
    except Exception:  # a family missing from this transformers version, or its optional dependencies
        return None


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


def _make_v1(backend: str | None):
    def patched(value, value_spatial_shapes, sampling_locations, attention_weights):
        return multi_scale_deformable_attention(
            value, value_spatial_shapes, sampling_locations, attention_weights, backend=backend
        )

    patched._deformable_detr_patched = True
    return patched


def _make_v2(backend: str | None):
    def patched(value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method="default"):
        return deformable_attention_core_func_v2(
            value, value_spatial_shapes, sampling_locations, attention_weights, num_points_list, method, backend=backend
        )

    patched._deformable_detr_patched = True
    return patched


def _make_function(backend: str | None):
    """Stand-in for an autograd.Function with the original CUDA extension's arguments."""

    class MultiScaleDeformableAttentionFunction:
        _deformable_detr_patched = True

        @staticmethod
        def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step=64):
            from deformable_detr.ops.ms_deform_attn import ms_deform_attn

            return ms_deform_attn(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend=backend
            )

    return MultiScaleDeformableAttentionFunction


_FACTORIES = {"v1": _make_v1, "v2": _make_v2, "function": _make_function}


def _make_instance_property(attribute: str, original, replacement) -> property:
    def get(self):
        stored = self.__dict__.get(attribute, original)
        return replacement if stored is original else stored

    def set_(self, function):
        self.__dict__[attribute] = function

    def delete(self):
        self.__dict__.pop(attribute, None)

    prop = property(get, set_, delete)
    prop.fget._deformable_detr_patched = True
    return prop


def _install(owner, attribute: str, new) -> None:
    key = (owner, attribute)
    if key not in _ORIGINALS:
        _ORIGINALS[key] = (
            owner.__dict__.get(attribute, _MISSING) if isinstance(owner, type) else getattr(owner, attribute)
        )
    setattr(owner, attribute, new)


def patch_transformers(backend: str | None = None) -> list[str]:
    """Route transformers' multi-scale deformable attention through our op; returns what was patched
    (``module.attribute`` names). ``backend`` as in :func:`deformable_detr.ms_deform_attn`. Calling it again
    switches the backend; :func:`unpatch_transformers` restores transformers' own code."""
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        raise ImportError("patch_transformers() needs the transformers package (pip install transformers)") from error
    patched = []
    for family in _CLASS_FORWARD_FAMILIES:
        module = _family_module(family)
        cls = getattr(module, "MultiScaleDeformableAttention", None)
        if cls is not None:
            _install(cls, "forward", _make_forward(backend))
            patched.append(f"{cls.__module__}.{cls.__qualname__}.forward")
    for family, attribute, kind in _MODULE_FUNCTIONS:
        module = _family_module(family)
        if module is not None and hasattr(module, attribute):
            _install(module, attribute, _FACTORIES[kind](backend))
            patched.append(f"{module.__name__}.{attribute}")
    for family, class_name, attribute, function_name in _INSTANCE_FUNCTIONS:
        module = _family_module(family)
        cls = getattr(module, class_name, None)
        if cls is not None and hasattr(module, function_name):
            original = getattr(module, function_name)  # never patched itself: see the module docstring
            _install(cls, attribute, _make_instance_property(attribute, original, _make_v2(backend)))
            patched.append(f"{cls.__module__}.{cls.__qualname__}.{attribute}")
    if not patched:
        raise RuntimeError("patch_transformers(): no multi-scale deformable attention found in transformers")
    return patched


def unpatch_transformers() -> None:
    """Restore transformers' own implementation everywhere patch_transformers() changed it."""
    for (owner, attribute), original in reversed(list(_ORIGINALS.items())):
        if original is _MISSING:
            delattr(owner, attribute)
        else:
            setattr(owner, attribute, original)
    _ORIGINALS.clear()
