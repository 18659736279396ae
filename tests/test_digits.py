"""Tests of cnftools._digits: scikit-learn's 8×8 digits as integers (skipped without scikit-learn)."""

from __future__ import annotations

import pytest
import torch

from cnftools._digits import DIGITS_LEVELS, load_digits


def test_digits():
    pytest.importorskip("sklearn")
    x = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.long
    assert int(x.min()) == 0 and int(x.max()) == DIGITS_LEVELS - 1
    assert load_digits(images=True).shape == (1797, 1, 8, 8)
