"""Issue 16, items 2, 7, 8: the warning when the compiled extension is missing, which backend runs, --help /
--version, the loss and benchmark plots."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

from deformable_detr.cli import build_parser, main

matplotlib.use("Agg")
REPO = Path(__file__).resolve().parents[1]


# --- 2. never silently slow


def test_missing_extension_warns_once_and_says_why(tmp_path):
    """A source tree without an in-place build: one warning per process naming the cause and the build command,
    and load_error() that does not blame a circular import."""
    shutil.copytree(
        REPO / "deformable_detr", tmp_path / "deformable_detr", ignore=shutil.ignore_patterns("_C*.so", "__pycache__")
    )
    code = (
        # An editable install of this checkout would map deformable_detr._C back to the built tree.
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]\n"
        "import warnings; warnings.simplefilter('default')\n"
        "import deformable_detr as dd\n"
        "from deformable_detr._extension import load_error\n"
        "print(dd.available_backends('cpu')); dd.available_backends('cpu'); print(load_error())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "['pytorch']"
    assert proc.stderr.count("ExtensionNotLoadedWarning") == 1, proc.stderr
    assert "is not built" in proc.stderr and "pip install --no-build-isolation ." in proc.stderr
    assert "circular" not in proc.stdout and "is not built" in proc.stdout


def test_train_logs_the_backend(tmp_path, capsys):
    from support.pipeline import train_args

    from deformable_detr.data import SyntheticSpec, prepare_synthetic

    root = prepare_synthetic(SyntheticSpec(image_size=48, num_train=2, num_val=1, num_crowded=0), root=tmp_path)
    args = train_args(root, tmp_path / "out", "--epochs", "1")
    assert main(args) == 0
    assert re.search(r"^MSDA backend: (cpu on cpu|pytorch \(the slow)", capsys.readouterr().out, re.M)


# --- 7. discoverability


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_every_flag_has_help_with_its_default(command):
    sub = _subparsers()[command]
    for action in sub._actions:
        if action.dest in ("help",) or not action.option_strings:
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
        required = action.required or any(g.title.startswith("required") and action in g._group_actions
                                          for g in sub._action_groups)  # fmt: skip
        assert required or "default" in action.help, f"{command} {action.option_strings}: no default in help"
    text = sub.format_help()
    assert "``" not in text and ":func:" not in text
    assert "examples:" in text


def test_preset_dependent_defaults_are_shown_per_preset():
    text = _subparsers()["train"].format_help()
    flat = " ".join(text.split())
    assert re.search(
        r"number of epochs \(default: 4 \(synthetic, synthetic --model detr\); 20 \(neon-trees\); 50 \(COCO\); 300",
        flat,
    )
    # --set keys are listed with their defaults.
    assert "with_box_refine=False" in text and "num_feature_levels=4" in text and "eos_coef=0.1" in text


def test_required_arguments_are_marked():
    assert "required:" in _subparsers()["predict"].format_help()
    assert "required (unless --resume):" in _subparsers()["train"].format_help()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("deformable-detr 0.") and "torch" in out and ("extension" in out)


def test_docs_name_only_what_a_user_has():
    """No references to the tooling that wrote the project (a lent GPU, $OUT set by a tool, shared/ notes)."""
    paths = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "deformable_detr").rglob("*.py"))]
    for path in paths:
        text = path.read_text()
        for phrase in ("lent GPU", "a lent", "set by the tool", "GPU.md", "docs/pipeline.md"):
            assert phrase not in text, f"{path}: {phrase!r}"


# --- 8. plots


def test_one_epoch_loss_plot_has_points_and_a_sensible_axis():
    from deformable_detr.engine.plotting import loss_figure

    record = {"epoch": 0, "train_loss": 6.4, "train_loss_ce": 1.2, "train_loss_bbox": 0.6, "val_AP50": 0.3}
    fig = loss_figure([record])
    for ax in fig.axes:
        lines = ax.get_lines()
        assert lines and all(line.get_marker() not in (None, "None", "") for line in lines)
        low, high = ax.get_xlim()
        assert low <= -0.5 and high >= 0.5, (low, high)
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks == [0.0], ticks  # whole epochs only
    low, high = fig.axes[0].get_ylim()
    assert low < 0.6 and high > 6.4 and high / low >= 10


def test_benchmark_plot_keeps_labels_inside_and_labels_the_baseline():
    from benchmarks.report import speedup_figure

    rows = [
        {"suite": "msda", "name": "encoder", "dtype": "fp32", "pass": "fwd", "backend": "pytorch", "speedup": 1.0},
        {"suite": "msda", "name": "encoder", "dtype": "fp32", "pass": "fwd", "backend": "cpu", "speedup": 21.9},
        {"suite": "msda", "name": "encoder", "dtype": "bf16", "pass": "fwd+bwd", "backend": "cpu", "speedup": 35.2},
        {"suite": "model", "name": "deformable detr r18 small", "dtype": "fp32", "pass": "train step",
         "backend": "cpu", "speedup": 1.9},
    ]  # fmt: skip
    fig = speedup_figure(rows, "title")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1× = pytorch baseline"]
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        assert box.x1 <= ax.bbox.x1 + 1, f"{text.get_text()!r} sticks out of the axes"
    for label in ax.get_yticklabels():
        assert label.get_window_extent(renderer).x0 >= 0, f"{label.get_text()!r} is cut off"


def test_log_to_png_end_to_end(tmp_path):
    from deformable_detr.engine.plotting import plot_losses

    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"epoch": 0, "train_loss": 3.0}) + "\n")
    assert plot_losses(log, tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
