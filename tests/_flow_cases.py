"""Transforms for the tests of cnftools.flows, cnftools._transforms and cnftools._euler_step.

:func:`build` makes each kind of :data:`KINDS` with random, well-conditioned parameters; the
tolerances are shared by the three test files.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Transform

from cnftools.flows import AffineCoupling, ElementwiseAffine, EulerStep, Linear, LULinear

F64, F32 = torch.float64, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])

# Log-det / density tolerances, absolute on O(1–10) values. float64: roundoff (observed ≤ 1e-14).
# float32: eps32 ≈ 1.2e-7 times the condition number of the maps drawn here (≤ 10) and
# |log p| ≲ 30, with margin: 1e-4.
LOGDET_TOL = {F64: 1e-10, F32: 1e-4}
# inverse ∘ forward, relative to max |z|: float64 roundoff and the 64-eps fixed point (EulerStep);
# float32 the same scaled by eps32/eps64 with margin.
INVERSE_TOL = {F64: 1e-10, F32: 1e-5}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def matrix(dim: int, seed: int, dtype: torch.dtype, cond: float = 4.0) -> torch.Tensor:
    """A random d×d matrix with singular values spread over [1/sqrt(cond), sqrt(cond)], random sign."""
    g = gen(seed)
    q1 = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64)).Q
    q2 = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64)).Q
    s = torch.logspace(-0.5, 0.5, dim, base=cond, dtype=F64)
    return (q1 * s @ q2).to(dtype)


def mlp(dim_in: int, dim_out: int, seed: int, dtype: torch.dtype, scale: float = 0.5) -> nn.Module:
    net = nn.Sequential(nn.Linear(dim_in, 16), nn.Tanh(), nn.Linear(16, dim_out)).to(dtype)
    g = gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=dtype))
    return net


class TimeField(nn.Module):
    """A learnable field v(x, t) = scale · mlp([x, t]) (per-sample, smooth)."""

    def __init__(self, dim: int, seed: int, dtype: torch.dtype, scale: float = 0.3) -> None:
        super().__init__()
        self.net = mlp(dim + 1, dim, seed, dtype)
        self.scale = scale

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(torch.cat([x, t[:, None]], dim=-1))


def build(kind: str, dim: int, seed: int, dtype: torch.dtype) -> Transform:
    g = gen(seed + 1)
    if kind == "Linear":
        return Linear(matrix(dim, seed, dtype), torch.randn(dim, generator=g, dtype=dtype))
    if kind == "LULinear":
        f = LULinear(dim, generator=g, dtype=dtype)
        with torch.no_grad():  # move away from the rotation it starts at
            f.log_diag.add_(0.3 * torch.randn(dim, generator=g, dtype=dtype))
            f.upper.add_(0.3 * torch.randn(dim, dim, generator=g, dtype=dtype))
            f.lower.add_(0.3 * torch.randn(dim, dim, generator=g, dtype=dtype))
        return f
    if kind == "ElementwiseAffine":
        loc = torch.randn(dim, generator=g, dtype=dtype)
        return ElementwiseAffine(loc, 0.7 * torch.randn(dim, generator=g, dtype=dtype))
    if kind == "AffineCoupling":
        mask = torch.randperm(dim, generator=g) < dim // 2  # a random half kept
        return AffineCoupling(mask, mlp(dim, 2 * dim, seed, dtype))
    if kind == "EulerStep":
        # Lip(v) ≲ 0.3 · ‖W2‖‖W1‖ with 0.5-scaled 16-wide layers; dt = 0.25 keeps dt·Lip < 1.
        return EulerStep(TimeField(dim, seed, dtype), t=0.4, dt=0.25)
    raise AssertionError(kind)


KINDS = ["Linear", "LULinear", "ElementwiseAffine", "AffineCoupling", "EulerStep"]
