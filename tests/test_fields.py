"""Tests for cnftools.fields: the v(x, t) convention, call_field and the closed-form protocol."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from cnftools.fields import call_field, closed_form_divergence, field_name, select_extras


class Scaling:
    """v(x, t) = c x, with closed-form divergence c d."""

    def __init__(self, c: float) -> None:
        self.c = c

    def velocity(self, x: Tensor, t: Tensor) -> Tensor:
        return self.c * x

    def divergence(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.full(x.shape[:1], self.c * x[0].numel(), dtype=x.dtype)

    def log_prob(self, x: Tensor, t: Tensor) -> Tensor:
        return -0.5 * (x**2).sum(1)

    __call__ = velocity


class TimeRecorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Tensor] = []

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.seen.append(t)
        return x * t.reshape(-1, *([1] * (x.dim() - 1)))


@pytest.mark.parametrize("t", [0.25, torch.tensor(0.25), torch.full((3,), 0.25)], ids=str)
def test_call_field_passes_batched_time(t: object, dtype: torch.dtype) -> None:
    field = TimeRecorder()
    x = torch.ones(3, 2, 2, dtype=dtype)
    out = call_field(field, x, t)
    (seen,) = field.seen
    # The convention: t arrives as a (B,) tensor on x's dtype/device, whatever form it was given in.
    assert seen.shape == (3,) and seen.dtype == dtype and seen.device == x.device
    # 0.25 is exact in binary, so equality is exact in both dtypes.
    assert torch.equal(out, torch.full_like(x, 0.25))


def test_call_field_rejects_wrong_shape_and_names_field() -> None:
    def squash(x: Tensor, t: Tensor) -> Tensor:
        return x.sum(1)

    with pytest.raises(ValueError, match=r"squash.*shape \(4,\).*\(4, 3\)"):
        call_field(squash, torch.zeros(4, 3), 0.5)


def test_call_field_rejects_non_tensor_dtype_and_non_callable() -> None:
    with pytest.raises(TypeError, match=r"must return a torch\.Tensor"):
        call_field(lambda x, t: x.numpy(), torch.zeros(2, 3), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        call_field(lambda x, t: x.float(), torch.zeros(2, 3, dtype=torch.float64), 0.5)
    with pytest.raises(TypeError, match="callable"):
        call_field(3.0, torch.zeros(2, 3), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t must lie in"):
        call_field(lambda x, t: x, torch.zeros(2, 3), 1.5)


def test_closed_form_divergence_found_on_object_and_velocity_methods() -> None:
    field = Scaling(2.0)
    x, t = torch.zeros(4, 3), torch.zeros(4)
    for v in (field, field.velocity, field.__call__):
        found = closed_form_divergence(v)
        assert found is not None
        # 2 * 3 = 6 exactly.
        assert torch.equal(found(x, t), torch.full((4,), 6.0))


def test_closed_form_divergence_absent() -> None:
    field = Scaling(2.0)
    assert closed_form_divergence(lambda x, t: x) is None
    assert closed_form_divergence(nn.Linear(2, 2)) is None
    # log_prob is not the object's velocity: its owner's divergence must not be used for it.
    assert closed_form_divergence(field.log_prob) is None
    assert closed_form_divergence(Scaling) is None  # a class is not a field instance


def test_field_name() -> None:
    field = Scaling(1.0)
    assert field_name(field.velocity) == "Scaling.velocity"
    assert field_name(nn.Linear(2, 2)) == "Linear"

    def my_field(x: Tensor, t: Tensor) -> Tensor:
        return x

    assert field_name(my_field) == "my_field"


def test_shape_error_in_the_field_gets_the_convention_hint() -> None:
    """A field written in torchdiffeq's f(t, x) order fails on a shape error: the hint names the
    convention and the original error is chained."""

    def swapped(t: Tensor, x: Tensor) -> Tensor:  # torchdiffeq order: t is really x here
        return x * t  # (B,) * (B, 3): a broadcast error for B = 4

    x = torch.zeros(4, 3)
    with pytest.raises(RuntimeError, match=r"t of shape \(B,\)") as info:
        call_field(swapped, x, 0.5)
    assert "f(t, x)" in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_other_errors_in_the_field_pass_unchanged() -> None:
    def broken(x: Tensor, t: Tensor) -> Tensor:
        raise RuntimeError("out of coffee")

    with pytest.raises(RuntimeError, match=r"^out of coffee$"):
        call_field(broken, torch.zeros(2, 3), 0.5)


def test_extras_are_passed_as_keywords_and_sliced_with_the_batch() -> None:
    label = torch.arange(4)

    def conditional(x: Tensor, t: Tensor, *, label: Tensor, gain: float) -> Tensor:
        return x + gain * label[:, None].to(x.dtype)

    out = call_field(conditional, torch.zeros(4, 2), 0.5, {"label": label, "gain": 2.0})
    torch.testing.assert_close(out, 2.0 * label[:, None].float().expand(4, 2))
    sub = select_extras({"label": label, "gain": 2.0, "table": torch.ones(3)}, 4, label > 1)
    assert sub["label"].tolist() == [2, 3] and sub["gain"] == 2.0 and sub["table"].shape == (3,)
    with pytest.raises(TypeError, match="extras must be a dict"):
        call_field(conditional, torch.zeros(4, 2), 0.5, [label])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not contain 'x' or 't'"):
        call_field(conditional, torch.zeros(4, 2), 0.5, {"t": 1.0})


def test_a_label_of_the_wrong_length_is_named_in_the_hint() -> None:
    """Issue 21 item 2 through log_likelihood (every field call): extras={"y": y[:-1]} failed with a
    hint about the argument order and scalar times only; the hint names the extra and both
    counts first."""
    x = torch.randn(9, 2, dtype=torch.float64)
    y = torch.arange(9)

    def field(x, t, y):
        return -x * (1 + y[:, None].to(x.dtype))

    with pytest.raises(RuntimeError, match=r"Hint: extras\['y'\] has 8 rows for the 9 rows of x"):
        call_field(field, x, 0.5, {"y": y[:-1]})


def test_a_non_string_extras_key_is_named() -> None:
    """Today's main said "extras must be a dict ... got dict" for {1: ...}."""
    from cnftools.fields import check_extras

    with pytest.raises(TypeError, match=r"got the key 1 \(int\)"):
        check_extras({1: torch.zeros(2)})
