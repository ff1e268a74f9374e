"""The tiny model, data and command lines the pipeline tests train with (tests/test_pipeline_*.py)."""

from __future__ import annotations

from deformable_detr.data import SyntheticSpec, prepare_synthetic

TINY_MODEL = [
    "--set", "backbone=resnet18", "--set", "hidden_dim=32", "--set", "nheads=2", "--set", "dim_feedforward=32",
    "--set", "enc_layers=1", "--set", "dec_layers=2", "--set", "num_feature_levels=3", "--set", "enc_n_points=1",
    "--set", "dec_n_points=1", "--set", "dropout=0.0", "--num-queries", "6",
]  # fmt: skip


def tiny_dataset(root):
    """4 training and 2 validation images of 48 px with up to 3 objects each, under ``root``."""
    spec = SyntheticSpec(image_size=48, num_train=4, num_val=2, num_crowded=0, max_objects=3)
    return prepare_synthetic(spec, root=root)


def train_args(data_root, out, *extra) -> list[str]:
    """``train`` on the tiny model and data, CPU, no augmentation, quiet; ``extra`` appended."""
    return [
        "train", "--data", str(data_root), "--output-dir", str(out), "--image-size", "48", "--batch-size", "2",
        "--num-workers", "0", "--augmentation", "none", "--lr-drop", "1", "--lr", "1e-3", "--quiet",
        "--device", "cpu", *TINY_MODEL, *extra,
    ]  # fmt: skip


def one_line_error(capsys) -> str:
    """The CLI's stderr, asserted to be one line starting with ``error: ``."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err
