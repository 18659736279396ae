"""Argument checks shared by every module.

Each check raises before any work starts, with a message that names the argument and says what was
expected. Nothing here clamps, broadcasts or converts silently: a float ``t`` becomes a tensor on the
reference tensor's device and dtype, and that is the only conversion made.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

__all__ = [
    "as_time",
    "check_batched",
    "check_finite",
    "check_floating",
    "check_same_shape",
    "expand_like",
]


def check_floating(name: str, x: object) -> Tensor:
    """Require a floating-point tensor; return it unchanged."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32 or float64), got {x.dtype}")
    return x


def check_finite(name: str, x: Tensor) -> Tensor:
    """Require every entry of ``x`` to be finite; name the first offending batch rows."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        if x.dim() >= 1:
            bad = (~finite).reshape(x.shape[0], -1).any(dim=1).nonzero().flatten()
            rows = bad[:10].tolist()
            more = "" if bad.numel() <= 10 else f" (and {bad.numel() - 10} more)"
            raise ValueError(
                f"{name} has non-finite values (NaN or inf) in batch rows {rows}{more}"
            )
        raise ValueError(f"{name} is non-finite: {x.item()}")
    return x


def check_batched(name: str, x: object, *, min_event_dims: int = 1) -> Tensor:
    """Require a finite floating tensor of shape ``(B, *event)`` with at least one event dim."""
    x = check_floating(name, x)
    if x.dim() < 1 + min_event_dims:
        raise ValueError(
            f"{name} must have shape (B, *event) with at least {min_event_dims} event dimension(s), "
            f"got shape {tuple(x.shape)}; add a batch dimension, e.g. x[None]"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty batch, got shape {tuple(x.shape)}")
    return check_finite(name, x)


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Require two tensors of the same shape, dtype and device."""
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (B, *event), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.dtype != b.dtype:
        raise TypeError(
            f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}"
        )
    if a.device != b.device:
        raise ValueError(
            f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}"
        )


def as_time(
    t: object,
    like: Tensor,
    *,
    name: str = "t",
    low: float = 0.0,
    high: float = 1.0,
) -> Tensor:
    """Return ``t`` as a tensor of shape ``(B,)`` on ``like``'s device and dtype.

    Args:
        t: a Python real, a 0-dim tensor or a tensor of shape ``(B,)``, with values in
            ``[low, high]``.
        like: the batch ``(B, *event)`` whose batch size, dtype and device ``t`` must follow.
        name: the argument's name, for error messages.
        low: smallest admissible time.
        high: largest admissible time.

    Returns:
        A tensor of shape ``(B,)``. A scalar is expanded (a view, no copy); a ``(B,)`` tensor is
        cast to ``like``'s dtype only when it is another floating dtype of the same values.
    """
    batch = like.shape[0]
    if isinstance(t, bool) or not isinstance(t, Real | Tensor):
        raise TypeError(f"{name} must be a float, a 0-dim tensor or a tensor of shape (B,)")
    if isinstance(t, Real):
        value = float(t)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if not low <= value <= high:
            raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
        return torch.full((batch,), value, dtype=like.dtype, device=like.device)
    if t.is_complex() or not (t.is_floating_point() or t.dtype in _INTEGER_DTYPES):
        raise TypeError(f"{name} must be a real tensor, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.reshape(1).expand(batch)
    elif t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{name} must be a scalar or have shape (B,) = ({batch},) to match the batch, "
            f"got shape {tuple(t.shape)}"
        )
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the batch is on {like.device}")
    t = t.to(like.dtype)
    # One host sync: NaN and inf propagate into the extremes.
    t_min, t_max = (float(v) for v in torch.stack(torch.aminmax(t.detach())).tolist())
    if not (math.isfinite(t_min) and math.isfinite(t_max)):
        raise ValueError(f"{name} has non-finite values")
    if t_min < low or t_max > high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got values in [{t_min}, {t_max}]")
    return t


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``(B,)`` tensor to ``(B, 1, ..., 1)`` so it broadcasts against ``x``."""
    return t.reshape(t.shape[0], *([1] * (x.dim() - 1)))


_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
