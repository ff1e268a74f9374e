"""Public entry point of multi-scale deformable attention: validation, backend choice, autograd and fake kernels.

Backends (all compute the contract in README, "Operator contract"):
- ``"cuda"``: hand-written CUDA kernels of the compiled extension (``torch.ops.deformable_detr.ms_deform_attn``).
- ``"triton"``: Triton kernels (``torch.ops.deformable_detr.ms_deform_attn_triton``), CUDA tensors, or CPU tensors
  under ``TRITON_INTERPRET=1``.
- ``"cpu"``: the multithreaded C++ kernel of the compiled extension (same op, CPU dispatch key).
- ``"pytorch"``: the ``grid_sample`` reference, always available.

Dtype rule (also what autocast gets): the output has ``value``'s dtype; sampling locations and attention weights
are computed in float32 for float16/bfloat16 values and in ``value``'s dtype otherwise, and every backend
accumulates in float32 (float64 for float64).

Normalized form that the compiled backends receive (after validation; ``ms_deform_attn_triton`` and the op
``torch.ops.deformable_detr.ms_deform_attn`` take the same arguments)::

    backend(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            point_start=None, discrete=False)

- value (N, S, M, D), any strides, float32/float64/float16/bfloat16;
- spatial_shapes (L, 2), level_start_index (L,): int64 on value's device, values checked;
- sampling_locations / attention_weights in ``position_dtype(value.dtype)``, any strides;
- ``point_start is None``: the uniform layout, locations (N, Q, M, L, P, 2), weights (N, Q, M, L, P) (also a
  ``points_per_level`` call whose counts are all equal: a view of its (N, Q, M, K, 2) tensors);
- ``point_start`` an (L + 1,) int64 tensor on value's device, ``[0, P_0, P_0 + P_1, ..., K]`` (checked, cached
  per table: ``deformable_detr.ops.levels.PointTable``): locations (N, Q, M, K, 2), weights (N, Q, M, K); level l
  owns points ``[point_start[l], point_start[l + 1])``; P_l may be 0 and levels may be empty;
- ``discrete``: bool, the ``sampling="discrete"`` rule (README, "Operator contract").

A backend that does not take these yet runs the reference for such calls (``_handles_points``); the Triton
package signals it does by ``SUPPORTS_POINTS_AND_SAMPLING = True`` in ``deformable_detr.ops.triton``. Uniform
bilinear calls pass only the five tensors.
"""

from __future__ import annotations

import os

import torch

from deformable_detr._extension import extension_loaded, has_kernel, load_error
from deformable_detr.ops.levels import LevelTable, lookup, prepare_points
from deformable_detr.ops.reference import check_sampling, reference_forward

BACKENDS = ("cuda", "triton", "cpu", "pytorch")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)
_OP = "ms_deform_attn"


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def _triton_module():
    from deformable_detr.ops import triton as triton_ops

    return triton_ops


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The one backend memo: (requested backend, device) -> what _choice returns. Entries are never dropped: what a choice depends
# on (the extension, triton's importability, TRITON_INTERPRET, which triton reads when the kernels are defined,
# CUDA availability) is fixed once the op has run in a process. Keyed by torch.device, not its .type: hashing a
# device is cheap, reading .type is not (~0.7 us per read).
_CHOICES: dict[tuple[str | None, torch.device], tuple[str | None, str | None, bool]] = {}


@torch.compiler.assume_constant_result
def _choice(backend: str | None, device: torch.device) -> tuple[str | None, str | None, bool]:
    """``(backend that runs, None, native_points)``, or ``(None, what is missing, False)`` when the requested
    backend cannot run on ``device``. ``native_points``: the backend runs points_per_level and discrete sampling
    itself (else the reference runs those calls). A compile-time constant to torch.compile."""
    key = (backend, device)
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _choose(backend, device)
        if backend in _REQUESTS:  # an unknown name is not remembered
            _CHOICES[key] = choice
    return choice


_REQUESTS = (None, "auto", *BACKENDS)


def _choose(backend: str | None, device: torch.device) -> tuple[str | None, str | None, bool]:
    if backend is None or backend == "auto":
        if device.type == "cuda":
            candidates = ("cuda", "triton")
        elif device.type == "cpu":
            candidates = ("cpu",)
        else:
            candidates = ()
        backend = next((b for b in candidates if _missing(b, device) is None), "pytorch")
    missing = _missing(backend, device)
    if missing is not None:
        return None, missing, False
    return backend, None, _handles_points(backend)


def _missing(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else a sentence saying what is missing."""
    if backend == "pytorch":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return f'backend "{backend}": no CUDA device is available (torch.cuda.is_available() is False)'
    if backend in ("cpu", "cuda"):
        if backend != device.type:
            return f'backend "{backend}" runs on {backend} tensors, got tensors on {device}'
        if not extension_loaded():
            return (
                f'backend "{backend}" needs the compiled extension deformable_detr._C, which failed to import '
                f"({load_error()}); build it with `pip install --no-build-isolation .`"
            )
        if not has_kernel(_OP, backend.upper()):
            return (
                f'backend "{backend}": the extension was built without {backend.upper()} kernels '
                "(rebuild with a CUDA toolkit present, CUDA_HOME set, or FORCE_CUDA=1)"
                if backend == "cuda"
                else f'backend "{backend}": the extension has no CPU kernel'
            )
        return None
    if backend == "triton":
        if not _triton_importable():
            return 'backend "triton" needs the triton package (pip install triton)'
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _triton_interpreting():
            return None
        return f'backend "triton" runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}'
    return f'unknown backend "{backend}"; expected one of {", ".join(BACKENDS)} or None/"auto"'


def _handles_points(backend: str) -> bool:
    """Whether ``backend`` runs the points layout and discrete sampling natively (else the reference runs)."""
    if backend == "triton":
        return bool(getattr(_triton_module(), "SUPPORTS_POINTS_AND_SAMPLING", False))
    if backend in ("cpu", "cuda"):  # the compiled op's schema has the two arguments (an extension from this tree)
        return extension_loaded() and "point_start" in str(torch.ops.deformable_detr.ms_deform_attn.default._schema)
    return True  # the reference


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device``, fastest first (``"pytorch"`` is always last)."""
    device = torch.device(device)
    # On CPU the Triton interpreter is a testing aid, far slower than the C++ kernel.
    order = ("cpu", "triton", "pytorch") if device.type == "cpu" else BACKENDS
    return [b for b in order if _choice(b, device)[1] is None]


def _auto_backend(device: torch.device) -> str:
    return _choice(None, device)[0]


def _resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that runs a call (RuntimeError naming what is missing for an unavailable explicit one)."""
    resolved, missing, _ = _choice(backend, device)
    if missing is not None:
        raise RuntimeError(f"ms_deform_attn: {missing}")
    return resolved


_ARG_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def _check_inputs(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, ragged: bool = False
) -> None:
    """Shape/dtype/device validation with messages naming the argument: attribute reads only (no tensor math,
    no device synchronisation); the tables' values are checked by :mod:`deformable_detr.ops.levels`."""
    Tensor = torch.Tensor
    if not (
        isinstance(value, Tensor)
        and isinstance(spatial_shapes, Tensor)
        and isinstance(level_start_index, Tensor)
        and isinstance(sampling_locations, Tensor)
        and isinstance(attention_weights, Tensor)
    ):
        args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
        for name, t in zip(_ARG_NAMES, args):
            if not isinstance(t, Tensor):
                raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(t).__name__}")
    value_shape = value.shape
    if len(value_shape) != 4:
        raise ValueError(f"ms_deform_attn: value must have shape (N, S, M, D), got {tuple(value_shape)}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"ms_deform_attn: value must be float32, float64, float16 or bfloat16, got {value.dtype}")
    N, S, M, D = value_shape
    shapes_shape = spatial_shapes.shape
    if len(shapes_shape) != 2 or shapes_shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must have shape (L, 2), got {tuple(shapes_shape)}")
    if spatial_shapes.dtype not in _INDEX_DTYPES:
        raise TypeError(f"ms_deform_attn: spatial_shapes must be int64 (or int32), got {spatial_shapes.dtype}")
    L = shapes_shape[0]
    if level_start_index.shape != (L,):
        raise ValueError(
            f"ms_deform_attn: level_start_index must have shape (L,) = ({L},), got {tuple(level_start_index.shape)}"
        )
    if level_start_index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"ms_deform_attn: level_start_index must be int64 (or int32), got {level_start_index.dtype}")
    loc_shape = sampling_locations.shape
    if ragged:
        if len(loc_shape) != 5 or loc_shape[4] != 2:
            raise ValueError(
                "ms_deform_attn: with points_per_level, sampling_locations must have shape (N, Q, M, K, 2) with "
                f"K = sum(points_per_level) and last dim (x, y), got {tuple(loc_shape)}"
            )
        Q, K = loc_shape[1], loc_shape[3]
        if loc_shape[0] != N or loc_shape[2] != M:
            raise ValueError(
                f"ms_deform_attn: sampling_locations must have shape (N, Q, M, K, 2) = ({N}, Q, {M}, K, 2) "
                f"to match value {tuple(value_shape)}, got {tuple(loc_shape)}"
            )
        weights_shape = (N, Q, M, K)
        weights_layout = "(N, Q, M, K)"
    else:
        if len(loc_shape) != 6 or loc_shape[5] != 2:
            raise ValueError(
                "ms_deform_attn: sampling_locations must have shape (N, Q, M, L, P, 2) with last dim (x, y), "
                f"got {tuple(loc_shape)} (pass points_per_level for the (N, Q, M, K, 2) layout)"
            )
        Q, P = loc_shape[1], loc_shape[4]
        if loc_shape[0] != N or loc_shape[2] != M or loc_shape[3] != L:
            raise ValueError(
                f"ms_deform_attn: sampling_locations must have shape (N, Q, M, L, P, 2) = ({N}, Q, {M}, {L}, P, 2) "
                f"to match value {tuple(value_shape)} and spatial_shapes (L={L}), got {tuple(loc_shape)}"
            )
        weights_shape = (N, Q, M, L, P)
        weights_layout = "(N, Q, M, L, P)"
    if not sampling_locations.is_floating_point():
        raise TypeError(f"ms_deform_attn: sampling_locations must be a floating dtype, got {sampling_locations.dtype}")
    if attention_weights.shape != weights_shape:
        raise ValueError(
            f"ms_deform_attn: attention_weights must have shape {weights_layout} = {weights_shape}, "
            f"got {tuple(attention_weights.shape)}"
        )
    if not attention_weights.is_floating_point():
        raise TypeError(f"ms_deform_attn: attention_weights must be a floating dtype, got {attention_weights.dtype}")
    device = value.device
    if sampling_locations.device != device or attention_weights.device != device:
        for name, t in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
            if t.device != device:
                raise ValueError(f"ms_deform_attn: {name} is on {t.device}, value on {device}")


def position_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """Dtype of sampling locations / attention weights that the kernels take for a given value dtype."""
    return torch.float32 if value_dtype in (torch.float16, torch.bfloat16) else value_dtype


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    *,
    backend: str | None = None,
    points_per_level=None,
    sampling: str = "bilinear",
) -> torch.Tensor:
    """Multi-scale deformable attention (README, "Operator contract").

    Args:
        value: (N, S, M, D), S = sum of H_l * W_l.
        spatial_shapes: (L, 2) int64 (or int32) rows (H_l, W_l), on value's device or on the CPU.
        level_start_index: (L,) int64 (or int32), start of each level in S.
        sampling_locations: (N, Q, M, L, P, 2) normalized (x, y); values outside [0, 1] are legal. With
            ``points_per_level``: (N, Q, M, K, 2), points level-major (the first P_0 sample level 0, ...).
        attention_weights: (N, Q, M, L, P); with ``points_per_level``: (N, Q, M, K).
        backend: None/"auto" (fastest available for the device), "cuda", "triton", "cpu" or "pytorch".
        points_per_level: None (the 6-D layout, P points on every level) or a length-L sequence / (L,) int64
            (or int32) tensor of counts P_l >= 0 with K = sum P_l (RT-DETRv2 / D-FINE). Checked once per table
            (sequences by value, tensors by identity and version, as the level tables).
        sampling: "bilinear" (default) or "discrete": the nearest pixel ix = clamp(floor(x * W_l + 0.5), 0,
            W_l - 1), same for y, border-clamped; gradients reach value and weights, never locations.

    Returns:
        (N, Q, M * D) in ``value``'s dtype.

    Non-finite input (every backend): a sample whose x or y is NaN makes every channel of out[n, q, m, :] NaN; its
    gradients w.r.t. both coordinates and its attention weight are NaN and it adds nothing to grad_value, so a
    diverging model is not hidden. A location at +-inf lies outside every map: it contributes 0, zero gradients.
    A NaN attention weight propagates by IEEE arithmetic: out[n, q, m, :] is NaN (also outside the map, NaN * 0),
    its location gradient is NaN, grad_value is NaN at its in-map corners, its own gradient stays finite.
    With ``sampling="discrete"`` the same NaN rule holds (a NaN location: NaN out row, NaN location and weight
    gradients, nothing gathered into grad_value); every other location gradient is exactly 0 (also under a NaN
    weight), and +-inf, like any location off the map, clamps to the border pixel (discrete has no outside).

    Every call checks shapes, dtypes and devices; the level tables' values (sizes, starts, sum = S) are checked
    once per table, by the compiled CPU op in C++ or else here, and recognised afterwards by tensor identity and
    version counter (``deformable_detr.ops.levels``), so passing the same tables to every layer costs a few
    microseconds. Meta tensors run the fake kernel.
    """
    return ms_deform_attn_with_levels(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        None,
        backend=backend,
        points_per_level=points_per_level,
        sampling=sampling,
    )


def ms_deform_attn_with_levels(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    level_table: LevelTable | None,
    *,
    backend: str | None = None,
    points_per_level=None,
    sampling: str = "bilinear",
) -> torch.Tensor:
    """:func:`ms_deform_attn` for a caller that already holds the pair's checked table
    (``levels.lookup(spatial_shapes, level_start_index, value.shape[1])``; None: looked up here), so that a layer
    needing the table itself (``MSDeformAttn``'s offset normalizer) looks it up once per call."""
    ragged = points_per_level is not None
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, ragged)
    discrete = check_sampling(sampling)
    device = value.device
    if level_table is None:
        level_table = lookup(spatial_shapes, level_start_index, value.shape[1], device)
    tables = (spatial_shapes, level_start_index)
    spatial_shapes, level_start_index = level_table.on(device, spatial_shapes, level_start_index)
    point_start = None
    if ragged:
        table = prepare_points(points_per_level, spatial_shapes.shape[0], sampling_locations.shape[3])
        if table.uniform is not None:
            # Equal counts are the 6-D layout (same memory): a view, and the uniform kernels.
            L = len(table.counts)
            sampling_locations = sampling_locations.unflatten(3, (L, table.uniform))
            attention_weights = attention_weights.unflatten(3, (L, table.uniform))
        else:
            point_start = table.start_on(device)
    if device.type == "meta":
        return _meta_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    backend, missing, native_points = _choice(backend, device)
    if missing is not None:
        raise RuntimeError(f"ms_deform_attn: {missing}")
    runs_reference = backend == "pytorch" or ((point_start is not None or discrete) and not native_points)
    if runs_reference or backend != "cpu":  # the compiled CPU op checks the values itself (levels.py)
        level_table.check(*tables, value.shape[1])
    if runs_reference:
        return _reference_call(
            value,
            spatial_shapes,
            sampling_locations,
            attention_weights,
            point_start,
            table if ragged else None,
            discrete,
        )
    pos_dtype = position_dtype(value.dtype)
    if sampling_locations.dtype != pos_dtype:
        sampling_locations = sampling_locations.to(pos_dtype)
    if attention_weights.dtype != pos_dtype:
        attention_weights = attention_weights.to(pos_dtype)
    if backend == "triton":
        if point_start is None and not discrete:
            return _triton_module().ms_deform_attn_triton(
                value, spatial_shapes, level_start_index, sampling_locations, attention_weights
            )
        return _triton_module().ms_deform_attn_triton(
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            point_start=point_start,
            discrete=discrete,
        )
    if point_start is None and not discrete:
        return torch.ops.deformable_detr.ms_deform_attn(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
    return torch.ops.deformable_detr.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start, discrete
    )


def _reference_call(value, spatial_shapes, sampling_locations, attention_weights, point_start, table, discrete):
    if point_start is None:
        L, P = sampling_locations.shape[3], sampling_locations.shape[4]
        counts = (P,) * L
        sampling_locations = sampling_locations.flatten(3, 4)
        attention_weights = attention_weights.flatten(3, 4)
    else:
        counts = table.counts
    return reference_forward(value, spatial_shapes, sampling_locations, attention_weights, counts, discrete)


def _meta_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Meta tensors (shape inference, ``torch.device("meta")`` model construction): the op's fake kernel when
    the extension is loaded (autograd included), else an empty result of the contract's shape."""
    N, _, M, D = value.shape
    if sampling_locations.dim() == 5 or not extension_loaded():
        return value.new_empty((N, sampling_locations.shape[1], M * D))
    pos_dtype = position_dtype(value.dtype)
    sampling_locations = sampling_locations.to(pos_dtype)
    attention_weights = attention_weights.to(pos_dtype)
    return torch.ops.deformable_detr.ms_deform_attn(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )


# --- fake kernels and autograd, registered only for ops that exist (an unguarded register_fake would break
# `import deformable_detr` whenever the extension failed to load).


def _register() -> None:
    if not extension_loaded():
        return

    @torch.library.register_fake("deformable_detr::ms_deform_attn")
    def _fake_forward(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        point_start=None,
        discrete=False,
    ):
        # Shape rules (the C++ checks): locations (N, Q, M, L, P, 2), or (N, Q, M, K, 2) with point_start (L + 1,).
        torch._check(sampling_locations.dim() == (6 if point_start is None else 5))
        if point_start is not None:
            torch._check(point_start.dim() == 1 and point_start.shape[0] == spatial_shapes.shape[0] + 1)
        N, _, M, D = value.shape
        return value.new_empty((N, sampling_locations.shape[1], M * D))

    @torch.library.register_fake("deformable_detr::ms_deform_attn_backward")
    def _fake_backward(
        grad_output,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        point_start=None,
        discrete=False,
    ):
        return (
            torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
        )

    def _setup_context(ctx, inputs, output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = inputs[:5]
        point_start = inputs[5] if len(inputs) > 5 else None
        ctx.discrete = bool(inputs[6]) if len(inputs) > 6 else False
        ctx.save_for_backward(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start
        )

    def _backward(ctx, grad_output):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = torch.ops.deformable_detr.ms_deform_attn_backward(
            grad_output.contiguous(),
            value,
            spatial_shapes,
            level_start_index,
            sampling_locations,
            attention_weights,
            point_start,
            ctx.discrete,
        )
        return grad_value, None, None, grad_locations, grad_weights, None, None

    torch.library.register_autograd("deformable_detr::ms_deform_attn", _backward, setup_context=_setup_context)


_register()
