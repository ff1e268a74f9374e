"""Why ``torch.compile`` (inductor) is not faster than the eager optimized model on CPU: Deformable DETR R50
(random weights) at one image of ``--size``, ``optimize_for_inference`` eager vs the same model compiled
(``fullgraph``, static shapes). Times in interleaved rounds, then one profiled call of each with the top operators
by self CPU time (inductor's generated kernels appear as ``cpp_fused_*`` / graph entries, its library calls under
their aten / mkldnn names). ``python -m experiments.cpu.inductor_profile [--size 512 683] [--freezing]``."""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def _top(fn, n: int) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [(e.key, e.self_cpu_time_total / total, e.count) for e in events[:n]]


def main() -> None:
    import deformable_detr.models as M

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, nargs=2, default=(512, 683))
    parser.add_argument("--freezing", action="store_true", help="torch._inductor.config.freezing = True")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    eager = M.optimize_for_inference(M.build(M.DeformableDETRConfig(num_classes=91)))
    if args.freezing:
        torch._inductor.config.freezing = True
    compiled = M.compile_model(copy.deepcopy(eager))
    images = torch.randn(1, 3, *args.size)
    with torch.inference_mode():
        t0 = time.perf_counter()
        compiled(images)
        compile_s = time.perf_counter() - t0
        out_e, out_c = eager(images), compiled(images)
        err = max((out_e[k] - out_c[k]).abs().max().item() for k in ("pred_logits", "pred_boxes"))
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        for r in range(args.rounds):
            for name in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                fn = eager if name == "eager" else compiled
                t0 = time.process_time()
                fn(images)
                times[name].append(time.process_time() - t0)
        print(f"torch {torch.__version__}, 2 threads, image {args.size}, freezing={args.freezing}")
        print(f"first compiled call (compile) {compile_s:.1f} s; max |eager - compiled| {err:.1e}")
        print(f"| variant | CPU s per image (median of {args.rounds}, interleaved) |")
        print("|---|---|")
        for name, ts in times.items():
            print(f"| {name} | {statistics.median(ts):.3f} |")
        for name, fn in (("eager", eager), ("compiled", compiled)):
            print(f"\nTop operators by self CPU time, {name}:")
            print("| operator | share | calls |")
            print("|---|---|---|")
            for key, share, count in _top(lambda fn=fn: fn(images), 18):
                print(f"| `{key[:90]}` | {share:.1%} | {count} |")


if __name__ == "__main__":
    main()
