"""Tests of cnftools.testing: every strategy draws what it promises, every assertion passes on a
correct case and fails, with a message that explains the failure, on a wrong one.

Theory sections cited here (pages under ``docs/theory/``):

- §4: ``docs/theory/divergence-and-continuity.md#continuity-equation``
- §9: ``docs/theory/marginals.md#gaussian-data``
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cnftools
from cnftools import SolverConfig
from cnftools.cases import DATA_CASES, PATH_CASES
from cnftools.testing import (
    SMOOTH_ACTIVATIONS,
    MixtureParameters,
    assert_divergence_matches_jacobian,
    assert_generates,
    assert_log_likelihood_close,
    assert_theorem3,
    gaussian_mixtures,
    gaussian_paths,
    jacobian_trace,
    mlp_fields,
    points,
    quick_settings,
    random_mlp_field,
    spd_matrices,
    times,
)

F64 = torch.float64


def _draw(shape: tuple[int, ...], seed: int, dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- strategies ---------------------------------------------------------------------------------


@given(S=spd_matrices(4, min_eigenvalue=0.2, max_eigenvalue=3.0))
def test_spd_matrices_are_symmetric_with_eigenvalues_in_range(S):
    """Exactly symmetric; eigenvalues in [0.2, 3] up to 1e-12 (eigvalsh roundoff on entries ≤ 3)."""
    assert S.shape == (4, 4) and S.dtype == F64
    assert torch.equal(S, S.T)
    eigenvalues = torch.linalg.eigvalsh(S)
    assert float(eigenvalues.min()) >= 0.2 - 1e-12
    assert float(eigenvalues.max()) <= 3.0 + 1e-12


@given(S=spd_matrices(2, dtype=torch.float32))
def test_spd_matrices_follow_dtype(S):
    assert S.dtype == torch.float32 and torch.equal(S, S.T)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dim": 0}, "dim must be an int >= 1"),
        ({"dim": 2, "min_eigenvalue": 0.0}, "min_eigenvalue"),
        ({"dim": 2, "min_eigenvalue": 2.0, "max_eigenvalue": 1.0}, "min_eigenvalue"),
    ],
)
def test_spd_matrices_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spd_matrices(**kwargs)


@given(params=gaussian_mixtures(3, max_components=5, min_weight=0.1))
def test_gaussian_mixtures_are_valid_and_build_a_marginal(params):
    """Shapes agree, weights sum to 1 (1e-12: one float64 normalisation), covariances SPD."""
    assert isinstance(params, MixtureParameters)
    k = params.means.shape[0]
    assert 1 <= k <= 5
    assert params.means.shape == (k, 3) and params.covs.shape == (k, 3, 3)
    assert params.weights.shape == (k,)
    assert abs(float(params.weights.sum()) - 1.0) <= 1e-12
    assert float(params.weights.min()) > 0
    assert float(torch.linalg.eigvalsh(params.covs).min()) > 0
    marginal = cnftools.MixtureMarginal(cnftools.OTPath(0.1), *params)
    assert marginal.num_components == k


def test_gaussian_mixtures_reject_bad_arguments():
    with pytest.raises(ValueError, match="min_components"):
        gaussian_mixtures(2, min_components=3, max_components=2)
    with pytest.raises(ValueError, match="min_weight"):
        gaussian_mixtures(2, min_weight=0.0)


@given(x=points((2, 3), min_batch=2, max_batch=5, scale=2.0, dtype=torch.float32))
def test_points_have_the_promised_shape_dtype_and_range(x):
    assert x.dtype == torch.float32
    assert 2 <= x.shape[0] <= 5 and x.shape[1:] == (2, 3)
    assert float(x.abs().max()) <= 2.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"event_shape": ()}, "event_shape"),
        ({"event_shape": (2, 0)}, "event_shape"),
        ({"min_batch": 0}, "min_batch"),
        ({"scale": -1.0}, "scale"),
    ],
)
def test_points_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        points(**kwargs)


@given(t=times(margin=1e-3))
def test_times_avoid_the_singular_end(t):
    assert 0.0 <= t <= 1.0 - 1e-3


@pytest.mark.parametrize("activation", SMOOTH_ACTIVATIONS)
def test_random_mlp_field_is_seeded_and_leaves_the_global_rng_alone(activation):
    """Same seed, same field (bit for bit); the global RNG state is unchanged."""
    state = torch.get_rng_state()
    a = random_mlp_field(3, seed=7, activation=activation)
    b = random_mlp_field(3, seed=7, activation=activation)
    c = random_mlp_field(3, seed=8, activation=activation)
    assert torch.equal(torch.get_rng_state(), state)
    x, t = _draw((4, 3), 0), torch.rand(4, dtype=F64)
    assert torch.equal(a(x, t), b(x, t))
    assert not torch.equal(a(x, t), c(x, t))


def test_random_mlp_field_follows_dtype_and_refuses_relu():
    v = random_mlp_field((2, 2), dtype=torch.float32)
    assert v(torch.zeros(3, 2, 2), torch.zeros(3)).dtype == torch.float32
    with pytest.raises(ValueError, match="smooth"):
        random_mlp_field(2, activation="relu")


# --- assert_theorem3 ------------------------------------------------------------------------------


def test_assert_theorem3_passes_and_explains_a_failure():
    """A correct path passes at 1e-10 (float64 roundoff); a 1 % error in the field is reported."""
    x1 = _draw((6, 3), 0)
    assert_theorem3(cnftools.OTPath(0.1), x1, 0.4)

    class Wrong(cnftools.OTPath):
        def conditional_velocity(self, x, t, x1):
            return 1.01 * super().conditional_velocity(x, t, x1)

    with pytest.raises(AssertionError, match=r"Theorem 3 fails .* > rtol .* worst row \d+ at t ="):
        assert_theorem3(Wrong(0.1), x1, 0.4)


# --- assert_divergence_matches_jacobian -----------------------------------------------------------


def _linear_field(matrix: torch.Tensor):
    return lambda x, t: x @ matrix.T + t[:, None]


def test_jacobian_trace_of_a_linear_field_is_the_matrix_trace():
    """tr A written by hand: -2 (exact in float64: sums of small integers)."""
    matrix = torch.tensor([[1.0, 2.0, 0.0], [0.0, -3.0, 1.0], [4.0, 0.0, 0.0]], dtype=F64)
    trace = jacobian_trace(_linear_field(matrix), _draw((5, 3), 1), torch.rand(5, dtype=F64))
    assert torch.equal(trace, torch.full((5,), -2.0, dtype=F64))


@pytest.mark.parametrize("activation", SMOOTH_ACTIVATIONS)
def test_divergence_assertion_passes_on_a_closed_form(activation, dtype):
    """A 1-hidden-layer tanh/... MLP's divergence written out by hand passes.

    v(x) = W2 φ(W1 x + b), div v = Σ_j φ'(h_j) (W1 W2)_jj; φ' by autograd of the scalar
    activation, which is independent of the Jacobian reference. Default tolerances (1e-10 float64,
    1e-4 float32: a d-term sum of O(1) products).
    """
    gen = torch.Generator().manual_seed(3)
    w1 = torch.randn(6, 3, generator=gen, dtype=dtype)
    w2 = torch.randn(3, 6, generator=gen, dtype=dtype)
    phi = {
        "tanh": torch.tanh,
        "silu": torch.nn.functional.silu,
        "softplus": torch.nn.functional.softplus,
        "gelu": torch.nn.functional.gelu,
    }[activation]

    def v(x, t):
        return phi(x @ w1.T + t[:, None]) @ w2.T

    def div(x, t):
        h = (x @ w1.T + t[:, None]).detach().requires_grad_(True)
        (dphi,) = torch.autograd.grad(phi(h).sum(), h)
        return dphi @ torch.diagonal(w1 @ w2)

    x = _draw((7, 3), 2, dtype)
    assert_divergence_matches_jacobian(v, x, torch.rand(7, dtype=dtype), div)


def test_divergence_assertion_uses_a_marginals_closed_form_divergence():
    """With no divergence given, a marginal's own ``divergence`` is checked (1e-10, float64)."""
    case = DATA_CASES["mixture K=4 d=2"]
    marginal = case.marginal(cnftools.OTPath(0.1))
    assert_divergence_matches_jacobian(marginal, _draw((6, 2), 4), 0.6, rtol=1e-10)


def test_divergence_assertion_explains_a_wrong_divergence():
    """Off by 1e-3 on a trace of -2: caught, message names the row, both values and diag(J)."""
    matrix = torch.tensor([[1.0, 2.0], [0.5, -3.0]], dtype=F64)
    x = _draw((5, 2), 5)

    def wrong(x, t):
        out = torch.full((5,), -2.0, dtype=F64)
        out[3] += 1e-3
        return out

    with pytest.raises(AssertionError) as info:
        assert_divergence_matches_jacobian(_linear_field(matrix), x, 0.25, wrong)
    message = str(info.value)
    assert "row 3 (t = 0.25)" in message
    assert "the given divergence = -1.999" in message
    assert "tr J = -2" in message
    assert "diag(J) = [1, -3]" in message


def test_divergence_assertion_rejects_a_wrong_shape():
    x = _draw((4, 2), 6)
    with pytest.raises(AssertionError, match=r"shape \(B,\) = \(4,\)"):
        assert_divergence_matches_jacobian(lambda x, t: x, x, 0.5, torch.zeros(4, 1, dtype=F64))
    with pytest.raises(AssertionError, match="must return the shape of x"):
        assert_divergence_matches_jacobian(lambda x, t: x[:, :1], x, 0.5, torch.zeros(4))


@settings(max_examples=10)
@given(v=mlp_fields(3), t=times(), seed=st.integers(0, 2**16))
def test_divergence_assertion_on_random_fields_with_their_own_jacobian(v, t, seed):
    """Property: the reference agrees with a torch.func.jacrev Jacobian (1e-12: same maths)."""
    x = _draw((3, 3), seed)
    tt = torch.full((3,), t, dtype=F64)
    jac = torch.func.vmap(torch.func.jacrev(lambda xi, ti: v(xi[None], ti[None])[0]))(x, tt)
    expected = torch.diagonal(jac, dim1=1, dim2=2).sum(dim=1).detach()
    assert math.isfinite(float(expected.sum()))
    assert_divergence_matches_jacobian(v, x, tt, expected, rtol=1e-12)


def test_messages_are_single_line_and_mention_tolerances():
    x = _draw((2, 2), 7)
    with pytest.raises(AssertionError) as info:
        assert_divergence_matches_jacobian(lambda x, t: 2 * x, x, 0.5, torch.zeros(2, dtype=F64))
    assert re.search(r"atol \+ rtol·scale = 0\.0e\+00 \+ 1\.0e-10·", str(info.value))


# --- assert_generates -----------------------------------------------------------------------------


def _conditional(path, x1):
    return (
        lambda x, t: path.log_prob(x, t, x1),
        lambda x, t: path.conditional_velocity(x, t, x1),
    )


@given(path=gaussian_paths(), t=times(margin=1e-2), seed=st.integers(0, 2**16))
def test_assert_generates_passes_on_every_conditional_path(path, t, seed):
    """Theorem 3's field generates its own Gaussian path: default rtol 1e-9 in float64.

    The closed-form cases reach ~1e-14 relative (theory §4; measured ≤ 6e-15 over PATH_CASES).
    """
    x1 = 2 * _draw((6, 3), seed)
    x = path.sample(t, x1, torch.Generator().manual_seed(seed + 1))
    log_p, u = _conditional(path, x1)
    assert_generates(log_p, u, x, t)


@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_assert_generates_float32(name):
    """float32, default rtol 1e-3 (measured ≤ 1.2e-4, VP(0.1, 20) at t = 0.9 the worst)."""
    path = PATH_CASES[name].build()
    x1 = 2 * _draw((8, 3), 0, torch.float32)
    t = torch.linspace(0.0, 0.9, 8, dtype=torch.float32)
    x = path.sample(t, x1, torch.Generator().manual_seed(1))
    assert_generates(*_conditional(path, x1), x, t)


@pytest.mark.parametrize(
    "data", ["gaussian d=3", "mixture K=4 d=2", "empirical N=40 d=3 (weighted)"]
)
@pytest.mark.parametrize("estimator", [cnftools.Exact(), cnftools.ClosedForm()], ids=str)
def test_assert_generates_on_marginal_fields(data, estimator):
    """Theorem 1 in closed form: the marginal field generates the marginal path (rtol 1e-9)."""
    marginal = DATA_CASES[data].marginal(cnftools.VPPath())
    x = marginal.sample(8, 0.6, torch.Generator().manual_seed(2))
    assert_generates(marginal.log_prob, marginal, x, 0.6, estimator=estimator)


def test_assert_generates_explains_a_wrong_field():
    """A field 5 % too fast fails, and the message names the row, r, the ratio and the terms."""
    path = cnftools.OTPath(0.1)
    x1 = _draw((6, 2), 3)
    x = path.sample(0.5, x1, torch.Generator().manual_seed(4))
    log_p, u = _conditional(path, x1)
    with pytest.raises(AssertionError) as info:
        assert_generates(log_p, lambda x, t: 1.05 * u(x, t), x, 0.5)
    message = str(info.value)
    assert "continuity equation fails" in message
    assert re.search(r"row \d \(t = 0\.5\): residual r = ", message)
    assert re.search(r"\|r\| / scale = [0-9.e+-]+ > rtol 1\.0e-09", message)
    for term in ("d/dt log p = ", "div v = ", "v·grad log p = "):
        assert term in message
    assert "of 6 rows fail" in message


def test_assert_generates_explains_a_field_of_another_path():
    """The OT field does not generate the VE path (same data): caught."""
    x1 = _draw((4, 2), 5)
    ve = cnftools.VEPath(0.1, 5.0)
    x = ve.sample(0.3, x1, torch.Generator().manual_seed(6))
    ot_field = _conditional(cnftools.OTPath(0.1), x1)[1]
    with pytest.raises(AssertionError, match="does not generate the path"):
        assert_generates(_conditional(ve, x1)[0], ot_field, x, 0.3)


# --- assert_log_likelihood_close ----------------------------------------------------------------


PATHS = {
    "OT": lambda: cnftools.OTPath(0.1),
    "VE": lambda: cnftools.VEPath(0.1, 5.0),
    "VP": lambda: cnftools.VPPath(),
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_assert_log_likelihood_close_passes_with_the_true_prior(name, dtype):
    """ODE log p_1 of the Gaussian marginal field = log N(x; m, a_1² S + s_1² I) (theory §9).

    Default tolerances: 1e-6 nats in float64 with solver tolerance 1e-9 (measured ≤ 3e-9), 1e-3
    in float32 with solver tolerance 1e-6 (measured ≤ 1e-5).
    """
    marginal = DATA_CASES["gaussian d=3"].marginal(PATHS[name](), dtype)
    x = marginal.sample(4, 1.0, torch.Generator().manual_seed(7))
    assert_log_likelihood_close(marginal, x, lambda x: marginal.log_prob(x, 1.0), marginal.prior())


def test_assert_log_likelihood_close_explains_the_wrong_prior():
    """VP's p_0 is not N(0, I): scoring z_0 under N(0, I) misses by ~1e-2 nats here; caught."""
    marginal = DATA_CASES["gaussian d=3"].marginal(cnftools.VPPath())
    x = marginal.sample(4, 1.0, torch.Generator().manual_seed(8))
    with pytest.raises(AssertionError) as info:
        assert_log_likelihood_close(marginal, x, lambda x: marginal.log_prob(x, 1.0))
    message = str(info.value)
    assert re.search(r"at row \d: ODE log p_1\(x\) = .*, expected .*, \|difference\| = ", message)
    assert "log prior(z0) = " in message and "∫div v dt = " in message
    assert "field evaluations (dopri5, rtol=1e-09, atol=1e-09)" in message
    assert "true p_0" in message


@pytest.mark.parametrize(
    ("config", "hutchinson", "described"),
    [
        (SolverConfig("rk4", steps=200), False, r"rk4, 200 steps, Exact\(strategy='auto'\)"),
        (SolverConfig(rtol=1e-8, atol=1e-8), True, "1e-08, Hutchinson with 2 probes"),
    ],
)
def test_assert_log_likelihood_close_takes_a_solver_config(
    config: SolverConfig, hutchinson: bool, described: str
):
    """Solver settings come as a SolverConfig; the failure message names them.

    VP's p_0 is not N(0, I) (~1e-2 nats here), so the comparison under N(0, I) fails whatever the
    solver; with the true prior, rk4 with 200 steps is within 1e-6 (error ~ 200^-4 ~ 1e-9).
    """
    marginal = DATA_CASES["gaussian d=3"].marginal(cnftools.VPPath())
    x = marginal.sample(4, 1.0, torch.Generator().manual_seed(8))
    generator = torch.Generator().manual_seed(0)
    estimator = cnftools.Hutchinson(2, generator=generator) if hutchinson else cnftools.Exact()
    options = {"config": config, "estimator": estimator}
    with pytest.raises(AssertionError, match=f"field evaluations \\(.*{described}"):
        assert_log_likelihood_close(marginal, x, lambda x: marginal.log_prob(x, 1.0), **options)
    if not hutchinson:
        assert_log_likelihood_close(
            marginal, x, lambda x: marginal.log_prob(x, 1.0), marginal.prior(), **options
        )


@pytest.mark.parametrize(
    "gone",
    [
        {"solver": {"rtol": 1e-9}},
        {"divergence": "hutchinson"},
        {"n_probes": 2},
        {"generator": None},
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_assert_log_likelihood_close_refuses_the_0_1_keywords(gone: dict):
    """0.2: solver=, divergence=, n_probes=, generator= are gone (config=, estimator=)."""
    marginal = DATA_CASES["gaussian d=3"].marginal(cnftools.OTPath(0.1))
    x = marginal.sample(4, 1.0, torch.Generator().manual_seed(7))
    with pytest.raises(TypeError, match=next(iter(gone))):
        assert_log_likelihood_close(marginal, x, lambda x: marginal.log_prob(x, 1.0), **gone)


def test_assert_log_likelihood_close_refuses_a_bad_config_or_estimator():
    marginal = DATA_CASES["gaussian d=3"].marginal(cnftools.OTPath(0.1))
    x = marginal.sample(4, 1.0, torch.Generator().manual_seed(7))
    with pytest.raises(TypeError, match=r"write estimator=cnftools\.Hutchinson\(\)"):
        assert_log_likelihood_close(
            marginal, x, lambda x: marginal.log_prob(x, 1.0), estimator="hutchinson"
        )
    with pytest.raises(TypeError, match=r"config must be a cnftools\.SolverConfig"):
        assert_log_likelihood_close(
            marginal, x, lambda x: marginal.log_prob(x, 1.0), config={"rtol": 1e-9}
        )


def test_assert_log_likelihood_close_explains_a_wrong_target():
    """OT's p_1 is N(m, S + σ_min² I), not q = N(m, S): using log q is caught (σ_min = 0.1)."""
    case = DATA_CASES["gaussian d=3"]
    params = case.parameters()
    marginal = case.marginal(cnftools.OTPath(0.1))
    q = torch.distributions.MultivariateNormal(params["mean"], params["cov"])
    x = marginal.sample(4, 1.0, torch.Generator().manual_seed(9))
    with pytest.raises(AssertionError, match="does not match the closed form"):
        assert_log_likelihood_close(marginal, x, q.log_prob)


def test_assert_log_likelihood_close_checks_the_expected_shape():
    marginal = DATA_CASES["gaussian d=1"].marginal(cnftools.OTPath(0.1))
    x = _draw((3, 1), 10)
    with pytest.raises(AssertionError, match=r"shape \(B,\) = \(3,\)"):
        assert_log_likelihood_close(marginal, x, torch.zeros(3, 1, dtype=F64))


# --- devices ------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_kit_follows_the_device():
    """Strategies build on the requested device; assertions run where the inputs live."""
    device = torch.device("cuda")
    v = random_mlp_field(3, seed=0, device=device)
    x = _draw((5, 3), 11).to(device)
    assert v(x, torch.zeros(5, dtype=F64, device=device)).device.type == "cuda"
    assert_divergence_matches_jacobian(v, x, 0.5)
    path = cnftools.VPPath()
    x1 = _draw((5, 3), 12).to(device)
    xt = path.sample(0.5, x1, torch.Generator(device=device).manual_seed(0))
    assert_generates(*_conditional(path, x1), xt, 0.5)
    marginal = DATA_CASES["gaussian d=3"].marginal(cnftools.OTPath(0.1), device=device)
    x = marginal.sample(4, 1.0, torch.Generator(device=device).manual_seed(1))
    assert_log_likelihood_close(marginal, x, lambda x: marginal.log_prob(x, 1.0), marginal.prior())


# --- the kit's own arguments and behaviour in users' suites (issue 11.7) -----------------------

_OT = cnftools.OTPath(0.1)
_X1 = _draw((4, 2), 20)
_XT = _OT.sample(0.5, _X1, torch.Generator().manual_seed(21))


def _wrong_field(x, t):
    return 1.5 * _OT.conditional_velocity(x, t, _X1)  # does not generate the path


_GAUSSIAN = cnftools.GaussianMarginal(_OT, torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64))
ASSERTIONS = {
    "assert_theorem3 rtol": lambda tol: assert_theorem3(_OT, _X1, 0.5, rtol=tol),
    "assert_generates rtol": lambda tol: assert_generates(
        lambda x, t: _OT.log_prob(x, t, _X1), _wrong_field, _XT, 0.5, rtol=tol
    ),
    "assert_divergence_matches_jacobian rtol": lambda tol: assert_divergence_matches_jacobian(
        _wrong_field, _XT, 0.5, torch.zeros(4, dtype=F64), rtol=tol
    ),
    "assert_divergence_matches_jacobian atol": lambda tol: assert_divergence_matches_jacobian(
        _wrong_field, _XT, 0.5, torch.zeros(4, dtype=F64), atol=tol
    ),
    "assert_log_likelihood_close atol": lambda tol: assert_log_likelihood_close(
        _GAUSSIAN, _XT, torch.zeros(4, dtype=F64), atol=tol
    ),
    "assert_log_likelihood_close rtol": lambda tol: assert_log_likelihood_close(
        _GAUSSIAN, _XT, torch.zeros(4, dtype=F64), rtol=tol
    ),
}


@pytest.mark.parametrize(
    ("tolerance", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-1e-6, ValueError),
        ("1e-6", TypeError),
        (True, TypeError),
    ],
    ids=["nan", "inf", "negative", "str", "bool"],
)
@pytest.mark.parametrize("assertion", sorted(ASSERTIONS))
def test_assertions_refuse_nan_negative_and_non_numeric_tolerances(assertion, tolerance, error):
    """Regression (issue 11.7): rtol=nan made every comparison pass, so assert_generates and
    assert_divergence_matches_jacobian accepted a wrong field. Each tolerance is now validated
    before any work, naming the argument."""
    name = assertion.rsplit(" ", 1)[1]
    with pytest.raises(error, match=f"{name} must be"):
        ASSERTIONS[assertion](tolerance)


def test_assert_theorem3_is_reproducible_with_a_generator():
    """Same generator seed, same x0 draws, same failure message (digit for digit)."""

    class Wrong(cnftools.OTPath):
        def conditional_velocity(self, x, t, x1):
            return 1.01 * super().conditional_velocity(x, t, x1) + 0.01 * x

    messages = []
    for _ in range(2):
        with pytest.raises(AssertionError) as info:
            assert_theorem3(Wrong(0.1), _X1, 0.4, generator=torch.Generator().manual_seed(3))
        messages.append(str(info.value))
    assert messages[0] == messages[1]


def test_quick_settings_report_a_failure_without_shrinking():
    """A failing ODE property under quick_settings runs its body for the first failing example
    plus at most one replay. Under default settings a failing property is shrunk: re-run many
    times (shown with a cheap body; with an ODE per call that took minutes: 338 s, stopped by
    hypothesis' five-minute shrink cap, for a user-path mixture property failing at every example,
    against 27 s with quick_settings, on a loaded 2-core machine). The number of calls, not wall
    time, is what is checked."""
    calls = {"quick": 0, "default": 0}

    @quick_settings(max_examples=5, database=None)
    @given(x=points(2, max_batch=3))
    def quick(x):
        calls["quick"] += 1
        assert_log_likelihood_close(_GAUSSIAN, x, torch.zeros(x.shape[0], dtype=F64))

    @settings(max_examples=5, database=None, deadline=None)
    @given(x=points(2, max_batch=3))
    def default(x):
        calls["default"] += 1
        raise AssertionError("always fails")

    with pytest.raises(AssertionError, match="does not match the closed form"):
        quick()
    with pytest.raises(AssertionError, match="always fails"):
        default()
    assert calls["quick"] <= 2
    assert calls["default"] > 2


_NO_WARNINGS_SCRIPT = """
import math, torch, cnftools
from cnftools.testing import (assert_theorem3, assert_generates, assert_log_likelihood_close,
                              assert_divergence_matches_jacobian, random_mlp_field)
path = cnftools.AffineGaussianPath(lambda t: torch.sin(0.5 * math.pi * t) ** 2,
                                   lambda t: 1 - 0.9 * t)
x1 = torch.randn(4, 2, dtype=torch.float64)
assert_theorem3(path, x1, 0.3)
x = path.sample(0.3, x1)
assert_generates(lambda x, t: path.log_prob(x, t, x1),
                 lambda x, t: path.conditional_velocity(x, t, x1), x, 0.3)
g = cnftools.GaussianPath(lambda t, x1: t * x1, lambda t, x1: 1 - 0.9 * t)
assert_theorem3(g, x1, torch.tensor(0.3, dtype=torch.float64).expand(4))
m = cnftools.GaussianMarginal(path, torch.zeros(2, dtype=torch.float64),
                              torch.eye(2, dtype=torch.float64))
assert_divergence_matches_jacobian(m, x, 0.3)
assert_divergence_matches_jacobian(random_mlp_field(2), x, 0.3)
assert_log_likelihood_close(m, x, lambda x: m.log_prob(x, 1.0), m.prior())
print("ok")
"""


def test_the_kit_emits_no_deprecation_warnings_under_w_error():
    """Regression (issue 11.7): torch's first forward-mode call jit-scripts decompositions and
    warns `torch.jit.script` is deprecated; users' `-W error` runs failed. Run the kit in a fresh
    interpreter with every DeprecationWarning an error and no pyproject filter."""
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", _NO_WARNINGS_SCRIPT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


# --- the printed failures in docs/howto/property-test-your-path.md are the real ones ----------

_HOWTO = Path(__file__).resolve().parents[1] / "docs" / "howto" / "property-test-your-path.md"
_BLOCKS = re.compile(r"^```(python|text)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _expected_pattern(text: str) -> str:
    """The printed text, with `0x...` (object addresses) matching any hex address."""
    parts = text.strip().split("0x...")
    return "0x[0-9a-f]+".join(re.escape(part) for part in parts)


def test_the_howto_prints_what_the_kit_prints(capsys):
    """Each ```python block of the how-to that is followed by a ```text block prints exactly that
    text (object addresses aside): the documented failure output is reproducible."""
    blocks = _BLOCKS.findall(_HOWTO.read_text(encoding="utf-8"))
    namespace: dict[str, object] = {"__name__": "__docs__"}
    checked = 0
    for (kind, code), following in zip(blocks, [*blocks[1:], ("", "")], strict=True):
        if kind != "python":
            continue
        exec(compile(code, f"{_HOWTO.name}", "exec"), namespace)
        printed = capsys.readouterr().out
        if following[0] == "text":
            assert re.fullmatch(_expected_pattern(following[1]), printed.strip()), printed
            checked += 1
    assert checked >= 2


# --- non-finite values are failures, never passes (issue #20, bug 10) --------------------------
def _broken(kind: str):
    """A field v = -x made non-finite: everywhere (NaN or inf) or in one row (row 1, NaN)."""

    def v(x, t):
        if kind == "nan":
            return x * math.nan
        if kind == "inf":
            return x * math.inf
        out = -x.clone()
        out[1] = x[1] * math.nan
        return out

    return v


class _BrokenPath(cnftools.OTPath):
    """OT's conditional velocity made non-finite like ``_broken``."""

    def __init__(self, kind: str) -> None:
        super().__init__(0.1)
        self.kind = kind

    def conditional_velocity(self, x, t, x1):
        return _broken(self.kind)(super().conditional_velocity(x, t, x1), t)


_X4 = _draw((4, 2), 11)
_FINE_LOG_P = lambda x, t: -0.5 * (x**2).sum(1)  # noqa: E731
_CHECKS = {
    "theorem3": lambda kind: assert_theorem3(_BrokenPath(kind), _X4, 0.5),
    "divergence-given": lambda kind: assert_divergence_matches_jacobian(
        _broken(kind), _X4, 0.5, torch.zeros(4, dtype=F64)
    ),
    "divergence-default": lambda kind: assert_divergence_matches_jacobian(_broken(kind), _X4, 0.5),
    "generates-field": lambda kind: assert_generates(_FINE_LOG_P, _broken(kind), _X4, 0.5),
    "generates-density": lambda kind: assert_generates(
        lambda x, t: _broken(kind)(x, t).sum(1), lambda x, t: -x, _X4, 0.5
    ),
    "log-likelihood-field": lambda kind: assert_log_likelihood_close(
        _broken(kind), _X4, torch.zeros(4, dtype=F64), config=SolverConfig("rk4", steps=2)
    ),
    "log-likelihood-expected": lambda kind: assert_log_likelihood_close(
        lambda x, t: -x, _X4, _broken(kind)(_X4, 0.5)[:, 0], config=SolverConfig("rk4", steps=2)
    ),
}


@pytest.mark.parametrize("kind", ["nan", "inf", "one-nan-row"])
@pytest.mark.parametrize("check", sorted(_CHECKS))
def test_every_assertion_fails_on_non_finite_values(check, kind):
    """A NaN compares False with any tolerance, so a check written as ``error > tol`` passed a
    field returning NaN (``assert_divergence_matches_jacobian(lambda x, t: x * nan, x, 0.5,
    zeros)`` did). Every assertion must fail, with an AssertionError that says what is not
    finite (or that the solve could not be made)."""
    with pytest.raises(AssertionError, match=r"not finite|non-finite"):
        _CHECKS[check](kind)


def test_the_log_likelihood_hint_names_both_suspects():
    """The failure hint used to ask only whether the prior is the true p_0; a wrong field is as
    likely (issue #21, item 7)."""
    marginal = DATA_CASES["gaussian d=3"].marginal(cnftools.OTPath(0.1))
    x = marginal.sample(3, 1.0, torch.Generator().manual_seed(8))
    with pytest.raises(AssertionError) as info:
        assert_log_likelihood_close(
            lambda x, t: 1.2 * marginal(x, t), x, lambda x: marginal.log_prob(x, 1.0)
        )
    message = str(info.value)
    assert "the field is wrong" in message and "true p_0" in message


# --- a failing ODE property says that hypothesis is shrinking it (issue #21, item 7) ------------
def _failing_ode_property(values):
    """Fails for any list with a positive entry (not for the simplest, all-zero example, so that
    hypothesis finds a failure by search and then shrinks it). The field v = -x has log p_1(x) =
    log N(e x; 0, I) + 2; rk4 with 4 steps is within 1e-3 nats of it here (measured 8e-4), so
    atol = 1e-2 passes the true value and fails the one shifted by 1 nat."""
    x = _draw((2, 2), 5)
    wrong = float(sum(values) > 0)
    assert_log_likelihood_close(
        lambda x, t: -x,
        x,
        lambda x: torch.distributions.Normal(0.0, 1.0).log_prob(x * math.e).sum(1) + 2.0 + wrong,
        atol=1e-2,
        config=SolverConfig("rk4", steps=4),
    )


def test_a_shrinking_ode_property_is_announced_on_stderr(capsys):
    @settings(max_examples=20, database=None, deadline=None, derandomize=True)
    @given(values=st.lists(st.integers(0, 100), min_size=3, max_size=6))
    def prop(values):
        _failing_ode_property(values)

    with pytest.raises(AssertionError, match="does not match the closed form"):
        prop()
    err = capsys.readouterr().err
    assert "hypothesis is shrinking the failing example" in err
    assert "quick_settings()" in err


def test_no_shrinking_notice_under_quick_settings(capsys):
    @quick_settings(max_examples=20, database=None, derandomize=True)
    @given(values=st.lists(st.integers(0, 100), min_size=3, max_size=6))
    def prop(values):
        _failing_ode_property(values)

    with pytest.raises(AssertionError, match="does not match the closed form"):
        prop()
    assert "shrinking" not in capsys.readouterr().err


def test_dir_lists_the_strategies():
    """``dir(cnftools.testing)`` lists the lazily imported strategies (issue #21, item 9)."""
    import cnftools.testing as kit

    names = dir(kit)
    assert {"quick_settings", "points", "mlp_fields", "assert_generates"} <= set(names)


def test_a_nan_field_is_not_called_batch_dependent():
    """A field returning NaN is a non-finite field, not one whose rows depend on each other: no
    RuntimeWarning about batch statistics, only the assertion's 'not finite' failure."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(AssertionError, match=r"not finite|non-finite"):
            _CHECKS["log-likelihood-field"]("nan")
