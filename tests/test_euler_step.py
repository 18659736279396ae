"""Tests of cnftools._euler_step: EulerStep's exact log-det, its fixed-point inverse and its
gradients, and the Euler chains of theory §3 converging to the CNF.

References are independent of the code under test: log-dets against ``numpy.linalg.slogdet`` and
the autograd Jacobian of one sample, the continuous flow of v = A x against ``scipy.linalg.expm``
(helpers in :mod:`cnftools.validation.flows`), central finite differences for gradients.

Theory sections cited here (pages under ``docs/theory/``):

- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _flow_cases import DTYPES, F64, TimeField, gen
from torch import nn

import cnftools
from cnftools._euler_step import ConvergenceError, EulerStep, euler_chain
from cnftools.flows import Flow, standard_normal
from cnftools.validation.flows import (
    LINEAR_FIELD,
    autograd_log_det,
    euler_chain_forward_log_prob,
    linear_euler_chain_log_prob,
    linear_field_log_prob,
    loglog_slope,
    nonlinear_field,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_euler_step_linear_field_closed_form():
    """EulerStep of v = A x: log|det(I + dt A)| (numpy) at 1e-13; forward = (I + dt A) x."""
    a = torch.as_tensor(LINEAR_FIELD)
    step = EulerStep(lambda x, t: x @ a.mT, t=0.5, dt=0.1)
    x = torch.randn(7, 3, dtype=F64)
    m = np.eye(3) + 0.1 * LINEAR_FIELD
    np.testing.assert_allclose(step(x).numpy(), x.numpy() @ m.T, rtol=0, atol=1e-14)
    logdet = step.log_abs_det_jacobian(x, None)
    np.testing.assert_allclose(logdet.numpy(), np.linalg.slogdet(m)[1], rtol=0, atol=1e-13)


@pytest.mark.parametrize("batched", [True, False])
def test_euler_step_jacobian_strategies_agree(batched):
    """Both Jacobian strategies give the autograd reference (1e-12, roundoff)."""
    step = EulerStep(TimeField(3, 1, F64), t=0.2, dt=0.3, batched=batched)
    x = torch.randn(5, 3, dtype=F64)
    with torch.no_grad():
        got = step.log_abs_det_jacobian(x, None)
    torch.testing.assert_close(got, autograd_log_det(step, x), rtol=0, atol=1e-12)


def test_euler_step_sees_time_as_batch_tensor():
    """The field is called with x (B, d) and t a (B,) tensor holding the step's time."""
    seen = []

    def v(x, t):
        seen.append((tuple(x.shape), tuple(t.shape), t.dtype))
        assert torch.all(t == 0.25)
        return -x

    EulerStep(v, t=0.25, dt=0.1)(torch.randn(6, 2, dtype=F64))
    assert seen == [((6, 2), (6,), F64)]


def test_euler_step_gradient_through_inverse_matches_finite_differences():
    """log_prob through the fixed-point inverse has the implicit-function gradient.

    Central differences with h = 1e-6 in float64: truncation O(h²) ≈ 1e-12 plus roundoff
    eps/h ≈ 1e-10 on O(1) sums; tolerance 1e-7 relative.
    """
    field = TimeField(3, 2, F64)
    flow = Flow(standard_normal(3, dtype=F64), euler_chain(field, 4))
    x = torch.randn(5, 3, generator=gen(3), dtype=F64, requires_grad=True)
    flow.log_prob(x).sum().backward()
    weight = field.net[0].weight
    analytic_w, analytic_x = float(weight.grad[1, 2]), float(x.grad[2, 1])
    h = 1e-6

    def total(x_value):
        with torch.no_grad():
            return float(flow.log_prob(x_value).sum())

    with torch.no_grad():
        weight[1, 2] += h
        up = total(x)
        weight[1, 2] -= 2 * h
        down = total(x)
        weight[1, 2] += h
        dx = torch.zeros_like(x)
        dx[2, 1] = h
        up_x, down_x = total(x + dx), total(x - dx)
    assert analytic_w == pytest.approx((up - down) / (2 * h), rel=1e-7, abs=1e-9)
    assert analytic_x == pytest.approx((up_x - down_x) / (2 * h), rel=1e-7, abs=1e-9)


# --- theory §3: Euler chains converge to the CNF ----------------------------------------------------


def test_euler_chain_log_prob_equals_discrete_formula():
    """N = 16 Euler steps of v = A x via TransformedDistribution (fixed-point inverse) equal the
    discrete-flow formula log N((I + A/N)^{-N} x) − N log|det(I + A/N)| (numpy), 1e-10 (roundoff +
    64-eps fixed points accumulated over 16 steps)."""
    a = torch.as_tensor(LINEAR_FIELD)
    x = torch.randn(12, 3, generator=gen(4), dtype=F64)
    flow = Flow(standard_normal(3, dtype=F64), euler_chain(lambda s, t: s @ a.mT, 16))
    with torch.no_grad():
        got = flow.log_prob(x).numpy()
    np.testing.assert_allclose(
        got, linear_euler_chain_log_prob(LINEAR_FIELD, 16, x.numpy()), atol=1e-10, rtol=0
    )


@DTYPES
def test_euler_chain_converges_first_order_to_expm_flow(dtype):
    """log p_N(x) → exact log p_1(x) of the flow exp(A t) (scipy expm) with error ∝ 1/N.

    Fitted log-log slope within 0.1 of −1 (O(1/N²) terms bend it by ≈ 0.03 on N = 16…128); N·error
    constant within 10 %. float32 roundoff (~1e-5) is far below the smallest error (~1e-2).
    """
    a = torch.as_tensor(LINEAR_FIELD, dtype=dtype)
    z0 = torch.randn(16, 3, generator=gen(5), dtype=dtype)
    ns = [16, 32, 64, 128]
    errors = []
    for n in ns:
        x, log_p = euler_chain_forward_log_prob(lambda s, t: s @ a.mT, n, z0)
        exact = linear_field_log_prob(LINEAR_FIELD, x.double().numpy())
        errors.append(float(np.abs(log_p.double().numpy() - exact).max()))
    assert loglog_slope(ns, errors) == pytest.approx(-1.0, abs=0.1), errors
    scaled = np.array(ns) * np.array(errors)
    assert scaled.max() / scaled.min() < 1.1, errors


def test_euler_chain_converges_to_log_likelihood():
    """Nonlinear field: Euler-chain log p_N(x) → cnftools.log_likelihood(v, x) with slope ≈ −1 (±0.1)."""
    likelihood = pytest.importorskip(
        "cnftools.likelihood", reason="cnftools.likelihood not written yet"
    )
    v = nonlinear_field(torch.as_tensor(LINEAR_FIELD))
    z0 = torch.randn(8, 3, generator=gen(6), dtype=F64)
    ns = [16, 32, 64, 128]
    errors = []
    for n in ns:
        x, log_p = euler_chain_forward_log_prob(v, n, z0)
        exact = likelihood.log_likelihood(v, x, method="dopri5", rtol=1e-10, atol=1e-10).log_prob
        errors.append(float((log_p - exact).abs().max()))
    assert loglog_slope(ns, errors) == pytest.approx(-1.0, abs=0.1), errors


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: EulerStep(lambda x, t: x, t=1.5, dt=0.1), ValueError, r"\[0, 1\]"),
        (lambda: EulerStep(lambda x, t: x, t=0.0, dt=float("nan")), ValueError, "finite"),
        (lambda: EulerStep("v", t=0.0, dt=0.1), TypeError, "callable"),
        (lambda: EulerStep(lambda x, t: x, 0.0, 0.1, batched="fast"), TypeError, "batched"),
        (lambda: euler_chain(lambda x, t: x, 0), ValueError, "steps"),
    ],
)
def test_bad_construction_raises(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_euler_step_field_output_shape_checked():
    with pytest.raises(ValueError, match="returned shape"):
        EulerStep(lambda x, t: x[:, :1], 0.0, 0.1)(torch.randn(2, 3, dtype=F64))


def test_euler_step_inverse_raises_when_not_a_contraction():
    """dt·Lip(v) = 3 > 1: the fixed-point iteration diverges and raises ConvergenceError."""
    step = EulerStep(lambda x, t: -3 * x, t=0.0, dt=1.0, max_iter=200)
    with pytest.raises(ConvergenceError, match="Lip"):
        step.inv(torch.randn(3, 2, dtype=F64))


def test_euler_step_inverse_raises_when_iterations_run_out():
    """A contraction with rate 0.95 needs ~700 iterations for 64 eps; max_iter = 10 is too few."""
    step = EulerStep(lambda x, t: 0.95 * x, t=0.0, dt=1.0, max_iter=10)
    with pytest.raises(ConvergenceError, match="did not converge in 10"):
        step.inv(torch.randn(3, 2, dtype=F64))


def test_euler_step_log_det_raises_when_step_folds_space():
    """det(I + dt J) = -1 < 0 for v = -2x in d = 3, dt = 1: not invertible, refused."""
    step = EulerStep(lambda x, t: -2 * x, t=0.0, dt=1.0)
    with pytest.raises(ValueError, match="not invertible"):
        step.log_abs_det_jacobian(torch.randn(2, 3, dtype=F64), None)


class _IgnoresInput(nn.Module):
    """A module field with parameters but no autograd path from x: v = b (broadcast)."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.ones(3, dtype=F64))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.b.expand_as(x)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize(
    "field",
    [
        pytest.param(lambda x, t: torch.ones_like(x), id="constant"),
        pytest.param(lambda x, t: (-x).detach(), id="detached"),
        pytest.param(lambda x, t: torch.from_numpy(-x.detach().numpy()), id="numpy"),
        pytest.param(_IgnoresInput(), id="module ignoring x"),
    ],
)
def test_euler_step_refuses_a_field_without_autograd_path_from_x(field, batched):
    """Regression (issue 11.6): such a field reported log|det J| = 0 (a wrong number for the
    detached -x, whose true value is 3 log(1 - 0.1)); now refused as cnftools.divergence does."""
    step = EulerStep(field, t=0.0, dt=0.1, batched=batched)
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="does not depend on x through autograd"):
        step.log_abs_det_jacobian(x, step(x))
    with pytest.raises(ValueError, match="does not depend on x"):
        cnftools.divergence(field, x, 0.0)
