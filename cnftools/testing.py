"""Hypothesis strategies and explaining assertions for users' own test suites.

Requires ``hypothesis`` (installed with ``pip install cnftools[test]``). The project's own tests use
this module, so everything here is exercised by cnftools' CI.

Example:
    >>> import torch
    >>> from cnftools import OTPath
    >>> from cnftools.testing import assert_theorem3
    >>> assert_theorem3(OTPath(sigma_min=0.1), torch.randn(8, 3, dtype=torch.float64), 0.3)
"""

from __future__ import annotations

import math

import torch
from hypothesis import strategies as st
from torch import Tensor
from torch.func import jvp

from cnftools.paths import AffineGaussianPath, GaussianPath, OTPath, VEPath, VPPath

__all__ = [
    "assert_theorem3",
    "builtin_paths",
    "gaussian_paths",
    "ot_paths",
    "times",
    "user_affine_paths",
    "user_paths",
    "ve_paths",
    "vp_paths",
]


def ot_paths() -> st.SearchStrategy[OTPath]:
    """OT paths with ``sigma_min`` in [0, 0.5]."""
    return st.floats(0.0, 0.5).map(OTPath)


def ve_paths() -> st.SearchStrategy[VEPath]:
    """VE paths with ``sigma_min`` in [1e-3, 0.5] and ``sigma_max / sigma_min`` in [2, 1e4]."""
    return st.tuples(st.floats(1e-3, 0.5), st.floats(2.0, 1e4)).map(
        lambda p: VEPath(sigma_min=p[0], sigma_max=p[0] * p[1])
    )


def vp_paths() -> st.SearchStrategy[VPPath]:
    """VP paths with ``beta_min`` in [0, 1] and ``beta_max - beta_min`` in [0.5, 30]."""
    return st.tuples(st.floats(0.0, 1.0), st.floats(0.5, 30.0)).map(
        lambda p: VPPath(beta_min=p[0], beta_max=p[0] + p[1])
    )


def builtin_paths() -> st.SearchStrategy[AffineGaussianPath]:
    """Any of OT, VE, VP with random parameters."""
    return st.one_of(ot_paths(), ve_paths(), vp_paths())


def user_affine_paths() -> st.SearchStrategy[AffineGaussianPath]:
    r"""Random user-defined affine paths: :math:`a_t = t^p`, :math:`s_t = 1 - (1 - \sigma_{\min}) t^q`.

    ``p, q`` in [1, 3] and ``sigma_min`` in [0.01, 0.5]; derivatives come from autograd.
    """

    def build(params: tuple[float, float, float]) -> AffineGaussianPath:
        p, q, sigma_min = params
        return AffineGaussianPath(
            signal_scale=lambda t: t**p,
            noise_scale=lambda t: 1 - (1 - sigma_min) * t**q,
        )

    return st.tuples(st.floats(1.0, 3.0), st.floats(1.0, 3.0), st.floats(0.01, 0.5)).map(build)


def user_paths() -> st.SearchStrategy[GaussianPath]:
    r"""Random general user paths, whose std depends on the data point.

    :math:`\mu_t = \sin(\pi t/2)^p x_1`, :math:`\sigma_t(x_1) = 1 - t + t\,c\,(1 + \tanh^2 \bar x_1)`
    with ``p`` in [1, 3] and ``c`` in [0.01, 0.3].
    """

    def build(params: tuple[float, float]) -> GaussianPath:
        p, c = params

        def mean(t: Tensor, x1: Tensor) -> Tensor:
            return torch.sin(0.5 * math.pi * t) ** p * x1

        def std(t: Tensor, x1: Tensor) -> Tensor:
            event_mean = x1.reshape(x1.shape[0], -1).mean(dim=1).reshape(t.shape)
            return 1 - t + t * c * (1 + torch.tanh(event_mean) ** 2)

        return GaussianPath(mean, std)

    return st.tuples(st.floats(1.0, 3.0), st.floats(0.01, 0.3)).map(build)


def gaussian_paths() -> st.SearchStrategy[GaussianPath]:
    """Built-in, user affine and general user paths."""
    return st.one_of(builtin_paths(), user_affine_paths(), user_paths())


def times(*, margin: float = 1e-3, singular_ends: bool = True) -> st.SearchStrategy[float]:
    """Times in [0, 1], kept ``margin`` away from t = 1 (where OT σ_min=0 and VP are singular)."""
    return st.floats(0.0, 1.0 - margin if singular_ends else 1.0)


def assert_theorem3(
    path: GaussianPath,
    x1: Tensor,
    t: float | Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float | None = None,
) -> None:
    r"""Assert Theorem 3 for ``path``: :math:`\tfrac{d}{dt}\psi_t(x_0) = u_t(\psi_t(x_0)|x_1)`.

    The left side comes from forward-mode autograd through ``path.flow_map``, the right from
    ``path.conditional_velocity``; they are independent computations.

    Args:
        path: the path under test.
        x1: data points, shape ``(B, *event)``.
        t: time(s), float, 0-dim or ``(B,)``.
        x0: noise points (default: standard normal draws like ``x1``).
        rtol: relative tolerance on max|Δ| / max|u| (default 1e-10 in float64, 1e-4 in float32).

    Raises:
        AssertionError: with the error, the tolerance and the worst batch row.
    """
    if x0 is None:
        x0 = torch.randn_like(x1)
    if rtol is None:
        rtol = 1e-10 if x1.dtype == torch.float64 else 1e-4
    t = torch.as_tensor(t, dtype=x1.dtype, device=x1.device).expand(x1.shape[0]).clone()
    psi, dpsi = jvp(lambda s: path.flow_map(x0, s, x1), (t,), (torch.ones_like(t),))
    u = path.conditional_velocity(psi, t, x1)
    scale = float(u.abs().max().clamp_min(torch.finfo(u.dtype).tiny))
    per_row = (dpsi - u).reshape(x1.shape[0], -1).abs().max(dim=1).values
    error = float(per_row.max()) / scale
    if not error <= rtol:
        row = int(per_row.argmax())
        raise AssertionError(
            f"Theorem 3 fails for {path!r}: max|dψ/dt - u_t(ψ_t|x1)| / max|u| = {error:.3e} "
            f"> rtol {rtol:.1e}; worst row {row} at t = {float(t[row])}"
        )
