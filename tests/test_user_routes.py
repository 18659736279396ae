"""The routes users take, end to end: every path kind x marginal x entry point x form of t.

Issue 11.1: ``GaussianMarginal(AffineGaussianPath(lambda t: t, lambda t: 1 - 0.9 * t), m, S)``
crashed in ``log_likelihood``, ``sample``, ``sample_with_log_prob`` and ``dataset_nll`` (forward-
mode autograd on an expanded ``t``), and our tests missed it because they used our own paths. Here
hypothesis draws the path (OT, VE, VP, a user's affine path, a user's general ``GaussianPath``,
all from :mod:`cnftools.testing`), the data distribution (Gaussian, mixture, empirical) and the
points; pytest parametrizes the discrete axes: the entry point and the form of ``t`` (float, 0-d,
``(B,)``, a scalar expanded to ``(B,)``).

Every check compares against an independent computation:

- velocity: :math:`u_t(x) = \\mathbb E[u_t(x|x_1) \\mid x_t = x] = u_t(x \\mid \\mathbb E[x_1|x])`
  (the conditional field is affine in :math:`x_1`), with the posterior mean of the mixture
  computed here from the path's schedules; 1e-9 relative (float64 roundoff amplified by at most
  the conditioning :math:`1/s_t^2`, about 1e4 at the times drawn);
- divergence: the closed form against the trace of the full autograd Jacobian, 1e-9 relative to
  the Jacobian's scale (as :func:`cnftools.testing.assert_divergence_matches_jacobian`);
- continuity: the relative residual of the continuity equation, 1e-9 (float64);
- ODE entry points (``log_likelihood``, ``sample_with_log_prob`` then ``log_likelihood``,
  ``dataset_nll``) against the closed-form :math:`\\log p_1`: dopri5 at rtol = atol = 1e-7 with
  the per-sample error norm (every row meets the tolerance, not only the batch's RMS: with the
  RMS norm a hard row of a nearly singular empirical case, VE with sigma_min = 1e-3, reached
  1.3e-4 to 4.4e-4 nats), compared at 1e-4 nats + 1e-5 |log p|, a thousand times the solver's
  tolerance and a hundred times its relative tolerance (the controller bounds each step's error by
  atol + rtol |y|, and the log-density column reaches |log p| ~ 25 on nearly singular empirical
  data: 1.2e-4 nats measured there with log p = 14); at rtol = atol = 1e-8 the error of the
  integrated divergence measured on these cases was at most 2e-6 nats. The ODE routes pass ``t`` to the field as
  the solver does (a 0-d time expanded to ``(B,)``), the case that crashed.

Empirical data on a path with :math:`s_1 = 0` (VP, OT with ``sigma_min = 0``) has no density at
:math:`t = 1`; those routes must be refused loudly, and are checked to be. A general
``GaussianPath`` (std depending on :math:`x_1`) has no closed-form marginals: the marginals refuse
it, and its routes are checked on the conditional path :math:`p_t(x|x_1)` instead (whose
:math:`p_1` is known), except ``dataset_nll``, which needs a field that does not depend on the row.

The default run draws few examples (the ODE checks one per combination, the field checks five);
``-m slow`` runs more.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cnftools
from cnftools.nll import Execution
from cnftools.paths import AffineGaussianPath, GaussianPath
from cnftools.testing import (
    assert_divergence_matches_jacobian,
    assert_generates,
    assert_log_likelihood_close,
    assert_theorem3,
    gaussian_mixtures,
    ot_paths,
    points,
    quick_settings,
    spd_matrices,
    times,
    user_affine_paths,
    user_paths,
    ve_paths,
    vp_paths,
)

F64 = torch.float64
BATCH = 3
AFFINE_PATHS = {"OT": ot_paths, "VE": ve_paths, "VP": vp_paths, "user affine": user_affine_paths}
MARGINALS = ["gaussian", "mixture", "empirical"]
T_FORMS: dict[str, Callable[[float, int], float | torch.Tensor]] = {
    "float": lambda t, b: t,
    "0-d": lambda t, b: torch.tensor(t, dtype=F64),
    "(B,)": lambda t, b: torch.full((b,), t, dtype=F64),
    "expanded (B,)": lambda t, b: torch.tensor(t, dtype=F64).expand(b),
}
SOLVER = {"rtol": 1e-7, "atol": 1e-7}
ODE_ATOL = 1e-4  # nats; see the module docstring
ODE_RTOL = 1e-5  # relative to |log p|: the controller bounds errors by atol + rtol |y|
FIELD_RTOL = 1e-9
FIELD_EXAMPLES, ODE_EXAMPLES, SLOW_EXAMPLES = 5, 1, 10


# --- drawing a route ----------------------------------------------------------------------------


class Mixture:
    """A data distribution sum_k pi_k N(m_k, S_k) (S_k = 0: empirical data), kept for reference."""

    def __init__(self, means: torch.Tensor, covs: torch.Tensor | None, weights: torch.Tensor):
        self.means, self.weights = means, weights
        k, d = means.shape
        self.covs = torch.zeros(k, d, d, dtype=F64) if covs is None else covs
        self.empirical = covs is None

    def marginal(self, path: GaussianPath):
        if self.empirical:
            return cnftools.MixtureMarginal(path, self.means, None, self.weights)
        if self.means.shape[0] == 1:
            return cnftools.GaussianMarginal(path, self.means[0], self.covs[0])
        return cnftools.MixtureMarginal(path, self.means, self.covs, self.weights)

    def posterior_mean(self, path: AffineGaussianPath, x: torch.Tensor, t: float) -> torch.Tensor:
        """E[x_1 | x_t = x] from Bayes' rule with the path's own schedules a_t, s_t."""
        tt = torch.full((1,), t, dtype=F64)
        a, s = float(path.signal_scale(tt)), float(path.noise_scale(tt))
        d = x.shape[1]
        sigma = a**2 * self.covs + s**2 * torch.eye(d, dtype=F64)  # (K, d, d)
        centred = x[:, None, :] - a * self.means[None]  # (B, K, d)
        components = torch.distributions.MultivariateNormal(a * self.means, sigma)
        log_w = torch.log(self.weights) + components.log_prob(x[:, None, :])  # (B, K)
        w = torch.softmax(log_w, dim=1)
        solved = torch.linalg.solve(sigma[None], centred.unsqueeze(-1)).squeeze(-1)
        per_component = self.means[None] + a * torch.einsum("kij,bkj->bki", self.covs, solved)
        return (w[..., None] * per_component).sum(dim=1)


def _draw_mixture(data: st.DataObject, kind: str, dim: int) -> Mixture:
    if kind == "gaussian":
        mean = data.draw(points(dim, min_batch=1, max_batch=1, scale=2.0), label="mean")
        cov = data.draw(spd_matrices(dim, min_eigenvalue=0.1, max_eigenvalue=2.0), label="cov")
        return Mixture(mean, cov[None], torch.ones(1, dtype=F64))
    if kind == "mixture":
        params = data.draw(gaussian_mixtures(dim, min_components=2, max_components=3), "mixture")
        return Mixture(params.means, params.covs, params.weights)
    atoms = data.draw(points(dim, min_batch=2, max_batch=5, scale=2.0), label="data points")
    return Mixture(atoms, None, torch.full((atoms.shape[0],), 1.0 / atoms.shape[0], dtype=F64))


def _singular_at_one(path: AffineGaussianPath) -> bool:
    return float(path.noise_scale(torch.ones(1, dtype=F64))) == 0.0


def _route(data: st.DataObject, path_kind: str, marginal_kind: str):
    path = data.draw(AFFINE_PATHS[path_kind](), label="path")
    dim = data.draw(st.integers(1, 3), label="d")
    mixture = _draw_mixture(data, marginal_kind, dim)
    seed = data.draw(st.integers(0, 2**16), label="seed")
    return path, mixture, mixture.marginal(path), torch.Generator().manual_seed(seed)


# --- field entry points, every form of t -------------------------------------------------------


def _check_field_entry(entry, path, mixture, marginal, x, t, t_form):
    if entry == "velocity":
        got = marginal(x, t_form)
        want = path.conditional_velocity(x, t_form, mixture.posterior_mean(path, x, t))
        scale = float(want.abs().max()) + 1e-300
        error = float((got - want).abs().max()) / scale
        assert error <= FIELD_RTOL, f"marginal velocity vs Theorem 1: {error:.3e}"
    elif entry == "divergence":
        # atol 1e-12: near t = 0 the closed form sums O(1) terms that cancel to ~0 (|d ss'/s^2|,
        # a'^2 Cov / s^2), so both sides carry O(1e-16) absolute roundoff around a ~0 value (seen:
        # 4e-17 against a Jacobian scale of 1e-16); relative to the Jacobian alone that fails.
        closed = marginal.divergence(x, t_form)
        field = lambda z, s: marginal(z, t_form)  # noqa: E731
        assert_divergence_matches_jacobian(field, x, t, closed, rtol=FIELD_RTOL, atol=1e-12)
    else:
        assert_generates(marginal.log_prob, marginal, x, t_form, rtol=FIELD_RTOL)


@pytest.mark.parametrize("t_form", sorted(T_FORMS))
@pytest.mark.parametrize("entry", ["velocity", "divergence", "continuity"])
@pytest.mark.parametrize("marginal_kind", MARGINALS)
@pytest.mark.parametrize("path_kind", sorted(AFFINE_PATHS))
@quick_settings(max_examples=FIELD_EXAMPLES)
@given(data=st.data(), t=times(margin=2e-2))
def test_marginal_fields_on_every_path_and_form_of_t(
    path_kind, marginal_kind, entry, t_form, data, t
):
    path, mixture, marginal, generator = _route(data, path_kind, marginal_kind)
    x = marginal.sample(BATCH, t, generator)
    _check_field_entry(entry, path, mixture, marginal, x, t, T_FORMS[t_form](t, BATCH))


# --- ODE entry points ---------------------------------------------------------------------------


def _prior_draws(prior: torch.distributions.Distribution, generator: torch.Generator):
    """BATCH draws z0 from the prior, seeded from the route's generator (a torch Distribution
    samples from the global generator: seeded inside fork_rng, left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(generator.initial_seed()))
        return prior.sample((BATCH,))


def _check_ode_entry(entry, path, marginal, generator, near_point_masses=False) -> None:
    prior = marginal.prior()
    closed_form = lambda x: marginal.log_prob(x, 1.0)  # noqa: E731
    if entry == "log_likelihood":
        x = marginal.sample(BATCH, 1.0, generator)
        assert_log_likelihood_close(
            marginal,
            x,
            closed_form,
            prior,
            atol=ODE_ATOL,
            rtol=ODE_RTOL,
            config=cnftools.SolverConfig(**SOLVER),
        )
    elif entry == "sample -> log_likelihood":
        z0 = _prior_draws(prior, generator)
        result = cnftools.sample_with_log_prob(marginal, z0, prior, **SOLVER)
        x, log_p = result.x, result.log_prob
        torch.testing.assert_close(log_p, closed_form(x), rtol=ODE_RTOL, atol=ODE_ATOL)
        assert_log_likelihood_close(
            marginal,
            x,
            log_p,
            prior,
            atol=ODE_ATOL,
            rtol=ODE_RTOL,
            config=cnftools.SolverConfig(**SOLVER),
        )
        # plain sampling from the same z0 lands where sample_with_log_prob does (solver tolerance)
        torch.testing.assert_close(
            cnftools.sample(marginal, z0, **SOLVER).x, x, rtol=ODE_RTOL, atol=ODE_ATOL
        )
    else:
        x = marginal.sample(BATCH, 1.0, generator)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rows failing loudly are warned about; checked below
            frame = cnftools.dataset_nll(
                marginal,
                x,
                prior=prior,
                config=cnftools.SolverConfig(**SOLVER),
                execution=Execution(batch_size=2, progress=False),
            )
        ok = torch.tensor((frame["status"] == "ok").to_numpy())
        failed = [status for status in frame["status"] if status != "ok"]
        # Every row is exact; only nearly point-mass data may fail a row, loudly (underflow).
        assert near_point_masses or not failed, failed
        assert all("underflow" in status for status in failed), failed
        nll = torch.tensor(frame["nll"].to_numpy(), dtype=F64)
        torch.testing.assert_close(nll[ok], -closed_form(x)[ok], rtol=ODE_RTOL, atol=ODE_ATOL)


def _check_ode_refused(entry, marginal, generator) -> None:
    """Empirical data on a path with s_1 = 0: no density at t = 1, so every route refuses."""
    prior = marginal.prior()
    x = marginal.means[:BATCH].clone()
    message = "undefined where s_t = 0"
    if entry == "log_likelihood":
        with pytest.raises(ValueError, match=message):
            cnftools.log_likelihood(marginal, x, prior, **SOLVER)
    elif entry == "sample -> log_likelihood":
        # Sampling runs towards the point masses: the step size underflows (a SolverError that
        # says so) before, or the field is refused at, t = 1. Either way no number comes back.
        with pytest.raises((ValueError, cnftools.SolverError), match=f"{message}|underflow"):
            z0 = _prior_draws(prior, generator)
            cnftools.sample_with_log_prob(marginal, z0, prior, **SOLVER)
    else:
        # Refused either by an exception, or (today) row by row: no row may report a value.
        try:
            frame = cnftools.dataset_nll(
                marginal, x, prior, execution=Execution(batch_size=2, progress=False)
            )
        except (ValueError, RuntimeError) as error:
            text = f"{error} {error.__cause__}"
            assert message in text or "underflow" in text, text
        else:
            assert "ok" not in set(frame["status"]) and bool(frame["nll"].isna().all())


ODE_ENTRIES = ["log_likelihood", "sample -> log_likelihood", "dataset_nll"]


def _ode_route(data, path_kind, marginal_kind, entry):
    path, mixture, marginal, generator = _route(data, path_kind, marginal_kind)
    s_1 = float(path.noise_scale(torch.ones(1, dtype=F64)))
    if mixture.empirical and s_1 == 0:
        _check_ode_refused(entry, marginal, generator)
    elif mixture.empirical and s_1 < 1e-2:
        # Nearly point masses (OT with sigma_min = 1e-300, say): exact, or a loud step-size
        # underflow (SolverError, or dataset_nll's RowsFailedError chaining it); never a number.
        try:
            _check_ode_entry(entry, path, marginal, generator, near_point_masses=True)
        except RuntimeError as error:
            assert "underflow" in f"{error} {error.__cause__}", error
    else:
        _check_ode_entry(entry, path, marginal, generator)


@pytest.mark.parametrize("entry", ODE_ENTRIES)
@pytest.mark.parametrize("marginal_kind", MARGINALS)
@pytest.mark.parametrize(
    "path_kind",
    # The user's path (the route that crashed) runs by default; the built-in paths' ODE routes
    # cost 2-10 s each on one core and run with -m slow (the field checks above cover them).
    [
        pytest.param(kind, marks=[] if kind == "user affine" else [pytest.mark.slow])
        for kind in sorted(AFFINE_PATHS)
    ],
)
@quick_settings(max_examples=ODE_EXAMPLES)
@given(data=st.data())
def test_marginal_ode_routes_on_every_path(path_kind, marginal_kind, entry, data):
    _ode_route(data, path_kind, marginal_kind, entry)


@pytest.mark.slow
@pytest.mark.parametrize("entry", ODE_ENTRIES)
@pytest.mark.parametrize("marginal_kind", MARGINALS)
@pytest.mark.parametrize("path_kind", sorted(AFFINE_PATHS))
@quick_settings(max_examples=SLOW_EXAMPLES)
@given(data=st.data())
def test_marginal_ode_routes_on_every_path_many_examples(path_kind, marginal_kind, entry, data):
    _ode_route(data, path_kind, marginal_kind, entry)


# --- the reproducer of the issue, verbatim --------------------------------------------------------


def test_issue_reproducer_gaussian_marginal_on_a_users_affine_path():
    """Regression (issue 11.1): every call below raised "more than one element of the written-to
    tensor refers to a single memory location"."""
    path = cnftools.AffineGaussianPath(lambda t: t, lambda t: 1 - 0.9 * t)
    m = torch.tensor([0.5, -1.0], dtype=F64)
    S = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=F64)
    marginal = cnftools.GaussianMarginal(path, m, S)
    generator = torch.Generator().manual_seed(0)
    x = marginal.sample(4, 1.0, generator)
    log_p = cnftools.log_likelihood(marginal, x, marginal.prior(), **SOLVER).log_prob
    torch.testing.assert_close(log_p, marginal.log_prob(x, 1.0), rtol=ODE_RTOL, atol=ODE_ATOL)
    z0 = marginal.sample(4, 0.0, generator)
    paired = cnftools.sample_with_log_prob(marginal, z0, marginal.prior())
    y, log_q = paired.x, paired.log_prob
    torch.testing.assert_close(log_q, marginal.log_prob(y, 1.0), rtol=0, atol=1e-3)  # rtol 1e-5
    assert cnftools.sample(marginal, marginal.prior().sample((4,))).x.shape == (4, 2)
    frame = cnftools.dataset_nll(
        marginal, x, marginal.prior(), execution=Execution(batch_size=2, progress=False)
    )
    assert list(frame["status"]) == ["ok"] * 4
    t = torch.tensor(0.3, dtype=F64)
    torch.testing.assert_close(
        path.conditional_velocity(x, t.expand(4), x),
        cnftools.OTPath(0.1).conditional_velocity(x, 0.3, x),
    )


# --- a user's general GaussianPath: refused by closed-form marginals, checked conditionally -------


@pytest.mark.parametrize("marginal_kind", MARGINALS)
@quick_settings(max_examples=3)
@given(data=st.data())
def test_general_user_path_is_refused_by_closed_form_marginals(marginal_kind, data):
    path = data.draw(user_paths(), label="path")
    mixture = _draw_mixture(data, marginal_kind, 2)
    with pytest.raises(TypeError, match="path must be an AffineGaussianPath"):
        mixture.marginal(path)


def _conditional(path: GaussianPath, x1: torch.Tensor):
    return (
        lambda x, t: path.log_prob(x, t, x1),
        lambda x, t: path.conditional_velocity(x, t, x1),
    )


@pytest.mark.parametrize("t_form", sorted(T_FORMS))
@pytest.mark.parametrize("entry", ["velocity", "divergence", "continuity"])
@quick_settings(max_examples=FIELD_EXAMPLES)
@given(data=st.data(), path=user_paths(), t=times(margin=2e-2), seed=st.integers(0, 2**16))
def test_general_user_path_fields_every_form_of_t(entry, t_form, data, path, t, seed):
    dim = data.draw(st.integers(1, 3), label="d")
    x1 = data.draw(points(dim, min_batch=BATCH, max_batch=BATCH), label="x1")
    t_in = T_FORMS[t_form](t, BATCH)
    generator = torch.Generator().manual_seed(seed)
    x = path.sample(t_in, x1, generator)
    log_prob, velocity = _conditional(path, x1)
    if entry == "velocity":
        assert_theorem3(path, x1, t_in, generator=generator)  # d/dt psi_t = u_t(psi_t | x1)
    elif entry == "divergence":
        # isotropic std (B, 1): div u_t(.|x1) = d * (variance rate / variance), exactly
        closed = (x1.shape[1] * path.variance_rate(t_in, x1) / path.std(t_in, x1) ** 2).reshape(
            BATCH
        )
        assert_divergence_matches_jacobian(velocity, x, t_in, closed, rtol=FIELD_RTOL)
    else:
        assert_generates(log_prob, velocity, x, t_in, rtol=FIELD_RTOL)


@pytest.mark.parametrize("entry", ["log_likelihood", "sample -> log_likelihood"])
@quick_settings(max_examples=2)
@given(
    path=user_paths(), x1=points(2, min_batch=BATCH, max_batch=BATCH), seed=st.integers(0, 2**16)
)
def test_general_user_path_ode_routes(entry, path, x1, seed):
    """mu_0 = 0 and sigma_0 = 1 for these paths, so the prior is N(0, I), and p_1(.|x1) is known."""
    log_prob, velocity = _conditional(path, x1)
    generator = torch.Generator().manual_seed(seed)
    if entry == "log_likelihood":
        x = path.sample(1.0, x1, generator)
        assert_log_likelihood_close(
            velocity,
            x,
            lambda x: log_prob(x, 1.0),
            atol=ODE_ATOL,
            rtol=ODE_RTOL,
            config=cnftools.SolverConfig(**SOLVER),
        )
    else:
        z0 = torch.randn(x1.shape, generator=generator, dtype=F64)
        result = cnftools.sample_with_log_prob(velocity, z0, **SOLVER)
        x, log_p = result.x, result.log_prob
        torch.testing.assert_close(log_p, log_prob(x, 1.0), rtol=ODE_RTOL, atol=ODE_ATOL)
        assert_log_likelihood_close(
            velocity, x, log_p, atol=ODE_ATOL, rtol=ODE_RTOL, config=cnftools.SolverConfig(**SOLVER)
        )


@pytest.mark.parametrize(("batch", "atoms", "dim"), [(3, 3, 3), (2, 2, 2), (1, 1, 1), (4, 3, 3)])
def test_empirical_velocity_when_batch_equals_atoms_equals_dim(batch, atoms, dim):
    """Found by the property above: with B = K = d the empirical marginal's velocity was wrong by
    order one (a (K, d) tensor of data points was read as (B, K) per-row values). Against the
    Theorem 1 average computed from the path alone, 1e-12 relative (float64 roundoff)."""
    generator = torch.Generator().manual_seed(batch + 10 * atoms + 100 * dim)
    data = torch.randn(atoms, dim, generator=generator, dtype=F64)
    mixture = Mixture(data, None, torch.full((atoms,), 1.0 / atoms, dtype=F64))
    path = cnftools.OTPath(0.3)
    marginal = mixture.marginal(path)
    x = torch.randn(batch, dim, generator=generator, dtype=F64)
    want = path.conditional_velocity(x, 0.7, mixture.posterior_mean(path, x, 0.7))
    torch.testing.assert_close(marginal(x, 0.7), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        marginal.posterior_mean(x, 0.7), mixture.posterior_mean(path, x, 0.7)
    )
