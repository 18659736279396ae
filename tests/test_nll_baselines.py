"""Baselines on the dequantized scale (cnftools/nll/baselines.py)."""

from __future__ import annotations

import math

import pytest
import torch

from cnftools.nll import Dequantization, gaussian_baseline_nll, histogram_baseline_nll


def test_histogram_baseline_is_exact():
    train = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 2]])
    test = torch.tensor([[1, 2]])
    # add-one smoothing, L = 3: P(x_1 = 1) = (1 + 1)/(4 + 3), P(x_2 = 2) = (3 + 1)/(4 + 3)
    expected = -math.log(2 / 7) - math.log(4 / 7)
    got = histogram_baseline_nll(train, test, 3)
    assert abs(float(got[0]) - expected) < 1e-12  # float64 arithmetic on a few terms


def test_gaussian_baseline_beats_uniform_on_correlated_data():
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(2, 14, (500, 1), generator=gen)
    rows = (base + torch.randint(-1, 2, (500, 4), generator=gen)).clamp(0, 16)
    nll = gaussian_baseline_nll(rows[:400], rows[400:], Dequantization(17, samples=2))
    bpd = float(nll.mean()) / (4 * math.log(2))
    # strongly correlated pixels: far below the uniform model's log2(17) = 4.09 bits/dim
    assert bpd < math.log2(17) - 1


@pytest.mark.parametrize(
    ("train", "test", "kwargs", "message"),
    [
        ([[0.4], [1.0]], [[1.0]], {}, "integer values"),
        ([[0], [1]], [[20]], {}, "must lie in 0..16"),
        ([[0], [1]], [[1]], {"alpha": -1.0}, "alpha must be a finite number >= 0"),
    ],
)
def test_histogram_baseline_validates_its_input(train, test, kwargs, message):
    with pytest.raises(ValueError, match=message):
        histogram_baseline_nll(torch.tensor(train), torch.tensor(test), 17, **kwargs)


@pytest.mark.parametrize("which", ["train", "test"])
def test_baseline_errors_name_the_argument(which):
    good, bad = torch.tensor([[0], [1]]), torch.tensor([[0.5]])
    args = (bad, good) if which == "train" else (good, bad)
    with pytest.raises(ValueError, match=f"^{which} must hold integer values"):
        histogram_baseline_nll(*args, 2)
    with pytest.raises(ValueError, match=f"^{which} must hold integer values"):
        gaussian_baseline_nll(*args, Dequantization(2))
