r"""Built-in datasets, dequantization and bits per dimension (theory §10, §12).

Every toy dataset has one shape of API: a function that returns a distribution object with
``sample(n, generator=None, *, device, dtype)``, and ``log_prob(x)`` where the density is exact.

* :func:`eight_gaussians` (and :func:`gaussian_mixture`) return a :class:`GaussianMixture`: exact
  ``log_prob``, exact sampler, and :meth:`GaussianMixture.marginal` giving the closed-form marginal
  path of §10 (:class:`~cnftools.marginals.MixtureMarginal`).
* :func:`checkerboard` returns a :class:`Checkerboard`: uniform on 8 unit squares of
  :math:`[-2, 2]^2`, density :math:`1/8` there; entropy :math:`\log 8` exactly.
* :func:`two_moons` and :func:`spirals` return samplers only (:class:`TwoMoons`,
  :class:`Spirals`; no density, for pictures).

Real data shipped inside a package (nothing is downloaded): :func:`load_digits`, scikit-learn's
8×8 handwritten digits, 1797 × 64 integers in ``0..16`` (:data:`DIGITS_LEVELS` = 17 levels). It needs
the optional dependency ``scikit-learn``.

Dequantization and bits/dim (theory §12): integer data :math:`x \in \{0, \dots, L-1\}^D`,
:math:`x' = x + u`, :math:`u \sim \mathcal U[0,1)^D`, and the model sees :math:`y = x'/L \in [0,1)^D`
(or :math:`y = 2x'/L - 1 \in [-1, 1)^D` with ``centered=True``). Then

.. math::

    \mathrm{bpd} = \frac{\mathrm{NLL}_y}{D \ln 2} + \log_2 L
    \quad\big(\text{centered: } + \log_2 (L/2)\big),

so a model uniform on the cube gives exactly :math:`\log_2 L`.

Every ``sample`` takes ``n`` and an optional ``generator``; results are on the generator's device
(or ``device``) in ``dtype`` (default: torch's default dtype).

References:
    Grathwohl et al., FFJORD (2019), arXiv:1810.01367 (the 2-D toy sets);
    Theis, van den Oord, Bethge, A note on the evaluation of generative models (2016),
    arXiv:1511.01844 (dequantization); Ho et al., Flow++ (2019), arXiv:1902.00275 (bits/dim, K).

Theory sections cited here (pages under ``docs/theory/``):

- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
- §12: ``docs/theory/bits-per-dim.md#bits-per-dimension``
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from cnftools._checks import check_batched, check_finite, check_floating, check_int
from cnftools._dequantization import (
    Dequantization,
    bits_per_dim,
    check_integer_data,
    dequantization_log_det,
    dequantize,
    dequantized_nll,
    importance_weighted_log_mean,
    quantize,
)
from cnftools._digits import DIGITS_LEVELS, load_digit_labels, load_digits
from cnftools.marginals import MixtureMarginal

__all__ = [
    "DIGITS_LEVELS",
    "Checkerboard",
    "Dequantization",
    "GaussianMixture",
    "Spirals",
    "TwoMoons",
    "bits_per_dim",
    "check_integer_data",
    "checkerboard",
    "dequantization_log_det",
    "dequantize",
    "dequantized_nll",
    "eight_gaussians",
    "gaussian_mixture",
    "importance_weighted_log_mean",
    "load_digit_labels",
    "load_digits",
    "quantize",
    "spirals",
    "two_moons",
]


def _target(
    generator: torch.Generator | None, device: torch.device | str | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    return torch.device(device), dtype


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class GaussianMixture:
    r"""A Gaussian mixture :math:`q = \sum_k \pi_k \mathcal N(m_k, S_k)` with exact density.

    Attributes:
        means: :math:`m_k`, shape ``(K, d)``.
        covs: :math:`S_k`, shape ``(K, d, d)``, symmetric positive definite.
        weights: :math:`\pi_k`, shape ``(K,)``, summing to one.

    Example:
        >>> import torch
        >>> q = eight_gaussians(dtype=torch.float64)
        >>> x = q.sample(4, torch.Generator().manual_seed(0))
        >>> x.shape, q.log_prob(x).shape
        (torch.Size([4, 2]), torch.Size([4]))
    """

    means: Tensor
    covs: Tensor
    weights: Tensor

    def __post_init__(self) -> None:
        means = check_floating("means", self.means)
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        k, d = means.shape
        covs = check_floating("covs", self.covs)
        if covs.shape != (k, d, d):
            raise ValueError(
                f"covs must have shape (K, d, d) = ({k}, {d}, {d}), got {tuple(covs.shape)}"
            )
        weights = check_floating("weights", self.weights)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape (K,) = ({k},), got {tuple(weights.shape)}")
        for name, tensor in (("means", means), ("covs", covs), ("weights", weights)):
            check_finite(name, tensor)
            if tensor.dtype != means.dtype or tensor.device != means.device:
                raise TypeError(
                    f"{name} must have the dtype and device of means ({means.dtype}, "
                    f"{means.device}), got {tensor.dtype}, {tensor.device}"
                )
        if bool((weights < 0).any()) or abs(float(weights.sum()) - 1) > 1e-6:
            raise ValueError("weights must be >= 0 and sum to 1")
        if not bool(torch.allclose(covs, covs.transpose(-1, -2))):
            raise ValueError("covs must be symmetric")
        if bool((torch.linalg.cholesky_ex(covs).info != 0).any()):
            raise ValueError("covs must be positive definite (a Cholesky factorisation failed)")

    @property
    def dim(self) -> int:
        """The data dimension :math:`d`."""
        return int(self.means.shape[1])

    def __iter__(self) -> Iterator[Tensor]:
        """``means, covs, weights``: unpacks into ``MixtureMarginal(path, *mixture)``."""
        return iter((self.means, self.covs, self.weights))

    def _mvn(self) -> torch.distributions.MultivariateNormal:
        return torch.distributions.MultivariateNormal(
            self.means, scale_tril=torch.linalg.cholesky(self.covs)
        )

    def log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log q(x) = \operatorname{logsumexp}_k [\log\pi_k + \log\mathcal N(x; m_k, S_k)]`.

        Args:
            x: shape ``(B, d)``, in the mixture's dtype and device.

        Returns:
            Shape ``(B,)``.
        """
        x = check_batched("x", x)
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        comp = self._mvn().log_prob(x.unsqueeze(1))  # (B, K)
        return torch.logsumexp(comp + torch.log(self.weights), dim=1)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Exact draws: a component by its weight, then ``m_k + L_k z`` with ``S_k = L_k L_kᵀ``.

        Drawn in the mixture's own dtype on its device, then moved to ``device``/``dtype`` if given.
        """
        n = check_int("n", n, low=1)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(
            n, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device
        )
        chol = torch.linalg.cholesky(self.covs)[k]
        draws = self.means[k] + (chol @ z.unsqueeze(-1)).squeeze(-1)
        return draws.to(device=device or draws.device, dtype=dtype or draws.dtype)

    def as_dict(self) -> dict[str, Tensor]:
        """``{"means", "covs", "weights"}``: the keyword arguments of ``MixtureMarginal``."""
        return {"means": self.means, "covs": self.covs, "weights": self.weights}

    def marginal(self, path: object) -> object:
        """The closed-form marginal path of this mixture under an affine ``path`` (theory §10)."""
        return MixtureMarginal(path, self.means, self.covs, self.weights)  # type: ignore[arg-type]

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> GaussianMixture:
        """A copy on another device or dtype."""
        return GaussianMixture(
            *(p.to(device=device, dtype=dtype) for p in (self.means, self.covs, self.weights))
        )


def gaussian_mixture(
    means: Tensor, stds: float | Tensor, weights: Tensor | None = None
) -> GaussianMixture:
    r"""An isotropic mixture :math:`\sum_k \pi_k \mathcal N(m_k, \sigma_k^2 I)` (uniform weights by default)."""
    means = check_floating("means", means)
    if means.dim() != 2:
        raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
    k, d = means.shape
    stds_t = torch.as_tensor(stds, dtype=means.dtype, device=means.device).expand(k)
    if not bool(torch.isfinite(stds_t).all()) or bool((stds_t <= 0).any()):
        raise ValueError(f"stds must be finite and > 0, got {stds}")
    covs = stds_t.reshape(k, 1, 1) ** 2 * torch.eye(d, dtype=means.dtype, device=means.device)
    if weights is None:
        weights = torch.full((k,), 1.0 / k, dtype=means.dtype, device=means.device)
    return GaussianMixture(means, covs, weights)


def eight_gaussians(
    radius: float = 2.0,
    std: float = 0.2,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> GaussianMixture:
    r"""Eight equal-weight isotropic Gaussians centred on a circle.

    Means :math:`m_k = r(\cos(k\pi/4), \sin(k\pi/4))`, :math:`k = 0..7`, covariances
    :math:`\sigma^2 I`. (FFJORD's "8gaussians" is :math:`r = 4/\sqrt2`, :math:`\sigma = 0.5/\sqrt2`.)
    """
    device, dtype = _target(None, device, dtype)
    angle = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
    means = radius * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return gaussian_mixture(means.to(device=device, dtype=dtype), std)


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Checkerboard:
    r"""Uniform on the 8 "black" unit squares of a 4×4 board on :math:`[-2, 2)^2`.

    A cell :math:`[i, i+1) \times [j, j+1)` (:math:`i, j \in \{-2, \dots, 1\}`) is occupied when
    :math:`i + j` is even. Density :math:`1/8` on the occupied cells, 0 elsewhere; entropy
    :math:`\log 8`. (The layout of FFJORD's "checkerboard".)

    Example:
        >>> import torch
        >>> board = Checkerboard()
        >>> board.log_prob(torch.tensor([[0.5, 0.5], [0.5, -0.5]], dtype=torch.float64))
        tensor([-2.0794,    -inf], dtype=torch.float64)
    """

    entropy: ClassVar[float] = math.log(8.0)
    """The exact entropy, nats."""

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Exact draws: a column uniformly, then a uniform point in one of its two occupied cells."""
        n = check_int("n", n, low=1)
        device, dtype = _target(generator, device, dtype)
        u = torch.rand(n, 2, generator=generator, dtype=dtype, device=device)
        pick = torch.randint(0, 2, (n,), generator=generator, device=device).to(dtype)
        x = 4 * u[:, 0] - 2
        column = torch.floor(x)
        y = u[:, 1] - 2 + 2 * pick + torch.remainder(column, 2)
        return torch.stack([x, y], dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        r""":math:`\log(1/8)` on the occupied cells, :math:`-\infty` elsewhere; ``(B, 2) -> (B,)``."""
        x = check_batched("x", x)
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"x must have shape (B, 2), got {tuple(x.shape)}")
        cell = torch.floor(x)
        inside = ((x >= -2) & (x < 2)).all(dim=1)
        black = torch.remainder(cell.sum(dim=1), 2) == 0
        value = torch.full_like(x[:, 0], -math.log(8.0))
        return torch.where(inside & black, value, torch.full_like(value, -math.inf))


# ----------------------------------------------------------------------------------------------
class _NoisyCurve:
    """A 2-D picture sampler: points on a curve plus isotropic Gaussian noise (no density).

    Subclasses give ``noise`` and :meth:`_curve`; :meth:`sample` is the shared frame.
    """

    noise: float

    def _curve(
        self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``n`` draws, shape ``(n, 2)``."""
        n = check_int("n", n, low=1)
        device, dtype = _target(generator, device, dtype)
        points = self._curve(n, generator, device, dtype)
        noise = torch.randn(n, 2, generator=generator, dtype=dtype, device=device)
        return points + self.noise * noise


@dataclass(frozen=True)
class TwoMoons(_NoisyCurve):
    r"""Two interleaved half circles plus Gaussian noise (a sampler only: no density).

    Upper moon :math:`(\cos\theta, \sin\theta)`, lower :math:`(1 - \cos\theta, 0.5 - \sin\theta)`,
    :math:`\theta \sim \mathcal U[0, \pi]`, then centred by :math:`(-0.5, -0.25)`.

    Attributes:
        noise: standard deviation of the added Gaussian noise.
    """

    noise: float = 0.05

    def _curve(
        self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        theta = math.pi * torch.rand(n, generator=generator, dtype=dtype, device=device)
        lower = torch.randint(0, 2, (n,), generator=generator, device=device).to(dtype)
        x = torch.cos(theta) * (1 - 2 * lower) + lower
        y = torch.sin(theta) * (1 - 2 * lower) + 0.5 * lower
        return torch.stack([x - 0.5, y - 0.25], dim=1)


@dataclass(frozen=True)
class Spirals(_NoisyCurve):
    r"""Two interleaved Archimedean spirals plus noise (a sampler only: no density).

    Radius :math:`r = 2\tau`, angle :math:`2\pi\,\text{turns}\,\tau + \pi b` for
    :math:`\tau \sim \mathcal U[0, 1]` (area-uniform via :math:`\sqrt{\cdot}`), arm
    :math:`b \in \{0, 1\}`.

    Attributes:
        turns: turns of each arm.
        noise: standard deviation of the added Gaussian noise.
    """

    turns: float = 1.5
    noise: float = 0.05

    def _curve(
        self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        tau = torch.sqrt(torch.rand(n, generator=generator, dtype=dtype, device=device))
        arm = torch.randint(0, 2, (n,), generator=generator, device=device).to(dtype)
        angle = 2 * math.pi * self.turns * tau + math.pi * arm
        return 2 * tau.unsqueeze(1) * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)


def checkerboard() -> Checkerboard:
    """The checkerboard target (exact density, see :class:`Checkerboard`).

    Example:
        >>> checkerboard().sample(3, torch.Generator().manual_seed(0)).shape
        torch.Size([3, 2])
    """
    return Checkerboard()


def two_moons(*, noise: float = 0.05) -> TwoMoons:
    """The two-moons sampler (see :class:`TwoMoons`): ``two_moons().sample(n, generator)``."""
    return TwoMoons(noise)


def spirals(*, turns: float = 1.5, noise: float = 0.05) -> Spirals:
    """The two-spirals sampler (see :class:`Spirals`): ``spirals().sample(n, generator)``."""
    return Spirals(turns, noise)
