r"""A lean embedded Runge–Kutta loop: adaptive steps, no dense output, one host sync per step.

The likelihood engine integrates an augmented state ``y = [z, A]`` of shape ``(B, n)`` and needs
the solution only at a few output times (usually just the end). A general-purpose solver fits a
dense-output interpolant after every accepted step and wraps every evaluation in bookkeeping;
for small fields (``d = 2 ... 16``) those fixed costs were a third to a half of the solve
(measured in ``docs/benchmarks.md``). This loop does only what the solve needs:

.. math::

    k_1 = f(t, y), \qquad
    k_i = f\Big(t + c_i h,\; y + h \sum_{j<i} a_{ij} k_j\Big), \qquad
    y_{\text{new}} = y + h \sum_i b_i k_i, \qquad
    e = h \sum_i (b_i - \hat b_i) k_i,

accepted when :math:`\|e / (\mathrm{atol} + \mathrm{rtol}\max(|y|, |y_{\text{new}}|))\| \le 1`,
with the next step :math:`h \cdot \min(10, \max(\delta, 0.9\,r^{-1/p}))` (:math:`r` the error
ratio, :math:`p` the order, :math:`\delta = 0.2` after a rejection and 1 after an acceptance;
optionally with a proportional-integral term, :attr:`Tableau.controller_beta`), and
the first step chosen by Hairer's heuristic (one extra evaluation). Steps are shortened to land
exactly on every output time, so no stage is evaluated outside the interval and nothing is
interpolated. The last stage of an accepted step is the next step's first. For "first same as
last" tableaux (Dormand–Prince 5 and 8, Bogacki–Shampine 3) it *is*
:math:`f(t_{\text{new}}, y_{\text{new}})`; for the two low-order pairs whose last stage sits at
:math:`t_{\text{new}}` but not at :math:`y_{\text{new}}` (``adaptive_heun``, ``fehlberg2``) it
is torchdiffeq's convention, kept so that a method name means the same solver in the forward
solve and in the adjoint's backward solve (measured on a linear system: with a fresh
:math:`f(t_{\text{new}}, y_{\text{new}})` these pairs needed 1.5–2× the evaluations for the same
accuracy).

Non-finite values cost nothing per evaluation: a NaN or inf anywhere in a step reaches the error
ratio, which the controller reads on the host anyway; only then are the stages inspected, and a
:class:`StepFailure` names the batch rows and the step.

The tableau coefficients are data passed in (see ``cnftools._ode``); this module imports no ODE
library.

References:
    Hairer, Nørsett, Wanner: Solving Ordinary Differential Equations I (2nd ed.), §II.4
    (step-size control, starting step size) and §II.5 (Dormand–Prince pairs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepFailure", "Tableau", "solve_adaptive"]

SAFETY = 0.9
"""Safety factor on the optimal step."""

MAX_GROWTH = 10.0
"""The next step is at most this many times the last one."""

MAX_SHRINK = 0.2
"""After a rejection the step shrinks by at most this factor."""

FIRST_GROWTH = 100.0
"""The step after the heuristic's first step may grow by up to this factor (instead of
:data:`MAX_GROWTH`). The heuristic aims the first step's error at 1% of the tolerance and, on the
smooth fields of likelihood solves, lands far below it (measured error ratios 1e-10 ... 1e-6):
with the usual cap the solve then spent a second small step before reaching the controller's
size, one step in five to eight of a whole solve."""


@dataclass(frozen=True)
class Tableau:
    r"""The Butcher tableau of an embedded explicit Runge–Kutta pair.

    Attributes:
        nodes: :math:`c_2, \dots, c_s` (``s - 1`` values; :math:`c_1 = 0`).
        rows: :math:`a_{ij}`: row ``i`` (stage ``i + 2``) has ``i + 1`` coefficients.
        weights: :math:`b_1, \dots, b_s` of the propagated solution.
        error_weights: :math:`b_i - \hat b_i` (the embedded pair's difference).
        order: the order ``p`` used in the step-size exponent ``1/p``.
        controller_beta: :math:`\beta` of the proportional-integral step-size controller (0: the
            plain controller). After an accepted step with error ratio :math:`r_n` (the previous
            accepted one :math:`r_{n-1}`) the next step is
            :math:`h \cdot 0.9\, r_n^{-(1/p - 0.75\beta)}\, r_{n-1}^{\beta}` (Hairer and
            Wanner's stabilized control; their DOPRI5 code uses :math:`\beta = 0.04`, their
            DOP853 code 0). The first step after the starting heuristic uses the plain
            controller (there is no previous controller step).
    """

    nodes: tuple[float, ...]
    rows: tuple[tuple[float, ...], ...]
    weights: tuple[float, ...]
    error_weights: tuple[float, ...]
    order: int
    controller_beta: float = 0.0

    def __post_init__(self) -> None:
        stages = len(self.nodes) + 1
        if len(self.rows) != stages - 1 or any(
            len(row) != i + 1 for i, row in enumerate(self.rows)
        ):
            raise ValueError("rows must be lower triangular: row i has i + 1 coefficients")
        if len(self.weights) != stages or len(self.error_weights) != stages:
            raise ValueError(f"weights and error_weights need {stages} values each")

    @property
    def stages(self) -> int:
        """Number of stages ``s``."""
        return len(self.nodes) + 1

    @property
    def first_same_as_last(self) -> bool:
        """True when the last stage is evaluated at the new solution (FSAL)."""
        return (
            self.nodes[-1] == 1.0
            and self.weights[-1] == 0.0
            and tuple(self.rows[-1]) == tuple(self.weights[:-1])
        )


class StepFailure(RuntimeError):
    """The loop cannot go on; ``kind`` is ``"nonfinite_field"``, ``"nonfinite_state"``,
    ``"underflow"`` or ``"max_steps"``; ``rows`` names batch rows where known."""

    def __init__(self, kind: str, message: str, rows: Tensor | None = None, time: float = 0.0):
        super().__init__(message)
        self.kind = kind
        self.rows = rows
        self.time = time


def _combine(y: Tensor | None, stages: Sequence[Tensor], coefficients: Sequence[float], h: float):
    """``y + h * sum_j coefficients[j] * stages[j]`` (``y`` may be ``None``), skipping zeros."""
    total: Tensor | None = None
    for coefficient, k in zip(coefficients, stages, strict=False):
        if coefficient == 0.0:
            continue
        scaled = h * coefficient
        total = k * scaled if total is None else total.add(k, alpha=scaled)
    if total is None:
        return y if y is not None else torch.zeros_like(stages[0])
    return total if y is None else y + total


def _failure(
    y: Tensor, stage_inputs: Sequence[Tensor], stages: Sequence[Tensor], t: float, h: float
) -> StepFailure:
    """Explain a non-finite error ratio: which rows, field or state."""
    with torch.no_grad():
        bad_field = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        for inputs, k in zip(stage_inputs, stages, strict=False):
            finite_in = torch.isfinite(inputs).all(dim=1)
            bad_field |= finite_in & ~torch.isfinite(k).all(dim=1)
        if bool(bad_field.any()):
            rows = bad_field.nonzero().flatten()
            return StepFailure(
                "nonfinite_field",
                f"in the step [{t:.6g}, {t + h:.6g}]",
                rows,
                t,
            )
        values = torch.stack([*stage_inputs, *stages])  # (2s, B, n)
        rows = ~torch.isfinite(values).all(dim=2).all(dim=0)
        return StepFailure(
            "nonfinite_state",
            f"in the step [{t:.6g}, {t + h:.6g}]",
            rows.nonzero().flatten(),
            t,
        )


def _initial_step(
    f: Callable[[float, Tensor], Tensor],
    t0: float,
    y0: Tensor,
    f0: Tensor,
    order: int,
    rtol: float,
    atol: float,
    norm: Callable[[Tensor], Tensor],
    longest: float,
    direction: float,
) -> float:
    """Hairer's starting step (Solving ODEs I, §II.4), never longer than ``longest``."""
    with torch.no_grad():
        scale = atol + rtol * y0.abs()
        d0 = float(norm(y0 / scale))
        d1 = float(norm(f0 / scale))
    if not (math.isfinite(d0) and math.isfinite(d1)):
        raise _failure(y0, [y0], [f0], t0, 0.0)
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, longest)
    if not h0 > 0:
        raise StepFailure("underflow", f"underflow in the first step size ({h0:g}) at t = {t0}")
    y1 = y0 + (direction * h0) * f0
    f1 = f(t0 + direction * h0, y1)
    with torch.no_grad():
        d2 = float(norm((f1 - f0) / scale)) / h0
    if not math.isfinite(d2):
        raise _failure(y0, [y1], [f1], t0, direction * h0)
    largest = max(d1, d2)
    h1 = max(1e-6, h0 * 1e-3) if largest <= 1e-15 else (0.01 / largest) ** (1.0 / order)
    return min(100 * h0, h1, longest)


def solve_adaptive(
    f: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    times: Sequence[float],
    tableau: Tableau,
    *,
    rtol: float,
    atol: float,
    norm: Callable[[Tensor], Tensor],
    max_steps: int,
    first_step: float | None = None,
    on_evaluation: Callable[[], None] | None = None,
) -> list[Tensor]:
    """Integrate ``dy/dt = f(t, y)`` from ``times[0]`` through ``times[1:]`` with error control.

    Args:
        f: the dynamics; called with a 0-dim tensor ``t`` (``y``'s dtype and device) and ``y``.
        y0: initial state ``(B, n)``.
        times: strictly monotone output times (Python floats), ``times[0]`` the start.
        tableau: the embedded pair.
        rtol: relative tolerance.
        atol: absolute tolerance.
        norm: maps a scaled error ``(B, n)`` to a 0-dim tensor (the error ratio).
        max_steps: most step attempts between two output times.
        first_step: initial step length (default: Hairer's heuristic).
        on_evaluation: called once per evaluation of ``f`` (counting).

    Returns:
        The states at ``times``, ``times[0]`` included (``y0`` itself).

    Raises:
        StepFailure: non-finite values, step-size underflow, or more than ``max_steps`` attempts.

    Example:
        >>> import math, torch
        >>> heun_euler = Tableau(
        ...     nodes=(1.0,), rows=((1.0,),), weights=(0.5, 0.5), error_weights=(0.5, -0.5), order=2
        ... )
        >>> y0 = torch.ones(1, 1, dtype=torch.float64)
        >>> rms = lambda e: e.pow(2).mean().sqrt()
        >>> states = solve_adaptive(
        ...     lambda t, y: -y,
        ...     y0,
        ...     [0.0, 1.0],
        ...     heun_euler,
        ...     rtol=1e-8,
        ...     atol=1e-8,
        ...     norm=rms,
        ...     max_steps=100_000,
        ... )
        >>> abs(float(states[-1]) - math.exp(-1.0)) < 1e-6
        True
    """
    dtype, device = y0.dtype, y0.device

    def call(t: float, y: Tensor) -> Tensor:
        if on_evaluation is not None:
            on_evaluation()
        return f(torch.full((), t, dtype=dtype, device=device), y)

    direction = 1.0 if times[-1] > times[0] else -1.0
    out = [y0]
    t, y = float(times[0]), y0
    k_first: Tensor | None = None
    exponent = 1.0 / tableau.order
    beta = tableau.controller_beta
    fsal = tableau.first_same_as_last
    h: float | None = None if first_step is None else abs(first_step)
    heuristic_first = False  # the step being tried was sized by the heuristic, not the controller
    previous: float | None = None  # the last accepted error ratio (the PI controller's memory)
    for target in times[1:]:
        target = float(target)
        attempts = 0
        while direction * (target - t) > 0:
            attempts += 1
            if attempts > max_steps:
                raise StepFailure("max_steps", f"more than max_steps={max_steps} steps")
            if k_first is None:
                k_first = call(t, y)
            remaining = abs(target - t)
            if h is None:
                heuristic_first = True
                h = _initial_step(
                    call, t, y, k_first, tableau.order, rtol, atol, norm, remaining, direction
                )
            lands = h >= remaining
            step = remaining if lands else h
            t_new = target if lands else t + direction * step
            if t_new == t:
                raise StepFailure("underflow", f"underflow in the step size ({step:g}) at t = {t}")
            signed = direction * step
            stages = [k_first]
            inputs = [y]
            for node, row in zip(tableau.nodes, tableau.rows, strict=True):
                y_stage = _combine(y, stages, row, signed)
                inputs.append(y_stage)
                stages.append(call(t_new if node == 1.0 else t + node * signed, y_stage))
            y_new = inputs[-1] if fsal else _combine(y, stages, tableau.weights, signed)
            with torch.no_grad():
                error = _combine(None, stages, tableau.error_weights, signed)
                scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
                ratio = float(norm(error / scale))  # the one host sync of a step
            if not math.isfinite(ratio):
                raise _failure(y, inputs, stages, t, signed)
            if ratio <= 1.0:
                t, y = t_new, y_new
                k_first = stages[-1]  # see the module docstring for non-FSAL pairs
                shrink = 1.0
            else:
                shrink = MAX_SHRINK
            growth = FIRST_GROWTH if heuristic_first else MAX_GROWTH
            if ratio == 0.0:
                factor = growth
            elif ratio <= 1.0 and beta and previous is not None:
                factor = SAFETY * ratio ** -(exponent - 0.75 * beta) * previous**beta
                previous = max(ratio, 1e-4)
            else:
                factor = SAFETY * ratio**-exponent
                if ratio <= 1.0:
                    previous = max(ratio, 1e-4)
            proposal = step * min(growth, max(shrink, factor))
            heuristic_first = False
            # a step shortened to land on an output time says little about the next one
            h = max(h, proposal) if lands and ratio <= 1.0 else proposal
        out.append(y)
    return out
