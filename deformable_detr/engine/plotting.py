"""Loss curves from ``log.jsonl`` (one JSON object per epoch) to a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_log(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(log_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Total loss and each unweighted loss term per epoch (log scale), and AP50 when the log has it."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    if not records:
        raise ValueError(f"plot_losses: {log_path} has no records")
    fig = loss_figure(records)
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path


def loss_figure(records: list[dict]):
    """The figure of :func:`plot_losses`. Every series has markers, so a single epoch shows as points rather than
    an empty panel, and the epoch axis spans at least one epoch either side of the data."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in records]
    loss_keys = sorted(k for k in records[-1] if k.startswith("train_loss"))
    eval_keys = [k for k in ("val_AP50", "val_AP") if any(k in r for r in records)]
    fig, axes = plt.subplots(1, 2 if eval_keys else 1, figsize=(12 if eval_keys else 7, 4.5), squeeze=False)
    x_range = (min(epochs) - 0.5, max(epochs) + 0.5)
    ax = axes[0, 0]
    for key in loss_keys:
        values = [r.get(key, float("nan")) for r in records]
        ax.plot(
            epochs, values, marker="o", markersize=4, label=key.removeprefix("train_"),
            linewidth=2.5 if key == "train_loss" else 1.2,
        )  # fmt: skip
    positive = [r[k] for r in records for k in loss_keys if isinstance(r.get(k), (int, float)) and r[k] > 0]
    if positive:
        # Log scale over at least one decade, so a single epoch (or flat losses) gets a readable axis.
        low, high = min(positive), max(positive)
        ax.set_yscale("log")
        ax.set_ylim(min(low, high / 10) / 1.3, high * 1.3)
    ax.set_xlim(*x_range)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (log scale)")
    ax.set_title("training losses")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if eval_keys:
        ax = axes[0, 1]
        for key in eval_keys:
            points = [(r["epoch"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key.removeprefix("val_"))
            for x, y in points[-1:]:
                ax.annotate(f"{y:.3f}", (x, y), textcoords="offset points", xytext=(-30, 6))
        ax.set_xlim(*x_range)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_xlabel("epoch")
        # Scaled to the data (from 0, with headroom for the label): a fixed 0-1 axis flattens small APs.
        top = max([r[k] for r in records for k in eval_keys if isinstance(r.get(k), (int, float))], default=0.0)
        ax.set_ylim(0, min(1.0, max(top * 1.25, 0.01)))
        ax.set_title("held-out COCO metrics")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig
