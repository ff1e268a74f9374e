"""Where a Deformable DETR R50 train step spends its CPU time: ours vs HF transformers, phase by phase and op by op.

Same weights (``bench_model_hf.build_pair``), same image, same targets in both. One step = forward, criterion
(matcher + losses + aux losses + the weighted sum), backward, AdamW step. Each phase is timed by process CPU time
in interleaved rounds (HF's criterion is timed by wrapping its ``loss_function``, which its forward calls last);
then one profiled step per variant gives the self CPU time of every op, and the ops where ours spends more than
HF are listed.

``python -m benchmarks.bench_train_profile [--threads 1] [--size 512x683] [--rounds 3] [--targets 8] [--out DIR]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import statistics
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.bench_model_hf import NUM_CLASSES, _hf_call, build_pair

SUITE = "train-profile"
PHASES = ("forward", "criterion", "backward", "optimizer")


def make_targets(batch: int, count: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    targets = []
    for _ in range(batch):
        centers = torch.rand(count, 2, generator=g) * 0.6 + 0.2
        sizes = torch.rand(count, 2, generator=g) * 0.25 + 0.05
        labels = torch.randint(0, NUM_CLASSES, (count,), generator=g)
        targets.append({"labels": labels, "boxes": torch.cat([centers, sizes], 1)})
    return targets


class _Clock:
    """Process CPU time (all threads) and wall time of each phase of one step."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        c, w = time.process_time(), time.perf_counter()
        with torch.profiler.record_function(f"phase:{name}"):
            yield
        self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - w


class Variant:
    """One model + optimizer + the way it computes its loss; ``step(clock)`` runs one timed train step."""

    def __init__(self, name: str, model, images, targets, config=None):
        import deformable_detr.models as M

        self.name = name
        self.model = model
        self.images = images
        self.targets = targets
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        if name.startswith("hf"):
            self.labels = [{"class_labels": t["labels"], "boxes": t["boxes"]} for t in targets]
            self._loss_fn = type(model).loss_function.fget(model)
        else:
            self.criterion = M.build_criterion(config or M.DeformableDETRConfig(num_classes=NUM_CLASSES))

    def step(self, clock: _Clock) -> float:
        model, optimizer = self.model, self.optimizer
        model.train()
        optimizer.zero_grad(set_to_none=True)
        if self.name.startswith("hf"):
            # HF's forward calls its loss function last: time that call as the criterion, the rest as forward.
            def timed_loss(*args, **kwargs):
                with clock.phase("criterion"):
                    return self._loss_fn(*args, **kwargs)

            model.loss_function = timed_loss
            c, w = time.process_time(), time.perf_counter()
            with torch.profiler.record_function("phase:forward+criterion"):
                loss = _hf_call(model, self.images, self.name == "hf+our-kernel", labels=self.labels).loss
            clock.cpu["forward"] = time.process_time() - c - clock.cpu["criterion"]
            clock.wall["forward"] = time.perf_counter() - w - clock.wall["criterion"]
        else:
            with clock.phase("forward"):
                outputs = model(self.images)
            with clock.phase("criterion"):
                losses = self.criterion(outputs, self.targets)
                weights = self.criterion.weight_dict
                loss = sum(losses[k] * weights[k] for k in losses if k in weights)
        with clock.phase("backward"):
            loss.backward()
        with clock.phase("optimizer"):
            optimizer.step()
        return float(loss.detach())


def phase_times(variants: list[Variant], rounds: int) -> dict[str, dict]:
    """Median per-phase CPU / wall ms over interleaved rounds (rotated order), after one warm-up step each."""
    for v in variants:
        v.step(_Clock())
    samples: dict[str, list[_Clock]] = {v.name: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            clock = _Clock()
            v.step(clock)
            samples[v.name].append(clock)
    out = {}
    for name, clocks in samples.items():
        row = {"rounds": len(clocks)}
        for p in PHASES:
            row[f"{p}_cpu_ms"] = statistics.median(c.cpu[p] for c in clocks) * 1e3
            row[f"{p}_wall_ms"] = statistics.median(c.wall[p] for c in clocks) * 1e3
        row["step_cpu_ms"] = statistics.median(sum(c.cpu.values()) for c in clocks) * 1e3
        row["step_wall_ms"] = statistics.median(sum(c.wall.values()) for c in clocks) * 1e3
        out[name] = row
    return out


def op_profile(variant: Variant) -> dict[str, dict]:
    """Self CPU time (ms) and call count of every op in one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        variant.step(_Clock())
    ops = {}
    for event in prof.key_averages():
        if event.key.startswith("phase:"):
            continue
        ops[event.key] = {"self_ms": event.self_cpu_time_total / 1e3, "calls": event.count}
    return ops


def build_variants(size, num_targets: int, names) -> list[Variant]:
    ours, hf = build_pair()
    images = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(2))
    targets = make_targets(1, num_targets)
    models = {"ours": ours, "hf": hf, "hf+our-kernel": copy.deepcopy(hf)}
    return [Variant(name, models[name], images, targets) for name in names]


def compare_ops(ours: dict, hf: dict, top: int = 25) -> list[dict]:
    """Ops sorted by how much more self time ours spends than HF (both directions kept; largest |diff| first)."""
    rows = []
    for key in set(ours) | set(hf):
        a, b = ours.get(key, {}), hf.get(key, {})
        rows.append({
            "op": key,
            "ours_ms": a.get("self_ms", 0.0), "ours_calls": a.get("calls", 0),
            "hf_ms": b.get("self_ms", 0.0), "hf_calls": b.get("calls", 0),
        })  # fmt: skip
    for r in rows:
        r["diff_ms"] = r["ours_ms"] - r["hf_ms"]
    rows.sort(key=lambda r: -abs(r["diff_ms"]))
    return rows[:top]


def markdown(env: dict, phases: dict, ops: list[dict] | None, args) -> str:
    lines = [
        f"# Train step, phase by phase: ours vs HF transformers — {env.get('device_name')}, "
        f"{str(env.get('date'))[:10]}",
        "",
        *common.environment_lines(env),
        f"- transformers {env.get('transformers')}; image 1x3x{args.size}, {args.targets} targets, AdamW; "
        f"{args.rounds} interleaved rounds, medians; load average at start {env.get('loadavg_start')}, "
        f"at end {env.get('loadavg_end')}",
        "- CPU = process CPU time of the phase (all threads); × HF = HF's step CPU time / this row's",
        "",
        "| variant | forward CPU ms | criterion CPU ms | backward CPU ms | optimizer CPU ms | step CPU ms | "
        "step wall ms | × HF (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = phases.get("hf", {}).get("step_cpu_ms")
    for name, r in phases.items():
        cells = [name] + [f"{r[f'{p}_cpu_ms']:.0f}" for p in PHASES]
        cells += [f"{r['step_cpu_ms']:.0f}", f"{r['step_wall_ms']:.0f}"]
        cells.append(f"{base / r['step_cpu_ms']:.2f}×" if base else "")
        lines.append("| " + " | ".join(cells) + " |")
    if ops:
        lines += [
            "",
            "Ops with the largest self-CPU-time difference, one profiled step each (ours − HF):",
            "",
            "| op | ours ms | calls | HF ms | calls | ours − HF ms |",
            "|---|---|---|---|---|---|",
        ]
        for r in ops:
            lines.append(
                f"| `{r['op']}` | {r['ours_ms']:.1f} | {r['ours_calls']} | {r['hf_ms']:.1f} | {r['hf_calls']} | "
                f"{r['diff_ms']:+.1f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", default="512x683")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", type=int, default=8)
    parser.add_argument("--variants", default="ours,hf")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = tuple(int(v) for v in args.size.split("x"))
    env = common.environment("cpu")
    env["transformers"] = __import__("transformers").__version__
    env["loadavg_start"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    variants = build_variants(size, args.targets, args.variants.split(","))
    phases = phase_times(variants, args.rounds)
    ops = None
    rows = [{"suite": SUITE, "backend": name, **r} for name, r in phases.items()]
    if not args.no_profile:
        profiles = {v.name: op_profile(v) for v in variants}
        if "ours" in profiles and "hf" in profiles:
            ops = compare_ops(profiles["ours"], profiles["hf"])
        rows.append({"suite": SUITE, "backend": "op-profile", "ops": profiles})
    env["loadavg_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    stem = f"train-profile-{common.device_slug('cpu')}-{_dt.date.today().isoformat()}{args.tag}"
    text = markdown(env, phases, ops, args)
    common.write_json_and_markdown(env, rows, text, args.out, stem)
    print(text)


if __name__ == "__main__":
    main()
