"""The registry of exact cases shared by the tests, ``cnftools validate`` and :mod:`cnftools.testing`.

One place defines the paths and closed-form problems every check runs on, so a test and a
validation row can never drift apart. Each entry builds fresh objects; nothing here is random
unless a generator is passed.

Example:
    >>> from cnftools.cases import PATH_CASES
    >>> sorted(PATH_CASES)[:2]
    ['OT(sigma_min=0)', 'OT(sigma_min=0.1)']

Theory sections cited here (pages under ``docs/theory/``):

- §8: ``docs/theory/paths.md#three-paths``
- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cnftools._checks import check_int
from cnftools.data import GaussianMixture
from cnftools.marginals import GaussianMarginal, MixtureMarginal
from cnftools.paths import AffineGaussianPath, GaussianPath, OTPath, VEPath, VPPath

__all__ = [
    "AFFINE_PATH_CASES",
    "DATA_CASES",
    "PATH_CASES",
    "DataCase",
    "PathCase",
    "cosine_path",
    "random_orthogonal",
    "random_spd",
    "x1_dependent_path",
]


@dataclass(frozen=True, kw_only=True)
class PathCase:
    """A path with the facts a check needs about it.

    Attributes:
        build: makes the path.
        singular_at_one: the conditional field is singular at ``t = 1`` (``sigma_1 = 0``).
        affine: the path has the form ``mu_t = a_t x1``, ``sigma_t = s_t`` (closed-form marginals).
        p0_is_standard: ``p_0(x|x1) = N(0, I)`` exactly.
        boundary: ``boundary(x1) -> (mean_0, std_0, mean_1, std_1)``, the end points of the path
            as theory §8 states them, computed independently of the path's code (plain ``math``).
    """

    build: Callable[[], GaussianPath]
    singular_at_one: bool
    affine: bool
    p0_is_standard: bool
    boundary: Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


def _ends(mean0: Tensor, std0: float | Tensor, mean1: Tensor, std1: float | Tensor):
    like = mean1
    as_tensor = lambda s: torch.as_tensor(s, dtype=like.dtype, device=like.device)  # noqa: E731
    return mean0, as_tensor(std0), mean1, as_tensor(std1)


def _vp_alpha1(beta_min: float, beta_max: float) -> float:
    """alpha_1 = exp(-T(1)/2), T(1) = (beta_min + beta_max) / 2."""
    return math.exp(-0.25 * (beta_min + beta_max))


def _vp_boundary(beta_min: float, beta_max: float):
    a1 = _vp_alpha1(beta_min, beta_max)
    return lambda x1: _ends(a1 * x1, math.sqrt(1 - a1**2), x1, 0.0)


def _x1_dependent_std1(x1: Tensor) -> Tensor:
    event_mean = x1.reshape(x1.shape[0], -1).mean(dim=1)
    return (0.1 * (1 + torch.tanh(event_mean) ** 2)).reshape(-1, *([1] * (x1.dim() - 1)))


def cosine_path(sigma_min: float = 0.05) -> AffineGaussianPath:
    r"""A user-style affine path: :math:`a_t = \sin(\pi t/2)`, :math:`s_t = \cos(\pi t / 2)(1-\sigma_{\min}) + \sigma_{\min}`.

    Its derivatives come from autograd, so it exercises the generic code paths.
    """
    return AffineGaussianPath(
        signal_scale=lambda t: torch.sin(0.5 * math.pi * t),
        noise_scale=lambda t: torch.cos(0.5 * math.pi * t) * (1 - sigma_min) + sigma_min,
    )


def x1_dependent_path() -> GaussianPath:
    r"""A user path whose std depends on the data point (a general :class:`GaussianPath`).

    :math:`\mu_t = t^2 x_1`, :math:`\sigma_t(x_1) = 1 - t + t\,\sigma(x_1)` with
    :math:`\sigma(x_1) = 0.1 (1 + \tanh^2(\bar x_1))`, :math:`\bar x_1` the mean over the event.
    """

    def mean(t: Tensor, x1: Tensor) -> Tensor:
        return t**2 * x1

    def std(t: Tensor, x1: Tensor) -> Tensor:
        event_mean = x1.reshape(x1.shape[0], -1).mean(dim=1).reshape(t.shape)
        return 1 - t + t * 0.1 * (1 + torch.tanh(event_mean) ** 2)

    return GaussianPath(mean, std)


PATH_CASES: dict[str, PathCase] = {
    "OT(sigma_min=0)": PathCase(
        build=lambda: OTPath(0.0),
        singular_at_one=True,
        affine=True,
        p0_is_standard=True,
        boundary=lambda x1: _ends(0 * x1, 1.0, x1, 0.0),
    ),
    "OT(sigma_min=0.1)": PathCase(
        build=lambda: OTPath(0.1),
        singular_at_one=False,
        affine=True,
        p0_is_standard=True,
        boundary=lambda x1: _ends(0 * x1, 1.0, x1, 0.1),
    ),
    "VE(0.01, 50)": PathCase(
        build=lambda: VEPath(0.01, 50.0),
        singular_at_one=False,
        affine=True,
        p0_is_standard=False,
        boundary=lambda x1: _ends(x1, 50.0, x1, 0.01),
    ),
    "VE(0.1, 5)": PathCase(
        build=lambda: VEPath(0.1, 5.0),
        singular_at_one=False,
        affine=True,
        p0_is_standard=False,
        boundary=lambda x1: _ends(x1, 5.0, x1, 0.1),
    ),
    "VP(0.1, 20)": PathCase(
        build=lambda: VPPath(0.1, 20.0),
        singular_at_one=True,
        affine=True,
        p0_is_standard=False,
        boundary=_vp_boundary(0.1, 20.0),
    ),
    "VP(1, 5)": PathCase(
        build=lambda: VPPath(1.0, 5.0),
        singular_at_one=True,
        affine=True,
        p0_is_standard=False,
        boundary=_vp_boundary(1.0, 5.0),
    ),
    "cosine (user, affine)": PathCase(
        build=cosine_path,
        singular_at_one=False,
        affine=True,
        p0_is_standard=True,
        boundary=lambda x1: _ends(0 * x1, 1.0, x1, 0.05),
    ),
    "x1-dependent std (user)": PathCase(
        build=x1_dependent_path,
        singular_at_one=False,
        affine=False,
        p0_is_standard=True,
        boundary=lambda x1: _ends(0 * x1, 1.0, x1, _x1_dependent_std1(x1)),
    ),
}


# ----------------------------------------------------------------------------------------------
# Data distributions with closed-form marginal paths (theory §9, §10): Gaussian, mixture, empirical.
# The parameters are drawn once, in float64 on the CPU, from a seeded generator, then cast, so every
# dtype and device sees the same numbers.


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return generator


def random_orthogonal(
    d: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> Tensor:
    r"""A random orthogonal ``(d, d)`` matrix: the :math:`Q` of the QR factorisation of a Gaussian
    matrix, column signs fixed by :math:`\operatorname{sign}(\operatorname{diag} R)` (so it is
    Haar-distributed). Drawn in float64 on ``generator``'s device, then cast to ``dtype`` and
    ``device`` (default: the generator's device).

    Example:
        >>> import torch
        >>> from cnftools.cases import random_orthogonal
        >>> q = random_orthogonal(4, torch.Generator().manual_seed(0))
        >>> torch.allclose(q @ q.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
        True
    """
    d, generator = check_int("d", d, low=1), _check_generator(generator)
    g = torch.randn(d, d, generator=generator, dtype=torch.float64, device=generator.device)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r))
    return q.to(dtype=dtype, device=device if device is not None else generator.device)


def random_spd(
    d: int,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    *,
    eigenvalues: tuple[float, float] | Tensor = (0.5, 2.0),
) -> Tensor:
    r"""A random symmetric positive-definite ``(d, d)`` matrix :math:`S = Q\,\mathrm{diag}(\lambda)
    \,Q^\top`, :math:`Q` from :func:`random_orthogonal`.

    The one home for random covariances in cnftools (the shared cases, the hypothesis strategy
    :func:`cnftools.testing.spd_matrices`, benchmarks). Built in float64 on ``generator``'s device,
    made exactly symmetric, then cast.

    Args:
        d: the dimension.
        generator: the source of randomness (draws :math:`Q`, then :math:`\lambda` if drawn).
        dtype: dtype of the result (default float64).
        device: device of the result (default: the generator's device).
        eigenvalues: ``(low, high)`` with ``0 < low <= high`` draws
            :math:`\lambda_j \sim U[\mathrm{low}, \mathrm{high}]` (condition number at most
            ``high / low``); a ``(d,)`` tensor of positive values uses exactly those.

    Raises:
        ValueError: ``d`` not a positive int, a bad range, or eigenvalues of the wrong shape,
            non-finite or not positive.
        TypeError: ``generator`` is not a ``torch.Generator``.

    Example:
        >>> import torch
        >>> from cnftools.cases import random_spd
        >>> S = random_spd(3, torch.Generator().manual_seed(0), eigenvalues=(0.5, 2.0))
        >>> lam = torch.linalg.eigvalsh(S)
        >>> bool((lam >= 0.5 - 1e-12).all() and (lam <= 2.0 + 1e-12).all()), bool((S == S.T).all())
        (True, True)
    """
    d, generator = check_int("d", d, low=1), _check_generator(generator)
    if isinstance(eigenvalues, Tensor):
        lam = eigenvalues.detach().to(dtype=torch.float64, device=generator.device)
        if lam.shape != (d,):
            raise ValueError(f"eigenvalues must have shape (d,) = ({d},), got {tuple(lam.shape)}")
        if not bool((torch.isfinite(lam) & (lam > 0)).all()):
            raise ValueError("eigenvalues must be finite and > 0")
        q = random_orthogonal(d, generator)
    else:
        if not (isinstance(eigenvalues, tuple) and len(eigenvalues) == 2):
            raise ValueError(
                f"eigenvalues must be a (low, high) tuple or a (d,) tensor, got {eigenvalues!r}"
            )
        low, high = (float(v) for v in eigenvalues)
        if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
            raise ValueError(f"eigenvalues=(low, high) needs 0 < low <= high, got {eigenvalues}")
        q = random_orthogonal(d, generator)
        lam = low + (high - low) * torch.rand(
            d, generator=generator, dtype=torch.float64, device=generator.device
        )
    s = (q * lam) @ q.T
    s = 0.5 * (s + s.T)
    return s.to(dtype=dtype, device=device if device is not None else generator.device)


@dataclass(frozen=True)
class DataCase:
    """A data distribution ``q`` whose marginal path has a closed form (theory §9–§10).

    Attributes:
        kind: ``"gaussian"`` (``N(m, S)``), ``"mixture"`` (Gaussian mixture) or ``"empirical"``
            (weighted data points).
        d: the data dimension.
        components: 1 for a Gaussian, ``K`` for a mixture, ``N`` data points for empirical data.
        seed: seed of the float64 CPU generator the parameters are drawn from.
        uniform_weights: mixture/empirical weights uniform (else drawn, positive, unequal).
        scale: spread of the means / data points (standard deviation of their entries).
    """

    kind: str
    d: int
    components: int
    seed: int
    uniform_weights: bool = False
    scale: float = 1.5

    def parameters(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> dict[str, Tensor]:
        """The parameters: ``mean, cov`` (Gaussian), ``means, covs, weights`` (mixture) or
        ``means, weights`` (empirical: ``means`` are the data points), cast to dtype/device."""
        gen = torch.Generator().manual_seed(self.seed)
        f64 = torch.float64
        if self.kind == "gaussian":
            out = {
                "mean": self.scale * torch.randn(self.d, generator=gen, dtype=f64),
                "cov": random_spd(self.d, gen, eigenvalues=(0.25, 2.0)),
            }
        else:
            k = self.components
            out = {"means": self.scale * torch.randn(k, self.d, generator=gen, dtype=f64)}
            if self.kind == "mixture":
                out["covs"] = torch.stack(
                    [random_spd(self.d, gen, eigenvalues=(0.1, 1.0)) for _ in range(k)]
                )
            elif self.kind != "empirical":
                raise ValueError(f"unknown data kind {self.kind!r}")
            w = (
                torch.ones(k, dtype=f64)
                if self.uniform_weights
                else 0.2 + torch.rand(k, generator=gen, dtype=f64)
            )
            out["weights"] = w / w.sum()
        out = {key: v.to(dtype=dtype, device=device) for key, v in out.items()}
        if self.kind == "mixture":  # the one mixture container validates and carries them
            return GaussianMixture(out["means"], out["covs"], out["weights"]).as_dict()
        return out

    def mixture(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> GaussianMixture:
        """A mixture case's parameters as the validated :class:`cnftools.data.GaussianMixture`."""
        if self.kind != "mixture":
            raise ValueError(f"mixture() applies to mixture cases, this one is {self.kind!r}")
        return GaussianMixture(**self.parameters(dtype, device))

    def marginal(
        self,
        path: AffineGaussianPath,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        chunk_size: int | None = None,
    ) -> GaussianMarginal | MixtureMarginal:
        """The marginal path of this data under ``path``."""
        p = self.parameters(dtype, device)
        if self.kind == "gaussian":
            return GaussianMarginal(path, p["mean"], p["cov"])
        return MixtureMarginal(path, p["means"], p.get("covs"), p["weights"], chunk_size=chunk_size)

    def t_max(self, path_case: PathCase) -> float:
        """Largest safe time: empirical marginals are singular where ``s_t = 0`` (t = 1 on paths
        with ``singular_at_one``), so those stop at 0.98; everything else reaches 1."""
        return 0.98 if self.kind == "empirical" and path_case.singular_at_one else 1.0


DATA_CASES: dict[str, DataCase] = {
    "gaussian d=1": DataCase("gaussian", 1, 1, seed=11),
    "gaussian d=3": DataCase("gaussian", 3, 1, seed=12),
    "gaussian d=8": DataCase("gaussian", 8, 1, seed=13),
    "mixture K=3 d=1": DataCase("mixture", 1, 3, seed=21),
    "mixture K=4 d=2": DataCase("mixture", 2, 4, seed=22),
    "empirical N=6 d=1": DataCase("empirical", 1, 6, seed=31, uniform_weights=True),
    "empirical N=40 d=3 (weighted)": DataCase("empirical", 3, 40, seed=32),
}
"""Exact data cases for marginal paths, shared by tests/test_marginals.py, validation/theorem1.py
and the likelihood checks. Combine with the affine entries of :data:`PATH_CASES`
(:data:`AFFINE_PATH_CASES`)."""

AFFINE_PATH_CASES: dict[str, PathCase] = {k: v for k, v in PATH_CASES.items() if v.affine}
"""The entries of :data:`PATH_CASES` with closed-form marginals (OT, VE, VP, cosine)."""
