r"""The velocity-field convention, stated once for the whole package.

A **velocity field** is any callable ``v(x, t)``. cnftools always calls it with

- ``x`` of shape ``(B, *event)`` (a batch of points), and
- ``t`` a tensor of shape ``(B,)`` on ``x``'s device and dtype (one time per sample, so that
  derivatives of a summed batch stay per-sample),

and expects a tensor of the same shape, dtype and device as ``x`` back. A ``torch.nn.Module``
whose ``forward(x, t)`` does this is a velocity field; so is a plain function, a lambda that binds
extra arguments (``lambda x, t: path.conditional_velocity(x, t, x1)``) or a bound method.

A field that knows its divergence :math:`\nabla\cdot v = \operatorname{tr} \partial v/\partial x`
in closed form says so through one optional protocol: a method ``divergence(x, t) -> (B,)`` on the
field object (for example the marginal fields of :mod:`cnftools.marginals`). A bound method
``obj.velocity`` or ``obj.__call__`` of an object with such a ``divergence`` method counts too.
:func:`closed_form_divergence` finds it; nothing else in cnftools inspects field types. Such a
field may also offer ``velocity_and_divergence(x, t) -> (v, div)`` computing both in one pass;
:func:`call_with_closed_form_divergence` then uses it (ODE solves need both at every step).

References:
    Chen et al., Neural Ordinary Differential Equations (2018), arXiv:1806.07366;
    Lipman et al., Flow Matching for Generative Modeling (2022), arXiv:2210.02747.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

from cnftools._checks import as_time, check_batched

__all__ = [
    "CONVENTION_HINT",
    "Extras",
    "OutputDeviceError",
    "OutputDtypeError",
    "OutputShapeError",
    "VelocityField",
    "accepts_keyword",
    "call_checked",
    "call_field",
    "call_with_closed_form_divergence",
    "check_callable",
    "check_extras",
    "check_output_like",
    "closed_form_divergence",
    "field_name",
    "is_shape_error",
    "required_keywords",
    "select_extras",
    "shares_time",
    "takes_labels",
]

Divergence = Callable[[Tensor, Tensor], Tensor]


@runtime_checkable
class VelocityField(Protocol):
    """The protocol every velocity field satisfies: ``v(x, t, **extras) -> (B, *event)``, with
    ``x`` of shape ``(B, *event)``, ``t`` of shape ``(B,)`` and optional conditioning keywords.
    The type every cnftools function uses for a field argument."""

    def __call__(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:  # pragma: no cover
        ...


def field_name(v: object) -> str:
    """A short human-readable name for a field, used in error messages.

    Example:
        >>> field_name(lambda x, t: x)
        '<lambda>'
    """
    self_obj = getattr(v, "__self__", None)
    func = getattr(v, "__func__", None)
    if self_obj is not None and func is not None:
        return f"{type(self_obj).__name__}.{func.__name__}"
    name = getattr(v, "__qualname__", None)
    if isinstance(name, str):
        return name.rsplit(".", 1)[-1] if "<locals>" in name else name
    return type(v).__name__


def call_field(
    v: Callable[..., Tensor], x: Tensor, t: float | Tensor, extras: Extras | None = None
) -> Tensor:
    r"""Call a velocity field by the package convention and check what it returns.

    Args:
        v: the field, ``v(x, t)``.
        x: points, shape ``(B, *event)``.
        t: a float, a 0-dim tensor or a ``(B,)`` tensor in :math:`[0, 1]`; ``v`` always receives a
            ``(B,)`` tensor on ``x``'s device and dtype.
        extras: keyword arguments passed to the field as they are (a conditional field's label).

    Returns:
        :math:`v(x, t)`, shape ``(B, *event)``.

    Raises:
        TypeError: ``v`` is not callable, or returns something other than a tensor of ``x``'s
            dtype.
        ValueError: the output's shape or device differs from ``x``'s.

    Example:
        >>> import torch
        >>> x = torch.zeros(2, 3)
        >>> call_field(lambda x, t: x + t[:, None], x, 0.5)
        tensor([[0.5000, 0.5000, 0.5000],
                [0.5000, 0.5000, 0.5000]])
    """
    check_callable(v)
    x = check_batched("x", x)
    return call_checked(v, x, as_time(t, x), check_extras(extras))


Extras = Mapping[str, object]
"""Extra keyword arguments of a conditional field, ``v(x, t, **extras)`` (see :func:`call_checked`)."""

_SHAPE_ERROR = re.compile(
    r"size of tensor|must match the size|shapes? cannot be multiplied|shape '\[|is invalid for "
    r"input of size|broadcast|dimension|Sizes of tensors|expected .*shape|mat1 and mat2",
    re.IGNORECASE,
)

CONVENTION_HINT = (
    "cnftools calls the field as v(x, t, **extras) with x of shape (B, *event) and t of shape "
    "(B,) (one time per sample); a model called as f(t, x) (torchdiffeq, torchdyn, torchcfm) or "
    "one that takes a single scalar time (torchcfm's torch_wrapper does t.repeat(x.shape[0])) "
    'is wrapped by cnftools.as_velocity(model, argument_order="t,x", time="scalar")'
)
"""The hint added to a shape or broadcast error raised inside a field call."""


def is_shape_error(error: BaseException) -> bool:
    """Whether ``error`` looks like a shape or broadcast mismatch raised inside a field or model
    (a ``RuntimeError`` whose text says so; not one raised under ``vmap``).

    Example:
        >>> is_shape_error(RuntimeError("Sizes of tensors must match except in dimension 1"))
        True
    """
    text = str(error)
    return (
        isinstance(error, RuntimeError) and bool(_SHAPE_ERROR.search(text)) and "vmap" not in text
    )


def select_extras(extras: Extras | None, batch: int, rows: Tensor | slice | None = None) -> dict:
    """The extras for a sub-batch: tensors whose first dimension is the batch are indexed by
    ``rows``; anything else (scalars, class embeddings shared by all rows) is passed as is.

    Args:
        extras: the field's keyword arguments (or ``None``).
        batch: the batch size ``B`` the extras were given for.
        rows: an index (a slice, a boolean mask or integer indices over the batch); ``None`` keeps
            every row.

    Returns:
        A new dict (empty for ``None``).

    Example:
        >>> import torch
        >>> extras = {"label": torch.arange(4), "scale": 2.0}
        >>> select_extras(extras, 4, slice(1, 3))
        {'label': tensor([1, 2]), 'scale': 2.0}
    """
    if not extras:
        return {}
    if rows is None:
        return dict(extras)
    return {
        k: (e[rows] if isinstance(e, Tensor) and e.dim() >= 1 and e.shape[0] == batch else e)
        for k, e in extras.items()
    }


def accepts_keyword(v: object, name: str) -> bool:
    """Whether calling ``v(x, t, name=...)`` is allowed by its signature (a parameter ``name`` or
    ``**kwargs``; for an ``nn.Module`` its ``forward``). ``True`` when there is no signature to read.

    Example:
        >>> accepts_keyword(lambda x, t: x, "y"), accepts_keyword(lambda x, t, y=None: x, "y")
        (False, True)
    """
    target = getattr(v, "forward", v)
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == name and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in parameters
    )


def takes_labels(v: object, name: str = "y") -> bool:
    """Whether a labelled dataset's ``y`` is for the field: the rule of
    :func:`cnftools.dataset_nll` for datasets of ``(x, y)`` items.

    A field that has a boolean attribute ``conditional`` says so itself
    (:class:`~cnftools.MLPField` and :class:`~cnftools.ConvField` have one: ``True`` when built
    with ``num_classes=`` or ``cond_dim=``); any other field takes ``y`` when its signature has a
    parameter ``y`` (or ``**kwargs``), as :func:`accepts_keyword` reads it.

    Example:
        >>> takes_labels(lambda x, t: x), takes_labels(lambda x, t, y: x)
        (False, True)
    """
    flag = getattr(v, "conditional", None)
    if isinstance(flag, bool):
        return flag
    return accepts_keyword(v, name)


def required_keywords(v: object) -> list[str]:
    """The parameters of ``v`` besides ``x`` and ``t`` that have no default (a conditional field's
    condition); empty when the signature cannot be read.

    Example:
        >>> required_keywords(lambda x, t, y, scale=1.0: x)
        ['y']
    """
    target = getattr(v, "forward", v)
    try:
        parameters = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return []
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    rest = [p for p in parameters if p.kind in positional][2:]
    rest += [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return [p.name for p in rest if p.default is inspect.Parameter.empty]


def check_callable(v: object) -> None:
    """Refuse a field that is not callable, naming what was given instead.

    Example:
        >>> check_callable(lambda x, t: x)
    """
    if not callable(v):
        raise TypeError(f"v must be a velocity field, a callable v(x, t); got {type(v).__name__}")


def check_extras(extras: object) -> dict:
    """Validate ``extras=``: ``None`` or a mapping from argument names to values.

    Example:
        >>> check_extras(None)
        {}
    """
    if extras is None:
        return {}
    if isinstance(extras, Mapping) and not all(isinstance(k, str) for k in extras):
        bad = next(k for k in extras if not isinstance(k, str))
        raise TypeError(
            f"extras keys are the field's keyword names, strings; got the key {bad!r} "
            f"({type(bad).__name__})"
        )
    if not isinstance(extras, Mapping):
        raise TypeError(
            f"extras must be a dict of keyword arguments for the field, v(x, t, **extras); "
            f"got {type(extras).__name__}"
        )
    if {"x", "t"} & set(extras):
        raise ValueError("extras must not contain 'x' or 't': cnftools passes those itself")
    return dict(extras)


def call_checked(
    v: Callable[..., Tensor], x: Tensor, t: Tensor, extras: Extras | None = None
) -> Tensor:
    """:func:`call_field` for inputs already validated (``x`` checked, ``t`` a ``(B,)`` tensor).

    The one place cnftools calls a field: ``v(x, t, **extras)``. Only the field's output is
    checked; internal callers use this to validate inputs once. A shape or broadcast error raised
    inside the field is re-raised with :data:`CONVENTION_HINT` (the original error chained).
    """
    try:
        out = v(x, t, **extras) if extras else v(x, t)
    except RuntimeError as error:
        if not is_shape_error(error) or "\nHint: " in str(error):
            raise  # not a shape error, or one that already says what to do
        rows = [
            f"extras[{k!r}] has {e.shape[0]} rows"
            for k, e in (extras or {}).items()
            if isinstance(e, Tensor) and e.dim() >= 1 and e.shape[0] != x.shape[0]
        ]
        labels = (
            f"{', '.join(rows)} for the {x.shape[0]} rows of x: a per-row extra (a label, a "
            "condition) needs one entry per row; "
            if rows
            else ""
        )
        raise RuntimeError(
            f"calling velocity field {field_name(v)} failed: {error}\nHint: {labels}"
            f"{CONVENTION_HINT}; here x has shape {tuple(x.shape)} and t shape {tuple(t.shape)}"
        ) from error
    return _checked_output(v, x, out)


def _checked_output(v: object, x: Tensor, out: object) -> Tensor:
    if (
        isinstance(out, Tensor)
        and out.shape == x.shape
        and out.dtype == x.dtype
        and out.device == x.device
    ):
        return out  # the common case, without building the error's words
    return check_output_like(
        out,
        x,
        f"velocity field {field_name(v)}",
        "a field must return one velocity per point, shape (B, *event)",
    )


def check_output_like(
    out: object, x: Tensor, who: str, shape_rule: str, type_hint: str = ""
) -> Tensor:
    """``out`` if it is a tensor of ``x``'s shape, dtype and device, else an error that names
    ``who`` returned what (``shape_rule`` says what the shape must be; ``type_hint`` is added when
    ``out`` is not a tensor). The one output check of field and model calls.

    Example:
        >>> import torch
        >>> x = torch.zeros(2, 3)
        >>> check_output_like(2 * x, x, "field f", "shape (B, d)").shape
        torch.Size([2, 3])
    """
    if (
        isinstance(out, Tensor)
        and out.shape == x.shape
        and out.dtype == x.dtype
        and out.device == x.device
    ):
        return out
    if not isinstance(out, Tensor):
        raise TypeError(f"{who} must return a torch.Tensor, got {type(out).__name__}{type_hint}")
    if out.shape != x.shape:
        raise OutputShapeError(
            f"{who} returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; {shape_rule}",
            tuple(out.shape),
        )
    if out.dtype != x.dtype:
        raise OutputDtypeError(
            f"{who} returned dtype {out.dtype} for x of dtype {x.dtype}; cast it "
            "(e.g. module.to(x.dtype)) so no precision is lost silently"
        )
    raise OutputDeviceError(f"{who} returned a tensor on {out.device}, x is on {x.device}")


class OutputDeviceError(ValueError):
    """A field or model returned a tensor on another device than its input's."""


class OutputShapeError(ValueError):
    """A field or model returned another shape than its input's (:func:`check_output_like`);
    ``shape`` is what it returned, for callers that explain it in their own terms."""

    def __init__(self, message: str, shape: tuple[int, ...]) -> None:
        super().__init__(message)
        self.shape = shape


class OutputDtypeError(TypeError):
    """A field or model returned another dtype than its input's (:func:`check_output_like`)."""


def shares_time(v: object) -> bool:
    """Whether the field takes one time for its whole batch (a ``shares_time`` attribute that is
    ``True``, as ``as_velocity(..., time="scalar")`` fields have): the engine then gives the batch's
    rows one shared step instead of a step each.

    Example:
        >>> shares_time(lambda x, t: -x)
        False
    """
    return getattr(v, "shares_time", False) is True


def closed_form_divergence(v: object) -> Divergence | None:
    r"""The field's own closed-form divergence, if it offers one.

    Looks for a method ``divergence(x, t) -> (B,)`` on ``v`` itself, or, when ``v`` is the bound
    method ``obj.velocity`` or ``obj.__call__``, on ``obj`` (so ``marginal.velocity`` finds
    ``marginal.divergence``). Other bound methods (``obj.log_prob``) are not velocity fields of
    ``obj`` and give ``None``.

    Args:
        v: a velocity field.

    Returns:
        The callable ``divergence(x, t)`` returning :math:`\nabla\cdot v(x, t)` of shape ``(B,)``,
        or ``None`` when the field has no closed form (then use :func:`cnftools.divergence`).

    Example:
        >>> import torch
        >>> class Scaling:
        ...     def velocity(self, x, t):
        ...         return 2 * x
        ...
        ...     def divergence(self, x, t):
        ...         return torch.full(x.shape[:1], 2.0 * x[0].numel())
        ...
        ...     __call__ = velocity
        >>> field = Scaling()
        >>> closed_form_divergence(field.velocity)(torch.zeros(2, 3), torch.zeros(2))
        tensor([6., 6.])
        >>> closed_form_divergence(lambda x, t: x) is None
        True
    """
    candidate = getattr(v, "divergence", None)
    if candidate is not None and callable(candidate) and not inspect.isclass(v):
        return candidate
    owner = getattr(v, "__self__", None)
    func = getattr(v, "__func__", None)
    if owner is None or func is None:
        return None
    if func.__name__ not in ("velocity", "__call__"):
        return None
    candidate = getattr(owner, "divergence", None)
    return candidate if callable(candidate) else None


def call_with_closed_form_divergence(
    v: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    divergence: Divergence,
    extras: Extras | None = None,
) -> tuple[Tensor, Tensor]:
    r"""``(v(x, t), divergence(x, t))`` for a field with a closed-form divergence, in one pass
    when the object that owns ``divergence`` also offers ``velocity_and_divergence(x, t)``.

    Inputs as for :func:`call_checked` (already validated); ``divergence`` is what
    :func:`closed_form_divergence` returned for ``v``. The velocity is checked like
    :func:`call_checked`'s; the divergence is returned as the field computed it. With ``extras``
    both are called with them as keywords, in two passes.

    Example:
        >>> import torch, cnftools
        >>> m = cnftools.GaussianMarginal(
        ...     cnftools.OTPath(0.1),
        ...     torch.zeros(2, dtype=torch.float64),
        ...     torch.eye(2, dtype=torch.float64),
        ... )
        >>> x, t = torch.ones(3, 2, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
        >>> u, div = call_with_closed_form_divergence(m, x, t, closed_form_divergence(m))
        >>> torch.equal(div, m.divergence(x, t)), torch.equal(u, m.velocity(x, t))
        (True, True)
    """
    owner = getattr(divergence, "__self__", None)
    one_pass = getattr(owner, "velocity_and_divergence", None)
    same_object = owner is not None and (v is owner or getattr(v, "__self__", None) is owner)
    if extras or not (
        same_object and callable(one_pass) and getattr(owner, "divergence", None) == divergence
    ):
        out = call_checked(v, x, t, extras)
        return out, (divergence(x, t, **extras) if extras else divergence(x, t))
    out, div = one_pass(x, t)
    return _checked_output(v, x, out), div
