r"""The ODE layer: solver configuration, function-evaluation counting, and the integrator call.

Every solve of cnftools goes through :func:`integrate` and from there through one loop,
:func:`cnftools._runge_kutta.solve` (our own tableaux, :mod:`cnftools._tableaux`): adaptive and
fixed-grid methods, forward solves and the adjoint, which differentiates the very same steps by
checkpointed replay (:mod:`cnftools._adjoint`). torchdiffeq is not used here; it stays the
reference the loop is checked against (``cnftools validate``, section ``ode``). Everything above it
(:mod:`cnftools.likelihood`) describes *what* to integrate,

.. math::

    \frac{dy}{dt} = f(t, y), \qquad y(t_0) = y_0, \qquad y \in \mathbb R^{B \times n},

and this module decides *how*: which Runge–Kutta method, which tolerances or step grid, and
direct backpropagation through the solver or the checkpointed adjoint.

The state ``y`` is always a 2-D tensor ``(B, n)``: one row per sample, and every row is solved on
its own steps (its own step size, acceptance and finish), so a row's result does not depend on
the other rows of its batch. The rows named in a :class:`SolverError` are batch rows.

References:
    Chen, Rubanova, Bettencourt, Duvenaud: Neural Ordinary Differential Equations (2018),
    arXiv:1806.07366 (the adjoint method); Hairer, Nørsett, Wanner: Solving Ordinary Differential
    Equations I, §II.4 (step-size control).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypedDict, Unpack

import torch
from torch import Tensor

from cnftools._adjoint import solve_with_replay
from cnftools._checks import check_tolerance
from cnftools._runge_kutta import Dynamics, StepFailure, Stepping, StepRecord, solve
from cnftools._tableaux import ADAPTIVE, FIXED_GRID

__all__ = [
    "ACCURACY_RTOL_SHARE",
    "ACCURACY_SAFETY",
    "ACCURACY_STEP",
    "ADAPTIVE_METHODS",
    "FIXED_GRID_METHODS",
    "NFE",
    "SOLVER_KEYWORDS",
    "TOLERANCE_FLOOR",
    "SolverConfig",
    "SolverError",
    "SolverKeywords",
    "check_reach",
    "integrate",
    "resolve_config",
]

FIXED_GRID_METHODS: dict[str, int] = dict(FIXED_GRID)
"""Fixed-grid Runge–Kutta methods and their order of convergence (``rk4`` is Kutta's 3/8 rule)."""

ADAPTIVE_METHODS: dict[str, int] = dict(ADAPTIVE)
"""Adaptive (embedded) Runge–Kutta methods and their order of convergence."""

_ALL_METHODS = {**FIXED_GRID_METHODS, **ADAPTIVE_METHODS}

ACCURACY_STEP = 10.0
"""Each check of ``accuracy=`` tightens the tolerance by this factor."""

TOLERANCE_FLOOR = 1e-13
"""The tightest tolerance ``accuracy=`` tries (float64 rounding sits below it)."""

ACCURACY_PLAN: tuple[tuple[float, str, float], ...] = ((1e-5, "dopri5", 0.1), (0.0, "dopri8", 1.0))
"""``(smallest accuracy, method, tolerance / accuracy)`` rows for the first solve of
``accuracy=`` (the first row whose smallest accuracy is at most the target is used). Measured by
``python benchmarks/accuracy_plan.py --threads 1`` (the time-to-accuracy benchmark's Gaussian
fields, d = 2, 16, 64, B = 256, evaluations of the first solve, the check and any rounds): at
targets 1e-3 ... 1e-5, dopri5 at a tenth of the target needed fewer evaluations and less time
than dopri8 at the target in every cell (at 1e-4: 112, 118, 160 against dopri8's 134, 160, 199; at 1e-5 dopri8 at the
target also paid a round of refinement: 266-383 against 154-226); at 1e-6 ... 1e-8 the 8th-order
dopri8 at the target did (at 1e-8: 277, 342 against dopri5's 460, 598), its log-density error
there being 0.1 to 0.5 times its tolerance where dopri5's is 3 to 40 times. dopri5 at a third of
the target was cheaper still at some cells but paid a round of refinement at others. Used in
float64; lower precisions use :data:`LOW_PRECISION_ACCURACY_PLAN`."""

LOW_PRECISION_ACCURACY_PLAN: tuple[tuple[float, str, float], ...] = ((0.0, "dopri8", 1.0),)
"""The plan of ``accuracy=`` in dtypes coarser than float64 (float32, where only targets down to
about 1e-4 are in reach). Counted by ``python benchmarks/accuracy_bound.py --rows 32`` (2,880
float32 rows per target): with :data:`ACCURACY_PLAN`'s dopri5 row, the true error exceeded the
estimate in 129 rows at 1e-3 and 315 at 1e-4, against 38 and 90 with dopri8 at the target (the
field's own float32 rounding, which no estimate of the solver sees, weighs more in the smaller
steps and the lower floor of the dopri5 plan)."""

ACCURACY_RTOL_SHARE = 0.01
"""``rtol / atol`` of the solves of ``accuracy=``. The step-size control bounds the log-density
column's local error by ``atol + rtol |A|`` with ``|A|`` the divergence integral (tens to hundreds of
nats for points in the tails), so ``rtol = atol = accuracy`` let the error of such rows grow with
``|A|`` while the target is absolute. Measured on the closed-form cases of
``benchmarks/accuracy_bound.py`` (80 rows x 6 targets, d = 8, the hardest pairs): rows over the
target 3 -> 0, over the reported bound 12 -> 4, and 23% fewer evaluations in all (the solves stop
spending rounds on rows whose tolerance was loose)."""

ACCURACY_SAFETY = 2.0
"""The reported error of ``accuracy=`` is this many times the difference of the last two solves
(at least the tighter solve's ``atol``): the difference alone understated the true error in 4 of
480 rows (worst 1.8 x) on the cases above."""


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
    of ``steps`` steps on :math:`[0, 1]`; requested output times are added to that grid, never
    interpolated (so ``times=`` off the grid changes the steps, and the final value, slightly).
    Adaptive methods (``dopri5``, ``dopri8``, ``bosh3``, ``adaptive_heun``, ``fehlberg2``) accept a
    step when the error estimate :math:`e` satisfies
    :math:`\| e / (\mathrm{atol} + \mathrm{rtol}\,|y|) \| \le 1`.

    **Each row on its own steps.** Every row of a batch is an ODE of its own: its own step size,
    acceptance and finish, with the error norm taken per row (the RMS of the row's point
    coordinates and, apart, of its log-density columns; the larger counts). So the tolerance holds
    for every sample separately, and a sample's result does not depend on which other samples
    share its batch; rows that have finished leave the evaluated batch.

    Args:
        method: one of :data:`FIXED_GRID_METHODS` or :data:`ADAPTIVE_METHODS`.
        rtol: relative tolerance (adaptive methods).
        atol: absolute tolerance (adaptive methods).
        steps: number of uniform steps on :math:`[0, 1]` (fixed-grid methods; required there).
        adjoint: differentiate by checkpointed replay (:mod:`cnftools._adjoint`): the forward
            solve keeps one state per step instead of every step's graph, and the backward pass
            recomputes one step at a time. The forward numbers and the steps are those of
            ``adjoint=False``; the gradients equal direct backpropagation up to rounding.
        max_steps: most steps an adaptive solve may take between two output times before a
            :class:`SolverError`; for a fixed-grid method, the most steps its grid may have on
            :math:`[0, 1]` (checked here, before any grid is built).
        first_step: initial step of an adaptive method (default: chosen automatically).
        accuracy: the target absolute error (nats) of each row's log-density. When set, the
            likelihood engine chooses method and tolerances itself (:meth:`accuracy_plan`) and
            ignores ``method``, ``rtol``, ``atol`` and ``steps``.
        error_estimate: also solve with :meth:`refined` and report each row's difference
            (``result.error_estimate`` of :func:`cnftools.log_likelihood`); the likelihood
            functions only.

    **Keywords as sugar.** The public entry points take ``config=`` and the keywords ``method``,
    ``rtol`` and ``atol`` (and, for the likelihood, ``accuracy``), merged over ``config`` by one
    rule (:func:`resolve_config`).

    Raises:
        ValueError: for an unknown method, a fixed-grid method without a grid, a grid for
            an adaptive method, or out-of-range numbers.
        TypeError: for an unknown option (the dataclass refuses unknown keywords).

    Example:
        >>> from cnftools import SolverConfig
        >>> SolverConfig("rk4", steps=20).is_adaptive
        False
        >>> SolverConfig("dopri5", rtol=1e-8, atol=1e-8).replace(method="dopri8").order
        8

    References:
        Hairer, Nørsett, Wanner, Solving ODEs I, §II.4; Chen et al. (2018), arXiv:1806.07366.
    """

    method: str = "dopri5"
    rtol: float = 1e-5
    atol: float = 1e-5
    steps: int | None = None
    adjoint: bool = False
    max_steps: int = 100_000
    first_step: float | None = None
    accuracy: float | None = None
    error_estimate: bool = False

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
            if self.steps is not None:
                raise ValueError(
                    f"steps applies to fixed-grid methods {sorted(FIXED_GRID_METHODS)}; "
                    f"{self.method!r} is adaptive: control it with rtol/atol"
                )
        else:
            if self.steps is None:
                raise ValueError(
                    f"the fixed-grid method {self.method!r} needs steps (e.g. steps=20: a "
                    "uniform grid of 20 steps on [0, 1])"
                )
            if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
                raise ValueError(f"steps must be an int >= 1, got {self.steps!r}")
        if not isinstance(self.adjoint, bool):
            raise TypeError(f"adjoint must be a bool, got {type(self.adjoint).__name__}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int):
            raise TypeError(f"max_steps must be an int, got {type(self.max_steps).__name__}")
        if self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.first_step is not None and not _check_tolerance("first_step", self.first_step) > 0:
            raise ValueError("first_step must be > 0")
        if self.accuracy is not None and not _check_tolerance("accuracy", self.accuracy) > 0:
            raise ValueError("accuracy must be > 0 (nats)")
        if not isinstance(self.error_estimate, bool):
            raise TypeError(
                f"error_estimate must be a bool, got {type(self.error_estimate).__name__}"
            )
        if self.steps is not None and self.steps > self.max_steps:
            raise ValueError(
                f"steps={self.steps} is more than max_steps={self.max_steps}; use fewer steps or "
                "raise max_steps if you mean it"
            )

    @property
    def is_adaptive(self) -> bool:
        """True for an adaptive (error-controlled) method."""
        return self.method in ADAPTIVE_METHODS

    @property
    def order(self) -> int:
        """The method's order of convergence."""
        return _ALL_METHODS[self.method]

    def replace(self, **changes: object) -> SolverConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def refined(self) -> SolverConfig:
        """A more accurate configuration, for a-posteriori error estimates.

        Adaptive: tolerances divided by 100 (not below 1e-14). Fixed grid: twice the steps.
        """
        if self.is_adaptive:
            return self.replace(rtol=max(self.rtol / 100, 1e-14), atol=max(self.atol / 100, 1e-14))
        n = self.steps
        assert n is not None
        return self.replace(steps=2 * n, max_steps=max(self.max_steps, 2 * n))

    def accuracy_plan(self, dtype: torch.dtype = torch.float64) -> SolverConfig:
        """The first solve of ``accuracy=`` for points of ``dtype``: method and tolerance from
        :data:`ACCURACY_PLAN` (float64) or :data:`LOW_PRECISION_ACCURACY_PLAN`, the other
        settings (adjoint, ``max_steps``) kept.

        Example:
            >>> SolverConfig(accuracy=1e-8).accuracy_plan().method
            'dopri8'
            >>> SolverConfig(accuracy=1e-4).accuracy_plan().atol
            1e-05
            >>> SolverConfig(accuracy=1e-4).accuracy_plan(torch.float32).method
            'dopri8'
        """
        if self.accuracy is None:
            raise ValueError("accuracy_plan needs a config with accuracy set")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (e.g. torch.float64), got {dtype!r}")
        plan = ACCURACY_PLAN if dtype == torch.float64 else LOW_PRECISION_ACCURACY_PLAN
        method, ratio = next(
            (method, ratio) for smallest, method, ratio in plan if self.accuracy >= smallest
        )
        tol = max(self.accuracy * ratio, TOLERANCE_FLOOR)
        return self.replace(
            method=method,
            rtol=tol * ACCURACY_RTOL_SHARE,
            atol=tol,
            steps=None,
        )

    def tightened(self, factor: float, floor: float = TOLERANCE_FLOOR) -> SolverConfig:
        """Adaptive tolerances divided by ``factor`` (not below ``floor``)."""
        return self.replace(
            rtol=max(self.rtol / factor, floor), atol=max(self.atol / factor, floor)
        )


def check_reach(config: SolverConfig, dtype: torch.dtype, hutchinson: bool = False) -> None:
    """Refuse, before any work, what the dtype or the divergence cannot deliver.

    - Tolerances below the dtype's rounding: a step is accepted when its error is at most
      ``atol + rtol |y|``; below about ``4 eps`` (``eps``: the dtype's machine epsilon) for
      ``|y| ~ 1`` no step size meets that, and the solve would shrink its steps until
      ``max_steps`` (``rtol = atol = 1e-20`` in float64 ran 62 s before failing).
    - ``accuracy=`` controls the solver's error. With Hutchinson's estimator the error against
      the exact log-density is dominated by the probes' noise, which no tolerance reduces; and
      below ``100 eps`` nats (float32: 1.2e-5) the dtype's rounding over a solve of ~100 steps
      is of the order of the target.
    """
    eps = torch.finfo(dtype).eps
    if config.accuracy is not None:
        if hutchinson:
            raise ValueError(
                "accuracy= controls the ODE solver's error, not the Hutchinson probes' noise "
                "(which no tolerance reduces): use an exact estimator (estimator=None or "
                "cnftools.Exact()), or set rtol/atol and read the probes' standard error in "
                "result.stderr"
            )
        if config.accuracy < 100 * eps:
            raise ValueError(
                f"accuracy={config.accuracy:g} nats is below what {dtype} can reach "
                f"(100 x its machine epsilon = {100 * eps:.2g}): use float64 data, or accuracy >= "
                f"{100 * eps:.2g}"
            )
        return
    if config.is_adaptive and config.rtol + config.atol < 4 * eps:
        raise ValueError(
            f"rtol={config.rtol:g} and atol={config.atol:g} are below {dtype}'s rounding (machine "
            f"epsilon {eps:.2g}): no step size can meet them; use rtol + atol >= {4 * eps:.2g}"
            + (" or float64 data" if dtype != torch.float64 else "")
        )


class SolverKeywords(TypedDict, total=False):
    """The keyword sugar of every solving entry point (``**solver``), merged over ``config=`` by
    :func:`resolve_config`: the same four names everywhere. Everything else is said in the
    :class:`SolverConfig` (``steps``, ``adjoint``, ``max_steps``, ``first_step``,
    ``error_estimate``)."""

    method: str
    rtol: float
    atol: float
    accuracy: float


SOLVER_KEYWORDS = tuple(SolverKeywords.__annotations__)
"""The names of :class:`SolverKeywords`, in order."""


def resolve_config(
    config: SolverConfig | None = None, /, **keywords: Unpack[SolverKeywords]
) -> SolverConfig:
    """The one merge rule of the solver keywords (thin sugar) over a :class:`SolverConfig`.

    Every public entry point that solves an ODE (:func:`cnftools.log_likelihood`,
    :func:`cnftools.sample_with_log_prob`, :func:`cnftools.sample`, :func:`cnftools.dataset_nll`,
    the ``cnftools nll`` command) merges its keywords here, and nowhere else:

    1. Start from ``config`` (the defaults of :class:`SolverConfig` when ``None``).
    2. A keyword given (not ``None``) replaces the config's field of the same name; a keyword
       left at ``None`` keeps the config's value.
    3. An adaptive ``method`` keyword drops the config's grid (an adaptive method has none); a
       fixed-grid method needs its ``steps`` in the config.
    4. ``accuracy`` chooses method and tolerances itself: it cannot be given together with the
       ``method``, ``rtol`` or ``atol`` keywords.

    Everything else (``steps``, ``adjoint``, ``max_steps``, ``first_step``, ``error_estimate``)
    is said in the config only. The result is validated like any :class:`SolverConfig`.

    Raises:
        TypeError: ``config`` is not a :class:`SolverConfig`.
        ValueError: the clash of rule 4, or a merged configuration that is not valid.

    Example:
        >>> base = SolverConfig("rk4", steps=8)
        >>> resolve_config(base, method="dopri5", rtol=1e-8).steps is None
        True
        >>> resolve_config(None, accuracy=1e-6).accuracy
        1e-06
    """
    if config is not None and not isinstance(config, SolverConfig):
        raise TypeError(
            f"config must be a cnftools.SolverConfig, got {type(config).__name__} (build one: "
            "SolverConfig(method=..., rtol=..., steps=..., adjoint=...))"
        )
    unknown = sorted(set(keywords) - set(SOLVER_KEYWORDS))
    if unknown:
        fields = {f.name for f in dataclasses.fields(SolverConfig)}
        in_config = [name for name in unknown if name in fields]
        hint = (
            f"; {in_config} {'is a setting' if len(in_config) == 1 else 'are settings'} of the "
            f"config: pass config=SolverConfig(..., {in_config[0]}=...)"
            if in_config
            else ""
        )
        names = ", ".join(repr(name) for name in unknown)
        raise TypeError(
            f"unexpected keyword argument{'s' if len(unknown) > 1 else ''} {names}: the solver "
            f"keywords are {list(SOLVER_KEYWORDS)}{hint}"
        )
    base = config if config is not None else SolverConfig()
    changes: dict[str, object] = {k: v for k, v in keywords.items() if v is not None}
    method, accuracy = keywords.get("method"), keywords.get("accuracy")
    if accuracy is not None and len(changes) > 1:
        clash = sorted(set(changes) - {"accuracy"})
        raise ValueError(
            f"accuracy= chooses the method and tolerances itself; do not also give {clash}"
        )
    if not changes:
        return base
    if method is not None and method in ADAPTIVE_METHODS:  # rule 3
        changes["steps"] = None
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# The solve


def row_norm(n_point: int) -> Callable[[Tensor], Tensor]:
    """Each row's error ratio ``(B,)`` of scaled errors ``(B, n)``: the RMS of the first
    ``n_point`` columns (the point) and, apart, of the rest (the log-density columns); the larger.

    Example:
        >>> e = torch.tensor([[3.0, 4.0, 0.5], [0.0, 0.0, 2.0]])
        >>> row_norm(2)(e).tolist()
        [3.535533905029297, 2.0]
    """

    def norm(error: Tensor) -> Tensor:
        point = error[:, :n_point].pow(2).mean(dim=1).sqrt()
        if error.shape[1] == n_point:
            return point
        return torch.maximum(point, error[:, n_point:].pow(2).mean(dim=1).sqrt())

    return norm


Progress = Callable[[float, int], None]
"""``progress(t_reached, evaluations)``, called after every step of a solve."""


def integrate(
    f: Dynamics,
    y0: Tensor,
    times: Tensor,
    config: SolverConfig,
    *,
    n_point: int,
    params: Sequence[Tensor] = (),
    nfe: NFE | None = None,
    phase: str = "forward",
    context: str = "ODE solve",
    progress: Progress | None = None,
    compact: bool = True,
    shared_steps: bool = False,
) -> Tensor:
    r"""Integrate :math:`dy/dt = f(t, y)` from ``times[0]`` through ``times[1:]``, row by row.

    Differentiable in ``y0`` and ``params``: by direct backpropagation through the loop, or, with
    ``config.adjoint``, by checkpointed replay of the same steps (only when gradients are enabled
    and something requires them).

    Args:
        f: the dynamics ``f(t, y, rows)`` (see :data:`cnftools._runge_kutta.Dynamics`): ``t`` and
            ``y`` hold the rows ``rows`` of the batch (``None``: all, in order).
        y0: the initial state, shape ``(B, n)``.
        times: 1-D, strictly monotone (increasing or decreasing) output times; ``times[0]`` is the
            start.
        config: the solver configuration.
        n_point: the first ``n_point`` columns of ``y`` are the point, the rest extra quantities
            (normed separately by the error norm, :func:`row_norm`).
        params: tensors the dynamics depends on that need gradients with ``config.adjoint``.
        nfe: counter to update (a new one if ``None``).
        phase: ``"forward"`` or ``"estimate"``: which counter the evaluations go to.
        context: what is being solved, for error messages.
        progress: called after every step with the time reached and the evaluations so far.
        compact: let finished rows leave the evaluated batch (``False``: ``f`` always gets every
            row, for dynamics that cannot be evaluated on part of the batch).
        shared_steps: one step for the whole batch (for dynamics that take one time for all rows).

    Returns:
        The states at ``times``, shape ``(len(times), B, n)``.

    Raises:
        SolverError: non-finite dynamics (naming the rows), step-size underflow, too many steps.
    """
    if y0.dim() != 2:
        raise ValueError(f"the ODE state must have shape (B, n), got {tuple(y0.shape)}")
    counter = nfe if nfe is not None else NFE()
    field_name = "estimate" if phase == "estimate" else "forward"

    def count() -> None:
        setattr(counter, field_name, getattr(counter, field_name) + 1)

    def counted_backward(t: Tensor, y: Tensor, rows: Tensor | None) -> Tensor:
        counter.backward += 1
        return f(t, y, rows)

    on_step = None if progress is None else (lambda reached: progress(reached, counter.total))
    output_times = [float(s) for s in times.tolist()]
    stepping = Stepping(
        rtol=config.rtol,
        atol=config.atol,
        norm=row_norm(n_point),
        steps_per_unit=config.steps,
        max_steps=config.max_steps,
        first_step=config.first_step,
        compact=compact,
        shared_steps=shared_steps,
    )

    def run(start: Tensor, record: StepRecord | None = None) -> Tensor:
        return solve(
            f, start, output_times, config.method, stepping,
            on_evaluation=count, on_step=on_step, record=record,
        )  # fmt: skip

    wants_replay = (
        config.adjoint
        and torch.is_grad_enabled()
        and (y0.requires_grad or any(p.requires_grad for p in params))
    )
    try:
        if wants_replay:
            return solve_with_replay(run, counted_backward, config.method, y0, tuple(params))
        return run(y0)
    except StepFailure as failure:
        raise _solver_error(failure, context, config, y0.dtype) from None


def _advice(dtype: torch.dtype | None) -> str:
    first = "a looser tolerance (rtol/atol)"
    if dtype is not None and dtype != torch.float64:
        first = "float64, " + first
    return f"try {first} or a fixed-grid method (e.g. method='rk4', steps=100)"


def _solver_error(
    failure: StepFailure,
    context: str,
    config: SolverConfig | None = None,
    dtype: torch.dtype | None = None,
) -> SolverError:
    """The one wording of a failed solve (``config`` and ``dtype`` shape the advice)."""
    detail = str(failure)
    advice = _advice(dtype)
    if failure.kind in ("nonfinite_field", "nonfinite_state"):
        assert failure.rows is not None
        rows = _format_rows_list(failure.rows)
        where = f", {detail}" if detail else ""
        if failure.kind == "nonfinite_field":
            return SolverError(
                f"{context}: the field (or its divergence) returned non-finite values (NaN or "
                f"inf) for batch rows {rows}{where}; check the field at those inputs, or {advice}"
            )
        return SolverError(
            f"{context}: the solution became non-finite (NaN or inf) in batch rows {rows}{where}: "
            f"the solver is unstable on this field (steps too large for how fast it changes, or "
            f"the solution blows up); {advice}"
        )
    assert config is not None
    settings = f"method={config.method!r}, rtol={config.rtol:g}, atol={config.atol:g}"
    rows = "" if failure.rows is None else f" in batch rows {_format_rows_list(failure.rows)}"
    if failure.kind == "underflow":
        return SolverError(
            f"{context}: the adaptive step size underflowed ({detail}){rows} with {settings}, "
            f"dtype={dtype}: the field is too stiff or singular for these tolerances; {advice}"
        )
    return SolverError(
        f"{context}: more than max_steps={config.max_steps} steps ({detail}){rows} with "
        f"{settings}; raise max_steps, or {advice}"
    )


def _format_rows_list(rows: Tensor) -> str:
    text = str(rows[:10].tolist())
    return text if rows.numel() <= 10 else f"{text} (and {rows.numel() - 10} more)"
