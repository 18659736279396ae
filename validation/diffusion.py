r"""Diffusion is flow matching: the probability-flow ODE of the VP and VE SDEs is the marginal field.

Song et al. (2021) turn the SDE :math:`dx = f\,d\tau + g\,dW` (diffusion time :math:`\tau = 1 - t`)
into the probability-flow ODE :math:`dx/d\tau = f - \tfrac12 g^2 \nabla \log p_\tau`. Written here
from the SDE coefficients alone (not from the path code) and mapped to cnftools time:

- VP: :math:`f = -\tfrac12 \beta(\tau) x`, :math:`g^2 = \beta(\tau)`, so
  :math:`dx/dt = \tfrac12 \beta(1 - t)\,(x + \nabla \log p_t(x))`;
- VE: :math:`f = 0`, :math:`g^2 = d\sigma_\tau^2/d\tau = 2 \ln(\sigma_{\max}/\sigma_{\min})\,
  \sigma_\tau^2`, so :math:`dx/dt = \ln(\sigma_{\max}/\sigma_{\min})\,\sigma_{1-t}^2\,
  \nabla \log p_t(x)`.

Rows, for Gaussian and mixture data (empirical data too in full mode) with the exact scores:

- the probability-flow field equals the closed-form marginal field of ``VPPath`` / ``VEPath``.
  Negative controls: the score term with the wrong sign, and without the factor 1/2.
- the parametrization conversions reproduce it: ``velocity_from_score`` (exact score),
  ``velocity_from_epsilon`` (:math:`\hat\varepsilon = -s_t \nabla\log p_t`) and
  ``velocity_from_data`` (the exact posterior mean :math:`E[x_1 \mid x_t = x]`, computed here from
  the Gaussian conditioning formula), and the inverses give back the score and posterior mean.
- a DDPM-style model's bits/dim by the ODE equals the closed form: an exact noise-predicting
  "model" of Gaussian data (timestep labels, a diffusers-like config) wrapped by
  :func:`cnftools.interop.from_diffusers`, through :func:`cnftools.log_likelihood` with the exact
  :math:`p_0`, against :math:`-\log_2 q(x) / d`; the same for its ``v`` prediction and for a VE
  score model through :func:`cnftools.as_velocity`. Negative control: the model read with the time
  reversed (timestep :math:`(N-1)t`) must miss by far more than the solver error.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator

import torch
from torch import Tensor

import cnftools
from cnftools.cases import DATA_CASES, DataCase
from cnftools.interop import from_diffusers
from cnftools.paths import AffineGaussianPath, VEPath, VPPath
from cnftools.validation._framework import Check, Context

__all__ = ["exact_posterior_mean", "probability_flow_velocity", "run"]

SECTION = 13
SECTIONS = (12, 13)  # the theory sections its rows check
TITLE = "Diffusion is flow matching: probability-flow ODE, parametrizations, DDPM bits/dim"

_PATHS = {
    "VP(0.1, 20)": lambda: VPPath(0.1, 20.0),
    "VE(0.1, 5)": lambda: VEPath(0.1, 5.0),
    "VP(1, 5)": lambda: VPPath(1.0, 5.0),
    "VE(0.01, 50)": lambda: VEPath(0.01, 50.0),
}
_QUICK_PATHS = ("VP(0.1, 20)", "VE(0.1, 5)")
_QUICK_DATA = ("gaussian d=3", "mixture K=4 d=2")
_FULL_DATA = (*_QUICK_DATA, "gaussian d=8", "mixture K=3 d=1", "empirical N=40 d=3 (weighted)")


def probability_flow_velocity(
    path: VPPath | VEPath, score: Tensor, x: Tensor, t: Tensor, *, half: float = 0.5
) -> Tensor:
    r"""The probability-flow ODE :math:`-(f - \tfrac12 g^2 \nabla\log p)` at :math:`\tau = 1 - t`.

    Written from the SDE coefficients only (``beta_min, beta_max`` or ``sigma_min, sigma_max``),
    not from the path's schedule methods. ``half`` is the factor in front of :math:`g^2`; the
    negative controls set it wrong.

    Args:
        path: the VP or VE path whose SDE is meant.
        score: :math:`\nabla\log p_t(x)`, shape ``(B, d)``.
        x: points, shape ``(B, d)``.
        t: cnftools times, shape ``(B,)``.

    Returns:
        :math:`dx/dt`, shape ``(B, d)``.
    """
    tau = (1 - t)[:, None]
    if isinstance(path, VPPath):
        beta = path.beta_min + tau * (path.beta_max - path.beta_min)
        drift = -0.5 * beta * x
        g2 = beta
    elif isinstance(path, VEPath):
        log_ratio = math.log(path.sigma_max / path.sigma_min)
        sigma2 = path.sigma_min**2 * torch.exp(2 * tau * log_ratio)
        drift = torch.zeros_like(x)
        g2 = 2 * log_ratio * sigma2
    else:
        raise TypeError(f"path must be a VPPath or VEPath, got {type(path).__name__}")
    return -(drift - half * g2 * score)


def exact_posterior_mean(case: DataCase, path: AffineGaussianPath, x: Tensor, t: Tensor) -> Tensor:
    r"""The posterior mean :math:`E[x_1 \mid x_t = x]` of a data case, by Gaussian conditioning.

    For a mixture :math:`\sum_k \pi_k \mathcal N(m_k, S_k)` (a Gaussian: one component; empirical
    data: :math:`S_k = 0`),

    .. math::

        E[x_1 \mid x] = \sum_k w_k \big(m_k + a_t S_k \Sigma_k^{-1}(x - a_t m_k)\big),\quad
        \Sigma_k = a_t^2 S_k + s_t^2 I,\quad w \propto \pi_k \mathcal N(x; a_t m_k, \Sigma_k),

    with dense solves (no eigenbasis), independent of :mod:`cnftools.marginals`.

    Args:
        case: a :class:`~cnftools.cases.DataCase`.
        path: an affine path.
        x: points, shape ``(B, d)``.
        t: times, shape ``(B,)`` with :math:`s_t > 0` where ``S_k`` is singular.

    Returns:
        Shape ``(B, d)``.
    """
    p = case.parameters(x.dtype, x.device)
    if case.kind == "gaussian":
        means, weights = p["mean"][None], torch.ones(1, dtype=x.dtype, device=x.device)
        covs = p["cov"][None]
    else:
        means, weights = p["means"], p["weights"]
        covs = p.get("covs", torch.zeros(means.shape[0], case.d, case.d, dtype=x.dtype))
        covs = covs.to(x.device)
    a = path.signal_scale(t)[:, None, None]  # (B, 1, 1), against (B, K, d)
    s2 = path.noise_variance(t)[:, None, None, None]  # (B, 1, 1, 1), against (B, K, d, d)
    eye = torch.eye(case.d, dtype=x.dtype, device=x.device)
    sigma = a[..., None] ** 2 * covs[None] + s2 * eye  # (B, K, d, d)
    residual = x[:, None, :] - a * means[None]  # (B, K, d)
    solved = torch.linalg.solve(sigma, residual.unsqueeze(-1)).squeeze(-1)  # Σ⁻¹ (x − a m)
    log_det = torch.linalg.slogdet(sigma)[1]
    logits = torch.log(weights)[None] - 0.5 * ((residual * solved).sum(-1) + log_det)
    w = torch.softmax(logits, dim=1)  # (B, K)
    conditional = means[None] + a * (covs[None] @ solved.unsqueeze(-1)).squeeze(-1)
    return (w[..., None] * conditional).sum(dim=1)


def _relative(got: Tensor, expected: Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1.0))


def run(ctx: Context) -> Iterator[Check]:
    paths = sorted(_PATHS) if ctx.full else _QUICK_PATHS
    data = _FULL_DATA if ctx.full else _QUICK_DATA
    n_times, batch = (21, 8) if ctx.full else (8, 4)
    # float64: every side is a closed formula, roundoff only (observed <= 1e-13). float32: eps32
    # amplified by 1/s_t (s_t >= 0.03 on the grid) and by the mixture's log-sum-exp.
    exact = ctx.tolerance(1e-10, 2e-4)
    generator = ctx.generator(1301)
    for path_name in paths:
        path = _PATHS[path_name]()
        for data_name in data:
            case = DATA_CASES[data_name]
            marginal = case.marginal(path, dtype=ctx.dtype, device=ctx.device)
            t = torch.linspace(0.0, 0.98, n_times, dtype=ctx.dtype, device=ctx.device)
            t = t.repeat_interleave(batch)
            x = 1.5 * torch.randn(
                t.shape[0], case.d, generator=generator, dtype=ctx.dtype, device=ctx.device
            )
            subject = f"{data_name}, {path_name}, t in [0, 0.98]"
            yield from _field_rows(ctx, case, path, marginal, x, t, subject, exact)
    yield from _likelihood_rows(ctx)


def _field_rows(ctx, case, path, marginal, x, t, subject, exact) -> Iterator[Check]:
    u = marginal.velocity(x, t)
    score = marginal.score(x, t)
    flow = probability_flow_velocity(path, score, x, t)
    yield Check(
        "§13",
        "probability-flow ODE f − ½g²∇log p = marginal u_t",
        subject,
        _relative(flow, u),
        exact,
        "roundoff; error / max(1, max|u|)",
    )
    for label, wrong in (
        ("control: score term with the wrong sign", -score),
        ("control: g² without the ½", None),
    ):
        got = (
            probability_flow_velocity(path, wrong, x, t)
            if wrong is not None
            else probability_flow_velocity(path, score, x, t, half=1.0)
        )
        yield Check(
            "§13",
            label,
            subject,
            _relative(got, u),
            1e-3,
            "the wrong ODE differs from u_t by O(g² |∇log p|)",
            expect_fail=True,
        )
    s = torch.sqrt(path.noise_variance(t))[:, None]
    x1_hat = exact_posterior_mean(case, path, x, t)
    conversions = {
        "score": path.velocity_from_score(score, x, t),
        "epsilon": path.velocity_from_epsilon(-s * score, x, t),
        "data": path.velocity_from_data(x1_hat, x, t),
    }
    worst = max(_relative(v, u) for v in conversions.values())
    yield Check(
        "§13",
        "velocity_from_{score, epsilon, data}(exact) = u_t",
        subject,
        worst,
        exact,
        "roundoff; ε̂ = −s_t ∇log p_t, x̂₁ by Gaussian conditioning",
    )
    inverse = max(
        _relative(path.score_from_velocity(u, x, t), score),
        _relative(path.data_from_velocity(u, x, t), x1_hat),
        _relative(path.epsilon_from_velocity(u, x, t), -s * score),
    )
    yield Check(
        "§13",
        "{score, data, epsilon}_from_velocity(u_t) = exact",
        subject,
        inverse,
        exact,
        "roundoff; error / max(1, max|exact|)",
    )


def _scheduler(prediction_type: str) -> types.SimpleNamespace:
    """A diffusers-like DDPM config: N = 1000, linear betas 1e-4 .. 0.02 (VP(0.1, 20))."""
    config = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction_type": prediction_type,
    }
    return types.SimpleNamespace(config=config)


class _ExactDDPMModel:
    """An exact DDPM "model" of Gaussian data: timestep label in, ε̂ or v̂ out (as diffusers)."""

    def __init__(self, marginal, path: VPPath, kind: str, reverse_time: bool = False) -> None:
        self.marginal, self.path, self.kind, self.reverse = marginal, path, kind, reverse_time

    def __call__(self, x: Tensor, timestep: Tensor) -> Tensor:
        tau = timestep / 999
        t = tau if self.reverse else 1 - tau
        t = t.clamp(0, 1)
        score = self.marginal.score(x, t)
        a = self.path.signal_scale(t)[:, None]
        s = torch.sqrt(self.path.noise_variance(t))[:, None]
        eps = -s * score
        if self.kind == "epsilon":
            return eps
        x1_hat = (x - s * eps) / a
        return a * eps - s * x1_hat  # v = alpha eps - sigma x0


def _likelihood_rows(ctx: Context) -> Iterator[Check]:
    case = DATA_CASES["gaussian d=3"]
    d = case.d
    f64 = ctx.dtype == torch.float64
    tol = 1e-10 if f64 else 1e-6
    solver = {"rtol": tol, "atol": tol}
    bound = ctx.tolerance(1e-7, 1e-3)
    why = (
        f"dopri5 at rtol=atol={tol:g} (DDPM rows: the kink of the field frozen at "
        "t = 1 − 1e-5 adds ~2e-8)"
        if f64
        else "float32 rounding over ~100 steps of a ~5-nat log-density"
    )
    models = {}
    for kind in ("epsilon", "v_prediction"):
        path = VPPath(0.1, 20.0)
        marginal = case.marginal(path, dtype=ctx.dtype, device=ctx.device)
        model = _ExactDDPMModel(marginal, path, kind)
        field, wrapped_path = from_diffusers(model, _scheduler(kind))
        models[f"DDPM {kind} (from_diffusers), gaussian d=3"] = (field, marginal, wrapped_path)
    ve_path = VEPath(0.1, 5.0)
    ve_marginal = case.marginal(ve_path, dtype=ctx.dtype, device=ctx.device)
    ve_field = cnftools.as_velocity(
        lambda x, tau: ve_marginal.score(x, 1 - tau),
        ve_path,
        prediction="score",
        time=lambda t: 1 - t,
    )
    models["VE score (as_velocity), gaussian d=3"] = (ve_field, ve_marginal, ve_path)
    for i, (subject, (field, marginal, path)) in enumerate(models.items()):
        x = marginal.sample(8, 1.0, ctx.generator(1340 + i))
        result = cnftools.log_likelihood(field, x, marginal.prior(), **solver)
        bpd = -result.log_prob / (d * math.log(2))
        expected = -marginal.log_prob(x, 1.0) / (d * math.log(2))
        yield Check(
            "§12–13",
            "bits/dim of a diffusion model by the ODE = closed form",
            f"{subject}, {path!r}, NFE={result.nfe.forward}",
            float((bpd - expected).abs().max()),
            bound,
            why,
        )
    # Negative control: the epsilon model read with the time reversed.
    path = VPPath(0.1, 20.0)
    marginal = case.marginal(path, dtype=ctx.dtype, device=ctx.device)
    wrong = _ExactDDPMModel(marginal, path, "epsilon", reverse_time=True)
    field, _ = from_diffusers(wrong, _scheduler("epsilon"))
    x = marginal.sample(8, 1.0, ctx.generator(1339))
    log_prob = cnftools.log_likelihood(field, x, marginal.prior(), **solver).log_prob
    bpd = -log_prob / (d * math.log(2))
    expected = -marginal.log_prob(x, 1.0) / (d * math.log(2))
    yield Check(
        "§12–13",
        "control: DDPM timesteps reversed is rejected",
        "DDPM epsilon (from_diffusers), gaussian d=3",
        float((bpd - expected).abs().max()),
        1e-2,
        "the wrong field moves the density by O(1) bits/dim",
        expect_fail=True,
    )
