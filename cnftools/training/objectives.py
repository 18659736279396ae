r"""Flow-matching objectives: the FM and CFM losses and the pieces of Theorem 2.

theory §6, with time running from noise (:math:`t = 0`) to data (:math:`t = 1`):

.. math::

    \mathcal L_{\mathrm{FM}}(\theta) = \mathbb E_{t, x \sim p_t}
        \lVert v_\theta(x, t) - u_t(x) \rVert^2, \qquad
    \mathcal L_{\mathrm{CFM}}(\theta) = \mathbb E_{t, x_1 \sim q, x \sim p_t(\cdot|x_1)}
        \lVert v_\theta(x, t) - u_t(x|x_1) \rVert^2 .

Both losses here are Monte Carlo estimates on a batch: the mean over the batch of the squared
Euclidean norm of the residual, summed over all event dimensions (no division by :math:`d`).

Theorem 2 (Lipman et al. 2022): :math:`\mathcal L_{\mathrm{CFM}} - \mathcal L_{\mathrm{FM}}` does
not depend on :math:`\theta`, so the gradients agree. For empirical data
:math:`q = \sum_i q_i \delta_{x_1^i}` it holds pointwise: with posterior weights
:math:`w_i \propto q_i\, p_t(x|x_1^i)`, :math:`u_i = u_t(x|x_1^i)` and :math:`u = \sum_i w_i u_i`,

.. math::

    \sum_i w_i \lVert v - u_i\rVert^2 = \lVert v - u\rVert^2 + \sum_i w_i \lVert u_i - u\rVert^2 .

:func:`empirical_posterior` computes :math:`(\log w_i, u_i)` for *any* Gaussian path (including
user paths with data-dependent :math:`\sigma_t(x_1)`), and :func:`theorem2_terms` the three terms.

References:
    Lipman et al., Flow Matching for Generative Modeling (2022), arXiv:2210.02747, §3.2, Thm. 2.

Theory sections cited here (pages under ``docs/theory/``):

- §5: ``docs/theory/marginals.md#theorem-1``
- §6: ``docs/theory/flow-matching.md#flow-matching-objectives``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cnftools._checks import (
    as_time,
    check_batched,
    check_floating,
    check_int,
    check_real,
    check_same_shape,
)
from cnftools.fields import Extras, VelocityField, call_checked, check_callable, check_extras
from cnftools.paths import GaussianPath, OTPath

__all__ = ["cfm_loss", "empirical_posterior", "fm_loss", "sample_time", "theorem2_terms"]

_REDUCTIONS = ("mean", "sum", "none")


def sample_time(
    batch: int,
    like: Tensor,
    generator: torch.Generator | None = None,
    *,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> Tensor:
    r"""Draw :math:`t \sim \mathcal U[t_{\min}, t_{\max})`, shape ``(batch,)``, like ``like``.

    ``torch.rand`` draws from :math:`[0, 1)`, so :math:`t = t_{\max}` is never returned; with the
    default ``t_max = 1`` the singular end of OT (``sigma_min = 0``) and VP is never evaluated.

    Example:
        >>> import torch
        >>> t = sample_time(4, torch.zeros(1), torch.Generator().manual_seed(0), t_max=0.5)
        >>> t.shape, bool((t < 0.5).all())
        (torch.Size([4]), True)
    """
    batch = check_int("batch", batch, low=1)
    _check_time_range(t_min, t_max)
    u = torch.rand(batch, generator=generator, dtype=like.dtype, device=like.device)
    t = t_min + (t_max - t_min) * u
    # t_min + (t_max - t_min) u can round up to t_max in float32 (u = 1 - 2^-24, t_min > 0);
    # keep the interval half-open so a singular end (OT sigma_min = 0, VP) is never drawn.
    below = torch.nextafter(
        torch.tensor(t_max, dtype=like.dtype, device=like.device),
        torch.tensor(t_min, dtype=like.dtype, device=like.device),
    )
    return torch.minimum(t, below)


def cfm_loss(
    v: VelocityField,
    path: GaussianPath,
    x1: Tensor,
    t: float | Tensor | None = None,
    x0: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    t_min: float = 0.0,
    t_max: float = 1.0,
    reduction: str = "mean",
    extras: Extras | None = None,
) -> Tensor:
    r"""The conditional flow-matching loss :math:`\mathcal L_{\mathrm{CFM}}` on a batch (theory §6).

    .. math::

        \mathcal L_{\mathrm{CFM}} \approx \frac1B \sum_{b=1}^B
            \big\lVert v(x_b, t_b) - u_{t_b}(x_b \mid x_1^b) \big\rVert^2, \qquad
        x_b = \psi_{t_b}(x_0^b) = \sigma_{t_b}(x_1^b)\, x_0^b + \mu_{t_b}(x_1^b),

    with :math:`t_b \sim \mathcal U[t_{\min}, t_{\max})` and :math:`x_0^b \sim \mathcal N(0, I)`
    drawn from ``generator`` (on ``x1``'s device and dtype) when not given, and the target
    :math:`u_t(x|x_1)` = ``path.conditional_velocity(x, t, x1)``. For :class:`~cnftools.OTPath` the
    target is evaluated in its closed form :math:`x_1 - (1 - \sigma_{\min}) x_0` (equal to
    ``conditional_velocity`` at :math:`x = \psi_t(x_0)`, and finite even at ``t = 1``).

    Singular ends: OT with ``sigma_min = 0`` and VP have :math:`\sigma_1 = 0`. Drawn times lie in
    :math:`[0, 1)` and never hit 1, but VP's conditional field grows like :math:`1/(1-t)` near 1, so
    its loss has heavy tails; pass e.g. ``t_max=1 - 1e-3`` for VP (an explicit, documented
    truncation, never applied silently). An explicit ``t = 1`` raises for VP
    (``conditional_velocity`` is undefined there); OT uses its closed form, which stays finite.

    Conditional fields (class labels, context vectors) get ``extras`` as keyword arguments,
    ``v(x, t, **extras)``: a tensor whose first dimension is the batch ``B`` holds one value per
    row of ``x1`` (row ``b`` of ``extras["y"]`` goes with ``x1[b]``); anything else is passed as
    is. See docs/guide/conditional.md.

    Args:
        v: the velocity field ``v(x, t)`` (or ``v(x, t, **extras)``): any callable or
            ``nn.Module``; called with ``x`` of shape ``(B, *event)`` and ``t`` of shape ``(B,)``.
        path: a Gaussian conditional path (OT, VE, VP or user-defined).
        x1: data points, shape ``(B, *event)``.
        t: times, a float, a 0-dim tensor or ``(B,)`` in ``[0, 1]``; drawn when ``None``.
        x0: noise points, shape ``(B, *event)``; drawn from :math:`\mathcal N(0, I)` when ``None``
            (pass a minibatch-OT–paired ``x0`` here).
        generator: random generator on ``x1``'s device for the draws.
        t_min: keyword-only; lower end of the drawn times.
        t_max: keyword-only; upper end (exclusive) of the drawn times.
        reduction: keyword-only; ``"mean"`` (default, a scalar), ``"sum"`` or ``"none"`` (``(B,)``).
        extras: keyword-only; keyword arguments for the field, e.g. ``{"y": labels}`` with
            ``labels`` of shape ``(B,)``.

    Returns:
        A scalar tensor (or ``(B,)`` with ``reduction="none"``), differentiable in ``v``'s
        parameters.

    Raises:
        ValueError: bad shapes (``x0`` vs ``x1``), ``v`` returning a shape other than ``x1``'s,
            a time outside ``[0, 1]``, or a non-finite loss.

    Example:
        >>> import torch, cnftools
        >>> _ = torch.manual_seed(0)
        >>> v = cnftools.MLPField(2, hidden=(16,))
        >>> x1 = torch.randn(8, 2)
        >>> loss = cnftools.cfm_loss(
        ...     v, cnftools.OTPath(0.1), x1, generator=torch.Generator().manual_seed(0)
        ... )
        >>> loss.shape, loss.requires_grad
        (torch.Size([]), True)

    References:
        Lipman et al. (2022), arXiv:2210.02747, eq. (9), (14), Theorem 2.
    """
    check_callable(v)
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a cnftools GaussianPath, got {type(path).__name__}")
    _check_reduction(reduction)
    x1 = check_batched("x1", x1)
    batch = x1.shape[0]
    extras = check_extras(extras)
    if t is None:
        tt = sample_time(batch, x1, generator, t_min=t_min, t_max=t_max)
    else:
        tt = as_time(t, x1)
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
    else:
        x0 = check_batched("x0", x0)
        check_same_shape("x0", x0, "x1", x1)
    x = path.flow_map(x0, tt, x1)
    if type(path) is OTPath:
        target = x1 - (1 - path.sigma_min) * x0
    else:
        target = path.conditional_velocity(x, tt, x1)
    out = call_checked(v, x, tt, extras)
    return _reduce(_squared_norm(out - target), reduction, "cfm_loss")


def fm_loss(
    v: VelocityField,
    marginal: Any,
    x: Tensor,
    t: float | Tensor,
    *,
    reduction: str = "mean",
    extras: Extras | None = None,
) -> Tensor:
    r"""The flow-matching loss :math:`\mathcal L_{\mathrm{FM}}` against a known marginal field.

    .. math::

        \mathcal L_{\mathrm{FM}} \approx \frac1B \sum_{b=1}^B
            \big\lVert v(x_b, t_b) - u_{t_b}(x_b)\big\rVert^2,

    with :math:`u_t(x)` = ``marginal.velocity(x, t)`` (e.g. a
    :class:`~cnftools.marginals.GaussianMarginal` or :class:`~cnftools.marginals.MixtureMarginal`).
    The points ``x`` should be drawn from :math:`p_t` for this to estimate
    :math:`\mathcal L_{\mathrm{FM}}`; any points give the regression loss at those points.

    ``extras`` reach ``v`` only, as ``v(x, t, **extras)`` (the marginal is called as
    ``marginal.velocity(x, t)``): to regress a conditional field on a per-class marginal, pass that
    class's marginal and its label.

    Args:
        v: the velocity field ``v(x, t)`` (or ``v(x, t, **extras)``).
        marginal: any object with ``velocity(x, t) -> (B, *event)``.
        x: points, shape ``(B, *event)``.
        t: times, a float, a 0-dim tensor or ``(B,)`` in ``[0, 1]``.
        reduction: keyword-only; ``"mean"`` (default), ``"sum"`` or ``"none"``.
        extras: keyword-only; keyword arguments for the field (tensors with first dimension
            ``B`` hold one value per row of ``x``).

    Returns:
        A scalar tensor (or ``(B,)`` with ``reduction="none"``).

    Example:
        >>> import torch, cnftools
        >>> class Zero:  # a marginal whose field is 0
        ...     def velocity(self, x, t):
        ...         return torch.zeros_like(x)
        >>> cnftools.fm_loss(lambda x, t: torch.ones_like(x), Zero(), torch.zeros(3, 2), 0.5)
        tensor(2.)

    References:
        Lipman et al. (2022), arXiv:2210.02747, eq. (5).
    """
    check_callable(v)
    velocity = getattr(marginal, "velocity", None)
    if not callable(velocity):
        raise TypeError(
            f"marginal must have a method velocity(x, t), got {type(marginal).__name__}"
        )
    _check_reduction(reduction)
    x = check_batched("x", x)
    tt = as_time(t, x)
    extras = check_extras(extras)
    target = velocity(x, tt)
    if not isinstance(target, Tensor) or target.shape != x.shape:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"marginal.velocity(x, t) returned {shape}, expected the shape of x {tuple(x.shape)}"
        )
    out = call_checked(v, x, tt, extras)
    return _reduce(_squared_norm(out - target), reduction, "fm_loss")


def empirical_posterior(
    path: GaussianPath,
    x: Tensor,
    t: float | Tensor,
    data: Tensor,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Posterior log-weights and conditional fields for empirical data.

    For :math:`q = \sum_i q_i \delta_{x_1^i}`,

    .. math::

        \log w_{b,i} = \log q_i + \log p_{t_b}(x_b | x_1^i) - \operatorname{logsumexp}_j
            \big(\log q_j + \log p_{t_b}(x_b | x_1^j)\big), \qquad
        u_{b,i} = u_{t_b}(x_b | x_1^i),

    computed with ``path.log_prob`` and ``path.conditional_velocity``, so it holds for any Gaussian
    path. The marginal field (theory §5) is :math:`u_t(x_b) = \sum_i w_{b,i} u_{b,i}`.
    Memory is :math:`O(B N d)`: meant for small empirical sets (checks, tests).

    Args:
        path: a Gaussian conditional path.
        x: points, shape ``(B, *event)``.
        t: times, a float, 0-dim or ``(B,)``; must be below a singular end of the path.
        data: the support :math:`x_1^i`, shape ``(N, *event)``.
        weights: :math:`q_i \ge 0`, shape ``(N,)``, normalised here; uniform when ``None``.

    Returns:
        ``(log_w, u)`` of shapes ``(B, N)`` and ``(B, N, *event)``.

    Example:
        >>> import torch, cnftools
        >>> data = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
        >>> log_w, u = empirical_posterior(cnftools.OTPath(0.1), data[:1] + 1.0, 0.5, data)
        >>> log_w.exp().sum(dim=1)
        tensor([1.], dtype=torch.float64)

    References:
        Lipman et al. (2022), arXiv:2210.02747, eq. (8); theory §6, §10.
    """
    x = check_batched("x", x)
    data = check_batched("data", data)
    if data.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"data must have the event shape of x {tuple(x.shape[1:])}, got {tuple(data.shape[1:])}"
        )
    if data.dtype != x.dtype or data.device != x.device:
        raise TypeError("data must have the dtype and device of x")
    tt = as_time(t, x)
    batch, n = x.shape[0], data.shape[0]
    log_q = _log_weights(weights, n, x)
    event = x.shape[1:]
    xb = x.unsqueeze(1).expand(batch, n, *event).reshape(batch * n, *event)
    x1b = data.unsqueeze(0).expand(batch, n, *event).reshape(batch * n, *event)
    tb = tt.unsqueeze(1).expand(batch, n).reshape(batch * n)
    log_p = path.log_prob(xb, tb, x1b).reshape(batch, n)
    u = path.conditional_velocity(xb, tb, x1b).reshape(batch, n, *event)
    joint = log_q.unsqueeze(0) + log_p
    return joint - torch.logsumexp(joint, dim=1, keepdim=True), u


def theorem2_terms(
    v: VelocityField,
    path: GaussianPath,
    x: Tensor,
    t: float | Tensor,
    data: Tensor,
    weights: Tensor | None = None,
    marginal_velocity: Tensor | None = None,
) -> dict[str, Tensor]:
    r"""The three per-point terms of the pointwise Theorem 2 identity (theory §6), each ``(B,)``.

    .. math::

        \underbrace{\sum_i w_i \lVert v - u_i\rVert^2}_{\texttt{cfm}} =
        \underbrace{\lVert v - u\rVert^2}_{\texttt{fm}} +
        \underbrace{\sum_i w_i \lVert u_i - u\rVert^2}_{\texttt{variance}},

    with :math:`(w_i, u_i)` from :func:`empirical_posterior` and :math:`u` = ``marginal_velocity``
    (e.g. from ``MixtureMarginal.velocity``) or, when ``None``, :math:`\sum_i w_i u_i`.
    ``cfm`` and ``fm`` are differentiable in ``v``'s parameters; ``variance`` does not involve
    ``v``.

    Returns:
        ``{"cfm": (B,), "fm": (B,), "variance": (B,)}``.

    Example:
        >>> import torch, cnftools
        >>> data = torch.tensor([[0.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
        >>> x = torch.tensor([[0.5, 0.2]], dtype=torch.float64)
        >>> terms = theorem2_terms(lambda x, t: x, cnftools.OTPath(0.1), x, 0.7, data)
        >>> gap = terms["cfm"] - terms["fm"] - terms["variance"]
        >>> bool(gap.abs().max() < 1e-12)
        True
    """
    log_w, u_i = empirical_posterior(path, x, t, data, weights)
    w = log_w.exp()
    event_dims = tuple(range(2, u_i.dim()))
    w_b = w.reshape(*w.shape, *([1] * len(event_dims)))
    u = (w_b * u_i).sum(dim=1) if marginal_velocity is None else marginal_velocity
    if u.shape != x.shape:
        raise ValueError(
            f"marginal_velocity must have shape {tuple(x.shape)}, got {tuple(u.shape)}"
        )
    check_callable(v)
    out = call_checked(v, x, as_time(t, x))
    cfm = (w * ((out.unsqueeze(1) - u_i) ** 2).sum(dim=event_dims)).sum(dim=1)
    fm = _squared_norm(out - u)
    variance = (w * ((u_i - u.unsqueeze(1)) ** 2).sum(dim=event_dims)).sum(dim=1)
    return {"cfm": cfm, "fm": fm, "variance": variance}


# ----------------------------------------------------------------------------------------------
def _squared_norm(r: Tensor) -> Tensor:
    return (r**2).reshape(r.shape[0], -1).sum(dim=1)


def _reduce(per_sample: Tensor, reduction: str, name: str) -> Tensor:
    if not bool(torch.isfinite(per_sample).all()):
        bad = (~torch.isfinite(per_sample)).nonzero().flatten()[:10].tolist()
        raise ValueError(
            f"{name} is non-finite (NaN or inf) for batch rows {bad}: the field's output or the "
            "target is not finite there (a time at a singular end of the path, e.g. t -> 1 for VP "
            "or OT with sigma_min = 0? diverged training?)"
        )
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_time_range(t_min: float, t_max: float) -> None:
    for name, value in (("t_min", t_min), ("t_max", t_max)):
        check_real(name, value, expected="a finite float")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")


def _log_weights(weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    if weights is None:
        return torch.full((n,), -math.log(n), dtype=like.dtype, device=like.device)
    weights = check_floating("weights", weights)
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape (N,) = ({n},), got {tuple(weights.shape)}")
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("weights must be finite and >= 0")
    total = weights.sum()
    if not bool(total > 0):
        raise ValueError("weights must not all be zero")
    return torch.log(weights.to(like.dtype)) - torch.log(total.to(like.dtype))
