"""ONNX export of ``deformable_detr::ms_deform_attn``, for both of ``torch.onnx.export``'s exporters.

Two translations of the op:

- ``"decomposed"`` (the default): standard ONNX operators only, so the graph runs in onnxruntime or any ONNX
  runtime with opset >= 16. Bilinear sampling is one ``GridSample`` per level (as the ``pytorch`` reference);
  ``sampling="discrete"`` is one ``GatherND`` per level on the nearest pixel ``clamp(floor(x * W + 0.5), 0, W - 1)``
  (``GridSample(mode="nearest")`` rounds ``x * W - 0.5`` half to even and pads with zeros: another rule). Points
  per level (``point_start``) sample every level at all K points and keep level l's range
  ``[point_start[l], point_start[l + 1])``, so the table may be any tensor (L GridSamples over K points, not one
  over P_l each). Non-finite locations follow the op's rule on the output (a NaN location makes its head NaN; a
  bilinear +-inf location contributes 0; a discrete one clamps to the border). Empty levels (H * W = 0) are not
  supported.
- ``"tensorrt"``: one node ``MultiscaleDeformableAttnPlugin_TRT`` (domain ``trt.plugins``, version 1), laid out as
  TensorRT's multi-scale deformable attention plugin consumes it: inputs ``value (N, S, M, D)``,
  ``spatial_shapes (L, 2)`` int32, ``level_start_index (L,)`` int32, ``sampling_locations (N, Q, M, L, P, 2)`` and
  ``attention_weights (N, Q, M, L, P)`` in ``value``'s float type; its ``(N, Q, M, D)`` output is reshaped to the
  op's ``(N, Q, M*D)``. No attributes. The graph runs where that plugin is registered (TensorRT), not in
  onnxruntime. The plugin has neither points per level nor discrete sampling: exporting them raises.

``import deformable_detr`` registers the decomposed translation with both exporters (:func:`register`), so a plain
``torch.onnx.export(model, args, f)`` works (``dynamo=True``, the default, and ``dynamo=False``). The dynamo
exporter's registry lives in ``onnxscript``, which takes seconds to import: the registration waits until something
imports it (an export does). A ``custom_translation_table`` takes precedence over the registered translation:

    from deformable_detr.ops import onnx as dd_onnx
    dd_onnx.export(model, args, "model.onnx", mode="tensorrt")
    # = torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=dd_onnx.custom_translation_table(mode))

:func:`export_model` exports a whole detector (named outputs, dynamic batch and image size).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

import torch

MODES = ("tensorrt", "decomposed")
TRT_DOMAIN = "trt.plugins"
TRT_OP = "MultiscaleDeformableAttnPlugin_TRT"
OP_NAME = "deformable_detr::ms_deform_attn"
# GridSample entered standard ONNX in opset 16.
MIN_OPSET = 16
_INT64 = 7  # onnx.TensorProto.INT64
_INT32 = 6  # onnx.TensorProto.INT32


# --- the decomposition, written once against an ONNX op builder: onnxscript's opset (dynamo exporter) or
# _TorchScriptOps (TorchScript exporter). Attributes are keyword arguments, constants explicit Constant nodes.


def _ints(op, values):
    return op.Constant(value_ints=list(values))


def _scalar_like(op, number: float, like):
    return op.CastLike(op.Constant(value_float=float(number)), like)


def _level_table(op, spatial_shapes, level_start_index, level: int):
    """(H, W) as a (2,) int64 tensor, and the level's [start, end) in S as (1,) int64 tensors."""
    index = _ints(op, [level])
    shape = op.Cast(op.Reshape(op.Gather(spatial_shapes, index, axis=0), _ints(op, [-1])), to=_INT64)
    start = op.Cast(op.Gather(level_start_index, index, axis=0), to=_INT64)
    area = op.Mul(op.Gather(shape, _ints(op, [0]), axis=0), op.Gather(shape, _ints(op, [1]), axis=0))
    return shape, start, op.Add(start, area)


def _heads_first(op, t, batch_heads, rank: int):
    """(N, Q, M, P, ...) of rank ``rank`` -> (N * M, Q, P, ...): the layout GridSample / GatherND take per (n, m)
    image."""
    perm = [0, 2, 1, *range(3, rank)]
    t = op.Transpose(t, perm=perm)
    return op.Reshape(t, op.Concat(batch_heads, op.Slice(op.Shape(t), _ints(op, [2]), _ints(op, [rank])), axis=0))


def _sample_bilinear(op, value, shape, start, end, locations, batch_heads, channels):
    """(N * M, D, Q, P) bilinear samples of one level; locations (N, Q, M, P, 2) in [0, 1] coordinates."""
    value_t = op.Transpose(value, perm=[0, 2, 3, 1])  # (N, M, D, S)
    image = op.Reshape(op.Slice(value_t, start, end, _ints(op, [3])), op.Concat(batch_heads, channels, shape, axis=0))
    # grid_sample's grid in [-1, 1] (align_corners=False): g = 2 * loc - 1.
    grid = op.Sub(op.Mul(locations, _scalar_like(op, 2.0, locations)), _scalar_like(op, 1.0, locations))
    grid = _heads_first(op, op.CastLike(grid, value), batch_heads, 5)
    # GridSample-20 renamed the mode "bilinear" to "linear".
    mode = "linear" if op.version >= 20 else "bilinear"
    return op.GridSample(image, grid, mode=mode, padding_mode="zeros", align_corners=0)


def _sample_discrete(op, value, shape, start, end, locations, batch_heads, channels):
    """(N * M, D, Q, P) nearest-pixel samples of one level: clamp(floor(x * W + 0.5), 0, W - 1), same for y."""
    value_s = op.Transpose(value, perm=[0, 2, 1, 3])  # (N, M, S, D)
    pixels = op.Reshape(
        op.Slice(value_s, start, end, _ints(op, [2])), op.Concat(batch_heads, _ints(op, [-1]), channels, axis=0)
    )
    size = op.CastLike(shape, locations)  # (H, W)
    height, width = op.Gather(size, _ints(op, [0]), axis=0), op.Gather(size, _ints(op, [1]), axis=0)

    def nearest(coordinate, extent):
        # Clamped in floating point, so +-inf lands on the border before the integer cast.
        rounded = op.Floor(op.Add(op.Mul(coordinate, extent), _scalar_like(op, 0.5, coordinate)))
        clamped = op.Min(
            op.Max(rounded, _scalar_like(op, 0.0, coordinate)), op.Sub(extent, _scalar_like(op, 1.0, extent))
        )
        return op.Cast(clamped, to=_INT64)

    x = op.Squeeze(op.Gather(locations, _ints(op, [0]), axis=4), _ints(op, [4]))  # (N, Q, M, P)
    y = op.Squeeze(op.Gather(locations, _ints(op, [1]), axis=4), _ints(op, [4]))
    index = op.Add(op.Mul(nearest(y, height), op.Cast(width, to=_INT64)), nearest(x, width))
    index = op.Unsqueeze(_heads_first(op, index, batch_heads, 4), _ints(op, [3]))  # (N * M, Q, P, 1)
    gathered = op.GatherND(pixels, index, batch_dims=1)  # (N * M, Q, P, D)
    return op.Transpose(gathered, perm=[0, 3, 1, 2])


def decompose(
    op,
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    point_start,
    discrete: bool,
    num_levels: int,
):
    """The op in standard ONNX (see the module docstring). ``point_start`` None: the 6-D layout, else the (L + 1,)
    point table of the (N, Q, M, K, 2) layout. ``num_levels`` must be static."""
    one = _ints(op, [1])
    value_shape = op.Shape(value)
    batch = op.Slice(value_shape, _ints(op, [0]), one)
    channels = op.Slice(value_shape, _ints(op, [3]), _ints(op, [4]))
    batch_heads = op.Mul(batch, op.Slice(value_shape, _ints(op, [2]), _ints(op, [3])))
    ragged = point_start is not None
    # The NaN rule: a sample with a NaN coordinate makes its head NaN (through its weight) and reads nothing.
    # Bilinear +-inf samples lie outside the map; they are moved to a finite outside location for GridSample.
    coordinates = [op.IsNaN(op.Gather(sampling_locations, _ints(op, [c]), axis=-1)) for c in (0, 1)]
    nan = op.Squeeze(op.Or(*coordinates), _ints(op, [-1]))
    attention_weights = op.Where(nan, _scalar_like(op, float("nan"), attention_weights), attention_weights)
    unusable = op.IsNaN(sampling_locations)
    if not discrete:
        unusable = op.Or(unusable, op.IsInf(sampling_locations))
    locations = op.Where(unusable, _scalar_like(op, -1.0, sampling_locations), sampling_locations)
    if not ragged:  # (N, Q, M, L, P) -> (N, Q, M, K): both layouts weight points along one K axis
        attention_weights = op.Reshape(attention_weights, _ints(op, [0, 0, 0, -1]))

    sampler = _sample_discrete if discrete else _sample_bilinear
    point_axis = _ints(op, [3])
    samples = []
    for level in range(num_levels):
        shape, start, end = _level_table(op, spatial_shapes, level_start_index, level)
        if ragged:
            # Every point at this level, kept where k is in [point_start[l], point_start[l + 1]).
            sampled = sampler(op, value, shape, start, end, locations, batch_heads, channels)
            first = op.Gather(point_start, _ints(op, [level]), axis=0)
            last = op.Gather(point_start, _ints(op, [level + 1]), axis=0)
            k = op.Range(
                op.Constant(value_int=0),
                op.Squeeze(op.Shape(locations, start=3, end=4), _ints(op, [0])),
                op.Constant(value_int=1),
            )
            k = op.CastLike(k, first)
            inside = op.And(op.GreaterOrEqual(k, first), op.Less(k, last))  # (K,)
            samples.append(op.Where(inside, sampled, _scalar_like(op, 0.0, sampled)))
        else:
            level_locations = op.Squeeze(op.Gather(locations, _ints(op, [level]), axis=3), point_axis)
            samples.append(sampler(op, value, shape, start, end, level_locations, batch_heads, channels))
    if ragged:
        total = samples[0]
        for sampled in samples[1:]:
            total = op.Add(total, sampled)
    else:
        total = op.Concat(*samples, axis=3)  # (N * M, D, Q, K)
    weights = op.Unsqueeze(_heads_first(op, op.CastLike(attention_weights, value), batch_heads, 4), one)
    out = op.ReduceSum(op.Mul(total, weights), point_axis, keepdims=0)  # (N * M, D, Q)
    out = op.Reshape(out, op.Concat(batch, _ints(op, [-1]), op.Shape(out, start=2, end=3), axis=0))  # (N, M*D, Q)
    return op.Transpose(out, perm=[0, 2, 1])


# --- the dynamo exporter (onnxscript)


def _onnxscript():
    try:
        import onnxscript
    except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
        raise ImportError(
            "ONNX export of ms_deform_attn with torch.onnx.export(dynamo=True) needs onnxscript (pip install onnxscript)"
        ) from exc
    return onnxscript


def _static_levels(spatial_shapes) -> int:
    num_levels = spatial_shapes.shape[0] if spatial_shapes.shape is not None else None
    if not isinstance(num_levels, int):
        raise ValueError("ONNX export of ms_deform_attn needs a static number of levels (spatial_shapes dim 0)")
    return num_levels


def ms_deform_attn_decomposed(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    point_start=None,
    discrete: bool = False,
):
    """The decomposed translation (dynamo exporter)."""
    op = _onnxscript().opset18
    return decompose(
        op,
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        point_start,
        bool(discrete),
        _static_levels(spatial_shapes),
    )


def _trt_plugin():
    onnxscript = _onnxscript()
    from onnx.defs import OpSchema

    # A schema (TensorRT's plugin has none in ONNX) so that onnxscript can build the node: the plugin's IO.
    schema = OpSchema(
        TRT_OP,
        TRT_DOMAIN,
        1,
        inputs=[
            OpSchema.FormalParameter("value", "T"),
            OpSchema.FormalParameter("spatial_shapes", "I"),
            OpSchema.FormalParameter("level_start_index", "I"),
            OpSchema.FormalParameter("sampling_locations", "T"),
            OpSchema.FormalParameter("attention_weights", "T"),
        ],
        outputs=[OpSchema.FormalParameter("output", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], "value, locations, weights and output"),
            ("I", ["tensor(int32)"], "level shapes and starts"),
        ],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(TRT_DOMAIN, 1), TRT_OP, schema)


def ms_deform_attn_tensorrt(
    value,
    spatial_shapes,
    level_start_index,
    sampling_locations,
    attention_weights,
    point_start=None,
    discrete: bool = False,
):
    """The TensorRT plugin translation (dynamo exporter)."""
    unsupported = [
        name
        for name, used in (("points_per_level", point_start is not None), ('sampling="discrete"', discrete))
        if used
    ]
    if unsupported:
        raise ValueError(
            f'ONNX export of ms_deform_attn in mode "tensorrt": TensorRT\'s {TRT_OP} has no {" / ".join(unsupported)} '
            'mode (it takes uniform points per level, bilinear sampling); export with mode="decomposed" instead'
        )
    op = _onnxscript().opset18
    out = _trt_plugin()(
        value,
        op.Cast(spatial_shapes, to=_INT32),
        op.Cast(level_start_index, to=_INT32),
        op.CastLike(sampling_locations, value),
        op.CastLike(attention_weights, value),
    )
    rows = op.Shape(attention_weights, start=0, end=2)  # (N, Q)
    return op.Reshape(out, op.Concat(rows, _ints(op, [-1]), axis=0))


_TRANSLATIONS = {"decomposed": ms_deform_attn_decomposed, "tensorrt": ms_deform_attn_tensorrt}


def _op_exists() -> bool:
    return hasattr(torch.ops.deformable_detr, "ms_deform_attn")


def custom_translation_table(mode: str = "decomposed") -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` translating our op in ``mode``:
    ``"tensorrt"`` (TensorRT plugin node) or ``"decomposed"`` (standard ONNX, runs in onnxruntime)."""
    if mode not in MODES:
        raise ValueError(f'ms_deform_attn ONNX mode must be one of {", ".join(MODES)}, got "{mode}"')
    if not _op_exists():
        raise RuntimeError(
            "ONNX export of ms_deform_attn needs the compiled extension deformable_detr._C (the op to translate); "
            'without it the model runs the "pytorch" reference, which exports with no table'
        )
    return {torch.ops.deformable_detr.ms_deform_attn.default: _TRANSLATIONS[mode]}


def export(model, args, f=None, *, mode: str = "decomposed", **kwargs):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with our op translated in ``mode``; other keyword
    arguments pass through (a ``custom_translation_table`` given there is merged, ours taking precedence)."""
    table = dict(kwargs.pop("custom_translation_table", None) or {})
    table.update(custom_translation_table(mode))
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)


# --- the TorchScript exporter (dynamo=False)


class _TorchScriptOps:
    """``op.Name(*inputs, attr=...)`` over a TorchScript ONNX graph: ``g.op("Name", *inputs, attr_<kind>=...)``."""

    def __init__(self, g):
        self._g = g
        self.version = g.opset

    def __getattr__(self, name):
        def build(*inputs, **attributes):
            if name == "Constant":
                ((key, v),) = attributes.items()
                dtype = torch.int64 if key.startswith("value_int") else torch.float32
                return self._g.op("Constant", value_t=torch.tensor(v, dtype=dtype))
            kinds = {
                k: "s" if isinstance(v, str) else "f" if isinstance(v, float) else "i" for k, v in attributes.items()
            }
            return self._g.op(name, *inputs, **{f"{k}_{kinds[k]}": v for k, v in attributes.items()})

        return build


def _torchscript_symbolic(
    g, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start=None, discrete=None
):
    from torch.onnx import symbolic_helper

    num_levels = (symbolic_helper._get_tensor_sizes(spatial_shapes) or [None])[0]
    if not isinstance(num_levels, int):
        raise ValueError("ONNX export of ms_deform_attn needs a static number of levels (spatial_shapes dim 0)")
    if point_start is not None and symbolic_helper._is_none(point_start):
        point_start = None
    discrete = bool(symbolic_helper._maybe_get_const(discrete, "b")) if discrete is not None else False
    return decompose(
        _TorchScriptOps(g),
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        point_start,
        discrete,
        num_levels,
    )


# --- registration at `import deformable_detr`


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once, right after the module ``name`` has been imported (by anyone)."""

    def __init__(self, name: str, callback):
        self.name = name
        self.callback = callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module
        callback = self.callback

        def exec_then_register(module):
            exec_module(module)
            callback()

        spec.loader.exec_module = exec_then_register
        return spec


_REGISTERED = {"dynamo": False, "torchscript": False}


def _register_dynamo() -> None:
    """Put the decomposed translation in onnxscript's torch_lib registry, which every dynamo export reads (as
    onnxscript does for torchvision's ops). Never breaks the user's import of onnxscript: a failure warns."""
    if _REGISTERED["dynamo"]:
        return
    try:
        from onnxscript.function_libs.torch_lib.registration import torch_op

        torch_op(OP_NAME, trace_only=True)(ms_deform_attn_decomposed)
        _REGISTERED["dynamo"] = True
    except Exception as exc:  # pragma: no cover - an onnxscript without this API
        import warnings

        warnings.warn(
            f"deformable_detr could not register its ONNX translation with onnxscript ({type(exc).__name__}: {exc}); "
            "export with deformable_detr.ops.onnx.export(...) or its custom_translation_table instead",
            stacklevel=2,
        )


def register() -> None:
    """Register the decomposed translation with both exporters (called by ``import deformable_detr``; idempotent).
    Without the compiled op there is nothing to translate (the reference exports as plain PyTorch)."""
    if not _op_exists():
        return
    if not _REGISTERED["torchscript"]:
        torch.onnx.register_custom_op_symbolic(OP_NAME, _torchscript_symbolic, MIN_OPSET)
        _REGISTERED["torchscript"] = True
    if "onnxscript" in sys.modules:
        _register_dynamo()
    elif importlib.util.find_spec("onnxscript") is not None and not any(
        isinstance(finder, _AfterImport) for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterImport("onnxscript", _register_dynamo))


# --- a whole detector


OUTPUT_NAMES = ("logits", "pred_boxes")


class _DetectorOutputs(torch.nn.Module):
    """The detector's final predictions as a tuple (``pred_logits`` -> ``logits``, ``pred_boxes``), without the
    auxiliary / encoder outputs, which deployment does not use."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model(images)
        return out["pred_logits"], out["pred_boxes"]


def export_model(model, images, f=None, *, mode: str = "decomposed", dynamic_shapes=None, **kwargs):
    """Export a DETR / Deformable DETR for inference: input ``images`` [B, 3, H, W] float, outputs ``logits``
    [B, num_queries, num_classes] and ``pred_boxes`` [B, num_queries, 4] (normalized cx, cy, w, h).

    ``dynamic_shapes`` defaults to a dynamic batch, height and width (``{"images": {0: batch, 2: height,
    3: width}}`` with ``torch.export.Dim.DYNAMIC``); pass ``{}`` for a graph of ``images``' fixed size. The dynamic
    graph runs at other batch and image sizes than the example's: the models derive their per-size tables (level
    shapes, reference points, position encodings) from shapes torch.export keeps symbolic, and their eager per-size
    caches are bypassed while exporting. Give an example batch of 2 or more: torch.export specialises a dimension
    of size 1 to 1. Other keyword
    arguments go to ``torch.onnx.export`` (through :func:`export`, our op translated in ``mode``)."""
    if dynamic_shapes is None:
        dynamic = torch.export.Dim.DYNAMIC
        dynamic_shapes = {"images": {0: dynamic, 2: dynamic, 3: dynamic}}
    wrapper = _DetectorOutputs(model).eval()
    kwargs.setdefault("input_names", ["images"])
    kwargs.setdefault("output_names", list(OUTPUT_NAMES))
    if not _op_exists():  # the model runs the reference: nothing to translate
        return torch.onnx.export(wrapper, (images,), f, dynamo=True, dynamic_shapes=dynamic_shapes or None, **kwargs)
    return export(wrapper, (images,), f, mode=mode, dynamic_shapes=dynamic_shapes or None, **kwargs)
