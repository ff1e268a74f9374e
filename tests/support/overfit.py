"""The tiny-batch overfit run of tests/test_models_criterion.py, and the measurement of its margin across CPU
capabilities and seeds (``python tests/support/overfit.py``: each ATEN_CPU_CAPABILITY this CPU runs x seeds x
variants in fresh processes, one markdown table).

The loss of a seeded training run is chaotic in the float rounding: the same seed on the same machine follows a
different trajectory under another vector width (DETR's loss sits near 13 for ~25 steps and then falls when the
matching settles, at a step that moves by 5-10 between capabilities). A threshold is only safe well past that
fall; the table says how far past it STEPS and THRESHOLD are."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch

import deformable_detr.models as M

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support.* when run as a script
from support.cpu_isa import supported_capabilities  # noqa: E402

SMALL = dict(
    backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=2, dim_feedforward=64, num_queries=12,
    num_classes=7, dropout=0.0,
)  # fmt: skip
VARIANTS = ("detr", "deformable_two_stage")
STEPS = 60  # the run's length: every trajectory measured is past its fall by then
WINDOW = 10  # the best loss of the last WINDOW steps is judged
THRESHOLD = 0.5  # ... against THRESHOLD x the first step's loss


def total_loss(criterion, losses):
    return sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)


def overfit_history(variant: str, seed: int = 0, steps: int = STEPS) -> list[float]:
    """Losses of ``steps`` AdamW steps of a small model on one 96x96 image with three boxes."""
    torch.manual_seed(seed)
    if variant == "detr":
        config = M.DETRConfig(**SMALL)
    else:
        config = M.DeformableDETRConfig(**SMALL, with_box_refine=True, two_stage=True)
    model, criterion = M.build(config), M.build_criterion(config)
    images = torch.rand(1, 3, 96, 96)
    targets = [
        {
            "labels": torch.tensor([1, 3, 5]),
            "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4], [0.5, 0.5, 0.8, 0.8]]),
        }
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(steps):
        loss = total_loss(criterion, criterion(model(images), targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return history


def judged_ratio(history: list[float]) -> float:
    """Best loss of the last WINDOW steps / the first loss: what the test compares with THRESHOLD."""
    return min(history[-WINDOW:]) / history[0]


def _one(variant: str, seed: int) -> None:
    torch.set_num_threads(1)
    history = overfit_history(variant, seed)
    print(f"{torch.backends.cpu.get_cpu_capability()} {judged_ratio(history):.3f} {history[0]:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return _one(args.one[0], int(args.one[1]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"# Overfit margin: {STEPS} steps, best of the last {WINDOW} / first, threshold {THRESHOLD}\n")
    print(f"CPU: {cpu}; torch {torch.__version__}; 1 thread\n")
    print("| variant | seed | " + " | ".join(supported_capabilities()) + " |")
    print("|---|---|" + "---|" * len(supported_capabilities()))
    worst = 0.0
    for variant in VARIANTS:
        for seed in range(args.seeds):
            cells = []
            for capability in supported_capabilities():
                env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
                out = subprocess.run(
                    [sys.executable, __file__, "--one", variant, str(seed)],
                    env=env, capture_output=True, text=True, check=True,
                ).stdout.split()  # fmt: skip
                assert out[0].lower() == capability, out  # ATen ran the level asked for
                cells.append(out[1])
                worst = max(worst, float(out[1]))
            print(f"| {variant} | {seed} | " + " | ".join(cells) + " |")
    print(f"\nWorst ratio {worst:.3f}: {THRESHOLD / worst:.1f}x below the threshold {THRESHOLD}.")


if __name__ == "__main__":
    main()
