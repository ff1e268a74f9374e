"""ONNX export of the op (issue 16 item 9) and plain ``torch.onnx.export`` (issue 21 item 5).

torch.onnx.export(dynamo=True) of MSDeformAttn failed on deformable_detr::ms_deform_attn; ``import deformable_detr``
now registers the decomposed translation with both exporters, so a plain export works (dynamo=True and False). The
decomposed graph runs in onnxruntime against our op; the TensorRT graph has the plugin node TensorRT's multi-scale
deformable attention plugin consumes (not runnable here). A whole detector exports with dynamic batch and image size
and named outputs. Points per level / discrete sampling: tests/test_onnx_points.py."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deformable_detr as dd
from deformable_detr._extension import extension_loaded

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
dd_onnx = pytest.importorskip("deformable_detr.ops.onnx")

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="the op to translate comes from the extension")

LEVELS = [(6, 5), (3, 2), (2, 2)]


def _module_inputs(batch, queries, d_model=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(LEVELS)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S = int(sizes.sum())
    query = torch.randn(batch, queries, d_model, generator=gen)
    reference = torch.rand(batch, queries, len(LEVELS), 2, generator=gen) * 1.2 - 0.1  # some outside the map
    flatten = torch.randn(batch, S, d_model, generator=gen)
    return query, reference, flatten, shapes, starts


def _module():
    torch.manual_seed(0)
    module = dd.MSDeformAttn(d_model=32, n_levels=len(LEVELS), n_heads=2, n_points=3).eval()
    with torch.no_grad():  # larger offsets than the init, so that samples also leave the maps
        module.sampling_offsets.bias.mul_(3)
        module.sampling_offsets.weight.normal_(0, 0.5)
    return module


def _run_bytes(model_bytes, inputs):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


def _run(model_proto, inputs):
    return _run_bytes(model_proto.SerializeToString(), inputs)


def _assert_matches_module(model_bytes, module):
    for seed in (1, 2):
        inputs = _module_inputs(1, 5, seed=seed)
        with torch.no_grad():
            expected = module(*inputs)
        got = _run_bytes(model_bytes, inputs)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_plain_dynamo_export_uses_the_registered_translation():
    """What a user hit: `No ONNX function found for deformable_detr.ms_deform_attn` without a translation table."""
    module = _module()
    program = torch.onnx.export(module, _module_inputs(1, 5))
    assert "GridSample" in {n.op_type for n in program.model_proto.graph.node}
    _assert_matches_module(program.model_proto.SerializeToString(), module)


def test_plain_torchscript_export_works():
    """dynamo=False failed with a misleading level_start_index error; the TorchScript symbolic now decomposes."""
    module = _module()
    f = io.BytesIO()
    torch.onnx.export(module, _module_inputs(1, 5), f, dynamo=False)
    _assert_matches_module(f.getvalue(), module)


def test_import_registers_without_importing_onnxscript():
    """onnxscript takes seconds to import: `import deformable_detr` leaves it alone, and the translation is in its
    registry as soon as anything imports it."""
    code = (
        "import sys, deformable_detr\n"
        "assert 'onnxscript' not in sys.modules, 'import deformable_detr imported onnxscript'\n"
        "from onnxscript.function_libs.torch_lib.registration import default_registry\n"
        "assert 'deformable_detr::ms_deform_attn' in default_registry\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_decomposed_graph_matches_op_in_onnxruntime():
    module = _module()
    program = dd_onnx.export(module, _module_inputs(1, 5), mode="decomposed")
    ops = {n.op_type for n in program.model_proto.graph.node}
    assert "GridSample" in ops and not any(n.domain for n in program.model_proto.graph.node)
    # Fresh inputs of the export's shapes: nothing input-dependent was folded into the graph.
    for seed in (1, 2):
        inputs = _module_inputs(1, 5, seed=seed)
        with torch.no_grad():
            expected = module(*inputs)
        got = _run(program.model_proto, inputs)
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_decomposed_graph_dynamic_batch_and_queries():
    module = _module()
    batch, queries = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("queries", min=2, max=4096)
    dynamic = ({0: batch, 1: queries}, {0: batch, 1: queries}, {0: batch}, None, None)
    program = dd_onnx.export(module, _module_inputs(2, 5), mode="decomposed", dynamic_shapes=dynamic)
    inputs = _module_inputs(3, 11, seed=4)
    with torch.no_grad():
        expected = module(*inputs)
    got = _run(program.model_proto, inputs)
    assert got.shape == expected.shape == (3, 11, 32)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_tensorrt_graph_has_the_plugin_node():
    program = dd_onnx.export(_module(), _module_inputs(1, 5), mode="tensorrt")
    graph = program.model_proto.graph
    nodes = [n for n in graph.node if n.op_type == dd_onnx.TRT_OP]
    assert len(nodes) == 1 and nodes[0].domain == dd_onnx.TRT_DOMAIN and len(nodes[0].input) == 5
    assert not nodes[0].attribute
    assert "GridSample" not in {n.op_type for n in graph.node}
    assert any(o.domain == dd_onnx.TRT_DOMAIN and o.version == 1 for o in program.model_proto.opset_import)
    # The plugin takes int32 level shapes / starts: both come from a Cast to INT32 (onnx TensorProto.INT32 = 6).
    producers = {out: n for n in graph.node for out in n.output}
    for name in nodes[0].input[1:3]:
        cast = producers[name]
        assert cast.op_type == "Cast" and [a.i for a in cast.attribute if a.name == "to"] == [6]


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="tensorrt, decomposed"):
        dd_onnx.custom_translation_table("tflite")
