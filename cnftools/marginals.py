r"""Marginal probability paths and their generating fields in closed form (THEORY §5, §9, §10).

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
:func:`cnftools.fields.closed_form_divergence` picks up.

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
"""

from __future__ import annotations

import math
from numbers import Integral

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

from cnftools._checks import as_time, check_batched, check_finite, check_floating
from cnftools.paths import AffineGaussianPath

__all__ = ["GaussianMarginal", "MixtureMarginal"]

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


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, Integral) or int(n) < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return int(n)


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
# Streaming softmax statistics
def _weighted_mean(w: Tensor, v: Tensor) -> Tensor:
    """Σ_k w_bk v_k: ``w`` (B, k); ``v`` (k, d), (B, k, d) or (B, k)."""
    if v.dim() == 2 and v.shape != w.shape:
        return w @ v
    if v.dim() == 2:
        return (w * v).sum(dim=1)
    return (w.unsqueeze(-1) * v).sum(dim=1)


class _SoftmaxStatistics:
    r"""Online softmax over components, merged chunk by chunk.

    Keeps :math:`\log \sum_k e^{\ell_k}`, the softmax-weighted means of some per-component values
    and, optionally, the weighted cross-covariance
    :math:`\sum_k w_k (p_k - \bar p)\cdot(q_k - \bar q)` of two of them. Chunks merge
    with Chan et al.'s pairwise formulas, so no (B, K, d) tensor is ever formed for the whole K, and
    centred sums avoid the cancellation of raw second moments.
    """

    def __init__(self, pair: tuple[int, int] | None = None) -> None:
        self.pair = pair
        self.top: Tensor | None = None
        self.mass: Tensor | None = None
        self.means: list[Tensor] = []
        self.cross: Tensor | None = None

    def add(self, logits: Tensor, values: list[Tensor]) -> None:
        top = logits.max(dim=1).values
        e = torch.exp(logits - top.unsqueeze(1))
        mass = e.sum(dim=1)
        w = e / mass.unsqueeze(1)
        means = [_weighted_mean(w, v) for v in values]
        cross = None
        if self.pair is not None:
            i, j = self.pair
            pc = values[i] - means[i].unsqueeze(1)
            qc = pc if i == j else values[j] - means[j].unsqueeze(1)
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
        deltas = [mb - ma for ma, mb in zip(self.means, means, strict=True)]
        if self.pair is not None:
            assert self.cross is not None and cross is not None
            i, j = self.pair
            self.cross = (
                alpha * self.cross
                + beta * cross
                + alpha * beta * (deltas[i] * deltas[j]).sum(dim=-1)
            )
        self.means = [
            ma + (beta.unsqueeze(-1) if ma.dim() == 2 else beta) * dl
            for ma, dl in zip(self.means, deltas, strict=True)
        ]
        self.top, self.mass = new_top, total

    def log_normalizer(self) -> Tensor:
        assert self.top is not None and self.mass is not None
        return self.top + torch.log(self.mass)


# ----------------------------------------------------------------------------------------------
# Per-component closed forms for full covariances (used by both marginal classes)
def _full_components(
    x: Tensor,
    times: _Times,
    mean: Tensor,
    eigenvalues: Tensor,
    eigenvectors: Tensor,
    need: str,
) -> dict[str, Tensor]:
    r"""Closed forms of §9 for components :math:`\mathcal N(a_t m_k, a_t^2 S_k + s_t^2 I)`.

    ``mean`` (k, d), ``eigenvalues`` (k, d), ``eigenvectors`` (k, d, d). ``need`` is one of
    ``"log_prob"``, ``"velocity"``, ``"divergence"``, ``"score"``. Returns ``log_density`` (B, k)
    and, as needed, ``velocity`` u_k (B, k, d), ``score`` g_k (B, k, d), ``trace`` tr A_k (B, k).
    """
    a, s2 = times.a, times.s2
    centre = a[:, None, None] * mean  # (B, k, d)
    diff = x.unsqueeze(1) - centre
    y = torch.einsum("bki,kij->bkj", diff, eigenvectors)  # Q_k^T (x - a m_k)
    var = a[:, None, None] ** 2 * eigenvalues + s2[:, None, None]  # eigenvalues of Σ_k(t)
    d = x.shape[1]
    out = {
        "log_density": -0.5
        * ((y**2 / var).sum(-1) + torch.log(var).sum(-1) + d * math.log(2 * math.pi))
    }
    if need in ("score", "divergence"):
        out["score"] = -torch.einsum("kij,bkj->bki", eigenvectors, y / var)
    if need in ("velocity", "divergence"):
        da, rate = times.derivatives()
        coef = (a * da)[:, None, None] * eigenvalues + rate[:, None, None]
        coef = coef / var  # eigenvalues of A_k = (a a' S_k + s s' I) Σ_k^{-1}
        out["velocity"] = da[:, None, None] * mean + torch.einsum(
            "kij,bkj->bki", eigenvectors, coef * y
        )
        out["trace"] = coef.sum(-1)
    return out


class _Marginal:
    """Shared plumbing: path, parameter caching per dtype/device, input checks."""

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
        n = _check_n(n)
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

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        """The marginal field: ``marginal(x, t) == marginal.velocity(x, t)``."""
        return self.velocity(x, t)

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prior(self) -> Distribution:
        r"""The exact :math:`p_0` as a distribution (``distribution(0.0)``); not always
        :math:`\mathcal N(0, I)`: VE and VP have other :math:`p_0`."""
        return self.distribution(0.0)

    def distribution(self, t: float | Tensor) -> Distribution:  # pragma: no cover - abstract
        raise NotImplementedError


class GaussianMarginal(_Marginal):
    r"""The marginal path of Gaussian data :math:`q = \mathcal N(m, S)` (THEORY §9).

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
        Lipman et al. (2022), arXiv:2210.02747, Theorem 1; THEORY.md §9.
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

    def _one(self, x: Tensor, times: _Times, need: str) -> dict[str, Tensor]:
        times.require_nondegenerate(need)
        p = self._params(x)
        out = _full_components(
            x, times, p["mean"][None], p["eigenvalues"][None], p["eigenvectors"][None], need
        )
        return {k: v[:, 0] for k, v in out.items()}

    def log_prob(self, x: Tensor, t: float | Tensor) -> Tensor:
        r""":math:`\log \mathcal N(x; a_t m, a_t^2 S + s_t^2 I)`, shape ``(B,)``."""
        x, times = self._prepare(x, t)
        return self._one(x, times, "log_prob")["log_density"]

    def score(self, x: Tensor, t: float | Tensor) -> Tensor:
        r""":math:`\nabla_x \log p_t(x) = -\Sigma_t^{-1}(x - a_t m)`, shape ``(B, d)``."""
        x, times = self._prepare(x, t)
        return self._one(x, times, "score")["score"]

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The marginal field :math:`u_t(x) = a_t' m + A_t (x - a_t m)`, shape ``(B, d)``."""
        x, times = self._prepare(x, t)
        return self._one(x, times, "velocity")["velocity"]

    def divergence(self, x: Tensor, t: float | Tensor) -> Tensor:
        r""":math:`\operatorname{div} u_t = \operatorname{tr} A_t = \sum_j
        \frac{a a' \lambda_j + s s'}{a^2 \lambda_j + s^2}`, shape ``(B,)``."""
        x, times = self._prepare(x, t)
        return self._one(x, times, "velocity")["trace"]

    def flow(self, z: Tensor, t: float | Tensor, t0: float | Tensor = 0.0) -> Tensor:
        r"""The flow of the marginal field from time ``t0`` to ``t`` (THEORY §9):

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
    r"""The marginal path of a Gaussian mixture or of empirical data (THEORY §10).

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

    Sums over components run ``chunk_size`` components at a time (online softmax, pairwise-merged
    weighted means and centred covariances), so memory is ``O(B · chunk_size · d)``, not
    ``O(B · K · d)``.

    Args:
        path: an :class:`~cnftools.paths.AffineGaussianPath`.
        means: component means :math:`m_k` (or data points), shape ``(K, d)``.
        covs: component covariances, shape ``(K, d, d)``, each SPD; ``None`` for empirical data.
        weights: :math:`\pi_k`, shape ``(K,)``, finite, ``>= 0`` with a positive sum; they are
            normalised to sum to one, and zero-weight components are dropped. Default uniform.
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
        Lipman et al. (2022), arXiv:2210.02747, Theorem 1; THEORY.md §10.
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
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64, device=means.device)
        else:
            weights = check_finite("weights", check_floating("weights", weights))
            if weights.shape != (k,):
                raise ValueError(
                    f"weights must have shape (K,) = ({k},), got {tuple(weights.shape)}"
                )
            if weights.device != means.device:
                raise ValueError(
                    f"weights must be on the means' device {means.device}, got {weights.device}"
                )
            if bool((weights < 0).any()):
                raise ValueError("weights must be >= 0")
            if not float(weights.sum()) > 0:
                raise ValueError("weights must have a positive sum")
            weights = weights.to(torch.float64)
            weights = weights / weights.sum()
        keep = weights > 0
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
        self.weights = weights[keep]
        self._eigenvalues, self._eigenvectors = eigenvalues, eigenvectors

    @property
    def num_components(self) -> int:
        """The number of components (data points) with positive weight."""
        return self.means.shape[0]

    def _params64(self) -> dict[str, Tensor]:
        out = {"means": self.means.to(torch.float64), "log_weights": torch.log(self.weights)}
        if not self.empirical:
            assert self._eigenvalues is not None and self._eigenvectors is not None
            out["eigenvalues"], out["eigenvectors"] = self._eigenvalues, self._eigenvectors
        return out

    def _chunk(self, batch: int) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        per_component = batch * self.d * (self.d if not self.empirical else 1)
        return max(1, _DEFAULT_CHUNK_ELEMENTS // max(1, per_component))

    def _statistics(self, x: Tensor, times: _Times, need: str) -> _SoftmaxStatistics:
        p = self._params(x)
        step = self._chunk(x.shape[0])
        if self.empirical:
            times.require_positive_noise(need)
            stats = _SoftmaxStatistics(pair=(0, 0) if need == "divergence" else None)
            a, s2 = times.a, times.s2
            for lo in range(0, self.num_components, step):
                pts = p["means"][lo : lo + step]
                sq = ((x.unsqueeze(1) - a[:, None, None] * pts) ** 2).sum(-1)
                logits = p["log_weights"][lo : lo + step] - 0.5 * sq / s2[:, None]
                # (B, k, d), not (k, d): a (k, d) tensor with k = B and d = k is read as a (B, k)
                # per-row value by _weighted_mean's shape dispatch (a wrong velocity, issue 11.1).
                shared = pts.expand(x.shape[0], -1, -1)
                stats.add(logits, [] if need == "log_prob" else [shared])
            return stats
        times.require_nondegenerate(need)
        pair = (0, 1) if need == "divergence" else None
        stats = _SoftmaxStatistics(pair=pair)
        for lo in range(0, self.num_components, step):
            sl = slice(lo, lo + step)
            comp = _full_components(
                x, times, p["means"][sl], p["eigenvalues"][sl], p["eigenvectors"][sl], need
            )
            logits = p["log_weights"][sl] + comp["log_density"]
            values = {
                "log_prob": [],
                "score": [comp.get("score")],
                "velocity": [comp.get("velocity")],
                "divergence": [comp.get("score"), comp.get("velocity"), comp.get("trace")],
            }[need]
            stats.add(logits, values)  # type: ignore[arg-type]
        return stats

    def log_prob(self, x: Tensor, t: float | Tensor) -> Tensor:
        r""":math:`\log p_t(x) = \operatorname{logsumexp}_k \ell_k`, shape ``(B,)``."""
        x, times = self._prepare(x, t)
        stats = self._statistics(x, times, "log_prob")
        out = stats.log_normalizer()
        if self.empirical:
            out = out - 0.5 * self.d * torch.log(2 * math.pi * times.s2)
        return out

    def score(self, x: Tensor, t: float | Tensor) -> Tensor:
        r""":math:`\nabla_x \log p_t(x) = \sum_k w_k g_k`, shape ``(B, d)``."""
        x, times = self._prepare(x, t)
        stats = self._statistics(x, times, "score" if not self.empirical else "velocity")
        if self.empirical:
            return -(x - times.a[:, None] * stats.means[0]) / times.s2[:, None]
        return stats.means[0]

    def posterior_mean(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""Empirical data only: the posterior mean :math:`\hat x_1 = \sum_i w_i x_1^i`, (B, d)."""
        if not self.empirical:
            raise ValueError("posterior_mean is defined here for empirical data (covs=None) only")
        x, times = self._prepare(x, t)
        return self._statistics(x, times, "velocity").means[0]

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The marginal field of Theorem 1 in closed form, shape ``(B, d)``."""
        x, times = self._prepare(x, t)
        stats = self._statistics(x, times, "velocity")
        if not self.empirical:
            return stats.means[0]
        da, rate = times.derivatives()
        ratio = (rate / times.s2)[:, None]
        return ratio * x + (da[:, None] - times.a[:, None] * ratio) * stats.means[0]

    def divergence(self, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The closed-form :math:`\operatorname{div} u_t(x)`, shape ``(B,)``."""
        x, times = self._prepare(x, t)
        stats = self._statistics(x, times, "divergence")
        assert stats.cross is not None
        if not self.empirical:
            return stats.means[2] + stats.cross
        da, rate = times.derivatives()
        ratio = rate / times.s2
        return self.d * ratio + times.a / times.s2 * (da - times.a * ratio) * stats.cross

    def distribution(self, t: float | Tensor) -> MixtureSameFamily:
        r"""The exact :math:`p_t` as a ``MixtureSameFamily`` (full-covariance ``MultivariateNormal``
        components, or isotropic ``Normal`` components for empirical data).

        ``t`` is a float (parameters' dtype and device) or a 0-dim tensor (its dtype and device).
        """
        times = _Times(self.path, self._scalar_time(t))
        p = self._params(times.t)
        mix = Categorical(probs=torch.exp(p["log_weights"]))
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
