"""The CPU kernel copies (default / AVX2 / AVX-512), chosen at load time like ATen's CPU capability and lowered by
``DEFORMABLE_DETR_CPU_CAPABILITY`` (else by ATen's ``ATEN_CPU_CAPABILITY``): each copy this CPU can run is checked
against the float64 oracle in a fresh process (the choice is made once per process); a request above the CPU falls
back to the best copy it runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from support.cpu_isa import ORDER, supported_capabilities

from deformable_detr._extension import extension_loaded

pytestmark = pytest.mark.skipif(not extension_loaded(), reason="compiled extension not built")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

_ORACLE_SCRIPT = """
import torch, deformable_detr as dd
from support.oracle import make_inputs, ms_deform_attn_oracle
for D, dtype in ((32, torch.float32), (16, torch.float32), (7, torch.float64), (16, torch.bfloat16)):
    value, ss, lsi, loc, attn = make_inputs(2, [(5, 4), (2, 3), (1, 1)], 2, D, 6, 3, dtype=dtype, seed=D)
    value.requires_grad_(True); loc.requires_grad_(True); attn.requires_grad_(True)
    out = dd.ms_deform_attn(value, ss, lsi, loc, attn, backend="cpu")
    out.float().sum().backward()
    v64, l64 = value.detach().double().requires_grad_(True), loc.detach().double().requires_grad_(True)
    a64 = attn.detach().double().requires_grad_(True)
    ref = ms_deform_attn_oracle(v64, ss, lsi, l64, a64)
    ref.sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-4
    for a, b in ((out, ref), (value.grad, v64.grad), (loc.grad, l64.grad), (attn.grad, a64.grad)):
        err = ((a.double() - b).abs().max() / b.abs().max()).item()
        assert err < tol, (D, dtype, err)
print("capability=" + torch.ops.deformable_detr._cpu_capability())
"""


def supported_capability() -> str:
    """The best copy this CPU runs (x86-64 builds compile all three)."""
    return supported_capabilities()[-1]


def _lower(a: str, b: str) -> str:
    return a if ORDER.index(a) < ORDER.index(b) else b


def _run(capability: str | None, script: str = _ORACLE_SCRIPT, **extra_env: str) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DEFORMABLE_DETR_CPU_CAPABILITY", "DEFORMABLE_DETR_DISABLE_AVX2")
    } | extra_env
    if capability is not None:
        env["DEFORMABLE_DETR_CPU_CAPABILITY"] = capability
    return subprocess.run([sys.executable, "-c", script], env=env, cwd=TESTS_DIR, capture_output=True, text=True)


def test_in_process_capability_is_the_best_the_cpu_runs_or_the_requested_one():
    aten = os.environ.get("ATEN_CPU_CAPABILITY")
    requested = os.environ.get("DEFORMABLE_DETR_CPU_CAPABILITY") or (aten if aten in ORDER else "avx512")
    if os.environ.get("DEFORMABLE_DETR_DISABLE_AVX2") == "1":
        requested = "default"
    assert torch.ops.deformable_detr._cpu_capability() == _lower(requested, supported_capability())


@pytest.mark.parametrize("capability", ORDER)
def test_copy_matches_the_oracle(capability):
    supported = supported_capability()
    if ORDER.index(capability) > ORDER.index(supported):
        pytest.skip(f"this CPU cannot run the {capability} copy (best: {supported}); its fallback is tested below")
    result = _run(capability)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"capability={capability}" in result.stdout, result.stdout


def test_request_above_the_cpu_falls_back_to_the_best_copy_it_runs():
    result = _run("avx512")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"capability={supported_capability()}" in result.stdout, result.stdout


def test_older_switch_still_forces_the_default_copy():
    env = dict(os.environ, DEFORMABLE_DETR_DISABLE_AVX2="1")
    env.pop("DEFORMABLE_DETR_CPU_CAPABILITY", None)
    script = "import torch, deformable_detr\nprint(torch.ops.deformable_detr._cpu_capability())"
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=TESTS_DIR, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "default", result.stderr[-3000:]


@pytest.mark.parametrize("capability", ORDER)
def test_aten_cpu_capability_lowers_the_copy_too(capability):
    """``ATEN_CPU_CAPABILITY`` alone picks the copy (one variable forces ATen and these kernels together); ours wins
    when both are set, and ATen's values we have no copy for leave the best copy."""
    script = "import torch, deformable_detr\nprint(torch.ops.deformable_detr._cpu_capability())"

    def chosen(ours=None, **extra):
        result = _run(ours, script, **extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout.strip()

    best = supported_capability()
    assert chosen(ATEN_CPU_CAPABILITY=capability) == _lower(capability, best)
    assert chosen("default", ATEN_CPU_CAPABILITY=capability) == "default"
    if capability == "default":
        assert chosen(ATEN_CPU_CAPABILITY="zvector") == best


def test_unknown_capability_name_is_a_clear_error():
    script = (
        "import torch, deformable_detr as dd\n"
        "v = torch.zeros(1, 1, 1, 4); ss = torch.tensor([[1, 1]]); st = torch.tensor([0])\n"
        "dd.ms_deform_attn(v, ss, st, torch.zeros(1, 1, 1, 1, 1, 2), torch.ones(1, 1, 1, 1, 1), backend='cpu')\n"
    )
    result = _run("sse9", script)
    assert result.returncode != 0
    assert "DEFORMABLE_DETR_CPU_CAPABILITY must be default, avx2 or avx512, got 'sse9'" in result.stderr
