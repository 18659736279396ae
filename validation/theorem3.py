"""theory §7–8: the flow map, Theorem 3, and the boundary facts of every path.

For each path of :data:`cnftools.cases.PATH_CASES`, on a grid of times and random points:

- Theorem 3: :math:`\\tfrac{d}{dt}\\psi_t(x_0)` by forward-mode autograd equals
  ``conditional_velocity(psi_t(x0), t, x1)``; relative error max|Δ| / max|u|.
- ``inverse_flow_map(flow_map(x0))`` returns ``x0``.
- ``log_prob`` equals :class:`torch.distributions.Normal` summed over the event.
- the end points (mean and std at t = 0 and t = 1) equal theory §8's values, computed independently.

Theory sections cited here (pages under ``docs/theory/``):

- §7: ``docs/theory/paths.md#gaussian-conditional-paths``
- §8: ``docs/theory/paths.md#three-paths``
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from cnftools._checks import quiet_jvp
from cnftools.cases import PATH_CASES
from cnftools.validation._framework import Check, Context

SECTION = 7
SECTIONS = (7, 8)  # the theory sections its rows check
TITLE = "Gaussian paths: flow map, Theorem 3, boundary conditions"


def _time_grid(ctx: Context, singular_at_one: bool, n: int) -> torch.Tensor:
    high = 0.99 if singular_at_one else 1.0
    return torch.linspace(0.0, high, n, dtype=ctx.dtype, device=ctx.device)


def run(ctx: Context) -> Iterator[Check]:
    n_times, batch = (41, 64) if ctx.full else (11, 16)
    event = (3,) if not ctx.full else (2, 3)
    # float64: roundoff-level (1e-10 relative, the bound; observed ~1e-15).
    # float32: eps32 ≈ 1.2e-7 amplified by the 1/s_t factor near the singular end (s ≥ 1e-2 on the
    # grid): 1e-4 relative.
    theorem3_tol = ctx.tolerance(1e-10, 1e-4)
    exact_tol = ctx.tolerance(1e-12, 1e-5)
    generator = ctx.generator(7)
    for name, case in PATH_CASES.items():
        path = case.build()
        times = _time_grid(ctx, case.singular_at_one, n_times)
        t = times.repeat_interleave(batch)
        shape = (t.shape[0], *event)
        x0 = torch.randn(shape, generator=generator, dtype=ctx.dtype, device=ctx.device)
        x1 = 2 * torch.randn(shape, generator=generator, dtype=ctx.dtype, device=ctx.device)

        psi, dpsi_dt = quiet_jvp(lambda s: path.flow_map(x0, s, x1), (t,), (torch.ones_like(t),))  # noqa: B023
        u = path.conditional_velocity(psi, t, x1)
        error = float((dpsi_dt - u).abs().max() / u.abs().max())
        yield Check(
            "§7",
            "Theorem 3: dψ_t/dt = u_t(ψ_t|x1)",
            f"{name}, {n_times} t × {batch} points",
            error,
            theorem3_tol,
            "roundoff; jvp of ψ_t vs closed-form u_t",
        )

        inverse = path.inverse_flow_map(psi, t, x1)
        error = float((inverse - x0).abs().max() / x0.abs().max())
        yield Check(
            "§7", "ψ_t⁻¹(ψ_t(x0)) = x0", name, error, exact_tol, "roundoff of one affine map"
        )

        std = path.std(t, x1)
        reference = torch.distributions.Normal(path.mean(t, x1), std.expand_as(x1))
        expected = reference.log_prob(psi).reshape(shape[0], -1).sum(dim=1)
        error = float((path.log_prob(psi, t, x1) - expected).abs().max() / expected.abs().max())
        yield Check(
            "§7",
            "log p_t(x|x1) = torch Normal log_prob",
            name,
            error,
            exact_tol,
            "roundoff; same density, two implementations",
        )

        mean0, std0, mean1, std1 = case.boundary(x1)
        errors = [
            (path.mean(0.0, x1) - mean0).abs().max(),
            (path.std(0.0, x1) - std0).abs().max() / std0.abs().max(),
            (path.mean(1.0, x1) - mean1).abs().max(),
            (path.std(1.0, x1) - std1).abs().max(),
        ]
        error = float(max(float(e) for e in errors) / max(1.0, float(x1.abs().max())))
        yield Check(
            "§8",
            "μ_0, σ_0, μ_1, σ_1 as theory §8 states",
            name,
            error,
            exact_tol,
            "closed-form constants, computed independently",
        )
