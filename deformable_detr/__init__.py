"""deformable-detr: fast multi-scale deformable attention for PyTorch, and DETR / Deformable DETR built on it."""

from deformable_detr.modules import MSDeformAttn, MSDeformAttnFunction
from deformable_detr.ops.assignment import batched_linear_sum_assignment, linear_sum_assignment
from deformable_detr.ops.ms_deform_attn import available_backends, ms_deform_attn
from deformable_detr.ops.onnx import register as _register_onnx
from deformable_detr.ops.reference import ms_deform_attn_reference

# A plain torch.onnx.export of anything calling our op (both exporters); onnxscript itself is not imported here.
_register_onnx()

__version__ = "0.1.0"

# Heavier sub-packages load on first use (`dd.models.build(...)`, `dd.integrations.patch_transformers()`), so that
# `import deformable_detr` stays as cheap as the op itself.
_LAZY_SUBMODULES = ("models", "integrations", "data", "engine")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"deformable_detr.{name}")
    raise AttributeError(f"module 'deformable_detr' has no attribute {name!r}")


__all__ = [
    "MSDeformAttn",
    "MSDeformAttnFunction",
    "available_backends",
    "batched_linear_sum_assignment",
    "linear_sum_assignment",
    "ms_deform_attn",
    "ms_deform_attn_reference",
]
