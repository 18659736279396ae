r"""The ODE layer: solver configuration, function-evaluation counting, and the integrator call.

This is the only module of cnftools that imports :mod:`torchdiffeq`. Adaptive forward solves run
cnftools' own loop, :func:`cnftools._runge_kutta.solve_adaptive`, with torchdiffeq's Butcher
tableaux (no dense output, no per-evaluation wrapper); fixed grids and the adjoint run
torchdiffeq. Everything above it
(:mod:`cnftools.likelihood`) describes *what* to integrate,

.. math::

    \frac{dy}{dt} = f(t, y), \qquad y(t_0) = y_0, \qquad y \in \mathbb R^{B \times n},

and this module decides *how*: which Runge–Kutta method, which tolerances or step grid, direct
backpropagation through the solver or the adjoint method (Chen et al. 2018), and how the step-size
controller measures the error of a batch (see :class:`SolverConfig`, option ``norm``).

The state ``y`` is always a 2-D tensor ``(B, n)``: one row per sample. That lets the error norm
and the failure reports work per sample (the rows named in a :class:`SolverError` are batch rows).

References:
    Chen, Rubanova, Bettencourt, Duvenaud: Neural Ordinary Differential Equations (2018),
    arXiv:1806.07366 (the adjoint method); Hairer, Nørsett, Wanner: Solving Ordinary Differential
    Equations I, §II.4 (step-size control).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchdiffeq import odeint, odeint_adjoint

from cnftools._checks import check_tolerance
from cnftools._runge_kutta import StepFailure, Tableau, solve_adaptive

__all__ = [
    "ACCURACY_STEP",
    "ADAPTIVE_METHODS",
    "FIXED_GRID_METHODS",
    "NFE",
    "NORMS",
    "TOLERANCE_FLOOR",
    "SolverConfig",
    "SolverError",
    "integrate",
    "resolve_config",
]

FIXED_GRID_METHODS: dict[str, int] = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
}
"""Fixed-grid Runge–Kutta methods and their order of convergence."""

ADAPTIVE_METHODS: dict[str, int] = {
    "dopri5": 5,
    "dopri8": 8,
    "bosh3": 3,
    "adaptive_heun": 2,
    "fehlberg2": 2,
}
"""Adaptive (embedded) Runge–Kutta methods and their order of convergence."""

NORMS = ("rms", "max_sample")
"""Error norms for adaptive step-size control: ``"rms"`` over the whole batch, or
``"max_sample"``, the largest per-sample RMS (every sample meets the tolerance on its own)."""

_ALL_METHODS = {**FIXED_GRID_METHODS, **ADAPTIVE_METHODS}

CONTROLLER_BETA: dict[str, float] = {"dopri5": 0.04}
"""The proportional-integral controller's :math:`\beta` per method (0 when absent): Hairer and
Wanner's defaults (0.04 in their DOPRI5 code, 0 in their DOP853 code). The integral term starts
at the second controller step (the heuristic's first step is no controller step). Measured on
the time-to-accuracy benchmark's Gaussian fields (evaluations to reach a log-density error of
1e-6 over tolerances a quarter decade apart): dopri5 92 -> 80 at d = 16 and 86 -> 68 at
d = 64; 0.08 was worse, and so was a nonzero value for dopri8."""

ACCURACY_STEP = 10.0
"""Each check of ``accuracy=`` tightens the tolerance by this factor."""

TOLERANCE_FLOOR = 1e-13
"""The tightest tolerance ``accuracy=`` tries (float64 rounding sits below it)."""

ACCURACY_PLAN: tuple[tuple[float, str, float], ...] = ((0.0, "dopri8", 1.0),)
"""``(smallest accuracy, method, tolerance / accuracy)`` rows for the first solve of
``accuracy=`` (the first row whose smallest accuracy is below the target is used). Measured on the
time-to-accuracy benchmark's Gaussian fields (d = 2, 16, 64, B = 256): the 8th-order dopri8 with
the per-sample norm has a log-density error of 0.1 to 0.5 times its tolerance at tolerances
1e-4 ... 1e-10, where dopri5's is 3 to 40 times; with tolerance = accuracy it needed the fewest
evaluations, self-check included, of the plans tried (see ``docs/benchmarks.md``)."""


class SolverError(RuntimeError):
    """An ODE solve that cannot return a trustworthy result (never a silent NaN).

    Raised for non-finite field values (the message names the batch rows), step-size underflow or
    too many steps (the message says what to try instead).
    """


@dataclass
class NFE:
    """Numbers of function evaluations of one solve: the dynamics, field plus divergence.

    Attributes:
        forward: evaluations in the forward solve (and, for a differentiable solve, the ones autograd
            replays on ``backward()`` cost no new evaluations).
        backward: evaluations of the adjoint solve; updated when ``backward()`` runs (0 before, and 0
            for direct backpropagation).
        estimate: evaluations of the a-posteriori error estimate's reference solve (0 if none).
    """

    forward: int = 0
    backward: int = 0
    estimate: int = 0

    @property
    def total(self) -> int:
        """All evaluations so far."""
        return self.forward + self.backward + self.estimate


def _check_tolerance(name: str, value: object) -> float:
    number = check_tolerance(name, value, allow_none=False)
    assert number is not None
    return number


@dataclass(frozen=True)
class SolverConfig:
    r"""How to integrate an ODE: method, tolerances or grid, gradient mode. Validated on construction.

    Fixed-grid methods (``euler``, ``midpoint``, ``heun2``, ``heun3``, ``rk4``) take a uniform grid
    of ``steps`` steps on :math:`[0, 1]` (or ``step_size``, rounded to the nearest grid dividing the
    interval into equal steps); requested output times are added to that grid, never interpolated.
    Adaptive methods (``dopri5``, ``dopri8``, ``bosh3``, ``adaptive_heun``, ``fehlberg2``) accept a
    step when the error estimate :math:`e` satisfies
    :math:`\| e / (\mathrm{atol} + \mathrm{rtol}\,|y|) \| \le 1`.

    **Batches share one step size.** The solver integrates the whole batch as one system. With
    ``norm="rms"`` (torchdiffeq's default), the error norm is an RMS over the batch, so one hard
    sample among ``B`` easy ones can have a local error up to about :math:`\sqrt{B}` times the
    tolerance; every sample still takes the (small) steps the batch needs, so easy samples are more
    accurate than asked. ``norm="max_sample"`` takes the maximum over samples of each sample's RMS
    error, which makes the tolerance hold for every sample separately (at the price of a few more
    steps). The state's two parts (the point ``z`` and the log-density columns) are normed
    separately and the larger counts, so the log-density is controlled as tightly as the point.

    Args:
        method: one of :data:`FIXED_GRID_METHODS` or :data:`ADAPTIVE_METHODS`.
        rtol: relative tolerance (adaptive methods).
        atol: absolute tolerance (adaptive methods).
        step_size: fixed-grid step (fixed-grid methods; exclusive with ``steps``).
        steps: number of fixed-grid steps on :math:`[0, 1]` (fixed-grid methods).
        adjoint: differentiate by the adjoint method (memory independent of the number of steps)
            instead of backpropagating through the solver's operations.
        adjoint_method: method of the backward (adjoint) solve; default ``method``. Must be of the
            same kind (fixed-grid or adaptive) as ``method``.
        adjoint_rtol: backward-solve relative tolerance; default ``rtol``.
        adjoint_atol: backward-solve absolute tolerance; default ``atol``.
        norm: ``"rms"`` or ``"max_sample"`` (see above; adaptive methods).
        max_steps: most steps an adaptive solve may take between two output times before a
            :class:`SolverError`; for a fixed-grid method, the most steps its grid may have on
            :math:`[0, 1]` (checked here, before any grid is built).
        first_step: initial step of an adaptive method (default: chosen automatically).
        accuracy: the target absolute error (nats) of each row's log-density. When set, the
            likelihood engine chooses method and tolerances itself (:meth:`accuracy_plan`) and
            ignores ``method``, ``rtol``, ``atol``, ``steps``, ``step_size`` and ``norm``.

    **Keywords as sugar.** :func:`cnftools.log_likelihood`, :func:`cnftools.sample_with_log_prob`
    and :func:`cnftools.sample` take ``config=`` and also the flat keywords ``method``, ``rtol``,
    ``atol``, ``step_size``, ``steps``, ``adjoint``, ``norm`` (and ``accuracy``);
    :func:`cnftools.dataset_nll` takes ``method``, ``rtol``, ``atol``, ``step_size`` and ``steps``
    (the other settings through ``config=``). They are merged over ``config`` by one rule: a keyword given (not ``None``) overrides
    the config's field; ``steps``/``step_size`` replace the config's grid (the other is cleared);
    an adaptive ``method`` keyword drops the config's grid, and an ``adjoint_method`` of the other
    kind; ``accuracy`` cannot come with ``method``, ``rtol``, ``atol``, ``step_size`` or
    ``steps``. The merged configuration is validated as usual, so a grid with an adaptive method,
    or a fixed-grid method without a grid, is an error.

    Raises:
        ValueError: for an unknown method or norm, a fixed-grid method without a grid, a grid for
            an adaptive method, or out-of-range numbers.
        TypeError: for an unknown option (the dataclass refuses unknown keywords).

    Example:
        >>> from cnftools import SolverConfig
        >>> SolverConfig("rk4", steps=20).is_adaptive
        False
        >>> SolverConfig("dopri5", rtol=1e-8, atol=1e-8).replace(norm="max_sample").norm
        'max_sample'

    References:
        Hairer, Nørsett, Wanner, Solving ODEs I, §II.4; Chen et al. (2018), arXiv:1806.07366.
    """

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    step_size: float | None = None
    steps: int | None = None
    adjoint: bool = False
    adjoint_method: str | None = None
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None
    norm: str = "rms"
    max_steps: int = 100_000
    first_step: float | None = None
    accuracy: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in _ALL_METHODS:
            raise ValueError(
                f"method must be one of {sorted(_ALL_METHODS)}, got {self.method!r} "
                f"(fixed grid: {sorted(FIXED_GRID_METHODS)}; adaptive: {sorted(ADAPTIVE_METHODS)})"
            )
        _check_tolerance("rtol", self.rtol)
        _check_tolerance("atol", self.atol)
        if self.is_adaptive:
            if self.rtol == 0 and self.atol == 0:
                raise ValueError("rtol and atol cannot both be 0 for an adaptive method")
            if self.step_size is not None or self.steps is not None:
                raise ValueError(
                    f"step_size/steps apply to fixed-grid methods {sorted(FIXED_GRID_METHODS)}; "
                    f"{self.method!r} is adaptive: control it with rtol/atol"
                )
        else:
            if (self.step_size is None) == (self.steps is None):
                raise ValueError(
                    f"the fixed-grid method {self.method!r} needs exactly one of step_size "
                    f"(e.g. 0.05) or steps (e.g. 20); got step_size={self.step_size}, "
                    f"steps={self.steps}"
                )
            if self.step_size is not None:
                step = _check_tolerance("step_size", self.step_size)
                if not 0 < step <= 1:
                    raise ValueError(f"step_size must lie in (0, 1], got {step}")
            if self.steps is not None and (
                isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
            ):
                raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.adjoint, bool):
            raise TypeError(f"adjoint must be a bool, got {type(self.adjoint).__name__}")
        if self.adjoint_method is not None:
            if self.adjoint_method not in _ALL_METHODS:
                raise ValueError(
                    f"adjoint_method must be one of {sorted(_ALL_METHODS)}, "
                    f"got {self.adjoint_method!r}"
                )
            if (self.adjoint_method in ADAPTIVE_METHODS) != self.is_adaptive:
                raise ValueError(
                    f"adjoint_method {self.adjoint_method!r} must be of the same kind "
                    f"(fixed-grid or adaptive) as method {self.method!r}"
                )
        for name in ("adjoint_rtol", "adjoint_atol"):
            if getattr(self, name) is not None:
                _check_tolerance(name, getattr(self, name))
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int):
            raise TypeError(f"max_steps must be an int, got {type(self.max_steps).__name__}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.first_step is not None and not _check_tolerance("first_step", self.first_step) > 0:
            raise ValueError("first_step must be > 0")
        if self.accuracy is not None and not _check_tolerance("accuracy", self.accuracy) > 0:
            raise ValueError("accuracy must be > 0 (nats)")
        n_grid = self.n_steps
        if n_grid is not None and n_grid > self.max_steps:
            given = f"step_size={self.step_size}" if self.steps is None else f"steps={self.steps}"
            raise ValueError(
                f"{given} makes a fixed grid of {n_grid} steps on [0, 1], more than "
                f"max_steps={self.max_steps}; use a larger step_size (fewer steps) or raise "
                "max_steps if you mean it"
            )

    @property
    def is_adaptive(self) -> bool:
        """True for an adaptive (error-controlled) method."""
        return self.method in ADAPTIVE_METHODS

    @property
    def order(self) -> int:
        """The method's order of convergence."""
        return _ALL_METHODS[self.method]

    @property
    def n_steps(self) -> int | None:
        """Number of uniform steps on :math:`[0, 1]` of a fixed-grid method (``None`` if adaptive)."""
        if self.is_adaptive:
            return None
        if self.steps is not None:
            return self.steps
        assert self.step_size is not None
        ratio = 1.0 / self.step_size
        nearest = round(ratio)
        return max(1, nearest if abs(ratio - nearest) < 1e-9 * ratio else math.ceil(ratio))

    def replace(self, **changes: object) -> SolverConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def refined(self) -> SolverConfig:
        """A more accurate configuration, for a-posteriori error estimates.

        Adaptive: tolerances divided by 100 (not below 1e-14). Fixed grid: twice the steps.
        """
        if self.is_adaptive:
            return self.replace(rtol=max(self.rtol / 100, 1e-14), atol=max(self.atol / 100, 1e-14))
        n = self.n_steps
        assert n is not None
        return self.replace(step_size=None, steps=2 * n, max_steps=max(self.max_steps, 2 * n))

    def accuracy_plan(self) -> SolverConfig:
        """The first solve of ``accuracy=``: method and tolerance from :data:`ACCURACY_PLAN`,
        per-sample norm; the other settings (adjoint, ``max_steps``) kept.

        Example:
            >>> SolverConfig(accuracy=1e-8).accuracy_plan().method
            'dopri8'
        """
        if self.accuracy is None:
            raise ValueError("accuracy_plan needs a config with accuracy set")
        method, ratio = next(
            (method, ratio)
            for smallest, method, ratio in ACCURACY_PLAN
            if self.accuracy >= smallest
        )
        tol = max(self.accuracy * ratio, TOLERANCE_FLOOR)
        return self.replace(
            method=method,
            rtol=tol,
            atol=tol,
            steps=None,
            step_size=None,
            norm="max_sample",
            adjoint_method=None,
        )

    def tightened(self, factor: float) -> SolverConfig:
        """Adaptive tolerances divided by ``factor`` (not below :data:`TOLERANCE_FLOOR`)."""
        return self.replace(
            rtol=max(self.rtol / factor, TOLERANCE_FLOOR),
            atol=max(self.atol / factor, TOLERANCE_FLOOR),
        )


def resolve_config(
    config: SolverConfig | None = None,
    *,
    method: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    adjoint: bool | None = None,
    norm: str | None = None,
    accuracy: float | None = None,
) -> SolverConfig:
    """The one merge rule of the solver keywords (thin sugar) over a :class:`SolverConfig`.

    Every public entry point that takes solver keywords (:func:`cnftools.log_likelihood`,
    :func:`cnftools.sample_with_log_prob`, :func:`cnftools.sample`, :func:`cnftools.dataset_nll`)
    merges them here, and nowhere else:

    1. Start from ``config`` (the defaults of :class:`SolverConfig` when ``None``).
    2. A keyword given (not ``None``) replaces the config's field of the same name; a keyword
       left at ``None`` keeps the config's value.
    3. The grid is one setting: giving ``steps`` or ``step_size`` replaces the config's grid (the
       other of the two is cleared).
    4. An adaptive ``method`` keyword drops the config's grid (an adaptive method has none), and
       an ``adjoint_method`` of the other kind than the new method is dropped.
    5. ``accuracy`` chooses method and tolerances itself: it cannot be given together with the
       ``method``, ``rtol``, ``atol``, ``step_size`` or ``steps`` keywords.

    The result is validated like any :class:`SolverConfig`: a grid with an adaptive method (e.g.
    ``steps=`` on the default ``dopri5``), or a fixed-grid method without a grid, is an error.

    Raises:
        TypeError: ``config`` is not a :class:`SolverConfig`.
        ValueError: the clash of rule 5, or a merged configuration that is not valid.

    Example:
        >>> base = SolverConfig("rk4", steps=8)
        >>> resolve_config(base, steps=16).steps
        16
        >>> resolve_config(base, method="dopri5", rtol=1e-8).steps is None
        True
    """
    if config is not None and not isinstance(config, SolverConfig):
        raise TypeError(f"config must be a SolverConfig, got {type(config).__name__}")
    base = config if config is not None else SolverConfig()
    if accuracy is not None:
        given = {"method": method, "rtol": rtol, "atol": atol, "step_size": step_size}
        given["steps"] = steps
        clash = [name for name, value in given.items() if value is not None]
        if clash:
            raise ValueError(
                f"accuracy= chooses the method and tolerances itself; do not also give {clash}"
            )
    keywords = {
        "method": method,
        "rtol": rtol,
        "atol": atol,
        "step_size": step_size,
        "steps": steps,
        "adjoint": adjoint,
        "norm": norm,
        "accuracy": accuracy,
    }
    changes: dict[str, object] = {k: v for k, v in keywords.items() if v is not None}
    if not changes:
        return base
    if step_size is not None or steps is not None:  # rule 3: the grid is one setting
        changes["step_size"], changes["steps"] = step_size, steps
    elif method is not None and method in ADAPTIVE_METHODS:  # rule 4
        changes["step_size"] = changes["steps"] = None
    other_kind = (
        method in _ALL_METHODS
        and base.adjoint_method is not None
        and (base.adjoint_method in ADAPTIVE_METHODS) != (method in ADAPTIVE_METHODS)
    )
    if other_kind:
        changes["adjoint_method"] = None  # rule 4
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Error norms. The state is (B, n_point + n_extra): normed as two parts, the larger counts.


def _make_norm(kind: str, n_point: int) -> Callable[[Tensor], Tensor]:
    def rms(part: Tensor) -> Tensor:
        return part.pow(2).mean().sqrt()

    def rms_rows(part: Tensor) -> Tensor:
        return part.pow(2).mean(dim=1).sqrt()

    def norm(y: Tensor) -> Tensor:
        if y.dim() != 2:  # the adjoint's scalar time component, or anything unexpected
            return y.abs().max() if y.numel() else y.new_zeros(())
        point, extra = y[:, :n_point], y[:, n_point:]
        if kind == "rms":
            value = rms(point)
            return torch.maximum(value, rms(extra)) if extra.shape[1] else value
        value = rms_rows(point)
        if extra.shape[1]:
            value = torch.maximum(value, rms_rows(extra))
        return value.max()

    return norm


def _grid_constructor(n_steps: int) -> Callable[[object, Tensor, Tensor], Tensor]:
    """Uniform grid of ``n_steps`` steps per unit time, with every output time a grid point."""

    def construct(func: object, y0: Tensor, t: Tensor) -> Tensor:
        pieces = []
        for i in range(len(t) - 1):
            a, b = t[i], t[i + 1]
            n = max(1, math.ceil(abs(float(b - a)) * n_steps - 1e-9))
            pieces.append(torch.linspace(float(a), float(b), n + 1, dtype=t.dtype, device=t.device))
            if i < len(t) - 2:
                pieces[-1] = pieces[-1][:-1]
        grid = torch.cat(pieces)
        grid[0], grid[-1] = t[0], t[-1]
        return grid

    return construct


# ---------------------------------------------------------------------------------------------


class _Dynamics(nn.Module):
    """Wraps ``f(t, y)`` for torchdiffeq: counts evaluations, records non-finite rows cheaply."""

    def __init__(
        self,
        f: Callable[[Tensor, Tensor], Tensor],
        nfe: NFE,
        interval: tuple[float, float] = (-math.inf, math.inf),
    ) -> None:
        super().__init__()
        self.f = f
        self.interval = interval
        self.nfe = nfe
        self.phase = "forward"
        self.bad_rows: Tensor | None = None
        self.bad_input: Tensor | None = None
        self.bad_time: Tensor | None = None

    def forward(self, t: Tensor, y: Tensor) -> Tensor:
        # torchdiffeq's initial-step heuristic probes f at t0 + h0, and h0 can reach past the end
        # of the interval (h0 = 22 was seen for VP's marginal field at t = 0, where the field is
        # tiny). Fields may be undefined there (paths live on [0, 1]), so the probe is taken at the
        # end point instead: it only sizes the first trial step, which error control then accepts
        # or shrinks; every step itself lands inside the interval (``step_t``). The clamp is a
        # no-op inside the interval and needs no host sync.
        low, high = self.interval
        t = t.clamp(low, high)
        out = self.f(t, y)
        if self.phase == "forward":
            self.nfe.forward += 1
            with torch.no_grad():  # no device sync here: masks accumulate, checked at the end
                bad_input = ~torch.isfinite(y).all(dim=1)
                bad = ~torch.isfinite(out).all(dim=1) & ~bad_input  # non-finite from finite input
                if self.bad_rows is None:
                    self.bad_rows = bad
                    self.bad_input = bad_input
                    self.bad_time = torch.where(bad, t.detach(), torch.nan)
                else:
                    assert self.bad_time is not None and self.bad_input is not None
                    new = bad & ~self.bad_rows
                    self.bad_time = torch.where(new, t.detach(), self.bad_time)
                    self.bad_rows = self.bad_rows | bad
                    self.bad_input = self.bad_input | bad_input
        elif self.phase == "estimate":
            self.nfe.estimate += 1
        else:
            self.nfe.backward += 1
            with torch.no_grad():
                bad = ~torch.isfinite(out).all(dim=1)
                if bool(bad.any()):  # one sync per step, only in the adjoint backward solve
                    raise SolverError(
                        f"the field (or its divergence) returned non-finite values in the adjoint "
                        f"backward solve at t = {float(t):.6g}, batch rows "
                        f"{_format_rows_list(bad.nonzero().flatten())}; {_ADVICE}"
                    )
        return out

    def raise_if_bad(self, context: str) -> None:
        """Raise a :class:`SolverError` naming the rows whose dynamics went non-finite."""
        if self.bad_rows is None or self.bad_input is None:
            return
        if not bool((self.bad_rows | self.bad_input).any()):  # the one sync of a good solve
            return
        assert self.bad_time is not None
        if not bool(self.bad_rows.any()):
            rows = self.bad_input.nonzero().flatten()
            raise _solver_error(StepFailure("nonfinite_state", "", rows), context)
        rows = self.bad_rows.nonzero().flatten()
        times = [round(s, 6) for s in self.bad_time[rows[:5]].tolist()]
        failure = StepFailure("nonfinite_field", f"first at t = {times}", rows)
        raise _solver_error(failure, context)


_ADVICE = (
    "try float64, a looser tolerance (rtol/atol) or a fixed-grid method "
    "(e.g. method='rk4', steps=100)"
)


def integrate(
    f: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    times: Tensor,
    config: SolverConfig,
    *,
    n_point: int,
    params: Sequence[Tensor] = (),
    nfe: NFE | None = None,
    phase: str = "forward",
    context: str = "ODE solve",
) -> Tensor:
    r"""Integrate :math:`dy/dt = f(t, y)` from ``times[0]`` through ``times[1:]``.

    Args:
        f: the dynamics ``f(t, y) -> (B, n)``; ``t`` is a 0-dim tensor of ``y``'s dtype.
        y0: the initial state, shape ``(B, n)``.
        times: 1-D, strictly monotone (increasing or decreasing) output times; ``times[0]`` is the
            start.
        config: the solver configuration.
        n_point: the first ``n_point`` columns of ``y`` are the point, the rest extra quantities
            (normed separately by the error norm).
        params: tensors the dynamics depends on that need gradients by the adjoint method.
        nfe: counter to update (a new one if ``None``).
        phase: ``"forward"`` or ``"estimate"``: which counter the evaluations go to.
        context: what is being solved, for error messages.

    Returns:
        The states at ``times``, shape ``(len(times), B, n)``.

    Raises:
        SolverError: non-finite dynamics (naming the rows), step-size underflow, too many steps.
    """
    if y0.dim() != 2:
        raise ValueError(f"the ODE state must have shape (B, n), got {tuple(y0.shape)}")
    nfe = nfe if nfe is not None else NFE()
    tableau = _tableau(config.method) if config.is_adaptive else None
    if tableau is not None and not (config.adjoint and phase == "forward"):
        return _integrate_lean(f, y0, times, config, tableau, n_point, nfe, phase, context)
    interval = (float(times.min()), float(times.max()))
    dynamics = _Dynamics(f, nfe, interval)
    dynamics.phase = phase
    options: dict[str, object] = {}
    if config.is_adaptive:
        options["norm"] = _make_norm(config.norm, n_point)
        options["max_num_steps"] = config.max_steps
        if config.first_step is not None:
            options["first_step"] = config.first_step
        # Land steps exactly on every output time, the end included: no stage is evaluated
        # outside [0, 1] (fields may be undefined there) and no output is interpolated.
        options["step_t"] = times[1:]
    else:
        n_steps = config.n_steps
        assert n_steps is not None
        options["grid_constructor"] = _grid_constructor(n_steps)
    kwargs = {"rtol": config.rtol, "atol": config.atol, "method": config.method, "options": options}
    try:
        if config.adjoint and phase == "forward":
            adjoint_options = {k: v for k, v in options.items() if k not in ("norm", "step_t")}
            if config.is_adaptive:
                # torchdiffeq runs the backward solve in its internal time, which is -t when the
                # forward solve runs backwards in t; it flips step_t once more itself.
                reverse = bool(times[0] > times[-1])
                adjoint_options["step_t"] = -times if reverse else times
            solution = odeint_adjoint(
                dynamics,
                y0,
                times,
                adjoint_params=tuple(params),
                adjoint_method=config.adjoint_method or config.method,
                adjoint_rtol=config.adjoint_rtol
                if config.adjoint_rtol is not None
                else config.rtol,
                adjoint_atol=config.adjoint_atol
                if config.adjoint_atol is not None
                else config.atol,
                adjoint_options=adjoint_options,
                **kwargs,  # type: ignore[arg-type]
            )
        else:
            solution = odeint(dynamics, y0, times, **kwargs)  # type: ignore[arg-type]
    except AssertionError as error:
        dynamics.raise_if_bad(context)
        message = str(error)
        for marker, kind in (("underflow", "underflow"), ("max_num_steps", "max_steps")):
            if marker in message:
                failure = StepFailure(kind, message)
                raise _solver_error(failure, context, config, y0.dtype) from error
        raise SolverError(f"{context}: torchdiffeq failed: {message}; {_ADVICE}") from error
    dynamics.raise_if_bad(context)
    dynamics.phase = "backward"  # any later evaluation is the adjoint's backward solve
    return solution


# ---------------------------------------------------------------------------------------------
# The lean loop (cnftools._runge_kutta) for forward solves of adaptive methods


@functools.cache
def _tableau(method: str) -> Tableau | None:
    """The Butcher tableau of an adaptive ``method``, read from torchdiffeq's solver table.

    Reading the coefficients from torchdiffeq keeps the methods named here exactly the pairs
    torchdiffeq integrates (and the adjoint's backward solve still uses). ``None`` when this
    torchdiffeq does not expose them; the solve then goes through ``torchdiffeq.odeint``.
    """
    try:
        from torchdiffeq._impl.odeint import SOLVERS

        solver = SOLVERS[method]
        table, order = solver.tableau, int(solver.order)
        nodes = tuple(float(c) for c in table.alpha)
        rows = tuple(tuple(float(a) for a in row) for row in table.beta)
        return Tableau(
            nodes=nodes,
            rows=rows,
            weights=tuple(float(b) for b in table.c_sol),
            error_weights=tuple(float(e) for e in table.c_error),
            order=order,
            controller_beta=CONTROLLER_BETA.get(method, 0.0),
        )
    except (ImportError, AttributeError, KeyError, TypeError, ValueError):  # pragma: no cover
        return None


def _integrate_lean(
    f: Callable[[Tensor, Tensor], Tensor],
    y0: Tensor,
    times: Tensor,
    config: SolverConfig,
    tableau: Tableau,
    n_point: int,
    nfe: NFE,
    phase: str,
    context: str,
) -> Tensor:
    """:func:`integrate` for an adaptive forward solve through :func:`solve_adaptive`."""

    def count() -> None:
        if phase == "estimate":
            nfe.estimate += 1
        else:
            nfe.forward += 1

    try:
        states = solve_adaptive(
            f,
            y0,
            times.tolist(),
            tableau,
            rtol=config.rtol,
            atol=config.atol,
            norm=_make_norm(config.norm, n_point),
            max_steps=config.max_steps,
            first_step=config.first_step,
            on_evaluation=count,
        )
    except StepFailure as failure:
        raise _solver_error(failure, context, config, y0.dtype) from None
    return torch.stack(states)


def _solver_error(
    failure: StepFailure,
    context: str,
    config: SolverConfig | None = None,
    dtype: torch.dtype | None = None,
) -> SolverError:
    """The one wording of a failed solve, from either integrator (``config`` and ``dtype`` are
    needed for the step-size failures)."""
    detail = str(failure)
    if failure.kind in ("nonfinite_field", "nonfinite_state"):
        assert failure.rows is not None
        rows = _format_rows_list(failure.rows)
        where = f", {detail}" if detail else ""
        if failure.kind == "nonfinite_field":
            return SolverError(
                f"{context}: the field (or its divergence) returned non-finite values (NaN or "
                f"inf) for batch rows {rows}{where}; check the field at those inputs, or {_ADVICE}"
            )
        return SolverError(
            f"{context}: the solution became non-finite (NaN or inf) in batch rows {rows}{where}: "
            f"the solver is unstable on this field (steps too large for how fast it changes, or "
            f"the solution blows up); {_ADVICE}"
        )
    assert config is not None
    settings = f"method={config.method!r}, rtol={config.rtol:g}, atol={config.atol:g}"
    if failure.kind == "underflow":
        return SolverError(
            f"{context}: the adaptive step size underflowed ({detail}) with {settings}, "
            f"dtype={dtype}: the field is too stiff or singular for these tolerances; {_ADVICE}"
        )
    return SolverError(
        f"{context}: more than max_steps={config.max_steps} steps ({detail}) with {settings}; "
        f"raise max_steps, or {_ADVICE}"
    )


def _format_rows_list(rows: Tensor) -> str:
    text = str(rows[:10].tolist())
    return text if rows.numel() <= 10 else f"{text} (and {rows.numel() - 10} more)"
