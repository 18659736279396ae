"""Tests of cnftools.nll.frames: the lean one-round merge equals the general one."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cnftools.data import Dequantization
from cnftools.nll.frames import combine, combine_units


def _units(order: list[int], rounds: int = 1, seed: int = 0) -> list[pd.DataFrame]:
    """Unit frames as compute_unit makes them: batches of 5 rows, some failed, in ``order``."""
    rng = np.random.default_rng(seed)
    units = []
    for b in order:
        for r in range(rounds):
            n = 5
            status = np.where(rng.random(n) < 0.2, "error: boom", "ok")
            units.append(
                pd.DataFrame(
                    {
                        "index": np.arange(5 * b, 5 * b + n, dtype=np.int64),
                        "round": np.full(n, r, dtype=np.int64),
                        "log_prob": rng.normal(size=n),
                        "variance": rng.random(n),
                        "nfe": rng.integers(1, 50, n).astype(np.int64),
                        "status": status.astype(str),
                    }
                )
            )
    return units


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [2, 0, 3, 1]], ids=["in order", "by rank"])
@pytest.mark.parametrize("hutchinson", [False, True])
@pytest.mark.parametrize("deq", [None, Dequantization(17)], ids=["float", "dequantized"])
@pytest.mark.parametrize("rounds", [1, 3])
def test_combine_units_equals_combine_of_the_concatenation(order, hutchinson, deq, rounds):
    """Same frame, same dtypes, same values (exact: the same arithmetic on one value per row)."""
    units = _units(order, rounds)
    expected = combine(pd.concat(units, ignore_index=True), 4, deq, hutchinson)
    pd.testing.assert_frame_equal(combine_units(units, 4, deq, hutchinson), expected)
