"""LSAP problems for the SIMT emulator (tests/simt/) judged against scipy: shared by tests/test_simt_lsap.py (quick
campaign) and tests/support/simt_campaign.py (long campaign). Each batch runs under two schedules x two poison bytes, which
must give identical assignments and status codes."""

from __future__ import annotations

import numpy as np
import torch

from support.lsap_oracle import scipy_rows
from support.simt_emulator import run

SCHEDULES = ((1, 0xA5), (2, 0x5A))


def make_costs(rng, B, N, M, kind):
    if kind == "uniform":
        return rng.random((B, N, M))
    if kind == "ties":  # few distinct values: many equal reduced costs
        return rng.integers(0, 3, (B, N, M)).astype(np.float64)
    if kind == "constant":
        return np.full((B, N, M), 2.5)
    if kind == "duplicate_rows":
        rows = rng.random((B, 1, M))
        return np.repeat(rows, N, axis=1) + (rng.random((B, N, 1)) < 0.3) * 0.5
    if kind == "signed":
        return rng.normal(0, 100, (B, N, M))
    if kind == "subnormal":  # float32 subnormals (softmax tails reach ~exp(-90) ~ 8e-40)
        return rng.integers(1, 5, (B, N, M)).astype(np.float64) * 1e-39
    raise ValueError(kind)


def emulate(cost: torch.Tensor, num_cols=None, **config):
    runs = [run("batched_lsap", cost, num_cols, seed=s, poison=p, **config) for s, p in SCHEDULES]
    (a0, s0), (a1, s1) = runs
    assert torch.equal(a0, a1) and torch.equal(s0, s1), "LSAP result differs between schedules/poison"
    return a0, s0


def check_against_scipy(cost: torch.Tensor, num_cols=None, **config) -> int:
    """Asserts every problem of the batch equals scipy's assignment with status 0; returns the problem count."""
    got, status = emulate(cost, num_cols, **config)
    assert (status == 0).all(), status
    c = cost.double().numpy()
    for b in range(c.shape[0]):
        m = c.shape[2] if num_cols is None else int(num_cols[b])
        want = scipy_rows(c[b, :, :m])
        np.testing.assert_array_equal(got[b].numpy(), want, err_msg=f"problem {b} ({c.shape[1]}x{m}) {config}")
    return c.shape[0]


def lsap_batches(rng, shapes, kinds, batch):
    for N, M in shapes:
        for kind in kinds:
            for dtype in (torch.float32, torch.float64):
                if kind == "subnormal" and dtype == torch.float64:
                    continue
                yield torch.tensor(make_costs(rng, batch(N, M), N, M, kind), dtype=dtype)
