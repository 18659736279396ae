"""Tests of cnftools.estimators: the divergence specs, their validation, Hutchinson's probe draws,
check_estimator and standard_error.

References are written here independently of the code under test: the standard error by its
textbook formula, the statistics of the probe distributions from their definitions.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

import cnftools
from cnftools._divergence_evaluator import DivergenceEvaluator
from cnftools.estimators import (
    EXACT_STRATEGIES,
    ClosedForm,
    Exact,
    Hutchinson,
    check_estimator,
    standard_error,
)

F64 = torch.float64
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# ----------------------------------------------------------------------------------------------
# validation: each error names the spec's field


@pytest.mark.parametrize("strategy", EXACT_STRATEGIES)
def test_exact_accepts_every_strategy(strategy: str) -> None:
    assert Exact(strategy).strategy == strategy


@pytest.mark.parametrize("strategy", ["fastest", "Loop", "", None, 1])
def test_exact_refuses_an_unknown_strategy(strategy: object) -> None:
    with pytest.raises(ValueError, match=r"Exact\(strategy=\.\.\.\) must be one of \('auto'"):
        Exact(strategy)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_probes": 0}, ValueError, r"Hutchinson\(n_probes=\.\.\.\) must be an int >= 1, got 0"),
        ({"n_probes": -2}, ValueError, r"Hutchinson\(n_probes=\.\.\.\) must be an int >= 1"),
        ({"n_probes": 2.0}, ValueError, r"Hutchinson\(n_probes=\.\.\.\) must be an int >= 1"),
        ({"n_probes": True}, ValueError, r"Hutchinson\(n_probes=\.\.\.\) must be an int >= 1"),
        ({"noise": "uniform"}, ValueError, r"Hutchinson\(noise=\.\.\.\) must be one of"),
        ({"noise": "Gaussian"}, ValueError, r"Hutchinson\(noise=\.\.\.\) must be one of"),
        ({"generator": 0}, TypeError, r"Hutchinson\(generator=\.\.\.\) must be a torch\.Generator"),
        ({"probes": [[1.0, -1.0]]}, TypeError, r"Hutchinson\(probes=...\) must be a torch.Tensor"),
        (
            {"probes": torch.ones(1, 2, 3, dtype=torch.int64)},
            TypeError,
            r"Hutchinson\(probes=...\) must have a float",
        ),
        (
            {"probes": torch.tensor([[[1.0, math.nan]]])},
            ValueError,
            r"Hutchinson\(probes=\.\.\.\)",
        ),
        (
            {"probes": torch.ones(2, 2, 3), "n_probes": 2},
            ValueError,
            "give n_probes or probes, not both",
        ),
    ],
    ids=lambda value: str(value)[:40] if isinstance(value, dict) else None,
)
def test_hutchinson_refuses_bad_fields_on_construction(kwargs: dict, error: type, match: str):
    with pytest.raises(error, match=match):
        Hutchinson(**kwargs)


def test_specs_are_frozen_and_compare_by_value() -> None:
    assert Exact() == Exact("auto") and Exact("loop") == Exact("loop")
    assert Exact("loop") != Exact() and Exact() != ClosedForm()
    assert ClosedForm() == ClosedForm()
    assert Hutchinson(4) == Hutchinson(4, "rademacher") and Hutchinson(4) != Hutchinson(3)
    assert Hutchinson(4) != Hutchinson(4, "gaussian")
    # generator and probes are not part of the value (a tensor has no boolean equality)
    assert Hutchinson(2, generator=torch.Generator()) == Hutchinson(2)
    assert Hutchinson(probes=torch.ones(1, 2, 3)) == Hutchinson(probes=torch.zeros(1, 2, 3))
    assert len({Exact(), Exact("auto"), Exact("loop"), Hutchinson(2), Hutchinson(2)}) == 3
    for spec, name in [(Exact(), "strategy"), (Hutchinson(), "n_probes")]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(spec, name, "loop")


# ----------------------------------------------------------------------------------------------
# Hutchinson.draw


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
@pytest.mark.parametrize("like_shape", [(5, 3), (4, 2, 3), (1, 1)], ids=str)
def test_draw_shape_dtype_and_device(noise: str, like_shape: tuple, dtype: torch.dtype) -> None:
    like = torch.zeros(like_shape, dtype=dtype)
    probes = Hutchinson(3, noise).draw(like)
    assert probes.shape == (3, *like_shape)
    assert probes.dtype == dtype and probes.device == like.device
    assert not probes.requires_grad


def test_draw_rademacher_entries_are_plus_or_minus_one() -> None:
    probes = Hutchinson(8, generator=torch.Generator().manual_seed(0)).draw(torch.zeros(50, 6))
    # exact: the entries are 2 b - 1 for bits b, no rounding
    assert set(probes.unique().tolist()) == {-1.0, 1.0}


def test_a_seeded_generator_reproduces_the_draws() -> None:
    like = torch.zeros(7, 3, dtype=F64)
    for noise in ("rademacher", "gaussian"):
        first = Hutchinson(4, noise, generator=torch.Generator().manual_seed(5)).draw(like)
        again = Hutchinson(4, noise, generator=torch.Generator().manual_seed(5)).draw(like)
        other = Hutchinson(4, noise, generator=torch.Generator().manual_seed(6)).draw(like)
        assert torch.equal(first, again)
        assert not torch.equal(first, other)


def test_draw_with_the_global_generator_follows_torch_manual_seed() -> None:
    like = torch.zeros(7, 3, dtype=F64)
    torch.manual_seed(11)
    first = Hutchinson(2, "gaussian").draw(like)
    torch.manual_seed(11)
    assert torch.equal(first, Hutchinson(2, "gaussian").draw(like))


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_probe_entries_have_mean_zero_and_unit_variance(noise: str) -> None:
    """E[e e^T] = I needs unit variance (and mean zero) per entry. n = 200,000 draws: the sample
    mean has standard deviation 1/sqrt(n) = 2.2e-3 and, for Gaussian entries, the sample
    variance sqrt(2/n) = 3.2e-3 (Rademacher variance is exactly 1); 5 standard deviations each
    (a false failure has probability ~6e-7; the seed is fixed, so the outcome is deterministic)."""
    n = 200_000
    spec = Hutchinson(1, noise, generator=torch.Generator().manual_seed(1))
    entries = spec.draw(torch.zeros(n // 10, 10, dtype=F64)).flatten()
    assert entries.numel() == n
    assert abs(float(entries.mean())) <= 5 / math.sqrt(n)
    assert abs(float(entries.var()) - 1.0) <= 5 * math.sqrt(2 / n)


def test_gaussian_entries_are_uncorrelated_across_coordinates() -> None:
    """Off-diagonal E[e_i e_j] = 0: the sample mean of e_0 e_1 over n = 100,000 draws has standard
    deviation 1/sqrt(n) = 3.2e-3; 5 standard deviations."""
    n = 100_000
    spec = Hutchinson(1, "gaussian", generator=torch.Generator().manual_seed(2))
    e = spec.draw(torch.zeros(n, 2, dtype=F64))[0]
    assert abs(float((e[:, 0] * e[:, 1]).mean())) <= 5 / math.sqrt(n)


def test_given_probes_are_returned_checked_and_detached() -> None:
    like = torch.zeros(4, 3, dtype=F64)
    given = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    drawn = Hutchinson(probes=given).draw(like)
    assert torch.equal(drawn, given.detach()) and not drawn.requires_grad
    one = torch.randn(4, 3, dtype=F64)  # one probe without its probe axis
    assert torch.equal(Hutchinson(probes=one).draw(like), one[None])


@pytest.mark.parametrize(
    ("probes", "error", "match"),
    [
        (torch.ones(2, 5, 3, dtype=F64), ValueError, r"must have shape \(K, B, \*event\)"),
        (torch.ones(2, 4, 2, dtype=F64), ValueError, r"= \(K, 4, 3\)"),
        (torch.ones(4, dtype=F64), ValueError, r"got \(4,\)"),
        (torch.ones(1, 1, 4, 3, dtype=F64), ValueError, "must have shape"),
        (torch.ones(0, 4, 3, dtype=F64), ValueError, "at least one probe"),
        (torch.ones(2, 4, 3, dtype=torch.float32), TypeError, "share the data's dtype"),
    ],
    ids=["batch", "event", "1d", "extra-dim", "no-probe", "dtype"],
)
def test_given_probes_are_checked_against_the_data(probes: Tensor, error: type, match: str):
    with pytest.raises(error, match=match):
        Hutchinson(probes=probes).draw(torch.zeros(4, 3, dtype=F64))


@CUDA
def test_given_probes_on_another_device_are_refused() -> None:
    probes = torch.ones(1, 4, 3, dtype=F64)
    with pytest.raises(TypeError, match="share the data's dtype and device"):
        Hutchinson(probes=probes).draw(torch.zeros(4, 3, dtype=F64, device="cuda"))


@CUDA
def test_a_generator_on_another_device_is_refused() -> None:
    spec = Hutchinson(2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"Hutchinson\(generator=\.\.\.\) is on cpu"):
        spec.draw(torch.zeros(4, 3, device="cuda"))
    cuda = Hutchinson(2, generator=torch.Generator(device="cuda").manual_seed(0))
    assert cuda.draw(torch.zeros(4, 3, device="cuda")).device.type == "cuda"


# ----------------------------------------------------------------------------------------------
# ClosedForm


def plain_field(x: Tensor, t: Tensor) -> Tensor:
    return -x


class Scaled:
    """v = 2 x with its closed form 2 d."""

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return 2 * x

    def divergence(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.full(x.shape[:1], 2.0 * x[0].numel(), dtype=x.dtype)


def test_closed_form_on_a_field_without_one_names_the_field() -> None:
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"ClosedForm\(\) but the field plain_field has no"):
        cnftools.divergence(plain_field, x, 0.5, ClosedForm())
    with pytest.raises(ValueError, match=r"plain_field has no closed-form .* cnftools\.Exact\(\)"):
        DivergenceEvaluator.for_spec(plain_field, ClosedForm(), x)


def test_closed_form_uses_the_fields_own_divergence() -> None:
    field = Scaled()
    x = torch.randn(3, 4, dtype=F64)
    # exact: 2 d = 8 is returned as it is
    assert torch.equal(
        cnftools.divergence(field.velocity, x, 0.5, ClosedForm()), torch.full((3,), 8.0, dtype=F64)
    )


# ----------------------------------------------------------------------------------------------
# check_estimator


@pytest.mark.parametrize("spec", [None, Exact(), Exact("loop"), Hutchinson(3), ClosedForm()])
def test_check_estimator_returns_a_spec_unchanged(spec: object) -> None:
    assert check_estimator(spec) is spec


@pytest.mark.parametrize(
    ("old", "hint"),
    [
        ("exact", "Exact()"),
        ("hutchinson", "Hutchinson()"),
        ("loop", 'Exact("loop")'),
        ("closed_form", "ClosedForm()"),
    ],
)
def test_check_estimator_hints_the_0_2_spelling_of_the_old_strings(old: str, hint: str) -> None:
    with pytest.raises(TypeError) as info:
        check_estimator(old)
    message = str(info.value)
    assert "estimator must be a divergence spec" in message
    assert f"(cnftools 0.2: write estimator=cnftools.{hint})" in message
    with pytest.raises(TypeError) as info:
        check_estimator(old, name="divergence")  # the hint names the caller's argument
    assert f"write divergence=cnftools.{hint})" in str(info.value)


@pytest.mark.parametrize("value", ["fast", 3, Exact, {"strategy": "loop"}])
def test_check_estimator_refuses_other_values_without_a_hint(value: object) -> None:
    with pytest.raises(TypeError, match="estimator must be a divergence spec") as info:
        check_estimator(value)
    assert "cnftools 0.2: write" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# standard_error


def test_standard_error_by_hand() -> None:
    """Row 0: columns 1, 3 -> mean 2, s^2 = (1 + 1) / 1 = 2, s / sqrt 2 = 1. Row 1: 0, 0, 6 ->
    mean 2, s^2 = (4 + 4 + 16) / 2 = 12, s / sqrt 3 = 2. Exact in float64 (square roots of 1 and 4
    after exact sums)."""
    two = standard_error(torch.tensor([[1.0, 3.0], [5.0, 5.0]], dtype=F64))
    assert torch.equal(two, torch.tensor([1.0, 0.0], dtype=F64))
    three = standard_error(torch.tensor([[0.0, 0.0, 6.0]], dtype=F64))
    torch.testing.assert_close(three, torch.tensor([2.0], dtype=F64), rtol=1e-15, atol=0)


def test_standard_error_of_random_columns_matches_the_formula() -> None:
    columns = torch.randn(6, 9, dtype=F64, generator=torch.Generator().manual_seed(3))
    mean = columns.sum(dim=1, keepdim=True) / 9
    by_hand = (((columns - mean) ** 2).sum(dim=1) / 8).sqrt() / 3
    # a few float64 operations on O(1) numbers: rounding only
    torch.testing.assert_close(standard_error(columns), by_hand, rtol=1e-13, atol=0)


def test_standard_error_is_none_for_one_column() -> None:
    assert standard_error(torch.ones(5, 1, dtype=F64)) is None
