"""Long SIMT-emulator campaign (`make test-emulated`): random MSDA cases and LSAP problems through the real CUDA
device code on the CPU (tests/simt/), each judged as in the quick campaign (simt_msda_check.py,
simt_lsap_check.py), then the coverage table (kernel x dtype x VEC x group x tiles x arch -> launches) and the
max errors per dtype. Cases cover both layouts (uniform P, points_per_level) and both sampling modes. Usage: python tests/simt_campaign.py [--msda 2000] [--lsap 1000] [--seed 0]"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from simt_emulator import load  # noqa: E402
from simt_lsap_check import check_against_scipy, make_costs  # noqa: E402
from simt_msda_check import check_case, launch_shape_cases, offset_view  # noqa: E402

DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
PLACEMENTS = ("aligned", "flush_front", "flush_end")


def random_msda_case(rng: random.Random, i: int):
    dtype = DTYPES[i % 4]
    if rng.random() < 0.4:
        D = rng.choice(launch_shape_cases(dtype))
    else:
        D = rng.choice([1, 2, 3, 4, 5, 7, 8, 12, 16, 24, 31, 32, 33, 48, 64, 96, 128, 130, 256, 264])
    L = rng.randint(1, 3)
    shapes = [(rng.randint(1, 6), rng.randint(1, 6)) for _ in range(L)]
    if rng.random() < 0.3:
        shapes[rng.randrange(L)] = (1, 1)
    # Small heads x samples: every shuffle round is a fiber switch per lane, the emulator's main cost.
    N, Q, M, P = rng.randint(1, 2), rng.randint(1, 20), rng.randint(1, 3), rng.randint(1, 3)
    config = dict(
        placement=rng.choice(PLACEMENTS),
        arch=rng.choice((800, 900)),
        min_threads=rng.choice((0, 1)),
        view=offset_view if rng.random() < 0.15 else None,
    )
    # The op's layouts: points per level (some P_l = 0), discrete sampling, and empty (0 x W) levels.
    if rng.random() < 0.3:
        config["counts"] = [rng.randint(0, 4) for _ in range(L)]
    if rng.random() < 0.3:
        config["discrete"] = True
    if rng.random() < 0.1:
        shapes[rng.randrange(L)] = (0, rng.randint(1, 3))
    return (N, Q, M, D, shapes, P, dtype), config


def msda_campaign(count: int, seed: int):
    rng = random.Random(seed)
    errors = defaultdict(lambda: defaultdict(float))
    for i in range(count):
        (N, Q, M, D, shapes, P, dtype), config = random_msda_case(rng, i)
        try:
            case_errors = check_case(N, Q, M, D, shapes, P, dtype, seed=seed + i, repeat=False, **config)
        except AssertionError as e:
            raise SystemExit(f"MSDA case {i} {(N, Q, M, D, shapes, P, dtype)} {config}: {e}") from e
        for name, err in case_errors.items():
            errors[str(dtype).split(".")[-1]][name] = max(errors[str(dtype).split(".")[-1]][name], err)
        if (i + 1) % 100 == 0:
            print(f"  MSDA {i + 1}/{count}", flush=True)
    return errors


def lsap_campaign(count: int, seed: int):
    rng = np.random.default_rng(seed)
    kinds = ("uniform", "ties", "constant", "duplicate_rows", "signed", "subnormal")
    shapes = [
        (1, 1),
        (2, 3),
        (5, 5),
        (9, 4),
        (4, 9),
        (17, 17),
        (33, 20),
        (20, 33),
        (64, 64),
        (7, 300),
        (300, 7),
        (60, 200),
    ]
    total, i = 0, 0
    while total < count:
        N, M = shapes[i % len(shapes)]
        kind = kinds[(i // len(shapes)) % len(kinds)]
        dtype = torch.float32 if kind == "subnormal" or i % 2 else torch.float64
        B = 8 if N * M <= 400 else 2
        cost = torch.tensor(make_costs(rng, B, N, M, kind), dtype=dtype)
        num_cols = torch.tensor(rng.integers(0, M + 1, B)) if i % 3 == 0 else None
        total += check_against_scipy(cost, num_cols)
        i += 1
    for shape in ((2000, 3), (3, 2000)):
        total += check_against_scipy(torch.tensor(rng.random((1, *shape)), dtype=torch.float32))
    return total


def print_summary(rows):
    """One line per kernel x dtype: the VEC, group and tiles values seen, and the launches."""
    summary = defaultdict(lambda: [set(), set(), set(), set(), 0])
    for (kernel, dtype, vec, group, tiles, arch), n in rows:
        entry = summary[(kernel, dtype)]
        for i, v in enumerate((vec, group, tiles, arch)):
            entry[i].add(v)
        entry[4] += int(n)
    print(f"\n{'kernel':<22}{'dtype':<10}{'VEC':<10}{'group':<18}{'tiles':<12}{'arch':<12}{'launches':>9}")
    for (kernel, dtype), (vecs, groups, tiles, archs, n) in sorted(summary.items()):
        cols = [",".join(sorted(v, key=lambda x: (len(x), x))) for v in (vecs, groups, tiles, archs)]
        print(f"{kernel:<22}{dtype:<10}{cols[0]:<10}{cols[1]:<18}{cols[2]:<12}{cols[3]:<12}{n:>9}")


def print_coverage():
    rows = [(key.split("|"), n) for key, n in load().coverage()]
    print_summary(rows)
    print(f"\n{'kernel':<22}{'dtype':<10}{'VEC':>4}{'group':>7}{'tiles':>7}{'arch':>6}{'launches':>10}")
    for (kernel, dtype, vec, group, tiles, arch), n in sorted(rows):
        print(f"{kernel:<22}{dtype:<10}{vec:>4}{group:>7}{tiles:>7}{arch:>6}{n:>10}")
    print(f"{len(rows)} configurations (LSAP rows: group = threads per block)")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--msda", type=int, default=2000)
    parser.add_argument("--lsap", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.time()
    load()
    print(f"emulator loaded in {time.time() - start:.0f} s", flush=True)
    load().reset_coverage()
    t = time.time()
    errors = msda_campaign(args.msda, args.seed)
    print(f"MSDA: {args.msda} cases x 2 schedules x 2 poison bytes, all within tolerance ({time.time() - t:.0f} s)")
    t = time.time()
    problems = lsap_campaign(args.lsap, args.seed)
    print(f"LSAP: {problems} problems identical to scipy under 2 schedules x 2 poison bytes ({time.time() - t:.0f} s)")
    print_coverage()
    print("\nmax |error| vs the float64 oracle:")
    for dtype, errs in errors.items():
        print(f"  {dtype:<10}" + "  ".join(f"{name} {err:.2e}" for name, err in errs.items()))
    print(f"total {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
