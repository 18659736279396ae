"""Tests of cnftools._dequantization: dequantization, quantization and bits/dim (theory §12).

Expected values are closed forms: a model uniform on the cube gives exactly log₂ L bits per
dimension, and theory §12's offsets (+8 for y = x′/256, +7 for y = 2x′/256 − 1).

Theory sections cited here (pages under ``docs/theory/``):

- §12: ``docs/theory/bits-per-dim.md#bits-per-dimension``
"""

from __future__ import annotations

import math

import pytest
import torch

from cnftools._dequantization import (
    Dequantization,
    bits_per_dim,
    check_integer_data,
    dequantization_log_det,
    dequantize,
    dequantized_nll,
    quantize,
)

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("centered", [False, True])
def test_dequantize_range_and_inverse(centered, dtype):
    x = torch.randint(0, 17, (500, 64), generator=gen(5))
    y = dequantize(x, 17, gen(6), centered=centered, dtype=dtype)
    low = -1.0 if centered else 0.0
    assert y.dtype == dtype and float(y.min()) >= low and float(y.max()) < 1.0
    assert torch.equal(quantize(y, 17, centered=centered), x)


@pytest.mark.parametrize(("centered", "scale"), [(False, 1.0), (True, 2.0)])
def test_uniform_model_gives_log2_levels(centered, scale):
    # a model uniform on the cube [0,1)^D (or [-1,1)^D): NLL_y = D log(scale)
    levels, dim = 17, 64
    nll_y = dim * math.log(scale)
    # exactly log2 L up to the roundoff of a few logs: 1e-14
    assert math.isclose(
        bits_per_dim(nll_y, dim, levels, centered=centered), math.log2(levels), rel_tol=1e-14
    )
    assert math.isclose(
        dequantization_log_det(dim, levels, centered=centered), dim * math.log(scale / levels)
    )


def test_bits_per_dim_theory_values():
    # theory §12: y = x'/256 -> + 8; y = 2x'/256 - 1 -> + 7 (nll 0)
    assert math.isclose(bits_per_dim(0.0, 3072, 256), 8.0, rel_tol=1e-15)
    assert math.isclose(bits_per_dim(0.0, 3072, 256, centered=True), 7.0, rel_tol=1e-15)
    t = bits_per_dim(torch.tensor([0.0, 10 * math.log(2)], dtype=F64), 10)
    torch.testing.assert_close(t, torch.tensor([0.0, 1.0], dtype=F64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("samples", [1, 4])
def test_dequantized_nll_uniform_model(samples):
    # the uniform model on the unit cube has p_Y = 1: NLL_x = -D log(1/L) = D log L for any K
    x = torch.randint(0, 17, (8, 64), generator=gen(7))

    def uniform(y):
        return torch.zeros(y.shape[0], dtype=y.dtype)

    nll = dequantized_nll(uniform, x, 17, samples=samples, generator=gen(8), dtype=F64)
    expected = torch.full((8,), 64 * math.log(17), dtype=F64)
    torch.testing.assert_close(nll, expected, rtol=1e-14, atol=0)  # roundoff of logsumexp
    torch.testing.assert_close(
        bits_per_dim(nll, 64), torch.full((8,), math.log2(17), dtype=F64), rtol=1e-14, atol=0
    )


def test_dequantize_errors():
    with pytest.raises(ValueError, match=r"0\.\.16"):
        dequantize(torch.tensor([[17]]), 17)
    with pytest.raises(ValueError, match="integer values"):
        dequantize(torch.tensor([[0.5]]), 17)
    with pytest.raises(ValueError, match="levels must be an int >= 2"):
        dequantize(torch.tensor([[0]]), 1)
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
        bits_per_dim(1.0, 0)


def test_quantize_refuses_non_finite_values():
    with pytest.raises(ValueError, match="y has non-finite values"):
        quantize(torch.tensor([[float("nan"), 0.5]]), 17)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"levels": 1}, ValueError, "levels must be an int >= 2"),
        ({"levels": True}, ValueError, "levels must be an int >= 2"),
        ({"levels": 4, "samples": 0}, ValueError, "samples must be an int >= 1"),
        ({"levels": 4, "centered": 1}, TypeError, "centered must be a bool"),
    ],
)
def test_dequantization_settings_are_validated(kwargs, error, message):
    with pytest.raises(error, match=f"Dequantization.{message}"):
        Dequantization(**kwargs)


@pytest.mark.parametrize("name", ["x", "images"])
def test_integer_data_errors_name_the_callers_argument(name):
    with pytest.raises(ValueError, match=f"^{name} must lie in 0..3"):
        check_integer_data(name, torch.tensor([[5]]), 4)
