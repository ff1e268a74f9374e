"""The op wrapper's cheap path: int32 level tables, the checked-once level-table cache (identity + version
counter), no tensor math per call, meta tensors through the fake kernel, torch.compile with int32 tables."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from support.oracle import make_inputs, ms_deform_attn_oracle
from torch.utils._python_dispatch import TorchDispatchMode

import deformable_detr as dd
from deformable_detr._extension import extension_loaded
from deformable_detr.ops import levels

BACKENDS = [b for b in dd.available_backends("cpu") if b != "triton"]
SHAPES = [(4, 3), (2, 2), (1, 1)]


def _inputs(seed=0):
    return make_inputs(2, SHAPES, 2, 5, 6, 2, dtype=torch.float64, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_level_tables_accepted(backend):
    value, ss, lsi, loc, attn = _inputs()
    expected = ms_deform_attn_oracle(value, ss, lsi, loc, attn)
    out = dd.ms_deform_attn(value, ss.int(), lsi.int(), loc, attn, backend=backend)
    torch.testing.assert_close(out, expected)
    out = dd.MSDeformAttnFunction.apply(value, ss.int(), lsi, loc, attn, 64)
    torch.testing.assert_close(out, expected)


def test_int32_tables_still_value_checked():
    value, ss, lsi, loc, attn = _inputs()
    with pytest.raises(ValueError, match="level_start_index"):
        dd.ms_deform_attn(value, ss.int(), (lsi + 1).int(), loc, attn)


def test_int64_tables_on_the_device_are_not_copied():
    value, ss, lsi, *_ = _inputs()
    out_ss, out_lsi = levels.lookup(ss, lsi, value.shape[1]).on(value.device, ss, lsi)
    assert out_ss is ss and out_lsi is lsi
    ss32, lsi32 = ss.int(), lsi.int()
    first = levels.lookup(ss32, lsi32, value.shape[1]).on(value.device, ss32, lsi32)
    assert first[0].dtype == torch.int64 and torch.equal(first[0], ss) and torch.equal(first[1], lsi)
    # the converted copy is made once per table, not once per call
    second = levels.lookup(ss32, lsi32, value.shape[1]).on(value.device, ss32, lsi32)
    assert second[0] is first[0] and second[1] is first[1]


class _OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
def test_repeated_call_runs_no_tensor_math_besides_the_op():
    value, ss, lsi, loc, attn = make_inputs(1, SHAPES, 2, 4, 3, 2)
    dd.ms_deform_attn(value, ss, lsi, loc, attn)  # first call checks and caches the tables
    with _OpRecorder() as recorder:
        dd.ms_deform_attn(value, ss, lsi, loc, attn)
    assert recorder.ops == ["deformable_detr.ms_deform_attn"]


@pytest.mark.parametrize("edit", ["spatial_shapes", "level_start_index"])
def test_cache_sees_in_place_edits(edit):
    value, ss, lsi, loc, attn = _inputs()
    dd.ms_deform_attn(value, ss, lsi, loc, attn)
    with torch.no_grad():
        if edit == "spatial_shapes":
            ss[0, 0] = 5  # the version counter moves: the table is checked again
        else:
            lsi.add_(1)
    with pytest.raises(ValueError, match=edit):
        dd.ms_deform_attn(value, ss, lsi, loc, attn)


def test_cache_is_not_fooled_by_a_reused_id():
    value, ss, lsi, loc, attn = _inputs()
    bad = [(5, 3), (2, 2), (1, 1)]
    dd.ms_deform_attn(value, ss, lsi, loc, attn)
    old_ids = (id(ss), id(lsi))
    del ss
    gc.collect()
    # A fresh tensor may land at the dead one's address: the weak reference (dead) must keep it from matching.
    for _ in range(200):
        ss = torch.tensor(bad)
        if id(ss) == old_ids[0]:
            break
    with pytest.raises(ValueError, match="spatial_shapes"):
        dd.ms_deform_attn(value, ss, lsi, loc, attn)


def test_cache_checks_the_total_for_every_value():
    value, ss, lsi, loc, attn = _inputs()
    dd.ms_deform_attn(value, ss, lsi, loc, attn)
    with pytest.raises(ValueError, match="spatial_shapes"):
        dd.ms_deform_attn(value[:, :-1], ss, lsi, loc, attn)


def test_inference_mode_tables_work_uncached():
    value, ss, lsi, loc, attn = _inputs()
    expected = dd.ms_deform_attn(value, ss, lsi, loc, attn)
    with torch.inference_mode():
        ss_i, lsi_i = ss.clone(), lsi.clone()  # inference tensors have no version counter
        torch.testing.assert_close(dd.ms_deform_attn(value, ss_i, lsi_i, loc, attn), expected)
        with pytest.raises(ValueError, match="level_start_index"):
            dd.ms_deform_attn(value, ss_i, lsi_i + 1, loc, attn)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_meta_tensors_run_the_fake_kernel(backend):
    value, ss, lsi, loc, attn = (t.to("meta") for t in _inputs())
    value.requires_grad_(True)
    loc.requires_grad_(True)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend=backend)
    assert out.device.type == "meta" and out.shape == (2, 6, 10) and out.dtype == value.dtype
    if extension_loaded():
        out.sum().backward()
        assert value.grad.shape == value.shape and loc.grad.shape == loc.shape


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
def test_torch_compile_fullgraph_with_int32_tables():
    torch._dynamo.reset()
    value, ss, lsi, loc, attn = _inputs()
    ss32, lsi32 = ss.int(), lsi.int()

    def fn(v, l, a):
        return dd.ms_deform_attn(v, ss32, lsi32, l, a) * 2

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(value, loc, attn), fn(value, loc, attn))


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
def test_overhead_benchmark_rows(monkeypatch):
    from benchmarks import bench_overhead

    monkeypatch.setattr(bench_overhead, "CASES", bench_overhead.CASES[:1])
    rows = bench_overhead.run("cpu", reps=5, budget_s=0)
    assert {r["backend"] for r in rows} >= {"raw op", "wrapper", "wrapper, int32 tables"}
    assert all(r["status"] == "ok" for r in rows)
    assert all("over_raw_us" in r for r in rows if r["backend"].startswith("wrapper"))
    assert "| wrapper |" in bench_overhead.markdown({"device_name": "cpu"}, rows)


@pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")
@pytest.mark.parametrize("backend", [None, "cpu"])
def test_compiled_first_call_fills_the_one_backend_memo(monkeypatch, backend):
    """The backend choice is one memo: a process whose first call is compiled (fullgraph) fills it at trace time
    and eager calls then reuse the entry; an unavailable explicit backend still raises, under compile too."""
    wrapper = sys.modules["deformable_detr.ops.ms_deform_attn"]
    monkeypatch.setattr(wrapper, "_CHOICES", {})
    torch._dynamo.reset()
    value, ss, lsi, loc, attn = _inputs()

    def fn(v, l, a):
        return dd.ms_deform_attn(v, ss, lsi, l, a, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(value, loc, attn), ms_deform_attn_oracle(value, ss, lsi, loc, attn))
    assert wrapper._CHOICES == {(backend, value.device): ("cpu", None, True)}
    torch.testing.assert_close(fn(value, loc, attn), compiled(value, loc, attn))
    assert len(wrapper._CHOICES) == 1

    def wrong(v, l, a):
        return dd.ms_deform_attn(v, ss, lsi, l, a, backend="cuda")

    with pytest.raises(Exception, match='backend "cuda"'):
        torch.compile(wrong, fullgraph=True, backend="aot_eager")(value, loc, attn)
    with pytest.raises(RuntimeError, match='backend "cuda"'):
        wrong(value, loc, attn)
