"""The registry of exact cases shared by the tests, ``cnftools validate`` and :mod:`cnftools.testing`.

One place defines the paths and closed-form problems every check runs on, so a test and a
validation row can never drift apart. Each entry builds fresh objects; nothing here is random
unless a generator is passed.

Example:
    >>> from cnftools.cases import PATH_CASES
    >>> sorted(PATH_CASES)[:2]
    ['OT(sigma_min=0)', 'OT(sigma_min=0.1)']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cnftools.paths import AffineGaussianPath, GaussianPath, OTPath, VEPath, VPPath

__all__ = ["PATH_CASES", "PathCase", "cosine_path", "x1_dependent_path"]


@dataclass(frozen=True)
class PathCase:
    """A path with the facts a check needs about it.

    Attributes:
        build: makes the path.
        singular_at_one: the conditional field is singular at ``t = 1`` (``sigma_1 = 0``).
        affine: the path has the form ``mu_t = a_t x1``, ``sigma_t = s_t`` (closed-form marginals).
        p0_is_standard: ``p_0(x|x1) = N(0, I)`` exactly.
        boundary: ``boundary(x1) -> (mean_0, std_0, mean_1, std_1)``, the end points of the path
            as THEORY §8 states them, computed independently of the path's code (plain ``math``).
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
        lambda: OTPath(0.0), True, True, True, lambda x1: _ends(0 * x1, 1.0, x1, 0.0)
    ),
    "OT(sigma_min=0.1)": PathCase(
        lambda: OTPath(0.1), False, True, True, lambda x1: _ends(0 * x1, 1.0, x1, 0.1)
    ),
    "VE(0.01, 50)": PathCase(
        lambda: VEPath(0.01, 50.0), False, True, False, lambda x1: _ends(x1, 50.0, x1, 0.01)
    ),
    "VE(0.1, 5)": PathCase(
        lambda: VEPath(0.1, 5.0), False, True, False, lambda x1: _ends(x1, 5.0, x1, 0.1)
    ),
    "VP(0.1, 20)": PathCase(lambda: VPPath(0.1, 20.0), True, True, False, _vp_boundary(0.1, 20.0)),
    "VP(1, 5)": PathCase(lambda: VPPath(1.0, 5.0), True, True, False, _vp_boundary(1.0, 5.0)),
    "cosine (user, affine)": PathCase(
        cosine_path, False, True, True, lambda x1: _ends(0 * x1, 1.0, x1, 0.05)
    ),
    "x1-dependent std (user)": PathCase(
        x1_dependent_path,
        False,
        False,
        True,
        lambda x1: _ends(0 * x1, 1.0, x1, _x1_dependent_std1(x1)),
    ),
}
