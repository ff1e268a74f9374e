"""Speed budgets that need no GPU, checked against the committed tables of ``python -m benchmarks --static``
(benchmarks/results/static-*.json and counters-*.json, the newest of each):

- static (needs the extension's CUDA build and cuobjdump): no hot instance (forward and backward with atomics,
  fp32 / bf16 / fp16, the vector width the encoder shape uses, sm_80 and sm_90) gains stack or local-memory
  instructions (spills) or loses theoretical occupancy;
- emulated (always runs): at the budget encoder shape the sectors per request of each hot launch's loads, stores
  and atomics stay within 10 % of the committed counters.

A deliberate change that moves a budget regenerates the tables (``python -m benchmarks --static``) and commits
them with the change, so the new figures are reviewed with the code that made them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
HOT = [("forward", "float32", 4), ("forward", "bfloat16", 8), ("forward", "float16", 8)]
HOT += [("backward_atomics", d, v) for _, d, v in HOT]
SECTOR_TOLERANCE = 1.10


def _committed(prefix: str) -> list[dict]:
    files = sorted(RESULTS.glob(f"{prefix}-*.json"))
    assert files, f"no committed benchmarks/results/{prefix}-*.json: run python -m benchmarks --static"
    return json.loads(files[-1].read_text())["results"]


def _static_now():
    from benchmarks import bench_static, bench_static_sass

    binary = bench_static.extension_binary()
    if binary is None:
        pytest.skip("deformable_detr/_C*.so is not built (make setup builds it)")
    if bench_static_sass.tool("cuobjdump") is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's wheel)")
    rows = bench_static.cuda_rows(binary)
    if not rows:
        pytest.skip("the extension was built without CUDA kernels (no CUDA toolkit at build time)")
    return rows


def _key(row):
    return (row.get("kernel"), row.get("dtype"), row.get("vec"), row.get("arch"))


def test_hot_instances_keep_stack_spills_and_occupancy():
    now = {_key(r): r for r in _static_now() if r.get("backend", "cuda") == "cuda"}
    committed = {_key(r): r for r in _committed("static") if r.get("backend") == "cuda"}
    checked = 0
    for kernel, dtype, vec in HOT:
        for arch in ("sm_80", "sm_90"):
            key = (kernel, dtype, vec, arch)
            if key not in now:
                continue  # the build's arch list may leave an arch out; the other is still checked
            assert key in committed, f"{key} is not in the committed static table"
            got, budget = now[key], committed[key]
            assert got["stack"] <= budget["stack"], f"{key}: stack {got['stack']} B > {budget['stack']} B"
            assert got["local_instructions"] <= budget["local_instructions"], (
                f"{key}: {got['local_instructions']} local-memory instructions (spills) > {budget['local_instructions']}"
            )
            assert got["occupancy"] >= budget["occupancy"], (
                f"{key}: occupancy {got['occupancy']:.1%} < {budget['occupancy']:.1%} ({got['registers']} registers)"
            )
            checked += 1
    assert checked, "no hot instance found in the built extension"


@pytest.fixture(scope="module")
def emulated_rows():
    from benchmarks import bench_static_counters

    return bench_static_counters.all_rows(ci_only=True)


def test_emulated_sectors_per_request_within_budget(emulated_rows):
    committed = [r for r in _committed("counters") if r.get("shape") == "ci-encoder"]
    assert committed, "the committed counters table has no ci-encoder rows"
    budget = {(r["kernel"], r["dtype"], r["vec"]): r for r in committed}
    checked = 0
    for row in emulated_rows:
        key = (row["kernel"], row["dtype"], row["vec"])
        if (row["kernel"], row["dtype"], row["vec"]) not in {(k, d, v) for k, d, v in HOT}:
            continue
        assert key in budget, f"{key} has no committed counters (the launch's vector width changed?)"
        for kind in ("load", "store", "atomic"):
            name = f"{kind}_sectors_per_request"
            if name not in budget[key]:
                continue
            assert row[name] <= budget[key][name] * SECTOR_TOLERANCE, (
                f"{key}: {name} {row[name]:.2f} > committed {budget[key][name]:.2f} + 10 %"
            )
        checked += 1
    assert checked == len(HOT), f"checked {checked} hot launches, expected {len(HOT)}"


def test_triton_kernels_compile_for_the_static_table():
    """The static table compiles every Triton config ahead of time from a hand-built signature; when a kernel gains
    an argument the signature must follow (the 2026-12-04 table had every Triton row "not compiled" after the
    point_start / K / RAGGED / DISCRETE arguments were added). sm_90, fp32 and bf16, every autotune config; the
    committed table must hold no "not compiled" Triton row either."""
    pytest.importorskip("triton")
    from benchmarks import bench_static, bench_static_sass

    if bench_static_sass.tool("cuobjdump") is None:
        pytest.skip("cuobjdump (CUDA toolkit) not found: the static table reads registers with it")
    rows = bench_static.triton_rows(archs=("sm_90",), dtypes=("fp32", "bf16"))
    failed = [f"{r['kernel']} {r['dtype']} {r['config']}: {r['status'][:200]}" for r in rows if r.get("status")]
    assert not failed, "\n".join(failed)
    assert all(r["registers"] > 0 for r in rows)
    committed = [r for r in _committed("static") if r.get("backend") == "triton"]
    assert committed and not [r for r in committed if str(r.get("status", "")).startswith("not compiled")]
