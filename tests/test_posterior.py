"""Tests of cnftools._posterior: the streamed softmax statistics equal the one-shot ones.

The public behaviour (log p_t, u_t, div u_t, posterior means of the marginals) is tested against
scipy and quadrature in tests/test_marginals.py; here the streaming itself is checked against
``torch.logsumexp`` / ``torch.softmax`` over all components at once, for every chunk size.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cnftools
from cnftools._posterior import OnlineSoftmax, ScheduleAt, empirical_posterior

F64 = torch.float64


def _stream(logits, values, shared, chunk, pair):
    stats = OnlineSoftmax(pair=pair)
    for lo in range(0, logits.shape[1], chunk):
        sl = slice(lo, lo + chunk)
        stats.add(
            logits[:, sl],
            {k: v[:, sl] for k, v in values.items()},
            {k: v[sl] for k, v in shared.items()},
        )
    return stats


@given(
    batch=st.integers(1, 4),
    k=st.integers(1, 9),
    chunk=st.integers(1, 10),
    offset=st.sampled_from([0.0, 700.0, -700.0]),
    seed=st.integers(0, 2**16),
)
def test_streamed_statistics_equal_one_pass(batch, k, chunk, offset, seed):
    """log-sum-exp, weighted means (per-row and shared values) and the weighted cross-covariance
    Σ_k w_k (p_k - p̄)·(q_k - q̄), streamed in chunks, equal the one-shot formulas: 1e-12 relative +
    1e-12 absolute in float64 (pairwise merges reorder the sums; logits near ±700 would overflow
    exp without the running maximum)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, k, dtype=F64, generator=g) + offset
    p = torch.randn(batch, k, 2, dtype=F64, generator=g)
    q = torch.randn(batch, k, 2, dtype=F64, generator=g)
    r = torch.randn(batch, k, dtype=F64, generator=g)
    points = torch.randn(k, 2, dtype=F64, generator=g)
    stats = _stream(logits, {"p": p, "q": q, "r": r}, {"points": points}, chunk, ("p", "q"))

    w = torch.softmax(logits, dim=1)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(stats.log_normalizer(), torch.logsumexp(logits, dim=1), **tol)
    mean_p, mean_q = (w[..., None] * p).sum(1), (w[..., None] * q).sum(1)
    torch.testing.assert_close(stats.means["p"], mean_p, **tol)
    torch.testing.assert_close(stats.means["r"], (w * r).sum(1), **tol)
    torch.testing.assert_close(stats.means["points"], w @ points, **tol)
    cross = (w * ((p - mean_p[:, None]) * (q - mean_q[:, None])).sum(-1)).sum(1)
    torch.testing.assert_close(stats.cross, cross, **tol)


def test_streaming_detects_a_wrong_merge():
    """Negative control: dropping a chunk changes the statistics beyond the tolerance above."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, dtype=F64, generator=g)
    values = {"p": torch.randn(3, 6, 2, dtype=F64, generator=g)}
    full = _stream(logits, values, {}, 2, None)
    short = _stream(logits[:, :4], {"p": values["p"][:, :4]}, {}, 2, None)
    assert not torch.allclose(full.log_normalizer(), short.log_normalizer(), rtol=1e-12)


@pytest.mark.parametrize("chunk", [1, 2, 5, 40])
def test_empirical_posterior_is_chunk_size_independent(chunk):
    """Posterior mean and tr Cov_w(x1) over data points equal a softmax over all points, 1e-12."""
    g = torch.Generator().manual_seed(3)
    points = torch.randn(40, 3, dtype=F64, generator=g)
    log_w = torch.log_softmax(torch.randn(40, dtype=F64, generator=g), dim=0)
    x = torch.randn(5, 3, dtype=F64, generator=g)
    t = torch.full((5,), 0.6, dtype=F64)
    times = ScheduleAt(cnftools.OTPath(0.1), t)
    post = empirical_posterior(x, times, points, log_w, chunk, posterior_mean=True, covariance=True)
    a, s2 = 0.6, (1 - 0.9 * 0.6) ** 2
    logits = log_w - 0.5 * ((x[:, None] - a * points) ** 2).sum(-1) / s2
    w = torch.softmax(logits, dim=1)
    mean = w @ points
    trace = (w * ((points[None] - mean[:, None]) ** 2).sum(-1)).sum(1)
    tol = {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(post.log_normalizer, torch.logsumexp(logits, dim=1), **tol)
    torch.testing.assert_close(post.posterior_mean, mean, **tol)
    torch.testing.assert_close(post.trace_covariance, trace, **tol)


def test_schedule_at_refuses_point_masses_by_name():
    times = ScheduleAt(cnftools.VPPath(), torch.tensor([0.5, 1.0], dtype=F64))
    with pytest.raises(ValueError, match=r"velocity of empirical data .* at t = \[1.0\]"):
        times.require_positive_noise("velocity")
    times.require_nondegenerate("velocity")  # a_1 = 1 > 0: not a point mass at 0
