"""benchmarks/peers.py on CPU: the build-time substitution, unpacking, the reasons a peer row gives, and the original
kernel's CPU path (built from .peers/ when `make peers` has fetched it; skipped otherwise, never faked)."""

from __future__ import annotations

import io
import zipfile

import pytest
import torch

from benchmarks import peers

ORIGINAL_SNIPPET = """
    AT_ASSERTM(value.type().is_cuda(), "value must be a CUDA tensor");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, value.type(), "f", ([&] {
        ms_deformable_im2col_cuda(value.data<scalar_t>() + n, spatial_shapes.data<int64_t>());
    }));
    at::Tensor t = at::zeros({1}, value.options());  // .options() and .size() untouched
"""


def test_substitute_replaces_only_the_removed_apis():
    text, count = peers.substitute(ORIGINAL_SNIPPET)
    assert count == 4
    assert "value.is_cuda()" in text
    assert 'BFloat16, value.scalar_type(), "f"' in text
    assert "value.data_ptr<scalar_t>()" in text and "spatial_shapes.data_ptr<int64_t>()" in text
    assert ".type()" not in text and ".data<" not in text
    assert "value.options()" in text
    assert peers.substitute(text) == (text, 0)  # idempotent: a second pass changes nothing


def _fake_wheel(dist, body=ORIGINAL_SNIPPET):
    dist.mkdir(parents=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("transformers/kernels/deformable_detr/cuda/ms_deform_attn_cuda.cu", body)
        archive.writestr("transformers/models/other.py", "x = 1\n")
    (dist / "transformers-4.46.3-py3-none-any.whl").write_bytes(buffer.getvalue())


def test_unpack_without_fetch_says_run_make_peers(tmp_path):
    src, reason = peers.unpack_original(tmp_path)
    assert src is None and "run `make peers`" in reason and "\n" not in reason
    module, reason = peers.original_module(False, tmp_path)
    assert module is None and "run `make peers`" in reason


def test_unpack_extracts_the_kernel_dir_substituted_and_is_idempotent(tmp_path):
    _fake_wheel(tmp_path / "dist")
    src, reason = peers.unpack_original(tmp_path)
    assert reason == "ok"
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    assert files == [".unpacked", "cuda/ms_deform_attn_cuda.cu"]
    cu = src / "cuda/ms_deform_attn_cuda.cu"
    assert ".data_ptr<scalar_t>" in cu.read_text()
    mtime = cu.stat().st_mtime_ns
    assert peers.unpack_original(tmp_path) == (src, "ok")
    assert cu.stat().st_mtime_ns == mtime  # second call: nothing rewritten


def test_fetch_skips_what_is_already_there(tmp_path):
    dist = tmp_path / "dist"
    _fake_wheel(dist)
    for name in ("dcnv4-1.0.0.post2.tar.gz", "lap-0.5.12-cp312-cp312-linux_x86_64.whl", "lapjv-1.3.27.tar.gz"):
        (dist / name).write_bytes(b"")
    # A python that cannot run pip proves nothing is downloaded: every pin is found in dist first.
    lines = peers.fetch(dist, python="/nonexistent/python")
    assert len(lines) == 4 and all("already in" in line for line in lines)


def test_fetch_failure_is_one_line_that_says_what_to_do(tmp_path):
    lines = peers.fetch(tmp_path / "dist", python="false")
    assert len(lines) == 4
    assert all("download failed" in line and "make peers" in line and "\n" not in line for line in lines)


def test_original_cuda_status_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA: the GPU row is measured by the benchmark instead")
    assert peers.original_status("cuda", tmp_path) == (None, "no CUDA device")


@pytest.mark.skipif(peers._wheel(peers.PEERS / "dist", "transformers-4.46.3") is None, reason="run `make peers`")
def test_original_cpu_path_builds_and_raises_its_own_message():
    forward, reason = peers.original_status("cpu")
    assert forward is None
    assert reason == "original CPU path raises: Not implemented on the CPU"


def test_im2col_step_divides_the_batch():
    assert [peers.im2col_step(n) for n in (1, 2, 6, 64, 96, 97, 128)] == [1, 2, 6, 64, 48, 1, 64]


def test_original_function_routes_the_original_backward_to_the_right_inputs():
    calls = {}

    class FakeModule:  # stands in for the compiled op: shapes and plumbing only
        @staticmethod
        def ms_deform_attn_forward(value, shapes, start, locations, weights, step):
            calls["forward_step"] = step
            return value.new_zeros(value.shape[0], locations.shape[1], value.shape[2] * value.shape[3])

        @staticmethod
        def ms_deform_attn_backward(value, shapes, start, locations, weights, grad_output, step):
            assert grad_output.is_contiguous()
            return [torch.full_like(value, 1.0), torch.full_like(locations, 2.0), torch.full_like(weights, 3.0)]

    value = torch.zeros(6, 4, 2, 3, requires_grad=True)
    locations = torch.zeros(6, 5, 2, 1, 2, 2, requires_grad=True)
    weights = torch.zeros(6, 5, 2, 1, 2, requires_grad=True)
    shapes, start = torch.tensor([[2, 2]]), torch.tensor([0])
    out = peers.original_function(FakeModule)(value, shapes, start, locations, weights)
    assert out.shape == (6, 5, 6) and calls["forward_step"] == 6
    out.backward(torch.ones(6, 6, 5).transpose(1, 2))  # non-contiguous on purpose
    assert value.grad.eq(1).all() and locations.grad.eq(2).all() and weights.grad.eq(3).all()


def test_cpu_benchmark_peer_rows_say_why_there_is_no_timing():
    from benchmarks import bench_msda

    label, thunk = bench_msda.tasks("cpu", quick=True)[-1]
    rows = {r["backend"]: r for r in thunk()}
    assert label == "msda peers" and set(rows) == {"original", "dcnv4"}
    fetched = peers._wheel(peers.PEERS / "dist", "transformers-4.46.3") is not None
    expected = "original CPU path raises: Not implemented on the CPU" if fetched else "run `make peers`"
    assert expected in rows["original"]["status"]


@pytest.mark.parametrize("backend", ["lap.lapjv-loop", "lapjv-loop"])
def test_lapjv_rows_agree_with_scipy_cost(backend):
    from benchmarks import bench_matcher

    loop, reason = bench_matcher.lapjv_peers()[backend]
    if loop is None:
        assert reason == "not installed: run make peers"
        pytest.skip(reason)
    gen = torch.Generator().manual_seed(1)
    for n, m in ((7, 7), (30, 11)):
        cost = torch.rand(3, n, m, generator=gen)
        ours, ref = loop(cost), bench_matcher.scipy_loop(cost)
        assert (ours >= 0).sum() == 3 * m
        assert bench_matcher.assignment_cost(cost, ours) == pytest.approx(bench_matcher.assignment_cost(cost, ref))


def test_first_error_is_the_compiler_line_not_the_command():
    text = "Error building extension 'x': [1/3] c++ -MMD foo.cpp\nfoo.h:10:10: fatal error: cusparse.h: No such file\n"
    assert peers._first_error(text) == "foo.h:10:10: fatal error: cusparse.h: No such file"
    assert peers._first_error("") == "no output"
