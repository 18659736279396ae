"""Tests of the parametrization conversions of AffineGaussianPath (noise, data, score <-> velocity).

The reference for every conversion is the closed-form marginal path of Gaussian, mixture and
empirical data: its exact score, its posterior mean E[x1 | x_t = x] (Gaussian conditioning, written
independently in cnftools.validation.diffusion) and its exact marginal velocity.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import cnftools
from cnftools.cases import DATA_CASES
from cnftools.testing import builtin_paths, user_affine_paths
from cnftools.validation.diffusion import exact_posterior_mean

F64 = torch.float64
TO_VELOCITY = ("velocity_from_epsilon", "velocity_from_data", "velocity_from_score")
FROM_VELOCITY = ("epsilon_from_velocity", "data_from_velocity", "score_from_velocity")
PAIRS = list(zip(TO_VELOCITY, FROM_VELOCITY, strict=True))
DATA = ("gaussian d=3", "mixture K=4 d=2", "empirical N=6 d=1")


def affine_paths():
    return st.one_of(builtin_paths(), user_affine_paths())


def _draw(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _relative(got, expected):
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1.0))


def _exact(path, data_name, t, seed, batch=6):
    """x, t (B,), and the exact score, posterior mean, noise mean and velocity there."""
    case = DATA_CASES[data_name]
    marginal = case.marginal(path)
    x = 1.5 * _draw((batch, case.d), seed)
    tb = torch.full((batch,), t, dtype=F64)
    s = torch.sqrt(path.noise_variance(tb))[:, None]
    score = marginal.score(x, tb)
    x1_hat = exact_posterior_mean(case, path, x, tb)
    return (
        x,
        tb,
        {
            "score": score,
            "data": x1_hat,
            "epsilon": -s * score,
            "velocity": marginal.velocity(x, tb),
        },
    )


# --- against the closed-form marginals -----------------------------------------------------------


@given(
    path=affine_paths(),
    t=st.floats(0.05, 0.95),
    data=st.sampled_from(DATA),
    seed=st.integers(0, 2**16),
)
def test_exact_predictions_give_the_marginal_velocity(path, t, data, seed):
    """velocity_from_{epsilon, data, score} of the exact predictions = u_t(x), <= 1e-9 relative.

    float64 closed forms on both sides; the conversions divide by a_t and s_t, which on this time
    range are >= ~1e-4 (user paths a_t = t^3), so roundoff stays below ~1e-11.
    """
    x, tb, exact = _exact(path, data, t, seed)
    for kind in ("epsilon", "data", "score"):
        got = getattr(path, f"velocity_from_{kind}")(exact[kind], x, tb)
        assert _relative(got, exact["velocity"]) <= 1e-9, kind


@given(
    path=affine_paths(),
    t=st.floats(0.05, 0.95),
    data=st.sampled_from(DATA),
    seed=st.integers(0, 2**16),
)
def test_the_velocity_gives_back_the_exact_predictions(path, t, data, seed):
    """{epsilon, data, score}_from_velocity(u_t) = the exact predictions, <= 1e-9 relative.

    Skips times where a'_t s_t = a_t s'_t nearly (the velocity does not determine the split).
    """
    x, tb, exact = _exact(path, data, t, seed)
    a, da = path.signal_scale(tb), path.signal_scale_derivative(tb)
    det = da * path.noise_variance(tb) - a * path.noise_variance_rate(tb)
    assume(float(det.abs().min()) >= 1e-3)
    for kind in ("epsilon", "data", "score"):
        got = getattr(path, f"{kind}_from_velocity")(exact["velocity"], x, tb)
        assert _relative(got, exact[kind]) <= 1e-9, kind


@pytest.mark.parametrize("name", ["VP(0.1, 20)", "VE(0.1, 5)", "OT(sigma_min=0.1)"])
def test_tweedie_consistency_of_the_references(name):
    """The two references agree: x = a_t x̂₁ + s_t ε̂ with ε̂ = −s_t ∇log p_t (Tweedie), 1e-12.

    Also checks exact_posterior_mean against MixtureMarginal.posterior_mean on empirical data.
    """
    from cnftools.cases import PATH_CASES

    path = PATH_CASES[name].build()
    for data in DATA:
        x, tb, exact = _exact(path, data, 0.6, 3)
        a, s = path.signal_scale(tb)[:, None], torch.sqrt(path.noise_variance(tb))[:, None]
        assert _relative(a * exact["data"] + s * exact["epsilon"], x) <= 1e-12
    case = DATA_CASES["empirical N=6 d=1"]
    x, tb, exact = _exact(path, "empirical N=6 d=1", 0.6, 4)
    assert _relative(exact["data"], case.marginal(path).posterior_mean(x, tb)) <= 1e-12


# --- round trips ----------------------------------------------------------------------------------


@given(
    path=affine_paths(),
    t=st.floats(0.05, 0.95),
    pair=st.sampled_from(PAIRS),
    seed=st.integers(0, 2**16),
)
def test_round_trips(path, t, pair, seed):
    """from_velocity(to_velocity(value)) = value and back, <= 1e-9 relative (float64 roundoff
    times the conditioning 1/|a's − as'| and 1/a, 1/s on this time range)."""
    to_velocity, from_velocity = (getattr(path, name) for name in pair)
    tb = torch.full((4,), t, dtype=F64)
    a, da = path.signal_scale(tb), path.signal_scale_derivative(tb)
    det = da * path.noise_variance(tb) - a * path.noise_variance_rate(tb)
    assume(float(det.abs().min()) >= 1e-3)
    x, value = _draw((4, 3), seed), _draw((4, 3), seed + 1)
    assert _relative(from_velocity(to_velocity(value, x, tb), x, tb), value) <= 1e-9
    assert _relative(to_velocity(from_velocity(value, x, tb), x, tb), value) <= 1e-9


# --- singular points ------------------------------------------------------------------------------


def _degenerate_user_path():
    """a_t = t, s_t = 1 − t + 4t²: a'_t s_t = a_t s'_t exactly at t = 1/2 (1 − 4t² = 0)."""
    return cnftools.AffineGaussianPath(lambda t: t, lambda t: 1 - t + 4 * t**2)


SINGULAR = [
    (lambda: cnftools.OTPath(0.0), 1.0, "velocity_from_epsilon", "s_t = 0"),
    (lambda: cnftools.OTPath(0.0), 1.0, "velocity_from_data", "s_t = 0"),
    (lambda: cnftools.OTPath(0.0), 1.0, "data_from_velocity", "a_t' s_t = a_t s_t'"),
    (lambda: cnftools.OTPath(0.0), 1.0, "epsilon_from_velocity", "s_t = 0"),
    (lambda: cnftools.OTPath(0.0), 1.0, "score_from_velocity", "a_t' s_t = a_t s_t'"),
    (lambda: cnftools.OTPath(0.1), 0.0, "velocity_from_epsilon", "a_t = 0"),
    (lambda: cnftools.OTPath(0.1), 0.0, "velocity_from_score", "a_t = 0"),
    (lambda: cnftools.VPPath(0.1, 20.0), 1.0, "velocity_from_epsilon", "s_t = 0"),
    (lambda: cnftools.VPPath(0.1, 20.0), 1.0, "velocity_from_data", "s_t = 0"),
    (lambda: cnftools.VPPath(0.1, 20.0), 1.0, "epsilon_from_velocity", "s_t = 0"),
    (lambda: cnftools.VPPath(0.0, 5.0), 1.0, "data_from_velocity", "a_t' s_t = a_t s_t'"),
    (lambda: cnftools.VPPath(0.0, 5.0), 1.0, "score_from_velocity", "a_t' s_t = a_t s_t'"),
    (_degenerate_user_path, 0.5, "data_from_velocity", "a_t' s_t = a_t s_t'"),
    (_degenerate_user_path, 0.5, "epsilon_from_velocity", "a_t' s_t = a_t s_t'"),
    (_degenerate_user_path, 0.5, "score_from_velocity", "a_t' s_t = a_t s_t'"),
]


@pytest.mark.parametrize(("build", "t", "method", "why"), SINGULAR)
def test_singular_conversions_raise_naming_t_and_the_path(build, t, method, why):
    path = build()
    x = _draw((3, 2), 0)
    ts = torch.tensor([0.3, t, 0.7], dtype=F64)  # only the middle row is singular
    with pytest.raises(ValueError, match=rf"{method} is singular at t = \[{t}\]") as info:
        getattr(path, method)(_draw((3, 2), 1), x, ts)
    assert repr(path) in str(info.value)
    assert why in str(info.value)


@pytest.mark.parametrize(
    ("build", "t", "method"),
    [
        (lambda: cnftools.VPPath(0.1, 20.0), 1.0, "velocity_from_score"),
        (lambda: cnftools.VPPath(0.1, 20.0), 1.0, "data_from_velocity"),
        (lambda: cnftools.VPPath(0.1, 20.0), 1.0, "score_from_velocity"),
        (lambda: cnftools.OTPath(0.0), 0.0, "velocity_from_data"),
        (lambda: cnftools.VEPath(0.1, 5.0), 1.0, "velocity_from_epsilon"),
    ],
)
def test_conversions_defined_at_the_end_points_are_finite(build, t, method):
    """Where a formula does not divide by zero it is evaluated, e.g. VP's score at t = 1."""
    path = build()
    out = getattr(path, method)(_draw((3, 2), 1), _draw((3, 2), 0), t)
    assert bool(torch.isfinite(out).all())


def test_vp_data_from_velocity_at_t1_is_x():
    """At VP's t = 1 (s = 0, a = 1) the point is the data: x̂₁ = x whatever the velocity."""
    path = cnftools.VPPath(0.1, 20.0)
    x = _draw((4, 3), 0)
    assert torch.allclose(path.data_from_velocity(_draw((4, 3), 1), x, 1.0), x, atol=1e-15)


def test_overflow_raises_instead_of_returning_inf():
    path = cnftools.VPPath(0.1, 20.0)
    eps = torch.full((2, 2), 3e38, dtype=torch.float32)
    with pytest.raises(ValueError, match="overflowed"):
        path.velocity_from_epsilon(eps, torch.zeros(2, 2), 0.5)


# --- inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", TO_VELOCITY + FROM_VELOCITY)
def test_every_form_of_t_gives_the_same_result(method):
    path = cnftools.VPPath(0.1, 20.0)
    x, value = _draw((5, 2, 3), 0), _draw((5, 2, 3), 1)  # an image-like event (2, 3)
    convert = getattr(path, method)
    reference = convert(value, x, 0.4)
    for t in (torch.tensor(0.4, dtype=F64), torch.full((5,), 0.4, dtype=F64)):
        assert torch.equal(convert(value, x, t), reference)
    expanded = torch.tensor([0.4], dtype=F64).expand(5)
    assert torch.equal(convert(value, x, expanded), reference)


@pytest.mark.parametrize("method", TO_VELOCITY + FROM_VELOCITY)
def test_float32_matches_float64(method):
    """float32 within 1e-5 relative of float64 (eps32 times conversion factors <= ~30 here)."""
    path = cnftools.OTPath(0.05)
    x, value = _draw((8, 4), 0), _draw((8, 4), 1)
    t = torch.linspace(0.1, 0.9, 8, dtype=F64)
    expected = getattr(path, method)(value, x, t)
    got = getattr(path, method)(value.float(), x.float(), t.float())
    assert got.dtype == torch.float32
    assert _relative(got.double(), expected) <= 1e-5


def test_gradients_flow_through_a_conversion():
    path = cnftools.VEPath(0.1, 5.0)
    eps = _draw((3, 2), 0).requires_grad_(True)
    x = _draw((3, 2), 1).requires_grad_(True)
    path.velocity_from_epsilon(eps, x, 0.5).sum().backward()
    s = 0.1 * 50**0.5  # s_{1/2} of VE(0.1, 5)
    c = math.log(50)
    # u = -s s' score ... in eps form: (det / (a s)) with det = c s^2 -> -c s * eps
    assert torch.allclose(eps.grad, torch.full_like(eps, -c * s), rtol=1e-12)
    assert torch.allclose(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize(
    ("value", "x", "t", "error", "match"),
    [
        (torch.zeros(3, 2), torch.zeros(3, 3), 0.5, ValueError, "same shape"),
        (torch.zeros(3, 2), torch.zeros(3, 2, dtype=F64), 0.5, TypeError, "same dtype"),
        (torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), 0.5, TypeError, "eps"),
        (torch.full((3, 2), math.nan), torch.zeros(3, 2), 0.5, ValueError, "eps has non-finite"),
        (torch.zeros(3, 2), torch.full((3, 2), math.inf), 0.5, ValueError, "x has non-finite"),
        (torch.zeros(3, 2), torch.zeros(3, 2), 1.5, ValueError, r"t must lie in \[0.0, 1.0\]"),
        (torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(4), ValueError, "shape"),
    ],
)
def test_bad_input_is_named(value, x, t, error, match):
    with pytest.raises(error, match=match):
        cnftools.VEPath(0.1, 5.0).velocity_from_epsilon(value, x, t)
