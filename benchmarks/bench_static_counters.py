"""Emulated memory counters of the MSDA CUDA kernels (the SIMT emulator of tests/simt/ runs the device code on the
CPU and counts, per launch, warp-level load/store/atomic requests and their distinct 32-byte sectors, shuffles,
barriers, unique sectors and the misses of an LRU model of a 50 MB L2; see tests/simt/simt.h).

Shapes are scaled down from Deformable DETR's (emulation runs one CUDA thread at a time): levels 32², 16², 8², 4²,
encoder queries = the first 256 pixels of that pyramid (one query per pixel, as in the model), 75 decoder queries, M = 8, D = 32, L = 4, P = 4, N = 1. The
launch threshold (kMinThreadsInFlight) is scaled with the problem so each kernel runs with the vector width the
full-size shape gets (encoder VEC = 16 bytes, decoder VEC = 1). Locations follow the model's layout: each encoder
query samples around its own pixel (reference point + a head-dependent direction of 1..P pixels + noise), the
decoder's queries around random reference points, so neighbouring queries share corner rows as they do in the
model. Per-sample figures are the counts divided by N·Q·M·L·P; requests, sectors and atomics scale with the sample
count, stores with N·Q·M·D, unique bytes with the tensors' sizes (see NOTES.md).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENCODER_LEVELS = [(32, 32), (16, 16), (8, 8), (4, 4)]
# The encoder's queries: the first 256 pixels (8 rows of the 32² level), enough for every block to see the
# neighbour sharing of the full map at a fraction of the emulation time.
ENCODER_QUERIES = 256
# The budget test's smaller encoder (tests/test_gpu_budgets.py): the first 96 pixels (6 rows) of a 16² .. 2² pyramid.
CI_ENCODER_LEVELS = [(16, 16), (8, 8), (4, 4), (2, 2)]
CI_ENCODER_QUERIES = 96
M, D, P = 8, 32, 4
DECODER_QUERIES = 75
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _support_on_path() -> None:
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)


def _emulator():
    _support_on_path()
    from support import simt_emulator

    return simt_emulator


def _msda_check():
    _support_on_path()
    from support import simt_msda_check

    return simt_msda_check


def model_inputs(kind: str, levels, dtype: torch.dtype, queries: int | None = None, seed: int = 0):
    """value, spatial_shapes, level_start_index, locations, weights, grad_output shaped like the model's."""
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(levels, dtype=torch.int64)
    sizes = [h * w for h, w in levels]
    starts = torch.tensor([0] + list(torch.tensor(sizes).cumsum(0)[:-1].tolist()), dtype=torch.int64)
    S, L = sum(sizes), len(levels)
    if kind == "encoder":
        # Query q is pixel q of the flattened pyramid; its reference point is that pixel's centre.
        ref = []
        for h, w in levels:
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            ref.append(torch.stack([(xs.flatten() + 0.5) / w, (ys.flatten() + 0.5) / h], -1))
        ref = torch.cat(ref).double()
        if queries is not None:  # the first `queries` pixels: neighbours in the finest level, as in a block
            ref = ref[:queries]
    else:
        ref = torch.rand(queries, 2, generator=gen, dtype=torch.float64)
    Q = ref.shape[0]
    angle = torch.arange(M, dtype=torch.float64) * (2 * math.pi / M)
    direction = torch.stack([angle.cos(), angle.sin()], -1)  # (M, 2): sampling_offsets' initial grid
    radius = torch.arange(1, P + 1, dtype=torch.float64)
    offset_px = direction[:, None, None, :] * radius[None, None, :, None]  # (M, 1, P, 2), broadcast over L
    offset_px = offset_px + 0.5 * torch.randn(Q, M, L, P, 2, generator=gen, dtype=torch.float64)
    wh = torch.tensor([[w, h] for h, w in levels], dtype=torch.float64)  # (L, 2) as (x, y) extents
    locations = ref[:, None, None, None, :] + offset_px / wh[None, None, :, None, :]
    # Kept where all four corners exist (x in [0.5 / W, 1 - 0.5 / W]): every lane of a warp then runs the same
    # loads, which makes the emulator's request pairing exact (simt.h). Off-map samples load nothing, so this is
    # the upper end of the traffic.
    lo = 0.501 / wh[None, None, :, None, :]  # a thousandth of a pixel inside, against rounding
    locations = torch.maximum(torch.minimum(locations, 1 - lo - 1 / wh[None, None, :, None, :] * 1e-3), lo)
    weights = torch.softmax(torch.randn(Q, M, L * P, generator=gen, dtype=torch.float64), -1).view(Q, M, L, P)
    value = torch.randn(1, S, M, D, generator=gen, dtype=torch.float64).to(dtype)
    pos = torch.float64 if dtype == torch.float64 else torch.float32
    grad_output = torch.randn(1, Q, M * D, generator=gen, dtype=torch.float64).to(dtype)
    return value, shapes, starts, locations[None].to(pos), weights[None].to(pos), grad_output


def _per_launch(counter: dict, samples: int) -> dict:
    kernel, dtype, vec, group, tiles, arch = counter["label"].split("|")
    dtype = {"Float": "float32", "BFloat16": "bfloat16", "Half": "float16", "Double": "float64"}.get(dtype, dtype)
    row = {"kernel": kernel, "dtype": dtype, "vec": int(vec), "group": int(group), "tiles": int(tiles), "arch": arch}
    row["samples"] = samples
    for kind in ("load", "store", "atomic"):
        c = counter[kind]
        if c["requests"] == 0:
            continue
        row[f"{kind}_requests"] = c["requests"]
        row[f"{kind}_sectors"] = c["sectors"]
        row[f"{kind}_sectors_per_request"] = c["sectors"] / c["requests"]
        row[f"{kind}_coalescing"] = c["ideal_sectors"] / c["sectors"]  # 1.0 = perfectly coalesced
        row[f"{kind}_lanes_per_request"] = c["lane_accesses"] / c["requests"]
        row[f"{kind}_bytes_per_lane"] = c["bytes"] / c["lane_accesses"]
        row[f"{kind}_requests_per_sample"] = c["requests"] / samples
        row[f"{kind}_sectors_per_sample"] = c["sectors"] / samples
    row["shuffles"] = counter["shuffles"]
    row["shuffles_per_sample"] = counter["shuffles"] / samples
    row["barriers"] = counter["barriers"]
    row["unique_bytes"] = counter["unique_sectors"] * 32
    row["l2_miss_bytes"] = counter["l2_miss_sectors"] * 32
    row["threads"] = counter["blocks"] * counter["threads"]
    return row


def measure(
    kind: str, dtype_name: str, levels=None, arch: int = 900, deterministic: bool = False, queries: int | None = None
) -> list[dict]:
    """One forward + one backward under the emulator with counting on; one row per launch."""
    emu = _emulator()
    levels = levels or ENCODER_LEVELS
    dtype = DTYPES[dtype_name]
    value, shapes, starts, locations, weights, grad_output = model_inputs(
        kind, levels, dtype, queries=DECODER_QUERIES if kind == "decoder" else queries
    )
    N, Q = locations.shape[:2]
    samples = N * Q * M * len(levels) * P
    # The encoder at full size launches with the widest vector (items x lanes >> kMinThreadsInFlight); keep it.
    min_threads = 1 if kind == "encoder" else 0
    ext = emu.load()
    ext.reset_counters()
    ext.set_counting(True)
    try:
        _msda_check().emulated(
            (value, shapes, starts, locations, weights), grad_output, deterministic, arch=arch, min_threads=min_threads
        )
        counters = list(ext.counters())
    finally:
        ext.set_counting(False)
    rows = []
    for counter in counters:
        row = _per_launch(counter, samples)
        row.update(shape=kind, levels="x".join(f"{h}²" if h == w else f"{h}x{w}" for h, w in levels), Q=Q)
        rows.append(row)
    return rows


def all_rows(ci_only: bool = False) -> list[dict]:
    rows = []
    if not ci_only:
        for dtype in ("float32", "bfloat16"):
            rows += measure("encoder", dtype, queries=ENCODER_QUERIES)
            rows += measure("decoder", dtype)
        rows += measure("encoder", "float32", arch=800, queries=ENCODER_QUERIES)
        rows += measure("encoder", "float32", deterministic=True, queries=ENCODER_QUERIES)
    for dtype in ("float32", "bfloat16", "float16"):
        for row in measure("encoder", dtype, levels=CI_ENCODER_LEVELS, queries=CI_ENCODER_QUERIES):
            row["shape"] = "ci-encoder"
            rows.append(row)
    return rows


COLUMNS = [
    ("shape", "shape", "{}"),
    ("kernel", "kernel", "{}"),
    ("dtype", "dtype", "{}"),
    ("arch", "arch", "{}"),
    ("vec", "VEC", "{}"),
    ("group", "G", "{}"),
    ("samples", "samples", "{}"),
    ("load_requests_per_sample", "LD req/sample", "{:.3f}"),
    ("load_sectors_per_request", "LD sect/req", "{:.2f}"),
    ("load_coalescing", "LD coalesc.", "{:.0%}"),
    ("store_requests", "ST req", "{}"),
    ("store_sectors_per_request", "ST sect/req", "{:.2f}"),
    ("atomic_requests_per_sample", "ATOM req/sample", "{:.3f}"),
    ("atomic_sectors_per_request", "ATOM sect/req", "{:.2f}"),
    ("atomic_coalescing", "ATOM coalesc.", "{:.0%}"),
    ("shuffles_per_sample", "SHFL/sample", "{:.3f}"),
    ("barriers", "barriers", "{}"),
    ("unique_bytes", "unique B", "{}"),
    ("l2_miss_bytes", "L2-model miss B", "{}"),
]
