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
