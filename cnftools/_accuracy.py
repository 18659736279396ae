r"""``accuracy=``: ask for nats, get nats (an estimate, with its measured miss rate).

The driver behind ``log_likelihood(..., accuracy=...)``: a first solve at the tolerance that
:meth:`cnftools.SolverConfig.accuracy_plan` chooses, a second :data:`~cnftools._ode.ACCURACY_STEP`
times tighter, and each row's error estimated from the two (:func:`estimated_error`); rows whose
estimate is above the target are solved again, alone, tighter each round, down to the tolerance
floor. The estimate is not a guaranteed bound: how often the true error exceeds it is measured
against closed forms by ``benchmarks/accuracy_bound.py`` and stated in ``docs/benchmarks.md``.

References:
    Hairer, Nørsett, Wanner, Solving ODEs I, §II.4 (error estimation by comparison of solutions).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from cnftools._likelihood_engine import (
    LikelihoodResult,
    Problem,
    check_result,
    one_solve,
    probe_stderr,
    time_grid,
)
from cnftools._ode import (
    ACCURACY_SAFETY,
    ACCURACY_STEP,
    NFE,
    TOLERANCE_FLOOR,
    SolverConfig,
    SolverError,
)

__all__ = ["estimated_error", "to_accuracy"]


def estimated_error(tight: Tensor, loose: Tensor, config: SolverConfig) -> Tensor:
    """Reported error of the tighter of two solves (``config`` is the tighter's):
    :data:`~cnftools._ode.ACCURACY_SAFETY` times their difference, at least the looser solve's
    absolute tolerance (``ACCURACY_STEP`` times the tighter's). The difference alone can vanish by
    chance when both solves err alike; measured, the tighter solve's error then reached 1.8 times
    its own ``atol`` (``benchmarks/accuracy_bound.py``), so its own tolerance is no floor."""
    return torch.clamp(ACCURACY_SAFETY * (tight - loose).abs(), min=ACCURACY_STEP * config.atol)


@dataclass
class _Rows:
    """The rows' current values while the driver refines some of them."""

    log_prob: Tensor
    log_prior: Tensor
    per_probe: Tensor
    z0: Tensor
    x: Tensor
    estimate: Tensor

    def update(self, todo: Tensor, other: _Rows) -> None:
        for name in ("log_prob", "log_prior", "per_probe", "z0", "x", "estimate"):
            value = getattr(self, name).index_copy(0, todo, getattr(other, name))
            setattr(self, name, value)


def _solve_rows(
    problem: Problem,
    grid: Tensor,
    config: SolverConfig,
    previous: Tensor,
    *,
    graph: bool,
    nfe: NFE,
) -> _Rows:
    """One solve at ``config``, its estimate against the ``previous`` (looser) values."""
    solve, log_prior, per_probe, log_prob = one_solve(
        problem, grid, config, graph=graph, nfe=nfe, phase="forward"
    )
    i0, i1 = problem.ends(grid)
    estimate = estimated_error(log_prob.detach(), previous, config)
    return _Rows(log_prob, log_prior, per_probe, solve.z[i0], solve.z[i1], estimate)


def to_accuracy(
    problem: Problem, config: SolverConfig, *, graph: bool, nfe: NFE
) -> LikelihoodResult:
    r"""Solve until every row's estimated error is within ``config.accuracy`` nats.

    A first solve at the tolerance :meth:`SolverConfig.accuracy_plan` chooses, then a solve
    ``ACCURACY_STEP`` times tighter; the tighter value is returned with an error estimate,
    :func:`estimated_error` (twice the two solves' difference, at least the looser solve's ``atol``).
    It is an estimate, not a guaranteed bound: counted against closed forms in
    ``benchmarks/accuracy_bound.py``, a few rows in a thousand exceed it (``docs/benchmarks.md``).
    Rows whose estimate exceeds the target are solved again, alone, each round
    ``ACCURACY_STEP`` times tighter, down to the tolerance floor.
    """
    assert config.accuracy is not None
    target, start, context = config.accuracy, problem.start, problem.context
    if start.dtype != torch.float64:
        warnings.warn(
            f"{context}: accuracy= in {start.dtype} estimates the solver's error only, not the "
            "field's own rounding in that dtype (measured on closed-form fields: rows missed the "
            "target by orders of magnitude, docs/benchmarks.md); use float64 for reference numbers",
            RuntimeWarning,
            stacklevel=4,
        )
    grid, _ = time_grid(None, start, reverse=problem.reverse)
    coarse = config.accuracy_plan(start.dtype)
    *_, previous = one_solve(problem, grid, coarse, graph=False, nfe=nfe, phase="estimate")
    floor = max(TOLERANCE_FLOOR, 4 * torch.finfo(start.dtype).eps)  # check_reach's bound
    fine = coarse.tightened(ACCURACY_STEP, floor)
    rows = _solve_rows(problem, grid, fine, previous, graph=graph, nfe=nfe)
    stopped = ""
    while True:
        todo = (rows.estimate > target).nonzero().flatten()
        if todo.numel() == 0 or fine.atol <= floor:
            break
        tighter = fine.tightened(ACCURACY_STEP, floor)
        try:
            sub = _solve_rows(
                problem.subset(todo),
                grid,
                tighter,
                rows.log_prob[todo].detach(),
                graph=graph,
                nfe=nfe,
            )
        except SolverError as error:  # the rows keep the value and estimate they have
            stopped = f"; a {tighter.rtol:g} solve failed: {error}"
            break
        fine = tighter
        rows.update(todo, sub)
    check_result("log p_1", rows.log_prob, context)
    missed = rows.estimate > target
    if bool(missed.any()):
        reason = stopped or f" at the tolerance floor {floor:g}"
        warnings.warn(
            f"{context}: accuracy={target:g} not reached for {int(missed.sum())} of "
            f"{start.shape[0]} rows (largest estimated error {float(rows.estimate.max()):.3g}; "
            f"see result.error_estimate){reason}",
            RuntimeWarning,
            stacklevel=4,
        )
    return LikelihoodResult(
        log_prob=rows.log_prob,
        x=rows.x,
        z0=rows.z0,
        log_prior=rows.log_prior,
        divergence_integral=rows.per_probe.mean(dim=1),
        nfe=nfe,
        stderr=probe_stderr(problem, rows.per_probe),
        error_estimate=rows.estimate,
        config=fine,
    )
