"""Tests of cnftools.likelihood against closed forms (theory §3, §9, §10, §11).

Every expected value is computed here, independently of the code under test: the schedules a_t, s_t
from the formulas of theory §8, Gaussian and mixture densities with scipy.stats, matrix square
roots with numpy's eigh, matrix exponentials with scipy.linalg.expm. The data cases (Gaussian with
random SPD covariance, mixtures, empirical data) come from cnftools.cases, shared with validation.

Theory sections cited here (pages under ``docs/theory/``):

- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
- §8: ``docs/theory/paths.md#three-paths``
- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
- §11: ``docs/theory/divergence-and-continuity.md#divergence``
"""

from __future__ import annotations

import gc
import itertools
import math
import weakref
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy import linalg, special, stats
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

import cnftools
import cnftools._accuracy as accuracy_module
from cnftools import LikelihoodResult, SolverConfig, SolverError
from cnftools._ode import ACCURACY_RTOL_SHARE
from cnftools.cases import DATA_CASES, DataCase
from cnftools.training.features import TimeFeatures
from cnftools.training.models import MLPField

F64 = torch.float64
TIGHT = {"rtol": 1e-10, "atol": 1e-10}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on the shared 2-core machine a 2-thread pool wakes up for every tiny
    float64 op (torch.log of a (B, 1, d) tensor costs ~15 ms instead of ~5 µs under load), which
    would dominate these small solves. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Independent references (theory §8 schedules, §9 and §10 densities)

PATHS = {
    "OT(0.1)": ("ot", (0.1,)),
    "VE(0.1, 5)": ("ve", (0.1, 5.0)),
    "VP(0.1, 20)": ("vp", (0.1, 20.0)),
}


def _build_path(name: str) -> cnftools.AffineGaussianPath:
    kind, args = PATHS[name]
    return {"ot": cnftools.OTPath, "ve": cnftools.VEPath, "vp": cnftools.VPPath}[kind](*args)


def _schedule(name: str, t: float) -> tuple[float, float]:
    """(a_t, s_t^2) from theory §8."""
    kind, args = PATHS[name]
    if kind == "ot":
        return t, (1 - (1 - args[0]) * t) ** 2
    if kind == "ve":
        lo, hi = args
        return 1.0, (lo * (hi / lo) ** (1 - t)) ** 2
    bmin, bmax = args
    s = 1 - t
    alpha = math.exp(-0.5 * (bmin * s + 0.5 * (bmax - bmin) * s**2))
    return alpha, 1 - alpha**2


def _components(case: DataCase) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights (K,), means (K, d), covs (K, d, d)) of the data distribution q."""
    p = {k: v.numpy() for k, v in case.parameters().items()}
    if case.kind == "gaussian":
        return np.ones(1), p["mean"][None], p["cov"][None]
    covs = p.get("covs", np.zeros((case.components, case.d, case.d)))
    return p["weights"], p["means"], covs


def _log_p(case: DataCase, path: str, x: torch.Tensor, t: float) -> np.ndarray:
    """log p_t(x) = logsumexp_k log π_k + log N(x; a_t m_k, a_t² S_k + s_t² I) (scipy)."""
    a, s2 = _schedule(path, t)
    w, means, covs = _components(case)
    eye = np.eye(case.d)
    parts = [
        np.log(wk) + stats.multivariate_normal(a * m, a**2 * c + s2 * eye).logpdf(x.numpy())
        for wk, m, c in zip(w, means, covs, strict=True)
    ]
    return special.logsumexp(np.stack(parts, axis=-1).reshape(len(x), -1), axis=-1)


def _exact_p0(case: DataCase, path: str) -> torch.distributions.Distribution:
    """p_0 as a torch distribution built from the §9–§10 formula (not from cnftools)."""
    a, s2 = _schedule(path, 0.0)
    w, means, covs = _components(case)
    cov = torch.tensor(a**2 * covs + s2 * np.eye(case.d), dtype=F64)
    loc = torch.tensor(a * means, dtype=F64)
    if case.kind == "gaussian":
        return MultivariateNormal(loc[0], covariance_matrix=cov[0])
    mix = Categorical(probs=torch.tensor(w, dtype=F64))
    return MixtureSameFamily(mix, MultivariateNormal(loc, covariance_matrix=cov))


def _sym_power(matrix: np.ndarray, power: float) -> np.ndarray:
    lam, q = np.linalg.eigh(matrix)
    return (q * lam**power) @ q.T


def _mismatch_reference(case: DataCase, path: str, x: torch.Tensor) -> np.ndarray:
    """theory §9: log N(z0; 0, I) + ½ log det(Σ0 Σ1⁻¹), z0 = a0 m + Σ0^½ Σ1^-½ (x − a1 m)."""
    _, means, covs = _components(case)
    m, cov = means[0], covs[0]
    (a0, s20), (a1, s21) = _schedule(path, 0.0), _schedule(path, 1.0)
    sigma0 = a0**2 * cov + s20 * np.eye(case.d)
    sigma1 = a1**2 * cov + s21 * np.eye(case.d)
    z0 = a0 * m + (x.numpy() - a1 * m) @ (_sym_power(sigma0, 0.5) @ _sym_power(sigma1, -0.5)).T
    log_det = 0.5 * (np.linalg.slogdet(sigma0)[1] - np.linalg.slogdet(sigma1)[1])
    return stats.multivariate_normal(np.zeros(case.d), np.eye(case.d)).logpdf(z0) + log_det


def _data(case: DataCase, path: str, n: int = 6, seed: int = 0) -> torch.Tensor:
    marginal = case.marginal(_build_path(path))
    return marginal.sample(n, 1.0, torch.Generator().manual_seed(seed))


def _small_mlp(d: int = 3, seed: int = 0) -> MLPField:
    torch.manual_seed(seed)
    return MLPField(d, (16, 16), dtype=F64, time=TimeFeatures(features=5, max_frequency=2.0))


# ----------------------------------------------------------------------------------------------
# Closed forms (theory §9, §10)

GAUSSIANS = ["gaussian d=3", "gaussian d=8"]


@pytest.mark.parametrize("data", GAUSSIANS)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_gaussian_with_exact_prior_equals_log_p1(path: str, data: str) -> None:
    case = DATA_CASES[data]
    x = _data(case, path)
    marginal = case.marginal(_build_path(path))
    got = cnftools.log_likelihood(marginal, x, _exact_p0(case, path), **TIGHT).log_prob
    # dopri5 at rtol = atol = 1e-10 integrates div u to ~1e-9 nats; 1e-7 is the bound.
    np.testing.assert_allclose(got.numpy(), _log_p(case, path, x, 1.0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("data", GAUSSIANS)
@pytest.mark.parametrize("path", sorted(PATHS))
def test_gaussian_with_standard_prior_equals_mismatch_formula(path: str, data: str) -> None:
    case = DATA_CASES[data]
    x = _data(case, path)
    got = cnftools.log_likelihood(case.marginal(_build_path(path)), x, **TIGHT).log_prob
    # Same solve as above, scored under N(0, I): theory §9's prior-mismatch formula, to 1e-7.
    np.testing.assert_allclose(got.numpy(), _mismatch_reference(case, path, x), rtol=0, atol=1e-7)


MIXTURE_GRID = [
    ("OT(0.1)", "mixture K=4 d=2"),
    ("OT(0.1)", "empirical N=40 d=3 (weighted)"),
    ("VE(0.1, 5)", "mixture K=4 d=2"),
    ("VE(0.1, 5)", "empirical N=40 d=3 (weighted)"),
    ("VP(0.1, 20)", "mixture K=3 d=1"),  # VP with empirical data is singular at t = 1
]


@pytest.mark.parametrize(("path", "data"), MIXTURE_GRID)
def test_mixture_and_empirical_equal_closed_form(path: str, data: str) -> None:
    case = DATA_CASES[data]
    x = _data(case, path)
    marginal = case.marginal(_build_path(path))
    got = cnftools.log_likelihood(marginal, x, _exact_p0(case, path), **TIGHT).log_prob
    # The mixture field is smooth for sigma_min >= 0.1; same 1e-7 bound as the Gaussian case.
    np.testing.assert_allclose(got.numpy(), _log_p(case, path, x, 1.0), rtol=0, atol=1e-7)


@pytest.mark.parametrize(("path", "data"), MIXTURE_GRID)
def test_mixture_closed_form_through_the_testing_kit(path: str, data: str) -> None:
    """The same comparison through ``cnftools.testing.assert_log_likelihood_close``: its float64
    default (1e-6 nats at solver tolerance 1e-9) against the closed form computed with scipy here."""
    from cnftools.testing import assert_log_likelihood_close

    case = DATA_CASES[data]
    x = _data(case, path)
    expected = torch.as_tensor(_log_p(case, path, x, 1.0), dtype=x.dtype)
    marginal = case.marginal(_build_path(path))
    assert_log_likelihood_close(marginal, x, expected, _exact_p0(case, path))


@pytest.mark.parametrize(("path", "data"), [("OT(0.1)", "gaussian d=3"), MIXTURE_GRID[-1]])
def test_density_evolution_matches_marginal_log_prob(path: str, data: str) -> None:
    case = DATA_CASES[data]
    x = _data(case, path)
    marginal = case.marginal(_build_path(path))
    times = [0.9, 0.2, 0.5]  # any order; results come back in this order
    result = cnftools.log_likelihood(marginal, x, _exact_p0(case, path), times=times, **TIGHT)
    assert isinstance(result, LikelihoodResult)
    assert result.log_prob_t.shape == (3, len(x)) and result.trajectory.shape == (3, *x.shape)
    for j, t in enumerate(times):
        expected = _log_p(case, path, result.trajectory[j], t)
        # log p_t(z_t) = log p_0(z_0) - ∫_0^t div: the same solve's accuracy, 1e-7.
        np.testing.assert_allclose(result.log_prob_t[j].numpy(), expected, rtol=0, atol=1e-7)


def test_forward_density_evolution_matches_marginal_log_prob() -> None:
    case, path = DATA_CASES["gaussian d=3"], "OT(0.1)"
    marginal = case.marginal(_build_path(path))
    z0 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    result = cnftools.sample_with_log_prob(marginal, z0, times=[0.5, 1.0], **TIGHT)
    assert torch.equal(result.z0, z0) and torch.equal(
        result.times, torch.tensor([0.5, 1.0], dtype=F64)
    )
    for j, t in enumerate([0.5, 1.0]):
        expected = _log_p(case, path, result.trajectory[j], t)
        np.testing.assert_allclose(result.log_prob_t[j].numpy(), expected, rtol=0, atol=1e-7)
    np.testing.assert_allclose(
        result.log_prob.numpy(), _log_p(case, path, result.x, 1.0), atol=1e-7
    )


def test_result_pieces_are_consistent() -> None:
    case = DATA_CASES["gaussian d=3"]
    marginal = case.marginal(_build_path("OT(0.1)"))
    x = _data(case, "OT(0.1)")
    r = cnftools.log_likelihood(marginal, x, **TIGHT)
    assert isinstance(r, LikelihoodResult) and r.log_prob.shape == (len(x),)
    # Same numbers rearranged: rounding only.
    torch.testing.assert_close(r.log_prob, r.log_prior - r.divergence_integral, rtol=0, atol=1e-12)
    assert r.stderr is None and r.error_estimate is None and r.nfe.forward > 0
    assert torch.equal(r.x, x) and r.z0.shape == x.shape


# ----------------------------------------------------------------------------------------------
# Convergence order through the likelihood (affine marginal field)


def _linear_case(seed: int = 8, d: int = 3, batch: int = 4):
    """v(x, t) = c(t) A x, c(t) = 1 + cos 2t: z_0 = expm(-C A) x, ∫ div = C tr A, C = ∫_0^1 c."""
    gen = torch.Generator().manual_seed(seed)
    a_mat = torch.randn(d, d, dtype=F64, generator=gen) * 0.5

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 + torch.cos(2 * t))[:, None] * x @ a_mat.T

    x = torch.randn(batch, d, dtype=F64, generator=gen)
    big_c = 1 + math.sin(2.0) / 2
    z0 = x.numpy() @ linalg.expm(-big_c * a_mat.numpy()).T
    log_p1 = stats.multivariate_normal(np.zeros(d), np.eye(d)).logpdf(z0) - big_c * float(
        np.trace(a_mat.numpy())
    )
    return field, x, a_mat, big_c, log_p1


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_likelihood_convergence_order(method: str, order: int) -> None:
    """Order of the log-density part: the error of ∫ div = C tr A (the point's order is tested in
    tests/test_ode.py; in log p the two error terms partly cancel, which blurs the slope)."""
    field, x, a_mat, big_c, _ = _linear_case()
    steps = np.array([16, 32, 64, 128])
    exact = big_c * float(torch.trace(a_mat))
    errors = []
    for n in steps:
        r = cnftools.log_likelihood(field, x, config=SolverConfig(method, steps=int(n)))
        errors.append(float((r.divergence_integral - exact).abs().max()))
    slope = np.polyfit(np.log(1 / steps), np.log(errors), 1)[0]
    # The observed order tends to the method's order as h -> 0; ±0.15 covers h = 1/16 effects.
    assert abs(slope - order) < 0.15, (errors, slope)


@pytest.mark.parametrize(
    "config", [SolverConfig("rk4", steps=8), SolverConfig(rtol=1e-5, atol=1e-5)]
)
def test_error_estimate_tracks_the_actual_error(config: SolverConfig) -> None:
    case, path = DATA_CASES["gaussian d=3"], "OT(0.1)"
    x = _data(case, path)
    r = cnftools.log_likelihood(
        case.marginal(_build_path(path)),
        x,
        _exact_p0(case, path),
        config=config.replace(error_estimate=True),
    )
    actual = np.abs(r.log_prob.numpy() - _log_p(case, path, x, 1.0))
    ratio = r.error_estimate.numpy() / actual
    # A posteriori estimates are right to a factor, not exactly: within [0.5, 2].
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert r.nfe.estimate > r.nfe.forward
    # The estimate is a second solve: the reported numbers are those of the solve without it.
    plain = cnftools.log_likelihood(
        case.marginal(_build_path(path)), x, _exact_p0(case, path), config=config
    )
    assert torch.equal(plain.log_prob, r.log_prob)
    assert plain.error_estimate is None and plain.nfe.estimate == 0


@pytest.mark.parametrize(
    "config", [SolverConfig("rk4", steps=8), SolverConfig(rtol=1e-5, atol=1e-5)], ids=str
)
def test_sample_with_log_prob_error_estimate_tracks_the_actual_error(config: SolverConfig) -> None:
    """SolverConfig(error_estimate=True) in the forward direction estimates the error of
    ``log_prob`` as the density of the exact sample ψ_1(z0) (a refined solve moves the sample
    too, so that is what the difference of two solves measures). Gaussian data on OT: p_0 = N(0, I)
    and ψ_1 is linear, ψ_1(z0) = m + Σ_1^½ z0 (theory §9), so by the change of variables
    log p_1(ψ_1(z0)) = log N(z0; 0, I) - ½ log det Σ_1, computed here with numpy and scipy."""
    case, path = DATA_CASES["gaussian d=3"], "OT(0.1)"
    z0 = torch.randn(6, 3, dtype=F64, generator=torch.Generator().manual_seed(16))
    r = cnftools.sample_with_log_prob(
        case.marginal(_build_path(path)), z0, config=config.replace(error_estimate=True)
    )
    _, means, covs = _components(case)
    a1, s21 = _schedule(path, 1.0)
    sigma1 = a1**2 * covs[0] + s21 * np.eye(case.d)
    exact = stats.multivariate_normal(np.zeros(case.d), np.eye(case.d)).logpdf(z0.numpy())
    exact = exact - 0.5 * np.linalg.slogdet(sigma1)[1]
    # the closed-form flow map itself, as a check of the reference: the solve lands near it
    expected_x = means[0] + z0.numpy() @ _sym_power(sigma1, 0.5).T
    # measured 2.6e-6 (rk4, 8 steps) and 4.9e-6 (dopri5 at 1e-5); a tight solve agrees to 5e-13
    np.testing.assert_allclose(r.x.numpy(), expected_x, rtol=0, atol=1e-4)
    actual = np.abs(r.log_prob.numpy() - exact)
    ratio = r.error_estimate.numpy() / actual
    # As for log_likelihood: a posteriori estimates are right to a factor, within [0.5, 2].
    assert np.all((ratio > 0.5) & (ratio < 2.0)), ratio
    assert r.nfe.estimate > r.nfe.forward


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (SolverConfig(error_estimate=True), "likelihood functions only"),
        (SolverConfig(accuracy=1e-6), "likelihood functions only"),
    ],
    ids=["error_estimate", "accuracy"],
)
def test_sample_refuses_error_estimate_and_accuracy(config: SolverConfig, match: str) -> None:
    """``sample`` returns no log-density, so it has nothing to estimate: refused before work."""
    with pytest.raises(ValueError, match=match):
        cnftools.sample(_never_called, torch.zeros(3, 2, dtype=F64), config=config)


def test_sample_with_log_prob_refuses_accuracy() -> None:
    with pytest.raises(
        ValueError, match="accuracy= applies to log_likelihood and dataset_nll only"
    ):
        cnftools.sample_with_log_prob(
            _never_called, torch.zeros(3, 2, dtype=F64), config=SolverConfig(accuracy=1e-6)
        )


def test_config_object_and_keywords_agree() -> None:
    """The keywords method/rtol/atol replace the config's fields; an adaptive method keyword
    drops the config's grid (resolve_config's rules 2 and 3): the same solve, bit for bit."""
    case = DATA_CASES["gaussian d=3"]
    marginal = case.marginal(_build_path("OT(0.1)"))
    x = _data(case, "OT(0.1)")
    a = cnftools.log_likelihood(marginal, x, config=SolverConfig(rtol=1e-6, atol=1e-7)).log_prob
    b = cnftools.log_likelihood(marginal, x, rtol=1e-6, atol=1e-7).log_prob
    c = cnftools.log_likelihood(
        marginal, x, config=SolverConfig(rtol=1e-3, atol=1e-3), rtol=1e-6, atol=1e-7
    ).log_prob
    d = cnftools.log_likelihood(
        marginal, x, config=SolverConfig("rk4", steps=4), method="dopri5", rtol=1e-6, atol=1e-7
    )
    assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d.log_prob)
    assert d.config == SolverConfig(rtol=1e-6, atol=1e-7)
    # A keyword left at None keeps the config's value.
    e = cnftools.log_likelihood(marginal, x, config=SolverConfig("rk4", steps=8), rtol=None)
    assert e.config == SolverConfig("rk4", steps=8)


@pytest.mark.parametrize(
    ("keywords", "config"),
    [
        ({"method": "dopri8"}, SolverConfig("dopri8")),
        ({"rtol": 1e-8, "atol": 1e-9}, SolverConfig(rtol=1e-8, atol=1e-9)),
        (
            {"config": SolverConfig(adjoint=True, max_steps=500), "rtol": 1e-7},
            SolverConfig(rtol=1e-7, adjoint=True, max_steps=500),
        ),
        (
            {"config": SolverConfig("rk4", steps=8), "method": "midpoint"},
            SolverConfig("midpoint", steps=8),
        ),
    ],
    ids=["method", "tolerances", "over a config", "fixed grid kept"],
)
def test_keywords_are_sugar_over_the_config_in_every_entry_point(
    keywords: dict, config: SolverConfig
) -> None:
    case = DATA_CASES["gaussian d=3"]
    marginal = case.marginal(_build_path("OT(0.1)"))
    x = _data(case, "OT(0.1)")
    # The same configuration gives the same solve, bit for bit.
    flat = cnftools.log_likelihood(marginal, x, **keywords)
    carried = cnftools.log_likelihood(marginal, x, config=config)
    assert flat.config == config and torch.equal(flat.log_prob, carried.log_prob)
    sampled = cnftools.sample(marginal, x, **keywords)
    assert sampled.config == config
    assert torch.equal(sampled.x, cnftools.sample(marginal, x, config=config).x)
    paired = cnftools.sample_with_log_prob(marginal, x, **keywords)
    assert paired.config == config
    assert torch.equal(
        paired.log_prob, cnftools.sample_with_log_prob(marginal, x, config=config).log_prob
    )


@pytest.mark.parametrize(
    "keyword",
    [
        {"steps": 4},
        {"step_size": 0.25},
        {"adjoint": True},
        {"error_estimate": True},
        {"params": ()},
        {"return_result": True},
        {"divergence": "hutchinson"},
        {"n_probes": 2},
        {"generator": None},
    ],
    ids=lambda k: next(iter(k)),
)
@pytest.mark.parametrize("entry", ["log_likelihood", "sample", "sample_with_log_prob"])
def test_removed_keywords_raise_type_error(entry: str, keyword: dict) -> None:
    """0.2 has no shims: the 0.1 keywords are unknown keywords (TypeError), never ignored."""
    calls = []

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return -x

    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(keyword))}'"):
        getattr(cnftools, entry)(field, torch.zeros(3, 2, dtype=F64), **keyword)
    assert not calls


# ----------------------------------------------------------------------------------------------
# Neural fields: round trips, gradients, Hutchinson


def test_sample_log_likelihood_round_trip() -> None:
    v = _small_mlp()
    z0 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x1 = cnftools.sample(v, z0, **TIGHT).x
        back = cnftools.log_likelihood(v, x1, **TIGHT)
        paired = cnftools.sample_with_log_prob(v, z0, **TIGHT)
        x_s, lp_s = paired.x, paired.log_prob
        path = cnftools.sample(v, z0, times=[1.0, 0.5], **TIGHT).trajectory
    # Forward then backward through tolerance-1e-10 solves: ~1e-10 each way; 1e-8 leaves margin.
    torch.testing.assert_close(back.z0, z0, rtol=0, atol=1e-8)
    torch.testing.assert_close(x_s, x1, rtol=0, atol=1e-8)
    torch.testing.assert_close(lp_s, back.log_prob, rtol=0, atol=1e-8)
    torch.testing.assert_close(path[0], x1, rtol=0, atol=1e-8)
    assert path.shape == (2, 5, 3)


def test_sample_returns_a_result_with_the_trajectory_at_times() -> None:
    v = _small_mlp()
    z0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = cnftools.sample(v, z0, **TIGHT)
        result = cnftools.sample(v, z0, times=[0.25, 1.0], **TIGHT)
    assert isinstance(plain, cnftools.SampleResult) and isinstance(result, cnftools.SampleResult)
    assert plain.x.shape == z0.shape and plain.trajectory is None and plain.times is None
    assert result.trajectory.shape == (2, *z0.shape)
    assert torch.equal(result.times, torch.tensor([0.25, 1.0], dtype=F64))
    assert plain.nfe.forward > 0 and plain.config == SolverConfig(**TIGHT)
    # The trajectory at t = 1 is the solve's end point: the same tensor values.
    torch.testing.assert_close(result.trajectory[1], result.x, rtol=0, atol=0)
    # Without times= the solver steps differently (no stop at 0.25): tolerance 1e-10, 1e-8 margin.
    torch.testing.assert_close(result.x, plain.x, rtol=0, atol=1e-8)


def _gradients(
    adjoint: bool, v: MLPField, x: torch.Tensor
) -> tuple[torch.Tensor, LikelihoodResult]:
    x = x.clone().requires_grad_(True)
    v.zero_grad()
    result = cnftools.log_likelihood(v, x, config=SolverConfig(**TIGHT, adjoint=adjoint))
    result.log_prob.sum().backward()
    grads = [x.grad.flatten()] + [p.grad.flatten() for p in v.parameters()]
    return torch.cat(grads), result


def test_adjoint_gradients_equal_direct_gradients() -> None:
    v = _small_mlp()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(3))
    direct, r_direct = _gradients(False, v, x)
    adjoint, r_adjoint = _gradients(True, v, x)
    # Both are tolerance-1e-10 approximations of the same gradient; the bound is 1e-6.
    assert float((adjoint - direct).norm() / direct.norm()) < 1e-6
    assert r_direct.nfe.backward == 0 and r_adjoint.nfe.backward > 0


def test_adjoint_memory_does_not_grow_with_steps() -> None:
    """Tensors still held for backward after the solve (parameters aside): direct backprop keeps
    every step's, the adjoint only its end states."""
    v = _small_mlp()
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    param_ids = {id(p) for p in v.parameters()}

    def held(adjoint: bool, steps: int) -> int:
        refs: list[weakref.ref] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in param_ids:
                refs.append(weakref.ref(tensor))
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = cnftools.log_likelihood(
                v, x, config=SolverConfig("rk4", steps=steps, adjoint=adjoint), grad=True
            )
        gc.collect()
        alive = sum(r() is not None for r in refs)
        del out
        return alive

    assert held(False, 20) > 1.8 * held(False, 10)
    assert held(True, 20) == held(True, 10)


def test_gradient_flows_without_x_requiring_grad_when_asked() -> None:
    v = _small_mlp()
    x = torch.randn(3, 3, dtype=F64)
    cnftools.log_likelihood(
        v, x, config=SolverConfig("rk4", steps=4), grad=True
    ).log_prob.sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in v.parameters())


def test_hutchinson_mean_is_within_its_standard_error() -> None:
    v = _small_mlp(d=4)
    x = torch.randn(6, 4, dtype=F64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact = cnftools.log_likelihood(v, x, **TIGHT).log_prob
        hutchinson = cnftools.Hutchinson(64, generator=torch.Generator().manual_seed(0))
        r = cnftools.log_likelihood(v, x, estimator=hutchinson, **TIGHT)
    # Unbiased estimator, 64 probes: 4 standard errors (a fixed seed keeps it deterministic).
    assert torch.all((r.log_prob - exact).abs() <= 4 * r.stderr), (r.log_prob - exact, r.stderr)
    assert bool((r.stderr > 0).all())


def test_hutchinson_probes_are_fixed_for_the_whole_solve() -> None:
    """v = c(t) A x: with fixed probes ε_k each integral is exactly ε_kᵀ A ε_k ∫c, which fresh
    probes at every evaluation would not give."""
    gen = torch.Generator().manual_seed(6)
    d, batch = 3, 4
    a_mat = torch.randn(d, d, dtype=F64, generator=gen) * 0.5

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 + torch.cos(2 * t))[:, None] * x @ a_mat.T

    integral_c = 1 + math.sin(2.0) / 2  # ∫_0^1 (1 + cos 2t) dt
    x = torch.randn(batch, d, dtype=F64, generator=gen)
    probes = torch.randint(0, 2, (2, batch, d), generator=gen).to(F64) * 2 - 1
    r = cnftools.log_likelihood(field, x, estimator=cnftools.Hutchinson(probes=probes), **TIGHT)
    z0 = x.numpy() @ linalg.expm(-integral_c * a_mat.numpy()).T
    per_probe = np.einsum("kbi,ij,kbj->kb", probes.numpy(), a_mat.numpy(), probes.numpy())
    per_probe = per_probe * integral_c
    log_prior = stats.multivariate_normal(np.zeros(d), np.eye(d)).logpdf(z0)
    # Tolerance-1e-10 solve of a smooth linear system: 1e-8.
    np.testing.assert_allclose(r.log_prob.numpy(), log_prior - per_probe.mean(0), atol=1e-8)
    np.testing.assert_allclose(r.stderr.numpy(), np.abs(per_probe[0] - per_probe[1]) / 2, atol=1e-8)


def test_probes_from_generator_are_reproducible() -> None:
    v = _small_mlp()
    x = torch.randn(3, 3, dtype=F64)
    config = SolverConfig("rk4", steps=4)

    def run(seed: int) -> torch.Tensor:
        spec = cnftools.Hutchinson(2, generator=torch.Generator().manual_seed(seed))
        return cnftools.log_likelihood(v, x, estimator=spec, config=config).log_prob

    with torch.no_grad():
        a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_float32_with_stated_tolerance() -> None:
    case, path = DATA_CASES["gaussian d=3"], "OT(0.1)"
    x = _data(case, path)
    marginal = case.marginal(_build_path(path), dtype=torch.float32)
    p0 = _exact_p0(case, path)
    prior = MultivariateNormal(p0.loc.float(), covariance_matrix=p0.covariance_matrix.float())
    got = cnftools.log_likelihood(marginal, x.float(), prior, rtol=1e-6, atol=1e-6).log_prob
    assert got.dtype == torch.float32
    # float32 rounding (eps 1.2e-7) over ~100 steps and a ~5-nat log-density: 1e-4 nats.
    np.testing.assert_allclose(got.double().numpy(), _log_p(case, path, x, 1.0), atol=1e-4)


# ----------------------------------------------------------------------------------------------
# Hard field: empirical data, many points, d >= 32 (closed-form divergence)


@pytest.mark.slow  # ~2-15 s alone, up to a minute on the loaded shared machine
def test_empirical_many_points_high_dimension() -> None:
    gen = torch.Generator().manual_seed(7)
    d, n_points = 32, 2000
    points = 1.5 * torch.randn(n_points, d, dtype=F64, generator=gen)
    marginal = cnftools.MixtureMarginal(cnftools.OTPath(0.2), points)
    calls = {"divergence": 0}
    original = marginal.divergence

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls["divergence"] += 1
        return original(x, t)

    marginal.divergence = counting  # type: ignore[method-assign]
    x = marginal.sample(8, 1.0, gen)
    got = cnftools.log_likelihood(marginal, x, rtol=1e-10, atol=1e-10).log_prob
    # Reference: p_1 = (1/N) Σ_i N(x_i, 0.2² I) (OT: p_0 = N(0, I) exactly, so the default prior).
    sq = ((x[:, None, :] - points[None]) ** 2).sum(-1).numpy()
    expected = special.logsumexp(-0.5 * sq / 0.04, axis=1) - math.log(n_points)
    expected = expected - 0.5 * d * math.log(2 * math.pi * 0.04)
    # rtol = atol = 1e-10 per sample (every row on its own steps): the ~50-nat divergence integral and
    # ~100 steps make the global error a small multiple of tol x |log p|; measured 1.2e-9.
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-8)
    assert calls["divergence"] > 0  # the closed form was used, not d backward passes


# ----------------------------------------------------------------------------------------------
# Bad input and failures


def test_non_finite_x_names_rows() -> None:
    x = torch.zeros(4, 2, dtype=F64)
    x[2, 1] = math.nan
    with pytest.raises(ValueError, match=r"x has non-finite values .* rows \[2\]"):
        cnftools.log_likelihood(lambda x, t: -x, x)


def test_prior_of_wrong_event_shape() -> None:
    x = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="Independent"):
        cnftools.log_likelihood(lambda x, t: -x, x, Normal(torch.zeros(2, dtype=F64), 1.0))
    with pytest.raises(ValueError, match="event_shape"):
        prior = Independent(Normal(torch.zeros(3, dtype=F64), 1.0), 1)
        cnftools.log_likelihood(lambda x, t: -x, x, prior)
    with pytest.raises(TypeError, match="Distribution"):
        cnftools.log_likelihood(lambda x, t: -x, x, lambda z: z.sum(1))


def test_custom_prior_is_used() -> None:
    x = torch.randn(4, 2, dtype=F64)
    prior = Independent(Normal(torch.zeros(2, dtype=F64), 2.0), 1)
    got = cnftools.log_likelihood(
        lambda x, t: torch.zeros_like(x) + 0 * x, x, prior, **TIGHT
    ).log_prob
    # The zero field leaves z0 = x and ∫ div = 0: exactly the prior's log density.
    np.testing.assert_allclose(got.numpy(), stats.norm(0, 2).logpdf(x.numpy()).sum(1), atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"estimator": "approx"}, TypeError, "estimator must be a divergence spec"),
        ({"estimator": "hutchinson"}, TypeError, r"estimator=cnftools\.Hutchinson\(\)"),
        ({"estimator": "exact"}, TypeError, r"estimator=cnftools\.Exact\(\)"),
        ({"estimator": "closed_form"}, TypeError, r"estimator=cnftools\.ClosedForm\(\)"),
        ({"estimator": cnftools.Hutchinson(probes=torch.ones(2, 3, 3))}, ValueError, "probes"),
        ({"times": [0.5, 1.5]}, ValueError, r"\[0, 1\]"),
        ({"times": [0.5, 0.5]}, ValueError, "distinct"),
        ({"method": "rk4"}, ValueError, "needs steps"),
        ({"config": "rk4"}, TypeError, "config must be a cnftools.SolverConfig"),
        ({"accuracy": 1e-6, "times": [0.5]}, ValueError, "accuracy= .* takes no times="),
        (
            {"accuracy": 1e-6, "config": SolverConfig(error_estimate=True)},
            ValueError,
            "takes no times= or error_estimate=",
        ),
        (
            {"config": SolverConfig(accuracy=1e-6, error_estimate=True)},
            ValueError,
            "takes no times= or error_estimate=",
        ),
    ],
)
def test_bad_options_fail_before_any_work(kwargs: dict, error: type, match: str) -> None:
    calls = []

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return -x

    with pytest.raises(error, match=match):
        cnftools.log_likelihood(field, torch.zeros(4, 2, dtype=F64), **kwargs)
    assert not calls


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: cnftools.Hutchinson(2, noise="uniform"), r"Hutchinson\(noise=\.\.\.\)"),
        (lambda: cnftools.Hutchinson(0), r"Hutchinson\(n_probes=\.\.\.\)"),
        (lambda: cnftools.Exact("batch"), r"Exact\(strategy=\.\.\.\)"),
    ],
    ids=["noise", "n_probes", "strategy"],
)
def test_bad_estimator_specs_fail_on_construction(build, match: str) -> None:
    """The 0.1 options ``noise=``/``n_probes=`` now live in the spec, which checks them itself."""
    with pytest.raises(ValueError, match=match):
        build()


def test_field_of_wrong_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        cnftools.log_likelihood(lambda x, t: x[:, :1], torch.zeros(4, 2, dtype=F64))


@pytest.mark.parametrize("method", ["dopri5", "rk4"])
def test_nan_mid_solve_names_rows(method: str) -> None:
    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        bad = (torch.arange(x.shape[0]) == 2)[:, None] & (t < 0.5)[:, None]
        return torch.where(bad, torch.nan, -x)

    config = SolverConfig("rk4", steps=10) if method == "rk4" else SolverConfig(method)
    with pytest.raises(SolverError, match=r"rows \[2\]"):
        cnftools.log_likelihood(field, torch.ones(4, 2, dtype=F64), config=config)


def test_underflow_through_log_likelihood_says_what_to_try() -> None:
    def singular(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (1 + 0 * x) / ((0.5 - t) ** 2)[:, None]

    with pytest.raises(SolverError, match="underflow") as info:
        cnftools.log_likelihood(singular, torch.ones(2, 2, dtype=F64), rtol=1e-5, atol=1e-5)
    assert "fixed-grid" in str(info.value) and "float64" in str(info.value)


def test_adjoint_with_a_plain_closure_names_nn_module() -> None:
    """0.1's ``params=`` is gone: the adjoint needs the field's parameters, so a plain closure over
    trainable tensors is refused with an error that says to make the field an nn.Module."""
    v = _small_mlp()
    closure = lambda x, t: v(x, t)  # noqa: E731
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"adjoint=True needs the field's parameters.*nn\.Module"):
        cnftools.log_likelihood(closure, x, config=SolverConfig(adjoint=True))
    with pytest.raises(ValueError, match=r"nn\.Module"):
        cnftools.sample(closure, x, config=SolverConfig(adjoint=True), grad=True)
    # The same field as an nn.Module: the adjoint runs (its gradients: the tests above).
    result = cnftools.log_likelihood(v, x, config=SolverConfig(adjoint=True))
    assert result.log_prob.grad_fn is not None


def test_inference_mode_is_supported() -> None:
    v = _small_mlp()
    x = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = cnftools.log_likelihood(v, x, config=SolverConfig("rk4", steps=4)).log_prob
    with torch.inference_mode():
        got = cnftools.log_likelihood(v, x, config=SolverConfig("rk4", steps=4)).log_prob
    # Same arithmetic, only the autograd mode differs: bitwise equal.
    assert torch.equal(got, expected)


def test_sample_gradients_adjoint_equal_direct() -> None:
    v = _small_mlp()
    grads = []
    for adjoint in (False, True):
        x0 = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(10))
        x0.requires_grad_(True)
        v.zero_grad()
        r = cnftools.sample(v, x0, config=SolverConfig(**TIGHT, adjoint=adjoint))
        r.x.pow(2).sum().backward()
        grads.append(torch.cat([x0.grad.flatten()] + [p.grad.flatten() for p in v.parameters()]))
        assert (r.nfe.backward > 0) == adjoint
    # Two tolerance-1e-10 approximations of the same gradient.
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-6


def test_initial_step_probe_never_leaves_the_unit_interval() -> None:
    """The first-step heuristic probes f at t0 + h0, and h0 can exceed the interval: VP's marginal
    field is tiny at t = 0 (α_1 ≈ 0.0066), so h0 = 0.01·|y0|/|f0| ≈ 22 at rtol = 1e-5, and the
    marginal field would be asked for t ≈ 22 and raise. The probe is kept inside the interval; the
    solve must succeed and agree with a tight solve to its tolerance: the global error of a
    tolerance-controlled solve is a small multiple of tol × |y| (100× as elsewhere), 2e-3 absolute
    at rtol = atol = 1e-5 with |y| ≲ 2 (measured 1.05e-3)."""
    from cnftools.data import eight_gaussians

    marginal = eight_gaussians(dtype=torch.float64).marginal(cnftools.VPPath(0.1, 20.0))
    z0 = marginal.sample(128, 0.0, torch.Generator().manual_seed(85))
    loose = cnftools.sample(marginal, z0, method="dopri5", rtol=1e-5, atol=1e-5).x
    tight = cnftools.sample(marginal, z0, method="dopri5", rtol=1e-10, atol=1e-10).x
    assert float((loose - tight).abs().max()) < 100 * 1e-5 * 2


@pytest.mark.parametrize(
    ("prior_dtype", "data_dtype"), [(torch.float64, torch.float32), (torch.float32, torch.float64)]
)
def test_prior_of_another_dtype_is_refused_before_the_solve(prior_dtype, data_dtype) -> None:
    """A prior in another dtype would be silently promoted (float32 prior, float64 data) or fail
    after the whole solve: it is refused up front, with no field evaluation."""
    calls = []

    def field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return -x

    prior = Independent(
        Normal(torch.zeros(2, dtype=prior_dtype), torch.ones(2, dtype=prior_dtype)), 1
    )
    with pytest.raises(TypeError, match="prior must be built in the data's dtype"):
        cnftools.log_likelihood(field, torch.zeros(3, 2, dtype=data_dtype), prior)
    assert not calls


# ----------------------------------------------------------------------------------------------
# Gradients only when asked (issue: the default call must not hold the graph of the whole solve)


def test_default_call_on_a_trainable_module_keeps_no_graph() -> None:
    v = _small_mlp()
    assert all(p.requires_grad for p in v.parameters())
    x = torch.randn(4, 3, dtype=F64, generator=torch.Generator().manual_seed(11))
    config = SolverConfig("midpoint", steps=5)
    result = cnftools.log_likelihood(v, x, config=config)
    assert result.log_prob.grad_fn is None and not result.log_prob.requires_grad
    with torch.no_grad():
        expected = cnftools.log_likelihood(v, x, config=config).log_prob
    torch.testing.assert_close(result.log_prob, expected, rtol=0, atol=0)
    paired = cnftools.sample_with_log_prob(v, x, config=config)
    assert paired.x.grad_fn is None and paired.log_prob.grad_fn is None
    assert cnftools.sample(v, x, config=config).x.grad_fn is None


def test_default_call_holds_no_tensors_for_backward() -> None:
    """The memory claim, counted: no tensor is saved for backward by the default call."""
    v = _small_mlp()
    x = torch.randn(8, 3, dtype=F64, generator=torch.Generator().manual_seed(12))
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        cnftools.log_likelihood(v, x, config=SolverConfig("midpoint", steps=20))
    kept_while_solving = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(1) or t, lambda t: t):
        out = cnftools.log_likelihood(
            v, x, config=SolverConfig("midpoint", steps=20), grad=True
        ).log_prob
    assert out.grad_fn is not None and len(saved) > 0
    # the divergence's VJPs save tensors inside each evaluation (freed at once); the graph of
    # the solve (grad=True) saves every evaluation's: many times more.
    assert len(saved) > 5 * max(kept_while_solving / 20, 1)


@pytest.mark.parametrize("how", ["grad", "x_requires_grad", "adjoint"])
def test_gradients_when_asked(how: str) -> None:
    v = _small_mlp()
    x = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(13))
    kwargs: dict = {"config": SolverConfig("rk4", steps=4)}
    if how == "grad":
        kwargs["grad"] = True
    elif how == "adjoint":
        kwargs["config"] = SolverConfig("rk4", steps=4, adjoint=True)
    else:
        x = x.requires_grad_(True)
    v.zero_grad()
    cnftools.log_likelihood(v, x, **kwargs).log_prob.sum().backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in v.parameters())
    if how == "x_requires_grad":
        assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_grad_false_wins_and_bad_grad_refused() -> None:
    v = _small_mlp()
    x = torch.randn(3, 3, dtype=F64).requires_grad_(True)
    config = SolverConfig("rk4", steps=2)
    assert cnftools.log_likelihood(v, x, config=config, grad=False).log_prob.grad_fn is None
    with pytest.raises(TypeError, match="grad must be"):
        cnftools.log_likelihood(v, x, config=config, grad="yes")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Ask for nats, get nats


def _gaussian_case(d: int, batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    cov = q @ torch.diag(0.2 + 1.8 * torch.rand(d, generator=g, dtype=F64)) @ q.T
    marginal = cnftools.GaussianMarginal(cnftools.OTPath(0.1), torch.zeros(d, dtype=F64), cov)
    x = torch.randn(batch, d, generator=g, dtype=F64)
    return marginal, x, marginal.log_prob(x, 1.0)


class _Opaque(torch.nn.Module):
    """A marginal's velocity with no closed-form divergence hook (autograd divergence)."""

    def __init__(self, marginal: cnftools.GaussianMarginal) -> None:
        super().__init__()
        self.marginal = marginal

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.marginal.velocity(x, t)


@pytest.mark.parametrize("accuracy", [1e-4, 1e-7, 1e-9])
def test_accuracy_is_met_and_estimated(accuracy: float) -> None:
    """Against the closed form, on a smooth Gaussian case: the true error is below the target and
    below the reported estimate; the estimate itself meets the target. (The estimate is not a
    guaranteed bound: benchmarks/accuracy_bound.py counts how often it is exceeded elsewhere.)"""
    marginal, x, exact = _gaussian_case(4, 6)
    result = cnftools.log_likelihood(_Opaque(marginal), x, accuracy=accuracy)
    error = (result.log_prob - exact).abs()
    assert result.error_estimate is not None and result.error_estimate.shape == (6,)
    assert bool((result.error_estimate <= accuracy).all())
    assert bool((error <= result.error_estimate + 1e-13).all())  # 1e-13: float64 rounding
    assert result.nfe.estimate > 0  # the self-check's cost is counted
    assert result.log_prob.grad_fn is None


def test_accuracy_tightens_only_rows_that_need_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A row far in the tail needs a tighter solve than the rest; only it is solved again. The
    first solve is dopri5 (lower order than the default dopri8) so that rounds happen."""
    monkeypatch.setattr("cnftools._ode.ACCURACY_PLAN", ((0.0, "dopri5", 1.0),))
    marginal, x, _ = _gaussian_case(2, 8, seed=1)
    x = x.clone()
    x[3] = 6.0  # far out: the field and its error are largest here
    exact = marginal.log_prob(x, 1.0)
    sizes: list[int] = []  # the batch of every solve
    original = accuracy_module.one_solve

    def spy(problem, *args, **kwargs):  # type: ignore[no-untyped-def]
        sizes.append(problem.start.shape[0])
        return original(problem, *args, **kwargs)

    monkeypatch.setattr(accuracy_module, "one_solve", spy)
    result = cnftools.log_likelihood(_Opaque(marginal), x, accuracy=1e-9)
    assert bool(((result.log_prob - exact).abs() <= 1e-9).all())
    assert bool((result.error_estimate <= 1e-9).all())
    # the first solve and its check take every row; each later round only the rows not yet
    # within the target, so the rounds shrink, and the last ones leave out rows already within it
    assert sizes[:2] == [8, 8] and len(sizes) > 2, sizes
    assert all(a >= b for a, b in itertools.pairwise(sizes[2:])), sizes
    assert sizes[-1] < 8, sizes


def test_accuracy_lives_in_solver_config_and_excludes_tolerances() -> None:
    marginal, x, exact = _gaussian_case(2, 3)
    config = SolverConfig(accuracy=1e-6)
    lp = cnftools.log_likelihood(_Opaque(marginal), x, config=config).log_prob
    assert bool(((lp - exact).abs() <= 1e-6).all())
    with pytest.raises(ValueError, match="accuracy= chooses"):
        cnftools.log_likelihood(marginal, x, accuracy=1e-6, rtol=1e-3)
    with pytest.raises(ValueError, match="accuracy must be > 0"):
        SolverConfig(accuracy=0.0)
    plan = SolverConfig(accuracy=1e-6, adjoint=True).accuracy_plan()
    assert plan.method in ("dopri5", "dopri8") and plan.adjoint
    assert plan.rtol == plan.atol * ACCURACY_RTOL_SHARE and plan.accuracy == 1e-6


# ----------------------------------------------------------------------------------------------
# Conditional fields: extras=


class _Conditional(torch.nn.Module):
    """v(x, t; c) = -c x per row: log p_1(x) = log N(x e^{-c} ... ) in closed form below."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, *, rate: torch.Tensor) -> torch.Tensor:
        return -rate[:, None] * x


def test_extras_reach_the_field_in_every_entry_point() -> None:
    """dz/dt = -c z from z_0 ~ N(0, I): z_1 = z_0 e^{-c}, so p_1 = N(0, e^{-2c} I) per row."""
    d, rate = 3, torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    x = torch.randn(3, d, dtype=F64, generator=torch.Generator().manual_seed(14))
    std = torch.exp(-rate)
    exact = torch.distributions.Normal(0.0, std[:, None]).log_prob(x).sum(dim=1)
    field, extras = _Conditional(), {"rate": rate}
    lp = cnftools.log_likelihood(field, x, extras=extras, rtol=1e-10, atol=1e-10).log_prob
    # rtol = atol = 1e-10 solves of states of size up to ~50: 1e-9 relative leaves margin
    torch.testing.assert_close(lp, exact, rtol=1e-9, atol=1e-8)
    acc = cnftools.log_likelihood(field, x, extras=extras, accuracy=1e-8).log_prob
    torch.testing.assert_close(acc, exact, rtol=0, atol=1e-8)
    hutch = cnftools.log_likelihood(
        field, x, extras=extras, estimator=cnftools.Hutchinson(2), rtol=1e-10, atol=1e-10
    ).log_prob
    # Rademacher probes are exact for a diagonal Jacobian
    torch.testing.assert_close(hutch, exact, rtol=1e-9, atol=1e-8)
    x1 = cnftools.sample(field, x, extras=extras, rtol=1e-10, atol=1e-10).x
    torch.testing.assert_close(x1, x * std[:, None], rtol=0, atol=1e-8)
    paired = cnftools.sample_with_log_prob(field, x, extras=extras, rtol=1e-10, atol=1e-10)
    x1, lp1 = paired.x, paired.log_prob
    exact1 = torch.distributions.Normal(0.0, std[:, None]).log_prob(x1).sum(dim=1)
    torch.testing.assert_close(lp1, exact1, rtol=1e-9, atol=1e-8)


def test_field_in_torchdiffeq_order_gets_the_hint() -> None:
    with pytest.raises(RuntimeError, match="f\\(t, x\\)"):
        cnftools.log_likelihood(lambda t, x: x * t, torch.zeros(4, 3, dtype=F64))


# ----------------------------------------------------------------------------------------------
# What the dtype or the divergence cannot deliver is refused before any work (issue 20.7)


def _never_called(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    raise AssertionError("the field was called: the refusal came after work started")


@pytest.mark.parametrize(
    ("dtype", "keywords", "match"),
    [
        (
            torch.float64,
            {"accuracy": 1e-6, "estimator": cnftools.Hutchinson()},
            "Hutchinson probes",
        ),
        (torch.float32, {"accuracy": 1e-7}, "below what torch.float32 can reach"),
        (torch.float64, {"accuracy": 1e-15}, "below what torch.float64 can reach"),
        (torch.float64, {"rtol": 1e-20, "atol": 1e-20}, "below torch.float64's rounding"),
        (torch.float32, {"rtol": 1e-12, "atol": 1e-12}, "or float64 data"),
    ],
)
def test_out_of_reach_requests_are_refused_before_work(dtype, keywords, match) -> None:
    x = torch.zeros(3, 2, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        cnftools.log_likelihood(_never_called, x, **keywords)


def test_float32_accuracy_within_reach_is_met() -> None:
    """float32, accuracy 1e-4 nats (above the 1.2e-5 floor): the true error against the closed
    form is below the target for every row; the tolerance never tightens below 4 eps."""
    marginal, x, exact = _gaussian_case(2, 6)
    with pytest.warns(RuntimeWarning, match="the field's own rounding"):
        result = cnftools.log_likelihood(_Opaque(marginal), x.float(), accuracy=1e-4)
    assert bool(((result.log_prob.double() - exact).abs() <= 1e-4).all())
    assert result.config.rtol >= 4 * torch.finfo(torch.float32).eps


def test_accuracy_keeps_the_estimate_it_has_when_a_tighter_solve_fails(monkeypatch) -> None:
    """A refinement round that cannot be solved (here: made to fail) leaves the rows with the value
    and estimate of the last solve, and the warning says why they did not reach the target."""
    monkeypatch.setattr("cnftools._ode.ACCURACY_PLAN", ((0.0, "dopri5", 300.0),))
    marginal, x, exact = _gaussian_case(2, 8, seed=1)
    calls = {"n": 0}
    original = accuracy_module.one_solve

    def failing_third(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] >= 3:
            raise cnftools.SolverError("made to fail")
        return original(*args, **kwargs)

    monkeypatch.setattr(accuracy_module, "one_solve", failing_third)
    with pytest.warns(RuntimeWarning, match="not reached .* solve failed: made to fail"):
        result = cnftools.log_likelihood(_Opaque(marginal), x, accuracy=1e-9)
    error = (result.log_prob - exact).abs()
    assert bool((error <= result.error_estimate + 1e-13).all())  # still an honest estimate


@pytest.mark.parametrize(
    ("prior", "error", "match"),
    [
        (
            MultivariateNormal(torch.zeros(2), torch.eye(2)),
            TypeError,
            r"prior samples torch.float32, but the computation runs in torch.float64",
        ),
        (
            MultivariateNormal(torch.zeros(3, dtype=F64), torch.eye(3, dtype=F64)),
            ValueError,
            r"prior must have event_shape \(2,\)",
        ),
    ],
    ids=["prior dtype", "prior event_shape"],
)
def test_sample_with_log_prob_refuses_a_prior_that_disagrees_with_z0(prior, error, match) -> None:
    """The draws z0 set dtype and event shape; a prior that disagrees is refused before the solve
    (0.1 had dtype=/event_shape= keywords that could disagree; 0.2 has only z0)."""
    with pytest.raises(error, match=match):
        cnftools.sample_with_log_prob(_never_called, torch.zeros(3, 2, dtype=F64), prior)


def test_sample_with_log_prob_no_longer_draws() -> None:
    """0.1's ``sample_with_log_prob(v, n, event_shape=..., dtype=..., generator=...)`` drew its own
    z0; 0.2 takes the draws: a count is refused (the drawing keywords: the test below)."""
    with pytest.raises(TypeError, match=r"z0 must be a torch\.Tensor, got int"):
        cnftools.sample_with_log_prob(_never_called, 5)


@pytest.mark.parametrize(
    "keyword",
    [{"event_shape": (2,)}, {"dtype": F64}, {"device": "cpu"}, {"n": 5}],
    ids=lambda k: next(iter(k)),
)
def test_sample_with_log_prob_drawing_keywords_are_gone(keyword: dict) -> None:
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{next(iter(keyword))}'"):
        cnftools.sample_with_log_prob(_never_called, torch.zeros(3, 2, dtype=F64), **keyword)


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("VE(0.1, 5)", "gaussian d=3"),
        ("VE(0.1, 5)", "mixture K=4 d=2"),
        ("VP(0.1, 20)", "gaussian d=3"),
    ],
)
def test_sample_with_log_prob_from_a_prior_matches_closed_form(path: str, data: str) -> None:
    """z0 drawn from p_0 (not N(0, I) on these paths), passed with that prior: the samples'
    log-density is log p_1 from scipy, and their prior term is p_0's density at z0 (scipy)."""
    case = DATA_CASES[data]
    marginal = case.marginal(_build_path(path))
    prior = _exact_p0(case, path)
    with torch.random.fork_rng():
        torch.manual_seed(15)
        z0 = prior.sample((6,))
    result = cnftools.sample_with_log_prob(marginal, z0, prior, **TIGHT)
    assert isinstance(result, LikelihoodResult) and torch.equal(result.z0, z0)
    a0, s20 = _schedule(path, 0.0)
    w, means, covs = _components(case)
    eye = np.eye(case.d)
    log_p0 = special.logsumexp(
        np.stack(
            [
                np.log(wk)
                + stats.multivariate_normal(a0 * m, a0**2 * c + s20 * eye).logpdf(z0.numpy())
                for wk, m, c in zip(w, means, covs, strict=True)
            ],
            axis=-1,
        ).reshape(len(z0), -1),
        axis=-1,
    )
    # The prior term is evaluated, not solved: float64 rounding of two density formulas.
    np.testing.assert_allclose(result.log_prior.numpy(), log_p0, rtol=0, atol=1e-10)
    # rtol = atol = 1e-10 forward solve of a smooth field: 1e-7 as for log_likelihood above.
    np.testing.assert_allclose(
        result.log_prob.numpy(), _log_p(case, path, result.x, 1.0), rtol=0, atol=1e-7
    )
