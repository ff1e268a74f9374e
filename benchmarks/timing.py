"""Interleaved timing of callables on CPU or CUDA, peak memory, copy bandwidth, and the row helpers that turn a
timing result into a report row (``result_row``) and fill speed-ups against a baseline backend (``add_speedups``).
The row keys are documented in ``benchmarks/report.py``."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

# A sample shorter than this is dominated by timer/launch noise, so short calls are repeated inside one sample.
_MIN_SAMPLE_S = {"cuda": 1e-3, "cpu": 2e-3}
# Larger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB) so each sample starts from a cold cache.
_L2_FLUSH_BYTES = 256 * 1024 * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Flusher:
    """Evicts the GPU L2 between samples: kernels that re-read a warm 45 MB value tensor would look faster than
    they run inside a model, where the previous layer's writes have moved the cache on."""

    def __init__(self, device: torch.device):
        self.buffer = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self) -> None:
        if self.buffer is not None:
            self.buffer.zero_()


def _time_once(fn: Callable[[], object], device: torch.device, inner: int) -> float:
    """Seconds per call, averaged over ``inner`` back-to-back calls (CUDA events on GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device | str,
    *,
    warmup: int = 2,
    reps: int = 15,
    min_reps: int = 3,
    budget_s: float = 30.0,
) -> dict[str, dict]:
    """Median time of each callable, sampled in interleaved rounds.

    Each round runs every callable once, in a rotated order, so slow drifts (thermal, other processes on a
    shared machine) hit all backends alike instead of whichever ran last. ``reps`` rounds are cut down to fit
    ``budget_s`` (never below ``min_reps``). A callable that raises is dropped and reported with its error.

    Returns ``{name: {"time_ms", "time_p25_ms", "time_p75_ms", "samples"} or {"error": str}}``.
    """
    device = torch.device(device)
    flush = _Flusher(device)
    results: dict[str, dict] = {}
    inner: dict[str, int] = {}
    per_call: dict[str, float] = {}
    live = list(fns)
    for name in list(live):
        try:
            for _ in range(max(1, warmup)):
                fns[name]()
            synchronize(device)
            flush()
            per_call[name] = _time_once(fns[name], device, 1)
        except Exception as exc:  # a backend that fails is a result, not a crash of the whole benchmark
            results[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:300]}
            live.remove(name)
            continue
        floor = _MIN_SAMPLE_S.get(device.type, 2e-3)
        inner[name] = max(1, min(1000, math.ceil(floor / max(per_call[name], 1e-9))))
    round_s = sum(per_call[n] * inner[n] for n in live)
    n_rounds = max(min_reps, min(reps, int(budget_s / max(round_s, 1e-9))))
    # A sizing call made after warm-up with nothing repeated is a valid sample; for second-long calls (a model
    # train step on CPU) not throwing it away saves a whole round.
    samples: dict[str, list[float]] = {n: [per_call[n]] if inner[n] == 1 else [] for n in live}
    for r in range(n_rounds):
        order = live[r % max(1, len(live)) :] + live[: r % max(1, len(live))]
        for name in order:
            if len(samples[name]) >= n_rounds:
                continue
            flush()
            synchronize(device)
            samples[name].append(_time_once(fns[name], device, inner[name]))
    for name in live:
        s = sorted(samples[name])
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        results[name] = {
            "time_ms": statistics.median(s) * 1e3,
            "time_p25_ms": q[0] * 1e3,
            "time_p75_ms": q[2] * 1e3,
            "samples": len(s),
        }
    return results


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Extra GPU memory one call needs above what is already allocated; None where it can't be measured (CPU)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int = 512 * 2**20) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes per second, GB/s = 1e9 B/s): the roof that
    the memory-traffic floor of each kernel is computed against."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 128 * 2**20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_interleaved({"copy": lambda: dst.copy_(src)}, device, warmup=3, reps=20, budget_s=5)["copy"]["time_ms"]
    return 2 * src.numel() * 4 / (t / 1e3) / 1e9


def result_row(base: dict, backend: str, pass_name: str, result: dict) -> tuple[dict, bool]:
    """A report row for one backend's timing result; False (row marked failed) when the timing raised."""
    row = dict(base, backend=backend, **{"pass": pass_name})
    if "error" in result:
        row["status"] = f"failed: {result['error']}"
        return row, False
    row.update(result, status="ok")
    return row, True


def add_speedups(rows: list[dict], baseline: str, keys: Sequence[str] = ("suite", "name", "dtype", "pass")) -> None:
    """Fill ``speedup`` = baseline time / row time for rows that share ``keys`` with a timed baseline row."""
    base = {
        tuple(r.get(k) for k in keys): r["time_ms"]
        for r in rows
        if r.get("backend") == baseline and r.get("time_ms") is not None
    }
    for r in rows:
        b = base.get(tuple(r.get(k) for k in keys))
        if b is not None and r.get("time_ms"):
            r["speedup"] = b / r["time_ms"]
