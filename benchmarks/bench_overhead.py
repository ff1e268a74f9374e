"""Per-call overhead: ``dd.ms_deform_attn`` (the checked, dispatching wrapper) vs the raw
``torch.ops.deformable_detr.ms_deform_attn`` call, with torchvision's ``roi_align`` (a whole small op call,
Python wrapper included) as the yardstick of what a call should cost.

``python -m benchmarks.bench_overhead [--device cpu|cuda] [--threads 1] [--out DIR]`` writes
``overhead-<device>-<date>.json`` / ``.md``. Cases: a tiny input (the call cost itself) and the Deformable DETR
decoder shape (300 queries on an 800x1066 image's four levels). Rows per case: the raw op; the wrapper with the
same level tables every call (what a model does: checked once, then cached); the wrapper with int32 tables; the
wrapper with fresh tables every call (the uncached checks); roi_align. Timing: medians of interleaved rounds,
each sample repeating the call until it lasts >= 2 ms (CPU) / 1 ms (CUDA, CUDA events).
"""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

import torch

from benchmarks import report, timing

# (name, N, level shapes, M, D, Q, P)
CASES = (
    ("tiny", 1, ((2, 2), (1, 1)), 1, 4, 2, 1),
    ("decoder-800x1066", 1, ((100, 134), (50, 67), (25, 34), (13, 17)), 8, 32, 300, 4),
)


def _inputs(N, shapes, M, D, Q, P, device):
    gen = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    sizes = [h * w for h, w in shapes]
    starts = torch.tensor([sum(sizes[:i]) for i in range(len(sizes))], dtype=torch.int64)
    value = torch.randn(N, sum(sizes), M, D, generator=gen)
    loc = torch.rand(N, Q, M, len(shapes), P, 2, generator=gen)
    attn = torch.rand(N, Q, M, len(shapes), P, generator=gen)
    return [t.to(device) for t in (value, spatial_shapes, starts, loc, attn)]


def _roi_align_fn(device):
    try:
        from torchvision.ops import roi_align
    except Exception:  # torchvision missing: the yardstick row is skipped
        return None
    x = torch.randn(1, 4, 8, 8, device=device)
    boxes = torch.tensor([[0.0, 1.0, 1.0, 5.0, 5.0]], device=device)
    return lambda: roi_align(x, boxes, 2)


def _calls(inputs) -> dict:
    import deformable_detr as dd

    value, ss, lsi, loc, attn = inputs
    raw = torch.ops.deformable_detr.ms_deform_attn
    ss32, lsi32 = ss.int(), lsi.int()
    host_shapes = ss.cpu()
    return {
        "raw op": lambda: raw(value, ss, lsi, loc, attn),
        "wrapper": lambda: dd.ms_deform_attn(value, ss, lsi, loc, attn),
        "wrapper, int32 tables": lambda: dd.ms_deform_attn(value, ss32, lsi32, loc, attn),
        "wrapper, new tables each call": lambda: dd.ms_deform_attn(value, host_shapes.clone(), lsi.clone(), loc, attn),
    }


def run(device, *, reps: int = 15, budget_s: float = 20.0) -> list[dict]:
    device = torch.device(device)
    rows = []
    for name, N, shapes, M, D, Q, P in CASES:
        fns = _calls(_inputs(N, shapes, M, D, Q, P, device))
        roi = _roi_align_fn(device)
        if roi is not None:
            fns["torchvision roi_align"] = roi
        with torch.no_grad():
            times = timing.time_interleaved(fns, device, warmup=3, reps=reps, min_reps=5, budget_s=budget_s)
        raw_us = times["raw op"].get("time_ms", float("nan")) * 1e3
        shape = f"N={N} Q={Q} M={M} D={D} P={P} levels={'/'.join(f'{h}x{w}' for h, w in shapes)}"
        for label, res in times.items():
            row = {"suite": "overhead", "name": name, "shape": shape, "dtype": "fp32", "backend": label}
            if "error" in res:
                row["status"] = f"failed: {res['error']}"
            else:
                us = res["time_ms"] * 1e3
                row.update(status="ok", time_us=us, p25_us=res["time_p25_ms"] * 1e3, p75_us=res["time_p75_ms"] * 1e3)
                if label.startswith("wrapper"):
                    row["over_raw_us"] = us - raw_us
            rows.append(row)
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [
        f"# Op call overhead: {env.get('device_name')} — {str(env.get('date'))[:10]}",
        "",
        *report.environment_lines(env),
        "- medians of interleaved rounds; `over raw` = wrapper median − raw-op median of the same case (same run)",
        "",
    ]
    for name in dict.fromkeys(r["name"] for r in rows):
        group = [r for r in rows if r["name"] == name]
        lines += [f"## {name}", "", f"`{group[0]['shape']}`", "", "| call | median µs | p25–p75 µs | over raw µs |"]
        lines.append("|---|---|---|---|")
        for r in group:
            if r["status"] != "ok":
                lines.append(f"| {r['backend']} | {r['status']} | | |")
                continue
            over = f"{r['over_raw_us']:+.1f}" if "over_raw_us" in r else ""
            lines.append(f"| {r['backend']} | {r['time_us']:.1f} | {r['p25_us']:.1f}–{r['p75_us']:.1f} | {over} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (1: the call cost, not the kernel)")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = report.environment(device)
    rows = run(device)
    stem = f"overhead-{report.device_slug(device)}-{_dt.date.today().isoformat()}"
    text = markdown(env, rows)
    report.write_json_and_markdown(env, rows, text, args.out, stem)
    print(text)


if __name__ == "__main__":
    main()
