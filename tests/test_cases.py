"""Tests of cnftools.cases: the shared random SPD / orthogonal matrices and the data cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cnftools.cases import DATA_CASES, random_orthogonal, random_spd

F64 = torch.float64


@given(d=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_random_orthogonal_is_orthogonal(d, seed):
    """QᵀQ = I to 1e-12 (float64 QR roundoff for d ≤ 12)."""
    q = random_orthogonal(d, torch.Generator().manual_seed(seed))
    assert q.shape == (d, d) and q.dtype == F64
    torch.testing.assert_close(q.T @ q, torch.eye(d, dtype=F64), rtol=0, atol=1e-12)


@given(
    d=st.integers(1, 10),
    low=st.floats(1e-3, 10.0),
    ratio=st.floats(1.0, 100.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_spd_eigenvalues_lie_in_the_range(d, low, ratio, seed):
    """Exactly symmetric; eigenvalues in [low, high] up to 1e-12·high (eigvalsh roundoff)."""
    high = low * ratio
    s = random_spd(d, torch.Generator().manual_seed(seed), eigenvalues=(low, high))
    assert bool((s == s.T).all())
    lam = torch.linalg.eigvalsh(s)
    assert float(lam.min()) >= low - 1e-12 * high and float(lam.max()) <= high + 1e-12 * high


@given(eigenvalues=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=8))
def test_random_spd_with_given_eigenvalues(eigenvalues):
    """A (d,) tensor of eigenvalues is used exactly: sorted eigvalsh equals it to 1e-12·max."""
    lam = torch.tensor(eigenvalues, dtype=F64)
    s = random_spd(len(eigenvalues), torch.Generator().manual_seed(0), eigenvalues=lam)
    got = torch.linalg.eigvalsh(s)
    torch.testing.assert_close(got, lam.sort().values, rtol=0, atol=1e-12 * float(lam.max()))


def test_random_spd_follows_dtype_and_is_reproducible():
    """Drawn in float64 then cast: float32 output equals the cast float64 one; same seed, same
    matrix; the generator's draws are Q first, then the eigenvalues."""
    a = random_spd(4, torch.Generator().manual_seed(3), torch.float32)
    b = random_spd(4, torch.Generator().manual_seed(3))
    assert a.dtype == torch.float32
    assert torch.equal(a, b.float())
    g = torch.Generator().manual_seed(3)
    q = random_orthogonal(4, g)
    lam = 0.5 + 1.5 * torch.rand(4, generator=g, dtype=F64)
    torch.testing.assert_close(b, (q * lam) @ q.T, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"d": 0}, ValueError, "d must be"),
        ({"d": 2.0}, ValueError, "d must be"),
        ({"d": True}, ValueError, "d must be"),
        ({"generator": 0}, TypeError, "generator"),
        ({"eigenvalues": (0.0, 1.0)}, ValueError, "0 < low <= high"),
        ({"eigenvalues": (2.0, 1.0)}, ValueError, "0 < low <= high"),
        ({"eigenvalues": (1.0, math.inf)}, ValueError, "0 < low <= high"),
        ({"eigenvalues": (1.0,)}, ValueError, "tuple"),
        ({"eigenvalues": torch.ones(2, dtype=F64)}, ValueError, "shape"),
        ({"eigenvalues": torch.tensor([1.0, -1.0, 1.0])}, ValueError, "> 0"),
    ],
)
def test_random_spd_rejects_bad_arguments(kwargs, error, match):
    args = {"d": 3, "generator": torch.Generator().manual_seed(0), **kwargs}
    with pytest.raises(error, match=match):
        random_spd(**args)


def test_data_case_parameters_are_valid():
    """Every registered case: covariances SPD, weights positive and summing to one (1e-12)."""
    for case in DATA_CASES.values():
        p = case.parameters()
        for cov in [p["cov"]] if "cov" in p else list(p.get("covs", [])):
            assert float(torch.linalg.eigvalsh(cov).min()) > 0
        if "weights" in p:
            assert bool((p["weights"] > 0).all())
            assert abs(float(p["weights"].sum()) - 1) <= 1e-12
