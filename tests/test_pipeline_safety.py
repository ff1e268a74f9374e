"""Issue 21, items 2-4: nothing is lost and nothing fails late. No run, metrics file or drawn prediction is replaced
without --overwrite (refused in one line before any work); a resumed run refuses flags it cannot honour; foreign
checkpoints are recognised before any data is generated (official layouts load); bad images are caught by the
pre-flight decode; Ctrl-C saves a checkpoint and prints the resume command."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch
from support.pipeline import one_line_error, train_args

from deformable_detr import models
from deformable_detr.cli import main
from deformable_detr.engine import trainer
from deformable_detr.engine.checkpoint import load_checkpoint_file
from deformable_detr.engine.predict import Predictor
from deformable_detr.models.checkpoint import official_model_config


@pytest.fixture
def no_work(monkeypatch):
    """Records any data preparation or training step: the guards must fire before both."""
    calls = []
    monkeypatch.setattr(trainer, "_datasets", lambda *a, **k: calls.append("data") or pytest.fail("data built"))
    monkeypatch.setattr(trainer, "build_dataset", lambda *a, **k: calls.append("data") or pytest.fail("data built"))
    monkeypatch.setattr(trainer, "train_one_epoch", lambda *a, **k: pytest.fail("trained"))
    return calls


# --- item 2: never overwrite without --overwrite, unique output names


def test_train_refuses_an_existing_run_before_any_work(trained, data_root, capsys, no_work):
    before = {name: (trained / name).read_bytes() for name in ("checkpoint.pth", "log.jsonl", "eval.json")}
    assert main(train_args(str(data_root), trained, "--epochs", "1")) == 2
    err = one_line_error(capsys)
    assert str(trained / "checkpoint.pth") in err and "--overwrite" in err and "--resume" in err
    assert {name: (trained / name).read_bytes() for name in before} == before


def test_train_overwrite_replaces_the_run(trained, data_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    old = (run / "checkpoint.pth").read_bytes()
    assert main(train_args(str(data_root), run, "--epochs", "1", "--seed", "3", "--overwrite")) == 0
    assert (run / "checkpoint.pth").read_bytes() != old
    assert len((run / "log.jsonl").read_text().splitlines()) == 1


def test_predict_same_basenames_from_two_folders_and_no_overwrite(trained, data_root, tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(data_root / "val2017" / f"00000{0 if name == 'a' else 1}.png", tmp_path / name / "000000.png")
    images = [str(tmp_path / "a" / "000000.png"), str(tmp_path / "b" / "000000.png")]
    out = tmp_path / "pred"
    ckpt = str(trained / "checkpoint.pth")
    assert main(["predict", "--checkpoint", ckpt, *images, "--output", str(out)]) == 0
    records = json.loads((out / "predictions.json").read_text())
    outputs = [r["output"] for r in records]
    assert len(set(outputs)) == 2 and sorted(p.name for p in out.glob("*.png")) == ["a_000000.png", "b_000000.png"]
    capsys.readouterr()
    stamp = (out / "a_000000.png").stat().st_mtime_ns
    assert main(["predict", "--checkpoint", ckpt, *images, "--output", str(out)]) == 2
    err = one_line_error(capsys)
    assert "a_000000.png" in err and "--overwrite" in err
    assert (out / "a_000000.png").stat().st_mtime_ns == stamp
    assert main(["predict", "--checkpoint", ckpt, *images, "--output", str(out), "--overwrite"]) == 0


def test_evaluate_on_other_data_keeps_the_runs_metrics(trained, data_root, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    ckpt = str(run / "checkpoint.pth")
    assert main(["evaluate", "--checkpoint", ckpt, "--quiet"]) == 0
    own = (run / "eval_val2017.json").read_text()
    other = tmp_path / "other"
    shutil.copytree(data_root, other)
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(other), "--quiet"]) == 0
    assert (run / "eval_val2017.json").read_text() == own
    assert (run / "eval_other_val2017.json").is_file()
    # An explicit --output is never replaced without --overwrite.
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", ckpt, "--output", str(run / "eval.json"), "--quiet"]) == 2
    assert str(run / "eval.json") in one_line_error(capsys)


# --- item 3: flags a resumed run cannot honour are errors


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--model", "detr"], "--model detr"),
        (["--num-queries", "9"], "--num-queries 9"),
        (["--set", "hidden_dim=64"], "--set hidden_dim=64"),
        (["--lr", "0.5"], "--lr 0.5"),
        (["--lr-drop", "7"], "--lr-drop 7"),
    ],
)
def test_resume_refuses_flags_it_cannot_honour(trained, tmp_path, capsys, no_work, flags, named):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = (run / "checkpoint.pth").read_bytes()
    assert main(["train", "--resume", str(run / "checkpoint.pth"), "--epochs", "2", "--quiet", *flags]) == 2
    err = one_line_error(capsys)
    assert named in err and "the checkpoint has" in err
    assert (run / "checkpoint.pth").read_bytes() == before


def test_resume_accepts_flags_equal_to_the_checkpoints(trained):
    from deformable_detr.cli import build_parser, train_config_from_args

    ckpt = str(trained / "checkpoint.pth")
    args = build_parser().parse_args(["train", "--resume", ckpt, "--num-queries", "6", "--model", "deformable_detr"])
    assert train_config_from_args(args).model_overrides["num_queries"] == 6


# --- item 4: foreign checkpoints, backbone weights, bad images, Ctrl-C


def test_foreign_checkpoint_is_one_line_before_any_data(data_root, tmp_path, capsys, no_work):
    path = tmp_path / "foreign.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(2)}, "epoch": 3}, path)
    image = str(data_root / "val2017" / "000000.png")
    for argv in (
        ["evaluate", "--checkpoint", str(path)],
        ["predict", "--checkpoint", str(path), image, "--output", str(tmp_path / "p")],
        ["train", "--resume", str(path)],
    ):
        capsys.readouterr()
        assert main(argv) == 2
        err = one_line_error(capsys)
        assert str(path) in err and "not a checkpoint written by train" in err and "encoder.weight" not in err
        assert "'model'" in err and "'epoch'" in err  # what was found


def _official(tmp_path, model_name: str):
    """A checkpoint in the original repos' layout: the state dict under "model" and their argparse args."""
    if model_name == "detr":
        config = models.DETRConfig(backbone="resnet18", hidden_dim=32, nheads=2, dim_feedforward=48, enc_layers=1,
                                   dec_layers=2, num_queries=7, num_classes=5)  # fmt: skip
    else:
        config = models.DeformableDETRConfig(backbone="resnet18", hidden_dim=32, nheads=2, dim_feedforward=48,
                                             enc_layers=1, dec_layers=2, num_queries=7, num_classes=5,
                                             num_feature_levels=3, enc_n_points=1, dec_n_points=1)  # fmt: skip
    torch.manual_seed(0)
    model = models.build(config)
    args = argparse.Namespace(nheads=2, enc_n_points=1, dec_n_points=1, with_box_refine=False, lr=2e-4)
    path = tmp_path / f"{model_name}_official.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 49}, path)
    return path, config, model


@pytest.mark.parametrize("model_name", ["deformable_detr", "detr"])
def test_official_checkpoints_load_for_evaluate_and_predict(data_root, tmp_path, capsys, model_name):
    path, config, model = _official(tmp_path, model_name)
    name, fields, description = official_model_config(torch.load(path, weights_only=False))
    assert name == model_name and "official" in description
    for key in ("backbone", "hidden_dim", "enc_layers", "dec_layers", "dim_feedforward", "num_queries",
                "num_classes", "nheads"):  # fmt: skip
        assert fields[key] == getattr(config, key), key
    predictor = Predictor(path)
    image = torch.rand(3, 48, 48)
    with torch.no_grad():
        model.eval()
        expected = model([(image - 0.5) / 0.25])["pred_boxes"]
        got = predictor.model([(image - 0.5) / 0.25])["pred_boxes"]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # evaluate needs the data (an official checkpoint records none): one line, nothing generated.
    assert main(["evaluate", "--checkpoint", str(path)]) == 2
    assert "pass --data" in one_line_error(capsys)
    # Its 5 category-id labels (ids 1-4 + unused 0) fit the synthetic folder read with label_map category_id.
    assert main(["evaluate", "--checkpoint", str(path), "--data", str(data_root), "--image-size", "48", "--quiet"]) == 0
    assert (path.parent / f"eval_{data_root.name}_val2017.json").is_file()


def test_backbone_weights_that_are_our_checkpoint_is_one_line(trained, data_root, tmp_path, capsys, no_work):
    argv = train_args(str(data_root), tmp_path / "out", "--backbone-weights", str(trained / "checkpoint.pth"))
    assert main(argv) == 2
    err = one_line_error(capsys)
    assert "--backbone-weights" in err and str(trained / "checkpoint.pth") in err


def test_truncated_png_is_caught_before_training(data_root, tmp_path, capsys, monkeypatch):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    png = root / "train2017" / "000002.png"
    png.write_bytes(png.read_bytes()[:-200])  # header intact, pixel data cut short
    steps = []
    real = trainer.train_one_epoch
    monkeypatch.setattr(trainer, "train_one_epoch", lambda *a, **k: steps.append(1) or real(*a, **k))
    assert main(train_args(str(root), tmp_path / "out", "--epochs", "1")) == 2
    err = one_line_error(capsys)
    assert "000002.png" in err and "--skip-bad-images" in err and not steps
    assert main(train_args(str(root), tmp_path / "out2", "--epochs", "1", "--skip-bad-images")) == 0
    err = capsys.readouterr().err
    assert err.count("skipped") == 1 and "000002.png" in err and steps


def test_missing_image_under_evaluate_is_one_line(trained, data_root, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    (root / "val2017" / "000001.png").unlink()
    ckpt = str(trained / "checkpoint.pth")
    out = str(tmp_path / "m.json")
    assert main(["evaluate", "--checkpoint", ckpt, "--data", str(root), "--output", out, "--num-workers", "1"]) == 2
    assert "000001.png" in one_line_error(capsys)
    argv = ["evaluate", "--checkpoint", ckpt, "--data", str(root), "--output", out, "--skip-bad-images", "--quiet"]
    assert main(argv) == 0


def test_ctrl_c_saves_and_prints_the_resume_command(data_root, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real = trainer._to_device

    def interrupting(*args):
        calls.append(1)
        if len(calls) == 4:  # epoch 1, after its first step
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(trainer, "_to_device", interrupting)
    assert main(train_args(str(data_root), out, "--epochs", "2")) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"resume with: python -m deformable_detr train --resume {out / 'checkpoint.pth'}" in err
    ckpt = load_checkpoint_file(out / "checkpoint.pth")
    assert ckpt["epoch"] == 0 and ckpt["interrupted_step"] == 1
    monkeypatch.setattr(trainer, "_to_device", real)
    assert main(["train", "--resume", str(out / "checkpoint.pth"), "--quiet"]) == 0
    assert load_checkpoint_file(out / "checkpoint.pth")["epoch"] == 1
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and (out / "eval.json").is_file()
