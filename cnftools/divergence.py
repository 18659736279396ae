r"""Divergence of a velocity field: exact (strategy chosen by problem size) and Hutchinson.

The divergence (THEORY §11) is the trace of the Jacobian,

.. math::

    \nabla\cdot v(x, t) = \operatorname{tr}\frac{\partial v}{\partial x}
    = \sum_{i=1}^{d} e_i^\top \frac{\partial v}{\partial x} e_i,

with :math:`d` the number of event entries (any event shape is flattened). Each term is one
vector-Jacobian product (VJP), so an exact divergence costs about :math:`d` backward passes: the
floor for a general field. How those :math:`d` VJPs are issued decides the speed:

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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from cnftools._checks import as_time, check_batched, check_finite, check_floating
from cnftools.fields import call_checked, field_name

__all__ = [
    "BATCHED_ROWS",
    "EXACT_STRATEGIES",
    "MIN_CHUNK",
    "choose_strategy",
    "divergence",
    "velocity_and_divergence",
]

Field = Callable[[Tensor, Tensor], Tensor]

EXACT_STRATEGIES = ("batched", "loop", "forward")
"""Strategies the exact divergence can be forced to use (``strategy=``)."""

BATCHED_ROWS: dict[str, int] = {"cpu": 1024, "cuda": 65536}
"""Target rows (``chunk * B``) per batched backward pass, by device type (default: the cpu value).

Measured on 2 CPU cores with a 3x256 MLP (see ``benchmarks/divergence.py``); the cuda value is a
memory-bounded guess, not a measurement.
"""

MIN_CHUNK = 8
"""``"auto"`` uses the loop when a backward pass could carry fewer basis vectors than this."""


def choose_strategy(batch: int, dim: int, device: torch.device) -> tuple[str, int]:
    r"""The exact strategy and chunk size ``"auto"`` uses for a batch of ``batch`` points in ``d = dim``.

    Rule: with :math:`R` = :data:`BATCHED_ROWS` for the device, a backward pass may carry
    :math:`\lfloor R / B \rfloor` basis vectors. When that is below :data:`MIN_CHUNK` the per-call
    overhead a chunk would save is small against vmap's own overhead, and the retained-graph loop
    is used; otherwise ``"batched"`` with chunks of :math:`c = \min(d, \lfloor R/B \rfloor)`.

    Example:
        >>> choose_strategy(16, 64, torch.device("cpu"))
        ('batched', 64)
        >>> choose_strategy(512, 64, torch.device("cpu"))
        ('loop', 1)
    """
    rows = BATCHED_ROWS.get(device.type, BATCHED_ROWS["cpu"])
    per_pass = rows // max(batch, 1)
    if per_pass < MIN_CHUNK:
        return "loop", 1
    return "batched", max(1, min(dim, per_pass))


# ----------------------------------------------------------------------------------------------
# Validation helpers
def _check_field_output(v: Field, x: Tensor, y: Tensor) -> None:
    if not y.requires_grad:
        raise ValueError(
            f"velocity field {field_name(v)} returned a tensor that does not depend on x through "
            "autograd (requires_grad is False): it is constant in x or was computed outside torch "
            "(numpy, .detach(), .item()); its divergence cannot be taken by autograd"
        )


def _grad(
    v: Field,
    y: Tensor,
    x: Tensor,
    grad_outputs: Tensor,
    *,
    create_graph: bool,
    batched: bool,
) -> Tensor:
    (g,) = torch.autograd.grad(
        y,
        x,
        grad_outputs,
        retain_graph=True,
        create_graph=create_graph,
        allow_unused=True,
        is_grads_batched=batched,
    )
    if g is None:
        raise ValueError(
            f"velocity field {field_name(v)} output does not depend on x (autograd found no path "
            "from x to v(x, t)); its divergence is not defined by autograd"
        )
    return g


# ----------------------------------------------------------------------------------------------
# Exact strategies. Each takes the flattened output y (B, d) of the field at x_in (B, *event).
def _exact_loop(v: Field, y: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    batch, dim = y.shape
    total = torch.zeros(batch, dtype=y.dtype, device=y.device)
    for i in range(dim):
        g = _grad(v, y[:, i].sum(), x, None, create_graph=create_graph, batched=False)
        total = total + g.reshape(batch, dim)[:, i]
    return total


def _basis_chunk(start: int, size: int, batch: int, dim: int, like: Tensor) -> Tensor:
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)[start : start + size]
    return eye[:, None, :].expand(size, batch, dim)


def _exact_batched(v: Field, y: Tensor, x: Tensor, create_graph: bool, chunk: int) -> Tensor:
    batch, dim = y.shape
    total = torch.zeros(batch, dtype=y.dtype, device=y.device)
    for start in range(0, dim, chunk):
        size = min(chunk, dim - start)
        basis = _basis_chunk(start, size, batch, dim, y)
        if size == 1:
            g = _grad(v, y, x, basis[0], create_graph=create_graph, batched=False)[None]
        else:
            g = _grad(v, y, x, basis, create_graph=create_graph, batched=True)
        g = g.reshape(size, batch, dim)[:, :, start : start + size]
        total = total + g.diagonal(dim1=0, dim2=2).sum(dim=-1)
    return total


def _exact_forward(v: Field, x: Tensor, t: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    from torch.func import jvp, vmap

    batch = x.shape[0]
    dim = x[0].numel()

    def field_flat(z: Tensor) -> Tensor:
        return v(z, t).reshape(batch, dim)

    def column(tangent: Tensor) -> Tensor:
        return jvp(field_flat, (x,), (tangent.reshape(x.shape),))[1]

    out = call_checked(v, x, t)
    _check_field_output(v, x, out)
    total = torch.zeros(batch, dtype=x.dtype, device=x.device)
    for start in range(0, dim, chunk):
        size = min(chunk, dim - start)
        basis = _basis_chunk(start, size, batch, dim, x)
        cols = vmap(column)(basis)  # (size, B, d): (dv/dx) e_i for each basis vector
        total = total + cols[:, :, start : start + size].diagonal(dim1=0, dim2=2).sum(dim=-1)
    return out, total


# ----------------------------------------------------------------------------------------------
def _check_method(method: str, strategy: str | None) -> None:
    if method not in ("exact", "hutchinson", "loop"):
        raise ValueError(f"method must be 'exact', 'hutchinson' or 'loop', got {method!r}")
    if strategy is not None:
        if method != "exact":
            raise ValueError(f"strategy= applies to method='exact' only, got method={method!r}")
        if strategy not in (*EXACT_STRATEGIES, "auto"):
            raise ValueError(
                f"strategy must be one of {(*EXACT_STRATEGIES, 'auto')} or None, got {strategy!r}"
            )


def _make_probes(
    x: Tensor,
    probes: Tensor | None,
    n_probes: int,
    noise: str,
    generator: torch.Generator | None,
) -> Tensor:
    if probes is not None:
        probes = check_floating("probes", probes)
        if probes.dim() != x.dim() + 1 or probes.shape[1:] != x.shape or probes.shape[0] < 1:
            raise ValueError(
                f"probes must have shape (K, B, *event) = (K, {', '.join(map(str, x.shape))}) "
                f"with K >= 1, got {tuple(probes.shape)}"
            )
        if probes.dtype != x.dtype or probes.device != x.device:
            raise TypeError(
                f"probes must share x's dtype and device ({x.dtype}, {x.device}), "
                f"got {probes.dtype} on {probes.device}"
            )
        return check_finite("probes", probes)
    if isinstance(n_probes, bool) or not isinstance(n_probes, int) or n_probes < 1:
        raise ValueError(f"n_probes must be a positive int, got {n_probes!r}")
    if noise not in ("rademacher", "gaussian"):
        raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
    shape = (n_probes, *x.shape)
    if noise == "gaussian":
        return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
    bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
    return bits.to(x.dtype).mul_(2).sub_(1)


def _hutchinson(
    v: Field, y: Tensor, x: Tensor, probes: Tensor, create_graph: bool, rows: int
) -> Tensor:
    """Per-probe estimates, shape (K, B)."""
    n_probes, batch = probes.shape[0], probes.shape[1]
    flat = probes.reshape(n_probes, batch, -1)
    chunk = max(1, rows // batch)
    estimates = []
    for start in range(0, n_probes, chunk):
        eps = flat[start : start + chunk]
        if eps.shape[0] == 1:
            g = _grad(v, y, x, eps[0], create_graph=create_graph, batched=False)[None]
        else:
            g = _grad(v, y, x, eps, create_graph=create_graph, batched=True)
        estimates.append((g.reshape(eps.shape) * eps).sum(dim=-1))
    return torch.cat(estimates, dim=0)


def velocity_and_divergence(
    v: Field,
    x: Tensor,
    t: float | Tensor,
    method: str = "exact",
    *,
    create_graph: bool = False,
    probes: Tensor | None = None,
    n_probes: int = 1,
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
    return_stderr: bool = False,
    strategy: str | None = None,
) -> tuple[Tensor, ...]:
    r"""The field and its divergence from one forward pass: ``(v(x, t), div)`` (``+ (stderr,)``).

    Same arguments as :func:`divergence`; this is what an ODE solve of the augmented state
    :math:`[z, \int \nabla\cdot v]` needs (THEORY §3), without evaluating the field twice. The
    velocity is detached unless ``create_graph=True``.

    Example:
        >>> import torch
        >>> velocity, div = velocity_and_divergence(lambda x, t: -x, torch.ones(2, 3), 0.5)
        >>> div
        tensor([-3., -3.])
    """
    if not callable(v):
        raise TypeError(f"the velocity field must be callable v(x, t), got {type(v).__name__}")
    _check_method(method, strategy)
    x = check_batched("x", x)
    tb = as_time(t, x)
    if method == "hutchinson":
        eps = _make_probes(x, probes, n_probes, noise, generator)
        if return_stderr and eps.shape[0] < 2:
            raise ValueError("return_stderr needs at least 2 probes (n_probes >= 2 or K >= 2)")
    elif return_stderr:
        raise ValueError("return_stderr applies to method='hutchinson' only")
    elif probes is not None:
        raise ValueError("probes applies to method='hutchinson' only")

    batch, dim = x.shape[0], x[0].numel()
    chosen, chunk = ("loop", 1) if method == "loop" else ("", 0)
    if method == "exact":
        if strategy in (None, "auto"):
            chosen, chunk = choose_strategy(batch, dim, x.device)
        else:
            chosen = strategy
            rows = BATCHED_ROWS.get(x.device.type, BATCHED_ROWS["cpu"])
            chunk = max(1, min(dim, max(rows // batch, MIN_CHUNK)))

    with torch.enable_grad():
        x_in = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
        if chosen == "forward":
            out, div = _exact_forward(v, x_in, tb, chunk)
            if not create_graph:
                out, div = out.detach(), div.detach()
            return out, div
        out = call_checked(v, x_in, tb)
        _check_field_output(v, x_in, out)
        y = out if out.dim() == 2 else out.reshape(batch, dim)  # no view node when flat
        stderr = None
        if method == "hutchinson":
            rows = BATCHED_ROWS.get(x.device.type, BATCHED_ROWS["cpu"])
            per_probe = _hutchinson(v, y, x_in, eps, create_graph, rows)
            div = per_probe.mean(dim=0)
            if return_stderr:
                stderr = per_probe.std(dim=0, correction=1) / math.sqrt(per_probe.shape[0])
        elif chosen == "loop":
            div = _exact_loop(v, y, x_in, create_graph)
        elif strategy in (None, "auto"):
            try:
                div = _exact_batched(v, y, x_in, create_graph, chunk)
            except RuntimeError as error:  # an op without a vmap rule: fall back, loudly
                if "vmap" not in str(error) and "batch" not in str(error).lower():
                    raise
                warnings.warn(
                    f"batched divergence failed for field {field_name(v)} ({error}); "
                    "falling back to strategy='loop'",
                    RuntimeWarning,
                    stacklevel=2,
                )
                div = _exact_loop(v, y, x_in, create_graph)
        else:
            div = _exact_batched(v, y, x_in, create_graph, chunk)
    if not create_graph:
        out, div = out.detach(), div.detach()
        stderr = None if stderr is None else stderr.detach()
    return (out, div) if stderr is None else (out, div, stderr)


def divergence(
    v: Field,
    x: Tensor,
    t: float | Tensor,
    method: str = "exact",
    *,
    create_graph: bool = False,
    probes: Tensor | None = None,
    n_probes: int = 1,
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
    return_stderr: bool = False,
    strategy: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    r"""The divergence :math:`\nabla\cdot v(x, t) = \operatorname{tr} \partial v / \partial x`, per sample.

    Args:
        v: velocity field ``v(x, t)`` (see :mod:`cnftools.fields`); must be differentiable in x.
        x: points, shape ``(B, *event)``; the event is flattened, :math:`d = \prod` event.
        t: a float, a 0-dim tensor or a ``(B,)`` tensor in :math:`[0, 1]`.
        method: ``"exact"`` (the trace, strategy chosen by size), ``"hutchinson"`` (unbiased
            stochastic estimate from ``K`` probes) or ``"loop"`` (the plain reference: one forward
            pass and :math:`d` backward passes).
        create_graph: keep the graph so the result is differentiable (w.r.t. the field's
            parameters, and w.r.t. ``x`` when ``x.requires_grad``). Costs ~1.3x; off by default.
        probes: Hutchinson probes of shape ``(K, B, *event)``, e.g. held fixed for a whole ODE
            solve. When ``None``, ``n_probes`` probes are drawn from ``generator``.
        n_probes: ``K``, the number of probes to draw.
        noise: ``"rademacher"`` (entries :math:`\pm 1`, lower variance) or ``"gaussian"``.
        generator: random generator on ``x``'s device, for reproducible probes.
        return_stderr: also return the sample standard error over the ``K >= 2`` probes,
            :math:`s_K / \sqrt K` (Hutchinson only).
        strategy: force an exact strategy: ``"batched"``, ``"loop"``, ``"forward"``, or
            ``"auto"``/``None`` (by size, :func:`choose_strategy`).

    Returns:
        The divergence, shape ``(B,)``; with ``return_stderr``, ``(estimate, stderr)``. Exact
        methods agree with the Jacobian trace to rounding. Works under ``torch.no_grad()`` (the
        gradients needed are enabled internally); the result is detached unless ``create_graph``.

    Raises:
        ValueError: bad ``method``/``strategy``/``noise``/``n_probes``, probes of the wrong
            shape, a field whose output has the wrong shape or does not depend on ``x``.
        TypeError: a field that is not callable or returns the wrong dtype.

    Example:
        >>> import torch
        >>> x = torch.randn(4, 3, dtype=torch.float64)
        >>> field = lambda x, t: torch.sin(x) * (1 + t[:, None])
        >>> torch.allclose(divergence(field, x, 0.5), (1.5 * torch.cos(x)).sum(1))
        True
        >>> g = torch.Generator().manual_seed(0)
        >>> est, se = divergence(
        ...     field, x, 0.5, "hutchinson", n_probes=64, generator=g, return_stderr=True
        ... )
        >>> est.shape, se.shape
        (torch.Size([4]), torch.Size([4]))

    References:
        Chen et al. (2018), arXiv:1806.07366, Theorem 1; Grathwohl et al. (2019),
        arXiv:1810.01367, §3 (Hutchinson's estimator).
    """
    result = velocity_and_divergence(
        v,
        x,
        t,
        method,
        create_graph=create_graph,
        probes=probes,
        n_probes=n_probes,
        noise=noise,
        generator=generator,
        return_stderr=return_stderr,
        strategy=strategy,
    )
    return result[1] if len(result) == 2 else (result[1], result[2])
