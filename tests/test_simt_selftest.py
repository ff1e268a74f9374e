"""The SIMT emulator checks itself: each planted bug (tests/simt/selftest.cpp) must be reported — rendezvous and
memory bugs as an error naming the defect, races as output that changes with the schedule seed or poison byte
(the agreement check every emulated test applies)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.simt_emulator import load


def planted(name, seed=1, poison=0xA5):
    return load().planted(name, seed, poison)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("divergent_shuffle", "divergent shuffle"),
        ("exit_before_shuffle", "exited"),
        ("barrier_after_exit", "__syncthreads waits for threads that exited"),
        ("different_barriers", "different __syncthreads"),
        ("tail_overrun", "outside every allocation"),
        ("misaligned_load", "misaligned"),
    ],
)
def test_planted_bug_is_reported(name, message):
    with pytest.raises(RuntimeError, match=message):
        planted(name)


def test_deadlock_report_lists_thread_states():
    with pytest.raises(RuntimeError, match=r"(?s)thread 5 .*exited.*waiting at __shfl_down_sync"):
        planted("exit_before_shuffle")


@pytest.mark.parametrize("name", ["missing_barrier", "write_race"])
def test_race_changes_with_schedule_or_poison(name):
    outputs = [planted(name, seed, poison) for seed in (1, 2, 3) for poison in (0xA5, 0x5A)]
    assert any(not torch.equal(outputs[0], other) for other in outputs[1:])


def test_clean_kernel_is_schedule_independent():
    """Control: the real kernels give identical results under different schedules (tests/support/simt_msda_check.py)."""
    from support.cuda_cases import random_inputs
    from support.simt_msda_check import emulate_all

    inputs = random_inputs(1, 9, 2, 8, [(3, 3)], 2, torch.float32, device="cpu")
    emulate_all(list(inputs), torch.ones(1, 9, 16))


def test_scalar_read_past_the_end_hits_the_guard_page():
    """A plain load past the end (flush-end placement) faults on the PROT_NONE page; the handler names the access
    and the nearest allocation and exits with status 86 (run in a subprocess, since the process ends)."""
    load()  # build in this process first: the subprocess then only loads the cached extension
    code = (
        "import sys; sys.path.insert(0, 'tests'); from support.simt_emulator import run; "
        "run('planted', 'guard_page_read', 1, 0xA5, placement='flush_end')"
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 86, proc.stderr[-2000:]
    assert "simt: invalid memory access" in proc.stderr and "offset 24 in the nearest" in proc.stderr
