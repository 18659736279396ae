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
so memory stays bounded by ``chunk_size`` components at a time (:mod:`cnftools._posterior`; the
shared checks and base class are in :mod:`cnftools._marginal_base`). :math:`s s'` is always the path's
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

import torch
from torch import Tensor
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from cnftools._checks import as_time, check_finite, check_floating
from cnftools._marginal_base import (
    MarginalBase,
    MarginalStatistics,
    check_chunk_size,
    check_spd,
    describe_request,
    normalised_log_weights,
)
from cnftools._posterior import (
    ScheduleAt,
    empirical_posterior,
    gaussian_components,
    mixture_posterior,
)
from cnftools.paths import AffineGaussianPath

__all__ = ["GaussianMarginal", "MarginalStatistics", "MixtureMarginal"]

_DEFAULT_CHUNK_ELEMENTS = 2**22  # about 32 MiB per (B, chunk, d) float64 temporary


class GaussianMarginal(MarginalBase):
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
        self._eigenvalues, self._eigenvectors = check_spd("cov", self.cov)

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
        times.require_nondegenerate(describe_request(score, posterior_mean, velocity, divergence))
        p = self._params(x)
        comp = gaussian_components(
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
        start = ScheduleAt(self.path, as_time(t0, z, name="t0"))
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
        end = ScheduleAt(self.path, self._scalar_time(t))
        start = ScheduleAt(self.path, self._scalar_time(t0).to(end.t))
        end.require_nondegenerate("flow_log_det")
        start.require_nondegenerate("flow_log_det")
        lam = self._params(end.t)["eigenvalues"]
        var_end = end.a**2 * lam + end.s2
        var_start = start.a**2 * lam + start.s2
        return 0.5 * torch.log(var_end / var_start).sum()

    def covariance(self, t: float | Tensor) -> Tensor:
        r""":math:`\Sigma_t = a_t^2 S + s_t^2 I`, shape ``(d, d)`` (``t`` a scalar)."""
        times = ScheduleAt(self.path, self._scalar_time(t))
        p = self._params(times.t)
        q = p["eigenvectors"]
        cov = (q * (times.a**2 * p["eigenvalues"] + times.s2)) @ q.T
        return 0.5 * (cov + cov.T)

    def distribution(self, t: float | Tensor) -> MultivariateNormal:
        r"""The exact :math:`p_t = \mathcal N(a_t m, \Sigma_t)` as a ``MultivariateNormal``.

        ``t`` is a float (parameters' dtype and device) or a 0-dim tensor (its dtype and device).
        """
        times = ScheduleAt(self.path, self._scalar_time(t))
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


class MixtureMarginal(MarginalBase):
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
        self.chunk_size = check_chunk_size(chunk_size)
        means = check_finite("means", check_floating("means", means))
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        if weights is None:
            log_weights = torch.full((k,), -math.log(k), dtype=torch.float64, device=means.device)
        else:
            log_weights = normalised_log_weights(weights, k, means.device)
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
            eigenvalues, eigenvectors = check_spd("covs", covs.detach())
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
        what = describe_request(score, posterior_mean, velocity, divergence)
        p = self._params(x)
        step = self._chunk(x.shape[0])
        if self.empirical:
            return self._empirical_statistics(
                x, times, p, step, what, score, posterior_mean, velocity, divergence
            )
        times.require_nondegenerate(what)
        post = mixture_posterior(
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
        times: ScheduleAt,
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
        post = empirical_posterior(
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
        times = ScheduleAt(self.path, self._scalar_time(t))
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
