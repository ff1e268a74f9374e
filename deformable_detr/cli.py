"""``python -m deformable_detr train|evaluate|predict`` (also the ``deformable-detr`` console script).

``train`` starts from a preset — the CPU demo for ``--data synthetic``, the original COCO recipe otherwise — and
applies only the flags given on the command line. With ``--resume`` the checkpoint's own configuration is the
starting point instead (so ``--resume DIR/checkpoint.pth --epochs 60`` just trains longer). Under torchrun each
process reads its rank from the environment; there is no ``--world-size``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import textwrap

from deformable_detr.data.coco import LABEL_MAPS
from deformable_detr.data.transforms import AUGMENTATIONS
from deformable_detr.engine.config import (
    AMP_MODES,
    MODELS,
    TrainConfig,
    coco_preset,
    crowd_preset,
    demo_preset,
    trees_preset,
)
from deformable_detr.engine.predict import DEFAULT_THRESHOLD
from deformable_detr.engine.preflight import MissingPackageError

# CLI flag -> TrainConfig field, for the flags that override a preset only when given.
_TRAIN_FIELDS = {
    "data": "data",
    "output_dir": "output_dir",
    "model": "model",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "lr": "lr",
    "lr_backbone_mult": "lr_backbone_mult",
    "lr_linear_proj_mult": "lr_linear_proj_mult",
    "weight_decay": "weight_decay",
    "lr_drop": "lr_drop",
    "clip_max_norm": "clip_max_norm",
    "seed": "seed",
    "device": "device",
    "amp": "amp",
    "num_workers": "num_workers",
    "backbone_weights": "backbone_weights",
    "image_size": "image_size",
    "augmentation": "augmentation",
    "label_map": "label_map",
    "train_split": "train_split",
    "val_split": "val_split",
    "eval_every": "eval_every",
    "max_dets": "max_dets",
    "max_steps_per_epoch": "max_steps_per_epoch",
    "compile": "compile",
}


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE (a model config field), got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # bare strings such as backbone=resnet34
    return key.strip(), value


def _presets() -> dict[str, TrainConfig]:
    return {
        "synthetic": demo_preset("deformable_detr"),
        "synthetic --model detr": demo_preset("detr"),
        "neon-trees": trees_preset("deformable_detr"),
        "COCO": coco_preset("deformable_detr"),
        "COCO --model detr": coco_preset("detr"),
        "synthetic-crowded": crowd_preset("deformable_detr"),
    }


def _preset_default(field: str) -> str:
    """``default: X`` when every preset agrees, else each preset's value (merging equal neighbours)."""
    values: dict[str, list[str]] = {}
    for name, cfg in _presets().items():
        value = getattr(cfg, field) if field != "num_queries" else _num_queries(cfg)
        values.setdefault("none" if value is None else str(value), []).append(name)
    if len(values) == 1:
        return f"default: {next(iter(values))}"
    return "default: " + "; ".join(f"{v} ({', '.join(names)})" for v, names in values.items())


def _num_queries(cfg: TrainConfig) -> int:
    from deformable_detr.models import DeformableDETRConfig, DETRConfig

    default = (DETRConfig if cfg.model == "detr" else DeformableDETRConfig)().num_queries
    return cfg.model_overrides.get("num_queries", default)


def _help(text: str, field: str) -> str:
    return f"{text} ({_preset_default(field)})"


def _set_keys_epilog() -> str:
    import dataclasses

    from deformable_detr.models import DeformableDETRConfig, DETRConfig

    lines = ["--set KEY=VALUE keys (model config fields, with the package defaults; presets override some):"]
    for cls in (DeformableDETRConfig, DETRConfig):
        fields = [f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.name != "num_classes"]
        lines.append(f"  {cls.__name__} (--model {'detr' if cls is DETRConfig else 'deformable_detr'}):")
        lines.extend(textwrap.wrap(", ".join(fields), 100, initial_indent="    ", subsequent_indent="    "))
    lines.append("  num_classes always comes from the dataset.")
    return "\n".join(lines)


TRAIN_EXAMPLES = """examples:
  python -m deformable_detr train --data synthetic --output-dir runs/demo       # CPU demo, ~2-3 min on 2 cores
  python -m deformable_detr train --data synthetic --output-dir runs/demo --epochs 8 --set hidden_dim=128
  python -m deformable_detr train --resume runs/demo/checkpoint.pth --epochs 8  # train longer
  python -m deformable_detr train --data synthetic-crowded --output-dir runs/crowd --threads 1  # > 100 objects
  torchrun --nproc-per-node 8 -m deformable_detr train --data /data/coco --output-dir runs/ddetr \\
      --backbone-weights resnet50.pth --amp bf16                                   # the paper's recipe
"""

EVALUATE_EXAMPLES = """examples:
  python -m deformable_detr evaluate --checkpoint runs/demo/checkpoint.pth
  python -m deformable_detr evaluate --checkpoint runs/crowd/checkpoint.pth --split crowded \\
      --image-size 320 --max-dets 300
"""

PREDICT_EXAMPLES = """examples:
  python -m deformable_detr predict --checkpoint runs/demo/checkpoint.pth img1.png img2.jpg --output out/
  python -m deformable_detr predict --checkpoint runs/demo/checkpoint.pth photos/*.jpg --output out/ --threshold 0.3
"""


def _subparser(sub, name: str, help_text: str, description: str, epilog: str):
    return sub.add_parser(
        name,
        help=help_text,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _add_run_flags(p, command: str, writes: str) -> None:
    """Flags every command has: --overwrite, --threads, --skip-bad-images (not predict, which always skips)."""
    p.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {writes} already there (default: refuse, naming the file, before any work)",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads for torch (default: torch's, one per core). On a busy machine torch's OpenMP threads spin "
        "waiting for cores and a step can get many times slower; --threads 1 (or OMP_NUM_THREADS=1) avoids that",
    )
    if command != "predict":
        p.add_argument(
            "--skip-bad-images",
            action="store_true",
            help="leave out images that are missing or do not decode, one line each (default: stop before any "
            "work, naming them; every image is decoded once up front)",
        )


def _add_train(sub) -> None:
    p = _subparser(
        sub,
        "train",
        "train a detector; writes checkpoint.pth, log.jsonl, eval.json, loss.png",
        "Train a detector. Starts from a preset: the CPU demo for --data synthetic, the paper's COCO recipe\n"
        "otherwise (per-preset defaults are listed below); flags given on the command line override it.\n"
        "With --resume the checkpoint's own configuration is the starting point instead.",
        TRAIN_EXAMPLES + "\n" + _set_keys_epilog(),
    )
    req = p.add_argument_group("required (unless --resume)")
    req.add_argument(
        "--data",
        help="'synthetic' (built in, generated on first use), 'synthetic-crowded' (its crowd variant: 101-140 objects "
        "per image), 'neon-trees' (aerial tree crowns read from the optional "
        "deepforest wheel: pip install --no-deps deepforest==2.1.0) or a COCO-format folder",
    )
    req.add_argument("--output-dir", help="where checkpoint.pth, log.jsonl, eval.json and loss.png go")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint.pth written by train (default: none)")
    p.add_argument("--model", choices=MODELS, help="default: deformable_detr")
    p.add_argument("--epochs", type=int, help=_help("number of epochs", "epochs"))
    p.add_argument("--batch-size", type=int, help=_help("images per process", "batch_size"))
    p.add_argument("--lr", type=float, help=_help("AdamW learning rate", "lr"))
    p.add_argument("--lr-backbone-mult", type=float, help=_help("backbone lr = lr x this", "lr_backbone_mult"))
    p.add_argument(
        "--lr-linear-proj-mult",
        type=float,
        help=_help("lr multiplier of sampling_offsets / reference_points", "lr_linear_proj_mult"),
    )
    p.add_argument("--weight-decay", type=float, help=_help("AdamW weight decay", "weight_decay"))
    p.add_argument("--lr-drop", type=int, help=_help("epochs before the lr is multiplied by 0.1", "lr_drop"))
    p.add_argument("--clip-max-norm", type=float, help=_help("gradient clipping max norm, 0 disables", "clip_max_norm"))
    p.add_argument("--seed", type=int, help=_help("random seed", "seed"))
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this process's GPU if any, else cpu)")
    p.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        choices=AMP_MODES,
        help="autocast dtype; bare --amp means bf16 (default: none)",
    )
    p.add_argument(
        "--backbone-weights", metavar="FILE", help="local torchvision ResNet state dict (default: random init)"
    )
    p.add_argument("--num-workers", type=int, help=_help("data loader worker processes", "num_workers"))
    p.add_argument(
        "--image-size", type=int, help=_help("shortest side at eval; train sizes scale with it", "image_size")
    )
    p.add_argument("--augmentation", choices=AUGMENTATIONS, help=_help("training augmentation", "augmentation"))
    p.add_argument("--label-map", choices=LABEL_MAPS, help=_help("how category ids become labels", "label_map"))
    p.add_argument("--train-split", help=_help("training split name", "train_split"))
    p.add_argument("--val-split", help=_help("held-out split name", "val_split"))
    p.add_argument(
        "--eval-every", type=int, help=_help("evaluate every N epochs, 0: only after the last", "eval_every")
    )
    p.add_argument(
        "--max-dets", type=int, help=_help("detections kept per image; AP/AR are computed at this cap", "max_dets")
    )
    p.add_argument(
        "--max-steps-per-epoch",
        type=int,
        help=_help("cap on steps per epoch, none: whole dataset", "max_steps_per_epoch"),
    )
    p.add_argument(
        "--num-queries",
        type=int,
        help=_help("object queries, more than the objects per image (e.g. 300+ for crowds)", "num_queries"),
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_parse_override,
        metavar="KEY=VALUE",
        help="any model config field, repeatable, e.g. --set hidden_dim=256 --set with_box_refine=True "
        "(keys listed below; default: the preset's)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, per-epoch log lines only (default: off)")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="print the COCO table after every evaluation (default: only after the last epoch)",
    )
    _add_run_flags(p, "train", "the files of a run (checkpoint.pth, log.jsonl, eval.json, loss.png)")
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the model: a slow first step, pays on long runs and GPUs (default: off)",
    )


def _add_evaluate(sub) -> None:
    p = _subparser(
        sub,
        "evaluate",
        "COCO box metrics of a checkpoint; prints the table, writes JSON",
        "COCO box metrics of a training checkpoint. Every setting defaults to the checkpoint's training run.",
        EVALUATE_EXAMPLES,
    )
    req = p.add_argument_group("required")
    req.add_argument(
        "--checkpoint",
        required=True,
        metavar="CKPT",
        help="a checkpoint.pth written by train, or an official Deformable DETR / DETR checkpoint (then pass --data)",
    )
    p.add_argument(
        "--data",
        help="'synthetic', 'synthetic-crowded', 'neon-trees' or a COCO folder (default: what the checkpoint was "
        "trained on)",
    )
    p.add_argument("--split", help="split to evaluate, e.g. val2017, crowded (default: the checkpoint's val split)")
    p.add_argument(
        "--output",
        help="metrics JSON path (default: beside the checkpoint, eval_<split folder>.json for its training data, "
        "eval_<data name>_<split folder>.json for other --data)",
    )
    p.add_argument("--image-size", type=int, help="shortest side images are resized to (default: the training one)")
    p.add_argument("--batch-size", type=int, help="images per process (default: the training one)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this process's GPU if any, else cpu)")
    p.add_argument("--num-workers", type=int, help="data loader worker processes (default: the training one)")
    p.add_argument(
        "--max-dets", type=int, help="detections kept per image; AP/AR are computed at this cap (default: training's)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (default: off)")
    _add_run_flags(p, "evaluate", "an existing --output file")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model: a slow first step, pays on long runs and GPUs (default: off)",
    )


def _add_predict(sub) -> None:
    p = _subparser(
        sub,
        "predict",
        "draw detections (boxes, labels, scores) onto PNGs",
        "Run a checkpoint on image files; writes OUTPUT/<image stem>.png with the detections drawn and\n"
        "OUTPUT/predictions.json (images with equal stems from different folders get the folder names in front).\n"
        "A file that is not a readable image is skipped with a message.",
        PREDICT_EXAMPLES,
    )
    req = p.add_argument_group("required")
    req.add_argument("--checkpoint", required=True, metavar="CKPT", help="a checkpoint.pth written by train")
    req.add_argument("--output", required=True, metavar="DIR", help="folder for the drawn PNGs and predictions.json")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    p.add_argument(
        "--threshold",
        type=float,
        help="minimum score drawn and listed (default: the F1-optimal threshold on the validation split, stored in "
        f"the checkpoint by train; {DEFAULT_THRESHOLD} for a checkpoint without one)",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    _add_run_flags(p, "predict", "drawn PNGs / predictions.json")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model: a slow first step, pays on long runs and GPUs (default: off)",
    )


def _version() -> str:
    import torch

    from deformable_detr import __version__
    from deformable_detr._extension import build_summary

    return f"deformable-detr {__version__} (torch {torch.__version__}; {build_summary()})"


class _VersionAction(argparse.Action):
    """--version, computed only when asked (it loads the extension) and printed unwrapped."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deformable_detr",
        description="Train, evaluate and run DETR / Deformable DETR detectors (python -m deformable_detr, or the "
        "deformable-detr command).",
        epilog="Run 'python -m deformable_detr COMMAND --help' for each command's flags, defaults and examples.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the version, torch's, and how the extension was built"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,predict}")
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset (or the resumed checkpoint's config), then the flags given explicitly."""
    if args.resume:
        from deformable_detr.engine.checkpoint import load_checkpoint_file
        from deformable_detr.engine.safety import RESUME_FIXED, check_resume_flags

        ckpt = load_checkpoint_file(args.resume, purpose="train --resume")
        given = {name: getattr(args, name) for name, _ in RESUME_FIXED if getattr(args, name) is not None}
        overrides = dict(args.overrides)
        if args.num_queries is not None:
            overrides["num_queries"] = args.num_queries
        given["model_overrides"] = overrides
        check_resume_flags(ckpt["config"], given, ckpt["model_config"])
        cfg = TrainConfig.from_dict(ckpt["config"])
    else:
        if args.data is None or args.output_dir is None:
            raise SystemExit("train: --data and --output-dir are required (unless --resume)")
        model = args.model or "deformable_detr"
        presets = {"synthetic": demo_preset, "synthetic-crowded": crowd_preset, "neon-trees": trees_preset}
        cfg = presets.get(args.data, coco_preset)(model)
    for flag, name in _TRAIN_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            setattr(cfg, name, value)
    overrides = dict(cfg.model_overrides)
    overrides.update(dict(args.overrides))
    if args.num_queries is not None:
        overrides["num_queries"] = args.num_queries
    cfg.model_overrides = overrides
    cfg.resume = args.resume
    # Per invocation, never taken from a resumed checkpoint's config.
    cfg.quiet = args.quiet
    cfg.verbose = args.verbose
    cfg.overwrite = args.overwrite
    cfg.skip_bad_images = args.skip_bad_images
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        if args.command == "train":
            from deformable_detr.engine.trainer import train

            metrics = train(train_config_from_args(args))
            if metrics and not args.quiet:
                print(json.dumps(metrics))
        elif args.command == "evaluate":
            from deformable_detr.engine.trainer import evaluate_checkpoint

            evaluate_checkpoint(
                args.checkpoint,
                data=args.data,
                split=args.split,
                output=args.output,
                batch_size=args.batch_size,
                device=args.device,
                num_workers=args.num_workers,
                max_dets=args.max_dets,
                quiet=args.quiet,
                image_size=args.image_size,
                compile=args.compile,
                overwrite=args.overwrite,
                skip_bad_images=args.skip_bad_images,
            )
        else:
            from deformable_detr.engine.predict import predict

            records = predict(
                args.checkpoint,
                args.images,
                args.output,
                args.threshold,
                args.device,
                verbose=True,
                compile=args.compile,
                overwrite=args.overwrite,
            )
            for record in records:
                print(f"{record['image']}: {len(record['detections'])} detections -> {record['output']}")
            skipped = len(args.images) - len(records)
            print(
                f"threshold {records[0]['threshold']:.3g}; wrote {args.output}/predictions.json"
                + (f"; skipped {skipped} file(s), see above" if skipped else "")
            )
    except (OSError, ValueError, MissingPackageError) as err:
        # User errors (missing or unreadable files, bad values, missing packages): one line, no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        # Ctrl-C: train says what it saved and how to resume; the others have nothing to save.
        print(str(err) if str(err) else f"{args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
