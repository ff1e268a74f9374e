"""Our MSDA op inside other codebases.

- :func:`patch_transformers` / :func:`unpatch_transformers`: every HF transformers family with multi-scale
  deformable attention runs on our op (``deformable_detr.integrations.hf``).
- :func:`deformable_attention_core_func_v2` and :func:`multi_scale_deformable_attention`: drop-in functions with
  the signatures of RT-DETRv2 / D-FINE / DEIM and of the 4-argument MSDA function
  (``deformable_detr.integrations.functional``).
"""

from deformable_detr.integrations.functional import (
    deformable_attention_core_func_v2,
    level_tables,
    multi_scale_deformable_attention,
)
from deformable_detr.integrations.hf import patch_transformers, unpatch_transformers

__all__ = [
    "deformable_attention_core_func_v2",
    "level_tables",
    "multi_scale_deformable_attention",
    "patch_transformers",
    "unpatch_transformers",
]
