"""Tests of cnftools._checks through the public entry points that use it (issue 11.8).

Half precision, the ``meta`` device and empty or negative event shapes used to fail with
misleading messages ("x has non-finite values" for finite float16 x, a NaN solve, "Tensor.item()
cannot be called on meta tensors", "negative dimension -1"); each now gets an error naming the
argument and what was expected, before any work.
"""

from __future__ import annotations

import pytest
import torch

import cnftools
from cnftools._checks import check_event_shape, check_tolerance
from cnftools.flows import EulerStep
from cnftools.testing import points

HALF = [torch.float16, torch.bfloat16]


def _field(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return -x


ENTRY_POINTS = {
    "log_likelihood": lambda x: cnftools.log_likelihood(_field, x),
    "path.log_prob": lambda x: cnftools.OTPath(0.1).log_prob(x, 0.5, x),
    "path.conditional_velocity": lambda x: cnftools.OTPath(0.1).conditional_velocity(x, 0.5, x),
    "divergence": lambda x: cnftools.divergence(_field, x, 0.5),
    "EulerStep": lambda x: EulerStep(_field, 0.0, 0.1)(x),
    "sample_with_log_prob(z0=)": lambda x: cnftools.sample_with_log_prob(_field, z0=x),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_is_refused_by_name(entry, dtype):
    x = torch.randn(4, 2).to(dtype)  # finite values
    with pytest.raises(TypeError, match=f"{dtype}; cnftools computes in float32 or float64 only"):
        ENTRY_POINTS[entry](x)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_meta_device_is_refused_by_name(entry):
    x = torch.randn(4, 2, device="meta")
    with pytest.raises(ValueError, match="on the 'meta' device, which holds shapes but no values"):
        ENTRY_POINTS[entry](x)


@pytest.mark.parametrize(
    ("shape", "error"),
    [
        ((0,), ValueError),
        ((-1,), ValueError),
        ((2, 0), ValueError),
        ((), ValueError),
        ((2.5,), TypeError),
    ],
    ids=str,
)
@pytest.mark.parametrize(
    "entry",
    [
        lambda shape: points(shape),
        lambda shape: check_event_shape("event_shape", shape),
    ],
    ids=["testing.points", "check_event_shape"],
)
def test_bad_event_shape_is_refused(entry, shape, error):
    with pytest.raises(error, match="event_shape must"):
        entry(shape)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((3,), r"z0 must have shape \(B, \*event\) with at least 1 event dimension"),
        ((3, 0), r"z0 has rows with no values: event shape \(0,\)"),
        ((3, 2, 0), r"z0 has rows with no values: event shape \(2, 0\)"),
        ((0, 2), r"z0 must have a non-empty batch"),
    ],
    ids=str,
)
def test_sample_with_log_prob_refuses_draws_of_a_bad_shape(shape, match):
    """0.2's sample_with_log_prob takes the draws z0 (no event_shape= any more): their shape is
    checked by name, before any work."""
    with pytest.raises(ValueError, match=match):
        cnftools.sample_with_log_prob(_field, torch.zeros(shape, dtype=torch.float64))


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (float("nan"), ValueError),
        (float("inf"), ValueError),
        (-1e-3, ValueError),
        ("1e-3", TypeError),
        (True, TypeError),
    ],
    ids=str,
)
def test_check_tolerance_refuses_nan_negative_and_non_numbers(value, error):
    with pytest.raises(error, match="rtol must be"):
        check_tolerance("rtol", value)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_zero_size_events_are_refused_by_name(entry):
    """Rows with no values (event shape (0,)) used to end in a bare AssertionError inside the
    solver (issue #20) or a meaningless result; now a ValueError names the argument."""
    x = torch.zeros(4, 0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"rows with no values: event shape \(0,\)|d >= 1"):
        ENTRY_POINTS[entry](x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_refused_by_name():
    """``device="cuda"`` on a machine without CUDA used to raise torch's bare AssertionError
    ("Torch not compiled with CUDA enabled") from deep inside a run."""
    from cnftools._checks import check_device

    with pytest.raises(ValueError, match="device is 'cuda' but CUDA is not available"):
        check_device("device", "cuda")
