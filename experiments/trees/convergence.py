"""DETR vs Deformable DETR (with and without box refinement), and torchvision's Faster R-CNN, under one CPU budget.

``python -m experiments.trees.convergence run --data neon-trees --model detr --budget 500 --out DIR`` trains one
model from the CLI preset of that data (``synthetic``: the demo preset; ``neon-trees``: the trees preset, 450
queries, 100 for ``deformable_detr_100q``) for ``--budget`` CPU seconds of training steps, evaluates held-out AP50
after every epoch and writes ``DIR/<data>-<model>.json``; on ``neon-trees`` it also scores the final model on the dense split (450 and 100
detections). ``... report --out DIR`` turns every JSON there into ``convergence.png`` (AP50 vs epoch and vs
training time) and ``convergence.md`` (a table).

Same for every model: the ResNet-18 from the same random initialisation (seeded; no pretrained weights exist
offline), frozen stem + layer1 and frozen batch norm, the preset's augmentation, batch size and image size,
constant learning rate (no drop inside so short a budget), ``num_workers=0`` so that data loading is part of the
process CPU time being budgeted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from deformable_detr.data import build_dataset, collate, resolve_data_root, resolve_split
from experiments.trees import common as tc
from experiments.trees.peer import build_faster_rcnn

MODELS = ("detr", "deformable_detr", "deformable_detr_refine", "faster_rcnn", "deformable_detr_100q")
LABELS = {
    "detr": "DETR",
    "deformable_detr": "Deformable DETR",
    "deformable_detr_refine": "Deformable DETR + box refine",
    "faster_rcnn": "Faster R-CNN (torchvision, NMS)",
    "deformable_detr_100q": "Deformable DETR, 100 queries",
}


def pixel_scale(data: str, cfg) -> float:
    return cfg.image_size / tc.TILE_SIZE if data == "neon-trees" else 1.0


def run(data: str, model: str, budget: float, out_dir: Path, seed: int = 42, threads: int = 2) -> dict:
    # On a loaded machine, threads waiting for a descheduled sibling spin and bill CPU time: one thread per run
    # keeps CPU seconds a measure of work (a 2-thread synthetic run billed ~7x the CPU per step of the quiet demo).
    torch.set_num_threads(threads)
    cfg = tc.preset_for(data, model)
    kwargs = dict(image_size=cfg.image_size, max_size=cfg.max_size, synthetic_spec=None)
    if data == "synthetic":
        from deformable_detr.engine.trainer import synthetic_spec

        kwargs["synthetic_spec"] = synthetic_spec(cfg)
    train_set = build_dataset(data, cfg.train_split, True, augmentation=cfg.augmentation, **kwargs)
    val_dir, val_ann = resolve_split(resolve_data_root(data, kwargs["synthetic_spec"]), cfg.val_split)
    if model == "faster_rcnn":
        cfg, step, predictor, checksum = build_faster_rcnn(data, train_set.num_classes, seed)
    else:
        cfg, step, predictor, checksum = tc.build_detr_family(data, model, train_set.num_classes, seed)
    scale = pixel_scale(data, cfg)

    def batches(epoch):
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        torch.manual_seed(seed * 1000 + epoch)
        return DataLoader(
            train_set, cfg.batch_size, shuffle=True, drop_last=True, collate_fn=collate, generator=generator
        )

    def evaluate():
        metrics = tc.detect_split(
            predictor(scale, cfg.max_dets), val_dir, val_ann, cfg.max_dets, train_set.label_to_category
        )
        return {f"val_{k}": v for k, v in metrics.items() if k in ("AP", "AP50", "AP75")}

    start = time.perf_counter()
    history = tc.train_budgeted(step, batches, evaluate, budget)
    result = {
        "data": data,
        "model": model,
        "label": LABELS[model],
        "budget_cpu_s": budget,
        "batch_size": cfg.batch_size,
        "image_size": cfg.image_size,
        "model_overrides": cfg.model_overrides,
        "backbone_init_checksum": checksum,
        "seed": seed,
        "threads": threads,
        "history": history,
        "total_wall_s": round(time.perf_counter() - start, 1),
        "env": tc.environment(),
    }
    if data == "neon-trees":
        dense_dir, dense_ann = resolve_split(resolve_data_root(data), "dense")
        detections, ids, _ = tc.predict_split(predictor(scale, 450), dense_dir, dense_ann)
        result["dense"] = {f"max_dets_{m}": tc.coco_metrics(dense_ann, detections, ids, m) for m in (450, 100)}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{data}-{model}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")
    return result


def report(out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))]
    runs = [r for r in runs if "history" in r and r.get("model") in MODELS]
    datasets = sorted({r["data"] for r in runs}, reverse=True)
    fig, axes = plt.subplots(len(datasets), 2, figsize=(12, 4.2 * len(datasets)), squeeze=False)
    lines = [
        "| data | model | threads | training CPU s | epochs | training wall s | held-out AP50 per epoch | final AP50 "
        "| final AP |"
    ]
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for row, data in enumerate(datasets):
        for r in sorted((r for r in runs if r["data"] == data), key=lambda r: MODELS.index(r["model"])):
            h = r["history"]
            ap50 = [e["val_AP50"] for e in h]
            axes[row, 0].plot([e["epoch"] + 1 for e in h], ap50, marker="o", label=r["label"])
            axes[row, 1].plot([e["train_cpu_s"] for e in h], ap50, marker="o", label=r["label"])
            curve = " ".join(f"{v:.3f}" for v in ap50)
            epochs = len(h) - 1 + h[-1]["steps"] / max(e["steps"] for e in h)
            lines.append(
                f"| {data} | {r['label']} | {r.get('threads', 2)} | {h[-1]['train_cpu_s']:.0f} | {epochs:.1f} | "
                f"{h[-1]['train_wall_s']:.0f} | "
                f"{curve} | {ap50[-1]:.3f} | {h[-1]['val_AP']:.3f} |".replace("| -1.000 |", "| n/a |")
            )
        axes[row, 0].set(title=f"{data}: held-out AP50 per epoch", xlabel="epoch", ylabel="AP50")
        axes[row, 1].set(title=f"{data}: AP50 vs training time", xlabel="training time (process CPU s)")
        for ax in axes[row]:
            ax.grid(alpha=0.3)
            ax.set_ylim(bottom=0)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "convergence.png", dpi=110)
    (out_dir / "convergence.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run")
    p.add_argument("--data", choices=("synthetic", "neon-trees"), required=True)
    p.add_argument("--model", choices=MODELS, required=True)
    p.add_argument("--budget", type=float, required=True, help="CPU seconds of training steps")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a shared machine, see run())")
    p.add_argument("--out", type=Path, required=True)
    peer = sub.add_parser("peer", help="neon-trees: Faster R-CNN and Deformable DETR under one budget (peer.py)")
    peer.add_argument("--budget", type=float, required=True, help="CPU seconds of training steps per model")
    peer.add_argument("--seed", type=int, default=42)
    peer.add_argument("--out", type=Path, required=True)
    peer.add_argument("--models", default="faster_rcnn,deformable_detr")
    r = sub.add_parser("report")
    r.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.data, args.model, args.budget, args.out, args.seed, args.threads)
    elif args.command == "peer":
        for model in args.models.split(","):
            run("neon-trees", model, args.budget, args.out, args.seed)
    else:
        report(args.out)


if __name__ == "__main__":
    main()
