"""Tests for cnftools.divergences: exact strategies against the full autograd Jacobian, Hutchinson.

References are independent of the code under test: the divergence is compared with the trace of the
per-sample Jacobian built by ``torch.autograd.functional.jacobian`` (non-vectorized: B * d separate
backward passes), and Hutchinson's mean with the variance computed from that Jacobian.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import cnftools
from cnftools import Exact, Hutchinson
from cnftools._divergence_evaluator import DivergenceEvaluator
from cnftools.divergences import choose_strategy
from cnftools.estimators import EXACT_STRATEGIES

# Every exact spec, and None (the default rule: these fields have no closed form, so Exact()).
ALL_EXACT = [Exact(s) for s in EXACT_STRATEGIES] + [None]
DTYPES = [torch.float64, torch.float32]
# Relative tolerances of a trace of d Jacobian entries: the exact strategies evaluate the same VJPs
# as the reference in another order, so the error is a few ulps per entry times d (d <= 64).
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5}


class SmoothMLP(nn.Module):
    """A small smooth field on any event shape: v(x, t) = W3 tanh(W2 softplus(W1 [x, t]))."""

    def __init__(self, event: tuple[int, ...], width: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.event = event
        dim = math.prod(event)
        generator = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(dim + 1, width)
        self.l2 = nn.Linear(width, width)
        self.l3 = nn.Linear(width, dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x.reshape(x.shape[0], -1), t[:, None]], dim=1)
        h = torch.tanh(self.l2(nn.functional.softplus(self.l1(h))))
        return self.l3(h).reshape(x.shape)


def per_sample_jacobian(v: nn.Module, x: Tensor, t: Tensor, create_graph: bool = False) -> Tensor:
    """(B, d, d) per-sample Jacobians from the full (B d) x (B d) autograd Jacobian."""
    batch, dim = x.shape[0], x[0].numel()
    full = torch.autograd.functional.jacobian(lambda z: v(z, t), x, create_graph=create_graph)
    full = full.reshape(batch, dim, batch, dim)
    return torch.stack([full[b, :, b, :] for b in range(batch)])


def jacobian_trace(v: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    return per_sample_jacobian(v, x, t).diagonal(dim1=1, dim2=2).sum(-1)


def assert_trace_close(actual: Tensor, expected: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
    # Error measured relative to sum_i |J_ii| (the trace's natural rounding scale), floored at 1.
    bound = REL_TOL[dtype] * (scale + 1)
    assert bool(((actual - expected).abs() <= bound).all()), (actual - expected).abs().max()


event_shapes = st.one_of(
    st.integers(1, 64).map(lambda d: (d,)),
    st.sampled_from([(2, 3), (1, 4, 4), (3, 1, 2), (2, 2, 2, 2)]),
)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=12)  # each example builds a B*d backward-pass Jacobian; keep the file < 60 s
@given(event=event_shapes, batch=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_exact_equals_jacobian_trace(
    dtype: torch.dtype, event: tuple[int, ...], batch: int, seed: int
) -> None:
    field = SmoothMLP(event, seed=seed).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *event, generator=generator, dtype=dtype)
    t = torch.rand(batch, generator=generator, dtype=dtype)
    jac = per_sample_jacobian(field, x, t)
    expected = jac.diagonal(dim1=1, dim2=2).sum(-1)
    scale = jac.diagonal(dim1=1, dim2=2).abs().sum(-1)
    for spec in ALL_EXACT:
        actual = cnftools.divergence(field, x, t, spec)
        assert actual.shape == (batch,) and actual.dtype == dtype
        assert_trace_close(actual, expected, scale, dtype)


@pytest.mark.parametrize("spec", ALL_EXACT, ids=str)
def test_exact_under_no_grad_and_detached(spec: Exact | None, dtype) -> None:
    field = SmoothMLP((2, 3)).to(dtype)
    x = torch.randn(5, 2, 3, dtype=dtype)
    expected = jacobian_trace(field, x, torch.full((5,), 0.3, dtype=dtype))
    with torch.no_grad():
        actual = cnftools.divergence(field, x, 0.3, spec)
    assert not actual.requires_grad  # no graph is kept without create_graph
    assert_trace_close(actual, expected, expected.abs() * 0 + 6.0, dtype)


@pytest.mark.parametrize("spec", ALL_EXACT, ids=str)
def test_create_graph_gives_parameter_gradients(spec: Exact | None) -> None:
    dtype = torch.float64
    field = SmoothMLP((5,), seed=3).to(dtype)
    x = torch.randn(4, 5, dtype=dtype, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.1, 0.9, 4, dtype=dtype)
    params = list(field.parameters())
    jac = per_sample_jacobian(field, x, t, create_graph=True)
    # The last bias does not enter the Jacobian: its gradient is None (zero) on both sides.
    expected = torch.autograd.grad(jac.diagonal(dim1=1, dim2=2).sum(), params, allow_unused=True)
    div = cnftools.divergence(field, x, t, spec, create_graph=True)
    actual = torch.autograd.grad(div.sum(), params, allow_unused=True)
    assert (actual[-1], expected[-1]) == (None, None)
    for a, e in zip(actual[:-1], expected[:-1], strict=True):
        # Same second-order products summed in another order: float64 rounding only.
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_create_graph_differentiates_through_x() -> None:
    # v = sin(x) * (1 + t): div = (1 + t) sum cos x, d div / dx = -(1 + t) sin x.
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    div = cnftools.divergence(
        lambda x, t: torch.sin(x) * (1 + t[:, None]), x, 0.5, create_graph=True
    )
    (grad,) = torch.autograd.grad(div.sum(), x)
    torch.testing.assert_close(grad, -1.5 * torch.sin(x.detach()), rtol=1e-13, atol=1e-14)


def test_velocity_and_divergence_returns_the_field() -> None:
    field = SmoothMLP((3,))
    x = torch.randn(4, 3)
    t = torch.full((4,), 0.5)
    velocity = cnftools.velocity_and_divergence(field, x, 0.5).velocity
    assert torch.equal(velocity, field(x, t))  # the same forward pass, bit for bit
    assert not velocity.requires_grad


# ---------------------------------------------------------------------------------------------
# Hutchinson
def hutchinson_variance(jac: Tensor, noise: str) -> Tensor:
    """Exact per-probe variance of e^T A e from the Jacobian A, per sample (B,)."""
    off = jac - torch.diag_embed(jac.diagonal(dim1=1, dim2=2))
    if noise == "rademacher":  # sum_{i != j} A_ij (A_ij + A_ji)
        return (off * (off + off.transpose(1, 2))).sum((1, 2))
    # Gaussian: ||A||_F^2 + tr(A^2)
    return (jac**2).sum((1, 2)) + (jac * jac.transpose(1, 2)).sum((1, 2))


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_unbiased_with_exact_variance(noise: str) -> None:
    dtype = torch.float64
    field = SmoothMLP((6,), seed=7).to(dtype)
    x = torch.randn(3, 6, dtype=dtype, generator=torch.Generator().manual_seed(2))
    t = torch.full((3,), 0.4, dtype=dtype)
    jac = per_sample_jacobian(field, x, t)
    exact = jac.diagonal(dim1=1, dim2=2).sum(-1)
    n_probes = 4000
    spec = Hutchinson(n_probes, noise, generator=torch.Generator().manual_seed(11))
    result = cnftools.velocity_and_divergence(field, x, t, spec)
    estimate, stderr = result.divergence, result.stderr
    assert result.n_probes == n_probes
    true_stderr = (hutchinson_variance(jac, noise) / n_probes).sqrt()
    # Unbiased: the mean of K iid probes is within 5 true standard errors (two-sided normal
    # probability of failure ~6e-7 per sample; the seed is fixed, so this is deterministic).
    assert bool(((estimate - exact).abs() <= 5 * true_stderr).all())
    # The reported standard error estimates the true one: relative sampling error of a sample
    # std over 4000 draws is ~ sqrt(kurtosis / 4K) < 5% here; allow 15%.
    torch.testing.assert_close(stderr, true_stderr, rtol=0.15, atol=0.0)


def test_hutchinson_rademacher_exact_for_diagonal_jacobian() -> None:
    # e^T A e = tr A for diagonal A and e_i^2 = 1: one Rademacher probe is exact.
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    field = lambda x, t: torch.sin(x) * t.reshape(-1, 1, 1)  # noqa: E731
    estimate = cnftools.divergence(
        field, x, 0.7, Hutchinson(generator=torch.Generator().manual_seed(0))
    )
    expected = 0.7 * torch.cos(x).sum((1, 2))
    torch.testing.assert_close(estimate, expected, rtol=1e-14, atol=1e-14)


def test_hutchinson_fixed_probes_reproduce_and_match_manual(dtype: torch.dtype) -> None:
    field = SmoothMLP((2, 2), seed=5).to(dtype)
    x = torch.randn(4, 2, 2, dtype=dtype)
    t = torch.full((4,), 0.6, dtype=dtype)
    probes = torch.randn(3, 4, 2, 2, dtype=dtype, generator=torch.Generator().manual_seed(3))
    first = cnftools.divergence(field, x, t, Hutchinson(probes=probes))
    second = cnftools.divergence(field, x, t, Hutchinson(probes=probes))
    assert torch.equal(first, second)  # same probes, same arithmetic: bitwise equal
    jac = per_sample_jacobian(field, x, t)
    eps = probes.reshape(3, 4, 4)
    manual = torch.einsum("kbi,bij,kbj->b", eps, jac, eps) / 3
    # A handful of products and sums of O(1) numbers: ulp-level rounding.
    torch.testing.assert_close(first, manual, rtol=REL_TOL[dtype] * 10, atol=REL_TOL[dtype] * 10)
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    a = cnftools.divergence(field, x, t, Hutchinson(2, generator=gen()))
    b = cnftools.divergence(field, x, t, Hutchinson(2, generator=gen()))
    assert torch.equal(a, b)


def test_hutchinson_create_graph_and_no_grad() -> None:
    field = SmoothMLP((3,)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    probes = torch.ones(1, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        est = cnftools.divergence(field, x, 0.5, Hutchinson(probes=probes))
    assert not est.requires_grad
    est = cnftools.divergence(field, x, 0.5, Hutchinson(probes=probes), create_graph=True)
    grads = torch.autograd.grad(est.sum(), list(field.parameters()), allow_unused=True)
    # Every parameter but the last bias (which does not enter the Jacobian) gets a gradient.
    assert all(g is not None for g in grads[:-1]) and grads[-1] is None


# ---------------------------------------------------------------------------------------------
# Bad inputs
def identity(x: Tensor, t: Tensor) -> Tensor:
    return x


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"estimator": "trace"}, TypeError, "estimator must be a divergence spec"),
        ({"estimator": "exact"}, TypeError, r"write estimator=cnftools\.Exact\(\)"),
        ({"estimator": "loop"}, TypeError, r"write estimator=cnftools\.Exact\(\"loop\"\)"),
        ({"estimator": "hutchinson"}, TypeError, r"write estimator=cnftools\.Hutchinson\(\)"),
        ({"estimator": 3}, TypeError, "estimator must be a divergence spec"),
        ({"create_graph": 1}, TypeError, "create_graph must be a bool"),
        ({"return_result": True}, TypeError, "return_result"),
        ({"estimator": Hutchinson(probes=torch.ones(3, 3))}, ValueError, r"must have shape"),
        ({"estimator": Hutchinson(probes=torch.ones(1, 2, 4))}, ValueError, r"must have shape"),
        (
            {"estimator": Hutchinson(probes=torch.ones(1, 2, 3, dtype=torch.float64))},
            TypeError,
            "dtype",
        ),
    ],
)
def test_bad_arguments_raise(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cnftools.divergence(identity, torch.zeros(2, 3), 0.5, **kwargs)


def test_one_probe_may_be_given_without_its_probe_axis() -> None:
    """``Hutchinson(probes=P)`` with ``P`` of shape ``(B, *event)`` is one probe: the same numbers
    as ``P[None]`` (bitwise: the same arithmetic)."""
    field = SmoothMLP((3,), seed=2).double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    probe = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    one = cnftools.divergence(field, x, 0.4, Hutchinson(probes=probe))
    assert torch.equal(one, cnftools.divergence(field, x, 0.4, Hutchinson(probes=probe[None])))


@pytest.mark.parametrize("spec", ALL_EXACT, ids=str)
def test_bad_fields_raise(spec: Exact | None) -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"<lambda> returned shape \(2,\)"):
        cnftools.divergence(lambda x, t: x.sum(1), x, 0.5, spec)
    with pytest.raises(ValueError, match="does not depend on x"):
        cnftools.divergence(lambda x, t: torch.ones_like(x), x, 0.5, spec)
    with pytest.raises(ValueError, match="does not depend on x"):
        cnftools.divergence(lambda x, t: x.detach() * 2, x, 0.5, spec)


def test_bad_x_and_t_raise() -> None:
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        cnftools.divergence(identity, torch.zeros(2, 3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="x must have shape"):
        cnftools.divergence(identity, torch.zeros(3), 0.5)
    with pytest.raises(ValueError, match="t must lie in"):
        cnftools.divergence(identity, torch.zeros(2, 3), -0.1)
    with pytest.raises(TypeError, match="callable"):
        cnftools.divergence("field", torch.zeros(2, 3), 0.5)  # type: ignore[arg-type]


# --- through the public testing kit -----------------------------------------------------------


@pytest.mark.parametrize("strategy", ["batched", "loop", "forward"])
@pytest.mark.parametrize("event", [(3,), (2, 3)])
@given(seed=st.integers(0, 10_000), t=st.floats(0.0, 1.0))
@settings(max_examples=8)
def test_every_strategy_through_the_testing_kit(strategy, event, seed, t):
    """``assert_divergence_matches_jacobian`` (float64 default: 1e-10 relative to max|J|·d) on the
    kit's own random MLP fields, for each exact strategy."""
    from cnftools.testing import assert_divergence_matches_jacobian, random_mlp_field

    field = random_mlp_field(event, seed=seed)
    x = torch.randn((5, *event), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    exact = cnftools.divergence(field, x, t, Exact(strategy))
    assert_divergence_matches_jacobian(field, x, t, exact)


# ----------------------------------------------------------------------------------------------
# The divergence-strategy object: one fast path for divergence() and the likelihood engine


class _NoVmapDouble(torch.autograd.Function):
    """2 x whose backward asks a question vmap cannot answer, as a diffusers UNet does."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return 2 * x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad.is_contiguous(memory_format=torch.channels_last)  # NYI inside vmap
        return 2 * grad


class NoVmapField(nn.Module):
    """v(x, t) = tanh(2 x) (1 + t): fine for single VJPs, fails under batched (vmapped) VJPs."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(_NoVmapDouble.apply(x)) * (1 + t[:, None])


def _no_vmap_divergence(x: Tensor, t: float) -> Tensor:
    # d/dx tanh(2x) (1 + t) = 2 (1 - tanh^2(2x)) (1 + t), summed over the d entries
    return (2 * (1 - torch.tanh(2 * x) ** 2) * (1 + t)).sum(dim=1)


@pytest.mark.parametrize("method", ["exact", "hutchinson"])
def test_batched_vjp_failure_falls_back_to_the_loop(method: str) -> None:
    """Batched exact VJPs and batched Hutchinson probes (K > 1) both fall back, loudly, and give
    the numbers of the loop (float64: rounding only, 1e-12)."""
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probes = torch.randn(5, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spec = Hutchinson(probes=probes) if method == "hutchinson" else Exact("auto")
    with pytest.warns(RuntimeWarning, match="vmap"):
        div = cnftools.divergence(NoVmapField(), x, 0.5, spec)
    if method == "exact":
        expected = _no_vmap_divergence(x, 0.5)
    else:  # the mean over probes of eps^T diag(J) eps, J diagonal here
        diag = 2 * (1 - torch.tanh(2 * x) ** 2) * 1.5
        expected = (probes**2 * diag).sum(dim=2).mean(dim=0)
    torch.testing.assert_close(div, expected, rtol=1e-12, atol=1e-12)


def test_likelihood_engine_uses_the_same_fallback_for_hutchinson() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    probes = torch.randn(3, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match="vmap"):
        lp = cnftools.log_likelihood(
            NoVmapField(),
            x,
            estimator=Hutchinson(probes=probes),
            config=cnftools.SolverConfig("rk4", steps=4),
        ).log_prob
    assert lp.shape == (3,) and bool(torch.isfinite(lp).all())


class ClosedSmoothMLP(SmoothMLP):
    """SmoothMLP with a ``divergence(x, t)`` method (its autograd trace, the plain loop)."""

    def divergence(self, x: Tensor, t: Tensor) -> Tensor:
        return jacobian_trace(self, x, t)


@pytest.mark.parametrize("kind", ["exact", "hutchinson", "closed_form", "default"])
def test_evaluator_matches_divergence(kind: str) -> None:
    field = ClosedSmoothMLP((3,)).double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.full((5,), 0.3, dtype=torch.float64)
    if kind == "exact":
        spec = Exact()
        expected = cnftools.divergence(field, x, t, Exact("loop"))[:, None]
    elif kind == "hutchinson":
        spec = Hutchinson(4, "gaussian", generator=torch.Generator().manual_seed(5))
        probes = Hutchinson(4, "gaussian", generator=torch.Generator().manual_seed(5)).draw(x)
        expected = torch.stack(
            [cnftools.divergence(field, x, t, Hutchinson(probes=p[None])) for p in probes], 1
        )
    else:  # ClosedForm(), and None for a field that has one: its own divergence(x, t)
        spec = cnftools.ClosedForm() if kind == "closed_form" else None
        expected = jacobian_trace(field, x, t)[:, None]
    evaluator = DivergenceEvaluator.for_spec(field, spec, x)
    assert evaluator.kind == {"default": "closed_form"}.get(kind, kind)
    velocity, columns = evaluator(field, x, t)
    assert columns.shape == (5, evaluator.columns)
    assert evaluator.columns == (4 if kind == "hutchinson" else 1)
    torch.testing.assert_close(velocity, field(x, t).detach(), rtol=0, atol=0)
    torch.testing.assert_close(columns, expected, rtol=1e-12, atol=1e-12)
    assert velocity.grad_fn is None and columns.grad_fn is None


@pytest.mark.parametrize("batch", [2, 64])
def test_auto_strategy_gives_the_loop_numbers(batch: int) -> None:
    """Whatever the size rule picks, every call gives the trace (float64: 1e-12 relative)."""
    field = SmoothMLP((6,)).double()
    x = torch.randn(batch, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    t = torch.full((batch,), 0.7, dtype=torch.float64)
    evaluator = DivergenceEvaluator.for_spec(field, Exact(), x)
    expected = cnftools.divergence(field, x, t, Exact("loop"))
    _, columns = evaluator(field, x, t)
    torch.testing.assert_close(columns[:, 0], expected, rtol=1e-12, atol=1e-12)


def test_closed_form_spec_refuses_a_field_without_one() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"ClosedForm\(\) but the field identity has no"):
        DivergenceEvaluator.for_spec(identity, cnftools.ClosedForm(), x)
    with pytest.raises(ValueError, match=r"ClosedForm\(\) but the field identity has no"):
        cnftools.divergence(identity, x, 0.5, cnftools.ClosedForm())


def test_extras_reach_the_field_in_divergence() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    scale = torch.arange(1.0, 5.0, dtype=torch.float64)

    def field(x: Tensor, t: Tensor, *, scale: Tensor, shift: float) -> Tensor:
        return scale[:, None] * x + shift

    div = cnftools.divergence(field, x, 0.5, extras={"scale": scale, "shift": 2.0})
    torch.testing.assert_close(div, 3 * scale, rtol=0, atol=1e-12)
    result = cnftools.velocity_and_divergence(field, x, 0.5, extras={"scale": scale, "shift": 1.0})
    torch.testing.assert_close(result.velocity, scale[:, None] * x + 1.0)
    torch.testing.assert_close(result.divergence, 3 * scale, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Result types: divergence() is always a (B,) tensor; velocity_and_divergence() a DivergenceResult


@pytest.mark.parametrize(
    ("spec", "n_probes", "has_stderr"),
    [
        (None, None, False),
        (Exact("loop"), None, False),
        (Hutchinson(1), 1, False),
        (Hutchinson(8), 8, True),
    ],
    ids=str,
)
def test_divergence_is_a_tensor_and_the_result_form_agrees(
    spec: Exact | Hutchinson | None, n_probes: int | None, has_stderr: bool
) -> None:
    field = SmoothMLP((3,), seed=1).to(torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def seeded() -> Exact | Hutchinson | None:  # the same probes for both calls
        if isinstance(spec, Hutchinson):
            return Hutchinson(spec.n_probes, generator=torch.Generator().manual_seed(0))
        return spec

    plain = cnftools.divergence(field, x, 0.3, seeded())
    result = cnftools.velocity_and_divergence(field, x, 0.3, seeded())
    assert isinstance(plain, torch.Tensor) and plain.shape == (5,)
    assert isinstance(result, cnftools.DivergenceResult) and result.n_probes == n_probes
    # Same probes (same seed), same computation: equal to rounding.
    torch.testing.assert_close(result.divergence, plain, rtol=0, atol=1e-12)
    assert (result.stderr is not None) == has_stderr
    if has_stderr:
        assert result.stderr.shape == (5,) and bool((result.stderr > 0).all())


def test_velocity_and_divergence_result_form() -> None:
    """velocity_and_divergence gives a DivergenceResult whose divergence equals divergence()'s
    bit for bit (same probes), with the Hutchinson standard error for K >= 2: the sample standard
    deviation of the per-probe columns over sqrt(K), computed here by hand."""

    def tanh_field(z: Tensor, t: Tensor) -> Tensor:
        return torch.tanh(z @ weight) * (1 + t[:, None])

    weight = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    probes = torch.randn(3, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    plain = cnftools.divergence(tanh_field, x, 0.3, Hutchinson(probes=probes))
    result = cnftools.velocity_and_divergence(tanh_field, x, 0.3, Hutchinson(probes=probes))
    torch.testing.assert_close(
        result.velocity, tanh_field(x, torch.full((4,), 0.3, dtype=torch.float64)), rtol=0, atol=0
    )
    torch.testing.assert_close(result.divergence, plain, rtol=0, atol=0)
    assert result.n_probes == 3 and result.stderr is not None and result.stderr.shape == (4,)
    columns = torch.stack(
        [cnftools.divergence(tanh_field, x, 0.3, Hutchinson(probes=p)) for p in probes], dim=1
    )
    mean = columns.mean(dim=1, keepdim=True)
    by_hand = (((columns - mean) ** 2).sum(dim=1) / 2).sqrt() / math.sqrt(3)
    # A few float64 operations on O(1) numbers: rounding only.
    torch.testing.assert_close(result.stderr, by_hand, rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# The auto strategy: a rule of sizes, never of timings


@pytest.mark.parametrize(
    ("batch", "dim", "expected"),
    [
        (256, 64, ("batched", 16)),
        (256, 16, ("batched", 16)),
        (16, 64, ("batched", 64)),
        (512, 64, ("loop", 1)),
        (4096, 2, ("loop", 1)),
        (2048, 2, ("batched", 2)),
        (1, 2, ("batched", 2)),
    ],
)
def test_auto_strategy_is_a_rule_of_sizes(batch: int, dim: int, expected: tuple) -> None:
    assert choose_strategy(batch, dim, torch.device("cpu")) == expected


def test_strategies_round_differently_so_the_choice_is_not_timed() -> None:
    """Why the choice is a rule of sizes: at small batches a batched pass and single VJPs give
    the Jacobian's diagonal with different last bits (matrix products of other shapes round
    differently), so picking the faster of the two by timing would make the numbers depend on
    the machine's load. Same inputs, same strategy: identical bits."""
    torch.manual_seed(0)
    field = cnftools.MLPField(16, hidden=[32, 32]).double()
    x = torch.randn(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 0.3, dtype=torch.float64)
    loop = cnftools.divergence(field, x, t, Exact("loop"))
    batched = cnftools.divergence(field, x, t, Exact("batched"))
    torch.testing.assert_close(batched, loop, rtol=1e-13, atol=1e-13)  # the same trace
    again = cnftools.divergence(field, x, t, Exact("batched"))
    assert torch.equal(batched, again)


def _mlp_divergence(
    dim: int, batch: int, spec: Exact, rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> Tensor:
    """The exact divergence of a seeded 2x128 ``MLPField`` at ``batch`` points; ``rows`` (if
    given) replaces the batched rows per backward pass, so ``Exact("batched")`` takes
    ``rows // batch`` basis vectors per pass."""
    import cnftools._divergence_evaluator as evaluator_module

    if rows is not None:
        monkeypatch.setitem(evaluator_module.BATCHED_ROWS, "cpu", rows)
    torch.manual_seed(0)
    field = cnftools.MLPField(dim, hidden=[128, 128]).double()
    x = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), 0.4, dtype=torch.float64)
    return cnftools.divergence(field, x, t, spec)


@pytest.mark.parametrize(
    ("dim", "batch", "chunks"),
    [(8, 256, (2, 4, 8)), (64, 64, (16, 32, 64))],
    ids=["d=8,B=256", "d=64,B=64"],
)
def test_one_chunk_or_several_give_the_same_bits(
    dim: int, batch: int, chunks: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a given batch, batched passes of any chunk size compute the same diagonal entries, and
    the diagonal is reduced in one order whatever the number of chunks: the same bits (atol 0).
    Before, one chunk (``"auto"``'s choice at these sizes) was summed as a strided view of the
    batched gradient, in another order than several chunks' concatenation: 1e-15 apart."""
    results = [
        _mlp_divergence(dim, batch, Exact("batched"), batch * chunk, monkeypatch)
        for chunk in chunks
    ]
    assert all(torch.equal(result, results[0]) for result in results[1:])


@pytest.mark.parametrize(("dim", "batch"), [(8, 256), (64, 64)], ids=["d=8,B=256", "d=64,B=64"])
def test_auto_and_the_loop_give_the_same_bits_at_a_batch(
    dim: int, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``"auto"`` takes one batched pass here, the loop ``d`` single VJPs: at this batch (large
    enough for the matrix products to round each row alike, measured on this CPU build) the
    entries agree, and the one reduction order makes the divergences agree bit for bit (atol 0;
    before, 1e-15 apart). At B = 3 they may not (see the test below)."""
    auto = _mlp_divergence(dim, batch, Exact(), None, monkeypatch)
    loop = _mlp_divergence(dim, batch, Exact("loop"), None, monkeypatch)
    assert torch.equal(auto, loop)


def test_the_loop_seeds_the_values_of_a_column_sum() -> None:
    """The loop's cotangent ``e_i`` on every row holds what the gradient of ``y[:, i].sum()``
    seeds (the form it replaced, written here by hand): the same diagonal, bit for bit."""
    torch.manual_seed(0)
    field = cnftools.MLPField(6, hidden=[32, 32]).double()
    x = torch.randn(9, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.full((9,), 0.7, dtype=torch.float64)
    with torch.enable_grad():
        x_in = x.clone().requires_grad_(True)
        y = field(x_in, t)
        by_sums = torch.stack(
            [
                torch.autograd.grad(y[:, i].sum(), x_in, retain_graph=True)[0][:, i]
                for i in range(6)
            ],
            dim=1,
        ).sum(dim=1)
    assert torch.equal(cnftools.divergence(field, x, t, Exact("loop")), by_sums)


def test_a_field_that_cannot_be_weakly_referenced_works() -> None:
    class Slotted:
        __slots__ = ()

        def __call__(self, x: Tensor, t: Tensor) -> Tensor:
            return torch.tanh(x) * (1 + t[:, None])

    field = Slotted()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.full((4,), 0.2, dtype=torch.float64)
    _, columns = DivergenceEvaluator.for_spec(field, Exact(), x)(field, x, t)
    expected = (1 - torch.tanh(x) ** 2).sum(dim=1) * 1.2  # d/dx tanh(x) (1 + t), summed
    torch.testing.assert_close(columns[:, 0], expected, rtol=1e-12, atol=1e-12)
