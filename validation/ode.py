"""theory §3: the ODE engine every likelihood runs on, against closed forms and torchdiffeq.

cnftools integrates with one Runge–Kutta loop of its own (``cnftools._runge_kutta``, tableaux in
``cnftools._tableaux``). This experiment checks each method on problems with exact solutions and
against torchdiffeq's solver of the same name (the reference the loop replaced):

- **closed form:** dy/dt = A y for a non-stiff 4 x 4 system (a rotation plus a small symmetric
  part), y(1) = expm(A) y(0) (scipy). Adaptive methods at tolerance ``tol``: the global error is a
  small multiple of the tolerance (error per unit step times the steps), 100 x tol; fehlberg2's
  embedded estimate understates its error by 2–3 orders (torchdiffeq's too), so 1000 x.
  Fixed-grid methods with 64 steps: C h^p with C the method's error constant, bounded here by
  ``10 h^p |y|``.
- **torchdiffeq:** the same problem through ``torchdiffeq.odeint`` with the same method (its steps
  landing on t = 1, ``step_t``, as ours do); the two agree within the sum of their bounds.
- **rows on their own steps:** a Gaussian's exact marginal field (§9): each row's log-likelihood
  alone equals its value in a batch of 64 to 1e-12 relative (only matrix products of other shapes
  round differently).
- **the adjoint:** gradients by checkpointed replay equal direct backpropagation to 1e-9 relative.

Negative control: dopri5 with one weight moved by 1e-3 (no longer a consistent pair of order 5)
must miss the closed-form bound.

Theory sections cited here (pages under ``docs/theory/``):

- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.linalg
import torch
import torchdiffeq

import cnftools
import cnftools._runge_kutta as runge_kutta
from cnftools._ode import FIXED_GRID_METHODS, SolverConfig, integrate
from cnftools._tableaux import TABLEAUX
from cnftools.validation._framework import Check, Context

SECTION = 3.5
SECTIONS = (3,)
TITLE = "ODE engine: every method against closed forms and torchdiffeq"

_STEPS = 64


def _system(ctx: Context) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(ctx.seed + 11)
    m = rng.standard_normal((4, 4))
    a = (m - m.T) + 0.1 * (m + m.T)
    y0 = rng.standard_normal((3, 4))
    exact = y0 @ scipy.linalg.expm(a).T
    as_tensor = lambda v: torch.tensor(v, dtype=ctx.dtype, device=ctx.device)  # noqa: E731
    return a, as_tensor(a), as_tensor(y0), as_tensor(exact)


def _settings(ctx: Context, method: str) -> tuple[SolverConfig, float, str]:
    """(config, bound on the relative global error, why)."""
    if method in FIXED_GRID_METHODS:
        order = FIXED_GRID_METHODS[method]
        bound = max(10 * (1 / _STEPS) ** order, ctx.tolerance(1e-13, 1e-5))
        return SolverConfig(method, steps=_STEPS), bound, f"10 h^p, h = 1/{_STEPS}"
    low = method in ("adaptive_heun", "fehlberg2")
    tol = ctx.tolerance(1e-6 if low else 1e-10, 1e-5)
    multiple = 1000 if method == "fehlberg2" else 100
    why = f"{multiple} x tol = {tol:g} (global error of a tolerance-controlled solve)"
    return SolverConfig(method, rtol=tol, atol=tol), multiple * tol, why


def _ours(matrix: torch.Tensor, y0: torch.Tensor, config: SolverConfig) -> torch.Tensor:
    times = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)
    return integrate(lambda t, y, rows: y @ matrix.T, y0, times, config, n_point=y0.shape[1])[-1]


def _theirs(matrix: torch.Tensor, y0: torch.Tensor, config: SolverConfig) -> torch.Tensor:
    times = torch.tensor([0.0, 1.0], dtype=y0.dtype, device=y0.device)
    # steps landing on the output time (as ours do): a step's value, not an interpolation
    options = {"step_t": times[1:]} if config.is_adaptive else {"step_size": 1.0 / _STEPS}
    return torchdiffeq.odeint(
        lambda t, y: y @ matrix.T,
        y0,
        times,
        method=config.method,
        rtol=config.rtol,
        atol=config.atol,
        options=options,
    )[-1]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def run(ctx: Context) -> Iterator[Check]:
    _, matrix, y0, exact = _system(ctx)
    subject = "dy/dt = A y, 4 x 4, 3 rows"
    for method in sorted(TABLEAUX):
        config, bound, why = _settings(ctx, method)
        ours = _ours(matrix, y0, config)
        yield Check(
            "§3", f"{method}: y(1) = expm(A) y(0)", subject, _relative(ours, exact), bound, why
        )
        theirs = _theirs(matrix, y0, config)
        yield Check(
            "§3",
            f"{method}: agrees with torchdiffeq's {method}",
            subject,
            _relative(ours, theirs),
            2 * bound,
            "the sum of the two solvers' bounds",
        )
    yield _negative_control(ctx, matrix, y0, exact)
    yield _rows_alone(ctx)
    yield _adjoint(ctx)


def _negative_control(
    ctx: Context, matrix: torch.Tensor, y0: torch.Tensor, exact: torch.Tensor
) -> Check:
    good = TABLEAUX["dopri5"]
    weights = list(good.weights)
    weights[2] += 1e-3
    broken = runge_kutta.Tableau(
        "dopri5", good.nodes, good.rows, tuple(weights), good.error_weights, good.order
    )
    config, bound, _ = _settings(ctx, "dopri5")
    saved = TABLEAUX["dopri5"]
    runge_kutta.TABLEAUX["dopri5"] = broken
    try:
        error = _relative(_ours(matrix, y0, config), exact)
    finally:
        runge_kutta.TABLEAUX["dopri5"] = saved
    return Check(
        "§3",
        "negative control: dopri5 with b_3 moved by 1e-3 must miss",
        "dy/dt = A y",
        error,
        bound,
        "an inconsistent pair is first order: far outside the bound",
        expect_fail=True,
    )


def _rows_alone(ctx: Context) -> Check:
    generator = ctx.generator(21)
    cov = torch.tensor([[0.6, 0.2], [0.2, 0.4]], dtype=ctx.dtype, device=ctx.device)
    mean = torch.zeros(2, dtype=ctx.dtype, device=ctx.device)
    marginal = cnftools.GaussianMarginal(cnftools.OTPath(0.1), mean, cov)
    x = marginal.sample(64, 1.0, generator)
    tol = ctx.tolerance(1e-8, 1e-5)
    batch = cnftools.log_likelihood(marginal, x, marginal.prior(), rtol=tol, atol=tol).log_prob
    rows = [0, 17, 63]
    alone = torch.cat(
        [
            cnftools.log_likelihood(
                marginal, x[i : i + 1], marginal.prior(), rtol=tol, atol=tol
            ).log_prob
            for i in rows
        ]
    )
    gap = float(((alone - batch[rows]) / batch[rows]).abs().max())
    return Check(
        "§3",
        "each row on its own steps: log p alone = log p in a batch of 64",
        "OT(0.1), Gaussian data, rows 0, 17, 63",
        gap,
        ctx.tolerance(1e-12, 1e-5),
        "same steps; only products of other shapes round differently",
    )


def _adjoint(ctx: Context) -> Check:
    torch.manual_seed(ctx.seed)
    field = cnftools.MLPField(2, hidden=[16, 16]).to(device=ctx.device, dtype=ctx.dtype)
    x = torch.randn(6, 2, generator=ctx.generator(22), dtype=ctx.dtype, device=ctx.device)
    tol = ctx.tolerance(1e-8, 1e-5)
    grads = []
    for adjoint in (False, True):
        field.zero_grad()
        config = SolverConfig(rtol=tol, atol=tol, adjoint=adjoint)
        loss = cnftools.log_likelihood(field, x, config=config, grad=True).log_prob
        loss.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in field.parameters()]))
    error = float((grads[1] - grads[0]).abs().max() / grads[0].abs().max())
    return Check(
        "§3",
        "adjoint (checkpointed replay) = direct backpropagation",
        "MLPField 2-16-16-2, 6 rows",
        error,
        ctx.tolerance(1e-9, 1e-4),
        "the replay differentiates the same steps: rounding only",
    )
