r"""The one Runge–Kutta loop of cnftools: every row of a batch on its own steps.

Every solve of the library runs here: adaptive and fixed-grid, forward and (through
:mod:`cnftools._adjoint`) the adjoint's replay. The state is ``y`` of shape ``(B, n)``, one row
per sample, and the rows are independent systems. Each step is

.. math::

    k_i = f\Big(t + c_i h,\; y + h \sum_{j<i} a_{ij} k_j\Big), \qquad
    y_{\text{new}} = y + h \sum_i b_i k_i, \qquad
    e = h \sum_i (b_i - \hat b_i) k_i,

with ``t`` and ``h`` per row. An adaptive row accepts its step when its own error ratio
:math:`r = \|e / (\mathrm{atol} + \mathrm{rtol}\max(|y|, |y_{\text{new}}|))\|_{\text{row}} \le 1`
(the norm is the row's RMS, taken over the point and the log-density columns apart, the larger
counting) and then chooses its next step with the :class:`StepController`. So a row's result does
not depend on which other rows share its batch: rows finish on their own, and finished rows leave
the evaluated batch (the field is called on the rows still moving). Steps land exactly on every
output time; nothing is interpolated and no stage is evaluated outside the interval.

The loop synchronises with the host once per step (one small tensor read: how many rows landed,
failed or ran out of steps) and never per evaluation.

References:
    Hairer, Nørsett, Wanner: Solving Ordinary Differential Equations I (2nd ed.), §II.4
    (step-size control, starting step) and §II.5 (Dormand–Prince pairs); Gustafsson (1991),
    BIT 31, 336–349 (proportional–integral control); Lienen, Günnemann: torchode (2022),
    arXiv:2210.12375 (per-sample step control in a batch).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cnftools._rows import Attempt, RowState, assemble
from cnftools._tableaux import TABLEAUX, Tableau

__all__ = [
    "CONTROLLERS",
    "Dynamics",
    "StepController",
    "StepFailure",
    "StepRecord",
    "Stepping",
    "fixed_grid",
    "rk_step",
    "solve",
]

Dynamics = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
"""``f(t, y, rows) -> dy/dt``: ``t`` of shape ``(b,)``, ``y`` of shape ``(b, n)``, ``rows`` the
indices of these rows in the original batch (``None``: all rows, in order)."""


@dataclass(frozen=True)
class StepController:
    r"""Per-row step-size control; all its constants in one place.

    After an attempt with error ratio :math:`r` (the row's last accepted ratio :math:`r_{-1}`):

    .. math::

        h_{\text{next}} = h \cdot \min\Big(g,\; \max\big(s,\;
        \text{safety}\; r^{-(1/p - 0.75\beta)}\, r_{-1}^{\beta}\big)\Big)

    with :math:`g` = ``max_growth`` (``first_growth`` after the starting heuristic's step),
    :math:`s` = ``max_shrink`` after a rejection and 1 after an acceptance, and :math:`\beta = 0`
    until the row has a previous accepted step (Hairer and Wanner's stabilised
    proportional–integral control; :math:`\beta = 0` is the classical controller).

    Attributes:
        safety: factor on the optimal step.
        max_growth: largest growth of a step.
        max_shrink: largest shrink after a rejection.
        first_growth: largest growth after the starting heuristic's step. The heuristic aims at 1%
            of the tolerance and, on the smooth fields of likelihood solves, lands far below it
            (measured error ratios 1e-10 ... 1e-6), so the usual cap costs a second small step.
        beta: the integral gain :math:`\beta` (0.04 in Hairer's DOPRI5 code, 0 in DOP853).
        ratio_floor: the remembered ratio is at least this (a zero error must not freeze growth).

    Example:
        >>> CONTROLLERS["dopri5"].beta
        0.04
    """

    safety: float = 0.9
    max_growth: float = 10.0
    max_shrink: float = 0.2
    first_growth: float = 100.0
    beta: float = 0.0
    ratio_floor: float = 1e-4

    def next_step(
        self,
        step: Tensor,
        ratio: Tensor,
        previous: Tensor,
        accepted: Tensor,
        first: bool,
        order: int,
    ) -> tuple[Tensor, Tensor]:
        """``(proposed next step, updated previous ratio)``, all ``(b,)`` (``previous`` 0: none);
        ``first``: this is the solve's first attempt (every row on the starting heuristic's step)."""
        exponent = 1.0 / order
        plain = ratio.pow(-exponent)
        if self.beta:
            damped = ratio.pow(-(exponent - 0.75 * self.beta)) * previous.pow(self.beta)
            plain = torch.where(accepted & (previous > 0), damped, plain)
        shrink = torch.where(accepted, 1.0, self.max_shrink)
        growth = self.first_growth if first else self.max_growth
        factor = torch.maximum(shrink, self.safety * plain).clamp(max=growth)
        remembered = torch.where(accepted, ratio.clamp(min=self.ratio_floor), previous)
        return step * factor, remembered


CONTROLLERS: dict[str, StepController] = {"dopri5": StepController(beta=0.04)}
"""The controller of each adaptive method (the default :class:`StepController` when absent).

dopri5's :math:`\\beta = 0.04` was measured on the time-to-accuracy benchmark's Gaussian fields
(evaluations to a log-density error of 1e-6): 92 -> 80 at d = 16 and 86 -> 68 at d = 64; 0.08 was
worse, and so was a nonzero value for dopri8."""


class StepFailure(RuntimeError):
    """The loop cannot go on; ``kind`` is ``"nonfinite_field"``, ``"nonfinite_state"``,
    ``"underflow"`` or ``"max_steps"``; ``rows`` names rows of the original batch where known."""

    def __init__(self, kind: str, message: str, rows: Tensor | None = None, time: float = 0.0):
        super().__init__(message)
        self.kind = kind
        self.rows = rows
        self.time = time


@dataclass
class StepRecord:
    """What the adjoint replays: every attempted step of a solve, forward order.

    Each entry is ``(rows, t, h, t_end, y, accepted, landed)`` for the rows attempted together:
    their indices in the batch, times, signed steps, end times, states before the step, which
    accepted, and for each accepted row the output index it landed on (-1: none).
    """

    steps: list[tuple[Tensor, ...]] = field(default_factory=list)


def _combine(stages: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor | None:
    """``sum_j coefficients[j] * stages[j]``, skipping zeros (``None`` if all are zero)."""
    total: Tensor | None = None
    for coefficient, k in zip(coefficients, stages, strict=False):
        if coefficient == 0.0:
            continue
        total = k * coefficient if total is None else total.add(k, alpha=coefficient)
    return total


def rk_step(
    f: Dynamics,
    tableau: Tableau,
    t: Tensor,
    h: Tensor,
    y: Tensor,
    k_first: Tensor,
    rows: Tensor | None,
    t_end: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, list[Tensor], list[Tensor]]:
    """One step of every row: ``(y_new, error, stage inputs, stages)``.

    ``t``, ``h`` (signed) are ``(b,)``; ``t_end`` (``t + h`` exactly, e.g. an output time) is the
    time of stages with node 1. ``error`` is ``None`` for a fixed-grid tableau.
    """
    h_col = h.unsqueeze(1)
    stages, inputs = [k_first], [y]
    end = t + h if t_end is None else t_end
    for node, row in zip(tableau.nodes, tableau.rows, strict=True):
        increment = _combine(stages, row)
        y_stage = y if increment is None else y + h_col * increment
        inputs.append(y_stage)
        stages.append(f(end if node == 1.0 else t + node * h, y_stage, rows))
    if tableau.first_same_as_last:
        y_new = inputs[-1]
    else:
        increment = _combine(stages, tableau.weights)
        y_new = y if increment is None else y + h_col * increment
    error = None
    if tableau.error_weights is not None:
        combined = _combine(stages, tableau.error_weights)
        error = torch.zeros_like(y) if combined is None else h_col * combined
    return y_new, error, inputs, stages


def _explain(
    rows: Tensor, bad: Tensor, inputs: Sequence[Tensor], stages: Sequence[Tensor], t: float
) -> StepFailure:
    """A non-finite step: field values from finite inputs, or a state that blew up."""
    with torch.no_grad():
        from_field = torch.zeros_like(bad)
        for y_in, k in zip(inputs, stages, strict=False):
            from_field |= torch.isfinite(y_in).all(dim=1) & ~torch.isfinite(k).all(dim=1)
        from_field &= bad
        if bool(from_field.any()):
            return StepFailure("nonfinite_field", f"near t = {t:.6g}", rows[from_field], t)
        return StepFailure("nonfinite_state", f"near t = {t:.6g}", rows[bad], t)


@dataclass(frozen=True)
class Stepping:
    """How the loop steps: everything of a solve but the dynamics, the method and the observers.

    Attributes:
        rtol: relative tolerance (adaptive methods).
        atol: absolute tolerance (adaptive methods).
        norm: maps scaled errors ``(b, n)`` to each row's ratio ``(b,)`` (adaptive methods:
            required).
        steps_per_unit: uniform steps per unit time (fixed-grid methods: required); every output
            time is a grid point.
        max_steps: most step attempts of a row between two output times.
        first_step: initial step length (default: Hairer's heuristic, per row).
        compact: let finished rows leave the evaluated batch (``f`` is then called on the rows
            still moving); ``False`` keeps every row in every call, finished rows frozen, for
            dynamics that can only be evaluated on the whole batch. The results are the same.
        shared_steps: one step for the whole batch (the smallest any row proposes, accepted when
            every row accepts it), for dynamics that take one time for all rows; every row still
            meets the tolerance, but a row's steps then depend on its batch.
    """

    rtol: float = 0.0
    atol: float = 0.0
    norm: Callable[[Tensor], Tensor] | None = None
    steps_per_unit: int | None = None
    max_steps: int = 100_000
    first_step: float | None = None
    compact: bool = True
    shared_steps: bool = False


def solve(
    f: Dynamics,
    y0: Tensor,
    times: Sequence[float],
    method: str,
    stepping: Stepping,
    *,
    on_evaluation: Callable[[], None] | None = None,
    on_step: Callable[[float], None] | None = None,
    record: StepRecord | None = None,
) -> Tensor:
    """Integrate ``dy/dt = f(t, y)`` from ``times[0]`` through ``times[1:]``, row by row.

    Args:
        f: the dynamics (see :data:`Dynamics`).
        y0: initial states ``(B, n)``.
        times: strictly monotone output times (Python floats), ``times[0]`` the start.
        method: a name of :data:`cnftools._tableaux.TABLEAUX`.
        stepping: tolerances and norm, grid, limits and row handling (:class:`Stepping`).
        on_evaluation: called once per evaluation of ``f`` (counting).
        on_step: called after each step with the earliest time a row has reached.
        record: filled with the attempted steps, for :mod:`cnftools._adjoint`.

    Returns:
        The states at ``times``, shape ``(len(times), B, n)`` (``times[0]``: ``y0``).

    Raises:
        StepFailure: non-finite values, step-size underflow, or more than ``max_steps`` attempts.

    Example:
        >>> import math, torch
        >>> y0 = torch.ones(3, 1, dtype=torch.float64)
        >>> rms = lambda e: e.pow(2).mean(dim=1).sqrt()
        >>> decay = torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64)
        >>> f = lambda t, y, rows: -y * (decay if rows is None else decay[rows])
        >>> stepping = Stepping(rtol=1e-10, atol=1e-10, norm=rms)
        >>> out = solve(f, y0, [0.0, 1.0], "dopri5", stepping)
        >>> [round(v, 8) for v in out[-1, :, 0].tolist()]
        [0.36787944, 0.13533528, 0.04978707]
    """
    tableau = TABLEAUX[method]
    evaluate = f if on_evaluation is None else _counted(f, on_evaluation)
    if tableau.is_adaptive:
        if stepping.norm is None:
            raise ValueError("an adaptive method needs Stepping(norm=...)")
        return _solve_adaptive(evaluate, y0, times, tableau, stepping, on_step, record)
    if stepping.steps_per_unit is None:
        raise ValueError(f"the fixed-grid method {method!r} needs Stepping(steps_per_unit=...)")
    return _solve_fixed(evaluate, y0, times, tableau, stepping.steps_per_unit, on_step, record)


def _counted(f: Dynamics, on_evaluation: Callable[[], None]) -> Dynamics:
    def counted(t: Tensor, y: Tensor, rows: Tensor | None) -> Tensor:
        on_evaluation()
        return f(t, y, rows)

    return counted


def fixed_grid(start: float, end: float, steps_per_unit: int) -> list[float]:
    """The uniform grid from ``start`` to ``end`` with ``steps_per_unit`` steps per unit time."""
    n = max(1, -int(-(abs(end - start) * steps_per_unit - 1e-9) // 1))
    grid = torch.linspace(start, end, n + 1, dtype=torch.float64).tolist()
    grid[0], grid[-1] = start, end
    return grid


def _solve_fixed(
    f: Dynamics,
    y0: Tensor,
    times: Sequence[float],
    tableau: Tableau,
    steps_per_unit: int,
    on_step: Callable[[float], None] | None,
    record: StepRecord | None,
) -> Tensor:
    batch = y0.shape[0]
    every = torch.arange(batch, device=y0.device)
    out, y = [y0], y0
    for index in range(1, len(times)):
        grid = fixed_grid(float(times[index - 1]), float(times[index]), steps_per_unit)
        for a, b in itertools.pairwise(grid):
            t = torch.full((batch,), a, dtype=y0.dtype, device=y0.device)
            t_end = torch.full((batch,), b, dtype=y0.dtype, device=y0.device)
            h = t_end - t
            k_first = f(t, y, None)
            if record is not None:
                landed = torch.full((batch,), index if b == grid[-1] else -1, device=y0.device)
                accepted = torch.ones(batch, dtype=torch.bool, device=y0.device)
                record.steps.append((every, t, h, t_end, y.detach(), accepted, landed))
            y, *_ = rk_step(f, tableau, t, h, y, k_first, None, t_end)
            if on_step is not None:
                on_step(b)
        with torch.no_grad():
            bad = ~torch.isfinite(y).all(dim=1)
        if bool(bad.any()):
            raise StepFailure("nonfinite_state", f"by t = {times[index]:.6g}", every[bad])
        out.append(y)
    return torch.stack(out)


@dataclass
class _AdaptiveLoop:
    """What every step of an adaptive solve shares: the dynamics, the method, the controls."""

    f: Dynamics
    tableau: Tableau
    targets: Tensor  # the output times
    direction: float  # 1.0 forward in time, -1.0 backward
    stepping: Stepping  # its norm is set (adaptive)
    controller: StepController = field(init=False)
    last: int = field(init=False)  # the index of the last output time
    fresh_first: bool = field(init=False)  # not FSAL: a step's first stage is evaluated anew

    def __post_init__(self) -> None:
        self.controller = CONTROLLERS.get(self.tableau.name, StepController())
        self.last = self.targets.shape[0] - 1
        self.fresh_first = not self.tableau.first_same_as_last

    def _tolerances(self) -> tuple[float, float, Callable[[Tensor], Tensor]]:
        norm = self.stepping.norm
        assert norm is not None  # solve() refuses an adaptive method without one
        return self.stepping.rtol, self.stepping.atol, norm

    def start(self, y0: Tensor) -> RowState:
        """Every row at the first output time, with its first stage and starting step."""
        batch, device, dtype = y0.shape[0], y0.device, y0.dtype
        rows = torch.arange(batch, device=device)
        t = self.targets[0].expand(batch).clone()
        k_first = self.f(t, y0, None)
        with torch.no_grad():
            longest = (self.targets[1] - self.targets[0]).abs().expand(batch)
        first_step = self.stepping.first_step
        if first_step is None:
            h = self.starting_step(t, y0, k_first, longest, rows)
        else:
            h = torch.minimum(torch.full_like(t, abs(first_step)), longest)
        if self.stepping.shared_steps:
            h = h.min().expand(batch)
        return RowState(
            rows=rows,
            y=y0,
            t=t,
            h=h,
            k_first=k_first,
            target=torch.ones(batch, dtype=torch.long, device=device),
            attempts=torch.zeros(batch, dtype=torch.long, device=device),
            previous=torch.zeros(batch, dtype=dtype, device=device),
            moving=torch.ones(batch, dtype=torch.bool, device=device),
        )

    def starting_step(
        self, t: Tensor, y: Tensor, f0: Tensor, longest: Tensor, rows: Tensor
    ) -> Tensor:
        """Hairer's starting step per row (Solving ODEs I, §II.4), never past the first output
        (``shared_steps``: the smallest for every row, the probe included)."""
        (rtol, atol, norm), direction = self._tolerances(), self.direction
        with torch.no_grad():
            scale = atol + rtol * y.abs()
            d0, d1 = norm(y / scale), norm(f0 / scale)
            h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), 1e-6, 0.01 * d0 / d1)
            h0 = torch.minimum(h0, longest)
            if self.stepping.shared_steps:
                h0 = h0.min().expand(h0.shape[0])
        if not bool(torch.isfinite(h0).all()):
            bad = ~torch.isfinite(h0)
            raise _explain(rows, bad, [y], [f0], float(t[0]))
        y1 = y + (direction * h0).unsqueeze(1) * f0
        f1 = self.f(t + direction * h0, y1, None)
        with torch.no_grad():
            d2 = norm((f1 - f0) / scale) / h0
            largest = torch.maximum(d1, d2)
            h1 = torch.where(
                largest <= 1e-15,
                torch.clamp(h0 * 1e-3, min=1e-6),
                (0.01 / largest).pow(1.0 / self.tableau.order),
            )
            bad = ~torch.isfinite(d2)
        if bool(bad.any()):
            raise _explain(rows, bad, [y1], [f1], float(t[0]))
        return torch.minimum(torch.minimum(100 * h0, h1), longest)

    def attempt(self, s: RowState) -> Attempt:
        """Every row's next step, landing exactly on its next output time, its error ratio and
        the step's summary for the host; counts the attempt of every row that did not land."""
        direction, last = self.direction, self.last
        t, y, target, moving = s.t, s.y, s.target, s.moving
        with torch.no_grad():
            goal = self.targets[target.clamp(max=last)]
            remaining = (goal - t) * direction
            lands = s.h >= remaining
            step = torch.where(moving, torch.where(lands, remaining, s.h), 0.0)
            signed = direction * step
            t_new = torch.where(lands, goal, t + signed)
        y_new, error, inputs, stages = rk_step(
            self.f, self.tableau, t, signed, y, s.k_first, s.evaluated, t_new
        )
        assert error is not None
        with torch.no_grad():
            rtol, atol, norm = self._tolerances()
            scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
            ratio = torch.where(moving, norm(error / scale), 0.0)
            finite = torch.isfinite(ratio)
            accepted = (ratio <= 1.0) & finite & moving
            # shared steps: the batch's one step stands or falls with its worst row
            if self.stepping.shared_steps:
                accepted = accepted.all().expand(accepted.shape[0]) & moving
            landed = accepted & lands
            finishing = landed & (target == last)
            s.attempts = attempts = torch.where(landed, 0, s.attempts + 1)
            stuck = (t_new == t) & finite & moving
            counts = torch.stack(
                [
                    (~finite).sum(),
                    (attempts > self.stepping.max_steps).sum(),
                    stuck.sum(),
                    finishing.sum(),
                    (landed & (target < last)).sum(),
                ]
            )
            earliest = t.min() if direction > 0 else t.max()
            summary = torch.cat([counts.to(torch.float64), earliest.reshape(1).to(torch.float64)])
        return Attempt(
            step=step,
            signed=signed,
            t_new=t_new,
            y_new=y_new,
            inputs=inputs,
            stages=stages,
            ratio=ratio,
            accepted=accepted,
            landed=landed,
            finishing=finishing,
            stuck=stuck,
            summary=summary,
        )

    def check(self, s: RowState, a: Attempt) -> tuple[int, int, float]:
        """The step's one host sync: ``(rows finished, rows landed before the last output, the
        earliest time a row has reached)``; raises :class:`StepFailure` if the loop cannot go
        on."""
        *numbers, reached = a.summary.tolist()  # the step's one host sync
        n_bad, n_over, n_stuck, n_done, n_mid = (int(n) for n in numbers)
        if n_bad:
            raise _explain(s.rows, ~torch.isfinite(a.ratio), a.inputs, a.stages, reached)
        if n_over:
            over = s.rows[s.attempts > self.stepping.max_steps]
            raise StepFailure(
                "max_steps", f"more than max_steps={self.stepping.max_steps} steps", over
            )
        if n_stuck:
            where = f"underflow in the step size near t = {reached:.6g}"
            raise StepFailure("underflow", where, s.rows[a.stuck])
        return n_done, n_mid, reached

    def advance(
        self, s: RowState, a: Attempt, n_mid: int, pieces: list[tuple[Tensor, Tensor, Tensor]]
    ) -> Tensor:
        """The accepted rows take their step (the landed ones before the last output are kept
        in ``pieces``); every row gets its next step. Returns the accepted rows, ``(b, 1)``."""
        with torch.no_grad():
            proposal, s.previous = self.controller.next_step(
                a.step, a.ratio, s.previous, a.accepted, s.first, self.tableau.order
            )
            s.h = torch.where(a.landed, torch.maximum(s.h, proposal), proposal)
            if self.stepping.shared_steps:
                s.h = s.h.min().expand(s.h.shape[0])
            s.first = False
            keep = a.accepted.unsqueeze(1)
        s.t = torch.where(a.accepted, a.t_new, s.t)
        s.y = torch.where(keep, a.y_new, s.y)
        s.k_first = torch.where(keep, a.stages[-1], s.k_first)
        if n_mid:
            mid = a.landed & (s.target < self.last)
            pieces.append((s.target[mid], s.rows[mid], s.y[mid]))
        s.target = torch.where(a.landed, s.target + 1, s.target)
        return keep


def _solve_adaptive(
    f: Dynamics,
    y0: Tensor,
    times: Sequence[float],
    tableau: Tableau,
    stepping: Stepping,
    on_step: Callable[[float], None] | None,
    record: StepRecord | None,
) -> Tensor:
    direction = 1.0 if times[-1] > times[0] else -1.0
    targets = torch.tensor([float(s) for s in times], dtype=y0.dtype, device=y0.device)
    loop = _AdaptiveLoop(f, tableau, targets, direction, stepping)
    s = loop.start(y0)
    pieces: list[tuple[Tensor, Tensor, Tensor]] = []  # (output index, rows, states)
    while True:
        a = loop.attempt(s)
        n_done, n_mid, reached = loop.check(s, a)
        if record is not None:
            landed_at = torch.where(a.landed, s.target, -1)
            record.steps.append(
                (s.rows, s.t, a.signed, a.t_new, s.y.detach(), a.accepted, landed_at)
            )
        keep = loop.advance(s, a, n_mid, pieces)
        if n_done:
            done = s.rows[a.finishing]
            pieces.append((torch.full_like(done, loop.last), done, s.y[a.finishing]))
            s.moving = s.moving & ~a.finishing
            if not bool(s.moving.any()):
                break
            if stepping.compact:
                s.compact()
                if loop.fresh_first:
                    s.k_first = f(s.t, s.y, s.evaluated)
        if loop.fresh_first and not (n_done and stepping.compact):
            s.k_first = torch.where(keep, f(s.t, s.y, s.evaluated), s.k_first)
        if on_step is not None:
            on_step(reached)
    return assemble(y0, len(times), pieces)
