"""Tests of cnftools.marginals: closed-form marginal paths and fields (theory §5, §9, §10).

References are computed independently of the code under test: scipy.stats densities, explicit
posterior averages over the conditional path (cnftools.paths), 1-D quadrature (scipy.integrate.quad),
autograd Jacobians, and the continuity residual of theory §4.

Theory sections cited here (pages under ``docs/theory/``):

- §4: ``docs/theory/divergence-and-continuity.md#continuity-equation``
- §5: ``docs/theory/marginals.md#theorem-1``
- §7: ``docs/theory/paths.md#gaussian-conditional-paths``
- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, special, stats

import cnftools
from cnftools.cases import (
    AFFINE_PATH_CASES,
    DATA_CASES,
    PATH_CASES,
    DataCase,
    cosine_path,
    random_spd,
    x1_dependent_path,
)
from cnftools.continuity import continuity_terms
from cnftools.marginals import GaussianMarginal, MixtureMarginal
from cnftools.testing import builtin_paths, user_affine_paths

F64 = torch.float64
F32 = torch.float32
CASE_GRID = [(p, q) for p in sorted(AFFINE_PATH_CASES) for q in sorted(DATA_CASES)]


def _draw(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _times(n: int, t_max: float, seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    """n times in [0, t_max], both ends included (per-sample times, shape (n,))."""
    inner = torch.rand(n - 2, generator=torch.Generator().manual_seed(seed), dtype=F64) * t_max
    return torch.cat([torch.tensor([0.0, t_max], dtype=F64), inner]).to(dtype)


def _schedule(path, t: float) -> tuple[float, float, float, float]:
    """(a_t, a_t', s_t^2, s_t s_t') as Python floats, from the path's schedules."""
    tt = torch.tensor([t], dtype=F64)
    return (
        float(path.signal_scale(tt)),
        float(path.signal_scale_derivative(tt)),
        float(path.noise_variance(tt)),
        float(path.noise_variance_rate(tt)),
    )


def _scipy_log_prob(case: DataCase, path, x: np.ndarray, t: float) -> np.ndarray:
    """log p_t(x) from scipy.stats: N(a m, a² S + s² I) per component, logsumexp over them."""
    a, _, s2, _ = _schedule(path, t)
    p = {k: v.numpy() for k, v in case.parameters().items()}
    eye = np.eye(case.d)
    if case.kind == "gaussian":
        return stats.multivariate_normal(a * p["mean"], a**2 * p["cov"] + s2 * eye).logpdf(x)
    covs = p.get("covs", np.zeros((case.components, case.d, case.d)))
    parts = [
        np.log(w) + stats.multivariate_normal(a * m, a**2 * c + s2 * eye).logpdf(x)
        for w, m, c in zip(p["weights"], p["means"], covs, strict=True)
    ]
    return special.logsumexp(np.stack(parts, axis=-1).reshape(len(x), -1), axis=-1)


def _relative_residual(log_prob, v, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
    r"""theory §4 relative residual |r| / (|∂_t log p| + |div v| + |v·∇ log p|), per sample, by
    cnftools.continuity_relative_residual (autograd divergence, ``Exact()``, unless
    ``estimator=`` says)."""
    return cnftools.continuity_relative_residual(log_prob, v, x, t, **kw)


def _jacobian_trace(v, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """div v by the trace of torch.autograd.functional.jacobian (rows of v are independent)."""
    jac = torch.autograd.functional.jacobian(lambda y: v(y, t).sum(dim=0), x)  # (d, B, d)
    return torch.einsum("ibi->b", jac)


# --- log p_t against scipy ------------------------------------------------------------------------


@pytest.mark.parametrize(("path_name", "data_name"), CASE_GRID)
def test_log_prob_matches_scipy(path_name, data_name, dtype):
    """log p_t = log N(a_t m, a_t² S + s_t² I) (mixtures: logsumexp), per theory §9–§10.

    float64: 1e-10 relative + 1e-10 absolute (two exact formulas, roundoff only; scipy's own
    Cholesky route included). float32: 1e-4 relative + 1e-4 absolute (eps32 ≈ 1.2e-7 times
    Mahalanobis terms of up to ~1e2 nats and cancellation in log-sum-exp).
    """
    case, path_case = DATA_CASES[data_name], AFFINE_PATH_CASES[path_name]
    path = path_case.build()
    marginal = case.marginal(path, dtype=dtype)
    x = 2 * _draw((6, case.d), 1)
    tol = 1e-10 if dtype == F64 else 1e-4
    for t in (0.0, 0.37, case.t_max(path_case)):
        expected = _scipy_log_prob(case, path, x.numpy(), t)
        got = marginal.log_prob(x.to(dtype), t)
        assert got.dtype == dtype
        np.testing.assert_allclose(got.double().numpy(), expected, rtol=tol, atol=tol)


def test_distribution_objects_match_log_prob(dtype):
    """distribution(t) (MultivariateNormal / MixtureSameFamily) scores like log_prob: 1e-12
    float64 (same formula, different Cholesky route), 1e-4 float32; prior() is distribution(0)."""
    tol = 1e-12 if dtype == F64 else 1e-4
    path = cnftools.VPPath(0.1, 20.0)
    x = _draw((7, 3), 2, dtype)
    for name in ("gaussian d=3", "empirical N=40 d=3 (weighted)"):
        marginal = DATA_CASES[name].marginal(path, dtype=dtype)
        for t in (0.0, 0.5, 0.9):
            dist = marginal.distribution(torch.tensor(t, dtype=dtype))
            torch.testing.assert_close(
                dist.log_prob(x), marginal.log_prob(x, t), rtol=tol, atol=tol
            )
        torch.testing.assert_close(
            marginal.prior().log_prob(x), marginal.log_prob(x, 0.0), rtol=tol, atol=tol
        )
    mix = DATA_CASES["mixture K=4 d=2"].marginal(path, dtype=dtype)
    y = _draw((5, 2), 3, dtype)
    torch.testing.assert_close(
        mix.distribution(0.3).log_prob(y), mix.log_prob(y, 0.3), rtol=tol, atol=tol
    )


# --- u_t against its definition (Theorem 1's formula) -----------------------------------------------


@pytest.mark.parametrize("path_name", sorted(AFFINE_PATH_CASES))
@pytest.mark.parametrize("data_name", ["empirical N=6 d=1", "empirical N=40 d=3 (weighted)"])
def test_empirical_velocity_is_posterior_average(path_name, data_name):
    """u_t(x) = Σ_i w_i u_t(x|x1ⁱ), w ∝ q_i p_t(x|x1ⁱ), built from path.conditional_velocity and
    path.log_prob. 1e-11 relative to max|u| (float64 roundoff, amplified by s s'/s² ≤ ~1e2)."""
    case, path_case = DATA_CASES[data_name], AFFINE_PATH_CASES[path_name]
    path = path_case.build()
    p = case.parameters()
    marginal = case.marginal(path, chunk_size=4)
    batch = 9
    x = 2 * _draw((batch, case.d), 4)
    t = _times(batch, case.t_max(path_case), 5)
    log_w = torch.stack(
        [
            path.log_prob(x, t, point.expand(batch, -1)) + torch.log(w)
            for point, w in zip(p["means"], p["weights"], strict=True)
        ],
        dim=1,
    )
    weights = torch.softmax(log_w, dim=1)
    expected = sum(
        weights[:, i : i + 1] * path.conditional_velocity(x, t, point.expand(batch, -1))
        for i, point in enumerate(p["means"])
    )
    got = marginal.velocity(x, t)
    assert float((got - expected).abs().max()) <= 1e-11 * float(expected.abs().max())
    torch.testing.assert_close(
        marginal.log_prob(x, t), torch.logsumexp(log_w, dim=1), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("path_name", sorted(AFFINE_PATH_CASES))
@pytest.mark.parametrize("data_name", ["gaussian d=1", "mixture K=3 d=1"])
def test_velocity_matches_quadrature_1d(path_name, data_name):
    r"""d = 1: u_t(x) = ∫ u_t(x|x1) p_t(x|x1) q(x1) dx1 / ∫ p_t(x|x1) q(x1) dx1 by scipy.quad.

    The integrand uses u_t(x|x1) = (ss'/s²)(x − a x1) + a' x1 (theory §7) with scipy densities.
    Tolerance 1e-8 relative: quad's epsrel is 1e-11, so the ratio of two integrals is good to
    ~1e-10; the rest is margin. Times stay in [0.05, 0.9] so the posterior is never a spike quad
    could step over.
    """
    case, path = DATA_CASES[data_name], AFFINE_PATH_CASES[path_name].build()
    p = {k: v.numpy() for k, v in case.parameters().items()}
    if case.kind == "gaussian":
        comps = [(1.0, p["mean"][0], math.sqrt(p["cov"][0, 0]))]
    else:
        comps = [
            (w, m[0], math.sqrt(c[0, 0]))
            for w, m, c in zip(p["weights"], p["means"], p["covs"], strict=True)
        ]
    lo = min(m - 12 * s for _, m, s in comps)
    hi = max(m + 12 * s for _, m, s in comps)
    marginal = case.marginal(path)
    for t, xv in [(0.05, -1.3), (0.4, 0.7), (0.9, 2.1)]:
        a, da, s2, rate = _schedule(path, t)

        def density(x1: float, xv: float = xv, a: float = a, s2: float = s2) -> float:
            q = sum(w * stats.norm.pdf(x1, m, s) for w, m, s in comps)
            return stats.norm.pdf(xv, a * x1, math.sqrt(s2)) * q

        def flux(x1: float, xv: float = xv, a: float = a, da: float = da, s2: float = s2,
                 rate: float = rate) -> float:  # fmt: skip
            return (rate / s2 * (xv - a * x1) + da * x1) * density(x1)

        opts = {"epsabs": 0.0, "epsrel": 1e-11, "limit": 500, "points": [xv / max(a, 1e-3)]}
        opts["points"] = [pt for pt in opts["points"] if lo < pt < hi]
        mass = integrate.quad(density, lo, hi, **opts)[0]
        expected_u = integrate.quad(flux, lo, hi, **opts)[0] / mass
        x = torch.tensor([[xv]], dtype=F64)
        got_u = float(marginal.velocity(x, t)[0, 0])
        assert abs(got_u - expected_u) <= 1e-8 * max(1.0, abs(expected_u)), (t, got_u, expected_u)
        assert abs(float(marginal.log_prob(x, t)[0]) - math.log(mass)) <= 1e-8


# --- Theorem 1: the marginal field generates the marginal path --------------------------------------


@pytest.mark.parametrize(("path_name", "data_name"), CASE_GRID)
def test_theorem1_continuity(path_name, data_name):
    """∂_t log p + div u + u·∇log p = 0 for the closed-form (p_t, u_t): relative residual ≤ 1e-10
    (float64; exact formulas, observed ~1e-14), with the divergence by autograd and closed form. Negative control: 1.05·u gives > 1e-3 (the residual
    is then 0.05·∂_t log p, a few percent of the normaliser at these points)."""
    case, path_case = DATA_CASES[data_name], AFFINE_PATH_CASES[path_name]
    marginal = case.marginal(path_case.build(), chunk_size=16)
    batch = 8
    x = 1.5 * _draw((batch, case.d), 6)
    t = _times(batch, case.t_max(path_case), 7)
    rel = _relative_residual(marginal.log_prob, marginal.velocity, x, t)
    assert float(rel.max()) <= 1e-10
    # the same with the marginal's own closed-form divergence (found via cnftools.fields)
    rel_closed = _relative_residual(
        marginal.log_prob, marginal, x, t, estimator=cnftools.ClosedForm()
    )
    assert float(rel_closed.max()) <= 1e-10
    # the absolute residual, against the scale of its terms (continuity_terms)
    r = cnftools.continuity_residual(marginal.log_prob, marginal.velocity, x, t)
    scale = continuity_terms(marginal.log_prob, marginal.velocity, x, t).scale
    assert bool((r.abs() <= 1e-10 * scale).all())
    wrong = _relative_residual(marginal.log_prob, lambda y, s: 1.05 * marginal(y, s), x, t)
    assert float(wrong.max()) > 1e-3


@pytest.mark.parametrize("data_name", ["gaussian d=3", "mixture K=4 d=2", "empirical N=6 d=1"])
def test_theorem1_continuity_float32(data_name):
    """float32: relative residual ≤ 1e-3 (eps32 ≈ 1.2e-7 amplified by autograd through log-sum-exp
    and by terms of size up to ~1e3 that cancel); the 1.05·u control still gives > 1e-2."""
    case = DATA_CASES[data_name]
    marginal = case.marginal(cnftools.OTPath(0.1), dtype=F32)
    x = 1.5 * _draw((16, case.d), 8, F32)
    t = _times(16, 1.0, 9, F32)
    assert float(_relative_residual(marginal.log_prob, marginal, x, t).max()) <= 1e-3
    wrong = _relative_residual(marginal.log_prob, lambda y, s: 1.05 * marginal(y, s), x, t)
    assert float(wrong.max()) > 1e-2


@st.composite
def _random_case(draw: st.DrawFn) -> DataCase:
    kind = draw(st.sampled_from(["gaussian", "mixture", "empirical"]))
    d = draw(st.integers(1, 4))
    k = 1 if kind == "gaussian" else draw(st.integers(1, 12))
    return DataCase(kind, d, k, seed=draw(st.integers(0, 2**16)))


@given(
    case=_random_case(),
    path=st.one_of(builtin_paths(), user_affine_paths()),
    t=st.floats(0.0, 0.97),
    seed=st.integers(0, 2**16),
)
def test_theorem1_property(case, path, t, seed):
    """Random d, data, path, t (ci profile): continuity relative residual ≤ 1e-9 (float64; the
    random VE paths reach σ_max/σ_min = 1e4, so terms up to ~1e8 cancel: eps · 1e8 / 1e2 margin);
    closed-form divergence = trace of the autograd Jacobian to 1e-9 relative (same reason)."""
    marginal = case.marginal(path, chunk_size=5)
    x = 1.5 * _draw((4, case.d), seed)
    tt = torch.full((4,), t, dtype=F64)
    assert float(_relative_residual(marginal.log_prob, marginal.velocity, x, tt).max()) <= 1e-9
    div = marginal.divergence(x, tt)
    ref = _jacobian_trace(marginal.velocity, x, tt)
    assert float((div - ref).abs().max()) <= 1e-9 * max(1.0, float(ref.abs().max()))


# --- divergence ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("path_name", "data_name"), CASE_GRID)
def test_divergence_matches_jacobian_trace(path_name, data_name):
    """Closed-form div u (theory §9–§10) = tr ∂u/∂x by torch.autograd.functional.jacobian: 1e-10
    relative to max(1, max|div|) in float64 (observed ~1e-15)."""
    case, path_case = DATA_CASES[data_name], AFFINE_PATH_CASES[path_name]
    marginal = case.marginal(path_case.build(), chunk_size=7)
    x = 1.5 * _draw((6, case.d), 10)
    t = _times(6, case.t_max(path_case), 11)
    div = marginal.divergence(x, t)
    ref = _jacobian_trace(marginal.velocity, x, t)
    assert float((div - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize(
    "name", ["gaussian d=8", "mixture K=4 d=2", "empirical N=40 d=3 (weighted)"]
)
@pytest.mark.parametrize("strategy", ["auto", "loop"])
def test_divergence_matches_cnftools_divergence(name, strategy):
    """Against cnftools.divergence(..., Exact(strategy)), independent autograd code: 1e-10
    relative (float64 roundoff). Exact() is passed explicitly: the default (None) would take the
    marginal's own closed form and compare it with itself."""
    case = DATA_CASES[name]
    marginal = case.marginal(cnftools.OTPath(0.1))
    x, t = _draw((5, case.d), 12), _times(5, 1.0, 13)
    ref = cnftools.divergence(marginal.velocity, x, t, cnftools.Exact(strategy))
    div = marginal.divergence(x, t)
    assert float((div - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))
    # the default takes the closed form: the same numbers as the method itself
    assert torch.equal(cnftools.divergence(marginal, x, t), div)


def test_closed_form_divergence_is_discoverable():
    """cnftools.fields.closed_form_divergence finds the method on the marginal and on its bound
    velocity (when fields.py exists)."""
    fields = pytest.importorskip("cnftools.fields")
    marginal = DATA_CASES["gaussian d=3"].marginal(cnftools.OTPath(0.0))
    for field in (marginal, marginal.velocity):
        found = fields.closed_form_divergence(field)
        assert found is not None
        x = _draw((3, 3), 14)
        torch.testing.assert_close(found(x, 0.3), marginal.divergence(x, 0.3))


# --- the Gaussian flow map φ_t ---------------------------------------------------------------------


@pytest.mark.parametrize("path_name", sorted(AFFINE_PATH_CASES))
def test_gaussian_flow_map(path_name):
    """φ_t (theory §9): dφ/dt = u_t(φ) by autograd (1e-10 relative), φ pushes p_0 to p_t by change of
    variables, log p_t(φ(z)) + log det ∂φ/∂z = log p_0(z) (1e-10 absolute, nats), the log-det matches
    slogdet of the autograd Jacobian (1e-10), and φ_{t0→t} composes (1e-10)."""
    path = AFFINE_PATH_CASES[path_name].build()
    marginal = DATA_CASES["gaussian d=3"].marginal(path)
    z = _draw((6, 3), 15)
    t = _times(6, 1.0, 16).requires_grad_(True)
    phi = marginal.flow(z, t)
    dphi = torch.stack(
        [torch.autograd.grad(phi[:, j].sum(), t, retain_graph=True)[0] for j in range(3)], dim=1
    )
    u = marginal.velocity(phi.detach(), t.detach())
    assert float((dphi - u).abs().max()) <= 1e-10 * max(1.0, float(u.abs().max()))
    for s in (0.0, 0.3, 1.0):
        phi_s = marginal.flow(z, s)
        log_det = marginal.flow_log_det(s)
        jac = torch.autograd.functional.jacobian(lambda y, s=s: marginal.flow(y, s)[0], z[:1])
        ref_det = torch.linalg.slogdet(jac.reshape(3, 3))[1]
        assert abs(float(log_det - ref_det)) <= 1e-10
        change = marginal.log_prob(phi_s, s) + log_det
        torch.testing.assert_close(change, marginal.log_prob(z, 0.0), rtol=0, atol=1e-10)
    twice = marginal.flow(marginal.flow(z, 0.4), 0.9, t0=0.4)
    torch.testing.assert_close(twice, marginal.flow(z, 0.9), rtol=1e-10, atol=1e-10)
    back = marginal.flow(marginal.flow(z, 1.0), 0.0, t0=1.0)
    torch.testing.assert_close(back, z, rtol=1e-10, atol=1e-10)


# --- sampling -------------------------------------------------------------------------------------


def _sample_moments_ok(sample: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Sample mean and covariance within 5 standard errors, each error estimated from the sample
    itself (SE of a mean: sd/√n; of a covariance entry: sd of (x_i − μ_i)(x_j − μ_j) over √n).
    Five SEs: a false alarm has probability < 1e-5 per entry (the draw is seeded anyway)."""
    n = sample.shape[0]
    centred = sample - mean
    se_mean = sample.std(dim=0) / math.sqrt(n)
    assert bool(((sample.mean(dim=0) - mean).abs() <= 5 * se_mean).all())
    products = centred[:, :, None] * centred[:, None, :]
    se_cov = products.std(dim=0) / math.sqrt(n)
    assert bool(((products.mean(dim=0) - cov).abs() <= 5 * se_cov).all())


@pytest.mark.parametrize("data_name", ["gaussian d=3", "mixture K=4 d=2", "empirical N=6 d=1"])
@pytest.mark.parametrize("path_name", ["OT(sigma_min=0)", "VP(0.1, 20)", "VE(0.1, 5)"])
def test_sample_moments(data_name, path_name):
    """Mean a_t Σπ_k m_k and covariance Σπ_k(a²S_k + s²I + a² m_k m_kᵀ) − μμᵀ of p_t (theory §10),
    within 5 sample standard errors (n = 20000)."""
    case, path_case = DATA_CASES[data_name], PATH_CASES[path_name]
    path = path_case.build()
    marginal = case.marginal(path)
    p = case.parameters()
    t = 0.6
    a, _, s2, _ = _schedule(path, t)
    if case.kind == "gaussian":
        means, covs, weights = p["mean"][None], p["cov"][None], torch.ones(1, dtype=F64)
    else:
        means, weights = p["means"], p["weights"]
        covs = p.get("covs", torch.zeros(case.components, case.d, case.d, dtype=F64))
    mean = a * (weights[:, None] * means).sum(0)
    second = (
        weights[:, None, None]
        * (
            a**2 * covs
            + s2 * torch.eye(case.d, dtype=F64)
            + a**2 * means[:, :, None] * means[:, None]
        )
    ).sum(0)
    sample = marginal.sample(20000, t, generator=torch.Generator().manual_seed(17))
    assert sample.shape == (20000, case.d) and sample.dtype == F64
    _sample_moments_ok(sample, mean, second - mean[:, None] * mean[None])


def test_sample_per_sample_times_and_reproducible():
    """t of shape (n,) is accepted; the same generator seed gives the same draw; at s_t = 0
    (OT σ_min = 0, t = 1) empirical draws are data points exactly."""
    case = DATA_CASES["empirical N=6 d=1"]
    marginal = case.marginal(cnftools.OTPath(0.0))
    t = torch.linspace(0, 1, 50, dtype=F64)
    a = marginal.sample(50, t, generator=torch.Generator().manual_seed(1))
    b = marginal.sample(50, t, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (50, 1)
    ends = marginal.sample(20, 1.0, generator=torch.Generator().manual_seed(2))
    points = case.parameters()["means"][:, 0]
    assert bool((ends[:, 0, None] == points[None]).any(dim=1).all())


# --- chunking, dtype, numerics ----------------------------------------------------------------------


@pytest.mark.parametrize("data_name", ["mixture K=4 d=2", "empirical N=40 d=3 (weighted)"])
@pytest.mark.parametrize("chunk_size", [1, 3, 17])
def test_chunked_equals_unchunked(data_name, chunk_size):
    """Streaming over chunks (online softmax, pairwise-merged moments) equals one chunk: 1e-12
    relative (only the summation order differs)."""
    case = DATA_CASES[data_name]
    path = cnftools.VPPath(0.1, 20.0)
    whole = case.marginal(path, chunk_size=10_000)
    chunked = case.marginal(path, chunk_size=chunk_size)
    x, t = 2 * _draw((7, case.d), 18), _times(7, 0.95, 19)
    for method in ("log_prob", "velocity", "divergence", "score"):
        torch.testing.assert_close(
            getattr(chunked, method)(x, t), getattr(whole, method)(x, t), rtol=1e-12, atol=1e-12
        )


def test_large_empirical_dataset_is_chunked():
    """N = 6000 points, B = 32, d = 16 streamed 500 at a time (12 chunks; (B, N, d) would be 3M
    elements): equals a direct, unchunked posterior average (float64, 1e-10 relative)."""
    data = _draw((6000, 16), 20)
    path = cnftools.OTPath(0.2)
    marginal = MixtureMarginal(path, data, chunk_size=500)
    x, t = _draw((32, 16), 21), 0.8
    a, _, s2, _ = _schedule(path, t)
    log_w = -((x[:, None] - a * data[None]) ** 2).sum(-1) / (2 * s2)  # reference, unchunked
    x1_hat = torch.softmax(log_w, dim=1) @ data
    expected = path.conditional_velocity(x, t, x1_hat)  # u is affine in x1 (theory §10)
    torch.testing.assert_close(marginal.velocity(x, t), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("data_name", ["gaussian d=8", "mixture K=4 d=2", "empirical N=6 d=1"])
def test_float32_follows_input_and_matches_float64(data_name):
    """float32 inputs give float32 outputs within 1e-4 relative of the float64 values (eps32 times
    condition numbers ≤ 8 and log-sum-exp cancellation)."""
    case = DATA_CASES[data_name]
    path = cnftools.OTPath(0.1)
    m64, m32 = case.marginal(path), case.marginal(path, dtype=F32)
    x = _draw((5, case.d), 22)
    for method in ("log_prob", "velocity", "divergence"):
        ref = getattr(m64, method)(x, 0.6)
        got = getattr(m32, method)(x.float(), 0.6)
        assert got.dtype == F32
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    # float64 parameters are cast to the input's dtype as well
    assert m64.velocity(x.float(), 0.6).dtype == F32


def test_stable_far_from_the_data_and_near_singular_ends():
    """log p_t far in the tail (|x| = 1e3, s_t = 0.1) stays finite (log-sum-exp); the Gaussian
    marginal is finite at OT σ_min=0 and VP at t = 1, where s_t = 0 but a_t² S is SPD."""
    emp = DATA_CASES["empirical N=40 d=3 (weighted)"].marginal(cnftools.OTPath(0.1))
    far = torch.full((2, 3), 1e3, dtype=F64)
    assert bool(torch.isfinite(emp.log_prob(far, 1.0)).all())
    assert bool(torch.isfinite(emp.velocity(far, 1.0)).all())
    for path in (cnftools.OTPath(0.0), cnftools.VPPath(0.1, 20.0)):
        gauss = DATA_CASES["gaussian d=3"].marginal(path)
        x = _draw((3, 3), 23)
        for method in ("log_prob", "velocity", "divergence", "score"):
            assert bool(torch.isfinite(getattr(gauss, method)(x, 1.0)).all())


@pytest.mark.parametrize("path", [cnftools.OTPath(0.0), cnftools.VPPath(0.1, 20.0)])
@pytest.mark.parametrize("method", ["log_prob", "velocity", "divergence", "score"])
def test_empirical_at_zero_noise_raises(path, method):
    """Empirical p_t at s_t = 0 is a sum of point masses: ValueError naming the cause, not NaN."""
    marginal = DATA_CASES["empirical N=6 d=1"].marginal(path)
    with pytest.raises(ValueError, match="s_t = 0"):
        getattr(marginal, method)(torch.zeros(2, 1, dtype=F64), torch.tensor([0.5, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="s_t = 0"):
        marginal.distribution(1.0)


def test_degenerate_gaussian_raises():
    """a_t = s_t = 0 makes p_t a point mass: ValueError."""
    path = cnftools.AffineGaussianPath(lambda t: 1 - t, lambda t: 1 - t)
    marginal = DATA_CASES["gaussian d=3"].marginal(path)
    with pytest.raises(ValueError, match="a_t = s_t = 0"):
        marginal.velocity(torch.zeros(1, 3, dtype=F64), 1.0)


# --- bad inputs -----------------------------------------------------------------------------------


def _spd(d: int) -> torch.Tensor:
    return random_spd(d, torch.Generator().manual_seed(0))


BAD_GAUSSIAN = [
    (torch.zeros(3, dtype=F64), torch.diag(torch.tensor([1.0, 1.0, -0.1], dtype=F64)), ValueError),
    (torch.zeros(3, dtype=F64), torch.zeros(3, 3, dtype=F64), ValueError),
    (torch.zeros(2, dtype=F64), torch.tensor([[1.0, 0.5], [0.2, 1.0]], dtype=F64), ValueError),
    (torch.zeros(3, 1, dtype=F64), _spd(3), ValueError),
    (torch.zeros(3, dtype=F64), _spd(2), ValueError),
    (torch.zeros(3, dtype=F64), torch.full((3, 3), math.nan, dtype=F64), ValueError),
    (torch.zeros(3, dtype=torch.int64), _spd(3), TypeError),
    ([0.0, 0.0], _spd(2), TypeError),
]


@pytest.mark.parametrize(("mean", "cov", "error"), BAD_GAUSSIAN)
def test_gaussian_bad_parameters_raise(mean, cov, error):
    """Non-SPD, asymmetric, wrongly shaped, non-finite or non-float parameters raise at construction."""
    with pytest.raises(error):
        GaussianMarginal(cnftools.OTPath(), mean, cov)


BAD_MIXTURE = [
    ({"weights": torch.tensor([0.5, -0.1, 0.6], dtype=F64)}, ValueError, ">= 0"),
    ({"weights": torch.zeros(3, dtype=F64)}, ValueError, "positive sum"),
    ({"weights": torch.ones(2, dtype=F64)}, ValueError, "shape"),
    ({"weights": torch.tensor([1.0, math.inf, 1.0], dtype=F64)}, ValueError, "non-finite"),
    ({"covs": torch.eye(2, dtype=F64).expand(2, 2, 2)}, ValueError, "shape"),
    ({"covs": -torch.eye(2, dtype=F64).expand(3, 2, 2)}, ValueError, "positive definite"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, TypeError, "chunk_size"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_MIXTURE)
def test_mixture_bad_parameters_raise(kwargs, error, match):
    """Negative / zero-sum / non-finite / wrongly shaped weights, non-SPD covs, bad chunk sizes."""
    means = _draw((3, 2), 24)
    with pytest.raises(error, match=match):
        MixtureMarginal(cnftools.OTPath(), means, **kwargs)


def test_mixture_means_shape_and_weights_normalised():
    """means must be (K, d); weights are normalised and zero-weight components dropped."""
    with pytest.raises(ValueError, match=r"\(K, d\)"):
        MixtureMarginal(cnftools.OTPath(), torch.zeros(3, dtype=F64))
    data = _draw((3, 2), 25)
    m = MixtureMarginal(
        cnftools.OTPath(0.1), data, weights=torch.tensor([2.0, 0.0, 6.0], dtype=F64)
    )
    assert m.num_components == 2
    torch.testing.assert_close(m.weights, torch.tensor([0.25, 0.75], dtype=F64))


@pytest.mark.parametrize("path", [x1_dependent_path(), "OT", None])
def test_non_affine_path_raises(path):
    """Closed forms need μ_t = a_t x1, σ_t = s_t: a TypeError names AffineGaussianPath."""
    with pytest.raises(TypeError, match="AffineGaussianPath"):
        GaussianMarginal(path, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
    with pytest.raises(TypeError, match="AffineGaussianPath"):
        MixtureMarginal(path, torch.zeros(2, 2, dtype=F64))


@pytest.mark.parametrize(
    ("x", "t", "error"),
    [
        (torch.zeros(4, 2, dtype=F64), 0.5, ValueError),  # wrong d
        (torch.zeros(3, dtype=F64), 0.5, ValueError),  # no batch dim
        (torch.zeros(2, 3, 1, dtype=F64), 0.5, ValueError),  # not (B, d)
        (torch.full((2, 3), math.nan, dtype=F64), 0.5, ValueError),
        (torch.zeros(2, 3, dtype=F64), 1.5, ValueError),
        (torch.zeros(2, 3, dtype=F64), torch.zeros(3, dtype=F64), ValueError),
        (torch.zeros(2, 3, dtype=torch.int64), 0.5, TypeError),
    ],
)
def test_bad_call_arguments_raise(x, t, error):
    """x must be finite float (B, d); t a scalar or (B,) in [0, 1]."""
    marginal = DATA_CASES["gaussian d=3"].marginal(cosine_path())
    for method in ("log_prob", "velocity", "divergence"):
        with pytest.raises(error):
            getattr(marginal, method)(x, t)


@pytest.mark.parametrize("data_name", ["gaussian d=3", "mixture K=4 d=2", "empirical N=6 d=1"])
def test_score_matches_autograd(data_name):
    """score(x, t) = ∇_x log p_t(x) by autograd of log_prob: 1e-10 relative (float64 roundoff)."""
    case = DATA_CASES[data_name]
    marginal = case.marginal(cnftools.VEPath(0.1, 5.0), chunk_size=3)
    x = (2 * _draw((6, case.d), 26)).requires_grad_(True)
    t = _times(6, 1.0, 27)
    (ref,) = torch.autograd.grad(marginal.log_prob(x, t).sum(), x)
    got = marginal.score(x.detach(), t)
    assert float((got - ref).abs().max()) <= 1e-10 * max(1.0, float(ref.abs().max()))


# --- the same checks through the public testing kit (cnftools.testing) ----------------------------


@pytest.mark.parametrize("data_name", sorted(DATA_CASES))
@pytest.mark.parametrize("path_name", ["OT(sigma_min=0.1)", "VE(0.1, 5)", "VP(0.1, 20)"])
def test_theorem1_through_the_testing_kit(data_name, path_name):
    """Theorem 1 via ``assert_generates`` and the closed-form divergence via
    ``assert_divergence_matches_jacobian``: the kit's float64 defaults (1e-9 relative residual,
    1e-10 relative to max|J|·d) hold with a large margin on every shared data case."""
    from cnftools.testing import assert_divergence_matches_jacobian, assert_generates

    case = DATA_CASES[data_name]
    marginal = case.marginal(AFFINE_PATH_CASES[path_name].build())
    t = 0.6
    x = marginal.sample(16, t, torch.Generator().manual_seed(11))
    assert_generates(marginal.log_prob, marginal, x, t)
    assert_divergence_matches_jacobian(marginal, x, t)


def test_parameters_of_mixed_dtypes_are_refused():
    path = cnftools.OTPath(0.1)
    with pytest.raises(TypeError, match="mean and cov must have one dtype"):
        GaussianMarginal(
            path, torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float32)
        )
    with pytest.raises(TypeError, match="covs must have the means' dtype and device"):
        MixtureMarginal(
            path, torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float32)[None]
        )


# --- one pass: velocity and divergence together (issue #12.6) -------------------------------------

T_FORMS = ["float", "0-d", "(B,)", "expanded (B,)"]


def _time_form(form: str, value: float, batch: int, dtype: torch.dtype):
    if form == "float":
        return value
    if form == "0-d":
        return torch.tensor(value, dtype=dtype)
    if form == "(B,)":
        return torch.full((batch,), value, dtype=dtype)
    return torch.tensor(value, dtype=dtype).expand(batch)


@pytest.mark.parametrize(("path_name", "data_name"), CASE_GRID)
def test_velocity_and_divergence_equal_the_separate_passes(path_name, data_name):
    """One pass gives the numbers of velocity() and divergence() called separately: 1e-12
    relative in float64 (the same formulas on the same inputs; only shared intermediates), and the
    divergence equals the autograd Jacobian trace (1e-10 relative, roundoff)."""
    case, path_case = DATA_CASES[data_name], AFFINE_PATH_CASES[path_name]
    marginal = case.marginal(path_case.build(), chunk_size=5)
    x = 1.5 * _draw((7, case.d), 40)
    t = _times(7, case.t_max(path_case), 41)
    u, div = marginal.velocity_and_divergence(x, t)
    u_ref, div_ref = marginal.velocity(x, t), marginal.divergence(x, t)
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12 * float(u_ref.abs().max()))
    torch.testing.assert_close(div, div_ref, rtol=1e-12, atol=1e-12 * float(div_ref.abs().max()))
    jac = _jacobian_trace(marginal.velocity, x, t)
    assert float((div - jac).abs().max()) <= 1e-10 * max(1.0, float(jac.abs().max()))


@pytest.mark.parametrize("form", T_FORMS)
@pytest.mark.parametrize("data_name", ["gaussian d=3", "mixture K=4 d=2", "empirical N=6 d=1"])
def test_velocity_and_divergence_accept_every_form_of_t(data_name, form, dtype):
    """float, 0-d, (B,) and expanded (B,) t give the same one-pass result as a (B,) tensor, in the
    input's dtype; float32 agrees with float64 to 1e-4 relative (eps32 times condition numbers)."""
    case = DATA_CASES[data_name]
    path = cnftools.VPPath(0.1, 20.0)
    marginal = case.marginal(path, dtype=dtype)
    x = _draw((5, case.d), 42, dtype)
    u, div = marginal.velocity_and_divergence(x, _time_form(form, 0.6, 5, dtype))
    assert u.dtype == dtype and div.dtype == dtype and u.shape == x.shape and div.shape == (5,)
    u64, div64 = case.marginal(path).velocity_and_divergence(x.double(), 0.6)
    tol = 1e-12 if dtype == F64 else 1e-4
    torch.testing.assert_close(u.double(), u64, rtol=tol, atol=tol * float(u64.abs().max()))
    torch.testing.assert_close(
        div.double(), div64, rtol=tol, atol=tol * max(1.0, float(div64.abs().max()))
    )


@given(
    case=st.builds(
        lambda k, d, seed: DataCase("empirical", d, k, seed),
        st.integers(1, 30),
        st.integers(1, 5),
        st.integers(0, 10_000),
    ),
    t=st.floats(0.0, 0.95),
    chunk=st.integers(1, 8),
)
def test_one_pass_property_empirical(case, t, chunk):
    """Property: for random weighted data sets, chunk sizes and t, one pass = separate passes
    (1e-12 relative) on the σ_min = 0.2 OT path."""
    marginal = case.marginal(cnftools.OTPath(0.2), chunk_size=chunk)
    x = _draw((4, case.d), case.seed)
    u, div = marginal.velocity_and_divergence(x, t)
    u_ref, div_ref = marginal.velocity(x, t), marginal.divergence(x, t)
    torch.testing.assert_close(u, u_ref, rtol=1e-12, atol=1e-12 * float(u_ref.abs().max()))
    torch.testing.assert_close(div, div_ref, rtol=1e-12, atol=1e-12 * float(div_ref.abs().max()))


class _CountingMarginal(MixtureMarginal):
    """A mixture marginal that counts which public entry points a solve uses."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = {"velocity": 0, "divergence": 0, "velocity_and_divergence": 0}

    def velocity(self, x, t):
        self.calls["velocity"] += 1
        return super().velocity(x, t)

    def divergence(self, x, t):
        self.calls["divergence"] += 1
        return super().divergence(x, t)

    def velocity_and_divergence(self, x, t):
        self.calls["velocity_and_divergence"] += 1
        return super().velocity_and_divergence(x, t)


class _TwoPasses:
    """The same field offering velocity and divergence but no one-pass method."""

    def __init__(self, marginal) -> None:
        self.marginal = marginal

    def __call__(self, x, t):
        return self.marginal.velocity(x, t)

    def divergence(self, x, t):
        return self.marginal.divergence(x, t)


@pytest.mark.parametrize("as_bound_method", [False, True])
def test_log_likelihood_uses_the_one_pass(as_bound_method):
    """log_likelihood on a marginal (or its bound .velocity) evaluates velocity_and_divergence
    at every step (never divergence separately), and returns what the two-pass field returns: same steps, 1e-12 relative (identical
    numbers up to summation order); both equal the exact log p_1 within the solver tolerance."""
    p = DATA_CASES["empirical N=40 d=3 (weighted)"].parameters()
    path = cnftools.OTPath(0.2)
    counting = _CountingMarginal(path, p["means"], weights=p["weights"], chunk_size=16)
    x = counting.sample(6, 1.0, torch.Generator().manual_seed(43))
    field = counting.velocity if as_bound_method else counting
    prior = counting.prior()
    one = cnftools.log_likelihood(field, x, prior, rtol=1e-9, atol=1e-9).log_prob
    # every step evaluates the one pass; before the solve the engine calls the plain field twice
    # (on the batch and on two of its rows: may finished rows leave the batch?)
    assert counting.calls["velocity_and_divergence"] > 5
    assert counting.calls["divergence"] == 0
    assert counting.calls["velocity"] <= 2
    two = cnftools.log_likelihood(_TwoPasses(counting), x, prior, rtol=1e-9, atol=1e-9).log_prob
    torch.testing.assert_close(one, two, rtol=1e-12, atol=1e-12)
    exact = counting.log_prob(x, 1.0)
    torch.testing.assert_close(one, exact, rtol=1e-6, atol=1e-6)


def test_one_pass_is_not_used_for_another_objects_divergence():
    """A field whose divergence is borrowed from another object is called itself (no one pass of
    the other object replaces it)."""
    marginal = DATA_CASES["gaussian d=3"].marginal(cnftools.OTPath(0.1))

    class Borrowing:
        def __call__(self, x, t):
            return 2 * marginal.velocity(x, t)

        divergence = staticmethod(lambda x, t: 2 * marginal.divergence(x, t))

    from cnftools.fields import call_with_closed_form_divergence, closed_form_divergence

    field = Borrowing()
    x, t = _draw((4, 3), 44), torch.full((4,), 0.3, dtype=F64)
    u, div = call_with_closed_form_divergence(field, x, t, closed_form_divergence(field))
    torch.testing.assert_close(u, 2 * marginal.velocity(x, t), rtol=0, atol=0)
    torch.testing.assert_close(div, 2 * marginal.divergence(x, t), rtol=0, atol=0)


# --- named statistics, posterior mean and score (issue #14.2) --------------------------------------


@pytest.mark.parametrize("data_name", sorted(DATA_CASES))
def test_statistics_are_named_and_match_the_methods(data_name):
    """statistics() returns named fields; those not asked for are None; each equals its method
    (1e-12 relative, same formulas)."""
    case = DATA_CASES[data_name]
    marginal = case.marginal(cnftools.VEPath(0.1, 5.0), chunk_size=3)
    x, t = _draw((5, case.d), 45), _times(5, 1.0, 46)
    only_log_prob = marginal.statistics(x, t)
    assert only_log_prob.score is None and only_log_prob.velocity is None
    assert only_log_prob.divergence is None and only_log_prob.posterior_mean is None
    stats = marginal.statistics(
        x, t, score=True, posterior_mean=True, velocity=True, divergence=True
    )
    for name in ("log_prob", "score", "posterior_mean", "velocity", "divergence"):
        ref = getattr(marginal, name)(x, t)
        got = getattr(stats, name)
        torch.testing.assert_close(
            got, ref, rtol=1e-12, atol=1e-12 * max(1.0, float(ref.abs().max()))
        )
    assert stats.weighted_trace is not None and stats.weighted_trace.shape == (5,)


def _posterior_mean_reference(case: DataCase, path, x: np.ndarray, t: float) -> np.ndarray:
    """E[x1 | x_t = x] by Gaussian conditioning per component (numpy solve, no eigh) and
    scipy posterior weights: x1 | x, k ~ m_k + a S_k Σ_k^{-1} (x - a m_k); points: x1^i."""
    a, _, s2, _ = _schedule(path, t)
    p = {k: v.numpy() for k, v in case.parameters().items()}
    eye = np.eye(case.d)
    if case.kind == "gaussian":
        means, covs, weights = p["mean"][None], p["cov"][None], np.ones(1)
    else:
        means, weights = p["means"], p["weights"]
        covs = p.get("covs", np.zeros((case.components, case.d, case.d)))
    logits, cond = [], []
    for m, c, w in zip(means, covs, weights, strict=True):
        sigma = a**2 * c + s2 * eye
        logits.append(np.log(w) + stats.multivariate_normal(a * m, sigma).logpdf(x).reshape(-1))
        cond.append(m + a * np.linalg.solve(sigma, (x - a * m).T).T @ c.T)
    logits = np.stack(logits, axis=1)
    w = np.exp(logits - special.logsumexp(logits, axis=1, keepdims=True))
    return np.einsum("bk,kbd->bd", w, np.stack(cond))


@pytest.mark.parametrize("path_name", sorted(AFFINE_PATH_CASES))
@pytest.mark.parametrize("data_name", sorted(DATA_CASES))
def test_posterior_mean_matches_gaussian_conditioning(path_name, data_name):
    """posterior_mean(x, t) = E[x1 | x_t = x] against per-component Gaussian conditioning (numpy
    solve + scipy weights): 1e-9 relative to max(1, max|x̂1|) in float64 (solves with condition
    numbers up to ~1e2 near t = 1)."""
    case, path_case = DATA_CASES[data_name], AFFINE_PATH_CASES[path_name]
    path = path_case.build()
    marginal = case.marginal(path, chunk_size=4)
    x = 1.5 * _draw((5, case.d), 47)
    for t in (0.2, 0.7, case.t_max(path_case) if case.kind == "empirical" else 0.97):
        expected = _posterior_mean_reference(case, path, x.numpy(), t)
        got = marginal.posterior_mean(x, t).numpy()
        scale = max(1.0, float(np.abs(expected).max()))
        assert float(np.abs(got - expected).max()) <= 1e-9 * scale


@given(
    data_name=st.sampled_from(sorted(DATA_CASES)),
    path=st.one_of(builtin_paths(), user_affine_paths()),
    t=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**16),
)
def test_tweedie_links_score_and_posterior_mean(data_name, path, t, seed):
    """Tweedie, for every q and affine path: ∇log p_t(x) = (a_t x̂1 − x)/s_t² where s_t > 0.
    score() (itself checked against autograd) and posterior_mean() are computed from different
    per-component terms; they agree to 1e-8 relative to max|score| (float64; s_t² ≥ ~1e-3)."""
    if not isinstance(path, cnftools.AffineGaussianPath):
        return
    case = DATA_CASES[data_name]
    marginal = case.marginal(path)
    tt = torch.tensor([t], dtype=F64)
    s2 = float(path.noise_variance(tt))
    if s2 < 1e-3:
        return
    a = float(path.signal_scale(tt))
    x = _draw((4, case.d), seed)
    score, x1_hat = marginal.score(x, t), marginal.posterior_mean(x, t)
    tweedie = (a * x1_hat - x) / s2
    assert float((score - tweedie).abs().max()) <= 1e-8 * max(1.0, float(score.abs().max()))


# --- mixture weights in log space (issue #11.8) ----------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        [1e308, 1e308, 1e308],
        [5e-324, 5e-324, 5e-324],
        [1e-300, 1e-300, 1e-300],
    ],
    ids=["huge", "subnormal", "tiny"],
)
def test_extreme_weights_are_normalised_in_log_space(weights):
    """Equal weights of any representable size give the uniform mixture: no overflow of the sum
    (1e308), no underflow to zero (5e-324): log p_t equals the default-weight marginal (1e-12)."""
    data = _draw((3, 2), 48)
    path = cnftools.OTPath(0.1)
    marginal = MixtureMarginal(path, data, weights=torch.tensor(weights, dtype=F64))
    assert marginal.num_components == 3
    torch.testing.assert_close(marginal.weights, torch.full((3,), 1 / 3, dtype=F64))
    x = _draw((4, 2), 49)
    uniform = MixtureMarginal(path, data)
    torch.testing.assert_close(
        marginal.log_prob(x, 0.5), uniform.log_prob(x, 0.5), rtol=1e-12, atol=1e-12
    )


def test_float32_weights_near_the_top_of_the_range():
    """float32 weights 3e38 (their sum overflows float32) normalise to [0.25, 0.75]."""
    w = torch.tensor([1e38, 3e38], dtype=F32)
    marginal = MixtureMarginal(cnftools.OTPath(0.1), _draw((2, 2), 50, F32), weights=w)
    torch.testing.assert_close(marginal.weights, torch.tensor([0.25, 0.75], dtype=F64))


@given(exponent=st.integers(-300, 300), seed=st.integers(0, 2**16))
def test_weights_are_scale_invariant(exponent, seed):
    """Property: multiplying all weights by 10^k (|k| ≤ 300) changes nothing: 1e-12 relative."""
    g = torch.Generator().manual_seed(seed)
    data = torch.randn(4, 2, generator=g, dtype=F64)
    w = 0.1 + torch.rand(4, generator=g, dtype=F64)
    path = cnftools.OTPath(0.2)
    x = torch.randn(3, 2, generator=g, dtype=F64)
    ref = MixtureMarginal(path, data, weights=w)
    scaled = MixtureMarginal(path, data, weights=w * 10.0**exponent)
    torch.testing.assert_close(scaled.weights, ref.weights, rtol=1e-12, atol=0)
    torch.testing.assert_close(
        scaled.log_prob(x, 0.5), ref.log_prob(x, 0.5), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize(
    ("weights", "error", "match"),
    [
        (torch.tensor([1.0, math.nan, 1.0], dtype=F64), ValueError, "non-finite"),
        (torch.tensor([1.0, -math.inf, 1.0], dtype=F64), ValueError, "non-finite"),
        (torch.tensor([1.0, -1e-300, 1.0], dtype=F64), ValueError, ">= 0"),
        (torch.zeros(3, dtype=F64), ValueError, "all be zero"),
        (torch.ones(3, 1, dtype=F64), ValueError, r"shape \(K,\)"),
        (torch.ones(3, dtype=torch.int64), TypeError, "floating"),
        ([1.0, 1.0, 1.0], TypeError, "torch.Tensor"),
    ],
)
def test_bad_weights_are_refused_before_any_work(weights, error, match):
    """NaN, ±inf, negative, all-zero, wrongly shaped, integer and non-tensor weights: clear errors
    naming ``weights``."""
    with pytest.raises(error, match=match) as info:
        MixtureMarginal(cnftools.OTPath(), _draw((3, 2), 51), weights=weights)
    assert "weights" in str(info.value)
