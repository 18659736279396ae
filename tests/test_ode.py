"""Tests of cnftools._ode: solver configuration, NFE counting, grids, error norms and failures.

Reference solutions are closed forms of scalar linear ODEs, written here independently of the code
under test: dy/dt = a(t) y has y(1) = y(0) exp(∫_0^1 a), and dy/dt = ω cos(ω t) has y = sin(ω t).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cnftools._ode import (
    ADAPTIVE_METHODS,
    FIXED_GRID_METHODS,
    NFE,
    SolverConfig,
    SolverError,
    integrate,
    resolve_config,
)

F64 = torch.float64


def _rate(t: torch.Tensor) -> torch.Tensor:
    """a(t) = 0.5 + cos(3 t); ∫_0^1 a = 0.5 + sin(3) / 3."""
    return 0.5 + torch.cos(3 * t)


EXACT_GROWTH = math.exp(0.5 + math.sin(3.0) / 3)


def _linear(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    return _rate(t)[:, None] * y


def _solve(config: SolverConfig, y0: torch.Tensor, nfe: NFE | None = None) -> torch.Tensor:
    times = torch.tensor([0.0, 1.0], dtype=y0.dtype)
    return integrate(_linear, y0, times, config, n_point=y0.shape[1], nfe=nfe)[-1]


# ----------------------------------------------------------------------------------------------
# SolverConfig validation


def test_defaults_are_adaptive_dopri5() -> None:
    config = SolverConfig()
    assert (config.method, config.rtol, config.atol, config.is_adaptive) == (
        "dopri5",
        1e-5,
        1e-5,
        True,
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "rk45"}, ValueError, "method must be one of"),
        ({"method": "rk4"}, ValueError, r"'rk4' needs steps \(e\.g\. steps=20"),
        ({"method": "dopri5", "steps": 10}, ValueError, "steps applies to fixed-grid methods"),
        ({"method": "euler", "steps": 0}, ValueError, "steps must be an int >= 1"),
        ({"method": "euler", "steps": 2.5}, ValueError, "steps must be an int >= 1"),
        ({"method": "euler", "steps": True}, ValueError, "steps must be an int >= 1"),
        ({"error_estimate": 1}, TypeError, "error_estimate must be a bool"),
        ({"accuracy": 0.0}, ValueError, "accuracy must be > 0"),
        ({"first_step": 0.0}, ValueError, "first_step must be > 0"),
        ({"rtol": -1.0}, ValueError, "rtol"),
        ({"rtol": 0.0, "atol": 0.0}, ValueError, "both be 0"),
        ({"atol": float("nan")}, ValueError, "atol"),
        ({"rtol": "1e-5"}, TypeError, "rtol"),
        ({"max_steps": 0}, ValueError, "max_steps"),
        ({"adjoint": 1}, TypeError, "adjoint"),
    ],
)
def test_invalid_configurations_are_errors(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SolverConfig(**kwargs)


def test_unknown_option_is_an_error_not_a_warning() -> None:
    with pytest.raises(TypeError, match="unexpected keyword"):
        SolverConfig(method="dopri5", safety=0.5)  # type: ignore[call-arg]


def test_step_size_and_n_steps_are_gone() -> None:
    """0.2: the grid is said by ``steps`` only; ``step_size=`` and ``.n_steps`` are gone."""
    with pytest.raises(TypeError, match="step_size"):
        SolverConfig("rk4", step_size=0.25)  # type: ignore[call-arg]
    config = SolverConfig("rk4", steps=4)
    assert config.steps == 4
    assert not hasattr(config, "n_steps")


def test_replace_revalidates_and_refined_tightens() -> None:
    config = SolverConfig("dopri5", rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="method"):
        config.replace(method="nope")
    refined = config.refined()
    assert (refined.rtol, refined.atol) == pytest.approx((1e-8, 1e-10))
    assert SolverConfig("midpoint", steps=4).refined().steps == 8


_ADAPTIVE = SolverConfig("dopri5", rtol=1e-7, atol=1e-7)
_GRID = SolverConfig("rk4", steps=8)
_ADJOINT = SolverConfig(adjoint=True, error_estimate=True)

# The merge rule of resolve_config, case by case: (config, keywords, expected fields of the result).
_MERGE_CASES = [
    # rule 1: no config means the defaults
    (None, {}, {"method": "dopri5", "rtol": 1e-5, "atol": 1e-5, "steps": None}),
    # rule 2: a keyword given overrides its field, the others keep the config's value
    (_ADAPTIVE, {"rtol": 1e-9}, {"rtol": 1e-9, "atol": 1e-7, "method": "dopri5"}),
    (_ADAPTIVE, {"atol": 1e-9}, {"rtol": 1e-7, "atol": 1e-9, "method": "dopri5"}),
    (_ADJOINT, {"rtol": 1e-9}, {"adjoint": True, "error_estimate": True, "rtol": 1e-9}),
    # the grid is said in the config: a fixed-grid method keyword keeps it
    (_GRID, {"method": "euler"}, {"method": "euler", "steps": 8}),
    (_GRID, {"rtol": 1e-3}, {"method": "rk4", "steps": 8, "rtol": 1e-3}),
    # rule 3: an adaptive method drops the grid
    (_GRID, {"method": "dopri5"}, {"method": "dopri5", "steps": None}),
    (_GRID, {"method": "dopri8", "rtol": 1e-9}, {"method": "dopri8", "steps": None, "rtol": 1e-9}),
    # accuracy alone is a keyword like the others
    (_ADAPTIVE, {"accuracy": 1e-6}, {"accuracy": 1e-6, "rtol": 1e-7}),
]


@pytest.mark.parametrize(("config", "keywords", "expected"), _MERGE_CASES)
def test_resolve_config_merge_rule(
    config: SolverConfig | None, keywords: dict, expected: dict
) -> None:
    merged = resolve_config(config, **keywords)
    assert {name: getattr(merged, name) for name in expected} == expected


@pytest.mark.parametrize("config", [None, _ADAPTIVE, _GRID])
def test_resolve_config_without_keywords_returns_the_config(config: SolverConfig | None) -> None:
    none_given = dict.fromkeys(("method", "rtol", "atol", "accuracy"))
    merged = resolve_config(config, **none_given)
    assert merged == (config if config is not None else SolverConfig())


# The errors of the rule: (config, keywords, error, message).
_MERGE_ERRORS = [
    (_ADAPTIVE, {"method": "euler"}, ValueError, "'euler' needs steps"),  # a grid method, no grid
    # 0.2: the grid, adjoint and error estimate are said in the config only
    (None, {"steps": 8}, TypeError, "steps"),
    (_GRID, {"step_size": 0.1}, TypeError, "step_size"),
    (None, {"adjoint": True}, TypeError, "adjoint"),
    (None, {"accuracy": 1e-6, "rtol": 1e-8}, ValueError, r"do not also give \['rtol'\]"),
    (None, {"accuracy": 1e-6, "method": "rk4", "atol": 1e-3}, ValueError, r"\[.atol., .method.\]"),
    ({"method": "rk4"}, {}, TypeError, r"config must be a cnftools\.SolverConfig"),
]


@pytest.mark.parametrize(("config", "keywords", "error", "message"), _MERGE_ERRORS)
def test_resolve_config_merge_errors(
    config: object, keywords: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        resolve_config(config, **keywords)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Accuracy and convergence order


@pytest.mark.parametrize("method", sorted(ADAPTIVE_METHODS))
def test_adaptive_methods_meet_tight_tolerance(method: str) -> None:
    y0 = torch.tensor([[1.0], [-2.0]], dtype=F64)
    tol = 1e-6 if method in ("adaptive_heun", "fehlberg2") else 1e-10
    y1 = _solve(SolverConfig(method, rtol=tol, atol=tol), y0)
    # Global error of a tolerance-controlled solve is a small multiple of the tolerance.
    assert torch.allclose(y1, y0 * EXACT_GROWTH, rtol=100 * tol, atol=0)


@pytest.mark.parametrize(("method", "order"), sorted(FIXED_GRID_METHODS.items()))
def test_fixed_grid_convergence_order(method: str, order: int) -> None:
    y0 = torch.ones(1, 1, dtype=F64)
    steps = np.array([20, 40, 80, 160])
    errors = [
        abs(float(_solve(SolverConfig(method, steps=int(n)), y0)) - EXACT_GROWTH) for n in steps
    ]
    slope = np.polyfit(np.log(1 / steps), np.log(errors), 1)[0]
    # The observed order approaches the theoretical one as h -> 0; ±0.2 allows the
    # pre-asymptotic curvature at h = 1/20.
    assert abs(slope - order) < 0.2, (errors, slope)


@pytest.mark.parametrize(("method", "per_step"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_grid_nfe_is_stages_times_steps(method: str, per_step: int) -> None:
    nfe = NFE()
    _solve(SolverConfig(method, steps=7), torch.ones(3, 2, dtype=F64), nfe)
    assert (nfe.forward, nfe.backward, nfe.total) == (7 * per_step, 0, 7 * per_step)


def test_fixed_grid_output_times_are_grid_points() -> None:
    # The grid of 4 steps gets 0.3 added: outputs are solver states, not interpolations, so the
    # value at 0.3 is the one a solve ending at 0.3 gives.
    y0 = torch.ones(1, 1, dtype=F64)
    config = SolverConfig("rk4", steps=4)
    times = torch.tensor([0.0, 0.3, 1.0], dtype=F64)
    sol = integrate(_linear, y0, times, config, n_point=1)
    direct = integrate(_linear, y0, torch.tensor([0.0, 0.3], dtype=F64), config, n_point=1)
    assert float(sol[1]) == float(direct[-1])


def test_every_row_meets_the_tolerance_on_its_own_steps() -> None:
    # One hard row (ω = 20) among 63 trivial ones (ω = 0): each row is controlled by its own error,
    # so the hard row meets the tolerance as if alone, and its result is the one it gets alone.
    batch = 64
    omega = torch.zeros(batch, 1, dtype=F64)
    omega[0] = 20.0

    def f(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        w = omega if rows is None else omega[rows]
        return w * torch.cos(w * t[:, None])

    config = SolverConfig(rtol=1e-6, atol=1e-6)
    times = torch.tensor([0.0, 1.0], dtype=F64)
    sol = integrate(f, torch.zeros(batch, 1, dtype=F64), times, config, n_point=1)
    alone = integrate(
        lambda t, y, rows: f(t, y, torch.zeros(1, dtype=torch.long)),
        torch.zeros(1, 1, dtype=F64),
        times,
        config,
        n_point=1,
    )
    # A tolerance-controlled global error is a small multiple of the tolerance (|y| <= 1).
    assert abs(float(sol[-1, 0, 0]) - math.sin(20.0)) < 20 * 1e-6
    # Same steps alone or in the batch: only the field's arithmetic may differ (none here).
    assert float(sol[-1, 0, 0]) == float(alone[-1, 0, 0])
    assert bool((sol[-1, 1:] == 0).all())


def test_finished_rows_leave_the_evaluated_batch() -> None:
    # Rows of very different stiffness: the easy rows finish early and are not evaluated again.
    rates = torch.tensor([[1.0], [1.0], [1.0], [60.0]], dtype=F64)
    sizes: list[int] = []

    def f(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        sizes.append(y.shape[0])
        r = rates if rows is None else rates[rows]
        return r * torch.cos(r * t[:, None])

    integrate(
        f,
        torch.zeros(4, 1, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        SolverConfig(),
        n_point=1,
    )
    assert sizes[0] == 4 and sizes[-1] == 1 and sizes.count(1) > sizes.count(4)


# ----------------------------------------------------------------------------------------------
# Failures are errors that say what to do


def test_step_size_underflow_says_what_to_try() -> None:
    def singular(t: torch.Tensor, y: torch.Tensor, rows: object) -> torch.Tensor:
        return torch.ones_like(y) / (0.5 - t[:, None]) ** 2

    with pytest.raises(SolverError, match="underflow") as info:
        integrate(
            singular,
            torch.zeros(2, 1, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            SolverConfig(rtol=1e-5, atol=1e-5),
            n_point=1,
        )
    message = str(info.value)
    # float64 is already in use: the advice does not suggest it again (issue 21.9)
    assert (
        "looser tolerance" in message and "fixed-grid" in message and "try float64" not in message
    )


def test_too_many_steps_is_an_error() -> None:
    def rough(t: torch.Tensor, y: torch.Tensor, rows: object) -> torch.Tensor:
        return torch.ones_like(y) / (0.5 - t[:, None]).abs().sqrt()

    with pytest.raises(SolverError, match="max_steps=50"):
        integrate(
            rough,
            torch.zeros(1, 1, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            SolverConfig(rtol=1e-8, atol=1e-8, max_steps=50),
            n_point=1,
        )


@pytest.mark.parametrize(
    ("grid", "named"),
    [
        ({"steps": 10**12}, "steps=1000000000000 is more than max_steps=100000"),
        ({"steps": 101, "max_steps": 100}, "steps=101 is more than max_steps=100"),
    ],
)
def test_max_steps_bounds_a_fixed_grid_before_it_is_built(grid: dict, named: str) -> None:
    """Regression (issue 11.8): a grid of 1e12 steps tried to allocate 1e12 points (8 TB). The
    grid length is refused on construction."""
    with pytest.raises(ValueError, match=named):
        SolverConfig("euler", **grid)


def test_max_steps_admits_a_grid_of_exactly_max_steps_and_refined_keeps_it_valid() -> None:
    config = SolverConfig("rk4", steps=100, max_steps=100)
    assert config.steps == 100
    assert config.refined().steps == 200  # an explicit refinement raises the cap with it


@pytest.mark.parametrize("config", [SolverConfig(), SolverConfig("rk4", steps=10)], ids=str)
def test_nan_from_the_field_names_the_rows(config: SolverConfig) -> None:
    def f(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        out = -y
        index = (torch.arange(y.shape[0]) if rows is None else rows)[:, None]
        return torch.where(((index == 1) | (index == 3)) & (t[:, None] > 0.4), torch.nan, out)

    with pytest.raises(SolverError, match=r"rows \[1, 3\]"):
        integrate(
            f,
            torch.ones(5, 2, dtype=F64),
            torch.tensor([0.0, 1.0], dtype=F64),
            config,
            n_point=2,
        )


def test_state_must_be_two_dimensional() -> None:
    with pytest.raises(ValueError, match=r"\(B, n\)"):
        integrate(
            _linear, torch.ones(3, dtype=F64), torch.tensor([0.0, 1.0]), SolverConfig(), n_point=1
        )


@pytest.mark.parametrize(
    ("accuracy", "method", "atol"),
    [
        (1e-3, "dopri5", 1e-4),
        (1e-5, "dopri5", 1e-6),
        (9e-6, "dopri8", 9e-6),
        (1e-8, "dopri8", 1e-8),
    ],
)
def test_accuracy_plan_takes_dopri5_for_loose_targets_and_dopri8_below(
    accuracy: float, method: str, atol: float
) -> None:
    """The plan of ``accuracy=`` (measured by benchmarks/accuracy_plan.py): dopri5 at a tenth of
    targets of 1e-5 and above, dopri8 at the target below; rtol is always atol / 100."""
    plan = SolverConfig(accuracy=accuracy, adjoint=True).accuracy_plan()
    assert plan.method == method and plan.adjoint and plan.steps is None
    assert math.isclose(plan.atol, atol, rel_tol=1e-12)  # one product of floats
    assert math.isclose(plan.rtol, atol / 100, rel_tol=1e-12)


@pytest.mark.parametrize("accuracy", [1e-3, 1e-4])
def test_accuracy_plan_keeps_dopri8_at_the_target_in_float32(accuracy: float) -> None:
    """In float32 the dopri5 plan's estimate was exceeded 3-4 times as often (the field's own
    rounding; benchmarks/accuracy_bound.py): lower precisions keep dopri8 at the target."""
    plan = SolverConfig(accuracy=accuracy).accuracy_plan(torch.float32)
    assert plan.method == "dopri8" and plan.atol == accuracy


def test_accuracy_plan_names_a_dtype_that_is_not_one() -> None:
    with pytest.raises(TypeError, match=r"dtype must be a torch\.dtype"):
        SolverConfig(accuracy=1e-4).accuracy_plan("float32")  # type: ignore[arg-type]
