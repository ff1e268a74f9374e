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

from deformable_detr.engine.config import AMP_MODES, MODELS, TrainConfig, coco_preset, demo_preset, trees_preset

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


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a detector; writes checkpoint.pth, log.jsonl, eval.json, loss.png")
    p.add_argument(
        "--data",
        help="'synthetic' (built-in, generated on first use), 'neon-trees' (aerial tree crowns read from the "
        "optional deepforest wheel: pip install --no-deps deepforest==2.1.0) or a COCO-format folder",
    )
    p.add_argument("--output-dir", help="where checkpoint.pth, log.jsonl, eval.json and loss.png go")
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float)
    p.add_argument("--lr-backbone-mult", type=float, help="backbone lr = lr x this (0.1 in the originals)")
    p.add_argument("--lr-linear-proj-mult", type=float, help="lr multiplier of sampling_offsets/reference_points")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--lr-drop", type=int, help="epochs before the lr is multiplied by 0.1")
    p.add_argument("--clip-max-norm", type=float, help="gradient clipping max norm (0 disables)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: this process's GPU if any, else cpu)")
    p.add_argument("--amp", nargs="?", const="bf16", choices=AMP_MODES, help="autocast dtype (bare --amp: bf16)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint.pth written by train")
    p.add_argument("--backbone-weights", metavar="FILE", help="local torchvision ResNet state dict")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--image-size", type=int, help="shortest side at eval (800 for COCO; train sizes scale with it)")
    p.add_argument(
        "--augmentation", choices=("detr", "flip", "aerial", "none"), help="aerial: flips and 90-degree rotations"
    )
    p.add_argument("--label-map", choices=("contiguous", "category_id"))
    p.add_argument("--train-split")
    p.add_argument("--val-split")
    p.add_argument("--eval-every", type=int, help="evaluate every N epochs (0: only at the end)")
    p.add_argument("--max-dets", type=int, help="COCOeval detections per image (100; more for crowded data)")
    p.add_argument("--max-steps-per-epoch", type=int)
    p.add_argument("--num-queries", type=int, help="object queries (> objects per image; e.g. 300+ for crowds)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        type=_parse_override,
        metavar="KEY=VALUE",
        help="any model config field, e.g. --set hidden_dim=256 --set with_box_refine=True",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars, per-epoch log lines only")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="COCO box metrics of a checkpoint; prints the table, writes JSON")
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--data", help="'synthetic', 'neon-trees' or a COCO folder (default: what the checkpoint was trained on)"
    )
    p.add_argument("--split", help="split to evaluate (default: the checkpoint's val split)")
    p.add_argument("--output", help="metrics JSON path (default: eval_<split>.json beside the checkpoint)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--max-dets", type=int)
    p.add_argument(
        "--image-size", type=int, help="shortest side at eval (default: the checkpoint's; larger for whole scenes)"
    )
    p.add_argument("--quiet", action="store_true")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="draw detections (boxes, labels, scores) onto PNGs")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum score drawn (default 0.5)")
    p.add_argument("--device")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deformable_detr", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    return parser


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset (or the resumed checkpoint's config), then the flags given explicitly."""
    if args.resume:
        from deformable_detr.engine.checkpoint import load_checkpoint_file

        cfg = TrainConfig.from_dict(load_checkpoint_file(args.resume)["config"])
    else:
        if args.data is None or args.output_dir is None:
            raise SystemExit("train: --data and --output-dir are required (unless --resume)")
        model = args.model or "deformable_detr"
        presets = {"synthetic": demo_preset, "neon-trees": trees_preset}
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
    cfg.quiet = args.quiet
    cfg.validate()
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
                image_size=args.image_size,
                quiet=args.quiet,
            )
        else:
            from deformable_detr.engine.predict import predict

            for record in predict(args.checkpoint, args.images, args.output, args.threshold, args.device):
                print(f"{record['image']}: {len(record['detections'])} detections -> {record['output']}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
