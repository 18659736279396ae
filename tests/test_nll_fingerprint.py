"""Content fingerprints (cnftools/nll/fingerprint.py)."""

from __future__ import annotations

import pytest
import torch
from _dist_worker import make_case, make_mixture

import cnftools
from cnftools.nll import Unfingerprintable, fingerprint


def test_fingerprint_sees_weights_buffers_and_marginal_tensors():
    torch.manual_seed(0)
    a = torch.nn.Linear(2, 2)
    b = torch.nn.Linear(2, 2)
    assert fingerprint(a) != fingerprint(b)
    c = torch.nn.Linear(2, 2)
    c.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(c)
    bn = torch.nn.BatchNorm1d(2)
    before = fingerprint(bn)
    bn.running_mean += 1  # a buffer
    assert fingerprint(bn) != before
    m1, _ = make_case()
    m2 = cnftools.GaussianMarginal(m1.path, m1.mean + 1e-12, m1.cov)
    assert fingerprint(m1) != fingerprint(m2)  # one ulp-level change of a tensor attribute
    assert fingerprint(m1.velocity) != fingerprint(m2.velocity)  # a bound method: its __self__
    assert fingerprint(m1.velocity) != fingerprint(m1.score)


def test_plain_functions_cannot_be_fingerprinted():
    with pytest.raises(Unfingerprintable, match="lambda"):
        fingerprint(lambda x, t: -x)
    path = cnftools.AffineGaussianPath(lambda t: t, lambda t: 1 - 0.9 * t)
    with pytest.raises(Unfingerprintable):
        fingerprint(path)


def test_memoised_values_do_not_change_a_fingerprint():
    field, x = make_mixture(4)
    before = fingerprint(field)
    field(x, torch.full((4,), 0.5, dtype=torch.float64))  # fills the marginal's cache
    assert fingerprint(field) == before


def test_a_prior_is_fingerprinted_by_its_parameters():
    normal = torch.distributions.MultivariateNormal
    a = normal(torch.zeros(2), torch.eye(2))
    assert fingerprint(a) == fingerprint(normal(torch.zeros(2), torch.eye(2)))
    assert fingerprint(a) != fingerprint(normal(torch.zeros(2), 2 * torch.eye(2)))
    with pytest.raises(Unfingerprintable):
        fingerprint(object())
