"""Tests of cnftools.flows: exact log-dets, inverses, theory §1 closed forms, Flow training, §3 link.

References are independent of the code under test: log-dets against ``slogdet`` of the autograd
Jacobian of one sample, densities against :mod:`scipy.stats`, the continuous flow of v = A x against
``scipy.linalg.expm`` (helpers in :mod:`cnftools.validation.flows`).

Theory sections cited here (pages under ``docs/theory/``):

- §1: ``docs/theory/change-of-variables.md#change-of-variables``
- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from torch import nn
from torch.distributions import ComposeTransform, Transform, TransformedDistribution

import cnftools
from cnftools.flows import (
    AffineCoupling,
    ConvergenceError,
    ElementwiseAffine,
    EulerStep,
    Flow,
    Linear,
    LULinear,
    euler_chain,
    standard_normal,
)
from cnftools.validation.flows import (
    LINEAR_FIELD,
    autograd_log_det,
    euler_chain_forward_log_prob,
    linear_euler_chain_log_prob,
    linear_field_log_prob,
    loglog_slope,
    nonlinear_field,
)

F64, F32 = torch.float64, torch.float32
DTYPES = pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])

# Log-det / density tolerances, absolute on O(1–10) values. float64: roundoff (observed ≤ 1e-14).
# float32: eps32 ≈ 1.2e-7 times the condition number of the maps drawn here (≤ 10) and
# |log p| ≲ 30, with margin: 1e-4.
LOGDET_TOL = {F64: 1e-10, F32: 1e-4}
# inverse ∘ forward, relative to max |z|: float64 roundoff and the 64-eps fixed point (EulerStep);
# float32 the same scaled by eps32/eps64 with margin.
INVERSE_TOL = {F64: 1e-10, F32: 1e-5}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix(dim: int, seed: int, dtype: torch.dtype, cond: float = 4.0) -> torch.Tensor:
    """A random d×d matrix with singular values spread over [1/sqrt(cond), sqrt(cond)], random sign."""
    g = _gen(seed)
    q1 = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64)).Q
    q2 = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=F64)).Q
    s = torch.logspace(-0.5, 0.5, dim, base=cond, dtype=F64)
    return (q1 * s @ q2).to(dtype)


def _mlp(dim_in: int, dim_out: int, seed: int, dtype: torch.dtype, scale: float = 0.5) -> nn.Module:
    net = nn.Sequential(nn.Linear(dim_in, 16), nn.Tanh(), nn.Linear(16, dim_out)).to(dtype)
    g = _gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=dtype))
    return net


class TimeField(nn.Module):
    """A learnable field v(x, t) = scale · mlp([x, t]) (per-sample, smooth)."""

    def __init__(self, dim: int, seed: int, dtype: torch.dtype, scale: float = 0.3) -> None:
        super().__init__()
        self.net = _mlp(dim + 1, dim, seed, dtype)
        self.scale = scale

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scale * self.net(torch.cat([x, t[:, None]], dim=-1))


def _build(kind: str, dim: int, seed: int, dtype: torch.dtype) -> Transform:
    g = _gen(seed + 1)
    if kind == "Linear":
        return Linear(_matrix(dim, seed, dtype), torch.randn(dim, generator=g, dtype=dtype))
    if kind == "LULinear":
        f = LULinear(dim, generator=g, dtype=dtype)
        with torch.no_grad():  # move away from the rotation it starts at
            f.log_diag.add_(0.3 * torch.randn(dim, generator=g, dtype=dtype))
            f.upper.add_(0.3 * torch.randn(dim, dim, generator=g, dtype=dtype))
            f.lower.add_(0.3 * torch.randn(dim, dim, generator=g, dtype=dtype))
        return f
    if kind == "ElementwiseAffine":
        loc = torch.randn(dim, generator=g, dtype=dtype)
        return ElementwiseAffine(loc, 0.7 * torch.randn(dim, generator=g, dtype=dtype))
    if kind == "AffineCoupling":
        mask = torch.randperm(dim, generator=g) < dim // 2  # a random half kept
        return AffineCoupling(mask, _mlp(dim, 2 * dim, seed, dtype))
    if kind == "EulerStep":
        # Lip(v) ≲ 0.3 · ‖W2‖‖W1‖ with 0.5-scaled 16-wide layers; dt = 0.25 keeps dt·Lip < 1.
        return EulerStep(TimeField(dim, seed, dtype), t=0.4, dt=0.25)
    raise AssertionError(kind)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every tensor here is tiny: one intra-op thread is fastest, and on a shared, loaded CPU two
    threads oversubscribe it (measured 15–20× slower per Euler step); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


KINDS = ["Linear", "LULinear", "ElementwiseAffine", "AffineCoupling", "EulerStep"]


# --- log-det and inverse, every transform ---------------------------------------------------------


@DTYPES
@pytest.mark.parametrize("kind", KINDS)
@given(dim=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_log_det_matches_autograd_jacobian(kind, dtype, dim, seed):
    """log_abs_det_jacobian = slogdet of the per-sample autograd Jacobian (LOGDET_TOL, see top)."""
    f = _build(kind, dim, seed, dtype)
    x = torch.randn(4, dim, generator=_gen(seed + 2), dtype=dtype)
    with torch.no_grad():
        got = f.log_abs_det_jacobian(x, f(x))
    assert got.shape == (4,)
    expected = autograd_log_det(f, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=LOGDET_TOL[dtype])


@DTYPES
@pytest.mark.parametrize("kind", KINDS)
@given(dim=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_inverse_of_forward_is_identity(kind, dtype, dim, seed):
    """inv(f(x)) = x and f(inv(y)) = y, relative to max|x| (INVERSE_TOL, see top)."""
    f = _build(kind, dim, seed, dtype)
    x = torch.randn(6, dim, generator=_gen(seed + 2), dtype=dtype)
    with torch.no_grad():
        back = f.inv(f(x))
        forth = f(f.inv(x))
    scale = float(x.abs().max())
    torch.testing.assert_close(back, x, rtol=0, atol=INVERSE_TOL[dtype] * scale)
    torch.testing.assert_close(forth, x, rtol=0, atol=INVERSE_TOL[dtype] * scale)


@pytest.mark.parametrize("dim", [1, 2, 3, 6])
def test_linear_log_det_is_slogdet_of_weight_and_batch_shapes(dim):
    """Linear: log|det W| repeated over any batch shape (..., d) -> (...); 1e-12 (roundoff)."""
    w = _matrix(dim, dim, F64)
    f = Linear(w)
    x = torch.randn(2, 3, dim, dtype=F64)
    logdet = f.log_abs_det_jacobian(x, f(x))
    assert logdet.shape == (2, 3)
    expected = np.linalg.slogdet(w.numpy())[1]
    np.testing.assert_allclose(logdet.detach().numpy(), expected, rtol=0, atol=1e-12)
    assert f(x).shape == x.shape and f.inv(f(x)).shape == x.shape


def test_lu_linear_weight_and_log_det():
    """LULinear: W = P L U has log|det W| = Σ log_diag (1e-12, roundoff of a 5×5 slogdet)."""
    f = _build("LULinear", 5, 3, F64)
    with torch.no_grad():
        np.testing.assert_allclose(
            np.linalg.slogdet(f.weight.numpy())[1], float(f.log_diag.sum()), rtol=0, atol=1e-12
        )


def test_coupling_keeps_masked_coordinates_and_bounds_scale():
    """Kept coordinates pass unchanged (bitwise); |log-scale| < bound even for a huge net output."""
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=F64)
    f = AffineCoupling(
        mask, lambda h: (1e6 * torch.ones_like(h), torch.zeros_like(h)), log_scale_bound=2.0
    )
    x = torch.randn(5, 4, dtype=F64)
    y = f(x)
    assert torch.equal(y[:, [0, 2]], x[:, [0, 2]])
    # log det = 2 free coordinates × bound: tanh(5e5) = 1 exactly in float64.
    torch.testing.assert_close(f.log_abs_det_jacobian(x, y), torch.full((5,), 4.0, dtype=F64))
    torch.testing.assert_close(f.inv(y), x, rtol=0, atol=1e-14)


def test_coupling_net_may_return_one_tensor_or_a_pair():
    """A (B, 2d) output and the pair (log_scale, shift) give the same map (bitwise)."""
    net = _mlp(3, 6, 0, F64)
    mask = torch.tensor([True, False, True])
    f_one = AffineCoupling(mask, net)
    f_two = AffineCoupling(mask, lambda h: tuple(net(h).chunk(2, dim=-1)))
    x = torch.randn(4, 3, dtype=F64)
    assert torch.equal(f_one(x), f_two(x))


def test_euler_step_linear_field_closed_form():
    """EulerStep of v = A x: log|det(I + dt A)| (numpy) at 1e-13; forward = (I + dt A) x."""
    a = torch.as_tensor(LINEAR_FIELD)
    step = EulerStep(lambda x, t: x @ a.mT, t=0.5, dt=0.1)
    x = torch.randn(7, 3, dtype=F64)
    m = np.eye(3) + 0.1 * LINEAR_FIELD
    np.testing.assert_allclose(step(x).numpy(), x.numpy() @ m.T, rtol=0, atol=1e-14)
    logdet = step.log_abs_det_jacobian(x, None)
    np.testing.assert_allclose(logdet.numpy(), np.linalg.slogdet(m)[1], rtol=0, atol=1e-13)


@pytest.mark.parametrize("jacobian", ["batched", "loop"])
def test_euler_step_jacobian_strategies_agree(jacobian):
    """Both Jacobian strategies give the autograd reference (1e-12, roundoff)."""
    step = EulerStep(TimeField(3, 1, F64), t=0.2, dt=0.3, jacobian=jacobian)
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


# --- theory §1 closed forms ---------------------------------------------------------------------


@DTYPES
@given(
    mu=st.floats(-3, 3),
    sigma=st.floats(0.1, 3),
    a=st.floats(0.2, 4) | st.floats(-4, -0.2),
    b=st.floats(-3, 3),
)
def test_affine_gaussian_special_case_scipy(dtype, mu, sigma, a, b):
    """§1: z ~ N(μ, σ²), x = a z + b -> N(aμ + b, (aσ)²); scipy.stats.norm, LOGDET_TOL × (1 + |log p|)."""
    base = torch.distributions.Independent(
        torch.distributions.Normal(
            torch.tensor([mu], dtype=dtype), torch.tensor([sigma], dtype=dtype)
        ),
        1,
    )
    x = torch.linspace(-6, 6, 25, dtype=dtype)[:, None] * abs(a) * sigma + a * mu + b
    expected = stats.norm(a * mu + b, abs(a) * sigma).logpdf(x.double().numpy()[:, 0])
    transforms = [Linear(torch.tensor([[a]], dtype=dtype), torch.tensor([b], dtype=dtype))]
    if a > 0:
        transforms.append(
            ElementwiseAffine(
                torch.tensor([b], dtype=dtype), torch.tensor([math.log(a)], dtype=dtype)
            )
        )
    for f in transforms:
        with torch.no_grad():
            got = TransformedDistribution(base, [f]).log_prob(x).double().numpy()
        np.testing.assert_allclose(got, expected, rtol=LOGDET_TOL[dtype], atol=LOGDET_TOL[dtype])


@DTYPES
@given(dim=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_linear_gaussian_closed_form_scipy(dtype, dim, seed):
    """x = W z + b, z ~ N(0, I) -> N(b, W Wᵀ): scipy multivariate_normal (LOGDET_TOL × (1 + |log p|))."""
    w = _matrix(dim, seed, dtype)
    b = torch.randn(dim, generator=_gen(seed), dtype=dtype)
    dist = TransformedDistribution(standard_normal(dim, dtype=dtype), [Linear(w, b)])
    x = 2 * torch.randn(10, dim, generator=_gen(seed + 1), dtype=dtype)
    wd, bd = w.double().numpy(), b.double().numpy()
    expected = stats.multivariate_normal(bd, wd @ wd.T).logpdf(x.double().numpy()).reshape(-1)
    with torch.no_grad():
        got = dist.log_prob(x).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=LOGDET_TOL[dtype], atol=LOGDET_TOL[dtype])


# --- torch.distributions / nn.Module integration ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_transforms_are_transforms_and_modules(kind):
    """No wrapper: Transform subclass, hashable nn.Module, works in ComposeTransform/inv."""
    f = _build(kind, 3, 0, F64)
    assert isinstance(f, Transform) and isinstance(f, nn.Module)
    assert f.event_dim == 1 and f.bijective
    assert f == f and f != _build(kind, 3, 0, F64) and len({f, f}) == 1
    assert len(list(f.parameters())) > 0
    compose = ComposeTransform([f, f.inv, f])
    x = torch.randn(4, 3, dtype=F64)
    with torch.no_grad():
        # f ∘ f⁻¹ ∘ f = f up to roundoff (1e-10: one inverse in between)
        torch.testing.assert_close(compose(x), f(x), rtol=0, atol=1e-10)
        assert compose.log_abs_det_jacobian(x, compose(x)).shape == (4,)
    state = f.state_dict()
    assert state and all(torch.is_tensor(v) for v in state.values())


def test_public_names():
    """The acceptance names exist on the package and are Transform subclasses."""
    for name in ("Linear", "AffineCoupling", "EulerStep", "LULinear", "ElementwiseAffine"):
        assert issubclass(getattr(cnftools.flows, name), Transform)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    """NLL through TransformedDistribution gives finite, nonzero gradients to all parameters."""
    f = _build(kind, 4, 5, F64)
    flow = Flow(standard_normal(4, dtype=F64), [f])
    assert {id(p) for p in flow.parameters()} == {id(p) for p in f.parameters()}
    flow.nll_loss(torch.randn(16, 4, generator=_gen(1), dtype=F64)).backward()
    for name, p in f.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_euler_step_gradient_through_inverse_matches_finite_differences():
    """log_prob through the fixed-point inverse has the implicit-function gradient.

    Central differences with h = 1e-6 in float64: truncation O(h²) ≈ 1e-12 plus roundoff
    eps/h ≈ 1e-10 on O(1) sums; tolerance 1e-7 relative.
    """
    field = TimeField(3, 2, F64)
    flow = Flow(standard_normal(3, dtype=F64), euler_chain(field, 4))
    x = torch.randn(5, 3, generator=_gen(3), dtype=F64, requires_grad=True)
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


def test_flow_sample_log_prob_shapes_and_device_dtype_follow():
    """Flow(int) stores its base as buffers: .to(float64) moves everything; shapes (n, d) -> (n,)."""
    flow = Flow(2, [LULinear(2), ElementwiseAffine(torch.zeros(2), torch.zeros(2))]).to(F64)
    x = flow.sample(7)
    assert x.shape == (7, 2) and x.dtype == F64
    assert flow.log_prob(x).shape == (7,) and flow(x).shape == (7,)
    assert flow.rsample(3).requires_grad
    assert isinstance(flow.distribution, TransformedDistribution)
    assert flow.nll_loss(x).shape == ()


@DTYPES
def test_flow_trains_on_a_tiny_problem(dtype):
    """Adam on a correlated 2-D Gaussian: the NLL closes more than 90 % of the gap to the optimum.

    The optimum (reachable by the LULinear + ElementwiseAffine part alone) is the data's Gaussian MLE
    NLL from scipy; observed ≥ 99.9 % after 60 steps in both dtypes (about 1 s on an idle CPU).
    """
    g = _gen(0)
    data = (
        torch.randn(256, 2, generator=g, dtype=dtype) * torch.tensor([2.0, 0.3], dtype=dtype)
    ) @ (_matrix(2, 1, dtype)).mT + torch.tensor([1.0, -2.0], dtype=dtype)
    net = _mlp(2, 4, 0, dtype, scale=0.1)
    flow = Flow(
        2,
        [
            LULinear(2, generator=_gen(1), dtype=dtype),
            AffineCoupling(torch.tensor([1, 0]), net),
            ElementwiseAffine(torch.zeros(2, dtype=dtype), torch.zeros(2, dtype=dtype)),
        ],
    ).to(dtype)
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    with torch.no_grad():
        initial = float(flow.nll_loss(data))
    for _ in range(60):
        opt.zero_grad()
        loss = flow.nll_loss(data)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(flow.nll_loss(data))
    d = data.double().numpy()
    optimum = -stats.multivariate_normal(d.mean(0), np.cov(d.T, bias=True)).logpdf(d).mean()
    assert final < initial
    assert initial - final > 0.9 * (initial - optimum), (initial, final, optimum)


# --- theory §3: Euler chains converge to the CNF ----------------------------------------------------


def test_euler_chain_log_prob_equals_discrete_formula():
    """N = 16 Euler steps of v = A x via TransformedDistribution (fixed-point inverse) equal the
    discrete-flow formula log N((I + A/N)^{-N} x) − N log|det(I + A/N)| (numpy), 1e-10 (roundoff +
    64-eps fixed points accumulated over 16 steps)."""
    a = torch.as_tensor(LINEAR_FIELD)
    x = torch.randn(12, 3, generator=_gen(4), dtype=F64)
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
    z0 = torch.randn(16, 3, generator=_gen(5), dtype=dtype)
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
    z0 = torch.randn(8, 3, generator=_gen(6), dtype=F64)
    ns = [16, 32, 64, 128]
    errors = []
    for n in ns:
        x, log_p = euler_chain_forward_log_prob(v, n, z0)
        exact = likelihood.log_likelihood(v, x, method="dopri5", rtol=1e-10, atol=1e-10)
        errors.append(float((log_p - exact).abs().max()))
    assert loglog_slope(ns, errors) == pytest.approx(-1.0, abs=0.1), errors


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Linear(torch.tensor([[1.0, 2.0], [2.0, 4.0]])), ValueError, "singular"),
        (lambda: Linear(torch.zeros(3, 3, dtype=F64)), ValueError, "singular"),
        (lambda: Linear(torch.eye(2)[:, :1]), ValueError, "square"),
        (lambda: Linear(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), ValueError, "non-finite"),
        (lambda: Linear(torch.eye(2), torch.zeros(3)), ValueError, "bias must have shape"),
        (lambda: Linear(torch.eye(2, dtype=torch.int64)), TypeError, "floating"),
        (lambda: Linear(torch.eye(2), torch.zeros(2, dtype=F64)), TypeError, "dtype"),
        (
            lambda: ElementwiseAffine(torch.zeros(2), torch.tensor([0.0, float("inf")])),
            ValueError,
            "non-finite",
        ),
        (lambda: ElementwiseAffine(torch.zeros(2), torch.zeros(3)), ValueError, "shape"),
        (
            lambda: AffineCoupling(torch.ones(2, 2), nn.Identity()),
            ValueError,
            "mask must have shape",
        ),
        (
            lambda: AffineCoupling(torch.tensor([0.0, 0.5, 1.0]), nn.Identity()),
            ValueError,
            "only 0 and 1",
        ),
        (
            lambda: AffineCoupling(torch.tensor([1.0, 1.0]), nn.Identity()),
            ValueError,
            "at least one 0",
        ),
        (lambda: AffineCoupling([1, 0], nn.Identity()), TypeError, "mask must be a torch.Tensor"),
        (lambda: AffineCoupling(torch.tensor([1, 0]), "net"), TypeError, "callable"),
        (
            lambda: AffineCoupling(torch.tensor([1, 0]), nn.Identity(), log_scale_bound=0.0),
            ValueError,
            "> 0",
        ),
        (lambda: EulerStep(lambda x, t: x, t=1.5, dt=0.1), ValueError, r"\[0, 1\]"),
        (lambda: EulerStep(lambda x, t: x, t=0.0, dt=float("nan")), ValueError, "finite"),
        (lambda: EulerStep("v", t=0.0, dt=0.1), TypeError, "callable"),
        (lambda: EulerStep(lambda x, t: x, 0.0, 0.1, jacobian="fast"), ValueError, "jacobian"),
        (lambda: Flow(standard_normal(2), [lambda x: x]), TypeError, "Transform"),
        (lambda: Flow(torch.distributions.Normal(0.0, 1.0), []), ValueError, "event_shape"),
        (lambda: euler_chain(lambda x, t: x, 0), ValueError, "n_steps"),
    ],
)
def test_bad_construction_raises(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_raise(kind):
    """Non-finite values, wrong last dimension and wrong dtype are refused with a clear message."""
    f = _build(kind, 3, 0, F64)
    bad = torch.randn(4, 3, dtype=F64)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        f(bad)
    with pytest.raises(ValueError, match="non-finite"):
        f.inv(bad)
    if kind != "EulerStep":  # the field defines its dimension
        with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
            f(torch.randn(4, 2, dtype=F64))
    if kind not in ("EulerStep", "AffineCoupling"):  # the network decides its dtype
        with pytest.raises(TypeError, match="dtype"):
            f(torch.randn(4, 3, dtype=F32))
    with pytest.raises(TypeError, match="floating"):
        f(torch.ones(4, 3, dtype=torch.int64))


def test_coupling_net_output_shape_checked():
    f = AffineCoupling(torch.tensor([1, 0, 1]), nn.Linear(3, 5).double())
    with pytest.raises(ValueError, match="net must return"):
        f(torch.randn(2, 3, dtype=F64))


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


@pytest.mark.parametrize("jacobian", ["batched", "loop"])
@pytest.mark.parametrize(
    "field",
    [
        pytest.param(lambda x, t: torch.ones_like(x), id="constant"),
        pytest.param(lambda x, t: (-x).detach(), id="detached"),
        pytest.param(lambda x, t: torch.from_numpy(-x.detach().numpy()), id="numpy"),
        pytest.param(_IgnoresInput(), id="module ignoring x"),
    ],
)
def test_euler_step_refuses_a_field_without_autograd_path_from_x(field, jacobian):
    """Regression (issue 11.6): such a field reported log|det J| = 0 (a wrong number for the
    detached -x, whose true value is 3 log(1 - 0.1)); now refused as cnftools.divergence does."""
    step = EulerStep(field, t=0.0, dt=0.1, jacobian=jacobian)
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="does not depend on x through autograd"):
        step.log_abs_det_jacobian(x, step(x))
    with pytest.raises(ValueError, match="does not depend on x"):
        cnftools.divergence(field, x, 0.0)
