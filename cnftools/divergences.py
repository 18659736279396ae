r"""Divergence of a velocity field: exact (strategy chosen by problem size), Hutchinson, closed form.

The divergence (theory §11) is the trace of the Jacobian,

.. math::

    \nabla\cdot v(x, t) = \operatorname{tr}\frac{\partial v}{\partial x}
    = \sum_{i=1}^{d} e_i^\top \frac{\partial v}{\partial x} e_i,

with :math:`d` the number of event entries (any event shape is flattened). Each term is one
vector-Jacobian product (VJP), so an exact divergence costs about :math:`d` backward passes: the
floor for a general field. How those :math:`d` VJPs are issued decides the speed:

Which way is a spec of :mod:`cnftools.estimators` (``estimator=Exact("loop")``,
``Hutchinson(8)``, ``ClosedForm()``); the evaluator that runs them is internal
(:mod:`cnftools._divergence_evaluator`). The exact strategies:

- ``"loop"``: one forward pass, then :math:`d` backward passes through the retained graph. Per-call
  overhead is paid :math:`d` times; near the floor when the batch is large.
- ``"batched"``: the basis vectors go through ``torch.autograd.grad(..., is_grads_batched=True)``
  (vmap over VJPs) in chunks, so each backward pass handles ``chunk * B`` rows. Far faster for small
  batches; for large batches big chunks only cost memory, so the chunk is sized to about
  :data:`BATCHED_ROWS` rows and ``"auto"`` switches to the loop once a chunk would hold fewer than
  :data:`MIN_CHUNK` basis vectors.
- ``"forward"``: forward-mode products :math:`(\partial v/\partial x) e_i` with
  :func:`torch.func.jvp`, vmapped over chunks of basis vectors. Slowest on CPU; offered for fields
  and devices where it wins.

Hutchinson's estimator replaces the basis by :math:`K` random probes with
:math:`\mathbb E[\varepsilon\varepsilon^\top] = I`:

.. math::

    \nabla\cdot v \approx \frac1K \sum_{k=1}^K \varepsilon_k^\top \frac{\partial v}{\partial x}
    \varepsilon_k,\qquad
    \operatorname{Var}_{\text{Rademacher}} = \sum_{i\ne j} A_{ij}(A_{ij} + A_{ji}),\quad
    \operatorname{Var}_{\text{Gauss}} = \|A\|_F^2 + \operatorname{tr}(A^2)

per probe, :math:`A = \partial v/\partial x`. It costs :math:`K` VJPs instead of :math:`d`.

References:
    Grathwohl et al., FFJORD (2019), arXiv:1810.01367, §3; Hutchinson, A stochastic estimator of
    the trace of the influence matrix (1989); Chen et al. (2018), arXiv:1806.07366.

Theory sections cited here (pages under ``docs/theory/``):

- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
- §11: ``docs/theory/divergence-and-continuity.md#divergence``
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cnftools._checks import (
    as_time,
    check_batched,
    check_depends_on_input,
    check_floating,
)
from cnftools._divergence_evaluator import (
    BATCHED_ROWS,
    MIN_CHUNK,
    DivergenceEvaluator,
    choose_strategy,
)
from cnftools.estimators import Estimator, Hutchinson, check_estimator, standard_error
from cnftools.fields import (
    Extras,
    VelocityField,
    call_checked,
    check_callable,
    check_extras,
    field_name,
)

__all__ = [
    "BATCHED_ROWS",
    "MIN_CHUNK",
    "DivergenceResult",
    "choose_strategy",
    "divergence",
    "jacobian",
    "velocity_and_divergence",
]


@dataclass(frozen=True)
class DivergenceResult:
    r"""A field's velocity and divergence at a batch of points, from one forward pass.

    Attributes:
        velocity: :math:`v(x, t)`, ``(B, *event)``.
        divergence: :math:`\nabla\cdot v(x, t)` per sample, ``(B,)``: exact, or for Hutchinson
            the mean :math:`\frac1K\sum_k \varepsilon_k^\top (\partial v/\partial x)\,
            \varepsilon_k`.
        stderr: Hutchinson with :math:`K \ge 2` probes: the sample standard error
            :math:`s_K/\sqrt K` per sample, ``(B,)``; ``None`` otherwise.
        n_probes: :math:`K` for Hutchinson, ``None`` for exact and closed-form divergences.
    """

    velocity: Tensor
    divergence: Tensor
    stderr: Tensor | None = None
    n_probes: int | None = None


def _velocity_and_columns(
    v: VelocityField,
    x: Tensor,
    t: float | Tensor,
    estimator: object,
    create_graph: bool,
    extras: Extras | None,
) -> tuple[Tensor, Tensor]:
    """Check the arguments, then ``(v(x, t), columns)``: one divergence column per Hutchinson
    probe ``(B, K)``, or the exact divergence ``(B, 1)``."""
    check_callable(v)
    spec = check_estimator(estimator)
    if not isinstance(create_graph, bool):
        raise TypeError(f"create_graph must be a bool, got {type(create_graph).__name__}")
    x = check_batched("x", x)
    tb = as_time(t, x)
    extras_ = check_extras(extras)
    evaluator = DivergenceEvaluator.for_spec(v, spec, x)
    return evaluator(v, x, tb, create_graph=create_graph, extras=extras_)


def velocity_and_divergence(
    v: VelocityField,
    x: Tensor,
    t: float | Tensor,
    estimator: Estimator | None = None,
    *,
    create_graph: bool = False,
    extras: Extras | None = None,
) -> DivergenceResult:
    r"""The field and its divergence from one forward pass, with the Monte Carlo error.

    Same arguments as :func:`divergence`; this is what an ODE solve of the augmented state
    :math:`[z, \int \nabla\cdot v]` needs (theory §3), without evaluating the field twice. The
    velocity is detached unless ``create_graph=True``.

    Returns:
        A :class:`DivergenceResult`: velocity ``(B, *event)``, divergence ``(B,)`` and, for
        Hutchinson with :math:`K \ge 2` probes, its standard error.

    Example:
        >>> import torch, cnftools
        >>> result = velocity_and_divergence(lambda x, t: -x, torch.ones(2, 3), 0.5)
        >>> result.divergence
        tensor([-3., -3.])
        >>> g = torch.Generator().manual_seed(0)
        >>> field = lambda x, t: torch.sin(x)
        >>> spec = cnftools.Hutchinson(n_probes=64, generator=g)
        >>> velocity_and_divergence(field, torch.ones(4, 3), 0.5, spec).stderr.shape
        torch.Size([4])
    """
    out, columns = _velocity_and_columns(v, x, t, estimator, create_graph, extras)
    hutchinson = isinstance(estimator, Hutchinson)
    return DivergenceResult(
        velocity=out,
        divergence=columns.mean(dim=1),
        stderr=standard_error(columns) if hutchinson else None,
        n_probes=columns.shape[1] if hutchinson else None,
    )


def jacobian(
    v: VelocityField,
    x: Tensor,
    t: float | Tensor,
    *,
    create_graph: bool = False,
    batched: bool = False,
    allow_constant: bool = False,
    extras: Extras | None = None,
) -> Tensor:
    r"""Per-sample Jacobians :math:`J_b = \partial v(x_b, t_b)/\partial x_b`, shape ``(B, d, d)``.

    The full matrix, one reverse-mode pass per output coordinate (``d`` in all; batched through
    ``is_grads_batched`` with ``batched=True``), events flattened to ``d``. The one reference
    Jacobian of cnftools: the testing kit's trace and :class:`~cnftools.flows.EulerStep`'s
    log-determinant both use it. Rows of ``v`` must be independent (no batch normalisation).

    Args:
        v: the field, called as ``v(x, t, **extras)``.
        x: points ``(B, *event)``.
        t: times (float, 0-d or ``(B,)``).
        create_graph: keep the graph (a differentiable Jacobian); otherwise it is detached.
        batched: one batched backward pass instead of ``d`` passes.
        allow_constant: a field with no autograd path from ``x`` has Jacobian 0 (otherwise it is
            refused: a zero that is really "unknown" would be a wrong number).
        extras: keyword arguments for the field.

    Example:
        >>> import torch
        >>> jacobian(lambda x, t: 2 * x, torch.ones(1, 2), 0.5)
        tensor([[[2., 0.],
                 [0., 2.]]])
    """
    x = check_floating("x", check_batched("x", x))
    tt = as_time(t, x)
    batch, d = x.shape[0], x[0].numel()
    with torch.enable_grad():
        xg = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        out = call_checked(v, xg, tt, check_extras(extras))
        if not (allow_constant and not out.requires_grad):
            check_depends_on_input(f"velocity field {field_name(v)}", out, xg)
        if not out.requires_grad:
            return x.new_zeros(batch, d, d)
        flat = out.reshape(batch, d)
        options = {"create_graph": create_graph, "allow_unused": True, "materialize_grads": True}
        if batched:
            basis = torch.eye(d, dtype=x.dtype, device=x.device)[:, None, :].expand(d, batch, d)
            (rows,) = torch.autograd.grad(flat, xg, basis, is_grads_batched=True, **options)
            jac = rows.reshape(d, batch, d).permute(1, 0, 2)
        else:
            columns = [
                torch.autograd.grad(flat[:, k].sum(), xg, retain_graph=True, **options)[0]
                for k in range(d)
            ]
            jac = torch.stack([c.reshape(batch, d) for c in columns], dim=1)
    return jac if create_graph else jac.detach()


def divergence(
    v: VelocityField,
    x: Tensor,
    t: float | Tensor,
    estimator: Estimator | None = None,
    *,
    create_graph: bool = False,
    extras: Extras | None = None,
) -> Tensor:
    r"""The divergence :math:`\nabla\cdot v(x, t) = \operatorname{tr} \partial v / \partial x`, per sample.

    Args:
        v: velocity field ``v(x, t)`` (see :mod:`cnftools.fields`); must be differentiable in x.
        x: points, shape ``(B, *event)``; the event is flattened, :math:`d = \prod` event.
        t: a float, a 0-dim tensor or a ``(B,)`` tensor in :math:`[0, 1]`.
        estimator: a divergence spec (:mod:`cnftools.estimators`): :class:`~cnftools.Exact`
            (the trace by autograd, strategy chosen by size or forced, e.g. ``Exact("loop")``,
            the plain reference), :class:`~cnftools.Hutchinson` (unbiased estimate from ``K``
            fixed probes; its standard error is in :func:`velocity_and_divergence`'s result) or
            :class:`~cnftools.ClosedForm` (the field's own ``divergence(x, t)``). ``None``: the
            closed form when the field offers one, else ``Exact()``.
        create_graph: keep the graph so the result is differentiable (w.r.t. the field's
            parameters, and w.r.t. ``x`` when ``x.requires_grad``). Costs ~1.3x; off by default.
        extras: keyword arguments for a conditional field, ``v(x, t, **extras)``, passed as
            they are.

    Returns:
        The divergence, shape ``(B,)``. Exact methods agree with the Jacobian trace to rounding.
        Works under ``torch.no_grad()`` (the gradients needed are enabled internally); the result
        is detached unless ``create_graph``.

    Raises:
        ValueError: a field whose output has the wrong shape or does not depend on ``x``;
            Hutchinson probes of the wrong shape; ``ClosedForm()`` for a field without one.
        TypeError: a field that is not callable or returns the wrong dtype; an estimator that is
            not a spec.

    Example:
        >>> import torch, cnftools
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> field = lambda x, t: torch.sin(x) * (1 + t[:, None])
        >>> torch.allclose(divergence(field, x, 0.5), (1.5 * torch.cos(x)).sum(1))
        True
        >>> torch.allclose(
        ...     divergence(field, x, 0.5, cnftools.Exact("loop")), (1.5 * torch.cos(x)).sum(1)
        ... )
        True

    References:
        Chen et al. (2018), arXiv:1806.07366, Theorem 1; Grathwohl et al. (2019),
        arXiv:1810.01367, §3 (Hutchinson's estimator).
    """
    _, columns = _velocity_and_columns(v, x, t, estimator, create_graph, extras)
    return columns.mean(dim=1)
