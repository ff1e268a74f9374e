"""Roofline *predictions* of the MSDA CUDA kernels on H100 SXM and A100 SXM (no GPU involved), and the same
method applied to the original one-thread-per-channel design as a sanity check against a published figure.

time >= max(compulsory DRAM bytes / HBM bandwidth,
            L1->L2 sectors x 32 B / L2 bandwidth,
            atomic sector operations / L2 atomic sector rate (a half-sector atomic costs a whole one),
            issued warp instructions / (SMs x 4 schedulers x clock),
            warp-samples x dependent latency per sample / (SMs x resident warps))

Inputs: the static table (registers -> resident warps, SASS instructions of the per-sample loop) and the emulator
counters (sectors per sample). Every constant is in GPUS / LATENCY below with its source; NOTES.md ("Roofline")
discusses them. Rows are predictions; ``measured_ms`` stays empty until benchmarks/gpu_check.sh fills it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    arch: str  # the SASS the extension runs there
    sms: int
    clock_ghz: float
    hbm_gbps: float
    l2_bytes: int
    l2_gbps: float
    max_warps_per_sm: int
    l1_latency: int  # cycles, assumed (see NOTES.md)
    l2_latency: int
    dram_latency: int
    source: str


GPUS = {
    # H100 SXM5: 132 SMs, 3.35 TB/s HBM3, 50 MB L2 (NVIDIA H100 datasheet / Hopper whitepaper); 1.98 GHz is the boost
    # clock implied by the datasheet's 67 TFLOPS FP32 = 132 x 128 x 2 x f. L2 bandwidth is not published: assumed
    # 5120 B/clk as A100's (whitepaper), x 1.98 GHz.
    "H100 SXM": Gpu("H100 SXM", "sm_90", 132, 1.98, 3350, 50 << 20, 5120 * 1.98, 64, 33, 260, 480, "datasheet"),
    # A100 SXM4 80 GB: 108 SMs, 1.41 GHz boost, 2.039 TB/s HBM2e, 40 MB L2, L2 read bandwidth 5120 B/clk
    # (NVIDIA A100 datasheet and A100 whitepaper).
    "A100 SXM": Gpu("A100 SXM", "sm_80", 108, 1.41, 2039, 40 << 20, 5120 * 1.41, 64, 33, 200, 400, "datasheet"),
    # RTX 2060 (TU106, sanity check only): 30 SMs, 1.68 GHz boost, 336 GB/s (14 Gbps x 192 bit), 3 MB L2, 32 warps
    # per SM (compute capability 7.5). L2 bandwidth assumed 64 B/clk per 32-bit memory channel slice pair
    # (6 x 64 B/clk x 2): a guess, stated as such.
    "RTX 2060": Gpu("RTX 2060", "sm_75", 30, 1.68, 336, 3 << 20, 768 * 1.68, 32, 32, 190, 420, "spec sheet"),
}
SCHEDULERS_PER_SM = 4  # one warp instruction per clock each (Ampere / Hopper / Turing SM: 4 processing blocks)
# L2 atomic throughput, in (request, 32-byte sector) operations per clock for the whole chip. Not published; until
# 2026-12-07 the model charged atomic sectors at the L2 read bandwidth (160 sectors/clk), which under-predicted the
# encoder backward 1.92x (fp32) and 5.44x (bf16). Fitted to the two H200 encoder backward times of
# results/nvidia-h200-2026-12-04.md (fwd+bwd - fwd): fp32 57.1 M sector operations in 1.247 ms -> 23.1 /clk,
# bf16 95.8 M in 1.958 ms -> 24.7 /clk; one constant fits both within 7 %, i.e. the backward is bound by the
# number of sector operations, and a 16-byte atomic covering half a sector (bf16 VEC = 8: two float4 REDs into the
# same fp32 sector) costs as much as a full one. One fit, two points: a candidate's prediction from it is a
# ranking, not a promise; the A100 rows reuse the per-clock constant unmeasured.
ATOMIC_SECTORS_PER_CLOCK = 24.0


@dataclass(frozen=True)
class Shape:
    name: str
    N: int
    Q: int
    levels: tuple
    M: int = 8
    D: int = 32
    P: int = 4

    @property
    def S(self) -> int:
        return sum(h * w for h, w in self.levels)

    @property
    def L(self) -> int:
        return len(self.levels)

    @property
    def items(self) -> int:
        return self.N * self.Q * self.M

    @property
    def samples(self) -> int:
        return self.items * self.L * self.P


MODEL_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))  # an 800 x 1333 image, strides 8..64
SHAPES = {
    "encoder": Shape("encoder", 2, 22223, MODEL_LEVELS),
    "decoder": Shape("decoder", 2, 300, MODEL_LEVELS),
}
K_MIN_THREADS = 1 << 17  # kMinThreadsInFlight, csrc/ms_deform_attn/cuda/ms_deform_attn_launch.h
ELEMENT = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def launch_vec(dtype: str, D: int, items: int) -> tuple[int, int]:
    """(VEC, G) that launch_shape picks for aligned tensors (same rule as ms_deform_attn_launch.h)."""
    vec = 16 // ELEMENT[dtype]
    while vec > 1 and D % vec:
        vec //= 2

    def group(v):
        return min(32, 1 << max(0, math.ceil(math.log2(max(1, D // v)))))

    while vec > 1 and items * group(vec) < K_MIN_THREADS and D // (vec // 2) <= 32:
        vec //= 2
    return vec, group(vec)


def compulsory_bytes(kernel: str, shape: Shape, dtype: str) -> float:
    e, acc = ELEMENT[dtype], 8 if dtype == "float64" else 4
    value = shape.N * shape.S * shape.M * shape.D * e
    loc = shape.samples * 2 * acc
    weights = shape.samples * acc
    out = shape.items * shape.D * e
    if kernel == "forward":
        return value + loc + weights + out
    # backward: reads value, grad_out, loc, weights; writes grad loc / weights; grad_value in acc precision:
    # zero-filled, then read-modify-written by atomics (in L2 when it fits), written back once.
    grad_value = shape.N * shape.S * shape.M * shape.D * acc
    return value + out + 2 * (loc + weights) + 2 * grad_value


def predict(gpu: Gpu, kernel: str, shape: Shape, dtype: str, static: dict, counters: dict) -> dict:
    """One prediction row. ``static``: the static-table row of the instance on gpu.arch; ``counters``: the
    emulator row of the same kernel / dtype at the scaled shape of the same kind (per-sample figures)."""
    vec, group = launch_vec(dtype, shape.D, shape.items)
    warp_samples = shape.items * group / 32 * shape.L * shape.P
    samples = shape.samples
    # x, y and a are plain loads (not counted by the emulator): each group reads one 8-byte pair and one weight,
    # in distinct sectors for neighbouring items -> 2 sectors per sample.
    scalar_sectors = 2.0
    sectors = samples * (counters.get("load_sectors_per_sample", 0) + scalar_sectors)
    sectors += counters.get("store_sectors", 0) * samples / counters["samples"]
    atomic_sectors = samples * counters.get("atomic_sectors_per_sample", 0)
    resident = static["warps_per_sm"]
    shuffles = counters.get("shuffles_per_sample", 0) * samples
    chain = gpu.l1_latency + gpu.l2_latency + (3 * math.log2(group) * 30 if kernel != "forward" else 0)
    terms = {
        "dram_ms": compulsory_bytes(kernel, shape, dtype) / (gpu.hbm_gbps * 1e6),
        "l2_ms": sectors * 32 / (gpu.l2_gbps * 1e6),
        "atomic_ms": atomic_sectors / (ATOMIC_SECTORS_PER_CLOCK * gpu.clock_ghz * 1e6),
        "issue_ms": (warp_samples * static["loop_instructions"] + shuffles / 32)
        / (gpu.sms * SCHEDULERS_PER_SM * gpu.clock_ghz * 1e6),
        "latency_ms": warp_samples * chain / (gpu.sms * resident * gpu.clock_ghz * 1e6),
    }
    bound = max(terms, key=terms.get)
    return {
        "gpu": gpu.name,
        "kernel": kernel,
        "dtype": dtype,
        "shape": shape.name,
        "vec": vec,
        "group": group,
        "samples": samples,
        "registers": static["registers"],
        "occupancy": static["occupancy"],
        **{k: round(v, 4) for k, v in terms.items()},
        "predicted_ms": round(terms[bound], 4),
        "bound": bound.removesuffix("_ms"),
        "measured_ms": None,
    }


# ---- sanity check: the original one-thread-per-channel design -----------------------------------------------------
PUBLISHED = {  # rziga/msda-triton README: original CUDA kernel, RTX 2060, fp32 (its scripts/benchmark.py shapes)
    "shape": Shape("msda-triton", 4, 10000, ((64, 64), (32, 32), (16, 16), (8, 8))),
    "forward_ms": 5.37,
    "forward_backward_ms": 28.04,
}


def che_hit_rates(sizes: list[int], accesses: list[float], capacity: int) -> list[float]:
    """Che's approximation of LRU hit rates under independent references: groups of `sizes[i]` equally likely
    lines receiving `accesses[i]` references in total share `capacity` lines."""
    rates = [a / s for a, s in zip(accesses, sizes)]
    if sum(sizes) <= capacity:
        return [1.0] * len(sizes)
    lo, hi = 0.0, 1e3 / min(rates)
    for _ in range(200):
        t = (lo + hi) / 2
        if sum(s * (1 - math.exp(-r * t)) for s, r in zip(sizes, rates)) < capacity:
            lo = t
        else:
            hi = t
    return [1 - math.exp(-r * lo) for r in rates]


def original_design(static_fwd: dict, static_bwd: dict) -> dict:
    """Predicted forward and forward+backward of the original kernel on the RTX 2060. One thread per output
    channel (a warp = the 32 channels of one (n, q, m) head): per sample every lane loads x, y, a (broadcast) and
    its 4-byte channel of the 4 corner rows (128 B each); the backward adds 4 scalar atomics per lane per sample and
    a block reduction of the location / weight gradients. Per-lane work ~ our VEC = 1, G = 32 instance (same design:
    every lane recomputes the corner math), so its sm_80 loop size stands in for the per-lane instruction count.
    Locations are uniform in [0, 1] (the benchmark's torch.rand): neighbouring queries share no corners, so the
    corner rows come from L2 / DRAM; L2 hits follow Che's approximation over the per-level rows."""
    gpu, shape = GPUS["RTX 2060"], PUBLISHED["shape"]
    warp_samples = shape.items * shape.L * shape.P  # one warp per head
    line = 128
    rows_per_level = [shape.N * h * w * shape.M for h, w in shape.levels]  # 128-byte rows (D = 32 fp32)
    refs = [4 * shape.items * shape.P] * shape.L  # 4 corners per sample, P samples per level per head
    hits = che_hit_rates(rows_per_level, refs, gpu.l2_bytes // line)
    corner_dram = sum(r * (1 - h) for r, h in zip(refs, hits)) * line
    streams = compulsory_bytes("forward", shape, "float32") - shape.N * shape.S * shape.M * shape.D * 4
    fwd_terms = {
        "dram_ms": (corner_dram + streams) / (gpu.hbm_gbps * 1e6),
        "l2_ms": warp_samples * (4 * 4 + 2) * 32 / (gpu.l2_gbps * 1e6),
        "issue_ms": warp_samples
        * static_fwd["loop_instructions"]
        / (gpu.sms * SCHEDULERS_PER_SM * gpu.clock_ghz * 1e6),
    }
    # Dependent chain per sample: x/y/a load (L1 after the first sample of a head), then the corner loads, which
    # miss L2 with the rate above.
    miss = 1 - sum(r * h for r, h in zip(refs, hits)) / sum(refs)
    chain = gpu.l1_latency + gpu.l2_latency + miss * gpu.dram_latency
    fwd_terms["latency_ms"] = warp_samples * chain / (gpu.sms * gpu.max_warps_per_sm * gpu.clock_ghz * 1e6)
    # Backward: the same gathers again, plus grad_value atomics (read-modify-write of the same rows: DRAM read +
    # write back on a miss) and the per-sample block reduction (shared memory + __syncthreads, ~4 barriers).
    bwd_terms = {
        "dram_ms": (3 * corner_dram + 2 * streams) / (gpu.hbm_gbps * 1e6),
        "l2_ms": warp_samples * (2 * 4 * 4 + 2) * 32 / (gpu.l2_gbps * 1e6),
        "issue_ms": warp_samples
        * (static_bwd["loop_instructions"] + 40)
        / (gpu.sms * SCHEDULERS_PER_SM * gpu.clock_ghz * 1e6),
        "latency_ms": warp_samples
        * (chain + 4 * 30 + gpu.l2_latency)
        / (gpu.sms * gpu.max_warps_per_sm * gpu.clock_ghz * 1e6),
    }
    fwd = max(fwd_terms.values())
    bwd = max(bwd_terms.values())
    return {
        "gpu": gpu.name,
        "l2_hit_rate_corners": round(1 - miss, 3),
        "forward_terms_ms": {k: round(v, 3) for k, v in fwd_terms.items()},
        "backward_terms_ms": {k: round(v, 3) for k, v in bwd_terms.items()},
        "predicted_forward_ms": round(fwd, 3),
        "predicted_forward_backward_ms": round(fwd + bwd, 3),
        "published_forward_ms": PUBLISHED["forward_ms"],
        "published_forward_backward_ms": PUBLISHED["forward_backward_ms"],
        "forward_ratio": round(PUBLISHED["forward_ms"] / fwd, 2),
        "forward_backward_ratio": round(PUBLISHED["forward_backward_ms"] / (fwd + bwd), 2),
    }


def _find(rows: list[dict], **keys) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in keys.items()):
            return row
    return None


def roofline_rows(static_rows: list[dict], counter_rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Predictions for forward / backward (atomics), fp32 / bf16, encoder / decoder, H100 SXM / A100 SXM; plus the
    reasons for rows that could not be formed (an instance or a counter row missing)."""
    rows, missing = [], []
    for gpu in (GPUS["H100 SXM"], GPUS["A100 SXM"]):
        for shape in SHAPES.values():
            for kernel in ("forward", "backward_atomics"):
                for dtype in ("float32", "bfloat16"):
                    vec, _ = launch_vec(dtype, shape.D, shape.items)
                    static = _find(static_rows, backend="cuda", kernel=kernel, dtype=dtype, vec=vec, arch=gpu.arch)
                    arch = f"sm{gpu.arch[3:]}"
                    counters = _find(counter_rows, shape=shape.name, kernel=kernel, dtype=dtype, arch=arch) or _find(
                        counter_rows, shape=shape.name, kernel=kernel, dtype=dtype
                    )
                    if static is None or counters is None or "loop_instructions" not in static:
                        missing.append(f"{gpu.name} {shape.name} {kernel} {dtype} VEC={vec}")
                        continue
                    rows.append(predict(gpu, kernel, shape, dtype, static, counters))
    return rows, missing


COLUMNS = [
    ("gpu", "GPU", "{}"),
    ("shape", "shape", "{}"),
    ("kernel", "kernel", "{}"),
    ("dtype", "dtype", "{}"),
    ("vec", "VEC", "{}"),
    ("registers", "regs", "{}"),
    ("occupancy", "occupancy", "{:.1%}"),
    ("dram_ms", "DRAM ms", "{:.4f}"),
    ("l2_ms", "L2 ms", "{:.4f}"),
    ("atomic_ms", "atomics ms", "{:.4f}"),
    ("issue_ms", "issue ms", "{:.4f}"),
    ("latency_ms", "latency ms", "{:.4f}"),
    ("predicted_ms", "**predicted ms**", "{:.4f}"),
    ("bound", "bound", "{}"),
    ("measured_ms", "measured ms", "{:.4f}"),
    ("ratio", "measured / predicted", "{:.2f}"),
]


def sanity_check(static_rows: list[dict]) -> dict | None:
    """The original design on the RTX 2060 (its per-lane loop sizes from our sm_80 VEC = 1 instances)."""
    fwd = _find(static_rows, backend="cuda", kernel="forward", dtype="float32", vec=1, arch="sm_80")
    bwd = _find(static_rows, backend="cuda", kernel="backward_atomics", dtype="float32", vec=1, arch="sm_80")
    if not fwd or not bwd or "loop_instructions" not in fwd or "loop_instructions" not in bwd:
        return None
    return original_design(fwd, bwd)


def sanity_markdown(s: dict | None) -> str:
    if s is None:
        return "\n## Sanity check\n\nNot run: the sm_80 VEC = 1 instances are not in the static table.\n"
    lines = [
        "\n## Sanity check: the original one-thread-per-channel kernel, RTX 2060, fp32 (rziga/msda-triton README)\n",
        "B = 4, M = 8, D = 32, P = 4, levels 64²..8², 10k queries, uniform random locations.\n",
        "| | predicted ms | published ms | published / predicted |",
        "|---|---|---|---|",
        f"| forward | {s['predicted_forward_ms']:.2f} | {s['published_forward_ms']:.2f} | {s['forward_ratio']:.2f} |",
        f"| forward + backward | {s['predicted_forward_backward_ms']:.2f} | {s['published_forward_backward_ms']:.2f} "
        f"| {s['forward_backward_ratio']:.2f} |",
        "",
        f"Terms (ms), forward: {s['forward_terms_ms']}; backward: {s['backward_terms_ms']}; "
        f"modelled L2 hit rate of the corner rows: {s['l2_hit_rate_corners']:.1%}.",
        "",
    ]
    return "\n".join(lines)


# ---- measured column (benchmarks/gpu_check.sh) --------------------------------------------------------------------
_BENCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def attach_measured(predictions: list[dict], bench_rows: list[dict], gpu_name: str) -> list[dict]:
    """Copies of the prediction rows for the GPU a benchmark ran on (``gpu_name`` contains "H100" or "A100"),
    with ``measured_ms`` from the msda suite's cuda rows (same encoder / decoder shapes): the forward from
    ``fwd``; the backward as ``fwd+bwd`` minus ``fwd`` (it includes autograd's overhead), and ``ratio``."""
    family = "H100" if "H100" in gpu_name or "H200" in gpu_name else ("A100" if "A100" in gpu_name else None)
    times = {}
    for r in bench_rows:
        if r.get("suite") == "msda" and r.get("backend") == "cuda" and r.get("time_ms") is not None:
            times[(r["name"], _BENCH_DTYPES.get(r.get("dtype"), r.get("dtype")), r.get("pass"))] = r["time_ms"]
    out = []
    for row in predictions:
        if family is None or not row["gpu"].startswith(family):
            continue
        fwd = times.get((row["shape"], row["dtype"], "fwd"))
        both = times.get((row["shape"], row["dtype"], "fwd+bwd"))
        measured = fwd if row["kernel"] == "forward" else (both - fwd if fwd and both else None)
        new = dict(row, measured_ms=measured, measured_on=gpu_name)
        if measured:
            new["ratio"] = measured / row["predicted_ms"]
        out.append(new)
    return out


def main(argv=None) -> int:
    """``python -m benchmarks.bench_static_roofline BENCH_JSON OUT_DIR``: the committed predictions with the
    measured column from a GPU benchmark run (gpu_check.sh calls it after the bench stage)."""
    import argparse
    import json
    from pathlib import Path

    parser = argparse.ArgumentParser()
    parser.add_argument("bench_json", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    results = Path(__file__).resolve().parent / "results"
    committed = sorted(results.glob("roofline-*.json"))
    if not committed:
        print("no committed roofline-*.json")
        return 1
    bench = json.loads(args.bench_json.read_text())
    gpu_name = bench.get("environment", {}).get("device_name", "")
    rows = attach_measured(json.loads(committed[-1].read_text())["results"], bench.get("results", []), gpu_name)
    from benchmarks import report

    head = f"# Roofline predictions ({committed[-1].name}) against the measured times on {gpu_name}\n"
    report.write_json_and_markdown(
        {"prediction_file": committed[-1].name, "bench_file": args.bench_json.name, "gpu": gpu_name},
        rows,
        head + "\n" + report.markdown_table(rows, COLUMNS) + "\n",
        args.out_dir,
        "roofline-measured",
    )
    print(report.markdown_table(rows, COLUMNS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
