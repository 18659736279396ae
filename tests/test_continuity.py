"""Tests for cnftools.continuity: the log-form continuity residual (theory §4).

Every conditional path of cnftools.cases.PATH_CASES must satisfy the continuity equation with its
Theorem-3 field (relative residual at rounding level), and wrong fields must be detected.

Theory sections cited here (pages under ``docs/theory/``):

- §4: ``docs/theory/divergence-and-continuity.md#continuity-equation``
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import cnftools
from cnftools.cases import PATH_CASES
from cnftools.continuity import continuity_terms

TIMES = [0.1, 0.5, 0.9]  # inside (0, 1), away from the singular end t = 1 of OT(0) and VP
EVENTS = [(3,), (2, 3)]
# Relative residual |r| / (|dt log p| + |div v| + |v . grad log p|): the three terms are computed
# by autograd from closed-form log-densities, so the sum cancels to rounding. float64: theory §4
# quotes <~1e-14, we allow 1e-10 for the autograd-derived schedules (cosine, x1-dependent path).
# float32: eps ~ 1.2e-7; most cases measure ~1e-7, but VP(0.1, 20) at t <= 0.1 measures up to
# 4e-5 (~300 eps: dt log p and v . grad log p are O(1) and cancel down to a divergence of ~1e-3,
# through exp(-T/2) with T ~ 8): 5e-4.
REL_TOL = {torch.float64: 1e-10, torch.float32: 5e-4}
WRONG = 1e-3  # a wrong field must give at least this relative residual somewhere in the batch


def bound(path: cnftools.GaussianPath, x1: Tensor):
    return (lambda x, t: path.log_prob(x, t, x1)), (
        lambda x, t: path.conditional_velocity(x, t, x1)
    )


def setup(name: str, t: float, event: tuple[int, ...], dtype: torch.dtype, seed: int = 0):
    path = PATH_CASES[name].build()
    generator = torch.Generator().manual_seed(seed)
    x1 = torch.randn(8, *event, generator=generator, dtype=dtype)
    x = path.sample(t, x1, generator=generator)
    return path, x1, x


@pytest.mark.parametrize("event", EVENTS, ids=str)
@pytest.mark.parametrize("t", TIMES)
@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_conditional_paths_satisfy_continuity(name: str, t: float, event, dtype) -> None:
    path, x1, x = setup(name, t, event, dtype)
    log_prob, velocity = bound(path, x1)
    relative = cnftools.continuity_relative_residual(log_prob, velocity, x, t)
    assert relative.shape == (8,)
    assert float(relative.max()) <= REL_TOL[dtype], float(relative.max())


@pytest.mark.parametrize("t", TIMES)
@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_wrong_fields_are_detected(name: str, t: float) -> None:
    path, x1, x = setup(name, t, (3,), torch.float64)
    log_prob, velocity = bound(path, x1)
    scaled = cnftools.continuity_relative_residual(
        log_prob, lambda x, t: 1.05 * velocity(x, t), x, t
    )
    other_x1 = x1.roll(1, dims=0)  # the field of another data point
    other = cnftools.continuity_relative_residual(
        log_prob, lambda x, t: path.conditional_velocity(x, t, other_x1), x, t
    )
    assert float(scaled.max()) > WRONG
    assert float(other.max()) > WRONG


def test_per_sample_times_match_one_time_at_a_time() -> None:
    path, x1, _ = setup("VP(0.1, 20)", 0.5, (3,), torch.float64)
    t = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    x = path.sample(t, x1)
    log_prob, velocity = bound(path, x1)
    together = continuity_terms(log_prob, velocity, x, t)
    for b in range(8):  # each sample's own time derivative, not a sum over the batch
        alone = continuity_terms(
            lambda x, s, b=b: path.log_prob(x, s, x1[b : b + 1]),
            lambda x, s, b=b: path.conditional_velocity(x, s, x1[b : b + 1]),
            x[b : b + 1],
            float(t[b]),
        )
        for a, c in zip(together, alone, strict=True):
            # Identical arithmetic per sample; allow a few ulps for reduction order.
            torch.testing.assert_close(a[b : b + 1], c, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8])
def test_terms_match_closed_forms_for_ot(t: float) -> None:
    sigma_min = 0.1
    path = cnftools.OTPath(sigma_min)
    x1 = torch.randn(5, 4, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64)
    terms = continuity_terms(*bound(path, x1), x, t)
    # OT: s = 1 - (1 - sigma_min) t, s' = -(1 - sigma_min), mean t x1, d = 4.
    s, ds = 1 - (1 - sigma_min) * t, -(1 - sigma_min)
    r2 = ((x - t * x1) ** 2).sum(1)
    dt_logp = -4 * ds / s + (r2 * ds / s**3) + ((x - t * x1) * x1).sum(1) / s**2
    # Rounding of O(10) sums in float64.
    torch.testing.assert_close(terms.divergence, torch.full((5,), 4 * ds / s, dtype=torch.float64))
    torch.testing.assert_close(terms.time_derivative, dt_logp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        terms.residual, torch.zeros(5, dtype=torch.float64), atol=1e-12, rtol=0
    )


class Dilation:
    """v = c x on N(0, e^{2 c t} I): generates it; closed-form divergence c d."""

    c = 0.7

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        var = torch.exp(2 * self.c * t)
        d = x[0].numel()
        return -0.5 * (x**2).sum(1) / var - 0.5 * d * torch.log(2 * math.pi * var)

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return self.c * x

    def divergence(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.full(x.shape[:1], self.c * x[0].numel(), dtype=x.dtype)


@pytest.mark.parametrize(
    "estimator",
    [cnftools.Exact(), cnftools.Exact("loop"), cnftools.ClosedForm()],
    ids=str,
)
def test_divergence_choices(estimator) -> None:
    field = Dilation()
    x = torch.randn(6, 5, dtype=torch.float64)
    r = cnftools.continuity_residual(field.log_prob, field.velocity, x, 0.4, estimator=estimator)
    # Terms are O(5); rounding only.
    torch.testing.assert_close(r, torch.zeros(6, dtype=torch.float64), atol=1e-13, rtol=0)


class WrongClosedForm(Dilation):
    """Dilation whose closed-form divergence is off by 10%: the velocity still generates p."""

    def divergence(self, x: Tensor, t: Tensor) -> Tensor:
        return 1.1 * super().divergence(x, t)


def test_default_estimator_checks_the_field_not_its_closed_form() -> None:
    """The default (Exact()) takes the divergence by autograd, so a wrong closed form does not
    enter the verdict; ClosedForm() uses it, and the residual shows the error (0.1 c d = 0.35)."""
    field = WrongClosedForm()
    x = torch.randn(6, 5, dtype=torch.float64)
    default = cnftools.continuity_residual(field.log_prob, field.velocity, x, 0.4)
    torch.testing.assert_close(default, torch.zeros(6, dtype=torch.float64), atol=1e-13, rtol=0)
    closed = continuity_terms(
        field.log_prob, field.velocity, x, 0.4, estimator=cnftools.ClosedForm()
    )
    torch.testing.assert_close(
        closed.residual, torch.full((6,), 0.1 * 0.7 * 5, dtype=torch.float64), atol=1e-13, rtol=0
    )


def test_hutchinson_residual_is_unbiased() -> None:
    """A Hutchinson divergence gives a stochastic residual. For v = c x the Jacobian is c I, so
    one Rademacher probe is exact: e^T (c I) e = c d, residual zero to rounding."""
    field = Dilation()
    x = torch.randn(6, 5, dtype=torch.float64)
    spec = cnftools.Hutchinson(generator=torch.Generator().manual_seed(0))
    r = cnftools.continuity_residual(field.log_prob, field.velocity, x, 0.4, estimator=spec)
    torch.testing.assert_close(r, torch.zeros(6, dtype=torch.float64), atol=1e-13, rtol=0)


def test_relative_residual_all_zero_terms_is_zero() -> None:
    # log p constant in x and t, v = 0 with zero divergence: every term is 0, so is r; ratio = 0.
    x = torch.randn(3, 2, dtype=torch.float64)
    rel = cnftools.continuity_relative_residual(
        lambda x, t: 0.0 * x.sum(1) + 0.0 * t, lambda x, t: 0.0 * x, x, 0.5
    )
    assert torch.equal(rel, torch.zeros(3, dtype=torch.float64))


def test_t_forms_and_no_grad() -> None:
    field = Dilation()
    x = torch.randn(4, 3, dtype=torch.float64)
    ref = cnftools.continuity_residual(field.log_prob, field.velocity, x, 0.25)
    with torch.no_grad():
        for t in (
            torch.tensor(0.25, dtype=torch.float64),
            torch.full((4,), 0.25, dtype=torch.float64),
        ):
            out = cnftools.continuity_residual(field.log_prob, field.velocity, x, t)
            assert torch.equal(out, ref)  # the same computation whatever form t takes


def test_bad_inputs_raise() -> None:
    field = Dilation()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="estimator must be a divergence spec"):
        cnftools.continuity_residual(field.log_prob, field.velocity, x, 0.5, estimator="fast")
    with pytest.raises(TypeError, match=r"write estimator=cnftools\.ClosedForm\(\)"):
        cnftools.continuity_residual(
            field.log_prob, field.velocity, x, 0.5, estimator="closed_form"
        )
    with pytest.raises(TypeError, match="the continuity checks take no None"):
        cnftools.continuity_residual(field.log_prob, field.velocity, x, 0.5, estimator=None)
    with pytest.raises(TypeError, match="divergence"):  # the 0.1 keyword is gone
        cnftools.continuity_residual(
            field.log_prob, field.velocity, x, 0.5, divergence=field.divergence
        )
    with pytest.raises(ValueError, match=r"ClosedForm\(\) but the field <lambda> has no"):
        cnftools.continuity_residual(
            field.log_prob, lambda x, t: x, x, 0.5, estimator=cnftools.ClosedForm()
        )
    with pytest.raises(ValueError, match=r"log_prob must return shape \(B,\)"):
        cnftools.continuity_residual(lambda x, t: x, field.velocity, x, 0.5)
    with pytest.raises(ValueError, match="does not depend on x or t"):
        cnftools.continuity_residual(
            lambda x, t: torch.zeros(4, dtype=x.dtype), field.velocity, x, 0.5
        )
    with pytest.raises(ValueError, match="shape"):
        cnftools.continuity_residual(field.log_prob, lambda x, t: x[:, :2], x, 0.5)

    class BadShape(Dilation):
        def divergence(self, x: Tensor, t: Tensor) -> Tensor:
            return x

    bad = BadShape()
    with pytest.raises(ValueError, match=r"divergence\(x, t\) of field .* returned \(4, 3\)"):
        cnftools.continuity_residual(
            bad.log_prob, bad.velocity, x, 0.5, estimator=cnftools.ClosedForm()
        )
    with pytest.raises(TypeError, match="log_prob must be callable"):
        cnftools.continuity_residual(None, field.velocity, x, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t must lie in"):
        cnftools.continuity_residual(field.log_prob, field.velocity, x, 1.5)


def test_non_finite_log_prob_is_named_not_returned_as_nan():
    """A log-density that is -inf somewhere (outside a support, an underflow) would make the residual
    NaN; the verifier names the rows instead of returning a NaN verdict."""

    def log_prob(x, t):
        out = -0.5 * (x**2).sum(dim=1) + 0 * t
        return torch.where(x[:, 0] > 0, out, torch.full_like(out, -math.inf))

    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"log_prob\(x, t\) has non-finite values .* rows \[1\]"):
        cnftools.continuity_residual(log_prob, lambda x, t: -x, x, 0.5)
