"""Datasets with known densities, the digits, dequantization and bits/dim (theory §10, §12).

Theory sections cited here (pages under ``docs/theory/``):

- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
- §12: ``docs/theory/bits-per-dim.md#bits-per-dimension``
"""

from __future__ import annotations

import math

import pytest
import torch

import cnftools
from cnftools.data import (
    DIGITS_LEVELS,
    Checkerboard,
    GaussianMixture,
    bits_per_dim,
    checkerboard,
    dequantization_log_det,
    dequantize,
    dequantized_nll,
    eight_gaussians,
    gaussian_mixture,
    load_digits,
    quantize,
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


def test_digits():
    pytest.importorskip("sklearn")
    x = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.long
    assert int(x.min()) == 0 and int(x.max()) == DIGITS_LEVELS - 1
    assert load_digits(images=True).shape == (1797, 1, 8, 8)


# ---------------------------------------------------------------------------------------------
# Dequantization and bits/dim.
@pytest.mark.parametrize("centered", [False, True])
def test_dequantize_range_and_inverse(centered, dtype):
    x = torch.randint(0, 17, (500, 64), generator=gen(5))
    y = dequantize(x, 17, gen(6), centered=centered, dtype=dtype)
    low = -1.0 if centered else 0.0
    assert y.dtype == dtype and float(y.min()) >= low and float(y.max()) < 1.0
    assert torch.equal(quantize(y, 17, centered=centered), x)


@pytest.mark.parametrize(("centered", "scale"), [(False, 1.0), (True, 2.0)])
def test_uniform_model_gives_log2_levels(centered, scale):
    # a model uniform on the cube [0,1)^D (or [-1,1)^D): NLL_y = D log(scale)
    levels, dim = 17, 64
    nll_y = dim * math.log(scale)
    # exactly log2 L up to the roundoff of a few logs: 1e-14
    assert math.isclose(
        bits_per_dim(nll_y, dim, levels, centered=centered), math.log2(levels), rel_tol=1e-14
    )
    assert math.isclose(
        dequantization_log_det(dim, levels, centered=centered), dim * math.log(scale / levels)
    )


def test_bits_per_dim_theory_values():
    # theory §12: y = x'/256 -> + 8; y = 2x'/256 - 1 -> + 7 (nll 0)
    assert math.isclose(bits_per_dim(0.0, 3072, 256), 8.0, rel_tol=1e-15)
    assert math.isclose(bits_per_dim(0.0, 3072, 256, centered=True), 7.0, rel_tol=1e-15)
    t = bits_per_dim(torch.tensor([0.0, 10 * math.log(2)], dtype=F64), 10)
    torch.testing.assert_close(t, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("samples", [1, 4])
def test_dequantized_nll_uniform_model(samples):
    # the uniform model on the unit cube has p_Y = 1: NLL_x = -D log(1/L) = D log L for any K
    x = torch.randint(0, 17, (8, 64), generator=gen(7))

    def uniform(y):
        return torch.zeros(y.shape[0], dtype=y.dtype)

    nll = dequantized_nll(uniform, x, 17, samples=samples, generator=gen(8), dtype=F64)
    expected = torch.full((8,), 64 * math.log(17), dtype=F64)
    torch.testing.assert_close(nll, expected, rtol=1e-14, atol=0)  # roundoff of logsumexp
    torch.testing.assert_close(
        bits_per_dim(nll, 64), torch.full((8,), math.log2(17), dtype=F64), rtol=1e-14, atol=0
    )


def test_dequantize_errors():
    with pytest.raises(ValueError, match=r"0\.\.16"):
        dequantize(torch.tensor([[17]]), 17)
    with pytest.raises(ValueError, match="integer values"):
        dequantize(torch.tensor([[0.5]]), 17)
    with pytest.raises(ValueError, match="levels must be an int >= 2"):
        dequantize(torch.tensor([[0]]), 1)
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        bits_per_dim(1.0, 0)


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


def test_quantize_refuses_non_finite_values():
    with pytest.raises(ValueError, match="y has non-finite values"):
        quantize(torch.tensor([[float("nan"), 0.5]]), 17)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"levels": 1}, ValueError, "levels must be an int >= 2"),
        ({"levels": True}, ValueError, "levels must be an int >= 2"),
        ({"levels": 4, "samples": 0}, ValueError, "samples must be an int >= 1"),
        ({"levels": 4, "centered": 1}, TypeError, "centered must be a bool"),
    ],
)
def test_dequantization_settings_are_validated(kwargs, error, message):
    from cnftools.data import Dequantization

    with pytest.raises(error, match=f"Dequantization.{message}"):
        Dequantization(**kwargs)


def test_dequantization_is_the_top_level_one():
    from cnftools.data import Dequantization

    assert cnftools.Dequantization is Dequantization
    assert cnftools.nll.Dequantization is Dequantization


@pytest.mark.parametrize("name", ["x", "images"])
def test_integer_data_errors_name_the_callers_argument(name):
    from cnftools.data import check_integer_data

    with pytest.raises(ValueError, match=f"^{name} must lie in 0..3"):
        check_integer_data(name, torch.tensor([[5]]), 4)
