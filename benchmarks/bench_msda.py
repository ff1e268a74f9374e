"""MSDA suite: every backend of ``deformable_detr.ms_deform_attn`` (and the ``dcnv4`` peer when importable)
against the pure-PyTorch reference, forward and forward+backward, per dtype.

Shapes: the Deformable DETR encoder (Q = S) and decoder (Q = 300) at an 800×1333 image on GPU; the same two
scaled to 64×64..8×8 levels (N=1) on CPU, where the reference takes ~0.4 s per forward+backward.

Run alone: ``python -m benchmarks.bench_msda [--quick] [--device cpu|cuda]`` prints the table.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch

import deformable_detr as dd
from benchmarks import peers as peer_kernels
from benchmarks import report, timing
from deformable_detr.ops.ms_deform_attn import position_dtype

SUITE = "msda"
BASELINE = "pytorch"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class MsdaShape:
    name: str
    batch: int
    levels: tuple[tuple[int, int], ...]
    num_queries: int | None  # None: one query per value position (the encoder)
    num_heads: int = 8
    head_dim: int = 32
    num_points: int = 4

    @property
    def num_values(self) -> int:
        return sum(h * w for h, w in self.levels)

    @property
    def queries(self) -> int:
        return self.num_values if self.num_queries is None else self.num_queries

    def describe(self) -> str:
        lv = ",".join(f"{h}x{w}" for h, w in self.levels)
        return (
            f"N={self.batch} Q={self.queries} S={self.num_values} ({lv}) "
            f"M={self.num_heads} D={self.head_dim} L={len(self.levels)} P={self.num_points}"
        )


_LEVELS_800x1333 = ((100, 167), (50, 84), (25, 42), (13, 21))
_LEVELS_CPU = ((64, 64), (32, 32), (16, 16), (8, 8))
GPU_SHAPES = (MsdaShape("encoder", 2, _LEVELS_800x1333, None), MsdaShape("decoder", 2, _LEVELS_800x1333, 300))
CPU_SHAPES = (MsdaShape("encoder-scaled", 1, _LEVELS_CPU, None), MsdaShape("decoder-scaled", 1, _LEVELS_CPU, 300))


def bench_backends(device) -> list[str]:
    """Backends worth timing on ``device``: all available ones, except Triton on CPU, which only exists under
    TRITON_INTERPRET=1 — a test mode, orders of magnitude slower than anything a user would run."""
    device = torch.device(device)
    return [b for b in dd.available_backends(device) if not (b == "triton" and device.type == "cpu")]


def make_inputs(shape: MsdaShape, dtype: torch.dtype, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs shaped like a real layer: normal values, locations mostly inside the map (a few outside, as
    offsets push them), softmax-normalised weights. Nothing is zero, so no kernel gets a free ride."""
    gen = torch.Generator().manual_seed(seed)
    N, Q, S, M, D, L, P = (
        shape.batch,
        shape.queries,
        shape.num_values,
        shape.num_heads,
        shape.head_dim,
        len(shape.levels),
        shape.num_points,
    )
    pos = position_dtype(dtype)
    spatial_shapes = torch.tensor(shape.levels, dtype=torch.int64)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(N, S, M, D, generator=gen).to(dtype)
    locations = (torch.rand(N, Q, M, L, P, 2, generator=gen) * 1.1 - 0.05).to(pos)
    logits = torch.randn(N, Q, M, L * P, generator=gen)
    weights = logits.softmax(-1).view(N, Q, M, L, P).to(pos)
    grad_output = torch.randn(N, Q, M * D, generator=gen).to(dtype)
    out = {
        "value": value,
        "spatial_shapes": spatial_shapes,
        "level_start_index": level_start_index,
        "sampling_locations": locations,
        "attention_weights": weights,
        "grad_output": grad_output,
    }
    return {k: v.to(device) for k, v in out.items()}


def traffic_bytes(shape: MsdaShape, dtype: torch.dtype, pass_name: str) -> int:
    """Bytes that must cross DRAM at least once: value read once, locations + weights read, output written;
    the backward reads grad_output, value, locations, weights and writes their three gradients."""
    e = torch.empty((), dtype=dtype).element_size()
    pe = torch.empty((), dtype=position_dtype(dtype)).element_size()
    N, Q, S = shape.batch, shape.queries, shape.num_values
    M, D, L, P = shape.num_heads, shape.head_dim, len(shape.levels), shape.num_points
    value = N * S * M * D * e
    samples = N * Q * M * L * P * 3 * pe  # x, y and weight per sample
    output = N * Q * M * D * e
    forward = value + samples + output
    backward = output + value + samples + value + samples
    return forward if pass_name == "fwd" else forward + backward


# --- peers


def dcnv4_status() -> tuple[Callable | None, str]:
    """(FlashDeformAttnFunction.apply, "ok") when the ``dcnv4`` package (module ``DCNv4``) imports, else a reason."""
    try:
        from DCNv4.functions import FlashDeformAttnFunction  # type: ignore[import-not-found]
    except ModuleNotFoundError:
        return None, "not installed"
    except Exception as exc:  # it raises NotImplementedError at import on GPUs it has no table for, and on CPU
        return None, f"not available: {type(exc).__name__}: {exc}".splitlines()[0][:200]
    return FlashDeformAttnFunction.apply, "ok"


def _dcnv4_call(apply: Callable, inputs: dict[str, torch.Tensor], num_points: int, requires_grad: bool):
    """DCNv4's FlashDeformAttn takes locations and attention *logits* packed in one tensor and applies the softmax
    itself; log(weights) as logits makes it compute exactly our op, so its output can be checked too."""
    loc = inputs["sampling_locations"]
    N, Q, M = loc.shape[:3]
    logits = inputs["attention_weights"].clamp_min(1e-30).log().reshape(N, Q, M, -1)
    packed = torch.cat([loc.reshape(N, Q, M, -1), logits], -1).to(inputs["value"].dtype).contiguous()
    value = inputs["value"]
    if requires_grad:
        value = value.detach().requires_grad_()
        packed = packed.detach().requires_grad_()
    leaves = [value, packed] if requires_grad else []

    def forward():
        out = apply(value, inputs["spatial_shapes"], inputs["level_start_index"], packed, 64, num_points)
        return out.reshape(N, Q, -1)

    def grads():
        # Its second gradient is w.r.t. logits, not weights: only value and locations compare with ours.
        return {"value": value.grad, "sampling_locations": packed.grad[..., : loc[0, 0, 0].numel()].reshape(loc.shape)}

    return forward, leaves, grads


# --- cases

_GRAD_INPUTS = ("value", "sampling_locations", "attention_weights")


_DETERMINISTIC = "-deterministic"


def _deterministic(fn: Callable) -> Callable:
    """``fn`` under ``torch.use_deterministic_algorithms(True)``: the backward must then avoid float atomics."""

    def call():
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return fn()
        finally:
            torch.use_deterministic_algorithms(previous)

    return call


def _callables(backend: str, inputs: dict[str, torch.Tensor], shape: MsdaShape, pass_name: str, peer_applies):
    """(timed callable, checking callable) for one backend and pass; the checking callable returns the output
    (fwd) or the gradients (fwd+bwd)."""
    if backend.endswith(_DETERMINISTIC):
        timed, check = _callables(backend[: -len(_DETERMINISTIC)], inputs, shape, pass_name, peer_applies)
        return _deterministic(timed), _deterministic(check)
    args = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    grad = pass_name != "fwd"
    if backend == "dcnv4":
        forward, leaves, grads = _dcnv4_call(peer_applies["dcnv4"], inputs, shape.num_points, grad)
    else:
        tensors = {k: inputs[k] for k in args}
        leaves = []
        if grad:
            for k in _GRAD_INPUTS:
                tensors[k] = inputs[k].detach().requires_grad_()
                leaves.append(tensors[k])

        def forward():
            if backend == "original":  # the Deformable-DETR / HF transformers CUDA op, built by benchmarks/peers.py
                return peer_applies["original"](*(tensors[k].contiguous() for k in args))
            return dd.ms_deform_attn(*(tensors[k] for k in args), backend=backend)

        def grads():
            return {k: tensors[k].grad for k in _GRAD_INPUTS}

    if not grad:

        def timed():
            with torch.no_grad():
                return forward()

        return timed, timed

    grad_output = inputs["grad_output"]

    def timed_backward():
        for t in leaves:
            t.grad = None
        forward().backward(grad_output)

    def check():
        timed_backward()
        return grads()

    return timed_backward, check


def _max_error(forward: Callable, oracle: torch.Tensor) -> float | None:
    try:
        with torch.no_grad():
            out = forward()
        return float((out.double() - oracle).abs().max()) if out.numel() else 0.0
    except Exception:
        return None


def norm_error(grad: torch.Tensor, oracle: torch.Tensor) -> float:
    """‖grad − oracle‖₂ / ‖oracle‖₂, in float64. Norm-wise rather than largest element ÷ largest element: at the
    full-size encoder a few float32 samples lie within rounding of a bilinear cell edge, where the location gradient
    jumps by a cell's worth, so the element-wise maximum read 0.15 for every backend, the reference included."""
    diff = torch.linalg.vector_norm(grad.double() - oracle)
    return float(diff / torch.linalg.vector_norm(oracle).clamp_min(1e-300))


def _grad_norm_error(check: Callable, oracle: dict[str, torch.Tensor]) -> float | None:
    """The worst ``norm_error`` over the gradients the backend reports (value, locations, weights; dcnv4: value and
    locations). Per gradient, since location gradients scale with the map size and the others are of order one."""
    try:
        grads = check()
        return max(norm_error(g, oracle[k]) for k, g in grads.items() if g is not None)
    except Exception:
        return None


def _oracle(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Float64 reference output and gradients on the same inputs: what every backend's error is measured from."""
    leaves = {k: inputs[k].detach().double().requires_grad_() for k in _GRAD_INPUTS}
    out = dd.ms_deform_attn_reference(
        leaves["value"],
        inputs["spatial_shapes"],
        inputs["level_start_index"],
        leaves["sampling_locations"],
        leaves["attention_weights"],
    )
    out.backward(inputs["grad_output"].double())
    return out.detach(), {k: v.grad for k, v in leaves.items()}


def run_case(
    shape: MsdaShape, dtype_name: str, device, *, quick: bool, copy_gbps: float | None, peers: bool = True
) -> list[dict]:
    """All backends on one (shape, dtype), forward and forward+backward, interleaved; one row per backend×pass."""
    device = torch.device(device)
    dtype = DTYPES[dtype_name]
    inputs = make_inputs(shape, dtype, device)
    backends = bench_backends(device)
    peer_states = {}
    if peers and device.type == "cuda":
        peer_states = {"original": peer_kernels.original_status("cuda"), "dcnv4": dcnv4_status()}
    peer_applies = {name: state[0] for name, state in peer_states.items()}
    oracle, oracle_grads = _oracle(inputs)
    base = {"suite": SUITE, "name": shape.name, "shape": shape.describe(), "dtype": dtype_name}
    rows: list[dict] = []
    for pass_name in ("fwd", "fwd+bwd"):
        names = list(backends) + [name for name, apply in peer_applies.items() if apply is not None]
        if pass_name != "fwd" and device.type == "cuda" and "cuda" in backends:
            # The deterministic backward (no float atomics) is a separate row so its cost is visible.
            names.insert(names.index("cuda") + 1, "cuda" + _DETERMINISTIC)
        timed, checks = {}, {}
        for b in names:
            timed[b], checks[b] = _callables(b, inputs, shape, pass_name, peer_applies)
        times = timing.time_interleaved(
            timed, device, warmup=1 if quick else 2, reps=5 if quick else 15, budget_s=8 if quick else 30
        )
        nbytes = traffic_bytes(shape, dtype, pass_name)
        for b in names:
            row, ok = timing.result_row(base, b, pass_name, times[b])
            rows.append(row)
            if not ok:
                continue
            res = times[b]
            row["bytes"] = nbytes
            if device.type == "cuda":
                row["peak_mem_mib"] = timing.peak_memory_mib(timed[b], device)
                row["gbps"] = nbytes / (res["time_ms"] / 1e3) / 1e9
                if copy_gbps:
                    row["x_floor"] = res["time_ms"] / 1e3 / (nbytes / (copy_gbps * 1e9))
            if pass_name == "fwd":
                row["max_err"] = _max_error(checks[b], oracle)
            else:
                row["grad_norm_err"] = _grad_norm_error(checks[b], oracle_grads)
        for name, (apply, state) in peer_states.items():
            if apply is None:
                rows.append(dict(base, backend=name, status=state, **{"pass": pass_name}))
    timing.add_speedups(rows, BASELINE)
    return rows


def plan(device, quick: bool) -> list[tuple[MsdaShape, str]]:
    device = torch.device(device)
    if device.type == "cuda":
        shapes = GPU_SHAPES
        return [(s, d) for s in shapes for d in (("fp32", "bf16") if quick else ("fp32", "fp16", "bf16"))]
    encoder, decoder = CPU_SHAPES
    if quick:
        return [(encoder, "fp32"), (decoder, "fp32")]
    return [(encoder, "fp32"), (encoder, "bf16"), (encoder, "fp16"), (decoder, "fp32")]


def tasks(device, quick: bool, copy_gbps: float | None = None) -> list[tuple[str, Callable[[], list[dict]]]]:
    """(label, thunk) pairs for the progress bar of ``python -m benchmarks``."""
    out = []
    for shape, dtype_name in plan(device, quick):
        out.append(
            (
                f"msda {shape.name} {dtype_name}",
                lambda s=shape, d=dtype_name: run_case(s, d, device, quick=quick, copy_gbps=copy_gbps),
            )
        )
    device = torch.device(device)
    if device.type != "cuda":
        _, state = dcnv4_status()
        reason = "CUDA only" if state == "ok" or state.startswith("not available") else state
        out.append(("msda peers", lambda: _cpu_peer_rows(reason)))
    return out


def _cpu_peer_rows(dcnv4_reason: str) -> list[dict]:
    """On CPU: dcnv4 is CUDA only; the original is built for CPU and called, and its row says what it raised."""
    _, original_reason = peer_kernels.original_status("cpu")
    return [
        {"suite": SUITE, "name": "peers", "backend": "original", "status": original_reason},
        {"suite": SUITE, "name": "peers", "backend": "dcnv4", "status": dcnv4_reason},
    ]


def run(device, quick: bool) -> list[dict]:
    device = torch.device(device)
    copy_gbps = timing.copy_bandwidth_gbps(device) if device.type == "cuda" else None
    rows = []
    for _, thunk in tasks(device, quick, copy_gbps):
        rows += thunk()
    return rows


def summary(rows: list[dict]) -> str:
    """One line per (case, dtype, pass): each backend's speed-up; what `make bench` prints last."""
    lines = []
    keys = dict.fromkeys((r.get("name"), r.get("dtype"), r.get("pass")) for r in rows if r.get("suite") == SUITE)
    for name, dtype, pass_name in keys:
        group = [r for r in rows if (r.get("name"), r.get("dtype"), r.get("pass")) == (name, dtype, pass_name)]
        parts = []
        for r in group:
            if r.get("backend") == BASELINE and r.get("time_ms"):
                parts.append(f"{BASELINE} {r['time_ms']:.2f} ms")
            elif r.get("speedup"):
                parts.append(f"{r['backend']} {r['speedup']:.1f}×")
            elif r.get("status") not in (None, "ok"):
                parts.append(f"{r['backend']}: {r['status']}")
        if name == "peers":
            lines.append(f"msda peers: {'; '.join(parts)}")
        else:
            lines.append(f"msda {name} {dtype} {pass_name}: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer dtypes and rounds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args.device, args.quick)
    print(report.markdown_table(rows))
    print()
    print(summary(rows))


if __name__ == "__main__":
    main()
