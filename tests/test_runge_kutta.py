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
from cnftools._runge_kutta import StepController, StepFailure, Stepping, solve

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
        Stepping(rtol=tol, atol=tol, norm=row_norm(y0.shape[1]), max_steps=max_steps),
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
    stepping = Stepping(rtol=1e-7, atol=1e-7, norm=row_norm(2))
    batch = solve(_stiff_rows(rates), y0, [0.0, 0.5, 1.0], method, stepping)
    for i in range(size):
        alone = solve(
            _stiff_rows(rates[i : i + 1]), y0[i : i + 1], [0.0, 0.5, 1.0], method, stepping
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

    solve(f, torch.zeros(2, 1, dtype=F64), [0.0, 1.0], "dopri5", Stepping(1e-8, 1e-8, row_norm(1)))
    assert evaluated[0] < evaluated[1] / 2, evaluated


def test_fixed_grid_gradients_and_outputs() -> None:
    """rk4 on dy/dt = c y: y(1) ≈ y0 e^c with error ~(h^4) = 1e-8 at 100 steps; gradients through
    the loop equal the closed-form derivatives to the same accuracy."""
    y0 = torch.tensor([[1.5]], dtype=F64, requires_grad=True)
    c = torch.tensor(0.8, dtype=F64, requires_grad=True)
    grid = Stepping(steps_per_unit=100)
    states = solve(lambda t, y, rows: c * y, y0, [0.0, 0.5, 1.0], "rk4", grid)
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
    shared = Stepping(rtol=1e-8, atol=1e-8, norm=row_norm(1), shared_steps=True)
    out = solve(f, y0, [0.0, 1.0], "dopri5", shared)
    assert set(times_seen) == {1}
    alone = solve(inner, y0, [0.0, 1.0], "dopri5", Stepping(1e-10, 1e-10, row_norm(1)))
    assert float((out[-1] - alone[-1]).abs().max()) <= 100 * 1e-8


# ----------------------------------------------------------------------------------------------
# The same bits as before: solves whose results, evaluation counts and step counts were stored
# from the loop as it was before it was split into pieces (see _GOLDEN for how). A change to the
# order of any floating-point operation of the loop changes some of these bits.

_GOLDEN_Y0 = ((1.0, -0.5), (0.25, 2.0), (-1.5, 0.75), (0.5, 0.5))
_GOLDEN_RATES = ((0.5,), (5.0,), (50.0,), (500.0,))  # rows of very different stiffness
_GOLDEN_CASES: dict[str, dict] = {
    "dopri5": {"method": "dopri5"},
    "dopri5-no-compaction": {"method": "dopri5", "compact": False},
    "dopri5-shared-steps": {"method": "dopri5", "shared_steps": True},
    # backward in time on the rates' mirror image (stable that way), from a given first step
    "dopri5-backward-first-step": {
        "method": "dopri5",
        "times": (1.0, 0.4, 0.0),
        "first_step": 0.01,
        "rate_sign": -1.0,
    },
    "dopri8": {"method": "dopri8"},
    "bosh3": {"method": "bosh3"},
    "bosh3-no-compaction": {"method": "bosh3", "compact": False},
    # not first-same-as-last: the first stage is evaluated afresh after each accepted step
    "adaptive_heun": {"method": "adaptive_heun", "tol": 1e-4},
    "adaptive_heun-no-compaction": {"method": "adaptive_heun", "tol": 1e-4, "compact": False},
}


def _golden_field(rates: torch.Tensor):
    """dy/dt = -r (y - g(t)) + S y, S a rotation, g(t) = 1 - t²/2: linear, each row with its own
    rate r; elementwise products and sums only (no library kernel whose rounding could vary)."""
    turn = torch.tensor([1.5, -1.5], dtype=F64)

    def f(t: torch.Tensor, y: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        r = rates if rows is None else rates[rows]
        forcing = 1.0 - 0.5 * t * t
        return -r * (y - forcing[:, None]) + y.flip(1) * turn

    return f


def _golden_solve(
    case: dict, y0: torch.Tensor, rates: torch.Tensor
) -> tuple[torch.Tensor, int, int]:
    """(states, evaluations, recorded steps) of one case."""
    options = dict(case)
    method, times = options.pop("method"), options.pop("times", (0.0, 0.3, 1.0))
    tol, sign = options.pop("tol", 1e-6), options.pop("rate_sign", 1.0)
    counter = [0]
    record = runge_kutta.StepRecord()
    out = solve(
        _golden_field(sign * rates),
        y0,
        list(times),
        method,
        Stepping(rtol=tol, atol=tol, norm=row_norm(2), **options),
        on_evaluation=lambda: counter.__setitem__(0, counter[0] + 1),
        record=record,
    )
    return out, counter[0], len(record.steps)


def _golden_inputs(grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    y0 = torch.tensor(_GOLDEN_Y0, dtype=F64, requires_grad=grad)
    rates = torch.tensor(_GOLDEN_RATES, dtype=F64, requires_grad=grad)
    return y0, rates


def _golden_gradients() -> list[torch.Tensor]:
    """d(sum of the states at every output)/d(y0, rates) through dopri5 with compaction."""
    y0, rates = _golden_inputs(grad=True)
    out, _, _ = _golden_solve({"method": "dopri5"}, y0, rates)
    return list(torch.autograd.grad(out.sum(), (y0, rates)))


def _hex(tensor: torch.Tensor) -> list[str]:
    return [float(v).hex() for v in tensor.detach().reshape(-1).tolist()]


# Produced once at commit 7f78343 (the loop before it was split into pieces), from the
# repository root:
#   python -c "import sys; sys.path.insert(0, 'tests'); import test_runge_kutta as m; \
#   print({k: (*m._golden_solve(c, *m._golden_inputs())[1:], \
#   m._hex(m._golden_solve(c, *m._golden_inputs())[0])) for k, c in m._GOLDEN_CASES.items()}); \
#   print([m._hex(g) for g in m._golden_gradients()])"
_GOLDEN: dict[str, tuple[int, int, list[str]]] = {
    "dopri5": (
        1316,
        219,
        [
            "0x1.0000000000000p+0",
            "-0x1.0000000000000p-1",
            "0x1.0000000000000p-2",
            "0x1.0000000000000p+1",
            "-0x1.8000000000000p+0",
            "0x1.8000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.80296662c9989p-1",
            "-0x1.516e2914c7772p-1",
            "0x1.1e1d723d15de0p+0",
            "0x1.fbe436114162cp-1",
            "0x1.fa3378d59d0e2p-1",
            "0x1.dc8f223333497p-1",
            "0x1.eabab190a7b74p-1",
            "0x1.e7cab8f745472p-1",
            "0x1.3a0416164709bp-3",
            "-0x1.3ccf4ca1460f5p-1",
            "0x1.9e8dc904e5fa6p-1",
            "0x1.8992fa5908d1bp-2",
            "0x1.120bd7b0cc078p-1",
            "0x1.01829b8a292a4p-1",
            "0x1.01cb1928369a1p-1",
            "0x1.003ebf3262b47p-1",
        ],
    ),
    "dopri5-shared-steps": (
        1316,
        219,
        [
            "0x1.0000000000000p+0",
            "-0x1.0000000000000p-1",
            "0x1.0000000000000p-2",
            "0x1.0000000000000p+1",
            "-0x1.8000000000000p+0",
            "0x1.8000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.802962377f6c6p-1",
            "-0x1.516e2d3a563d8p-1",
            "0x1.1e1d75f9c716bp+0",
            "0x1.fbe439ff338a4p-1",
            "0x1.fa338210eacd0p-1",
            "0x1.dc8f2c7ed3171p-1",
            "0x1.eabab190a7b74p-1",
            "0x1.e7cab8f745472p-1",
            "0x1.3a03db049b63dp-3",
            "-0x1.3ccf4aa674fafp-1",
            "0x1.9e8dd0413784cp-1",
            "0x1.899307275a228p-2",
            "0x1.120be888cdc60p-1",
            "0x1.0182af8966c28p-1",
            "0x1.01cb1928369a1p-1",
            "0x1.003ebf3262b47p-1",
        ],
    ),
    "dopri5-backward-first-step": (
        1267,
        211,
        [
            "0x1.0000000000000p+0",
            "-0x1.0000000000000p-1",
            "0x1.0000000000000p-2",
            "0x1.0000000000000p+1",
            "-0x1.8000000000000p+0",
            "0x1.8000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.b57809d252c8bp-1",
            "0x1.30e02bac3cd96p-1",
            "0x1.039d686cd0bcap-1",
            "0x1.fef899bb60d06p-1",
            "0x1.c479063608691p-1",
            "0x1.e02eb0b6ec2b9p-1",
            "0x1.d536989aa0035p-1",
            "0x1.d808d73720a59p-1",
            "0x1.ae144a1897dc6p-2",
            "0x1.03715706d8ad0p+0",
            "0x1.45300774da057p-1",
            "0x1.24d06cb40399fp+0",
            "0x1.f00208378d765p-1",
            "0x1.0754f04410160p+0",
            "0x1.fe750e5854fd9p-1",
            "0x1.00c3bc71f629dp+0",
        ],
    ),
    "dopri8": (
        1757,
        135,
        [
            "0x1.0000000000000p+0",
            "-0x1.0000000000000p-1",
            "0x1.0000000000000p-2",
            "0x1.0000000000000p+1",
            "-0x1.8000000000000p+0",
            "0x1.8000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.802962377ecb8p-1",
            "-0x1.516e2d3a55a3ap-1",
            "0x1.1e1d74c1193bap+0",
            "0x1.fbe43fb7d0ffep-1",
            "0x1.fa338362d525ap-1",
            "0x1.dc8f2e3dc76f5p-1",
            "0x1.eabac63d34408p-1",
            "0x1.e7cace52442cep-1",
            "0x1.3a03d407de4c0p-3",
            "-0x1.3ccf4920df907p-1",
            "0x1.9e8dcf4da2947p-1",
            "0x1.89930a8b0d393p-2",
            "0x1.120bf041527cbp-1",
            "0x1.0182bb3184af4p-1",
            "0x1.01cb356247697p-1",
            "0x1.003edc378ad1cp-1",
        ],
    ),
    "bosh3": (
        845,
        281,
        [
            "0x1.0000000000000p+0",
            "-0x1.0000000000000p-1",
            "0x1.0000000000000p-2",
            "0x1.0000000000000p+1",
            "-0x1.8000000000000p+0",
            "0x1.8000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.8029844d56bc1p-1",
            "-0x1.516df34af14f0p-1",
            "0x1.1e1daba1aff00p+0",
            "0x1.fbe4261292116p-1",
            "0x1.fa346f3b58cdfp-1",
            "0x1.dc90131a4e042p-1",
            "0x1.eabade456b719p-1",
            "0x1.e7cae58fdb67fp-1",
            "0x1.3a06243877389p-3",
            "-0x1.3ccf38b3471bdp-1",
            "0x1.9e8e59d2a8716p-1",
            "0x1.899365ad2738dp-2",
            "0x1.120c9ea92f091p-1",
            "0x1.018364fc2c89bp-1",
            "0x1.01cb70f9f681ep-1",
            "0x1.003f175662b19p-1",
        ],
    ),
    "adaptive_heun": (
        797,
        398,
        [
            "0x1.0000000000000p+0",
            "-0x1.0000000000000p-1",
            "0x1.0000000000000p-2",
            "0x1.0000000000000p+1",
            "-0x1.8000000000000p+0",
            "0x1.8000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.0000000000000p-1",
            "0x1.80259350c6321p-1",
            "-0x1.516dab1005928p-1",
            "0x1.1e19e8bfbd86ap+0",
            "0x1.fbe79b6957dd8p-1",
            "0x1.fa2ac88c1e33fp-1",
            "0x1.dc86f0553dbc4p-1",
            "0x1.eab5493a9f7a2p-1",
            "0x1.e7c4a8192036dp-1",
            "0x1.39eb3dc693eebp-3",
            "-0x1.3cc6e3194138ap-1",
            "0x1.9e81d774a4d01p-1",
            "0x1.898e757fb70aep-2",
            "0x1.1204f03d1ea42p-1",
            "0x1.017c088504782p-1",
            "0x1.01c7864f1deccp-1",
            "0x1.003ad5ba641bep-1",
        ],
    ),
}
# The loop at 7f78343 gave the same evaluations, steps and bits with compaction on and off.
for _name in ("dopri5", "bosh3", "adaptive_heun"):
    _GOLDEN[f"{_name}-no-compaction"] = _GOLDEN[_name]

_GOLDEN_GRADIENTS: list[list[str]] = [
    [
        "0x1.ad54d6b0b9fcfp-1",
        "0x1.660e75ee27876p+1",
        "0x1.18fd8d732e7b2p+0",
        "0x1.4e1f856a70d35p+0",
        "0x1.0000026e35a05p+0",
        "0x1.000006eb8d4edp+0",
        "0x1.0000000000000p+0",
        "0x1.0000000000000p+0",
    ],
    [
        "0x1.0d92b23ee2a9ap+1",
        "-0x1.0824e4f0b6cd9p-4",
        "-0x1.c4d41e5d27e8ep-11",
        "-0x1.580f1e17e685ap-17",
    ],
]
# where they were computed (torch's version and the CPU kernels it dispatched to): elsewhere a
# vectorised kernel (e.g. of ``add(alpha=)``) may round differently, and the bits with it
_GOLDEN_PLATFORM = ("2.13.0+cpu", "AVX512")
_PLATFORM = (torch.__version__, torch.backends.cpu.get_cpu_capability())
_SAME_PLATFORM = pytest.mark.skipif(
    _PLATFORM != _GOLDEN_PLATFORM,
    reason=f"bits computed on {_GOLDEN_PLATFORM}, this is {_PLATFORM}",
)


@_SAME_PLATFORM
@pytest.mark.parametrize("name", sorted(_GOLDEN_CASES))
def test_solves_are_bit_for_bit_those_of_the_loop_before_the_split(name: str) -> None:
    """States equal (``torch.equal``: every bit) those stored from the old loop, with the same
    number of evaluations and of attempted steps."""
    out, evaluations, steps = _golden_solve(_GOLDEN_CASES[name], *_golden_inputs())
    expected_evaluations, expected_steps, values = _GOLDEN[name]
    expected = torch.tensor([float.fromhex(v) for v in values], dtype=F64).reshape(out.shape)
    assert (evaluations, steps) == (expected_evaluations, expected_steps)
    assert torch.equal(out, expected)


@_SAME_PLATFORM
def test_gradients_are_bit_for_bit_those_of_the_loop_before_the_split() -> None:
    for gradient, values in zip(_golden_gradients(), _GOLDEN_GRADIENTS, strict=True):
        expected = torch.tensor([float.fromhex(v) for v in values], dtype=F64)
        assert torch.equal(gradient.reshape(-1), expected)
