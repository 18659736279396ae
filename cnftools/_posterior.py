r"""Streamed posterior statistics over Gaussian components: the machinery of the closed-form
marginals (theory §9, §10).

For data :math:`q = \sum_k \pi_k \mathcal N(m_k, S_k)` (or weighted points, :math:`S_k = 0`) on an
affine path :math:`x_t = a_t x_1 + s_t x_0`, the posterior over components given :math:`x_t = x` has
weights :math:`w = \mathrm{softmax}(\ell)`, :math:`\ell_k = \log\pi_k + \log\mathcal N(x; a_t
m_k, \Sigma_k)`, :math:`\Sigma_k = a_t^2 S_k + s_t^2 I`. Every marginal statistic is a
:math:`w`-weighted mean of per-component closed forms (the divergence adds a weighted covariance).
This module computes them in one pass over the components, ``chunk`` components at a time:

- :class:`ScheduleAt`: the schedule :math:`a_t, s_t^2` (and on demand :math:`a_t', s_t s_t'`) at
  the times of a batch, checked once;
- :class:`OnlineSoftmax`: the streamed log-sum-exp, weighted means and weighted cross-covariance,
  chunks merged by Chan et al.'s pairwise formulas (no ``(B, K, d)`` tensor for the whole K);
- :func:`gaussian_components`: per-component closed forms in the eigenbasis of :math:`S_k`;
- :func:`mixture_posterior` and :func:`empirical_posterior`: the streamed passes for mixtures and
  for data points.

Private to :mod:`cnftools.marginals` (its public classes are the interface); documented here so
that the numerics can be read on their own. Shapes: ``x`` is ``(B, d)``; per-component values are
``(B, k)`` or ``(B, k, d)``; parameters are ``(k, d)`` and ``(k, d, d)``.

References:
    Chan, Golub, LeVeque, Updating formulae and a pairwise algorithm for computing sample
    variances (1979); Milakov and Gimelshein, Online normalizer calculation for softmax (2018).

Theory sections cited here (pages under ``docs/theory/``):

- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from cnftools.paths import AffineGaussianPath

__all__ = [
    "Components",
    "EmpiricalPosterior",
    "MixturePosterior",
    "OnlineSoftmax",
    "ScheduleAt",
    "empirical_posterior",
    "gaussian_components",
    "mixture_posterior",
]


# ----------------------------------------------------------------------------------------------
# The schedule at a batch of times
class ScheduleAt:
    r"""The path's schedule at a batch of times ``t`` of shape ``(B,)``: ``a`` :math:`= a_t` and
    ``s2`` :math:`= s_t^2`, checked finite and ``s2 >= 0``; :meth:`derivatives` gives
    :math:`(a_t', s_t s_t')` on demand. The ``require_*`` methods refuse point masses by name."""

    def __init__(self, path: AffineGaussianPath, t: Tensor) -> None:
        self.path = path
        self.t = t
        self.a = torch.broadcast_to(path.signal_scale(t), t.shape)
        self.s2 = torch.broadcast_to(path.noise_variance(t), t.shape)
        if not bool(torch.isfinite(self.a).all() & torch.isfinite(self.s2).all()):
            raise ValueError("the path's signal_scale or noise_variance is not finite at these t")
        if bool((self.s2 < 0).any()):
            raise ValueError("the path's noise_variance is negative at these t")

    def derivatives(self) -> tuple[Tensor, Tensor]:
        """``(a_t', s_t s_t')``, each of shape ``(B,)``."""
        da = torch.broadcast_to(self.path.signal_scale_derivative(self.t), self.t.shape)
        rate = torch.broadcast_to(self.path.noise_variance_rate(self.t), self.t.shape)
        return da, rate

    def require_positive_noise(self, what: str) -> None:
        bad = self.s2 <= 0
        if bool(bad.any()):
            raise ValueError(
                f"{what} of empirical data is undefined where s_t = 0 (p_t is a sum of point "
                f"masses), at t = {self.t[bad][:5].tolist()}; use a path with sigma_min > 0 "
                "or stop at t < 1"
            )

    def require_nondegenerate(self, what: str) -> None:
        bad = (self.s2 <= 0) & (self.a == 0)
        if bool(bad.any()):
            raise ValueError(
                f"{what} is undefined where a_t = s_t = 0 (p_t is a point mass at 0), "
                f"at t = {self.t[bad][:5].tolist()}"
            )


# ----------------------------------------------------------------------------------------------
# Streaming softmax statistics
def _weighted_mean(w: Tensor, v: Tensor) -> Tensor:
    """Σ_k w_bk v_bk for per-row values: ``w`` (B, k); ``v`` (B, k) or (B, k, d)."""
    if v.dim() == 2:
        return (w * v).sum(dim=1)
    return (w.unsqueeze(-1) * v).sum(dim=1)


class OnlineSoftmax:
    r"""Online softmax over components, merged chunk by chunk.

    Keeps :math:`\log \sum_k e^{\ell_k}`, the softmax-weighted means of named per-component values
    and, when ``pair = (p, q)`` names two of them, the weighted cross-covariance
    :math:`\sum_k w_k (p_k - \bar p)\cdot(q_k - \bar q)`. Chunks merge with Chan et al.'s pairwise
    formulas, so no (B, K, d) tensor is ever formed for the whole K, and centred sums avoid the
    cancellation of raw second moments.
    """

    def __init__(self, pair: tuple[str, str] | None = None) -> None:
        self.pair = pair
        self.top: Tensor | None = None
        self.mass: Tensor | None = None
        self.means: dict[str, Tensor] = {}
        self.cross: Tensor | None = None

    def add(
        self, logits: Tensor, values: dict[str, Tensor], shared: dict[str, Tensor] | None = None
    ) -> None:
        """Merge one chunk of components: ``logits`` (B, k); ``values`` per row and component,
        (B, k) or (B, k, d); ``shared`` the same for every row, (k, d) (e.g. data points). The
        two are passed apart so that no shape can be read as the other (B = k = d included)."""
        top = logits.max(dim=1).values
        e = torch.exp(logits - top.unsqueeze(1))
        mass = e.sum(dim=1)
        w = e / mass.unsqueeze(1)
        means = {name: _weighted_mean(w, v) for name, v in values.items()}
        means.update({name: w @ v for name, v in (shared or {}).items()})
        values = {**values, **(shared or {})}
        cross = None
        if self.pair is not None:
            p, q = self.pair
            pc = values[p] - means[p].unsqueeze(1)
            qc = pc if p == q else values[q] - means[q].unsqueeze(1)
            cross = (w * (pc * qc).sum(dim=-1)).sum(dim=1)
        if self.top is None:
            self.top, self.mass, self.means, self.cross = top, mass, means, cross
            return
        assert self.mass is not None
        new_top = torch.maximum(self.top, top)
        fa = self.mass * torch.exp(self.top - new_top)
        fb = mass * torch.exp(top - new_top)
        total = fa + fb
        alpha, beta = fa / total, fb / total
        deltas = {name: means[name] - self.means[name] for name in means}
        if self.pair is not None:
            assert self.cross is not None and cross is not None
            p, q = self.pair
            self.cross = (
                alpha * self.cross
                + beta * cross
                + alpha * beta * (deltas[p] * deltas[q]).sum(dim=-1)
            )
        self.means = {
            name: mean + (beta.unsqueeze(-1) if mean.dim() == 2 else beta) * deltas[name]
            for name, mean in self.means.items()
        }
        self.top, self.mass = new_top, total

    def log_normalizer(self) -> Tensor:
        assert self.top is not None and self.mass is not None
        return self.top + torch.log(self.mass)


# ----------------------------------------------------------------------------------------------
# Per-component closed forms for full covariances (used by both marginal classes)
class Components(NamedTuple):
    """Per-component terms, shapes (B, k) or (B, k, d); ``None`` where not asked for."""

    log_density: Tensor
    score: Tensor | None
    posterior_mean: Tensor | None
    velocity: Tensor | None
    trace: Tensor | None


def gaussian_components(
    x: Tensor,
    times: ScheduleAt,
    mean: Tensor,
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    *,
    score: bool = False,
    posterior_mean: bool = False,
    velocity: bool = False,
) -> Components:
    r"""Closed forms for components :math:`\mathcal N(a_t m_k, \Sigma_k)`, :math:`\Sigma_k =
    a_t^2 S_k + s_t^2 I`, all in the eigenbasis of :math:`S_k = Q_k \Lambda_k Q_k^\top`.

    With :math:`y = Q_k^\top (x - a_t m_k)` and :math:`\sigma^2_j = a_t^2\lambda_j + s_t^2`: the
    log-density, the score :math:`g_k = -Q_k (y/\sigma^2)`, the posterior mean
    :math:`m_k + Q_k (a_t\lambda/\sigma^2)\, y`, the velocity
    :math:`u_k = a_t' m_k + Q_k \frac{a a'\lambda + s s'}{\sigma^2} y` and, with it,
    :math:`\operatorname{tr} A_k = \sum_j \frac{a a'\lambda_j + s s'}{\sigma_j^2}`.

    ``mean`` (k, d), ``eigenvalues`` (k, d), ``eigenvectors`` (k, d, d); ``x`` (B, d).
    """
    a, s2 = times.a, times.s2
    diff = x.unsqueeze(1) - a[:, None, None] * mean  # (B, k, d)
    y = torch.einsum("bki,kij->bkj", diff, eigenvectors)  # Q_k^T (x - a m_k)
    var = a[:, None, None] ** 2 * eigenvalues + s2[:, None, None]  # eigenvalues of Σ_k(t)
    d = x.shape[1]
    log_density = -0.5 * ((y**2 / var).sum(-1) + torch.log(var).sum(-1) + d * math.log(2 * math.pi))
    rotate = lambda z: torch.einsum("kij,bkj->bki", eigenvectors, z)  # noqa: E731
    g = -rotate(y / var) if score else None
    x1_hat = mean + rotate(a[:, None, None] * eigenvalues / var * y) if posterior_mean else None
    u = trace = None
    if velocity:
        da, rate = times.derivatives()
        coef = ((a * da)[:, None, None] * eigenvalues + rate[:, None, None]) / var  # eig of A_k
        u = da[:, None, None] * mean + rotate(coef * y)
        trace = coef.sum(-1)
    return Components(log_density, g, x1_hat, u, trace)


class MixturePosterior(NamedTuple):
    """Softmax-weighted statistics of a full-covariance mixture (``None`` where not asked for)."""

    log_normalizer: Tensor
    score: Tensor | None
    posterior_mean: Tensor | None
    velocity: Tensor | None
    weighted_trace: Tensor | None
    covariance_term: Tensor | None  # Σ_k w_k (g_k - ḡ)·(u_k - ū)


def mixture_posterior(
    x: Tensor,
    times: ScheduleAt,
    params: dict[str, Tensor],
    step: int,
    *,
    score: bool,
    posterior_mean: bool,
    velocity: bool,
    divergence: bool,
) -> MixturePosterior:
    r"""One streamed pass over the components of :math:`\sum_k \pi_k \mathcal N(m_k, S_k)`.

    The log-densities (and so the softmax weights), the rotations :math:`Q_k^\top(x - a_t m_k)`
    and the per-component terms are computed once per chunk for every statistic asked for; the
    divergence's covariance term is the pairwise-merged cross-covariance of scores and velocities.
    """
    need_score, need_velocity = score or divergence, velocity or divergence
    stats = OnlineSoftmax(pair=("score", "velocity") if divergence else None)
    means, log_weights = params["means"], params["log_weights"]
    for lo in range(0, means.shape[0], step):
        sl = slice(lo, lo + step)
        comp = gaussian_components(
            x,
            times,
            means[sl],
            params["eigenvalues"][sl],
            params["eigenvectors"][sl],
            score=need_score,
            posterior_mean=posterior_mean,
            velocity=need_velocity,
        )
        values = {
            "score": comp.score,
            "posterior_mean": comp.posterior_mean,
            "velocity": comp.velocity,
            "trace": comp.trace if divergence else None,
        }
        stats.add(
            log_weights[sl] + comp.log_density,
            {name: v for name, v in values.items() if v is not None},
        )
    m = stats.means
    return MixturePosterior(
        stats.log_normalizer(),
        m.get("score") if score else None,
        m.get("posterior_mean"),
        m.get("velocity") if need_velocity else None,
        m.get("trace"),
        stats.cross,
    )


class EmpiricalPosterior(NamedTuple):
    """Softmax-weighted statistics of weighted data points (``None`` where not asked for)."""

    log_normalizer: Tensor  # logsumexp_i ℓ_i, without the -(d/2) log(2π s²) term
    posterior_mean: Tensor | None  # x̂_1 = Σ_i w_i x_1^i
    trace_covariance: Tensor | None  # tr Cov_w(x_1) = Σ_i w_i ‖x_1^i - x̂_1‖²


def empirical_posterior(
    x: Tensor,
    times: ScheduleAt,
    points: Tensor,
    log_weights: Tensor,
    step: int,
    *,
    posterior_mean: bool,
    covariance: bool,
) -> EmpiricalPosterior:
    r"""One streamed pass over data points: :math:`\ell_i = \log q_i - \lVert x - a_t x_1^i
    \rVert^2/(2 s_t^2)`, the posterior mean and (optionally) the trace of the posterior covariance,
    sharing the distances and the softmax."""
    a, s2 = times.a, times.s2
    stats = OnlineSoftmax(pair=("data", "data") if covariance else None)
    keep_points = posterior_mean or covariance
    for lo in range(0, points.shape[0], step):
        pts = points[lo : lo + step]
        sq = ((x.unsqueeze(1) - a[:, None, None] * pts) ** 2).sum(-1)
        logits = log_weights[lo : lo + step] - 0.5 * sq / s2[:, None]
        stats.add(logits, {}, {"data": pts} if keep_points else None)
    return EmpiricalPosterior(stats.log_normalizer(), stats.means.get("data"), stats.cross)
