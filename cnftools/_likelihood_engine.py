r"""The likelihood engine: the augmented ODE of a CNF, solved once (theory §3).

For the state :math:`y = [z, A_1, \dots, A_K]`, :math:`dz/dt = v(z, t)` and
:math:`dA_k/dt = \operatorname{div}_k v(z, t)` (one column for an exact divergence, one per
Hutchinson probe), integrated by :func:`cnftools._ode.integrate` between :math:`t = 1` (data) and
:math:`t = 0` (noise) in either direction; then
:math:`\log p_1(x) = \log p_0(z_0) - \frac1K\sum_k A_k`. Internal: the public functions of
:mod:`cnftools.likelihood` check their arguments and call :func:`solve_likelihood` (or the
accuracy driver :mod:`cnftools._accuracy`, which calls :func:`one_solve`).

Gradients only when asked (:func:`wants_graph`); every row on its own steps, and rows leave the
evaluated batch when they finish if the field treats rows independently
(:func:`rows_stand_alone`).

References:
    Chen et al., Neural Ordinary Differential Equations (2018), arXiv:1806.07366;
    Grathwohl et al., FFJORD (2019), arXiv:1810.01367.

Theory sections cited here (pages under ``docs/theory/``):

- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution

from cnftools._divergence_evaluator import DivergenceEvaluator
from cnftools._ode import NFE, SolverConfig, SolverError, integrate
from cnftools._progress import reporter
from cnftools.estimators import standard_error
from cnftools.fields import VelocityField, call_checked, select_extras, shares_time

__all__ = [
    "LikelihoodResult",
    "Problem",
    "SampleResult",
    "Solve",
    "augmented_solve",
    "check_result",
    "one_solve",
    "prior_log_prob",
    "probe_stderr",
    "solve_likelihood",
    "time_grid",
    "wants_graph",
]

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class LikelihoodResult:
    r"""Everything one augmented solve gives.

    Attributes:
        log_prob: :math:`\log p_1(x)`, shape ``(B,)`` (the mean over probes for Hutchinson).
        x: the data-side points :math:`x = z_1`, ``(B, *event)`` (the input of
            :func:`log_likelihood`, the samples of :func:`sample_with_log_prob`).
        z0: the noise-side points :math:`z_0`, ``(B, *event)``.
        log_prior: :math:`\log p_0(z_0)` under the prior, ``(B,)``.
        divergence_integral: :math:`\int_0^1 \operatorname{div} v(z_t, t)\,dt`, ``(B,)``.
        nfe: function evaluations (forward; backward, filled in when an adjoint ``backward()``
            runs; estimate).
        stderr: Hutchinson with :math:`K > 1` probes: the per-sample standard error of
            ``log_prob`` over probes, ``(B,)``; otherwise ``None``.
        times: the requested intermediate times, ``(T,)``, in the order given (or ``None``).
        log_prob_t: :math:`\log p_t(z_t)` at those times along each trajectory, ``(T, B)``.
        trajectory: :math:`z_t` at those times, ``(T, B, *event)``.
        error_estimate: a-posteriori estimate of ``|log_prob - exact|`` per sample, ``(B,)``, from
            a second solve with :meth:`SolverConfig.refined` (or ``None``).
        config: the solver configuration used.
    """

    log_prob: Tensor
    x: Tensor
    z0: Tensor
    log_prior: Tensor
    divergence_integral: Tensor
    nfe: NFE
    stderr: Tensor | None = None
    times: Tensor | None = None
    log_prob_t: Tensor | None = None
    trajectory: Tensor | None = None
    error_estimate: Tensor | None = None
    config: SolverConfig | None = None


@dataclass(frozen=True)
class SampleResult:
    """Samples with their solve's bookkeeping.

    Attributes:
        x: the samples :math:`z_1`, ``(B, *event)``.
        nfe: function evaluations.
        times: the requested times (or ``None``).
        trajectory: :math:`z_t` at those times, ``(T, B, *event)`` (or ``None``).
        config: the solver configuration used.
    """

    x: Tensor
    nfe: NFE
    times: Tensor | None = None
    trajectory: Tensor | None = None
    config: SolverConfig | None = None


def prior_log_prob(prior: Distribution | None, z: Tensor) -> Tensor:
    batch = z.shape[0]
    if prior is None:
        d = z[0].numel()
        return -0.5 * z.reshape(batch, -1).pow(2).sum(dim=1) - 0.5 * d * _LOG_2PI
    out = prior.log_prob(z)
    if out.shape != (batch,):
        raise ValueError(f"prior.log_prob returned shape {tuple(out.shape)}, expected ({batch},)")
    if out.dtype != z.dtype:
        raise TypeError(
            f"prior.log_prob returned {out.dtype} for {z.dtype} points: build the prior in the "
            f"data's dtype"
        )
    return out


def _needs_graph(problem: Problem) -> bool:
    """Whether the solve must be differentiable: grad mode on and something requires grad.

    For a field that is not an ``nn.Module`` (its parameters unknown), one extra field call, not
    counted in the NFE, tells whether its output requires grad.
    """
    start = problem.start
    if not torch.is_grad_enabled():
        return False
    if start.requires_grad or any(p.requires_grad for p in problem.params):
        return True
    if problem.known:
        return False
    # A plain callable may close over parameters: one probe evaluation tells.
    with torch.enable_grad():
        t = start.new_full((start.shape[0],), problem.t_start)
        out = call_checked(problem.v, start.detach(), t, problem.extras)
    return isinstance(out, Tensor) and out.requires_grad


def time_grid(
    times: list[float] | None, like: Tensor, *, reverse: bool
) -> tuple[Tensor, list[int]]:
    """Output times for the solver (strictly monotone, 1 -> 0 if ``reverse``) and the index of
    each requested time in it."""
    points = {0.0, 1.0} | set(times or [])
    ordered = sorted(points, reverse=reverse)
    index = {s: i for i, s in enumerate(ordered)}
    grid = torch.tensor(ordered, dtype=like.dtype, device=like.device)
    return grid, [index[s] for s in (times or [])]


# ---------------------------------------------------------------------------------------------
# The augmented dynamics


def _augmented(
    v: VelocityField, start: Tensor, strategy: DivergenceEvaluator | None, extras: dict
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    r"""``f(t, y, rows)`` for the state ``y = [vec(z), A]`` of shape ``(b, d + K)``:
    :math:`dz/dt = v(z, t)`, :math:`dA_k/dt = \operatorname{div}_k v(z, t)` (``K`` columns: one for
    the exact divergence, one per Hutchinson probe, none for plain sampling, ``strategy=None``).

    The velocity and the columns come from one forward pass of the field through the
    :class:`~cnftools._divergence_evaluator.DivergenceEvaluator`. The graph is kept (``create_graph``) exactly
    when the solve runs with gradients enabled: direct backpropagation, or the adjoint's backward
    solve.

    ``rows`` (the loop's rows still moving, ``None``: all) selects the rows' Hutchinson probes and
    per-row extras; the selection is cached until the loop's rows change.
    """
    batch, event = start.shape[0], tuple(start.shape[1:])
    d = math.prod(event)
    cache: list = [None, strategy, extras]  # rows, strategy and extras for those rows

    def f(t: Tensor, y: Tensor, rows: Tensor | None) -> Tensor:
        b = y.shape[0]
        if rows is None:
            rows_strategy, rows_extras = strategy, extras
        else:
            if cache[0] is not rows:
                subset = None if strategy is None else strategy.subset(rows)
                cache[:] = [rows, subset, select_extras(extras, batch, rows)]
            rows_strategy, rows_extras = cache[1], cache[2]
        z = y[:, :d].reshape(b, *event) if len(event) != 1 else y[:, :d]
        if rows_strategy is None:
            return call_checked(v, z, t, rows_extras).reshape(b, d)
        out, columns = rows_strategy(
            v, z, t, create_graph=torch.is_grad_enabled(), extras=rows_extras
        )
        return torch.cat([out.reshape(b, d), columns], dim=1)

    return f


# ---------------------------------------------------------------------------------------------
# The solves


@dataclass(frozen=True)
class Problem:
    """What one augmented solve integrates, checked by the caller.

    Attributes:
        v: the field.
        start: the starting points ``(B, *event)``: data for ``reverse`` (1 -> 0), noise otherwise.
        prior: the density at t = 0 (``None``: standard normal).
        evaluator: the divergence evaluator (``None``: plain sampling, no divergence).
        params: the field's parameters (for the adjoint), and whether they are ``known`` (an
            ``nn.Module``); a plain closure's are not.
        reverse: integrate from t = 1 to 0 (likelihood) instead of 0 to 1 (sampling).
        context: the public function's name, for messages.
        extras: keyword arguments of a conditional field (rows follow the batch).
        compact: rows that finish may leave the evaluated batch (:func:`rows_stand_alone`, asked
            once per call; a subset keeps the verdict).
    """

    v: VelocityField
    start: Tensor
    prior: Distribution | None
    evaluator: DivergenceEvaluator | None
    params: tuple[Tensor, ...]
    known: bool
    reverse: bool
    context: str
    extras: dict
    compact: bool

    @property
    def t_start(self) -> float:
        return 1.0 if self.reverse else 0.0

    def ends(self, grid: Tensor) -> tuple[int, int]:
        """Grid indices of t = 0 and t = 1."""
        return (len(grid) - 1, 0) if self.reverse else (0, len(grid) - 1)

    def subset(self, rows: Tensor) -> Problem:
        """The same problem for some rows (their probes and extras)."""
        batch = self.start.shape[0]
        return dataclasses.replace(
            self,
            start=self.start[rows],
            evaluator=None if self.evaluator is None else self.evaluator.subset(rows),
            extras=select_extras(self.extras, batch, rows),
        )


@dataclass
class Solve:
    """Outputs of one augmented solve: states at the grid, integrals A(t) = ∫_0^t div."""

    z: Tensor  # (T, B, *event), in grid order
    integral: Tensor  # (T, B, K): ∫_0^t div per probe column
    nfe: NFE


def _outside_inference_mode(problem: Problem, grid: Tensor) -> tuple[Problem, Tensor]:
    """Copies of the problem's tensors made outside inference mode (the autograd divergence
    needs normal tensors)."""
    evaluator = problem.evaluator
    if evaluator is not None and evaluator.probes is not None:
        evaluator = evaluator.subset(slice(None))
        evaluator.probes = evaluator.probes.clone()  # type: ignore[union-attr]
    extras = {k: e.clone() if isinstance(e, Tensor) else e for k, e in problem.extras.items()}
    problem = dataclasses.replace(
        problem, start=problem.start.clone(), evaluator=evaluator, extras=extras
    )
    return problem, grid.clone()


def augmented_solve(
    problem: Problem, grid: Tensor, config: SolverConfig, *, graph: bool, nfe: NFE, phase: str
) -> Solve:
    """One solve of the augmented state on ``grid`` (its first time is the start's)."""
    evaluator = problem.evaluator
    if (
        torch.is_inference_mode_enabled()
        and evaluator is not None
        and evaluator.kind != "closed_form"
    ):
        with torch.inference_mode(False):
            copied, grid = _outside_inference_mode(problem, grid)
            return augmented_solve(copied, grid, config, graph=False, nfe=nfe, phase=phase)
    start = problem.start
    batch, event = start.shape[0], tuple(start.shape[1:])
    d = math.prod(event)
    columns = 0 if evaluator is None else evaluator.columns
    y0 = torch.cat([start.reshape(batch, d), start.new_zeros(batch, columns)], dim=1)
    f = _augmented(problem.v, start, evaluator, problem.extras)
    t0 = float(grid[0])
    options = {
        "n_point": d,
        "nfe": nfe,
        "phase": phase,
        "context": problem.context,
        "compact": problem.compact,
        "shared_steps": shares_time(problem.v),  # one time per batch: the rows share steps
        "progress": reporter(problem.context, t0, float(grid[-1])),
    }
    if graph:
        solution = integrate(f, y0, grid, config, params=problem.params, **options)
    else:
        with torch.no_grad():
            solution = integrate(f, y0, grid, config.replace(adjoint=False), **options)
    z = solution[:, :, :d].reshape(len(grid), batch, *event)
    integral_columns = solution[:, :, d:]
    # columns hold ∫_{grid[0]}^{t} div; shift so that they hold ∫_0^t div.
    zero_index = 0 if t0 == 0.0 else len(grid) - 1
    integral = integral_columns - integral_columns[zero_index]
    return Solve(z, integral, nfe)


_MIXING_WARNED: weakref.WeakSet = weakref.WeakSet()


def rows_stand_alone(
    v: VelocityField, start: Tensor, t0: float, extras: dict, context: str
) -> bool:
    """Whether the field gives rows the same velocity apart as in their batch (1e-6 relative, far
    above the ~1e-16 of matrix products of other shapes): then rows that have finished may leave
    the evaluated batch. A field that cannot be called on part of its batch (e.g. one that closes
    over per-row tensors instead of taking them as ``extras``) keeps every row in every call; one
    whose rows change with their neighbours (batch statistics, attention across the batch) too,
    with a warning: its results depend on the batch."""
    batch = start.shape[0]
    if batch == 1:
        return True
    with torch.no_grad():
        t = start.new_full((batch,), t0)
        full = call_checked(v, start, t, extras)
        part = slice(0, min(2, batch - 1))  # two rows: batch statistics of one row may fail
        try:
            alone = call_checked(v, start[part], t[part], select_extras(extras, batch, part))
        except Exception:  # any failure on part of the batch: evaluate the whole batch only
            return False
        scale = full[part].abs().max().clamp(min=1.0)
        gap = float((alone - full[part]).abs().max() / scale)
    if gap <= 1e-6:
        return True
    if not math.isfinite(gap):  # a non-finite field: the solve names its rows; no verdict here
        return False
    with contextlib.suppress(TypeError):
        if v in _MIXING_WARNED:
            return False
        _MIXING_WARNED.add(v)
    batched = sorted(
        k for k, e in extras.items() if isinstance(e, Tensor) and e.dim() >= 1 and len(e) == batch
    )
    shared = (
        f"; or extras {batched} (first dimension {batch}, the batch's) are not per row: a tensor "
        "extra with one entry per row is split with the rows, so a table shared by every row "
        "must not have B rows (pass it in a closure or as a module attribute)"
        if batched
        else ""
    )
    warnings.warn(
        f"{context}: the field gives a row another velocity in its batch than alone (relative "
        f"difference {gap:.2g}): its rows are not independent (batch statistics such as BatchNorm "
        "in training mode, or attention across the batch), so each row's result depends on the "
        f"rest of its batch; call model.eval() or make the field act row by row{shared}",
        RuntimeWarning,
        stacklevel=5,
    )
    return False


def check_result(name: str, value: Tensor, context: str) -> None:
    bad = torch.isnan(value) | (value == math.inf)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise SolverError(
            f"{context}: {name} is NaN or +inf for batch rows {rows[:10].tolist()}; "
            f"check the prior's log_prob at the solved z0 and the field there"
        )


def wants_graph(problem: Problem, config: SolverConfig, grad: bool | None) -> bool:
    """Whether the solve keeps a graph: only when gradients were asked for.

    Asked means ``grad=True``, ``config.adjoint`` or ``start.requires_grad``; ``grad=False``
    never. Then the graph is built if grad mode is on and something requires grad. The adjoint
    needs the field's parameters: a field that is not an ``nn.Module`` is refused then.
    """
    if grad is False or not torch.is_grad_enabled():
        return False
    if grad is None and not (config.adjoint or problem.start.requires_grad):
        return False
    graph = _needs_graph(problem)
    if graph and config.adjoint and not problem.known:
        raise ValueError(
            "adjoint=True needs the field's parameters, and v is not an nn.Module: make the "
            "field an nn.Module that registers the tensors it depends on (nn.Parameter or "
            "submodules), or use adjoint=False (direct backpropagation)"
        )
    return graph


def one_solve(
    problem: Problem, grid: Tensor, config: SolverConfig, *, graph: bool, nfe: NFE, phase: str
) -> tuple[Solve, Tensor, Tensor, Tensor]:
    """One augmented solve: ``(solve, log_prior, per_probe ∫div (B, K), log_prob)``."""
    i0, i1 = problem.ends(grid)
    solve = augmented_solve(problem, grid, config, graph=graph, nfe=nfe, phase=phase)
    with torch.enable_grad() if graph else torch.no_grad():
        log_prior = prior_log_prob(problem.prior, solve.z[i0])
        per_probe = solve.integral[i1]
        log_prob = log_prior - per_probe.mean(dim=1)
    return solve, log_prior, per_probe, log_prob


def solve_likelihood(
    problem: Problem,
    config: SolverConfig,
    *,
    graph: bool,
    nfe: NFE,
    times: list[float] | None,
) -> LikelihoodResult:
    """The likelihood at a tolerance (not ``accuracy=``): one solve, with ``log p_t`` at
    ``times`` and, with ``config.error_estimate``, the difference to a refined solve."""
    start = problem.start
    grid, index = time_grid(times, start, reverse=problem.reverse)
    solve, log_prior, per_probe, log_prob = one_solve(
        problem, grid, config, graph=graph, nfe=nfe, phase="forward"
    )
    i0, i1 = problem.ends(grid)
    check_result("log p_1", log_prob, problem.context)
    times_t = log_prob_t = trajectory = None
    if times is not None:
        times_t = torch.tensor(times, dtype=start.dtype, device=start.device)
        trajectory = solve.z[index]
        log_prob_t = log_prior.unsqueeze(0) - solve.integral[index].mean(dim=2)
    estimate = None
    if config.error_estimate:
        detached = dataclasses.replace(problem, start=start.detach(), params=())
        with torch.no_grad():
            *_, fine_log_prob = one_solve(
                detached, grid, config.refined(), graph=False, nfe=nfe, phase="estimate"
            )
        estimate = (log_prob.detach() - fine_log_prob).abs()
        if not config.is_adaptive:  # Richardson: error(N) ≈ |l_N - l_2N| 2^p / (2^p - 1)
            estimate = estimate * (2**config.order / (2**config.order - 1))
    return LikelihoodResult(
        log_prob=log_prob,
        x=solve.z[i1],
        z0=solve.z[i0],
        log_prior=log_prior,
        divergence_integral=per_probe.mean(dim=1),
        nfe=nfe,
        stderr=probe_stderr(problem, per_probe),
        times=times_t,
        log_prob_t=log_prob_t,
        trajectory=trajectory,
        error_estimate=estimate,
        config=config,
    )


def probe_stderr(problem: Problem, per_probe: Tensor) -> Tensor | None:
    """Hutchinson's standard error of ``log_prob`` over the probe columns (else ``None``)."""
    evaluator = problem.evaluator
    if evaluator is None or evaluator.kind != "hutchinson":
        return None
    return standard_error(per_probe)
