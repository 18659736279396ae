"""Tests of cnftools._runge_kutta, the one Runge–Kutta loop every solve runs (rows on their own steps).

Reference solutions are closed forms written here, independent of the code under test: a linear
system dy/dt = A y has y(t) = expm(t A) y(0) (scipy's ``expm``), and dy/dt = a(t) y has
y(1) = y(0) exp(∫_0^1 a). torchdiffeq's ``odeint`` with the same method is the peer.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchdiffeq import odeint

import cnftools._runge_kutta as runge_kutta
from cnftools._ode import ADAPTIVE_METHODS, NFE, SolverConfig, integrate, row_norm
from cnftools._runge_kutta import StepController, StepFailure, solve

F64 = torch.float64


def _rate(t: torch.Tensor) -> torch.Tensor:
    """a(t) = 0.5 + cos(3 t); ∫_0^1 a = 0.5 + sin(3) / 3."""
    return 0.5 + torch.cos(3 * t)


EXACT_GROWTH = math.exp(0.5 + math.sin(3.0) / 3)


def _solve(f, y0, times, method="dopri5", tol=1e-8, max_steps=10_000, count=None):
    """``f(t, y)`` with ``t`` of shape ``(b,)``; the loop's ``rows`` argument is dropped."""
    return solve(
        lambda t, y, rows: f(t, y),
        y0,
        times,
        method,
        rtol=tol,
        atol=tol,
        norm=row_norm(y0.shape[1]),
        max_steps=max_steps,
        on_evaluation=count,
    )


def _scalar_rate(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _rate(t)[:, None] * y


def _rotation_system(dim: int, seed: int) -> np.ndarray:
    """A = skew + small symmetric part: oscillating, mildly growing/decaying (non-stiff)."""
    rng = np.random.default_rng(seed)
    m = rng.standard_normal((dim, dim))
    return 2.0 * (m - m.T) / 2 + 0.2 * (m + m.T) / 2


# ----------------------------------------------------------------------------------------------
# Accuracy


@pytest.mark.parametrize("method", sorted(ADAPTIVE_METHODS))
def test_every_method_meets_its_tolerance_on_a_linear_system(method: str) -> None:
    """dy/dt = A y, y(1) = expm(A) y0. Global error of a tolerance-controlled solve is a small
    multiple of the tolerance (error per unit step times the number of steps): 100x allows it.
    fehlberg2's embedded estimate h (k3 - k1) / 512 underestimates its error by 2-3 orders (the
    same in torchdiffeq: 450-500x measured at tolerances 1e-4 ... 1e-6), so it gets 1000x."""
    a = _rotation_system(4, seed=1)
    matrix = torch.tensor(a, dtype=F64)
    y0 = torch.tensor(np.random.default_rng(2).standard_normal((3, 4)), dtype=F64)
    tol = 1e-5 if method in ("adaptive_heun", "fehlberg2") else 1e-9
    multiple = 1000 if method == "fehlberg2" else 100
    states = _solve(lambda t, y: y @ matrix.T, y0, [0.0, 1.0], method, tol)
    exact = y0 @ torch.tensor(scipy.linalg.expm(a), dtype=F64).T
    bound = multiple * tol * float(exact.abs().max())
    assert torch.allclose(states[-1], exact, rtol=0, atol=bound)


@given(
    seed=st.integers(0, 2**16),
    dim=st.integers(1, 6),
    tol_exponent=st.integers(4, 10),
    reverse=st.booleans(),
)
def test_property_linear_systems_forward_and_backward(
    seed: int, dim: int, tol_exponent: int, reverse: bool
) -> None:
    """Any non-stiff linear system, either direction, intermediate outputs: every output state
    is within 100 x tol (relative to the solution's size) of expm; the tolerance argument as in
    the test above."""
    a = _rotation_system(dim, seed)
    matrix = torch.tensor(a, dtype=F64)
    y0 = torch.tensor(np.random.default_rng(seed + 1).standard_normal((2, dim)), dtype=F64)
    times = [1.0, 0.55, 0.0] if reverse else [0.0, 0.3, 1.0]
    tol = 10.0**-tol_exponent
    states = _solve(lambda t, y: y @ matrix.T, y0, times, tol=tol)
    for time, state in zip(times, states, strict=True):
        exact = y0 @ torch.tensor(scipy.linalg.expm((time - times[0]) * a), dtype=F64).T
        scale = max(1.0, float(exact.abs().max()))
        assert float((state - exact).abs().max()) <= 100 * tol * scale


@pytest.mark.parametrize("method", ["dopri5", "dopri8", "bosh3"])
def test_same_work_and_accuracy_as_torchdiffeq(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """With the plain controller (beta = 0, as torchdiffeq) and one row (so both norms are the
    same RMS), the loop is torchdiffeq's controller without the dense output: it takes the same
    steps (evaluations within 5%) and is as accurate (error within a factor 2). The first-same-
    as-last pairs only: the two low-order non-FSAL pairs evaluate a fresh first stage here (one
    more evaluation per step than torchdiffeq's reuse of the last stage)."""
    monkeypatch.setitem(runge_kutta.CONTROLLERS, "dopri5", StepController())
    y0 = torch.tensor([[1.0]], dtype=F64)
    tol = 1e-8
    ours = {"n": 0}

    def count() -> None:
        ours["n"] += 1

    theirs = {"n": 0}

    def f_counted(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        theirs["n"] += 1
        return _rate(t) * y

    lean = _solve(_scalar_rate, y0, [0.0, 1.0], method, tol, count=count)[-1]
    peer = odeint(
        f_counted, y0, torch.tensor([0.0, 1.0], dtype=F64), rtol=tol, atol=tol, method=method
    )[-1]
    exact = y0 * EXACT_GROWTH
    lean_error, peer_error = float((lean - exact).abs().max()), float((peer - exact).abs().max())
    assert lean_error <= 2 * peer_error + 1e-15, (lean_error, peer_error)
    assert abs(ours["n"] - theirs["n"]) <= 0.05 * theirs["n"] + 1, (ours, theirs)


def test_float32_meets_a_float32_tolerance() -> None:
    """float32: tolerance 1e-5 (float32 rounding, ~6e-8 per operation, stays far below it)."""
    y0 = torch.tensor([[1.0], [-2.0]], dtype=torch.float32)
    states = _solve(_scalar_rate, y0, [0.0, 1.0], tol=1e-5)
    assert states[-1].dtype == torch.float32
    assert torch.allclose(states[-1], y0 * EXACT_GROWTH, rtol=1e-3, atol=0)


# ----------------------------------------------------------------------------------------------
# Where the field is evaluated


@pytest.mark.parametrize("times", [[0.0, 1.0], [0.0, 0.25, 0.6, 1.0], [1.0, 0.4, 0.0]])
def test_evaluations_stay_inside_the_interval_and_land_on_outputs(times: list[float]) -> None:
    """No stage (the first-step probe included) is evaluated outside the output interval, even
    when the field is tiny at the start (the heuristic then proposes a huge first step, seen as
    t = 22 for VP's field), and every output time is a step end (evaluated exactly there)."""
    seen: list[float] = []

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.extend(t.tolist())
        return 1e-9 * (1 + t[:, None]) * torch.ones_like(y)

    _solve(f, torch.zeros(2, 1, dtype=F64), times, tol=1e-6)
    low, high = min(times), max(times)
    assert all(low <= s <= high for s in seen), (min(seen), max(seen))
    assert set(times[1:]) <= set(seen)


def test_intermediate_outputs_are_steps_not_interpolations() -> None:
    """The value at 0.3 of a solve through [0, 0.3, 1] equals a solve that ends at 0.3."""
    y0 = torch.ones(1, 1, dtype=F64)

    through = _solve(_scalar_rate, y0, [0.0, 0.3, 1.0])
    ending = _solve(_scalar_rate, y0, [0.0, 0.3])
    assert float(through[1]) == float(ending[-1])


def test_gradients_flow_through_the_loop() -> None:
    """Direct backpropagation: y(1) = y0 exp(∫a) for a(t) = c (0.5 + cos 3t), so
    d y(1)/d y0 = G and d y(1)/d c = y0 G ∫(0.5 + cos 3t) (solve error ~1e-10 at tol 1e-10)."""
    y0 = torch.tensor([[1.5]], dtype=F64, requires_grad=True)
    c = torch.tensor(0.8, dtype=F64, requires_grad=True)
    integral = 0.5 + math.sin(3.0) / 3
    y1 = _solve(lambda t, y: c * _scalar_rate(t, y), y0, [0.0, 1.0], tol=1e-10)[-1].sum()
    grad_y0, grad_c = torch.autograd.grad(y1, (y0, c))
    growth = math.exp(0.8 * integral)
    assert float(grad_y0) == pytest.approx(growth, rel=1e-8)
    assert float(grad_c) == pytest.approx(1.5 * growth * integral, rel=1e-8)


def test_integrate_uses_the_loop_for_adaptive_forward_solves() -> None:
    """One evaluation per stage: dopri5 is 6 per step plus the first stage and one probe, and no
    dense-output or bookkeeping evaluations; nfe is counted in its phase."""
    nfe = NFE()
    integrate(
        lambda t, y, rows: -y,
        torch.ones(2, 1, dtype=F64),
        torch.tensor([0.0, 1.0], dtype=F64),
        SolverConfig(rtol=1e-6, atol=1e-6),
        n_point=1,
        nfe=nfe,
        phase="estimate",
    )
    assert nfe.forward == 0 and nfe.estimate > 0
    assert (nfe.estimate - 2) % 6 == 0, nfe


# ----------------------------------------------------------------------------------------------
# Failures


def test_nan_from_the_field_names_rows_and_step() -> None:
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rows = torch.arange(y.shape[0])[:, None]
        return torch.where((rows == 2) & (t[:, None] > 0.5), torch.nan, -y)

    with pytest.raises(StepFailure) as info:
        _solve(f, torch.ones(4, 2, dtype=F64), [0.0, 1.0])
    assert info.value.kind == "nonfinite_field"
    assert info.value.rows.tolist() == [2]
    assert 0.0 <= info.value.time <= 1.0


def test_blow_up_is_a_nonfinite_state_not_a_hang() -> None:
    """dy/dt = y^2 from y0 = 1e200 overflows float64 within the first step."""

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y * y

    with pytest.raises(StepFailure) as info:
        _solve(f, torch.full((3, 1), 1e200, dtype=F64), [0.0, 1.0])
    assert info.value.kind in ("nonfinite_state", "nonfinite_field")
    assert info.value.rows.tolist() == [0, 1, 2]


def test_max_steps_counts_attempts_per_output_interval() -> None:
    def rough(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(y) / (0.5 - t[:, None]).abs().sqrt()

    with pytest.raises(StepFailure, match="max_steps=20") as info:
        _solve(rough, torch.zeros(1, 1, dtype=F64), [0.0, 1.0], max_steps=20)
    assert info.value.kind == "max_steps"


def test_underflow_is_reported() -> None:
    def singular(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(y) / (0.5 - t[:, None]) ** 2

    with pytest.raises(StepFailure) as info:
        _solve(singular, torch.zeros(1, 1, dtype=F64), [0.0, 1.0], tol=1e-5, max_steps=10**6)
    assert info.value.kind in ("underflow", "nonfinite_field")


@pytest.mark.parametrize(("method", "tol"), [("dopri8", 1e-4), ("dopri5", 1e-6)])
def test_first_growth_saves_steps_without_losing_accuracy(
    monkeypatch: pytest.MonkeyPatch, method: str, tol: float
) -> None:
    """A likelihood-shaped system, solved from t = 1 to 0: a point x' = -(0.5 + t) x and an
    accumulator A' = 10 (1 + t) starting at 0, so x(0) = e x(1) and A(0) = -15. The zero start of
    A makes the heuristic's first step far too small (its scale is atol alone); letting the next
    step grow up to first_growth instead of max_growth takes fewer evaluations, and the global
    error still meets the 100 x tol x scale bound of the tests above."""
    point = torch.tensor([[1.0, -0.5, 2.0]], dtype=F64)  # one row: its own steps are counted
    y1 = torch.cat([point, torch.zeros(1, 1, dtype=F64)], dim=1)

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t[:, None]
        return torch.cat([-(0.5 + tt) * y[:, :3], 10 * (1 + tt) * torch.ones_like(y[:, 3:])], 1)

    exact = torch.cat([point * math.e, torch.full((1, 1), -15.0, dtype=F64)], dim=1)

    def run() -> tuple[int, float]:
        count = {"n": 0}

        def counted() -> None:
            count["n"] += 1

        end = _solve(f, y1, [1.0, 0.0], method, tol, count=counted)[-1]
        return count["n"], float((end - exact).abs().max())

    fast, fast_error = run()
    controller = runge_kutta.CONTROLLERS.get(method, StepController())
    capped_controller = StepController(beta=controller.beta, first_growth=controller.max_growth)
    monkeypatch.setitem(runge_kutta.CONTROLLERS, method, capped_controller)
    capped, _ = run()
    assert fast < capped, (fast, capped)
    assert fast_error <= 100 * tol * 15


def test_dopri5_uses_the_stabilized_controller() -> None:
    """dopri5 carries Hairer and Wanner's beta = 0.04; the others the plain controller."""
    assert runge_kutta.CONTROLLERS["dopri5"].beta == 0.04
    assert "dopri8" not in runge_kutta.CONTROLLERS


# ----------------------------------------------------------------------------------------------
# Rows on their own steps


def _stiff_rows(rates: torch.Tensor):
    def f(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        r = rates if rows is None else rates[rows]
        return -r * (y - torch.cos(t[:, None]))

    return f


@given(
    seed=st.integers(0, 2**16),
    size=st.integers(1, 9),
    method=st.sampled_from(["dopri5", "dopri8", "bosh3"]),
)
def test_property_a_row_does_not_depend_on_its_batch(seed: int, size: int, method: str) -> None:
    """Rows of random stiffness (rates 0.1 ... 100): every row of a batch ends bit for bit where
    it ends alone (the dynamics here are elementwise, so its arithmetic is the same too)."""
    gen = torch.Generator().manual_seed(seed)
    rates = 10 ** (torch.rand(size, 1, generator=gen, dtype=F64) * 3 - 1)
    y0 = torch.randn(size, 2, generator=gen, dtype=F64)
    norm = row_norm(2)
    batch = solve(_stiff_rows(rates), y0, [0.0, 0.5, 1.0], method, rtol=1e-7, atol=1e-7, norm=norm)
    for i in range(size):
        alone = solve(
            _stiff_rows(rates[i : i + 1]),
            y0[i : i + 1],
            [0.0, 0.5, 1.0],
            method,
            rtol=1e-7,
            atol=1e-7,
            norm=norm,
        )
        assert torch.equal(batch[:, i], alone[:, 0])


def test_rows_get_the_steps_they_need() -> None:
    """A stiff row (rate 100) and an easy one (rate 1): the easy row finishes after few steps and
    leaves the batch; the loop's evaluations of it are far fewer than of the stiff row."""
    rates = torch.tensor([[1.0], [100.0]], dtype=F64)
    evaluated = {0: 0, 1: 0}
    inner = _stiff_rows(rates)

    def f(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        for r in range(2) if rows is None else rows.tolist():
            evaluated[r] += 1
        return inner(t, y, rows)

    solve(
        f,
        torch.zeros(2, 1, dtype=F64),
        [0.0, 1.0],
        "dopri5",
        rtol=1e-8,
        atol=1e-8,
        norm=row_norm(1),
    )
    assert evaluated[0] < evaluated[1] / 2, evaluated


def test_fixed_grid_gradients_and_outputs() -> None:
    """rk4 on dy/dt = c y: y(1) ≈ y0 e^c with error ~(h^4) = 1e-8 at 100 steps; gradients through
    the loop equal the closed-form derivatives to the same accuracy."""
    y0 = torch.tensor([[1.5]], dtype=F64, requires_grad=True)
    c = torch.tensor(0.8, dtype=F64, requires_grad=True)
    states = solve(lambda t, y, rows: c * y, y0, [0.0, 0.5, 1.0], "rk4", steps_per_unit=100)
    assert float(states[1, 0, 0].detach()) == pytest.approx(1.5 * math.exp(0.4), rel=1e-9)
    grad_y0, grad_c = torch.autograd.grad(states[-1].sum(), (y0, c))
    assert float(grad_y0) == pytest.approx(math.exp(0.8), rel=1e-9)
    assert float(grad_c) == pytest.approx(1.5 * math.exp(0.8), rel=1e-9)


def test_shared_steps_give_every_row_one_time_and_the_tolerance() -> None:
    """shared_steps (for models of one time per batch): every call sees one time for all rows,
    the stiff row's steps are everyone's, and every row meets the tolerance (100 x tol)."""
    rates = torch.tensor([[1.0], [30.0]], dtype=F64)
    inner = _stiff_rows(rates)
    times_seen: list[int] = []

    def f(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        times_seen.append(len(set(t.tolist())))
        return inner(t, y, rows)

    y0 = torch.zeros(2, 1, dtype=F64)
    out = solve(
        f, y0, [0.0, 1.0], "dopri5", rtol=1e-8, atol=1e-8, norm=row_norm(1), shared_steps=True
    )
    assert set(times_seen) == {1}
    alone = solve(inner, y0, [0.0, 1.0], "dopri5", rtol=1e-10, atol=1e-10, norm=row_norm(1))
    assert float((out[-1] - alone[-1]).abs().max()) <= 100 * 1e-8
