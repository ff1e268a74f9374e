"""Nanoseconds per sample of the compiled CPU op, forward and backward, one thread, as the value tensor grows from
cache-resident to the scaled encoder's size, with the benchmark's uniformly random locations and with locations
near each query's own pixel (what an encoder layer's offsets give). Separates the per-sample arithmetic from the
cost of reaching value / grad_value; then the scaled encoder's forward and backward at 1 and 2 threads (how each
scales). ``python -m experiments.cpu.working_set``: 3 rounds, medians."""

from __future__ import annotations

import functools
import statistics
import time

import torch

OPS = torch.ops.deformable_detr
M, D, P = 8, 32, 4
BASE_LEVELS = ((64, 64), (32, 32), (16, 16), (8, 8))  # the scaled encoder (benchmarks/bench_msda.py CPU_SHAPES)


def _inputs(scale: float, coherent: bool, Q: int = 5440, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    levels = [(max(1, round(h * scale)), max(1, round(w * scale))) for h, w in BASE_LEVELS]
    L = len(levels)
    shapes = torch.tensor(levels)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    S = int(sizes.sum())
    value = torch.randn(1, S, M, D, generator=gen)
    if coherent:
        # query q sits at pixel q of the finest level (row-major), its points within +-2 pixels of it
        h0, w0 = levels[0]
        q = torch.arange(Q) % (h0 * w0)
        ref = torch.stack([(q % w0 + 0.5) / w0, (q // w0 + 0.5) / h0], -1)  # (Q, 2) normalised (x, y)
        wh = torch.tensor([(w, h) for h, w in levels], dtype=torch.float32)  # (L, 2)
        offsets = (torch.rand(1, Q, M, L, P, 2, generator=gen) * 4 - 2) / wh[:, None, :]
        loc = ref[None, :, None, None, None, :] + offsets
    else:
        loc = torch.rand(1, Q, M, L, P, 2, generator=gen) * 1.1 - 0.05
    attn = torch.randn(1, Q, M, L, P, generator=gen).flatten(3).softmax(-1).view(1, Q, M, L, P)
    grad = torch.randn(1, Q, M * D, generator=gen)
    return value, shapes, starts, loc, attn, grad, S


def _time(fn, repeats: int = 5) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    import deformable_detr  # noqa: F401  (loads the op)

    torch.set_num_threads(1)
    rows = []
    for coherent in (False, True):
        for scale in (0.125, 0.25, 0.5, 1.0):
            value, shapes, starts, loc, attn, grad, S = _inputs(scale, coherent)
            samples = loc.numel() // 2
            forward = functools.partial(OPS.ms_deform_attn, value, shapes, starts, loc, attn)
            backward = functools.partial(
                OPS.ms_deform_attn_backward, grad, value, shapes, starts, loc, attn, None, False
            )
            fwd, bwd = [], []
            for _ in range(3):
                fwd.append(_time(forward))
                bwd.append(_time(backward))
            f, b = statistics.median(fwd), statistics.median(bwd)
            rows.append((coherent, S, value.numel() * 4 / 2**20, f * 1e9 / samples, b * 1e9 / samples))
    print(f"torch {torch.__version__}, 1 thread, M={M} D={D} P={P} L=4, Q=5440, medians of 3 rounds of 5 calls")
    print("| locations | S | value MiB | fwd ns/sample | bwd ns/sample | bwd / fwd |")
    print("|---|---|---|---|---|---|")
    for coherent, S, mib, f, b in rows:
        kind = "near the query" if coherent else "uniform random"
        print(f"| {kind} | {S} | {mib:.2f} | {f:.1f} | {b:.1f} | {b / f:.2f} |")
    _scaling()


def _scaling() -> None:
    value, shapes, starts, loc, attn, grad, _ = _inputs(1.0, False)
    passes = {
        "fwd": functools.partial(OPS.ms_deform_attn, value, shapes, starts, loc, attn),
        "bwd": functools.partial(OPS.ms_deform_attn_backward, grad, value, shapes, starts, loc, attn, None, False),
    }
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(3):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for name, fn in passes.items():
                times.setdefault((name, threads), []).append(_time(fn))
    torch.set_num_threads(1)
    print()
    print("Scaled encoder, uniform random locations: ms per call, interleaved, medians of 3 rounds")
    print("| pass | 1 thread | 2 threads | speed-up |")
    print("|---|---|---|---|")
    for name in passes:
        one, two = (statistics.median(times[(name, t)]) * 1e3 for t in (1, 2))
        print(f"| {name} | {one:.1f} | {two:.1f} | {one / two:.2f} |")


if __name__ == "__main__":
    main()
