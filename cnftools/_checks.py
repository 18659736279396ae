"""Argument checks shared by every module.

Each check raises before any work starts, with a message that names the argument and says what was
expected. Nothing here clamps, broadcasts or converts silently: a float ``t`` becomes a tensor on the
reference tensor's device and dtype, and that is the only conversion made.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral, Real

import torch
from torch import Tensor

__all__ = [
    "SUPPORTED_DTYPES",
    "as_time",
    "check_batched",
    "check_depends_on_input",
    "check_device",
    "check_dtype",
    "check_event_shape",
    "check_finite",
    "check_floating",
    "check_int",
    "check_real",
    "check_same_shape",
    "check_tolerance",
    "expand_like",
    "quiet_jvp",
    "time_derivative",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64)
"""The floating dtypes cnftools computes in. Half precision (float16, bfloat16) is refused: the
log-densities, divergence integrals and solver tolerances overflow or lose every digit there."""


def check_dtype(name: str, dtype: object) -> torch.dtype:
    """Require ``float32`` or ``float64`` (a ``torch.dtype``); name the dtype otherwise."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(dtype).__name__}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} is {dtype}; cnftools computes in float32 or float64 only (half precision "
            "overflows the log-densities and the solver's tolerances): convert with .float() "
            "or .double()"
        )
    return dtype


def check_device(name: str, device: object) -> torch.device:
    """Require a device that holds values: refuse ``meta`` (shapes only) with a clear message."""
    try:
        device = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"{name} is not a valid torch device: {device!r} ({error})") from None
    if device.type == "meta":
        raise ValueError(
            f"{name} is on the 'meta' device, which holds shapes but no values; cnftools needs "
            "real numbers: move it to 'cpu' or 'cuda'"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{name} is {str(device)!r} but CUDA is not available on this machine (torch "
                f"{torch.__version__}); use 'cpu'"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{name} is {str(device)!r} but this machine has {torch.cuda.device_count()} "
                "CUDA device(s)"
            )
    return device


def check_floating(name: str, x: object) -> Tensor:
    """Require a float32 or float64 tensor on a device with values; return it unchanged."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32 or float64), got {x.dtype}")
    check_dtype(f"{name}'s dtype", x.dtype)
    check_device(f"{name}", x.device)
    return x


def check_event_shape(name: str, shape: object) -> tuple[int, ...]:
    """Require an event shape: an int ``d >= 1`` or a non-empty sequence of ints ``>= 1``."""
    items = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else shape
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise TypeError(f"{name} must be an int or a non-empty tuple of ints, got {shape!r}")
    if len(items) == 0:
        raise ValueError(f"{name} must be an int or a non-empty tuple of ints, got {shape!r}")
    for size in items:
        if isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(f"{name} must hold ints, got {shape!r}")
        if size < 1:
            raise ValueError(f"{name} must hold sizes >= 1, got {shape!r}")
    return tuple(int(size) for size in items)


def check_int(name: str, value: object, *, low: int = 1) -> int:
    """``value`` (any integral number, ``bool`` refused) as an ``int`` of at least ``low``, or a
    ``ValueError`` naming
    ``name``: the one integer-argument check of cnftools.

    Example:
        >>> check_int("steps", 20)
        20
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_real(name: str, value: object, *, expected: str = "a real number") -> float:
    """``value`` (any real number, ``bool`` refused) as a finite ``float``: a ``TypeError`` for
    a non-number and a ``ValueError`` for NaN or inf, each naming ``name`` and ``expected``.
    Range conditions stay with the caller, which knows them.

    Example:
        >>> check_real("sigma_min", 0.1)
        0.1
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be {expected} (finite), got {number}")
    return number


def check_tolerance(name: str, value: object, *, allow_none: bool = True) -> float | None:
    """Require a finite real ``>= 0`` (or ``None`` where allowed); refuse NaN, inf, bools."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__}")
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {number}")
    return number


def check_depends_on_input(label: str, output: Tensor, x: Tensor) -> None:
    """Require ``output`` to depend on ``x`` through autograd (call under ``enable_grad``).

    A field that returns a constant, a detached tensor or something computed outside torch has no
    autograd path from ``x``; its Jacobian and divergence cannot be taken, and reporting them as
    zero would be a wrong number. ``x`` must require grad.
    """
    message = (
        f"{label} returned a tensor that does not depend on x through autograd; it is constant in "
        "x or was computed outside torch (numpy, .detach(), .item()), so its Jacobian cannot be "
        "taken by autograd"
    )
    if not output.requires_grad:
        raise ValueError(message)
    (grad,) = torch.autograd.grad(
        output, x, torch.ones_like(output), retain_graph=True, allow_unused=True
    )
    if grad is None:
        raise ValueError(message)


_JVP_READY = False


def quiet_jvp(
    func: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]
) -> tuple[Tensor, Tensor]:
    """:func:`torch.func.jvp` without torch's one-time ``torch.jit.script`` DeprecationWarnings.

    On the first forward-mode call, torch jit-scripts a few decompositions and so warns
    ``torch.jit.script is deprecated`` (an internal detail of torch 2.x, not something the caller
    did). The first call is made here with that one warning silenced, so users' ``-W error`` runs
    are unaffected.
    """
    global _JVP_READY
    from torch.func import jvp

    if _JVP_READY:
        return jvp(func, primals, tangents)
    with warnings.catch_warnings():  # the first call only: torch's one-time warning
        warnings.filterwarnings(
            "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
        )
        result = jvp(func, primals, tangents)
    _JVP_READY = True
    return result


def time_derivative(func: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    r"""The elementwise time derivative :math:`\partial_t f(t)` by forward-mode autograd.

    ``t`` may be any view (a scalar expanded to ``(B,)`` or ``(B, 1, ..., 1)``): it is
    materialised first, since forward-mode autograd writes tangents into its input and an
    expanded tensor has many elements at one memory location. ``f`` must act on each entry of
    ``t`` separately (a schedule, or a mean whose row ``b`` depends on ``t[b]`` only).
    """
    t = t.contiguous() if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)
    return quiet_jvp(func, (t,), (torch.ones_like(t),))[1]


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
    if x[0].numel() == 0:
        raise ValueError(
            f"{name} has rows with no values: event shape {tuple(x.shape[1:])} (a zero-size "
            "dimension); a density needs at least one dimension per row"
        )
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
    check_values: bool = True,
) -> Tensor:
    """Return ``t`` as a tensor of shape ``(B,)`` on ``like``'s device and dtype.

    Args:
        t: a Python real, a 0-dim tensor or a tensor of shape ``(B,)``, with values in
            ``[low, high]``.
        like: the batch ``(B, *event)`` whose batch size, dtype and device ``t`` must follow.
        name: the argument's name, for error messages.
        low: smallest admissible time.
        high: largest admissible time.
        check_values: check a tensor's values (finite, in range: one host sync). ``False`` inside
            a field's ``forward``, which may run under ``torch.func`` transforms where values
            cannot be read; the caller (cnftools' solvers) has checked them already.

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
    if not check_values:
        return t
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
