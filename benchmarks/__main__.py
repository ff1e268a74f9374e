"""``python -m benchmarks [--quick] [--device cpu|cuda] [--suites msda,matcher,model] [--out DIR] [--static]``

Runs the suites on the present device (CUDA when available), then writes
``<out>/<device-slug>-<yyyy-mm-dd>[-quick].json`` (environment + every row), ``.md`` (tables) and ``.png``
(speed-up bars), and prints a short table last. ``--static`` instead writes the no-GPU facts (benchmarks/bench_static.py).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks import bench_matcher, bench_model, bench_msda, report, timing

SUITES = ("msda", "matcher", "model")
_SHORT_COLUMNS = [
    ("suite", "suite", "{}"),
    ("name", "case", "{}"),
    ("dtype", "dtype", "{}"),
    ("pass", "pass", "{}"),
    ("backend", "backend", "{}"),
    ("time_ms", "median ms", "{:.3f}"),
    ("speedup", "speed-up", "{:.2f}×"),
    ("x_floor", "× floor", "{:.2f}"),
    ("status", "status", "{}"),
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="deformable-detr benchmarks")
    parser.add_argument("--quick", action="store_true", help="a subset that finishes in under ~2 minutes")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads for torch (default 2, the documented CPU setting)"
    )
    parser.add_argument("--suites", default=",".join(SUITES), help=f"comma-separated subset of {','.join(SUITES)}")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="directory for the result files")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs, CI)")
    parser.add_argument(
        "--static",
        action="store_true",
        help="no timing: static kernel table, emulated memory counters and roofline predictions (no GPU needed)",
    )
    args = parser.parse_args(argv)
    args.suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    unknown = sorted(set(args.suites) - set(SUITES))
    if unknown:
        parser.error(f"--suites: unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.static:
        from benchmarks import bench_static

        for kind, path in bench_static.main(args.out).items():
            print(f"{kind}: {path}")
        return 0
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    env = report.environment(device)
    env["mode"] = "quick" if args.quick else "full"
    print(report.backend_line(device), file=sys.stderr, flush=True)
    env["suites"] = args.suites
    copy_gbps = None
    if device.type == "cuda":
        copy_gbps = timing.copy_bandwidth_gbps(device)
        env["copy_gbps"] = copy_gbps

    work: list[tuple[str, Callable[[], list[dict]]]] = []
    if "msda" in args.suites:
        work += bench_msda.tasks(device, args.quick, copy_gbps)
    if "matcher" in args.suites:
        work.append(("matcher", lambda: bench_matcher.run(device, args.quick)))
    if "model" in args.suites:
        work += bench_model.tasks(device, args.quick)

    from tqdm import tqdm

    date = _dt.date.today().isoformat()
    stem = f"{report.device_slug(device)}-{date}" + ("-quick" if args.quick else "")
    # After every case the rows so far go to <stem>-partial.{json,md}: a run cut off by a time limit (a lent GPU's
    # per-command limit, Ctrl-C) keeps what it measured. The complete files replace them at the end.
    partial_stem = f"{stem}-partial"
    rows: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(work, desc="benchmarks", unit="case", disable=args.no_progress, file=sys.stderr)
    for label, thunk in bar:
        bar.set_postfix_str(label)
        try:
            rows += thunk()
        except Exception as exc:  # one broken suite must not cost the results of the others
            suite = label.split()[0]
            rows.append({"suite": suite, "name": label, "status": f"failed: {type(exc).__name__}: {exc}"[:300]})
        env["wall_s"] = round(time.perf_counter() - t0, 1)
        report.write_json_and_markdown(env, rows, report.markdown_table(rows), args.out, partial_stem)

    paths = report.write_results(env, rows, args.out, stem)
    for suffix in (".json", ".md"):
        (Path(args.out) / f"{partial_stem}{suffix}").unlink(missing_ok=True)
    print(f"\n{env['device_name']} ({device.type}, {env['threads']} threads), {env['wall_s']} s")
    for kind, path in paths.items():
        print(f"  {kind}: {path}")
    print()
    print(report.markdown_table(rows, _SHORT_COLUMNS))
    print()
    print(bench_msda.summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
