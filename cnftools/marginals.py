r"""Marginal probability paths and their generating fields in closed form (theory §5, §9, §10).

For data :math:`x_1 \sim q` and an affine Gaussian conditional path
:math:`p_t(x|x_1) = \mathcal N(x \mid a_t x_1, s_t^2 I)` (OT, VE, VP or your own
:class:`~cnftools.paths.AffineGaussianPath`), the marginal path and the field of Theorem 1 are

.. math::

    p_t(x) = \int p_t(x|x_1)\, q(x_1)\, dx_1, \qquad
    u_t(x) = \int u_t(x|x_1)\, \frac{p_t(x|x_1)\, q(x_1)}{p_t(x)}\, dx_1 .

They have closed forms when :math:`q` is a Gaussian (:class:`GaussianMarginal`), a Gaussian
mixture or an empirical (weighted point-mass) distribution (:class:`MixtureMarginal`). Each marginal
is itself a velocity field ``v(x, t)`` (``marginal(x, t) == marginal.velocity(x, t)``) and
carries its closed-form ``divergence(x, t)``, which
:func:`cnftools.fields.closed_form_divergence` picks up; ``velocity_and_divergence(x, t)`` gives
both from one pass (ODE solves use it), and ``statistics(x, t, ...)`` returns any of ``log_prob``,
``score``, ``posterior_mean`` (:math:`\mathbb E[x_1 \mid x_t = x]`), ``velocity``,
``divergence`` by name (:class:`MarginalStatistics`). Theory: docs/theory/marginals.md.

Numerics: every covariance is diagonalised once (``eigh``, in float64), so that
:math:`\Sigma_t = a_t^2 S + s_t^2 I` is diagonal in the eigenbasis of :math:`S` at every time; no
matrix is inverted. Mixture sums use log-sum-exp; over many components they are accumulated
chunk by chunk (online softmax with Chan et al.'s pairwise merge of weighted means and covariances),
so memory stays bounded by ``chunk_size`` components at a time. :math:`s s'` is always the path's
``noise_variance_rate`` (finite at VP's :math:`t = 1`). Where a marginal is a point mass (empirical
data at :math:`s_t = 0`, or :math:`a_t = s_t = 0`) the methods raise ``ValueError``, never NaN.

Shapes: ``x`` is ``(B, d)``; ``t`` is a float, a 0-dim tensor or a ``(B,)`` tensor in ``[0, 1]``.
Results follow ``x``'s dtype and device; the parameters are stored in float64 and cast on use.

References:
    Lipman et al., Flow Matching for Generative Modeling (2022), arXiv:2210.02747, Theorem 1.
    Chan, Golub, LeVeque, Updating formulae and a pairwise algorithm for computing sample
    variances (1979).

Theory sections cited here (pages under ``docs/theory/``):

- §5: ``docs/theory/marginals.md#theorem-1``
- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from cnftools._checks import as_time, check_batched, check_finite, check_floating, check_int
from cnftools.paths import AffineGaussianPath

__all__ = ["GaussianMarginal", "MarginalStatistics", "MixtureMarginal"]

_DEFAULT_CHUNK_ELEMENTS = 2**22  # about 32 MiB per (B, chunk, d) float64 temporary


# ----------------------------------------------------------------------------------------------
# Argument checks
def _check_path(path: object) -> AffineGaussianPath:
    if not isinstance(path, AffineGaussianPath):
        raise TypeError(
            "path must be an AffineGaussianPath (mu_t = a_t x1, sigma_t = s_t; e.g. OTPath, "
            f"VEPath, VPPath), got {type(path).__name__}; closed-form marginals need that structure"
        )
    return path


def _check_spd(name: str, cov: Tensor) -> tuple[Tensor, Tensor]:
    """Check a stack ``(..., d, d)`` of SPD matrices; return their eigh (λ, Q) in float64."""
    eps = torch.finfo(cov.dtype).eps
    scale = cov.abs().amax(dim=(-2, -1), keepdim=True)
    asym = (cov - cov.mT).abs().amax(dim=(-2, -1), keepdim=True)
    if bool((asym > 100 * eps * scale).any()):
        raise ValueError(
            f"{name} must be symmetric (|S - S^T| <= 100 eps max|S|), got an asymmetry of "
            f"{float((asym / scale.clamp_min(torch.finfo(cov.dtype).tiny)).max()):.3g} relative"
        )
    sym = 0.5 * (cov + cov.mT).to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    d = cov.shape[-1]
    floor = d * eps * eigenvalues.abs().amax(dim=-1, keepdim=True)
    if bool((eigenvalues <= floor).any()):
        raise ValueError(
            f"{name} must be positive definite, got smallest eigenvalue "
            f"{float(eigenvalues.min()):.3g} (needs > d * eps * largest = {float(floor.max()):.3g})"
        )
    return eigenvalues, eigenvectors


def _check_chunk_size(chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral):
        raise TypeError(
            f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def _normalised_log_weights(weights: object, k: int, device: torch.device) -> Tensor:
    r"""Validate mixture weights and normalise them in log space, in float64:
    :math:`\log\pi_k = \log w_k - \operatorname{logsumexp}_j \log w_j` (so ``[1e308, 1e308]``
    gives ``[0.5, 0.5]``, not an overflowing sum). Zero weights give ``-inf``."""
    weights = check_floating("weights", weights)
    if weights.shape != (k,):
        raise ValueError(f"weights must have shape (K,) = ({k},), got {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights must be on the means' device {device}, got {weights.device}")
    check_finite("weights", weights)
    if bool((weights < 0).any()):
        raise ValueError(f"weights must be >= 0, got a minimum of {float(weights.min()):.3g}")
    if not bool((weights > 0).any()):
        raise ValueError("weights must not all be zero (they need a positive sum)")
    log_w = torch.log(weights.detach().to(torch.float64))
    return log_w - torch.logsumexp(log_w, dim=0)


# ----------------------------------------------------------------------------------------------
# Schedules
class _Times:
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
# Named results
@dataclass(frozen=True)
class MarginalStatistics:
    r"""Closed-form statistics of a marginal path at ``(x, t)``, by name.

    Returned by :meth:`GaussianMarginal.statistics` and :meth:`MixtureMarginal.statistics`; every
    field that was not asked for is ``None`` (``log_prob`` is always there: the other statistics
    need it). With posterior weights :math:`w_k \propto \pi_k\,\mathcal N(x; a_t m_k, \Sigma_k)`:

    .. math::

        \hat x_1 = \mathbb E[x_1 \mid x_t = x] = \sum_k w_k \big(m_k + a_t S_k \Sigma_k^{-1}
        (x - a_t m_k)\big),\qquad
        \operatorname{div} u_t = \underbrace{\sum_k w_k \operatorname{tr} A_k}_{\texttt{weighted\_trace}}
        + \sum_k w_k (g_k - \bar g)\cdot(u_k - \bar u).

    Attributes:
        log_prob: :math:`\log p_t(x)`, shape ``(B,)``.
        score: :math:`\nabla_x \log p_t(x)`, shape ``(B, d)``.
        posterior_mean: :math:`\hat x_1 = \mathbb E[x_1 \mid x_t = x]`, shape ``(B, d)``.
        velocity: the marginal field :math:`u_t(x)`, shape ``(B, d)``.
        divergence: :math:`\nabla\cdot u_t(x)`, shape ``(B,)``.
        weighted_trace: :math:`\sum_k w_k \operatorname{tr} A_k`, shape ``(B,)``: the divergence
            without the covariance term (equal to ``divergence`` for a single Gaussian; for
            empirical data :math:`d\,s s'/s^2`).

    References:
        docs/theory/marginals.md (closed forms for Gaussian, mixture and empirical data).
    """

    log_prob: Tensor
    score: Tensor | None = None
    posterior_mean: Tensor | None = None
    velocity: Tensor | None = None
    divergence: Tensor | None = None
    weighted_trace: Tensor | None = None


def _describe(score: bool, posterior_mean: bool, velocity: bool, divergence: bool) -> str:
    """The name of the most demanding statistic asked for (for error messages)."""
    for name, wanted in (
        ("divergence", divergence),
        ("velocity", velocity),
        ("posterior_mean", posterior_mean),
        ("score", score),
    ):
        if wanted:
            return name
    return "log_prob"


# ----------------------------------------------------------------------------------------------
# Streaming softmax statistics
def _weighted_mean(w: Tensor, v: Tensor) -> Tensor:
    """Σ_k w_bk v_bk for per-row values: ``w`` (B, k); ``v`` (B, k) or (B, k, d)."""
    if v.dim() == 2:
        return (w * v).sum(dim=1)
    return (w.unsqueeze(-1) * v).sum(dim=1)


class _OnlineSoftmax:
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
class _Components(NamedTuple):
    """Per-component terms, shapes (B, k) or (B, k, d); ``None`` where not asked for."""

    log_density: Tensor
    score: Tensor | None
    posterior_mean: Tensor | None
    velocity: Tensor | None
    trace: Tensor | None


def _gaussian_components(
    x: Tensor,
    times: _Times,
    mean: Tensor,
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    *,
    score: bool = False,
    posterior_mean: bool = False,
    velocity: bool = False,
) -> _Components:
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
    return _Components(log_density, g, x1_hat, u, trace)


class _MixturePosterior(NamedTuple):
    """Softmax-weighted statistics of a full-covariance mixture (``None`` where not asked for)."""

    log_normalizer: Tensor
    score: Tensor | None
    posterior_mean: Tensor | None
    velocity: Tensor | None
    weighted_trace: Tensor | None
    covariance_term: Tensor | None  # Σ_k w_k (g_k - ḡ)·(u_k - ū)


def _mixture_posterior(
    x: Tensor,
    times: _Times,
    params: dict[str, Tensor],
    step: int,
    *,
    score: bool,
    posterior_mean: bool,
    velocity: bool,
    divergence: bool,
) -> _MixturePosterior:
    r"""One streamed pass over the components of :math:`\sum_k \pi_k \mathcal N(m_k, S_k)`.

    The log-densities (and so the softmax weights), the rotations :math:`Q_k^\top(x - a_t m_k)`
    and the per-component terms are computed once per chunk for every statistic asked for; the
    divergence's covariance term is the pairwise-merged cross-covariance of scores and velocities.
    """
    need_score, need_velocity = score or divergence, velocity or divergence
    stats = _OnlineSoftmax(pair=("score", "velocity") if divergence else None)
    means, log_weights = params["means"], params["log_weights"]
    for lo in range(0, means.shape[0], step):
        sl = slice(lo, lo + step)
        comp = _gaussian_components(
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
    return _MixturePosterior(
        stats.log_normalizer(),
        m.get("score") if score else None,
        m.get("posterior_mean"),
        m.get("velocity") if need_velocity else None,
        m.get("trace"),
        stats.cross,
    )


class _EmpiricalPosterior(NamedTuple):
    """Softmax-weighted statistics of weighted data points (``None`` where not asked for)."""

    log_normalizer: Tensor  # logsumexp_i ℓ_i, without the -(d/2) log(2π s²) term
    posterior_mean: Tensor | None  # x̂_1 = Σ_i w_i x_1^i
    trace_covariance: Tensor | None  # tr Cov_w(x_1) = Σ_i w_i ‖x_1^i - x̂_1‖²


def _empirical_posterior(
    x: Tensor,
    times: _Times,
    points: Tensor,
    log_weights: Tensor,
    step: int,
    *,
    posterior_mean: bool,
    covariance: bool,
) -> _EmpiricalPosterior:
    r"""One streamed pass over data points: :math:`\ell_i = \log q_i - \lVert x - a_t x_1^i
    \rVert^2/(2 s_t^2)`, the posterior mean and (optionally) the trace of the posterior covariance,
    sharing the distances and the softmax."""
    a, s2 = times.a, times.s2
    stats = _OnlineSoftmax(pair=("data", "data") if covariance else None)
    keep_points = posterior_mean or covariance
    for lo in range(0, points.shape[0], step):
        pts = points[lo : lo + step]
        sq = ((x.unsqueeze(1) - a[:, None, None] * pts) ** 2).sum(-1)
        logits = log_weights[lo : lo + step] - 0.5 * sq / s2[:, None]
        stats.add(logits, {}, {"data": pts} if keep_points else None)
    return _EmpiricalPosterior(stats.log_normalizer(), stats.means.get("data"), stats.cross)


# ----------------------------------------------------------------------------------------------
# The marginal classes
class _Marginal:
    """Shared plumbing: path, parameter caching per dtype/device, input checks, and the public
    methods, each one call to :meth:`statistics` asking for what it returns."""

    d: int

    def __init__(self, path: object) -> None:
        self.path = _check_path(path)
        self._cache: dict[tuple[torch.dtype, torch.device], dict[str, Tensor]] = {}

    def _params64(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _params(self, like: Tensor) -> dict[str, Tensor]:
        key = (like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = {
                k: v.to(dtype=like.dtype, device=like.device) for k, v in self._params64().items()
            }
        return self._cache[key]

    def _prepare(self, x: object, t: object) -> tuple[Tensor, _Times]:
        x = check_batched("x", x)
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape (B, d) = (B, {self.d}), got {tuple(x.shape)}")
        return x, _Times(self.path, as_time(t, x))

    def _sample_times(self, n: object, t: object) -> tuple[int, _Times, Tensor]:
        n = check_int("n", n)
        like = torch.empty(n, self.d, dtype=self.dtype, device=self.device)
        return n, _Times(self.path, as_time(t, like)), like

    def _scalar_time(self, t: object) -> Tensor:
        if isinstance(t, Tensor):
            if t.dim() != 0:
                raise ValueError(
                    f"t must be a float or a 0-dim tensor here, got shape {tuple(t.shape)}"
                )
            like = torch.empty(
                1, self.d, dtype=t.dtype if t.is_floating_point() else self.dtype, device=t.device
            )
        else:
            like = torch.empty(1, self.d, dtype=self.dtype, device=self.device)
        return as_time(t, like)

    def statistics(
        self,
        x: Tensor,
        t: float | Tensor,
        *,
        score: bool = False,
        posterior_mean: bool = False,
        velocity: bool = False,
        divergence: bool = False,
    ) -> MarginalStatistics:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        """The marginal field: ``marginal(x, t) == marginal.velocity(x, t)``."""
        return self.velocity(x, t)

    def log_prob(self, x: Tensor, t: float | Tensor) -> Tensor:
        r""":math:`\log p_t(x)`, shape ``(B,)``."""
        return self.statistics(x, t).log_prob

    def score(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The score :math:`\nabla_x \log p_t(x)`, shape ``(B, d)``.

        For every affine path (Tweedie): :math:`\nabla_x \log p_t(x) = (a_t \hat x_1 - x)/s_t^2`
        where :math:`s_t > 0`, with :math:`\hat x_1` = :meth:`posterior_mean`.
        """
        out = self.statistics(x, t, score=True).score
        assert out is not None
        return out

    def posterior_mean(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The denoiser :math:`\hat x_1 = \mathbb E[x_1 \mid x_t = x]`, shape ``(B, d)``.

        For components :math:`\mathcal N(m_k, S_k)`: :math:`\sum_k w_k (m_k + a_t S_k
        \Sigma_k^{-1}(x - a_t m_k))`; for data points: :math:`\sum_i w_i x_1^i`.
        """
        out = self.statistics(x, t, posterior_mean=True).posterior_mean
        assert out is not None
        return out

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The marginal field :math:`u_t(x)` of Theorem 1 in closed form, shape ``(B, d)``."""
        out = self.statistics(x, t, velocity=True).velocity
        assert out is not None
        return out

    def divergence(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The closed-form :math:`\nabla\cdot u_t(x)`, shape ``(B,)``."""
        out = self.statistics(x, t, divergence=True).divergence
        assert out is not None
        return out

    def velocity_and_divergence(self, x: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        r"""``(velocity(x, t), divergence(x, t))`` from one pass over the components.

        The posterior weights, the Mahalanobis terms and the per-component fields are computed
        once and shared, instead of once per method; the numbers equal the separate calls up to
        the order of floating-point operations. This is what an ODE solve of the augmented state
        :math:`[z, \int \nabla\cdot u]` needs (see :func:`cnftools.fields.closed_form_divergence`).

        Returns:
            ``(u, div)``: shapes ``(B, d)`` and ``(B,)``.

        Example:
            >>> import torch, cnftools
            >>> data = torch.randn(100, 3, dtype=torch.float64)
            >>> marginal = cnftools.MixtureMarginal(cnftools.OTPath(0.2), data)
            >>> x = torch.randn(4, 3, dtype=torch.float64)
            >>> u, div = marginal.velocity_and_divergence(x, 0.5)
            >>> torch.equal(u, marginal.velocity(x, 0.5)), u.shape, div.shape
            (True, torch.Size([4, 3]), torch.Size([4]))
        """
        stats = self.statistics(x, t, velocity=True, divergence=True)
        assert stats.velocity is not None and stats.divergence is not None
        return stats.velocity, stats.divergence

    def prior(self) -> Distribution:
        r"""The exact :math:`p_0` as a distribution (``distribution(0.0)``); not always
        :math:`\mathcal N(0, I)`: VE and VP have other :math:`p_0`."""
        return self.distribution(0.0)

    def distribution(self, t: float | Tensor) -> Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


class GaussianMarginal(_Marginal):
    r"""The marginal path of Gaussian data :math:`q = \mathcal N(m, S)` (theory §9).

    .. math::

        p_t = \mathcal N(a_t m, \Sigma_t),\quad \Sigma_t = a_t^2 S + s_t^2 I,\qquad
        u_t(x) = a_t' m + A_t (x - a_t m),\quad A_t = (a_t a_t' S + s_t s_t' I)\Sigma_t^{-1},

    and :math:`\operatorname{div} u_t = \operatorname{tr} A_t` (independent of :math:`x`). With
    :math:`S = Q \Lambda Q^\top`, every matrix here is :math:`Q\,\mathrm{diag}(\cdot)\,Q^\top`.

    Args:
        path: an :class:`~cnftools.paths.AffineGaussianPath` (OT, VE, VP, custom affine).
        mean: :math:`m`, shape ``(d,)``.
        cov: :math:`S`, shape ``(d, d)``, symmetric positive definite (asymmetry up to
            ``100 eps`` relative is symmetrised away; anything larger raises).

    Raises:
        TypeError: ``path`` is not affine, or the parameters are not floating tensors.
        ValueError: wrong shapes, non-finite entries, or ``cov`` not SPD.

    Example:
        >>> import torch, cnftools
        >>> m = torch.tensor([1.0, -1.0], dtype=torch.float64)
        >>> S = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> marginal = cnftools.GaussianMarginal(cnftools.OTPath(0.0), m, S)
        >>> x = torch.zeros(3, 2, dtype=torch.float64)
        >>> marginal.velocity(x, 0.5).shape, marginal.divergence(x, 0.5).shape
        (torch.Size([3, 2]), torch.Size([3]))
        >>> float(marginal.log_prob(x, 1.0)[0])  # log N(0; m, S) for sigma_min = 0
        -3.26...

    References:
        Lipman et al. (2022), arXiv:2210.02747, Theorem 1; theory §9.
    """

    def __init__(self, path: AffineGaussianPath, mean: Tensor, cov: Tensor) -> None:
        super().__init__(path)
        mean = check_finite("mean", check_floating("mean", mean))
        cov = check_finite("cov", check_floating("cov", cov))
        if mean.dim() != 1 or mean.shape[0] < 1:
            raise ValueError(f"mean must have shape (d,), got {tuple(mean.shape)}")
        d = mean.shape[0]
        if cov.shape != (d, d):
            raise ValueError(f"cov must have shape (d, d) = ({d}, {d}), got {tuple(cov.shape)}")
        if cov.device != mean.device:
            raise ValueError(f"mean and cov must be on one device, got {mean.device}, {cov.device}")
        if cov.dtype != mean.dtype:
            raise TypeError(f"mean and cov must have one dtype, got {mean.dtype} and {cov.dtype}")
        self.d = d
        self.dtype, self.device = mean.dtype, mean.device
        self.mean = mean.detach()
        self.cov = cov.detach()
        self._eigenvalues, self._eigenvectors = _check_spd("cov", self.cov)

    def _params64(self) -> dict[str, Tensor]:
        return {
            "mean": self.mean.to(torch.float64),
            "eigenvalues": self._eigenvalues,
            "eigenvectors": self._eigenvectors,
        }

    def statistics(
        self,
        x: Tensor,
        t: float | Tensor,
        *,
        score: bool = False,
        posterior_mean: bool = False,
        velocity: bool = False,
        divergence: bool = False,
    ) -> MarginalStatistics:
        r"""Named closed forms at ``(x, t)`` from one pass; see :class:`MarginalStatistics`.

        ``log_prob`` :math:`= \log\mathcal N(x; a_t m, \Sigma_t)` always; ``score``
        :math:`= -\Sigma_t^{-1}(x - a_t m)`, ``posterior_mean`` :math:`= m + a_t S
        \Sigma_t^{-1}(x - a_t m)`, ``velocity`` :math:`= a_t' m + A_t(x - a_t m)` and
        ``divergence`` :math:`= \operatorname{tr} A_t` (= ``weighted_trace``) when asked for.

        Args:
            x: points, shape ``(B, d)``.
            t: a float, a 0-dim tensor or a ``(B,)`` tensor in ``[0, 1]``.
            score, posterior_mean, velocity, divergence: which statistics to compute.

        Raises:
            ValueError: bad ``x``/``t``, or :math:`a_t = s_t = 0` (a point mass).

        Example:
            >>> import torch, cnftools
            >>> marginal = cnftools.GaussianMarginal(
            ...     cnftools.OTPath(0.1),
            ...     torch.zeros(2, dtype=torch.float64),
            ...     torch.eye(2, dtype=torch.float64),
            ... )
            >>> stats = marginal.statistics(
            ...     torch.ones(3, 2, dtype=torch.float64), 0.5, velocity=True, divergence=True
            ... )
            >>> stats.velocity.shape, stats.divergence.shape, stats.score is None
            (torch.Size([3, 2]), torch.Size([3]), True)
        """
        x, times = self._prepare(x, t)
        times.require_nondegenerate(_describe(score, posterior_mean, velocity, divergence))
        p = self._params(x)
        comp = _gaussian_components(
            x,
            times,
            p["mean"][None],
            p["eigenvalues"][None],
            p["eigenvectors"][None],
            score=score,
            posterior_mean=posterior_mean,
            velocity=velocity or divergence,
        )
        first = lambda v: None if v is None else v[:, 0]  # noqa: E731
        trace = first(comp.trace) if divergence else None
        return MarginalStatistics(
            log_prob=comp.log_density[:, 0],
            score=first(comp.score),
            posterior_mean=first(comp.posterior_mean),
            velocity=first(comp.velocity) if velocity else None,
            divergence=trace,
            weighted_trace=trace,
        )

    def divergence(self, x: Tensor, t: float | Tensor) -> Tensor:
        r""":math:`\operatorname{div} u_t = \operatorname{tr} A_t = \sum_j
        \frac{a a' \lambda_j + s s'}{a^2 \lambda_j + s^2}`, shape ``(B,)``."""
        return super().divergence(x, t)

    def flow(self, z: Tensor, t: float | Tensor, t0: float | Tensor = 0.0) -> Tensor:
        r"""The flow of the marginal field from time ``t0`` to ``t`` (theory §9):

        .. math::

            \varphi_{t_0 \to t}(z) = a_t m + \Sigma_t^{1/2} \Sigma_{t_0}^{-1/2} (z - a_{t_0} m),

        symmetric square roots (all in the eigenbasis of :math:`S`). ``t0 = 0`` gives
        :math:`\varphi_t(z_0)`; ``flow(x, 0.0, t0=1.0)`` maps data back to noise.

        Args:
            z: points at time ``t0``, shape ``(B, d)``.
            t: target time (float, 0-dim or ``(B,)``).
            t0: start time (float, 0-dim or ``(B,)``), default 0.

        Returns:
            Shape ``(B, d)``.
        """
        z, end = self._prepare(z, t)
        start = _Times(self.path, as_time(t0, z, name="t0"))
        end.require_nondegenerate("flow")
        start.require_nondegenerate("flow")
        p = self._params(z)
        lam, q, m = p["eigenvalues"], p["eigenvectors"], p["mean"]
        var_end = end.a[:, None] ** 2 * lam + end.s2[:, None]
        var_start = start.a[:, None] ** 2 * lam + start.s2[:, None]
        y = (z - start.a[:, None] * m) @ q
        return end.a[:, None] * m + (y * torch.sqrt(var_end / var_start)) @ q.T

    def flow_log_det(self, t: float | Tensor, t0: float | Tensor = 0.0) -> Tensor:
        r""":math:`\log\det \partial\varphi_{t_0\to t}/\partial z = \tfrac12 \log\det(\Sigma_t
        \Sigma_{t_0}^{-1})`, a 0-dim tensor (``t``, ``t0`` scalars)."""
        end = _Times(self.path, self._scalar_time(t))
        start = _Times(self.path, self._scalar_time(t0).to(end.t))
        end.require_nondegenerate("flow_log_det")
        start.require_nondegenerate("flow_log_det")
        lam = self._params(end.t)["eigenvalues"]
        var_end = end.a**2 * lam + end.s2
        var_start = start.a**2 * lam + start.s2
        return 0.5 * torch.log(var_end / var_start).sum()

    def covariance(self, t: float | Tensor) -> Tensor:
        r""":math:`\Sigma_t = a_t^2 S + s_t^2 I`, shape ``(d, d)`` (``t`` a scalar)."""
        times = _Times(self.path, self._scalar_time(t))
        p = self._params(times.t)
        q = p["eigenvectors"]
        cov = (q * (times.a**2 * p["eigenvalues"] + times.s2)) @ q.T
        return 0.5 * (cov + cov.T)

    def distribution(self, t: float | Tensor) -> MultivariateNormal:
        r"""The exact :math:`p_t = \mathcal N(a_t m, \Sigma_t)` as a ``MultivariateNormal``.

        ``t`` is a float (parameters' dtype and device) or a 0-dim tensor (its dtype and device).
        """
        times = _Times(self.path, self._scalar_time(t))
        times.require_nondegenerate("distribution")
        loc = times.a * self._params(times.t)["mean"]
        return MultivariateNormal(loc, covariance_matrix=self.covariance(times.t[0]))

    def sample(self, n: int, t: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""Draw ``n`` points from :math:`p_t`: :math:`a_t m + Q \Lambda_t^{1/2} \varepsilon`.

        ``t`` is a float, a 0-dim tensor or shape ``(n,)``. Returns ``(n, d)`` in the parameters'
        dtype and device (``generator`` must be on that device).
        """
        n, times, like = self._sample_times(n, t)
        p = self._params(like)
        eps = torch.randn(n, self.d, generator=generator, dtype=like.dtype, device=like.device)
        std = torch.sqrt(times.a[:, None] ** 2 * p["eigenvalues"] + times.s2[:, None])
        return times.a[:, None] * p["mean"] + (std * eps) @ p["eigenvectors"].T

    def __repr__(self) -> str:
        return f"GaussianMarginal(path={self.path!r}, d={self.d})"


class MixtureMarginal(_Marginal):
    r"""The marginal path of a Gaussian mixture or of empirical data (theory §10).

    For :math:`q = \sum_k \pi_k \mathcal N(m_k, S_k)`, with :math:`\Sigma_k = a_t^2 S_k + s_t^2 I`,
    :math:`\ell_k = \log\pi_k + \log\mathcal N(x; a_t m_k, \Sigma_k)` and
    :math:`w = \mathrm{softmax}(\ell)`:

    .. math::

        \log p_t = \operatorname{logsumexp}_k \ell_k,\qquad u_t(x) = \sum_k w_k u_k(x),\quad
        u_k = a_t' m_k + A_k (x - a_t m_k),

        \operatorname{div} u_t = \sum_k w_k \operatorname{tr} A_k
        + \sum_k w_k (g_k - \bar g)\cdot(u_k - \bar u),\qquad g_k = -\Sigma_k^{-1}(x - a_t m_k).

    With ``covs=None`` the data are the points :math:`x_1^i` = ``means`` (:math:`S_i = 0`):

    .. math::

        u = \frac{ss'}{s^2} x + \Big(a' - a\frac{ss'}{s^2}\Big)\hat x_1,\qquad
        \operatorname{div} u = d\,\frac{ss'}{s^2} + \frac{a}{s^2}\Big(a' - a\frac{ss'}{s^2}\Big)
        \operatorname{tr}\operatorname{Cov}_w(x_1),\qquad \hat x_1 = \sum_i w_i x_1^i .

    Every method is one streamed pass of :meth:`statistics`; :meth:`velocity_and_divergence`
    shares that pass between the field and its divergence (what ODE solves call).

    Sums over components run ``chunk_size`` components at a time (online softmax, pairwise-merged
    weighted means and centred covariances), so memory is ``O(B · chunk_size · d)``, not
    ``O(B · K · d)``.

    Args:
        path: an :class:`~cnftools.paths.AffineGaussianPath`.
        means: component means :math:`m_k` (or data points), shape ``(K, d)``.
        covs: component covariances, shape ``(K, d, d)``, each SPD; ``None`` for empirical data.
        weights: :math:`\pi_k`, shape ``(K,)``, finite, ``>= 0``, not all zero; normalised in
            log space (:math:`\log w_k - \operatorname{logsumexp}_j \log w_j`, so ``[1e308,
            1e308]`` or subnormal weights work), zero-weight components dropped. Default uniform.
            ``self.weights`` holds the normalised float64 weights.
        chunk_size: components per chunk; ``None`` chooses it so that a ``(B, chunk, d)``
            temporary has at most 2**22 elements.

    Raises:
        TypeError: ``path`` is not affine, or the parameters are not floating tensors.
        ValueError: wrong shapes, non-finite entries, negative or all-zero weights, non-SPD covs.

    Example:
        >>> import torch, cnftools
        >>> data = torch.tensor([[0.0, 0.0], [2.0, 1.0], [-1.0, 3.0]], dtype=torch.float64)
        >>> marginal = cnftools.MixtureMarginal(cnftools.OTPath(0.1), data)
        >>> x = torch.randn(5, 2, dtype=torch.float64)
        >>> marginal.log_prob(x, 0.7).shape, marginal(x, 0.7).shape
        (torch.Size([5]), torch.Size([5, 2]))

    References:
        Lipman et al. (2022), arXiv:2210.02747, Theorem 1; theory §10.
    """

    def __init__(
        self,
        path: AffineGaussianPath,
        means: Tensor,
        covs: Tensor | None = None,
        weights: Tensor | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(path)
        self.chunk_size = _check_chunk_size(chunk_size)
        means = check_finite("means", check_floating("means", means))
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        if weights is None:
            log_weights = torch.full((k,), -math.log(k), dtype=torch.float64, device=means.device)
        else:
            log_weights = _normalised_log_weights(weights, k, means.device)
        keep = log_weights > -math.inf
        self.empirical = covs is None
        eigenvalues = eigenvectors = None
        if covs is not None:
            covs = check_finite("covs", check_floating("covs", covs))
            if covs.shape != (k, d, d):
                raise ValueError(
                    f"covs must have shape (K, d, d) = ({k}, {d}, {d}), got {tuple(covs.shape)}"
                )
            if covs.dtype != means.dtype or covs.device != means.device:
                raise TypeError(
                    f"covs must have the means' dtype and device ({means.dtype}, {means.device}), "
                    f"got {covs.dtype}, {covs.device}"
                )
            eigenvalues, eigenvectors = _check_spd("covs", covs.detach())
            eigenvalues, eigenvectors = eigenvalues[keep], eigenvectors[keep]
            self.covs: Tensor | None = covs.detach()[keep]
        else:
            self.covs = None
        self.d = d
        self.dtype, self.device = means.dtype, means.device
        self.means = means.detach()[keep]
        self._log_weights = log_weights[keep]
        self.weights = torch.exp(self._log_weights)
        self._eigenvalues, self._eigenvectors = eigenvalues, eigenvectors

    @property
    def num_components(self) -> int:
        """The number of components (data points) with positive weight."""
        return self.means.shape[0]

    def _params64(self) -> dict[str, Tensor]:
        out = {"means": self.means.to(torch.float64), "log_weights": self._log_weights}
        if not self.empirical:
            assert self._eigenvalues is not None and self._eigenvectors is not None
            out["eigenvalues"], out["eigenvectors"] = self._eigenvalues, self._eigenvectors
        return out

    def _chunk(self, batch: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        per_component = batch * self.d * (self.d if not self.empirical else 1)
        return max(1, _DEFAULT_CHUNK_ELEMENTS // max(1, per_component))

    def statistics(
        self,
        x: Tensor,
        t: float | Tensor,
        *,
        score: bool = False,
        posterior_mean: bool = False,
        velocity: bool = False,
        divergence: bool = False,
    ) -> MarginalStatistics:
        r"""Named closed forms at ``(x, t)`` from one streamed pass; see
        :class:`MarginalStatistics`.

        Whatever is asked for shares one computation of the log-densities, the softmax weights
        and the per-component terms (chunk by chunk). Empirical data use the isotropic formulas
        (``u`` and ``div u`` from :math:`\hat x_1` and :math:`\operatorname{tr}\operatorname{Cov}_w
        (x_1)`); mixtures the full-covariance ones.

        Args:
            x: points, shape ``(B, d)``.
            t: a float, a 0-dim tensor or a ``(B,)`` tensor in ``[0, 1]``.
            score, posterior_mean, velocity, divergence: which statistics to compute.

        Raises:
            ValueError: bad ``x``/``t``; empirical data where :math:`s_t = 0`; any data where
                :math:`a_t = s_t = 0`.

        Example:
            >>> import torch, cnftools
            >>> data = torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
            >>> marginal = cnftools.MixtureMarginal(cnftools.OTPath(0.2), data)
            >>> x = torch.zeros(4, 2, dtype=torch.float64)
            >>> stats = marginal.statistics(x, 0.5, posterior_mean=True, divergence=True)
            >>> stats.posterior_mean.shape, stats.divergence.shape, stats.velocity is None
            (torch.Size([4, 2]), torch.Size([4]), True)
        """
        x, times = self._prepare(x, t)
        what = _describe(score, posterior_mean, velocity, divergence)
        p = self._params(x)
        step = self._chunk(x.shape[0])
        if self.empirical:
            return self._empirical_statistics(
                x, times, p, step, what, score, posterior_mean, velocity, divergence
            )
        times.require_nondegenerate(what)
        post = _mixture_posterior(
            x,
            times,
            p,
            step,
            score=score,
            posterior_mean=posterior_mean,
            velocity=velocity,
            divergence=divergence,
        )
        div = None
        if divergence:
            assert post.weighted_trace is not None and post.covariance_term is not None
            div = post.weighted_trace + post.covariance_term
        return MarginalStatistics(
            log_prob=post.log_normalizer,
            score=post.score,
            posterior_mean=post.posterior_mean,
            velocity=post.velocity if velocity else None,
            divergence=div,
            weighted_trace=post.weighted_trace,
        )

    def _empirical_statistics(
        self,
        x: Tensor,
        times: _Times,
        p: dict[str, Tensor],
        step: int,
        what: str,
        score: bool,
        posterior_mean: bool,
        velocity: bool,
        divergence: bool,
    ) -> MarginalStatistics:
        r"""The isotropic closed forms for data points (``covs=None``), from one streamed pass."""
        times.require_positive_noise(what)
        post = _empirical_posterior(
            x,
            times,
            p["means"],
            p["log_weights"],
            step,
            posterior_mean=score or posterior_mean or velocity or divergence,
            covariance=divergence,
        )
        a, s2 = times.a, times.s2
        log_prob = post.log_normalizer - 0.5 * self.d * torch.log(2 * math.pi * s2)
        x1_hat = post.posterior_mean
        g = u = div = weighted_trace = None
        if score:
            assert x1_hat is not None
            g = (a[:, None] * x1_hat - x) / s2[:, None]  # Tweedie
        if velocity or divergence:
            da, rate = times.derivatives()
            ratio = rate / s2  # s s' / s^2
            gain = da - a * ratio  # a' - a s s' / s^2
            if velocity:
                assert x1_hat is not None
                u = ratio[:, None] * x + gain[:, None] * x1_hat
            if divergence:
                assert post.trace_covariance is not None
                weighted_trace = self.d * ratio
                div = weighted_trace + a / s2 * gain * post.trace_covariance
        return MarginalStatistics(
            log_prob=log_prob,
            score=g,
            posterior_mean=x1_hat if posterior_mean else None,
            velocity=u,
            divergence=div,
            weighted_trace=weighted_trace,
        )

    def distribution(self, t: float | Tensor) -> MixtureSameFamily:
        r"""The exact :math:`p_t` as a ``MixtureSameFamily`` (full-covariance ``MultivariateNormal``
        components, or isotropic ``Normal`` components for empirical data).

        ``t`` is a float (parameters' dtype and device) or a 0-dim tensor (its dtype and device).
        """
        times = _Times(self.path, self._scalar_time(t))
        p = self._params(times.t)
        mix = Categorical(logits=p["log_weights"])
        loc = times.a * p["means"]
        if self.empirical:
            times.require_positive_noise("distribution")
            scale = torch.sqrt(times.s2).expand_as(loc)
            return MixtureSameFamily(mix, Independent(Normal(loc, scale), 1))
        times.require_nondegenerate("distribution")
        q = p["eigenvectors"]
        cov = (q * (times.a**2 * p["eigenvalues"] + times.s2).unsqueeze(-2)) @ q.mT
        return MixtureSameFamily(
            mix, MultivariateNormal(loc, covariance_matrix=0.5 * (cov + cov.mT))
        )

    def sample(self, n: int, t: float | Tensor, generator: torch.Generator | None = None) -> Tensor:
        r"""Draw ``n`` points from :math:`p_t`: pick :math:`k \sim \pi`, then
        :math:`a_t m_k + \Sigma_k^{1/2}\varepsilon` (:math:`s_t \varepsilon` for empirical data).

        ``t`` is a float, a 0-dim tensor or shape ``(n,)``. Returns ``(n, d)`` in the parameters'
        dtype and device (``generator`` must be on that device). ``s_t = 0`` is allowed here: the
        draw is then a data point (scaled by :math:`a_t`).
        """
        n, times, like = self._sample_times(n, t)
        p = self._params(like)
        index = torch.multinomial(
            torch.exp(p["log_weights"]), n, replacement=True, generator=generator
        )
        eps = torch.randn(n, self.d, generator=generator, dtype=like.dtype, device=like.device)
        centre = times.a[:, None] * p["means"][index]
        if self.empirical:
            return centre + torch.sqrt(times.s2)[:, None] * eps
        std = torch.sqrt(times.a[:, None] ** 2 * p["eigenvalues"][index] + times.s2[:, None])
        return centre + torch.einsum("nij,nj->ni", p["eigenvectors"][index], std * eps)

    def __repr__(self) -> str:
        kind = "empirical" if self.empirical else "gaussian mixture"
        return f"MixtureMarginal(path={self.path!r}, {kind}, K={self.num_components}, d={self.d})"
