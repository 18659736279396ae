"""Tests of cnftools._transforms: exact log-dets of Linear, LULinear, ElementwiseAffine and
AffineCoupling, and theory §1's closed forms.

References are independent of the code under test: log-dets against ``numpy.linalg.slogdet``,
densities against :mod:`scipy.stats`. The checks every transform shares (log-det against the
autograd Jacobian, inverses, bad inputs) are in ``tests/test_flows.py``.

Theory sections cited here (pages under ``docs/theory/``):

- §1: ``docs/theory/change-of-variables.md#change-of-variables``
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _flow_cases import DTYPES, F64, LOGDET_TOL, build, gen, matrix, mlp
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats
from torch import nn
from torch.distributions import TransformedDistribution

from cnftools._transforms import AffineCoupling, ElementwiseAffine, Linear
from cnftools.flows import standard_normal

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("dim", [1, 2, 3, 6])
def test_linear_log_det_is_slogdet_of_weight_and_batch_shapes(dim):
    """Linear: log|det W| repeated over any batch shape (..., d) -> (...); 1e-12 (roundoff)."""
    w = matrix(dim, dim, F64)
    f = Linear(w)
    x = torch.randn(2, 3, dim, dtype=F64)
    logdet = f.log_abs_det_jacobian(x, f(x))
    assert logdet.shape == (2, 3)
    expected = np.linalg.slogdet(w.numpy())[1]
    np.testing.assert_allclose(logdet.detach().numpy(), expected, rtol=0, atol=1e-12)
    assert f(x).shape == x.shape and f.inv(f(x)).shape == x.shape


def test_lu_linear_weight_and_log_det():
    """LULinear: W = P L U has log|det W| = Σ log_diag (1e-12, roundoff of a 5×5 slogdet)."""
    f = build("LULinear", 5, 3, F64)
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
    net = mlp(3, 6, 0, F64)
    mask = torch.tensor([True, False, True])
    f_one = AffineCoupling(mask, net)
    f_two = AffineCoupling(mask, lambda h: tuple(net(h).chunk(2, dim=-1)))
    x = torch.randn(4, 3, dtype=F64)
    assert torch.equal(f_one(x), f_two(x))


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
    w = matrix(dim, seed, dtype)
    b = torch.randn(dim, generator=gen(seed), dtype=dtype)
    dist = TransformedDistribution(standard_normal(dim, dtype=dtype), [Linear(w, b)])
    x = 2 * torch.randn(10, dim, generator=gen(seed + 1), dtype=dtype)
    wd, bd = w.double().numpy(), b.double().numpy()
    expected = stats.multivariate_normal(bd, wd @ wd.T).logpdf(x.double().numpy()).reshape(-1)
    with torch.no_grad():
        got = dist.log_prob(x).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=LOGDET_TOL[dtype], atol=LOGDET_TOL[dtype])


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
    ],
)
def test_bad_construction_raises(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_coupling_net_output_shape_checked():
    f = AffineCoupling(torch.tensor([1, 0, 1]), nn.Linear(3, 5).double())
    with pytest.raises(ValueError, match="net must return"):
        f(torch.randn(2, 3, dtype=F64))
