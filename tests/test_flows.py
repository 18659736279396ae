"""Tests of cnftools.flows: what every transform it offers shares (exact log-dets against the
autograd Jacobian, inverses, torch.distributions and nn.Module integration, bad input), Flow, and
the re-exports.

References are independent of the code under test: log-dets against ``slogdet`` of the autograd
Jacobian of one sample (:mod:`cnftools.validation.flows`), the trained optimum against
:mod:`scipy.stats`. Each transform's own checks are in ``tests/test_transforms.py`` and
``tests/test_euler_step.py``.

Theory sections cited here (pages under ``docs/theory/``):

- §2: ``docs/theory/change-of-variables.md#normalizing-flows``
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _flow_cases import DTYPES, F32, F64, INVERSE_TOL, KINDS, LOGDET_TOL, build, gen, matrix, mlp
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from torch import nn
from torch.distributions import ComposeTransform, Transform, TransformedDistribution

import cnftools
from cnftools import _euler_step, _transforms
from cnftools.flows import (
    AffineCoupling,
    ElementwiseAffine,
    Flow,
    LULinear,
    standard_normal,
)
from cnftools.validation.flows import autograd_log_det

pytestmark = pytest.mark.usefixtures("one_thread")


# --- log-det and inverse, every transform ---------------------------------------------------------


@DTYPES
@pytest.mark.parametrize("kind", KINDS)
@given(dim=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_log_det_matches_autograd_jacobian(kind, dtype, dim, seed):
    """log_abs_det_jacobian = slogdet of the per-sample autograd Jacobian (LOGDET_TOL, see top)."""
    f = build(kind, dim, seed, dtype)
    x = torch.randn(4, dim, generator=gen(seed + 2), dtype=dtype)
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
    f = build(kind, dim, seed, dtype)
    x = torch.randn(6, dim, generator=gen(seed + 2), dtype=dtype)
    with torch.no_grad():
        back = f.inv(f(x))
        forth = f(f.inv(x))
    scale = float(x.abs().max())
    torch.testing.assert_close(back, x, rtol=0, atol=INVERSE_TOL[dtype] * scale)
    torch.testing.assert_close(forth, x, rtol=0, atol=INVERSE_TOL[dtype] * scale)


# --- torch.distributions / nn.Module integration ------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_transforms_are_transforms_and_modules(kind):
    """No wrapper: Transform subclass, hashable nn.Module, works in ComposeTransform/inv."""
    f = build(kind, 3, 0, F64)
    assert isinstance(f, Transform) and isinstance(f, nn.Module)
    assert f.event_dim == 1 and f.bijective
    assert f == f and f != build(kind, 3, 0, F64) and len({f, f}) == 1
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


def test_flows_re_exports_the_transforms_and_the_euler_step():
    """cnftools.flows is the user-facing module: every name it lists is the object defined where it
    lives, so both import paths give one class (isinstance checks and pickles agree)."""
    homes = {name: module for module in (_transforms, _euler_step) for name in module.__all__}
    assert set(homes) | {"Flow", "standard_normal"} == set(cnftools.flows.__all__)
    for name, module in homes.items():
        assert getattr(cnftools.flows, name) is getattr(module, name), name


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_every_parameter(kind):
    """NLL through TransformedDistribution gives finite, nonzero gradients to all parameters."""
    f = build(kind, 4, 5, F64)
    flow = Flow(standard_normal(4, dtype=F64), [f])
    assert {id(p) for p in flow.parameters()} == {id(p) for p in f.parameters()}
    flow.nll_loss(torch.randn(16, 4, generator=gen(1), dtype=F64)).backward()
    for name, p in f.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


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
    g = gen(0)
    data = (
        torch.randn(256, 2, generator=g, dtype=dtype) * torch.tensor([2.0, 0.3], dtype=dtype)
    ) @ (matrix(2, 1, dtype)).mT + torch.tensor([1.0, -2.0], dtype=dtype)
    net = mlp(2, 4, 0, dtype, scale=0.1)
    flow = Flow(
        2,
        [
            LULinear(2, generator=gen(1), dtype=dtype),
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


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: Flow(standard_normal(2), [lambda x: x]), TypeError, "Transform"),
        (lambda: Flow(torch.distributions.Normal(0.0, 1.0), []), ValueError, "event_shape"),
    ],
)
def test_bad_construction_raises(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("kind", KINDS)
def test_bad_inputs_raise(kind):
    """Non-finite values, wrong last dimension and wrong dtype are refused with a clear message."""
    f = build(kind, 3, 0, F64)
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
