r"""Continuity-equation residuals: does a field generate a density path?

A field :math:`v` generates the path :math:`p_t` iff :math:`\partial_t p_t + \nabla\cdot(p_t v_t) = 0`
(theory §4). Dividing by :math:`p_t` gives the **log form**, which does not underflow where
:math:`p_t` is tiny:

.. math::

    r(x, t) = \partial_t \log p_t(x) + \nabla\cdot v_t(x) + v_t(x)\cdot\nabla_x \log p_t(x) = 0,
    \qquad \partial_t p + \nabla\cdot(p v) = p\, r.

:math:`\partial_t \log p` and :math:`\nabla_x \log p` come from one autograd call on the summed
batch, every sample carrying its own time, so each gradient stays per-sample. The divergence is
taken by autograd (:func:`cnftools.divergence`) by default, independently of any closed form the
field offers, so the check verifies the field rather than trusting it.

References:
    Lipman et al. (2022), arXiv:2210.02747, eq. (3)–(4) and Theorem 1; Villani, Optimal Transport,
    Old and New (2009), ch. 1 (the continuity equation).

Theory sections cited here (pages under ``docs/theory/``):

- §4: ``docs/theory/divergence-and-continuity.md#continuity-equation``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from cnftools import divergences
from cnftools._checks import as_time, check_batched, check_finite
from cnftools.estimators import Estimator, Exact, check_estimator
from cnftools.fields import VelocityField, call_checked, check_callable

__all__ = [
    "ContinuityTerms",
    "continuity_relative_residual",
    "continuity_residual",
    "continuity_terms",
]

LogProb = Callable[[Tensor, Tensor], Tensor]
_EXACT = Exact()


class ContinuityTerms(NamedTuple):
    r"""The three terms of the log-form residual, each of shape ``(B,)``.

    Attributes:
        time_derivative: :math:`\partial_t \log p_t(x)`.
        divergence: :math:`\nabla\cdot v_t(x)`.
        transport: :math:`v_t(x)\cdot\nabla_x \log p_t(x)`.
    """

    time_derivative: Tensor
    divergence: Tensor
    transport: Tensor

    @property
    def residual(self) -> Tensor:
        """:math:`r = \\partial_t \\log p + \\nabla\\cdot v + v\\cdot\\nabla\\log p`, shape ``(B,)``."""
        return self.time_derivative + self.divergence + self.transport

    @property
    def scale(self) -> Tensor:
        r""":math:`|\partial_t \log p| + |\nabla\cdot v| + |v\cdot\nabla\log p|`, shape ``(B,)``."""
        return self.time_derivative.abs() + self.divergence.abs() + self.transport.abs()


def _divergence_of(estimator: object, v: VelocityField, x: Tensor, t: Tensor) -> Tensor:
    if estimator is None:
        raise TypeError(
            "estimator must be a divergence spec; the continuity checks take no None (their "
            "default, Exact(), checks the field rather than its closed form): pass "
            "cnftools.Exact(), cnftools.Hutchinson(...) or cnftools.ClosedForm()"
        )
    return divergences.divergence(v, x, t, check_estimator(estimator)).detach()


def continuity_terms(
    log_prob: LogProb,
    v: VelocityField,
    x: Tensor,
    t: float | Tensor,
    *,
    estimator: Estimator = _EXACT,
) -> ContinuityTerms:
    r"""The three terms of :math:`r = \partial_t \log p + \nabla\cdot v + v\cdot\nabla_x \log p`.

    Args:
        log_prob: ``log_prob(x, t) -> (B,)``, the log-density :math:`\log p_t(x)`, differentiable
            in ``x`` and ``t`` (it receives ``t`` of shape ``(B,)`` that requires grad).
        v: velocity field ``v(x, t)``.
        x: points, shape ``(B, *event)``.
        t: a float, a 0-dim tensor or a ``(B,)`` tensor in :math:`[0, 1]`.
        estimator: how :math:`\nabla\cdot v` is computed (:mod:`cnftools.estimators`):
            ``Exact()`` (autograd, default: an independent check of the field, whatever closed
            form it offers), ``Exact("loop")`` (the plain autograd loop), ``ClosedForm()`` (the
            field's own ``divergence(x, t)``, see :func:`cnftools.fields.closed_form_divergence`)
            or ``Hutchinson(...)`` (a stochastic residual).

    Returns:
        :class:`ContinuityTerms` (detached tensors of shape ``(B,)``).
    """
    if not callable(log_prob):
        raise TypeError(f"log_prob must be callable log_prob(x, t), got {type(log_prob).__name__}")
    check_callable(v)
    x = check_batched("x", x)
    tb = as_time(t, x)
    with torch.enable_grad():
        # A private copy of the times, one leaf entry per sample: d(sum_b log p_b)/dt_b is then
        # exactly d log p_b / dt_b, and the same holds for x.
        t_in = tb.detach().clone().requires_grad_(True)
        x_in = x.detach().requires_grad_(True)
        log_p = log_prob(x_in, t_in)
        if not isinstance(log_p, Tensor) or log_p.shape != (x.shape[0],):
            shape = tuple(log_p.shape) if isinstance(log_p, Tensor) else type(log_p).__name__
            raise ValueError(f"log_prob must return shape (B,) = ({x.shape[0]},), got {shape}")
        if not log_p.requires_grad:
            raise ValueError(
                "log_prob(x, t) does not depend on x or t through autograd (requires_grad is "
                "False); it must be written in torch operations"
            )
        check_finite("log_prob(x, t)", log_p.detach())
        grad_x, grad_t = torch.autograd.grad(log_p.sum(), (x_in, t_in), allow_unused=True)
    grad_x = torch.zeros_like(x) if grad_x is None else grad_x.detach()
    grad_t = torch.zeros_like(tb) if grad_t is None else grad_t.detach()
    with torch.no_grad():
        velocity = call_checked(v, x, tb)
    div = _divergence_of(estimator, v, x, tb)
    transport = (velocity * grad_x).reshape(x.shape[0], -1).sum(dim=1)
    # A residual computed from non-finite terms would be NaN, not a verdict: name the rows.
    for name, term in (
        ("∂_t log p", grad_t),
        ("∇_x log p", grad_x),
        ("v", velocity),
        ("div v", div),
    ):
        check_finite(name, term)
    return ContinuityTerms(grad_t, div, transport)


def continuity_residual(
    log_prob: LogProb,
    v: VelocityField,
    x: Tensor,
    t: float | Tensor,
    *,
    estimator: Estimator = _EXACT,
) -> Tensor:
    r"""The log-form continuity residual, per sample.

    .. math::

        r(x, t) = \partial_t \log p_t(x) + \nabla\cdot v_t(x) + v_t(x)\cdot\nabla_x \log p_t(x),

    zero everywhere iff ``v`` generates ``p`` (theory §4). Arguments as in
    :func:`continuity_terms`.

    Returns:
        :math:`r`, shape ``(B,)``.

    Example:
        >>> import torch, cnftools
        >>> path = cnftools.OTPath(sigma_min=0.1)
        >>> x1 = torch.randn(8, 3, dtype=torch.float64)
        >>> x = path.sample(0.4, x1)
        >>> r = cnftools.continuity_residual(
        ...     lambda x, t: path.log_prob(x, t, x1),
        ...     lambda x, t: path.conditional_velocity(x, t, x1),
        ...     x,
        ...     0.4,
        ... )
        >>> bool(r.abs().max() < 1e-12)
        True

    References:
        Lipman et al. (2022), arXiv:2210.02747, eq. (4).
    """
    return continuity_terms(log_prob, v, x, t, estimator=estimator).residual


def continuity_relative_residual(
    log_prob: LogProb,
    v: VelocityField,
    x: Tensor,
    t: float | Tensor,
    *,
    estimator: Estimator = _EXACT,
) -> Tensor:
    r"""The residual relative to the size of its terms, per sample.

    .. math::

        \frac{|r|}{|\partial_t \log p| + |\nabla\cdot v| + |v\cdot\nabla_x \log p|}.

    This is in :math:`[0, 1]`: 0 for a field that generates the path, about machine epsilon times
    a small factor in closed-form cases (theory §4 quotes :math:`\lesssim 10^{-14}` in float64),
    and of order one for a wrong field. Where all three terms are exactly zero the residual is
    exactly zero too (it is their sum), and the ratio is defined as 0 there (nothing to violate)
    instead of ``0/0 = NaN``.

    Returns:
        Shape ``(B,)``.

    Example:
        >>> import torch, cnftools
        >>> path = cnftools.VPPath()
        >>> x1 = torch.randn(8, 3, dtype=torch.float64)
        >>> x = path.sample(0.5, x1)
        >>> wrong = lambda x, t: 1.05 * path.conditional_velocity(x, t, x1)
        >>> rel = cnftools.continuity_relative_residual(
        ...     lambda x, t: path.log_prob(x, t, x1), wrong, x, 0.5
        ... )
        >>> bool(rel.max() > 1e-3)
        True
    """
    terms = continuity_terms(log_prob, v, x, t, estimator=estimator)
    scale = terms.scale
    ratio = terms.residual.abs() / torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(scale > 0, ratio, torch.zeros_like(ratio))
