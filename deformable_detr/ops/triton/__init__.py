"""Triton backend of multi-scale deformable attention (``backend="triton"``).

Imported lazily by :mod:`deformable_detr.ops.ms_deform_attn`. Without the triton package this module still
imports, and :func:`ms_deform_attn_triton` raises an error saying what is missing.
"""

from __future__ import annotations

try:
    from deformable_detr.ops.triton.ms_deform_attn import ms_deform_attn_triton

    # The kernels take points per level (``point_start``) and ``discrete`` sampling natively.
    SUPPORTS_POINTS_AND_SAMPLING = True
except ImportError as _exc:  # triton missing, or too old for torch.library.triton_op
    _IMPORT_ERROR = f"{type(_exc).__name__}: {_exc}"

    SUPPORTS_POINTS_AND_SAMPLING = False

    def ms_deform_attn_triton(*args, **kwargs):
        raise RuntimeError(
            f'ms_deform_attn: backend "triton" needs the triton package (pip install triton); import failed with '
            f"{_IMPORT_ERROR}"
        )


__all__ = ["SUPPORTS_POINTS_AND_SAMPLING", "ms_deform_attn_triton"]
