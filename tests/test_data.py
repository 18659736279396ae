"""Datasets with known densities (theory §10), and cnftools.data as the user-facing module.

The digits and dequantization are tested in ``tests/test_digits.py`` and
``tests/test_dequantization.py``; here, that :mod:`cnftools.data` re-exports them.

Theory sections cited here (pages under ``docs/theory/``):

- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

import math

import pytest
import torch

import cnftools
from cnftools import _dequantization, _digits
from cnftools.data import (
    Checkerboard,
    GaussianMixture,
    checkerboard,
    eight_gaussians,
    gaussian_mixture,
    spirals,
    two_moons,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_eight_gaussians_log_prob_by_hand():
    q = eight_gaussians(radius=2.0, std=0.2, dtype=F64)
    assert q.means.shape == (8, 2) and q.covs.shape == (8, 2, 2)
    # at a centre the own component dominates: log q ≈ log(1/8) + log N(0; 0, 0.04 I)
    # = -log 8 - log(2π · 0.04); the other components (distance ≥ 2·2·sin(π/8) ≈ 1.53, i.e. ≥ 7.6σ)
    # add e^{-29} relative, far below the 1e-12 tolerance.
    x = torch.tensor([[2.0, 0.0]], dtype=F64)
    expected = -math.log(8) - math.log(2 * math.pi * 0.04)
    assert math.isclose(float(q.log_prob(x)), expected, rel_tol=1e-12)


def test_mixture_log_prob_matches_torch_mixture():
    means = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    covs = torch.stack([torch.eye(2, dtype=F64), torch.tensor([[1.0, 0.5], [0.5, 2.0]], dtype=F64)])
    weights = torch.tensor([0.3, 0.7], dtype=F64)
    q = GaussianMixture(means, covs, weights)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(weights),
        torch.distributions.MultivariateNormal(means, covs),
    )
    x = torch.randn(50, 2, generator=gen(), dtype=F64)
    # two implementations of the same density: roundoff, 1e-12
    torch.testing.assert_close(q.log_prob(x), reference.log_prob(x), rtol=1e-12, atol=1e-12)


def test_mixture_sampler_moments():
    q = gaussian_mixture(torch.tensor([[0.0, 0.0], [4.0, 0.0]], dtype=F64), 0.5)
    x = q.sample(200_000, gen(1))
    # mean (2, 0), var_x = 0.25 + 4 (between-component), var_y = 0.25.
    # std errors: mean_x sqrt(4.25/2e5) ≈ 4.6e-3; var estimates ~ 1e-2. 5σ margins below.
    torch.testing.assert_close(x.mean(0), torch.tensor([2.0, 0.0], dtype=F64), rtol=0, atol=0.025)
    torch.testing.assert_close(x.var(0), torch.tensor([4.25, 0.25], dtype=F64), rtol=0.02, atol=0)


def test_mixture_marginal_at_t1_is_the_data_density():
    # OT(sigma_min): p_1 = q * N(0, σ² I) — covariances grow by σ² (theory §9–10)
    q = eight_gaussians(dtype=F64)
    sigma = 0.05
    p1 = q.marginal(cnftools.OTPath(sigma))
    widened = GaussianMixture(q.means, q.covs + sigma**2 * torch.eye(2, dtype=F64), q.weights)
    x = q.sample(64, gen(2))
    # two implementations (eigh vs cholesky): roundoff, 1e-10
    torch.testing.assert_close(p1.log_prob(x, 1.0), widened.log_prob(x), rtol=1e-10, atol=1e-10)
    assert set(q.as_dict()) == {"means", "covs", "weights"}


def test_mixture_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture(torch.zeros(2, 1), torch.ones(2, 1, 1), torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match="covs must have shape"):
        GaussianMixture(torch.zeros(2, 2), torch.ones(2, 1, 1), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        eight_gaussians().log_prob(torch.zeros(3, 3))


def test_checkerboard_density_and_sampler():
    board = Checkerboard()
    x = board.sample(100_000, gen(3), dtype=F64)
    log_q = board.log_prob(x)
    # every draw lies on the support, where the density is exactly 1/8
    assert torch.equal(log_q, torch.full_like(log_q, -math.log(8)))
    assert board.entropy == math.log(8)
    # the 8 occupied cells are equally likely: counts ~ Binomial(n, 1/8), sd ≈ 105; 6 sd margin
    cells = torch.floor(x).to(torch.long) + 2
    counts = torch.bincount(cells[:, 0] * 4 + cells[:, 1], minlength=16)
    occupied = counts[counts > 0]
    assert occupied.numel() == 8
    assert float((occupied - 12_500).abs().max()) < 6 * math.sqrt(100_000 / 8 * 7 / 8)
    # off the support: white cell and outside the board
    outside = torch.tensor([[0.5, -0.5], [2.5, 0.5], [-0.5, -0.5]], dtype=F64)
    assert board.log_prob(outside).tolist() == [-math.inf, -math.inf, -math.log(8)]


@pytest.mark.parametrize("dataset", [two_moons, spirals, checkerboard, eight_gaussians])
def test_every_toy_dataset_has_one_shape_of_api(dataset, dtype):
    """A function returning an object whose sample(n, generator, dtype=) draws (n, 2) points."""
    sampler = dataset()
    a = sampler.sample(100, gen(4), dtype=dtype)
    b = sampler.sample(100, gen(4), dtype=dtype)
    assert a.shape == (100, 2) and a.dtype == dtype
    assert torch.equal(a, b)  # same generator seed, same draws
    assert bool(torch.isfinite(a).all())
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        sampler.sample(0)


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (
            lambda: gaussian_mixture(torch.zeros(2, 2), -0.2),
            ValueError,
            "stds must be finite and > 0",
        ),
        (lambda: gaussian_mixture(torch.zeros(2), 0.2), ValueError, "means must have shape"),
        (
            lambda: gaussian_mixture(torch.tensor([[float("nan"), 0.0]]), 0.2),
            ValueError,
            "means has non-finite",
        ),
        (
            lambda: GaussianMixture(
                torch.zeros(1, 2), torch.eye(2, dtype=torch.float64)[None], torch.ones(1)
            ),
            TypeError,
            "covs must have the dtype and device of means",
        ),
        (
            lambda: GaussianMixture(torch.zeros(1, 2), -torch.eye(2)[None], torch.ones(1)),
            ValueError,
            "positive definite",
        ),
    ],
)
def test_mixture_parameters_are_validated(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_dequantization_is_the_top_level_one():
    from cnftools.data import Dequantization

    assert cnftools.Dequantization is Dequantization
    assert cnftools.nll.Dequantization is Dequantization


def test_data_re_exports_the_digits_and_dequantization():
    """cnftools.data is the user-facing module: every name of the digits and dequantization
    modules is listed there and is the object defined in its module (one class for isinstance
    and pickles)."""
    moved = {name: module for module in (_digits, _dequantization) for name in module.__all__}
    assert set(moved) <= set(cnftools.data.__all__)
    for name, module in moved.items():
        assert getattr(cnftools.data, name) is getattr(module, name), name
