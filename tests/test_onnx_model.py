"""A whole detector through ONNX (issue 21 item 5): ``deformable_detr.ops.onnx.export_model`` gives a graph with a
dynamic batch and image size and named outputs (``logits``, ``pred_boxes``); onnxruntime at two image sizes and two
batch sizes matches the eager model. (Its fixed-size graph used to reject 160x192 with INVALID_ARGUMENT, and its
outputs were named like ``select_61``.)"""

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


@pytest.mark.usefixtures("one_thread")
@pytest.mark.xfail(
    strict=True,
    reason="not done: exported at 2x160x192, onnxruntime fails at 3x224x256 on an Add whose operand shapes were "
    "baked in at export (the model's per-size tables); the 2x160x192 run itself was not reached in isolation",
)
@pytest.mark.parametrize("config", [M.DeformableDETRConfig], ids=["deformable_detr"])
def test_detector_exports_with_dynamic_size_and_named_outputs(config):
    torch.manual_seed(0)
    model = M.build(config(backbone="resnet18", **TINY)).eval()
    # An example batch of 2: torch.export specialises a size-1 dimension.
    program = dd_onnx.export_model(model, _images(2, 160, 192, seed=0))
    model_bytes = program.model_proto.SerializeToString()
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits", "pred_boxes"]
    for batch, (h, w), seed in ((2, (160, 192), 1), (3, (224, 256), 2)):
        images = _images(batch, h, w, seed)
        with torch.no_grad():
            expected = model(images)
        logits, boxes = session.run(None, {"images": images.numpy()})
        assert logits.shape == (batch, TINY["num_queries"], expected["pred_logits"].shape[-1])
        torch.testing.assert_close(torch.from_numpy(logits), expected["pred_logits"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.from_numpy(boxes), expected["pred_boxes"], atol=1e-4, rtol=1e-4)
