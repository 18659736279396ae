r"""What the closed-form marginals share: argument checks, the named result
:class:`MarginalStatistics` and the base class :class:`MarginalBase` (theory §5, §9, §10).

:class:`MarginalBase` holds the path, caches the parameters per dtype and device, checks inputs
and gives every public method (``log_prob``, ``score``, ``posterior_mean``, ``velocity``,
``divergence``, ``velocity_and_divergence``, ``prior``) as one call to the subclass's
``statistics``. :class:`~cnftools.marginals.GaussianMarginal` and
:class:`~cnftools.marginals.MixtureMarginal` are its subclasses; :class:`MarginalStatistics` is
public from :mod:`cnftools.marginals`.

References:
    Lipman et al., Flow Matching for Generative Modeling (2022), arXiv:2210.02747, Theorem 1.

Theory sections cited here (pages under ``docs/theory/``):

- §5: ``docs/theory/marginals.md#theorem-1``
- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor
from torch.distributions import Distribution

from cnftools._checks import as_time, check_batched, check_finite, check_floating, check_int
from cnftools._posterior import ScheduleAt
from cnftools.paths import AffineGaussianPath

__all__ = [
    "MarginalBase",
    "MarginalStatistics",
    "check_chunk_size",
    "check_spd",
    "describe_request",
    "normalised_log_weights",
]


# ----------------------------------------------------------------------------------------------
# Argument checks
def _check_path(path: object) -> AffineGaussianPath:
    r"""Require an affine Gaussian path: the closed forms need :math:`\mu_t = a_t x_1`."""
    if not isinstance(path, AffineGaussianPath):
        raise TypeError(
            "path must be an AffineGaussianPath (mu_t = a_t x1, sigma_t = s_t; e.g. OTPath, "
            f"VEPath, VPPath), got {type(path).__name__}; closed-form marginals need that structure"
        )
    return path


def check_spd(name: str, cov: Tensor) -> tuple[Tensor, Tensor]:
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


def check_chunk_size(chunk_size: object) -> int | None:
    """Require ``None`` or a positive int (not a bool); return it as an ``int`` or ``None``."""
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, Integral):
        raise TypeError(
            f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}"
        )
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return int(chunk_size)


def normalised_log_weights(weights: object, k: int, device: torch.device) -> Tensor:
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


def describe_request(score: bool, posterior_mean: bool, velocity: bool, divergence: bool) -> str:
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
# The base class
class MarginalBase:
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

    def _prepare(self, x: object, t: object) -> tuple[Tensor, ScheduleAt]:
        x = check_batched("x", x)
        if x.dim() != 2 or x.shape[1] != self.d:
            raise ValueError(f"x must have shape (B, d) = (B, {self.d}), got {tuple(x.shape)}")
        return x, ScheduleAt(self.path, as_time(t, x))

    def _sample_times(self, n: object, t: object) -> tuple[int, ScheduleAt, Tensor]:
        n = check_int("n", n)
        like = torch.empty(n, self.d, dtype=self.dtype, device=self.device)
        return n, ScheduleAt(self.path, as_time(t, like)), like

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
