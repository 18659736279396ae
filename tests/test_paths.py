"""Tests of cnftools.paths: Theorem 3, closed forms of theory §8, boundaries, densities, errors.

Theory sections cited here (pages under ``docs/theory/``):

- §8: ``docs/theory/paths.md#three-paths``
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

import cnftools
from cnftools.cases import PATH_CASES
from cnftools.paths import AffineGaussianPath
from cnftools.testing import assert_theorem3, builtin_paths, gaussian_paths, times

F64 = torch.float64
EVENT_SHAPES = [(1,), (3,), (8,), (2, 3), (1, 2, 2)]


def _draw(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- Theorem 3 -----------------------------------------------------------------------------------


@given(
    path=gaussian_paths(),
    t=times(margin=1e-3),
    event=st.sampled_from(EVENT_SHAPES),
    seed=st.integers(0, 2**16),
)
def test_theorem3_property(path, t, event, seed):
    """dψ_t/dt (forward-mode autograd) = u_t(ψ_t|x1), 1e-10 relative in float64 (issue 2).

    Both sides are exact formulas evaluated in float64, so only roundoff (≈1e-15, amplified by at
    most 1/s_t ≤ 1e3 near the singular end) separates them.
    """
    x1 = 3 * _draw((5, *event), seed)
    x0 = _draw((5, *event), seed + 1)
    assert_theorem3(path, x1, t, x0, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_theorem3_per_sample_times_float32(name):
    """Per-sample times (B,) in float32: tolerance 1e-4 (eps32 · 1/s_t with s_t ≥ 1e-2)."""
    case = PATH_CASES[name]
    x1 = _draw((32, 4), 0, torch.float32)
    t = torch.linspace(0, 0.99 if case.singular_at_one else 1.0, 32, dtype=torch.float32)
    assert_theorem3(case.build(), x1, t, rtol=1e-4)


def test_assert_theorem3_detects_a_wrong_field():
    """The checker must be able to fail: a path whose velocity is off by 1% is caught."""

    class WrongOT(cnftools.OTPath):
        def conditional_velocity(self, x, t, x1):
            return 1.01 * super().conditional_velocity(x, t, x1)

    with pytest.raises(AssertionError, match="Theorem 3 fails"):
        assert_theorem3(WrongOT(0.1), _draw((4, 3), 0), 0.4)


# --- closed forms of theory §8 --------------------------------------------------------------------


@given(sigma_min=st.floats(0.0, 0.5), t=st.floats(0.0, 0.999), seed=st.integers(0, 1000))
def test_ot_velocity_closed_form(sigma_min, t, seed):
    """OT: u = (x1 − (1 − σ_min) x) / (1 − (1 − σ_min) t) (theory §8 table), 1e-12 relative."""
    x, x1 = _draw((4, 3), seed), _draw((4, 3), seed + 1)
    expected = (x1 - (1 - sigma_min) * x) / (1 - (1 - sigma_min) * t)
    got = cnftools.OTPath(sigma_min).conditional_velocity(x, t, x1)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@given(
    sigma_min=st.floats(1e-3, 0.5),
    ratio=st.floats(2.0, 1e4),
    t=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_ve_velocity_closed_form(sigma_min, ratio, t, seed):
    """VE: u = −c (x − x1), c = ln(σ_max/σ_min) (theory §8 table), 1e-12 relative."""
    x, x1 = _draw((4, 3), seed), _draw((4, 3), seed + 1)
    path = cnftools.VEPath(sigma_min, sigma_min * ratio)
    expected = -math.log(ratio) * (x - x1)
    torch.testing.assert_close(path.conditional_velocity(x, t, x1), expected, rtol=1e-12, atol=0)


@given(
    beta_min=st.floats(0.0, 1.0),
    spread=st.floats(0.5, 30.0),
    t=st.floats(0.0, 0.999),
    seed=st.integers(0, 1000),
)
def test_vp_velocity_closed_form(beta_min, spread, t, seed):
    """VP: u = ½ β(1−t) α (x1 − α x)/(1 − α²), α = α_{1−t} (theory §8), 1e-10 relative.

    Computed here in plain Python math with the 1 − α² form (no expm1): cancellation costs up to
    eps/(1 − α²) ≲ 1e-12 on this range of t.
    """
    beta_max = beta_min + spread
    x, x1 = _draw((4, 3), seed), _draw((4, 3), seed + 1)
    s = 1 - t
    integral = beta_min * s + 0.5 * (beta_max - beta_min) * s**2
    beta = beta_min + s * (beta_max - beta_min)
    alpha = math.exp(-0.5 * integral)
    expected = 0.5 * beta * alpha * (x1 - alpha * x) / (1 - alpha**2)
    got = cnftools.VPPath(beta_min, beta_max).conditional_velocity(x, t, x1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


@given(path=builtin_paths(), t=times(margin=1e-6, singular_ends=False))
def test_analytic_schedule_derivatives_match_autograd(path, t):
    """Closed-form a_t' and s_t s_t' of OT/VE/VP equal autograd of a_t and ½ s_t², 1e-12 relative.

    The base-class (autograd) implementation is an independent computation of the same derivative.
    """
    tt = torch.tensor([t], dtype=F64)
    generic = AffineGaussianPath(path.signal_scale, path.noise_scale)
    torch.testing.assert_close(
        path.signal_scale_derivative(tt), generic.signal_scale_derivative(tt), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        path.noise_variance_rate(tt), generic.noise_variance_rate(tt), rtol=1e-9, atol=1e-12
    )


def test_vp_is_finite_and_accurate_next_to_t_equal_one():
    """VP near t = 1: s_t² by −expm1(−T) keeps full relative accuracy where 1 − α² would cancel.

    Reference: Python's math.expm1 on the same T(1 − t); tolerance 1e-14 relative (a few ulps).
    """
    path = cnftools.VPPath(0.1, 20.0)
    t = 1 - 1e-9
    s = 1 - t
    reference = -math.expm1(-(0.1 * s + 0.5 * 19.9 * s**2))
    got = float(path.noise_variance(torch.tensor([t], dtype=F64)))
    assert abs(got - reference) <= 1e-14 * reference
    x1 = _draw((3, 2), 0)
    u = path.conditional_velocity(path.sample(t, x1), t, x1)
    assert torch.isfinite(u).all()


# --- boundaries, densities, inverse, sampling -----------------------------------------------------


@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_boundary_conditions(name):
    """μ and σ at t = 0 and t = 1 equal theory §8's values (computed in cases.py with math), 1e-12."""
    case = PATH_CASES[name]
    path, x1 = case.build(), 2 * _draw((6, 3), 1)
    mean0, std0, mean1, std1 = case.boundary(x1)
    torch.testing.assert_close(path.mean(0.0, x1), mean0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        path.std(0.0, x1).expand_as(x1), std0.expand_as(x1), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(path.mean(1.0, x1), mean1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        path.std(1.0, x1).expand_as(x1), std1.expand_as(x1), rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_log_prob_against_scipy(name, dtype):
    """log p_t(x|x1) equals scipy.stats.norm summed over the event.

    float64: 1e-10 relative (roundoff); float32: 1e-5 relative (eps32 times a few operations).
    """
    path = PATH_CASES[name].build()
    x1, x0 = _draw((5, 2, 3), 2, dtype), _draw((5, 2, 3), 3, dtype)
    t = 0.37
    x = path.flow_map(x0, t, x1)
    mean, std = path.mean(t, x1), path.std(t, x1).expand_as(x1)
    expected = stats.norm.logpdf(x.double().numpy(), mean.double().numpy(), std.double().numpy())
    expected = torch.from_numpy(expected.reshape(5, -1).sum(axis=1)).to(dtype)
    got = path.log_prob(x, t, x1)
    assert got.shape == (5,) and got.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-10 if dtype == F64 else 1e-5, atol=0)


@given(path=gaussian_paths(), t=times(margin=1e-2), seed=st.integers(0, 1000))
def test_inverse_flow_map_inverts(path, t, seed):
    """ψ_t⁻¹(ψ_t(x0)) = x0 to 1e-12 (one affine map and its inverse; 1/s_t ≤ 1e2 amplification)."""
    x0, x1 = _draw((4, 2, 2), seed), _draw((4, 2, 2), seed + 1)
    x = path.flow_map(x0, t, x1)
    torch.testing.assert_close(path.inverse_flow_map(x, t, x1), x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_sample_moments(name):
    """Sample mean and std of 40 000 draws match mean(t, x1) and std(t, x1).

    The sample mean errs by σ/√n per coordinate and the sample std by about σ/√(2n); a bound of 5
    such standard errors has a false-alarm rate < 1e-5 per coordinate (the seed is fixed anyway).
    """
    path = PATH_CASES[name].build()
    n, t = 40_000, 0.6
    x1 = torch.tensor([[1.5, -2.0, 0.5]], dtype=F64).expand(n, 3).contiguous()
    draws = path.sample(t, x1, generator=torch.Generator().manual_seed(0))
    mean, std = path.mean(t, x1)[0], path.std(t, x1).expand_as(x1)[0]
    assert ((draws.mean(0) - mean).abs() <= 5 * std / math.sqrt(n)).all()
    assert ((draws.std(0) - std).abs() <= 5 * std / math.sqrt(2 * n)).all()


def test_sample_is_reproducible_with_a_generator():
    path, x1 = cnftools.OTPath(0.1), _draw((3, 2), 0)
    a = path.sample(0.5, x1, generator=torch.Generator().manual_seed(4))
    b = path.sample(0.5, x1, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_dtype_and_event_shape_follow_inputs(name, dtype):
    path = PATH_CASES[name].build()
    x1 = _draw((2, 3, 4, 4), 0, dtype)
    t = torch.tensor([0.2, 0.7], dtype=dtype)
    outputs = [
        path.mean(t, x1),
        path.flow_map(x1, t, x1),
        path.conditional_velocity(x1, t, x1),
        path.sample(t, x1),
    ]
    for out in outputs:
        assert out.shape == x1.shape and out.dtype == dtype
    assert path.log_prob(x1, t, x1).shape == (2,)


def test_works_under_no_grad():
    """Derivatives come from forward-mode autograd, which an outer no_grad must not disable."""
    path = PATH_CASES["x1-dependent std (user)"].build()
    x1 = _draw((3, 2), 0)
    with torch.no_grad():
        u = path.conditional_velocity(x1, 0.3, x1)
    expected = path.conditional_velocity(x1, 0.3, x1)
    torch.testing.assert_close(u, expected, rtol=0, atol=0)


# --- singular ends ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n, c in PATH_CASES.items() if c.singular_at_one])
@pytest.mark.parametrize("method", ["conditional_velocity", "log_prob", "inverse_flow_map"])
def test_singular_end_raises_clearly(name, method):
    """σ_1 = 0 (OT σ_min=0, VP): a ValueError naming the problem, never a silent NaN."""
    path, x1 = PATH_CASES[name].build(), _draw((2, 3), 0)
    with pytest.raises(ValueError, match="sigma_t\\(x1\\) = 0"):
        getattr(path, method)(x1 + 0.1, 1.0, x1)
    # The flow map itself is defined there: ψ_1(x0) = x1 (OT) or the VP end point.
    assert torch.isfinite(path.flow_map(x1, 1.0, x1)).all()


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: cnftools.OTPath(-0.1), "sigma_min must be in \\[0, 1\\)"),
        (lambda: cnftools.OTPath(1.0), "sigma_min must be in \\[0, 1\\)"),
        (lambda: cnftools.OTPath(float("nan")), "sigma_min"),
        (lambda: cnftools.VEPath(0.0, 1.0), "sigma_min must be > 0"),
        (lambda: cnftools.VEPath(1.0, 1.0), "sigma_max must be > sigma_min"),
        (lambda: cnftools.VEPath(2.0, 1.0), "sigma_max must be > sigma_min"),
        (lambda: cnftools.VPPath(-1.0, 20.0), "beta_min must be >= 0"),
        (lambda: cnftools.VPPath(5.0, 1.0), "beta_max must be >= beta_min"),
        (lambda: cnftools.VPPath(0.0, 0.0), "beta_max"),
    ],
)
def test_invalid_parameters_raise(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_parameter_of_wrong_type_raises():
    with pytest.raises(TypeError, match="sigma_min must be a real number"):
        cnftools.OTPath("0.1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mean must be a callable"):
        cnftools.GaussianPath(1.0, lambda t, x1: t)  # type: ignore[arg-type]


X1 = torch.zeros(4, 3, dtype=F64)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda p: p.mean(0.5, torch.zeros(3, dtype=F64)), ValueError, "x1 must have shape"),
        (lambda p: p.mean(0.5, torch.zeros(4, 3, dtype=torch.int64)), TypeError, "floating"),
        (lambda p: p.mean(0.5, [[0.0]]), TypeError, "x1 must be a torch.Tensor"),
        (lambda p: p.mean(1.5, X1), ValueError, "t must lie in \\[0.0, 1.0\\]"),
        (lambda p: p.mean(-0.1, X1), ValueError, "t must lie in"),
        (lambda p: p.mean(float("nan"), X1), ValueError, "t must be finite"),
        (lambda p: p.mean(torch.full((4,), 2.0, dtype=F64), X1), ValueError, "t must lie in"),
        (lambda p: p.mean(torch.zeros(3, dtype=F64), X1), ValueError, "shape \\(B,\\) = \\(4,\\)"),
        (lambda p: p.mean(torch.zeros(4, 1, dtype=F64), X1), ValueError, "t must be a scalar"),
        (lambda p: p.mean("0.5", X1), TypeError, "t must be a float"),
        (
            lambda p: p.mean(torch.tensor([0.1, float("nan"), 0.2, 0.3], dtype=F64), X1),
            ValueError,
            "t has non-finite values",
        ),
        (lambda p: p.mean(0.5, X1.clone().fill_(float("nan"))), ValueError, "x1 has non-finite"),
        (lambda p: p.flow_map(torch.zeros(4, 2, dtype=F64), 0.5, X1), ValueError, "same shape"),
        (lambda p: p.flow_map(torch.zeros(5, 3, dtype=F64), 0.5, X1), ValueError, "same shape"),
        (lambda p: p.flow_map(X1.float(), 0.5, X1), TypeError, "same dtype"),
        (
            lambda p: p.conditional_velocity(X1 + float("inf"), 0.5, X1),
            ValueError,
            "x has non-finite values .* batch rows \\[0, 1, 2, 3\\]",
        ),
        (lambda p: p.log_prob(torch.zeros(4, 3, 1, dtype=F64), 0.5, X1), ValueError, "same shape"),
    ],
)
def test_bad_input_raises_before_work(call, error, message):
    with pytest.raises(error, match=message):
        call(cnftools.OTPath(0.1))


def test_user_path_returning_negative_std_is_rejected():
    path = cnftools.GaussianPath(lambda t, x1: t * x1, lambda t, x1: t - 0.5)
    with pytest.raises(ValueError, match="std\\(t, x1\\) must be finite and >= 0"):
        path.std(0.1, X1)


# --- users' own paths: every form of t, one validation routine (issue 11.1, 11.8) ---------------

T_FORMS = {
    "float": lambda b: 0.3,
    "0-d": lambda b: torch.tensor(0.3, dtype=F64),
    "(B,)": lambda b: torch.full((b,), 0.3, dtype=F64),
    "expanded (B,)": lambda b: torch.tensor(0.3, dtype=F64).expand(b),
    "expanded 0-d view": lambda b: torch.tensor([0.3], dtype=F64).expand(b),
}
USER_PATHS = {
    "user affine": lambda: AffineGaussianPath(lambda t: t, lambda t: 1 - 0.9 * t),
    "user general": lambda: cnftools.GaussianPath(lambda t, x1: t * x1, lambda t, x1: 1 - 0.9 * t),
}


@pytest.mark.parametrize("form", sorted(T_FORMS))
@pytest.mark.parametrize("kind", sorted(USER_PATHS))
@pytest.mark.parametrize(
    "method", ["conditional_velocity", "mean_derivative", "variance_rate", "log_prob"]
)
def test_user_path_accepts_every_form_of_t(kind, form, method):
    """Regression (issue 11.1): an expanded t crashed forward-mode autograd ("more than one
    element of the written-to tensor refers to a single memory location"). Both paths are the OT
    path with sigma_min = 0.1, so every form of t must give OT's closed form to 1e-12 (float64
    roundoff of a few operations)."""
    path, reference = USER_PATHS[kind](), cnftools.OTPath(0.1)
    x1, x = _draw((4, 3), 1), _draw((4, 3), 2)
    t = T_FORMS[form](4)
    args = (t, x1) if method in ("mean_derivative", "variance_rate") else (x, t, x1)
    got = getattr(path, method)(*args)
    want = getattr(reference, method)(*(a if a is not t else 0.3 for a in args))
    torch.testing.assert_close(got, want.expand_as(got), rtol=1e-12, atol=1e-12)


def test_schedule_derivatives_accept_an_expanded_t():
    """Regression (issue 11.1): AffineGaussianPath.signal_scale_derivative on t.expand(B)."""
    path = AffineGaussianPath(lambda t: t**2, lambda t: 1 - 0.9 * t)
    t = torch.tensor(0.5, dtype=F64).expand(3)
    torch.testing.assert_close(path.signal_scale_derivative(t), torch.ones(3, dtype=F64))
    torch.testing.assert_close(
        path.noise_variance_rate(t), torch.full((3,), -0.9 * 0.55, dtype=F64)
    )


BAD_USER_PATHS = {
    "negative std": (
        cnftools.GaussianPath(lambda t, x1: t * x1, lambda t, x1: t - 0.5),
        ValueError,
        "std\\(t, x1\\) must be finite and >= 0",
    ),
    "(B, 1) mean": (
        cnftools.GaussianPath(lambda t, x1: t * x1.sum(1, keepdim=True), lambda t, x1: 1 - t),
        ValueError,
        "mean\\(t, x1\\) returned shape \\(4, 1\\); expected exactly x1's shape \\(4, 3\\)",
    ),
    "float std": (
        cnftools.GaussianPath(lambda t, x1: t * x1, lambda t, x1: 0.5),
        TypeError,
        "std\\(t, x1\\) must return a torch.Tensor .* got float",
    ),
    "(B,) std": (
        cnftools.GaussianPath(lambda t, x1: t * x1, lambda t, x1: 1 - t.reshape(-1)),
        ValueError,
        "std\\(t, x1\\) returned shape \\(4,\\); expected 2 dimensions",
    ),
    "float32 std": (
        cnftools.GaussianPath(lambda t, x1: t * x1, lambda t, x1: (1 - t).float()),
        TypeError,
        "std\\(t, x1\\) returned dtype torch.float32",
    ),
    "negative noise_scale": (
        AffineGaussianPath(lambda t: t, lambda t: t - 0.5),
        ValueError,
        "noise_scale\\(t\\) must be finite and >= 0",
    ),
}
PATH_METHODS = {
    "mean": lambda p: p.mean(0.25, X1),
    "std": lambda p: p.std(0.25, X1),
    "mean_derivative": lambda p: p.mean_derivative(0.25, X1),
    "variance_rate": lambda p: p.variance_rate(0.25, X1),
    "flow_map": lambda p: p.flow_map(X1, 0.25, X1),
    "inverse_flow_map": lambda p: p.inverse_flow_map(X1, 0.25, X1),
    "conditional_velocity": lambda p: p.conditional_velocity(X1, 0.25, X1),
    "log_prob": lambda p: p.log_prob(X1, 0.25, X1),
    "sample": lambda p: p.sample(0.25, X1),
}
# A broken mean is not read by std / variance_rate; a broken std not by mean / mean_derivative.
USES = {
    broken: set(PATH_METHODS)
    - ({"std", "variance_rate"} if "mean" in broken else {"mean", "mean_derivative"})
    for broken in BAD_USER_PATHS
}


@pytest.mark.parametrize(
    ("broken", "method"),
    [(b, m) for b in sorted(BAD_USER_PATHS) for m in sorted(PATH_METHODS) if m in USES[b]],
)
def test_user_path_checks_are_identical_in_every_method(broken, method):
    """Regression (issue 11.8): log_prob accepted a negative std that std refused; a (B, 1) mean
    was broadcast silently; a float std failed obscurely. Every method that reads the broken piece
    now raises the same error."""
    path, error, message = BAD_USER_PATHS[broken]
    with pytest.raises(error, match=message):
        PATH_METHODS[method](path)
