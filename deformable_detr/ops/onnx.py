"""ONNX export of ``deformable_detr::ms_deform_attn`` for ``torch.onnx.export(..., dynamo=True)``.

Two translations of the op, chosen by the user:

- ``"tensorrt"``: one node ``MultiscaleDeformableAttnPlugin_TRT`` (domain ``trt.plugins``, version 1), laid out as
  TensorRT's multi-scale deformable attention plugin consumes it: inputs ``value (N, S, M, D)``,
  ``spatial_shapes (L, 2)`` int32, ``level_start_index (L,)`` int32, ``sampling_locations (N, Q, M, L, P, 2)`` and
  ``attention_weights (N, Q, M, L, P)`` in ``value``'s float type; its ``(N, Q, M, D)`` output is reshaped to the
  op's ``(N, Q, M*D)``. No attributes. The graph runs where that plugin is registered (TensorRT), not in
  onnxruntime.
- ``"decomposed"``: standard ONNX operators only (``GridSample`` per level, as the ``pytorch`` reference does), so
  the graph runs in onnxruntime or any ONNX runtime with opset >= 16. Non-finite locations follow ``GridSample``
  there, not the op's NaN rule; empty levels (H*W = 0) are not supported.

Example::

    from deformable_detr.ops.onnx import custom_translation_table
    torch.onnx.export(model, args, "model.onnx", dynamo=True,
                      custom_translation_table=custom_translation_table("decomposed"))

Needs the ``onnxscript`` package (imported only when this module is used).
"""

from __future__ import annotations

import torch

MODES = ("tensorrt", "decomposed")
TRT_DOMAIN = "trt.plugins"
TRT_OP = "MultiscaleDeformableAttnPlugin_TRT"


def _onnxscript():
    try:
        import onnxscript
    except ImportError as exc:  # pragma: no cover - exercised only without the optional dependency
        raise ImportError(
            "deformable_detr.ops.onnx needs onnxscript (pip install onnxscript) for torch.onnx.export(dynamo=True)"
        ) from exc
    return onnxscript


def _tensorrt_translation():
    onnxscript = _onnxscript()
    from onnx.defs import OpSchema

    op = onnxscript.opset18
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
    plugin = onnxscript.values.Op(onnxscript.values.Opset(TRT_DOMAIN, 1), TRT_OP, schema)

    def ms_deform_attn_tensorrt(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        out = plugin(
            value,
            op.Cast(spatial_shapes, to=onnxscript.INT32.dtype),
            op.Cast(level_start_index, to=onnxscript.INT32.dtype),
            op.CastLike(sampling_locations, value),
            op.CastLike(attention_weights, value),
        )
        rows = op.Shape(attention_weights, start=0, end=2)  # (N, Q)
        return op.Reshape(out, op.Concat(rows, op.Constant(value_ints=[-1]), axis=0))

    return ms_deform_attn_tensorrt


def _decomposed_translation():
    onnxscript = _onnxscript()
    op = onnxscript.opset18

    def ms_deform_attn_decomposed(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        num_levels = sampling_locations.shape[3]
        if not isinstance(num_levels, int):
            raise ValueError("ONNX export of ms_deform_attn needs a static number of levels (sampling_locations dim 3)")
        int64 = onnxscript.INT64.dtype
        one = op.Constant(value_ints=[1])
        minus_one = op.Constant(value_ints=[-1])
        value_shape = op.Shape(value)
        batch = op.Slice(value_shape, op.Constant(value_ints=[0]), one)
        heads = op.Slice(value_shape, op.Constant(value_ints=[2]), op.Constant(value_ints=[3]))
        channels = op.Slice(value_shape, op.Constant(value_ints=[3]), op.Constant(value_ints=[4]))
        batch_heads = op.Mul(batch, heads)
        # (N, S, M, D) -> (N, M, D, S): one (N*M, D, H, W) image per level after a slice and a reshape.
        value_t = op.Transpose(value, perm=[0, 2, 3, 1])
        # grid_sample's grid in [-1, 1] (align_corners=False): g = 2 * loc - 1.
        grids = op.Sub(
            op.Mul(sampling_locations, op.CastLike(2.0, sampling_locations)), op.CastLike(1.0, sampling_locations)
        )
        grids = op.CastLike(grids, value)
        sampled = []
        for level in range(num_levels):
            index = op.Constant(value_ints=[level])
            shape = op.Reshape(op.Gather(spatial_shapes, index, axis=0), minus_one)  # (H, W)
            start = op.Cast(op.Gather(level_start_index, index, axis=0), to=int64)
            end = op.Add(start, op.ReduceProd(shape, keepdims=1))
            value_l = op.Slice(value_t, start, end, op.Constant(value_ints=[3]))
            value_l = op.Reshape(value_l, op.Concat(batch_heads, channels, op.Cast(shape, to=int64), axis=0))
            # (N, Q, M, P, 2) -> (N, M, Q, P, 2) -> (N*M, Q, P, 2)
            grid_l = op.Transpose(
                op.Squeeze(op.Gather(grids, index, axis=3), op.Constant(value_ints=[3])), perm=[0, 2, 1, 3, 4]
            )
            grid_shape = op.Concat(
                batch_heads,
                op.Slice(op.Shape(grid_l), op.Constant(value_ints=[2]), op.Constant(value_ints=[5])),
                axis=0,
            )
            grid_l = op.Reshape(grid_l, grid_shape)
            sampled.append(op.GridSample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=0))
        samples = op.Concat(*sampled, axis=3)  # (N*M, D, Q, L*P)
        # (N, Q, M, L, P) -> (N, M, Q, L, P) -> (N*M, 1, Q, L*P)
        weights = op.CastLike(op.Transpose(attention_weights, perm=[0, 2, 1, 3, 4]), value)
        queries = op.Slice(op.Shape(attention_weights), one, op.Constant(value_ints=[2]))
        weights = op.Reshape(weights, op.Concat(batch_heads, one, queries, minus_one, axis=0))
        out = op.ReduceSum(op.Mul(samples, weights), op.Constant(value_ints=[3]), keepdims=0)  # (N*M, D, Q)
        out = op.Reshape(out, op.Concat(batch, minus_one, queries, axis=0))  # (N, M*D, Q)
        return op.Transpose(out, perm=[0, 2, 1])

    return ms_deform_attn_decomposed


def custom_translation_table(mode: str = "decomposed") -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)`` translating our op in ``mode``:
    ``"tensorrt"`` (TensorRT plugin node) or ``"decomposed"`` (standard ONNX, runs in onnxruntime)."""
    if mode not in MODES:
        raise ValueError(f'ms_deform_attn ONNX mode must be one of {", ".join(MODES)}, got "{mode}"')
    if not hasattr(torch.ops.deformable_detr, "ms_deform_attn"):
        raise RuntimeError(
            "ONNX export of ms_deform_attn needs the compiled extension deformable_detr._C (the op to translate); "
            'without it the model runs the "pytorch" reference, which exports with no table'
        )
    translation = _tensorrt_translation() if mode == "tensorrt" else _decomposed_translation()
    return {torch.ops.deformable_detr.ms_deform_attn.default: translation}


def export(model, args, f=None, *, mode: str = "decomposed", **kwargs):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with our op translated in ``mode``; other keyword
    arguments pass through (a ``custom_translation_table`` given there is merged, ours taking precedence)."""
    table = dict(kwargs.pop("custom_translation_table", None) or {})
    table.update(custom_translation_table(mode))
    return torch.onnx.export(model, args, f, dynamo=True, custom_translation_table=table, **kwargs)
