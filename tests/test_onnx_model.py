"""A whole detector through ONNX (issue 21 item 5): ``deformable_detr.ops.onnx.export_model`` gives one graph with a
dynamic batch and image size and named outputs (``logits``, ``pred_boxes``); onnxruntime at two image sizes and two
batch sizes matches the eager model.

The export used to bake the example's size into Deformable DETR's encoder reference points (``torch.linspace``
takes its step count as a plain int, so torch.export specialised it): onnxruntime then failed at 3x224x256 after an
export at 2x160x192 (INVALID_ARGUMENT, an Expand to the 639 pixels of 160x192)."""

from __future__ import annotations

import pytest
import torch

import deformable_detr.models as M

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
from deformable_detr.ops import onnx as dd_onnx  # noqa: E402

TINY = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=32, num_queries=10, num_classes=5)


def _images(batch, h, w, seed):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ~2-3 min per model on 2 shared cores, most of it torch.export's symbolic shape work and onnxscript's passes.
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "config, overrides, export_kwargs",
    [
        (M.DeformableDETRConfig, {}, {}),
        (M.DETRConfig, {}, {}),
        # onnxscript 0.7.2's graph optimizer drops the bound constants of a Clip in this graph (onnxruntime then
        # refuses the model: "Node input 'sigmoid_min_1' is not a graph input"); unoptimized, it is right.
        (M.DeformableDETRConfig, {"with_box_refine": True, "two_stage": True}, {"optimize": False}),
    ],
    ids=["deformable_detr", "detr", "deformable_detr_two_stage"],
)
def test_detector_exports_with_dynamic_size_and_named_outputs(config, overrides, export_kwargs):
    torch.manual_seed(0)
    model = M.build(config(backbone="resnet18", **TINY, **overrides)).eval()
    example = _images(2, 160, 192, seed=0)
    with torch.no_grad():
        model(example)  # fills the eager path's per-size caches: the export must not read them
    # An example batch of 2: torch.export specialises a size-1 dimension.
    program = dd_onnx.export_model(model, example, **export_kwargs)
    model_bytes = program.model_proto.SerializeToString()
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits", "pred_boxes"]
    for batch, (h, w), seed in ((2, (160, 192), 1), (3, (224, 256), 2), (1, (96, 320), 3)):
        images = _images(batch, h, w, seed)
        with torch.no_grad():
            expected = model(images)
        logits, boxes = session.run(None, {"images": images.numpy()})
        assert logits.shape == (batch, TINY["num_queries"], expected["pred_logits"].shape[-1])
        assert boxes.shape == (batch, TINY["num_queries"], 4)
        torch.testing.assert_close(torch.from_numpy(logits), expected["pred_logits"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(boxes), expected["pred_boxes"], atol=1e-4, rtol=1e-4)


def test_pixel_grid_is_the_originals_linspace():
    """The export-friendly ``arange`` grid is bit-identical to the originals' ``linspace`` (checkpoints trained with
    those reference points and proposals see the same numbers)."""
    from deformable_detr.models.deformable_transformer import _pixels

    for n in [*range(1, 300), 1000, 4097]:
        assert torch.equal(_pixels(n, "cpu"), torch.linspace(0, n - 1, n)), n
        assert torch.equal(_pixels(n, "cpu") + 0.5, torch.linspace(0.5, n - 0.5, n)), n
