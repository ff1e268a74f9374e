"""End to end through ``python -m deformable_detr``: train (resume bit-exact, DDP on 2 CPU processes with gloo),
evaluate, predict. Tiny model, tiny images, a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from support.pipeline import train_args

from deformable_detr.cli import build_parser, main, train_config_from_args
from deformable_detr.data import SyntheticSpec, prepare_synthetic
from deformable_detr.engine.checkpoint import load_checkpoint_file


def _assert_same_state(a: dict, b: dict, exact: bool = True, atol: float = 0.0):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """Two epochs (2 steps each) straight through."""
    out = tmp_path_factory.mktemp("full")
    assert main(train_args(data_root, out, "--epochs", "2")) == 0
    return out


def test_train_writes_all_outputs(trained):
    ckpt = load_checkpoint_file(trained / "checkpoint.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "config", "rng_states"} <= set(ckpt)
    assert ckpt["epoch"] == 1
    assert ckpt["config"]["model_overrides"]["hidden_dim"] == 32
    records = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(r["steps"] == 2 and np.isfinite(r["train_loss"]) for r in records)
    assert records[0]["lr"] == pytest.approx(1e-3) and records[1]["lr"] == pytest.approx(1e-4)
    metrics = json.loads((trained / "eval.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(metrics)
    assert all(-1.0 <= v <= 1.0 for v in metrics.values())
    assert (trained / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # The original's groups (backbone and linear projections at lr x 0.1), after two drops of x 0.1.
    lrs = {g["name"]: g["lr"] for g in ckpt["optimizer"]["param_groups"]}
    assert lrs == pytest.approx({"default": 1e-5, "backbone": 1e-6, "linear_proj": 1e-6})


def test_resume_is_bit_exact(data_root, trained, tmp_path):
    assert main(train_args(data_root, tmp_path, "--epochs", "1")) == 0
    first = load_checkpoint_file(tmp_path / "checkpoint.pth")
    assert first["epoch"] == 0
    assert main(["train", "--resume", str(tmp_path / "checkpoint.pth"), "--epochs", "2", "--quiet"]) == 0
    resumed = load_checkpoint_file(tmp_path / "checkpoint.pth")
    full = load_checkpoint_file(trained / "checkpoint.pth")
    assert resumed["epoch"] == full["epoch"] == 1
    _assert_same_state(resumed["model"], full["model"])
    for ra, fa in zip(resumed["optimizer"]["state"].values(), full["optimizer"]["state"].values()):
        assert torch.equal(ra["exp_avg"], fa["exp_avg"]) and torch.equal(ra["exp_avg_sq"], fa["exp_avg_sq"])
    assert resumed["lr_scheduler"] == full["lr_scheduler"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    full_log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in log] == [r["train_loss"] for r in full_log]


def test_resume_changes_nothing_without_the_same_start(data_root, trained, tmp_path):
    """Guard against a vacuous resume test: a different seed must give different weights."""
    assert main(train_args(data_root, tmp_path, "--epochs", "2", "--seed", "7")) == 0
    other = load_checkpoint_file(tmp_path / "checkpoint.pth")["model"]
    full = load_checkpoint_file(trained / "checkpoint.pth")["model"]
    assert any(not torch.equal(other[k], full[k]) for k in full if full[k].is_floating_point())


def test_ddp_two_cpu_processes_match_single_process(data_root, trained, tmp_path):
    """torchrun, 2 processes x batch 1 with gloo == 1 process x batch 2 (same images per step, the criterion
    normalises by the global box count and DDP averages gradients), up to float rounding."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "deformable_detr", *train_args(data_root, tmp_path, "--epochs", "2"),
    ]  # fmt: skip
    cmd[cmd.index("--batch-size") + 1] = "1"
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    ddp = load_checkpoint_file(tmp_path / "checkpoint.pth")
    single = load_checkpoint_file(trained / "checkpoint.pth")
    assert len(ddp["rng_states"]) == 2
    # Biases in front of GroupNorm get (numerically) zero gradients, which AdamW turns into rounding-driven
    # steps; 1e-4 (0.1 x lr) leaves room for those and still catches a missing or mis-scaled gradient sync.
    _assert_same_state(ddp["model"], single["model"], exact=False, atol=1e-4)
    ddp_log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (trained / "log.jsonl").read_text().splitlines()]
    for a, b in zip(ddp_log, single_log):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert (
        json.loads((tmp_path / "eval.json").read_text()).keys()
        == json.loads((trained / "eval.json").read_text()).keys()
    )


def test_evaluate_prints_table_and_writes_json(trained, data_root, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--checkpoint", str(trained / "checkpoint.pth"), "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]" in printed
    metrics = json.loads(out.read_text())
    assert metrics == json.loads((trained / "eval.json").read_text())


def test_predict_draws_boxes(trained, data_root, tmp_path):
    image_path = os.path.join(str(data_root), "val2017", "000000.png")
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(trained / "checkpoint.pth"), image_path, "--output", str(out),
                 "--threshold", "0.0"]) == 0  # fmt: skip
    drawn = np.asarray(Image.open(out / "000000.png"))
    # A 48 px image is drawn enlarged (shorter side 480) so the tags stay legible.
    original = np.asarray(Image.open(image_path).resize((480, 480), Image.NEAREST))
    assert drawn.shape == original.shape
    assert (drawn != original).any(axis=-1).mean() > 0.01
    records = json.loads((out / "predictions.json").read_text())
    assert len(records[0]["detections"]) > 0
    assert all({"label", "score", "box_xyxy", "category_id"} <= set(d) for d in records[0]["detections"])


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["evaluate", "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nothing"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "synthetic"])  # no --output-dir


def test_synthetic_defaults_are_the_cpu_demo_and_flags_override():
    args = build_parser().parse_args(["train", "--data", "synthetic", "--output-dir", "o", "--epochs", "3"])
    cfg = train_config_from_args(args)
    assert cfg.epochs == 3 and cfg.image_size < 800 and cfg.model_overrides["backbone"] in ("resnet18", "resnet34")
    args = build_parser().parse_args(["train", "--data", "/coco", "--output-dir", "o", "--model", "detr", "--amp"])
    cfg = train_config_from_args(args)
    assert (cfg.image_size, cfg.lr, cfg.lr_backbone, cfg.amp) == (800, 1e-4, pytest.approx(1e-5), "bf16")


def test_crowded_images_need_and_get_more_than_100_queries(tmp_path):
    spec = SyntheticSpec(image_size=48, num_train=0, num_val=0, num_crowded=2, crowded_image_size=128)
    root = str(prepare_synthetic(spec, root=tmp_path / "data"))
    out = tmp_path / "run"
    args = train_args(root, out, "--epochs", "1", "--train-split", "crowded", "--val-split", "crowded")
    args[args.index("--num-queries") + 1] = "150"
    args[args.index("--image-size") + 1] = "128"
    assert main([*args, "--max-dets", "150"]) == 0
    ckpt = load_checkpoint_file(out / "checkpoint.pth")
    assert ckpt["model_config"]["num_queries"] == 150
    with open(os.path.join(root, "annotations", "instances_crowded2017.json")) as f:
        coco = json.load(f)
    assert min(sum(a["image_id"] == im["id"] for a in coco["annotations"]) for im in coco["images"]) > 100
    metrics = json.loads((out / "eval.json").read_text())
    assert {"AP", "AP50"} <= set(metrics)
