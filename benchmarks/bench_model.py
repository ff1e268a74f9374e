"""Model suite: Deformable DETR inference (images/s) and a full train step (forward, set criterion, backward,
AdamW step) with the MSDA backend switched on one model, so every backend runs the same weights.

GPU: the R50 recipe at 800×1333, batch 2. CPU: a small config (ResNet-18, 2+2 layers, 384×512, batch 1).
Backbones start from random weights: nothing is downloaded, and timing does not depend on the values.
The full CPU run adds the R50 comparison with HF transformers (benchmarks/bench_model_hf.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch

from benchmarks import bench_msda, report, timing

SUITE = "model"
BASELINE = "pytorch"

# The R50 recipe is each config's default; only what differs from it is listed.
GPU_CONFIG: dict = {}
GPU_INPUT = (2, 800, 1333)  # batch, height, width
CPU_CONFIG = {
    "backbone": "resnet18",
    "enc_layers": 2,
    "dec_layers": 2,
    "dim_feedforward": 512,
    "num_queries": 100,
    "num_classes": 20,
}
CPU_INPUT = (1, 384, 512)
QUICK_CPU_INPUT = (1, 192, 256)


def _models_module():
    import deformable_detr.models as models

    if not hasattr(models, "build") or not hasattr(models, "DeformableDETRConfig"):
        raise ImportError("deformable_detr.models has no build / DeformableDETRConfig yet")
    return models


def build_model(overrides: dict):
    """(model, criterion or None, note) from ``DeformableDETRConfig`` with the given field overrides; overrides
    naming fields the config lacks are dropped and listed in the note rather than failing the suite."""
    models = _models_module()
    config_cls = models.DeformableDETRConfig
    known = {f.name for f in dataclasses.fields(config_cls)} if dataclasses.is_dataclass(config_cls) else None
    kwargs = {k: v for k, v in overrides.items() if known is None or k in known}
    dropped = sorted(set(overrides) - set(kwargs))
    config = config_cls(**kwargs)
    built = models.build(config)
    criterion = None
    if isinstance(built, tuple):
        model = built[0]
        criterion = built[1] if len(built) > 1 else None
    else:
        model = built
    notes = [f"config fields not found: {', '.join(dropped)}"] if dropped else []
    if criterion is None and hasattr(models, "build_criterion"):
        try:
            criterion = models.build_criterion(config)
        except Exception as exc:  # the matcher may be missing; the train step then uses a surrogate loss
            notes.append(f"criterion unavailable ({type(exc).__name__}: {exc})".splitlines()[0][:200])
    return model, criterion, config, "; ".join(notes)


def set_backend(model: torch.nn.Module, backend: str) -> int:
    """Point every MSDeformAttn in ``model`` at ``backend``; returns how many were switched."""
    from deformable_detr import MSDeformAttn

    count = 0
    for module in model.modules():
        if isinstance(module, MSDeformAttn):
            module.backend = backend
            count += 1
    return count


def random_targets(batch: int, num_boxes: int, num_classes: int, device, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        centers = torch.rand(num_boxes, 2, generator=gen) * 0.6 + 0.2
        sizes = torch.rand(num_boxes, 2, generator=gen) * 0.25 + 0.05
        labels = torch.randint(0, num_classes, (num_boxes,), generator=gen)
        targets.append({"labels": labels.to(device), "boxes": torch.cat([centers, sizes], 1).to(device)})
    return targets


def _total_loss(criterion, outputs, targets) -> torch.Tensor:
    if criterion is None:
        # No criterion available yet: a surrogate that still back-propagates through every head and layer.
        return outputs["pred_logits"].float().square().mean() + outputs["pred_boxes"].float().sum()
    losses = criterion(outputs, targets)
    weights = getattr(criterion, "weight_dict", None)
    if weights:
        return sum(losses[k] * weights[k] for k in losses if k in weights)
    return sum(v for k, v in losses.items() if k.startswith("loss"))


def _output_diff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in ("pred_logits", "pred_boxes"))


def run_model(
    device,
    quick: bool,
    *,
    overrides: dict | None = None,
    input_shape: tuple[int, int, int] | None = None,
    rounds: int | None = None,
) -> list[dict]:
    """Inference and train-step rows for each backend; ``overrides`` / ``input_shape`` (batch, height, width)
    replace the device's default config and input, ``rounds`` the number of timed rounds (tests use tiny ones)."""
    device = torch.device(device)
    if device.type == "cuda":
        default, (batch, height, width), label = GPU_CONFIG, GPU_INPUT, "deformable-detr-r50"
    else:
        default, (batch, height, width), label = (
            CPU_CONFIG,
            QUICK_CPU_INPUT if quick else CPU_INPUT,
            "deformable-detr-r18-small",
        )
    if overrides is not None:
        default, label = overrides, "custom"
    if input_shape is not None:
        batch, height, width = input_shape
    overrides = default
    shape = f"B={batch} {height}x{width}"
    base = {"suite": SUITE, "name": label, "shape": shape, "dtype": "fp32"}
    backends = bench_msda.bench_backends(device)
    try:
        model, criterion, config, note = build_model(overrides)
    except Exception as exc:
        reason = f"not available: {type(exc).__name__}: {exc}".splitlines()[0][:300]
        return [dict(base, backend=b, status=reason, **{"pass": p}) for p in ("inference", "train") for b in backends]
    model = model.to(device)
    if set_backend(model, backends[0]) == 0:
        reason = "not available: the model has no MSDeformAttn module to switch"
        return [dict(base, backend=b, status=reason, **{"pass": p}) for p in ("inference", "train") for b in backends]
    if criterion is not None and hasattr(criterion, "to"):
        criterion = criterion.to(device)
    if criterion is None:
        note = "; ".join(x for x in (note, "surrogate loss instead of the set criterion") if x)
    num_classes = getattr(config, "num_classes", 91)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, height, width, generator=gen).to(device)
    targets = random_targets(batch, 20 if device.type == "cuda" else 5, num_classes, device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def inference(backend: str) -> Callable[[], object]:
        def call():
            set_backend(model, backend)
            model.eval()
            with torch.no_grad():
                return model(images)

        return call

    def train_step(backend: str) -> Callable[[], object]:
        def call():
            set_backend(model, backend)
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss = _total_loss(criterion, model(images), targets)
            loss.backward()
            optimizer.step()
            return loss

        return call

    rows: list[dict] = []
    reference_out = None
    for pass_name, factory in (("inference", inference), ("train", train_step)):
        fns = {b: factory(b) for b in backends}
        reps = rounds or (2 if quick else 7)
        min_reps = min(reps, 2 if quick else 3)
        times = timing.time_interleaved(
            fns, device, warmup=1, reps=reps, min_reps=min_reps, budget_s=20 if quick else 60
        )
        for b in backends:
            row, ok = timing.result_row(base, b, pass_name, times[b])
            rows.append(row)
            if not ok:
                continue
            res = times[b]
            row.update(throughput=batch / (res["time_ms"] / 1e3), unit="img/s")
            if note:
                row["note"] = note
            if device.type == "cuda":
                row["peak_mem_mib"] = timing.peak_memory_mib(fns[b], device)
            if pass_name == "inference":
                out = fns[b]()
                if b == BASELINE:
                    reference_out = out
                row["_out"] = out
    for row in rows:
        out = row.pop("_out", None)
        if out is not None and reference_out is not None:
            row["max_err"] = _output_diff(out, reference_out)
    timing.add_speedups(rows, BASELINE)
    return rows


def tasks(device, quick: bool) -> list[tuple[str, Callable[[], list[dict]]]]:
    work = [("model", lambda: run_model(device, quick))]
    if not quick and torch.device(device).type == "cpu":
        # The R50 comparison with HF transformers (same weights): benchmarks/bench_model_hf.py; one row saying
        # why when transformers/timm are not installed.
        from benchmarks import bench_model_hf

        work.append(("model-hf", lambda: bench_model_hf.run(train_compile=False)))
    return work


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(report.markdown_table(run_model(args.device, args.quick)))


if __name__ == "__main__":
    main()
