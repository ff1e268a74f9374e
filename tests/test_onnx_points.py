"""The decomposed ONNX translation of points per level and discrete sampling (issue 19), in onnxruntime against the
float64 oracle, through both exporters (dynamo: onnxscript; dynamo=False: the TorchScript symbolic).

The translation is applied to a test-local operator with the translation's signature whose kernel is the oracle,
so these tests need neither the compiled extension nor a particular schema of ``deformable_detr::ms_deform_attn``;
tests/test_onnx.py exports the real op."""

from __future__ import annotations

import io

import pytest
import torch
from support.oracle import make_inputs, make_points_inputs, ms_deform_attn_oracle

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
from deformable_detr.ops import onnx as dd_onnx  # noqa: E402

_NAMESPACE = "dd_onnx_test"


@torch.library.custom_op(f"{_NAMESPACE}::msda", mutates_args=())
def _stand_in(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    point_start: torch.Tensor | None = None,
    discrete: bool = False,
) -> torch.Tensor:
    counts = None if point_start is None else point_start.diff().tolist()
    sampling = "discrete" if discrete else "bilinear"
    out = ms_deform_attn_oracle(
        value,
        spatial_shapes,
        level_start_index,
        sampling_locations,
        attention_weights,
        points_per_level=counts,
        sampling=sampling,
    )
    return out.to(value.dtype)


@_stand_in.register_fake
def _(
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start=None, discrete=False
):
    N, _, M, D = value.shape
    return value.new_empty((N, sampling_locations.shape[1], M * D))


torch.onnx.register_custom_op_symbolic(f"{_NAMESPACE}::msda", dd_onnx._torchscript_symbolic, dd_onnx.MIN_OPSET)


class _Attention(torch.nn.Module):
    def __init__(self, discrete: bool):
        super().__init__()
        self.discrete = discrete

    def forward(
        self, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start=None
    ):
        return torch.ops.dd_onnx_test.msda(
            value, spatial_shapes, level_start_index, sampling_locations, attention_weights, point_start, self.discrete
        )


LEVELS = [(6, 5), (3, 4), (2, 2)]


def _inputs(ragged, N=2, Q=7, seed=0, counts=(3, 0, 2)):
    if ragged:
        value, ss, lsi, loc, attn = make_points_inputs(N, LEVELS, 2, 5, Q, list(counts), spread=(-0.3, 1.3), seed=seed)
        starts = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
        return value, ss, lsi, loc, attn, starts
    return make_inputs(N, LEVELS, 2, 5, Q, 3, spread=(-0.3, 1.3), seed=seed)


def _export(module, inputs, dynamo, **kwargs):
    if dynamo:
        table = {torch.ops.dd_onnx_test.msda.default: dd_onnx.ms_deform_attn_decomposed}
        program = torch.onnx.export(module, inputs, dynamo=True, custom_translation_table=table, **kwargs)
        return program.model_proto.SerializeToString()
    f = io.BytesIO()
    torch.onnx.export(module, inputs, f, dynamo=False, **kwargs)
    return f.getvalue()


def _run(model_bytes, inputs):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return torch.from_numpy(session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0])


def _ops(model_bytes):
    import onnx

    return {node.op_type for node in onnx.load_from_string(model_bytes).graph.node}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("discrete", [False, True], ids=["bilinear", "discrete"])
@pytest.mark.parametrize("ragged", [False, True], ids=["uniform", "points_per_level"])
def test_decomposed_graph_matches_oracle(dynamo, discrete, ragged):
    module = _Attention(discrete)
    model = _export(module, _inputs(ragged), dynamo)
    ops = _ops(model)
    # Discrete sampling gathers (GridSample's "nearest" rounds x * W - 0.5 half to even: another rule).
    assert ("GatherND" in ops) == discrete and ("GridSample" in ops) == (not discrete)
    for seed in (1, 2):  # fresh inputs: nothing input-dependent was folded into the graph
        inputs = _inputs(ragged, seed=seed)
        expected = ms_deform_attn_oracle(
            *inputs[:5],
            points_per_level=[3, 0, 2] if ragged else None,
            sampling="discrete" if discrete else "bilinear",
        )
        got = _run(model, inputs)
        assert got.shape == expected.shape
        assert (got.double() - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_discrete_rounds_half_up_on_exact_half_pixels(dynamo):
    """x * W + 0.5 exactly an integer (W = H = 4, binary-exact): the boundary goes up, as floor(x * W + 0.5);
    far and infinite locations clamp to the border pixel."""
    ss = torch.tensor([[4, 4]])
    lsi = torch.tensor([0])
    value = torch.arange(16, dtype=torch.float32).view(1, 16, 1, 1)  # pixel (iy, ix) holds 4 * iy + ix
    # y = 0.625 -> row 3; x = 0.125 -> column 1 (not 0), 0.375 -> 2, 0.625 -> 3 (half up), 0.875 -> 4, clamped to 3.
    xs = [0.125, 0.375, 0.625, 0.875, -3.0, 7.0, float("inf"), -float("inf")]
    loc = torch.tensor([[x, 0.625] for x in xs]).view(1, len(xs), 1, 1, 1, 2)
    attn = torch.ones(1, len(xs), 1, 1, 1)
    inputs = (value, ss, lsi, loc, attn)
    got = _run(_export(_Attention(True), inputs, dynamo), inputs).flatten()
    expected = ms_deform_attn_oracle(*inputs, sampling="discrete").flatten()
    assert got.tolist() == expected.tolist() == [13.0, 14.0, 15.0, 15.0, 12.0, 15.0, 15.0, 12.0]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("discrete", [False, True], ids=["bilinear", "discrete"])
def test_non_finite_locations_follow_the_rule(dynamo, discrete):
    """A NaN location makes its head NaN and leaves the others alone; a bilinear +-inf location contributes 0."""
    inputs = list(_inputs(True, seed=3))
    inputs[3][0, 1, 0, 1, 0] = float("nan")
    inputs[3][0, 2, 1, 0, 1] = float("inf")
    expected_inputs = [t.clone() for t in inputs]
    if not discrete:  # the contract: an infinite location contributes nothing, as zero weight would
        expected_inputs[4][0, 2, 1, 0] = 0
        expected_inputs[3][0, 2, 1, 0] = 0.5
    expected_inputs[3][0, 1, 0, 1] = 0.5
    expected = ms_deform_attn_oracle(
        *expected_inputs[:5], points_per_level=[3, 0, 2], sampling="discrete" if discrete else "bilinear"
    ).view(2, 7, 2, 5)
    got = _run(_export(_Attention(discrete), tuple(inputs), dynamo), inputs).view(2, 7, 2, 5)
    nan_head = torch.zeros(2, 7, 2, dtype=torch.bool)
    nan_head[0, 1, 0] = True
    assert bool(got[nan_head].isnan().all()) and not bool(got[~nan_head].isnan().any())
    assert (got[~nan_head].double() - expected[~nan_head]).abs().max().item() <= 1e-5


def test_points_per_level_dynamic_batch_and_queries():
    batch, queries = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("queries", min=2, max=4096)
    dynamic = ({0: batch}, None, None, {0: batch, 1: queries}, {0: batch, 1: queries}, None)
    model = _export(_Attention(False), _inputs(True), True, dynamic_shapes=dynamic)
    inputs = _inputs(True, N=3, Q=11, seed=5)
    expected = ms_deform_attn_oracle(*inputs[:5], points_per_level=[3, 0, 2])
    got = _run(model, inputs)
    assert got.shape == (3, 11, 10)
    assert (got.double() - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("discrete, ragged", [(True, False), (False, True), (True, True)])
def test_tensorrt_translation_refuses_points_per_level_and_discrete(discrete, ragged):
    table = {torch.ops.dd_onnx_test.msda.default: dd_onnx.ms_deform_attn_tensorrt}
    with pytest.raises(Exception, match="TensorRT") as info:
        torch.onnx.export(_Attention(discrete), _inputs(ragged), dynamo=True, custom_translation_table=table)
    message = str(info.value) + str(info.value.__cause__)
    assert 'mode="decomposed"' in message
    for name, used in (("points_per_level", ragged), ('sampling="discrete"', discrete)):
        assert (name in message) == used
