"""scipy's linear-sum-assignment answer in the batched op's format: the oracle of the LSAP tests (tests/test_assignment.py)
and of the SIMT emulator's LSAP checks (tests/support/simt_lsap_check.py)."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment as scipy_lsa


def scipy_rows(cost: np.ndarray) -> np.ndarray:
    """scipy's answer in the batched format: assigned column per row, -1 if unassigned."""
    out = np.full(cost.shape[0], -1, dtype=np.int64)
    rows, cols = scipy_lsa(cost)
    out[rows] = cols
    return out
