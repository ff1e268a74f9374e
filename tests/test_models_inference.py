"""The fast inference path: frozen batch norm folded into convolutions, channels_last backbone, per-size caches
of position encodings and level tables (unpadded batches), torch.compile of the whole model (fullgraph through
our op) for inference and for a train step. Tiny models; compile tests use the aot_eager backend (inductor's
C++ compile takes minutes on a 2-core CI machine; the benchmark runs inductor)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.ops.misc import FrozenBatchNorm2d

import deformable_detr.models as M
from deformable_detr._extension import extension_loaded
from deformable_detr.models.inference import fold_frozen_batchnorm, optimize_for_inference

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=32, num_queries=10, num_classes=5)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    model = M.build(M.DeformableDETRConfig(backbone="resnet18", **{**TINY, **overrides}))
    # Non-trivial frozen statistics, so folding has something to get wrong.
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, FrozenBatchNorm2d):
            for name in ("weight", "bias", "running_mean"):
                getattr(module, name).copy_(torch.randn(module.weight.shape, generator=g) * 0.5)
            module.running_var.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
    return model.eval()


def _images(batch=2, h=64, w=96, seed=1):
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _close(a, b, atol=1e-5):
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4)


def test_fold_frozen_batchnorm_equal_outputs():
    model = _model()
    images = _images()
    with torch.no_grad():
        expected = model(images)
        count = sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
        assert fold_frozen_batchnorm(model) == count == 20  # ResNet-18: stem + 16 in blocks + 3 downsample
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
        _close(model(images), expected)


def test_optimize_for_inference_channels_last_equal_outputs():
    model = _model(seed=2, with_box_refine=True, two_stage=True)
    images = _images(seed=3)
    with torch.no_grad():
        expected = model(images)
        fast = optimize_for_inference(copy.deepcopy(model))
        assert fast.backbone[0].channels_last and not fast.training
        out = fast(images)
    _close(out, expected)
    torch.testing.assert_close(
        out["enc_outputs"]["pred_logits"], expected["enc_outputs"]["pred_logits"], atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize("overrides", [{}, {"two_stage": True, "with_box_refine": True}], ids=["plain", "two_stage"])
def test_unpadded_fast_path_equals_masked_path(overrides):
    """A batch tensor (no padding known on the host) skips masking and reuses cached tables; the same pixels
    given with an explicit all-valid mask take the general path. Same numbers."""
    model = _model(seed=4, **overrides)
    images = _images(seed=5)
    with torch.no_grad():
        fast = model(images)
        general = model(M.ImageBatch(images, torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool)))
    _close(fast, general, atol=1e-6)


def test_same_size_list_is_unpadded_and_mixed_sizes_are_not():
    a, b = _images(1)[0], _images(1, seed=6)[0]
    assert M.to_image_batch([a, b]).padded is False
    assert M.to_image_batch([a, b[:, :40]]).padded is True
    assert M.to_image_batch(torch.stack([a, b])).padded is False


def test_caches_built_in_inference_mode_serve_training():
    model = _model(seed=7)
    images = _images(seed=8)
    with torch.inference_mode():
        model(images)
        model(images)
    transformer = model.transformer
    assert len(transformer._static._entries) == 1  # one input size -> one entry, reused
    tables = next(iter(transformer._static._entries.values()))
    assert not any(t.is_inference() for t in tables)
    model.train()
    out = model(images)
    (out["pred_logits"].sum() + out["pred_boxes"].sum()).backward()
    assert model.transformer.level_embed.grad is not None


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
def test_compiled_inference_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _model(seed=9)
    images = _images(1, seed=10)
    with torch.no_grad():
        expected = model(images)
        compiled = optimize_for_inference(model, compile=True, backend="aot_eager")
        _close(compiled(images), expected)


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
def test_compiled_train_step_matches_eager():
    torch._dynamo.reset()
    model = _model(seed=11)
    model.train()
    for module in model.modules():  # dropout off, so both runs compute the same function
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        elif isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = 0.0
    twin = copy.deepcopy(model)
    images = _images(1, seed=12)
    compiled = M.compile_model(twin, backend="aot_eager")
    losses = []
    for m in (model, compiled):
        out = m(images)
        loss = out["pred_logits"].sigmoid().mean() + out["pred_boxes"].square().mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    grads = [(n, p.grad) for n, p in model.named_parameters() if p.grad is not None]
    twin_params = dict(twin.named_parameters())
    assert grads
    for name, grad in grads:
        torch.testing.assert_close(twin_params[name].grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def test_cli_compile_flag_trains_evaluates_and_predicts(tmp_path, monkeypatch):
    """--compile reaches torch.compile in train, evaluate and predict (aot_eager here: same graph capture,
    no inductor C++ build on CI)."""
    from deformable_detr import cli
    from deformable_detr.data import SyntheticSpec, prepare_synthetic
    from deformable_detr.engine import trainer
    from deformable_detr.models import inference

    calls = []

    def fake_compile(model, **kwargs):
        calls.append(kwargs)
        return torch.compile(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(trainer, "compile_model", fake_compile)
    monkeypatch.setattr(inference, "compile_model", fake_compile)
    torch._dynamo.reset()
    spec = SyntheticSpec(image_size=48, num_train=2, num_val=1, num_crowded=0, max_objects=2)
    root = str(prepare_synthetic(spec, root=tmp_path / "data"))
    tiny = ["--set", "backbone=resnet18", "--set", "hidden_dim=32", "--set", "nheads=2", "--set",
            "dim_feedforward=32", "--set", "enc_layers=1", "--set", "dec_layers=1", "--set", "num_feature_levels=3",
            "--set", "dropout=0.0", "--num-queries", "4"]  # fmt: skip
    out = tmp_path / "run"
    args = ["train", "--data", root, "--output-dir", str(out), "--image-size", "48", "--batch-size", "2",
            "--num-workers", "0", "--augmentation", "none", "--epochs", "1", "--quiet", "--device", "cpu",
            "--compile", *tiny]  # fmt: skip
    assert cli.main(args) == 0 and len(calls) == 1
    ckpt = str(out / "checkpoint.pth")
    assert cli.main(["evaluate", "--checkpoint", ckpt, "--output", str(tmp_path / "m.json"), "--quiet",
                     "--compile"]) == 0  # fmt: skip
    image = str(next((tmp_path / "data").rglob("*.png")))
    assert cli.main(["predict", "--checkpoint", ckpt, image, "--output", str(tmp_path / "pred"), "--compile"]) == 0
    assert len(calls) == 3


def test_optimize_for_inference_detr_equal_outputs():
    torch.manual_seed(13)
    model = M.build(M.DETRConfig(backbone="resnet18", **TINY)).eval()
    images = [_images(1, seed=14)[0], _images(1, 48, 80, seed=15)[0]]  # padded batch: the general path
    with torch.no_grad():
        expected = model(images)
        _close(optimize_for_inference(model)(images), expected)


def test_hf_peer_benchmark_rows_agree(monkeypatch):
    """bench_model_hf on a small image: every variant's outputs equal HF's (same weights) within 1e-4, and the
    profile buckets cover the whole self time."""
    pytest.importorskip("transformers")
    pytest.importorskip("timm")
    from benchmarks import bench_model_hf

    monkeypatch.setattr(bench_model_hf, "INFER_SIZE", (64, 96))
    rows = bench_model_hf.run(compile=False, train_size=None, reps=1, budget_s=0)
    assert {r["backend"] for r in rows} == {"ours", "ours-optimized", "hf", "hf+our-kernel"}
    for row in rows:
        assert row["status"] == "ok" and row["max_err"] <= 1e-4, row
        assert sum(row["profile"].values()) == pytest.approx(1.0)
    assert "| inference |" in bench_model_hf.markdown({}, rows)
