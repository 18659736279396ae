"""theory §1–3: change of variables, discrete flows, and the Euler-step link to CNFs.

Rows:

- §1: x = a z + b with z ~ N(μ, σ²) through ``Linear`` (a < 0 too) and ``ElementwiseAffine``, and
  x = W z + b ~ N(b, W Wᵀ), against :mod:`scipy.stats`.
- §2: each transform's ``log_abs_det_jacobian`` against ``slogdet`` of the autograd Jacobian (one
  sample at a time, :func:`torch.autograd.functional.jacobian`), and ``inverse ∘ forward``; a
  composed ``Flow`` against the §2 sum written out by hand.
- §3: a chain of N Euler steps of the linear field v(x, t) = A x: ``Flow.log_prob`` (fixed-point
  inverse) equals the discrete-flow formula (numpy matrix power), and its error against the exact
  continuous log p_1 (scipy ``expm``) falls as 1/N (log-log slope ≈ −1); and
  the same slope for a nonlinear field against ``cnftools.log_likelihood``.
- A negative control: dropping the log-det term is detected.

The reference helpers here are also used by ``tests/test_flows.py`` and
``tests/test_euler_step.py``.

Theory sections cited here (pages under ``docs/theory/``):

- §1: ``docs/theory/change-of-variables.md#change-of-variables``
- §2: ``docs/theory/change-of-variables.md#normalizing-flows``
- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import scipy.linalg
import torch
from scipy import stats
from torch import Tensor
from torch.distributions import Transform, TransformedDistribution

from cnftools.flows import (
    AffineCoupling,
    ElementwiseAffine,
    EulerStep,
    Flow,
    Linear,
    LULinear,
    euler_chain,
    standard_normal,
)
from cnftools.likelihood import log_likelihood
from cnftools.validation._framework import Check, Context

SECTION = 2
SECTIONS = (1, 2, 3)  # the theory sections its rows check
TITLE = "Change of variables, discrete flows, Euler steps → CNF"

LINEAR_FIELD = np.array([[-0.3, -1.0, 0.2], [0.8, 0.4, 0.0], [0.1, -0.2, -0.5]])
"""A fixed 3×3 matrix A (rotation plus contraction/expansion) for v(x, t) = A x."""


# --- independent references ---------------------------------------------------------------------


def autograd_log_det(transform: Transform, x: Tensor) -> Tensor:
    """log|det ∂f/∂x| per row of ``x`` (B, d): autograd Jacobian of one sample, then slogdet."""
    rows = []
    for b in range(x.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda s: transform(s[None])[0], x[b])
        rows.append(torch.linalg.slogdet(jac.detach()).logabsdet)
    return torch.stack(rows)


def linear_field_log_prob(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exact log p_1(x) for dz/dt = A z, z_0 ~ N(0, I): z_0 = e^{−A} x, log p_1 = log N(z_0) − tr A."""
    z0 = np.linalg.solve(scipy.linalg.expm(a), x.T).T
    return stats.multivariate_normal(np.zeros(a.shape[0])).logpdf(z0).reshape(-1) - np.trace(a)


def linear_euler_chain_log_prob(a: np.ndarray, n_steps: int, x: np.ndarray) -> np.ndarray:
    """log p_N(x) of N Euler steps of v = A z (the §2 formula): M = (I + A/N)^N."""
    step = np.eye(a.shape[0]) + a / n_steps
    m = np.linalg.matrix_power(step, n_steps)
    z0 = np.linalg.solve(m, x.T).T
    _, logdet = np.linalg.slogdet(step)
    return stats.multivariate_normal(np.zeros(a.shape[0])).logpdf(z0).reshape(-1) - n_steps * logdet


def loglog_slope(ns: list[int], errors: list[float]) -> float:
    """Least-squares slope of log(error) against log(N)."""
    return float(np.polyfit(np.log(ns), np.log(errors), 1)[0])


def nonlinear_field(a: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """v(x, t) = A x + (0.5 + t) tanh(x): smooth, Lipschitz ≤ ‖A‖ + 1.5, nonlinear divergence."""

    def v(x: Tensor, t: Tensor) -> Tensor:
        return x @ a.mT + (0.5 + t[:, None]) * torch.tanh(x)

    return v


def euler_chain_forward_log_prob(
    v: Callable[[Tensor, Tensor], Tensor], steps: int, z0: Tensor
) -> tuple[Tensor, Tensor]:
    """x = chain(z0) and log p_N(x) = log N(z0) − Σ log|det(I + Δt J_i)| (no inverse needed)."""
    base = standard_normal(z0.shape[-1], dtype=z0.dtype, device=z0.device)
    log_prob = base.log_prob(z0)
    z = z0
    with torch.no_grad():
        for step in euler_chain(v, steps):
            log_prob = log_prob - step.log_abs_det_jacobian(z, None)
            z = step(z)
    return z, log_prob


def _transforms(ctx: Context, dim: int) -> dict[str, Transform]:
    """One instance of every transform, on the context's device and dtype."""
    g = ctx.generator(21)
    kw = {"dtype": ctx.dtype, "device": ctx.device}
    q = torch.linalg.qr(torch.randn(dim, dim, generator=g, **kw)).Q
    weight = q * torch.linspace(0.5, 2.0, dim, **kw)  # singular values in [0.5, 2]
    net = torch.nn.Sequential(
        torch.nn.Linear(dim, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2 * dim)
    ).to(**kw)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.4 * torch.randn(p.shape, generator=g, **kw))
    mask = (torch.arange(dim, device=ctx.device) % 2).to(ctx.dtype)
    field_matrix = 0.5 * torch.randn(dim, dim, generator=g, **kw)
    return {
        "Linear": Linear(weight, torch.randn(dim, generator=g, **kw)),
        "LULinear": LULinear(dim, generator=g, **kw),
        "ElementwiseAffine": ElementwiseAffine(
            torch.randn(dim, generator=g, **kw), 0.5 * torch.randn(dim, generator=g, **kw)
        ),
        "AffineCoupling": AffineCoupling(mask, net),
        "EulerStep": EulerStep(nonlinear_field(field_matrix), t=0.3, dt=0.2),
    }


# --- the experiment -----------------------------------------------------------------------------


def run(ctx: Context) -> Iterator[Check]:
    g = ctx.generator(2)
    # float64: roundoff on O(1–10) log-densities (observed ~1e-15); float32: eps32 ≈ 1.2e-7 times
    # |log p| ≲ 30 and the condition numbers (≤ 4) of the maps: 1e-4.
    exact_tol = ctx.tolerance(1e-11, 1e-4)
    yield from _affine_gaussian_rows(ctx, g, exact_tol)
    dim = 4
    transforms = _transforms(ctx, dim)
    yield from _linear_gaussian_row(ctx, g, transforms["Linear"], dim, exact_tol)
    yield from _log_det_rows(ctx, g, transforms, dim, exact_tol)
    yield from _composed_flow_row(ctx, transforms, dim, exact_tol)
    yield from _euler_rows(ctx)


def _affine_gaussian_rows(ctx: Context, g: torch.Generator, exact_tol: float) -> Iterator[Check]:
    """§1: x = a z + b, z ~ N(mu, sigma^2), against scipy.stats.norm; the log-det dropped."""
    kw = {"dtype": ctx.dtype, "device": ctx.device}
    mu, sigma, a, b = 0.7, 1.3, -2.5, 0.4
    base = torch.distributions.Independent(
        torch.distributions.Normal(torch.full((1,), mu, **kw), torch.full((1,), sigma, **kw)), 1
    )
    x = 4 * torch.randn(64, 1, generator=g, **kw)
    reference = stats.norm(a * mu + b, abs(a) * sigma).logpdf(x.cpu().double().numpy()[:, 0])
    for name, transform, a_used in (
        (
            "Linear([[a]], [b]), a = −2.5",
            Linear(torch.full((1, 1), a, **kw), torch.full((1,), b, **kw)),
            a,
        ),
        (
            "ElementwiseAffine(b, log|a|)",
            ElementwiseAffine(torch.full((1,), b, **kw), torch.full((1,), math.log(-a), **kw)),
            -a,
        ),
    ):
        ref = stats.norm(a_used * mu + b, abs(a_used) * sigma).logpdf(
            x.cpu().double().numpy()[:, 0]
        )
        with torch.no_grad():
            got = TransformedDistribution(base, [transform]).log_prob(x).cpu().double().numpy()
        yield Check(
            "§1",
            "x = a z + b ~ N(aμ + b, (aσ)²)",
            name,
            float(np.abs(got - ref).max()),
            exact_tol,
            "roundoff; scipy.stats.norm reference",
        )

    # Negative control: the same density without the log-det term must be detected.
    with torch.no_grad():
        no_logdet = base.log_prob((x - b) / a).cpu().double().numpy()
    yield Check(
        "§1",
        "negative control: log-det term dropped",
        "Linear, a = −2.5",
        float(np.abs(no_logdet - reference).max()),
        exact_tol,
        "must differ by log|a| ≈ 0.92",
        expect_fail=True,
    )


def _linear_gaussian_row(
    ctx: Context, g: torch.Generator, linear: Transform, dim: int, exact_tol: float
) -> Iterator[Check]:
    """§1: x = W z + b ~ N(b, W Wᵀ), against scipy.stats.multivariate_normal."""
    kw = {"dtype": ctx.dtype, "device": ctx.device}
    xs = 2 * torch.randn(64, dim, generator=g, **kw)
    with torch.no_grad():
        got = Flow(standard_normal(dim, **kw), [linear]).log_prob(xs).cpu().double().numpy()
        w, bias = linear.weight.cpu().double().numpy(), linear.bias.cpu().double().numpy()
    ref = stats.multivariate_normal(bias, w @ w.T).logpdf(xs.cpu().double().numpy())
    yield Check(
        "§1",
        "x = W z + b ~ N(b, W Wᵀ)",
        f"Linear, d = {dim}",
        float(np.abs(got - ref).max()),
        exact_tol,
        "roundoff; scipy multivariate_normal",
    )


def _log_det_rows(
    ctx: Context,
    g: torch.Generator,
    transforms: dict[str, Transform],
    dim: int,
    exact_tol: float,
) -> Iterator[Check]:
    """§2: every transform's log-det against the autograd Jacobian; inverse ∘ forward."""
    kw = {"dtype": ctx.dtype, "device": ctx.device}
    z = torch.randn(16 if ctx.full else 6, dim, generator=g, **kw)
    for name, transform in transforms.items():
        with torch.no_grad():
            logdet = transform.log_abs_det_jacobian(z, transform(z))
        reference_logdet = autograd_log_det(transform, z)
        yield Check(
            "§2",
            "log|det J| = slogdet(autograd Jacobian)",
            f"{name}, d = {dim}",
            float((logdet - reference_logdet).abs().max()),
            exact_tol,
            "roundoff; per-sample autograd.functional.jacobian",
        )
        with torch.no_grad():
            back = transform.inv(transform(z))
        yield Check(
            "§2",
            "inverse ∘ forward = id (max |Δ| / max |z|)",
            name,
            float((back - z).abs().max() / z.abs().max()),
            ctx.tolerance(1e-11, 1e-5),
            "roundoff (EulerStep: fixed point to 64 eps)",
        )


def _composed_flow_row(
    ctx: Context, transforms: dict[str, Transform], dim: int, exact_tol: float
) -> Iterator[Check]:
    """§2: a composed flow's log-density against the sum written out by hand."""
    kw = {"dtype": ctx.dtype, "device": ctx.device}
    flow = Flow(standard_normal(dim, **kw), list(transforms.values()))
    with torch.no_grad():
        x_flow = flow.sample(8)
        got = flow.log_prob(x_flow)
        y = x_flow
        manual = torch.zeros(8, **kw)
        for transform in reversed(list(transforms.values())):
            zz = transform.inv(y)
            manual = manual - transform.log_abs_det_jacobian(zz, y)
            y = zz
        manual = manual + torch.distributions.Normal(0.0, 1.0).log_prob(y).sum(-1)
    yield Check(
        "§2",
        "log p(x) = log π(z_0) − Σ log|det ∂f_i|",
        "Flow of all 5 transforms",
        float((got - manual).abs().max()),
        exact_tol,
        "roundoff; sum written out by hand",
    )


def _euler_rows(ctx: Context) -> Iterator[Check]:
    kw = {"dtype": ctx.dtype, "device": ctx.device}
    a = LINEAR_FIELD
    a_t = torch.as_tensor(a, **kw)
    g = ctx.generator(3)
    x = torch.randn(16, 3, generator=g, **kw)

    # The Euler chain through TransformedDistribution (fixed-point inverse) = discrete formula.
    n = 16
    with torch.no_grad():
        got = Flow(standard_normal(3, **kw), euler_chain(lambda s, t: s @ a_t.mT, n)).log_prob(x)
    ref = linear_euler_chain_log_prob(a, n, x.cpu().double().numpy())
    yield Check(
        "§3",
        "Euler chain log_prob = discrete-flow formula",
        f"v = A x, N = {n}, inverse by fixed point",
        float(np.abs(got.cpu().double().numpy() - ref).max()),
        ctx.tolerance(1e-10, 1e-4),
        "roundoff + fixed point at 64 eps, accumulated over N steps",
    )

    # Convergence to the continuous flow, first order: error ∝ 1/N.
    ns = [16, 32, 64, 128, 256] if ctx.full else [16, 32, 64, 128]
    z0 = torch.randn(16, 3, generator=g, **kw)
    errors = []
    for n in ns:
        x_n, log_p = euler_chain_forward_log_prob(lambda s, t: s @ a_t.mT, n, z0)
        exact = linear_field_log_prob(a, x_n.cpu().double().numpy())
        errors.append(float(np.abs(log_p.cpu().double().numpy() - exact).max()))
    slope = loglog_slope(ns, errors)
    detail = ", ".join(f"N={n}: {e:.2e}" for n, e in zip(ns, errors, strict=True))
    yield Check(
        "§3",
        "Euler chain → exp(A) flow: |slope + 1| of log err vs log N",
        f"v = A x (scipy expm); {detail}",
        abs(slope + 1),
        0.05,
        "first-order method; O(1/N²) terms bend the slope by ≲ 0.03 at N ≥ 16",
    )

    v = nonlinear_field(a_t)
    errors = []
    for n in ns:
        x_n, log_p = euler_chain_forward_log_prob(v, n, z0)
        tol = ctx.tolerance(1e-10, 1e-6)
        exact = log_likelihood(v, x_n, method="dopri5", rtol=tol, atol=tol).log_prob
        errors.append(float((log_p - exact).abs().max()))
    slope = loglog_slope(ns, errors)
    detail = ", ".join(f"N={n}: {e:.2e}" for n, e in zip(ns, errors, strict=True))
    yield Check(
        "§3",
        "Euler chain → cnftools.log_likelihood: |slope + 1|",
        f"v = A x + (0.5 + t) tanh(x); {detail}",
        abs(slope + 1),
        0.05,
        "first-order method; dopri5 at 1e-10 is exact at this scale",
    )
