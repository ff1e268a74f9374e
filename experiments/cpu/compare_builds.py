"""A/B of two builds of the compiled CPU op, interleaved: each round runs one measurement process per checkout
(its own ``deformable_detr._C``), alternating the order, and the table gives medians over rounds of ns per sample
for forward and backward at the scaled encoder's size (experiments.cpu.working_set's inputs). Machine load moves
absolute times by up to 3x within an hour here; interleaving keeps the comparison fair.

``python -m experiments.cpu.compare_builds BEFORE_CHECKOUT AFTER_CHECKOUT [--rounds 5] [--threads 1]``"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_MEASURE = """
import functools, importlib.util, json, sys, time, torch
import deformable_detr  # the checkout in the working directory (first on sys.path)
assert deformable_detr.__file__.startswith({tree!r}), deformable_detr.__file__
spec = importlib.util.spec_from_file_location("working_set", {working_set!r})
working_set = importlib.util.module_from_spec(spec)
spec.loader.exec_module(working_set)
_inputs = working_set._inputs
torch.set_num_threads({threads})
OPS = torch.ops.deformable_detr
out = {{}}
for kind in ("uniform random", "near the query"):
    value, shapes, starts, loc, attn, grad, S = _inputs(1.0, kind == "near the query")
    samples = loc.numel() // 2
    fwd = functools.partial(OPS.ms_deform_attn, value, shapes, starts, loc, attn)
    bwd = functools.partial(OPS.ms_deform_attn_backward, grad, value, shapes, starts, loc, attn, None, False)
    for name, fn in (("fwd", fwd), ("bwd", bwd)):
        fn()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        out[kind + " " + name] = (time.perf_counter() - t0) / 5 * 1e9 / samples
print(json.dumps(out))
"""


def _run(tree: Path, threads: int) -> dict:
    code = _MEASURE.format(tree=str(tree), working_set=str(Path(__file__).with_name("working_set.py")), threads=threads)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True
    )  # cwd first on sys.path: that checkout's deformable_detr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for name in order:
            runs[name].append(_run(getattr(args, name).resolve(), args.threads))
    keys = list(runs["before"][0])
    print(f"{args.rounds} interleaved rounds, {args.threads} thread(s), ns per sample (median over rounds)")
    print("| case | before | after | after / before |")
    print("|---|---|---|---|")
    for key in keys:
        b = statistics.median(r[key] for r in runs["before"])
        a = statistics.median(r[key] for r in runs["after"])
        print(f"| {key} | {b:.1f} | {a:.1f} | {a / b:.2f} |")


if __name__ == "__main__":
    main()
