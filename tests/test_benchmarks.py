"""Smoke tests of the benchmark harness on tiny shapes (seconds, CPU): timing, rows, reports, entry point."""

from __future__ import annotations

import json
import time

import pytest
import torch

import deformable_detr as dd
from benchmarks import __main__ as entry
from benchmarks import bench_model, bench_msda, report, timing

TINY = bench_msda.MsdaShape("tiny", 2, ((6, 5), (3, 3)), 7, num_heads=2, head_dim=4, num_points=2)


def test_time_interleaved_medians_order_and_errors():
    calls: list[str] = []

    def make(name, seconds):
        def fn():
            calls.append(name)
            time.sleep(seconds)

        return fn

    def broken():
        raise ValueError("boom")

    # Far apart (3 ms vs 40 ms) so that a loaded CI machine's scheduling delays cannot swap the order.
    fns = {"fast": make("fast", 0.003), "slow": make("slow", 0.040), "broken": broken}
    res = timing.time_interleaved(fns, "cpu", warmup=1, reps=4)
    assert res["broken"]["error"].startswith("ValueError: boom")
    assert res["fast"]["samples"] == res["slow"]["samples"] == 4
    assert res["slow"]["time_ms"] >= 40.0 > res["fast"]["time_ms"] >= 3.0
    assert res["slow"]["time_p25_ms"] <= res["slow"]["time_ms"] <= res["slow"]["time_p75_ms"]
    # Warm-up + one sizing call each (kept as the first sample: both are > 2 ms, so not repeated), then the
    # remaining 3 rounds alternate which callable goes first.
    rounds = calls[4:]
    assert len(rounds) == 6
    assert {rounds[i] for i in range(0, 6, 2)} == {"fast", "slow"}


def test_time_interleaved_respects_budget():
    res = timing.time_interleaved({"s": lambda: time.sleep(0.02)}, "cpu", warmup=1, reps=1000, min_reps=3, budget_s=0.1)
    assert 3 <= res["s"]["samples"] <= 5  # ~0.1 s / 0.02 s, not the 1000 asked for
    res = timing.time_interleaved({"s": lambda: time.sleep(0.02)}, "cpu", warmup=1, reps=1000, min_reps=3, budget_s=0)
    assert res["s"]["samples"] == 3


def test_make_inputs_shapes_and_nonzero():
    inputs = bench_msda.make_inputs(TINY, torch.bfloat16, "cpu")
    assert inputs["value"].shape == (2, 39, 2, 4) and inputs["value"].dtype == torch.bfloat16
    assert inputs["sampling_locations"].shape == (2, 7, 2, 2, 2, 2)
    assert inputs["sampling_locations"].dtype == torch.float32
    assert inputs["level_start_index"].tolist() == [0, 30]
    torch.testing.assert_close(inputs["attention_weights"].sum((-1, -2)), torch.ones(2, 7, 2))
    assert bool((inputs["value"] != 0).all())


def test_traffic_bytes_counts_each_tensor_once():
    e, p = 4, 4  # fp32 value and positions
    value, samples, out = 2 * 39 * 2 * 4 * e, 2 * 7 * 2 * 2 * 2 * 3 * p, 2 * 7 * 2 * 4 * e
    assert bench_msda.traffic_bytes(TINY, torch.float32, "fwd") == value + samples + out
    assert bench_msda.traffic_bytes(TINY, torch.float32, "fwd+bwd") == 2 * (value + samples + out) + value + samples
    # half values keep fp32 positions
    assert bench_msda.traffic_bytes(TINY, torch.float16, "fwd") == (value + out) // 2 + samples


def test_run_case_rows_speedups_and_errors():
    rows = bench_msda.run_case(TINY, "fp32", "cpu", quick=True, copy_gbps=None, peers=False)
    backends = bench_msda.bench_backends("cpu")
    assert "triton" not in backends and "pytorch" in backends
    assert {(r["backend"], r["pass"]) for r in rows} == {(b, p) for b in backends for p in ("fwd", "fwd+bwd")}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["time_ms"] > 0 and r["samples"] >= 3
        assert r["suite"] == "msda" and r["name"] == "tiny" and "Q=7" in r["shape"]
    ref = [r for r in rows if r["backend"] == "pytorch"]
    assert all(r["speedup"] == pytest.approx(1.0) for r in ref)
    for r in rows:
        if r["pass"] == "fwd":
            assert r["max_err"] < 1e-5
        else:
            assert r["grad_norm_err"] < 1e-5
        other = next(x for x in ref if x["pass"] == r["pass"])
        assert r["speedup"] == pytest.approx(other["time_ms"] / r["time_ms"])


def test_grad_error_is_norm_wise_per_gradient_worst_of_them():
    # One element of 10^4 off by the largest element's size: element-wise max/max would read 1.0, norm-wise 0.01.
    oracle = torch.ones(10_000, dtype=torch.float64)
    one_off = oracle.clone()
    one_off[3] += 1.0
    assert bench_msda.norm_error(one_off.float(), oracle) == pytest.approx(0.01, rel=1e-9)
    assert bench_msda.norm_error(oracle.float(), oracle) == 0.0
    uniform = {"value": oracle * 1.001, "sampling_locations": one_off, "attention_weights": None}
    oracles = {"value": oracle, "sampling_locations": oracle, "attention_weights": oracle}
    assert bench_msda._grad_norm_error(lambda: uniform, oracles) == pytest.approx(0.01, rel=1e-6)
    assert bench_msda._grad_norm_error(lambda: 1 / 0, oracles) is None


def test_add_speedups_matches_on_case_keys():
    rows = [
        {"suite": "s", "name": "a", "dtype": "fp32", "pass": "fwd", "backend": "pytorch", "time_ms": 10.0},
        {"suite": "s", "name": "a", "dtype": "fp32", "pass": "fwd", "backend": "x", "time_ms": 2.0},
        {"suite": "s", "name": "a", "dtype": "bf16", "pass": "fwd", "backend": "x", "time_ms": 2.0},
    ]
    timing.add_speedups(rows, "pytorch")
    assert rows[1]["speedup"] == pytest.approx(5.0)
    assert "speedup" not in rows[2]  # no baseline in that dtype: no made-up ratio


def test_write_results_json_markdown_png(tmp_path):
    env = report.environment("cpu")
    for key in ("device_name", "torch", "cuda", "triton", "threads", "git_commit", "date"):
        assert key in env
    rows = [
        {"suite": "msda", "name": "a", "shape": "N=1", "dtype": "fp32", "pass": "fwd", "backend": "pytorch"},
        {"suite": "msda", "name": "a", "shape": "N=1", "dtype": "fp32", "pass": "fwd", "backend": "cpu"},
        {"suite": "matcher", "name": "all", "status": "not available: no module"},
    ]
    rows[0].update(time_ms=8.0, status="ok")
    rows[1].update(time_ms=2.0, status="ok")
    timing.add_speedups(rows, "pytorch")
    paths = report.write_results(env, rows, tmp_path, "dev-2000-01-01")
    data = json.loads(paths["json"].read_text())
    assert data["environment"]["threads"] == torch.get_num_threads()
    assert data["results"][1]["speedup"] == pytest.approx(4.0)
    md = paths["md"].read_text()
    assert "## msda" in md and "## matcher" in md and "4.00×" in md and "not available: no module" in md
    pytest.importorskip("matplotlib")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slug_and_device_slug():
    assert report.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert report.device_slug("cpu").startswith("cpu-")


def test_entry_point_arguments():
    args = entry.parse_args(["--quick", "--suites", "msda", "--device", "cpu"])
    assert args.quick and args.suites == ["msda"] and args.threads == 2
    with pytest.raises(SystemExit):
        entry.parse_args(["--suites", "msda,nope"])
    with pytest.raises(SystemExit):
        entry.parse_args(["--threads", "0"])


def test_set_backend_switches_every_msdeformattn():
    model = torch.nn.Sequential(
        dd.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2),
        torch.nn.Linear(2, 2),
        dd.MSDeformAttn(16, 2, 2, 2),
    )
    assert bench_model.set_backend(model, "pytorch") == 2
    assert [m.backend for m in model if isinstance(m, dd.MSDeformAttn)] == ["pytorch", "pytorch"]


def test_random_targets_are_valid_boxes():
    targets = bench_model.random_targets(2, 5, 7, "cpu")
    assert len(targets) == 2
    for t in targets:
        assert t["labels"].dtype == torch.int64 and int(t["labels"].max()) < 7
        boxes = t["boxes"]
        assert boxes.shape == (5, 4)
        assert bool(((boxes[:, :2] - boxes[:, 2:] / 2) >= 0).all() and ((boxes[:, :2] + boxes[:, 2:] / 2) <= 1).all())


def test_model_suite_on_a_tiny_config():
    tiny = {
        "backbone": "resnet18",
        "hidden_dim": 32,
        "nheads": 2,
        "enc_layers": 1,
        "dec_layers": 1,
        "dim_feedforward": 32,
        "num_queries": 5,
        "num_classes": 3,
    }
    rows = bench_model.run_model("cpu", True, overrides=tiny, input_shape=(1, 128, 128), rounds=1)
    if rows[0]["status"].startswith("not available"):
        pytest.skip(rows[0]["status"])  # the models package is not importable in this checkout
    assert {(r["backend"], r["pass"]) for r in rows} == {
        (b, p) for b in bench_msda.bench_backends("cpu") for p in ("inference", "train")
    }
    for r in rows:
        assert r["status"] == "ok", r
        assert r["throughput"] == pytest.approx(1 / (r["time_ms"] / 1e3)) and r["unit"] == "img/s"
        if r["pass"] == "inference":
            assert r["max_err"] < 1e-4  # every backend runs the same weights
    assert [r["speedup"] for r in rows if r["backend"] == "pytorch"] == [pytest.approx(1.0)] * 2


def test_deterministic_variant_sets_and_restores_the_flag():
    seen = []
    call = bench_msda._deterministic(lambda: seen.append(torch.are_deterministic_algorithms_enabled()))
    before = torch.are_deterministic_algorithms_enabled()
    call()
    assert seen == [True] and torch.are_deterministic_algorithms_enabled() == before
    inputs = bench_msda.make_inputs(TINY, torch.float32, "cpu")
    _, check = bench_msda._callables("pytorch-deterministic", inputs, TINY, "fwd+bwd", {})
    assert set(check()) == {"value", "sampling_locations", "attention_weights"}


def test_report_keeps_shapes_apart_when_a_case_name_repeats():
    rows = [
        {"suite": "m", "name": "B=2", "shape": "300x20", "backend": "x", "time_ms": 1.0, "status": "ok"},
        {"suite": "m", "name": "B=2", "shape": "300x300", "backend": "x", "time_ms": 2.0, "status": "ok"},
    ]
    md = report.markdown_report({}, rows)
    assert "| 300x20 |" in md and "| 300x300 |" in md
    md = report.markdown_report({}, rows[:1])
    assert "- `B=2`: 300x20" in md and "| 300x20 |" not in md


def test_gpu_check_dry_run_fits_the_device_tool(tmp_path):
    """benchmarks/gpu_check.sh is run on a lent GPU with minutes of device time: without a GPU it must still run
    its stages in the order asked, write at most 7 files to $OUT (the device tool returns 8; the first H200 run lost
    its sanitizer summaries to that limit) and print the stage table last, where a cut-off output tail keeps it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(
        os.environ,
        OUT=str(out),
        LOGDIR=str(tmp_path / "logs"),
        PYTHON=sys.executable,
        GPU_CHECK_SKIP_BUILD="1",
        GPU_CHECK_STAGES="build test",
    )
    proc = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["gpu_check.log", "summary.txt"], files
    tail = proc.stdout.strip().splitlines()[-6:]
    assert any(line.startswith("import ") and " ok " in line for line in tail), tail
    assert any(line.startswith("pytest-gpu ") for line in tail), tail
    assert "### pytest-gpu" in (out / "gpu_check.log").read_text()
