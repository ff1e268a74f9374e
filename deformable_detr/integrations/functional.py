"""Our op behind the functional MSDA signatures other codebases call.

- :func:`multi_scale_deformable_attention` — ``(value, value_spatial_shapes, sampling_locations,
  attention_weights)``: HF transformers' Mask2Former / OneFormer / DETA function, and
  ``deformable_attention_core_func`` of the RT-DETR / D-FINE / DEIM repositories.
- :func:`deformable_attention_core_func_v2` — ``(value, value_spatial_shapes, sampling_locations,
  attention_weights, num_points_list, method="default")``: RT-DETRv2 / D-FINE / DEIM (and HF's
  ``multi_scale_deformable_attention_v2``): points per level may differ (level-major, ``sum(num_points_list)`` of
  them), ``method="discrete"`` samples the nearest pixel.

These callers pass level sizes as a Python list of ``(H, W)`` (or an ``(L, 2)`` tensor) and no start index. The
op wants two tensors, and it checks a table's values once per table object (``deformable_detr.ops.levels``), so
each distinct list maps to one cached ``(spatial_shapes, level_start_index)`` pair: the same two tensors reach the
op on every layer and every call, and the per-table cache hits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_MAX_TABLES = 64
_TABLES: dict[tuple[tuple[int, int], ...], tuple[torch.Tensor, torch.Tensor]] = {}
_SAMPLING = {"default": "bilinear", "discrete": "discrete"}


def _op():
    # Looked up on every call (not bound at import), so a wrapper installed on the module sees every call; an import
    # statement (not importlib) so that torch.compile traces through it.
    from deformable_detr.ops.ms_deform_attn import ms_deform_attn

    return ms_deform_attn


def _host_rows(value_spatial_shapes) -> tuple[tuple[int, int], ...] | None:
    """The level sizes as Python ints, or None when reading them would need a device sync or tracing."""
    if isinstance(value_spatial_shapes, torch.Tensor):
        if value_spatial_shapes.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        rows = value_spatial_shapes.tolist()
    else:
        rows = list(value_spatial_shapes)
    try:
        table = tuple((int(h), int(w)) for h, w in rows)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"value_spatial_shapes must be (L, 2) rows (H_l, W_l) (a list of pairs or an int tensor), got {rows!r}"
        ) from error
    return table


def level_tables(value_spatial_shapes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(spatial_shapes (L, 2) int64, level_start_index (L,) int64)`` for a list of ``(H, W)`` or an (L, 2) tensor.

    Host-readable sizes give one cached CPU pair per distinct list (made outside inference mode, so the op's table
    cache keeps it; the op copies it to the value's device once). A device tensor keeps its device: its start index
    is computed there, with no host read. Under ``torch.compile`` / ``torch.export`` nothing is cached.
    """
    if isinstance(value_spatial_shapes, torch.Tensor) and value_spatial_shapes.dim() != 2:
        raise ValueError(f"value_spatial_shapes must have shape (L, 2), got {tuple(value_spatial_shapes.shape)}")
    rows = _host_rows(value_spatial_shapes)
    if rows is None or torch.compiler.is_compiling():  # a device tensor, or traced
        if rows is None:
            shapes = value_spatial_shapes.to(torch.int64)
        else:
            shapes = torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)
        sizes = shapes[:, 0] * shapes[:, 1]
        return shapes, torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    pair = _TABLES.get(rows)
    if pair is None:
        starts, start = [], 0
        for h, w in rows:
            starts.append(start)
            start += h * w
        with torch.inference_mode(False):
            pair = (
                torch.tensor(rows, dtype=torch.int64).reshape(-1, 2),
                torch.tensor(starts, dtype=torch.int64),
            )
        if len(_TABLES) >= _MAX_TABLES:
            del _TABLES[next(iter(_TABLES))]
        _TABLES[rows] = pair
    return pair


def multi_scale_deformable_attention(
    value: torch.Tensor,
    value_spatial_shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """The 4-argument MSDA function: value (N, S, M, D), level sizes as a list of (H, W) or an (L, 2) tensor,
    sampling_locations (N, Q, M, L, P, 2), attention_weights (N, Q, M, L, P) -> (N, Q, M*D)."""
    spatial_shapes, level_start_index = level_tables(value_spatial_shapes)
    return _op()(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend=backend)


def _points_per_level(num_points_list, num_levels: int, total: int) -> tuple[int, ...]:
    points = tuple(int(p) for p in num_points_list)
    if len(points) != num_levels:
        raise ValueError(f"num_points_list must have one entry per level ({num_levels} levels), got {list(points)}")
    if sum(points) != total:
        raise ValueError(
            f"sum(num_points_list) = {sum(points)} must equal sampling_locations.shape[3] = {total} "
            "(points of all levels, level-major)"
        )
    return points


def _stacked_value(value) -> torch.Tensor:
    """(N, S, M, D) from a tensor, or from D-FINE's per-level sequence of (N, M, D, H_l*W_l) tensors (one copy)."""
    if isinstance(value, torch.Tensor):
        return value
    if not isinstance(value, Sequence) or not value or not all(isinstance(v, torch.Tensor) for v in value):
        raise TypeError(
            "value must be a tensor (N, S, M, D) or a non-empty list/tuple of per-level tensors (N, M, D, H_l*W_l), "
            f"got {type(value).__name__}"
        )
    if any(v.dim() != 4 for v in value):
        raise ValueError(
            f"value: per-level tensors must have shape (N, M, D, H_l*W_l), got {[tuple(v.shape) for v in value]}"
        )
    return torch.cat([v.permute(0, 3, 1, 2) for v in value], dim=1)


def deformable_attention_core_func_v2(
    value,
    value_spatial_shapes,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points_list: Sequence[int],
    method: str = "default",
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """RT-DETRv2 / D-FINE / DEIM's ``deformable_attention_core_func_v2`` (and HF's
    ``multi_scale_deformable_attention_v2``) on our op.

    Args:
        value: (N, S, M, D) (RT-DETRv2, HF), or D-FINE / DEIM's per-level list/tuple of (N, M, D, H_l*W_l).
        value_spatial_shapes: L rows (H_l, W_l): a list of pairs or an (L, 2) int tensor.
        sampling_locations: (N, Q, M, K, 2) normalized (x, y), K = sum(num_points_list), level-major.
        attention_weights: (N, Q, M, K).
        num_points_list: points per level, one entry per level (they may differ, e.g. D-FINE's [3, 6, 3]).
        method: "default" (bilinear, zero padding) or "discrete" (nearest pixel, clamped to the map; no gradient
            reaches the locations).
        backend: as in :func:`deformable_detr.ms_deform_attn`.

    Returns:
        (N, Q, M * D) in value's dtype.

    The original D-FINE code clamps both discrete coordinates to H_l - 1; this clamps x to W_l - 1 and y to
    H_l - 1 (RT-DETRv2's and HF's rule), which is the same on square levels.
    """
    if method not in _SAMPLING:
        raise ValueError(f'method must be "default" or "discrete", got {method!r}')
    value = _stacked_value(value)
    spatial_shapes, level_start_index = level_tables(value_spatial_shapes)
    if sampling_locations.dim() != 5 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            "sampling_locations must have shape (N, Q, M, sum(num_points_list), 2), got "
            f"{tuple(sampling_locations.shape)}"
        )
    if attention_weights.dim() != 4:
        raise ValueError(
            f"attention_weights must have shape (N, Q, M, sum(num_points_list)), got {tuple(attention_weights.shape)}"
        )
    K = sampling_locations.shape[3]
    points = _points_per_level(num_points_list, spatial_shapes.shape[0], K)
    extra = {} if method == "default" else {"sampling": _SAMPLING[method]}
    if points and all(p == points[0] for p in points) and points[0] > 0:
        # Uniform points: the 6-D layout of the fast path (a view: K splits into (L, P) without a copy).
        L, P = len(points), points[0]
        sampling_locations = sampling_locations.unflatten(3, (L, P))
        attention_weights = attention_weights.unflatten(3, (L, P))
    else:
        extra["points_per_level"] = points
    return _op()(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend=backend, **extra
    )
