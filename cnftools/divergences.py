r"""Divergence of a velocity field: exact (strategy chosen by problem size) and Hutchinson.

The divergence (theory §11) is the trace of the Jacobian,

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

Theory sections cited here (pages under ``docs/theory/``):

- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
- §11: ``docs/theory/divergence-and-continuity.md#divergence``
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from cnftools._checks import (
    as_time,
    check_batched,
    check_depends_on_input,
    check_finite,
    check_floating,
    check_int,
    quiet_jvp,
)
from cnftools.fields import (
    Extras,
    VelocityField,
    call_checked,
    call_with_closed_form_divergence,
    check_extras,
    field_name,
)

__all__ = [
    "BATCHED_ROWS",
    "EXACT_STRATEGIES",
    "MIN_CHUNK",
    "DivergenceResult",
    "DivergenceStrategy",
    "choose_strategy",
    "divergence",
    "jacobian",
    "velocity_and_divergence",
]

EXACT_STRATEGIES = ("batched", "loop", "forward")
"""Strategies the exact divergence can be forced to use (``strategy=``)."""

BATCHED_ROWS: dict[str, int] = {"cpu": 4096, "cuda": 65536}
"""Target rows (``chunk * B``) per batched backward pass, by device type (default: the cpu value).

On one CPU thread with a 3x256 MLP at d = 64, B = 256, 16 basis vectors per pass (4096 rows) was
the fastest chunk of the loop and 4 ... 64 per pass (engine measurements, December 2026: 14.2 ms
per evaluation against 13.4-19.8 ms for the others, and a solve to 1e-6 nats in 1.058 s against
1.355 s with 64 per pass and 1.484 s with the loop); the cuda value is a memory-bounded guess, not
a measurement."""

MIN_CHUNK = 16
"""``"auto"`` uses the loop of single VJPs when a batched pass could carry fewer basis vectors than
this and fewer than ``d`` (at B = 512, d = 64 the loop was the fastest on CPU: 83.5 ms against
91-202 ms for batched chunks of 4 ... 64)."""


def choose_strategy(batch: int, dim: int, device: torch.device) -> tuple[str, int]:
    r"""The exact strategy and chunk size ``"auto"`` uses for a batch of ``batch`` points in ``d = dim``.

    Rule: with :math:`R` = :data:`BATCHED_ROWS` for the device, a backward pass may carry
    :math:`\lfloor R / B \rfloor` basis vectors. When that covers all of ``d``, one batched pass;
    when it is at least :data:`MIN_CHUNK`, batched chunks of :math:`\lfloor R/B \rfloor`;
    otherwise the loop of single VJPs.

    The choice depends on the sizes and the device type only, never on timings: the strategies
    round differently (the Jacobian's diagonal entries differ in the last bits between a batched
    pass and single VJPs at small batches), so a choice by timing would make the numbers depend on
    the machine's load. Every strategy reduces the diagonal ``(B, d)`` in one fixed order.

    Example:
        >>> choose_strategy(16, 64, torch.device("cpu"))
        ('batched', 64)
        >>> choose_strategy(256, 64, torch.device("cpu"))
        ('batched', 16)
        >>> choose_strategy(512, 64, torch.device("cpu"))
        ('loop', 1)
    """
    rows = BATCHED_ROWS.get(device.type, BATCHED_ROWS["cpu"])
    per_pass = rows // max(batch, 1)
    if per_pass >= dim:
        return "batched", dim
    if per_pass < MIN_CHUNK:
        return "loop", 1
    return "batched", per_pass


# ----------------------------------------------------------------------------------------------
# Validation helpers
def _check_field_output(v: VelocityField, x: Tensor, y: Tensor) -> None:
    if not y.requires_grad:
        raise ValueError(
            f"velocity field {field_name(v)} returned a tensor that does not depend on x through "
            "autograd (requires_grad is False): it is constant in x or was computed outside torch "
            "(numpy, .detach(), .item()); its divergence cannot be taken by autograd"
        )


def _grad(
    v: VelocityField,
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
# Every exact strategy computes the Jacobian's diagonal (B, d) and reduces it by one
# ``sum(dim=1)``: the same reduction order whichever strategy runs.
def _diagonal_loop(v: VelocityField, y: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    batch, dim = y.shape
    entries = []
    for i in range(dim):
        g = _grad(v, y[:, i].sum(), x, None, create_graph=create_graph, batched=False)
        entries.append(g.reshape(batch, dim)[:, i])
    return torch.stack(entries, dim=1)


def _exact_loop(v: VelocityField, y: Tensor, x: Tensor, create_graph: bool) -> Tensor:
    return _diagonal_loop(v, y, x, create_graph).sum(dim=1)


def _basis_chunk(start: int, size: int, batch: int, dim: int, like: Tensor) -> Tensor:
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)[start : start + size]
    return eye[:, None, :].expand(size, batch, dim)


def _diagonal_batched(
    v: VelocityField,
    y: Tensor,
    x: Tensor,
    create_graph: bool,
    chunk: int,
    bases: dict[tuple, Tensor] | None = None,
) -> Tensor:
    """The diagonal ``e_i^T J e_i`` ``(B, d)`` by VJPs with ``chunk`` basis vectors per backward
    pass; ``bases`` caches the basis chunks between calls (a solve asks for the same ones)."""
    batch, dim = y.shape
    parts = []
    for start in range(0, dim, chunk):
        size = min(chunk, dim - start)
        key = (start, size, batch, dim, y.dtype, y.device)
        basis = bases.get(key) if bases is not None else None
        if basis is None:
            basis = _basis_chunk(start, size, batch, dim, y)
            if bases is not None:
                bases[key] = basis
        if size == 1:
            g = _grad(v, y, x, basis[0], create_graph=create_graph, batched=False)[None]
        else:
            g = _grad(v, y, x, basis, create_graph=create_graph, batched=True)
        g = g.reshape(size, batch, dim)
        if size != dim:
            g = g[:, :, start : start + size]
        parts.append(g.diagonal(dim1=0, dim2=2))  # (B, size)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _exact_batched(
    v: VelocityField,
    y: Tensor,
    x: Tensor,
    create_graph: bool,
    chunk: int,
    bases: dict[tuple, Tensor] | None = None,
) -> Tensor:
    return _diagonal_batched(v, y, x, create_graph, chunk, bases).sum(dim=1)


def _exact_forward(
    v: VelocityField, x: Tensor, t: Tensor, chunk: int, extras: Extras | None = None
) -> tuple[Tensor, Tensor]:
    batch = x.shape[0]
    dim = x[0].numel()

    def field_flat(z: Tensor) -> Tensor:
        return call_checked(v, z, t, extras).reshape(batch, dim)

    def column(tangent: Tensor) -> Tensor:
        return quiet_jvp(field_flat, (x,), (tangent.reshape(x.shape),))[1]

    out = call_checked(v, x, t, extras)
    _check_field_output(v, x, out)
    parts = []
    for start in range(0, dim, chunk):
        size = min(chunk, dim - start)
        basis = _basis_chunk(start, size, batch, dim, x)
        cols = vmap(column)(basis)  # (size, B, d): (dv/dx) e_i for each basis vector
        parts.append(cols[:, :, start : start + size].diagonal(dim1=0, dim2=2))
    return out, torch.cat(parts, dim=1).sum(dim=1)


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


def _hutchinson(
    v: VelocityField, y: Tensor, x: Tensor, probes: Tensor, create_graph: bool, chunk: int
) -> Tensor:
    """Per-probe estimates, shape (K, B); ``chunk`` probes per backward pass (1: a plain loop)."""
    n_probes, batch = probes.shape[0], probes.shape[1]
    flat = probes.reshape(n_probes, batch, -1)
    estimates = []
    for start in range(0, n_probes, chunk):
        eps = flat[start : start + chunk]
        if eps.shape[0] == 1:
            g = _grad(v, y, x, eps[0], create_graph=create_graph, batched=False)[None]
        else:
            g = _grad(v, y, x, eps, create_graph=create_graph, batched=True)
        estimates.append((g.reshape(eps.shape) * eps).sum(dim=-1))
    return torch.cat(estimates, dim=0)


def _is_vmap_failure(error: RuntimeError) -> bool:
    text = str(error)
    return "vmap" in text or "batch" in text.lower()


class DivergenceStrategy:
    r"""How the divergence of a field is taken for one batch: the one fast path of cnftools.

    Three kinds, each returning the velocity and the divergence *columns* ``(B, K)`` from one
    forward pass of the field (:meth:`__call__`):

    - ``"exact"``: :math:`\operatorname{tr}\partial v/\partial x` by ``d`` VJPs, issued by
      ``strategy`` (``"auto"``: by size, :func:`choose_strategy`; or ``"batched"``, ``"loop"``,
      ``"forward"``). ``K = 1``.
    - ``"hutchinson"``: :math:`\varepsilon_k^\top (\partial v/\partial x)\varepsilon_k` for
      ``K`` probes held by the strategy (fixed, e.g. for a whole ODE solve). ``K`` columns.
    - ``"closed_form"``: the field's own ``divergence(x, t)``. ``K = 1``.

    Batched VJPs (``is_grads_batched``, vmap) fail on some models (ops without a vmap rule, e.g.
    ``"NYI: querying is_contiguous inside of vmap"``). Then the strategy warns once and uses
    the loop of single VJPs from that call on, for the exact basis and for Hutchinson's probes
    alike; the same numbers, more backward passes.

    Args:
        kind: ``"exact"``, ``"hutchinson"`` or ``"closed_form"``.
        strategy: the exact strategy (``"auto"``, or one of :data:`EXACT_STRATEGIES`).
        probes: Hutchinson probes ``(K, B, *event)``.
        closed: the closed-form ``divergence(x, t) -> (B,)`` (see
            :func:`cnftools.fields.closed_form_divergence`).

    Example:
        >>> import torch
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> t = torch.full((5,), 0.5, dtype=torch.float64)
        >>> velocity, columns = DivergenceStrategy("exact")(lambda x, t: -2 * x, x, t)
        >>> columns[:, 0]
        tensor([-6., -6., -6., -6., -6.], dtype=torch.float64)

    References:
        Grathwohl et al. (2019), arXiv:1810.01367, §3; Chen et al. (2018), arXiv:1806.07366.
    """

    KINDS = ("exact", "hutchinson", "closed_form")

    def __init__(
        self,
        kind: str = "exact",
        *,
        strategy: str = "auto",
        probes: Tensor | None = None,
        closed: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if strategy not in (*EXACT_STRATEGIES, "auto"):
            raise ValueError(
                f"strategy must be one of {(*EXACT_STRATEGIES, 'auto')}, got {strategy!r}"
            )
        if (kind == "hutchinson") != (probes is not None):
            raise ValueError("probes are needed by, and only by, kind='hutchinson'")
        if (kind == "closed_form") != (closed is not None):
            raise ValueError("closed is needed by, and only by, kind='closed_form'")
        self.kind = kind
        self.strategy = strategy
        self.probes = probes
        self.closed = closed
        self.vmap_failed = False  # set once a batched VJP failed: the loop from then on
        self._bases: dict[tuple, Tensor] = {}  # basis chunks reused across calls

    @staticmethod
    def draw_probes(
        like: Tensor,
        n_probes: int = 1,
        noise: str = "rademacher",
        generator: torch.Generator | None = None,
        probes: Tensor | None = None,
    ) -> Tensor:
        r"""Hutchinson probes ``(K, B, *event)`` for points ``like`` of shape ``(B, *event)``.

        Given ``probes`` (``(K, B, *event)``) are checked and
        returned detached; otherwise ``n_probes`` are drawn, ``"rademacher"`` (:math:`\pm 1`)
        or ``"gaussian"``, from ``generator`` on ``like``'s device and dtype.

        Example:
            >>> import torch
            >>> DivergenceStrategy.draw_probes(torch.zeros(4, 2), 3).shape
            torch.Size([3, 4, 2])
        """
        if probes is not None:
            probes = check_floating("probes", probes)
            if probes.dim() != like.dim() + 1 or probes.shape[1:] != like.shape:
                raise ValueError(
                    f"probes must have shape (K, B, *event) = "
                    f"(K, {', '.join(map(str, like.shape))}) with K >= 1, "
                    f"got {tuple(probes.shape)}"
                )
            if probes.shape[0] < 1:
                raise ValueError("probes must hold at least one probe (K >= 1)")
            if probes.dtype != like.dtype or probes.device != like.device:
                raise TypeError(
                    f"probes must share the data's dtype and device ({like.dtype}, "
                    f"{like.device}), got {probes.dtype} on {probes.device}"
                )
            return check_finite("probes", probes).detach()
        n_probes = check_int("n_probes", n_probes, low=1)
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
        shape = (n_probes, *like.shape)
        if noise == "gaussian":
            return torch.randn(shape, generator=generator, dtype=like.dtype, device=like.device)
        bits = torch.randint(0, 2, shape, generator=generator, device=like.device)
        return bits.to(like.dtype).mul_(2).sub_(1)

    @property
    def columns(self) -> int:
        """``K``: divergence columns per call (probes for Hutchinson, else 1)."""
        return 1 if self.probes is None else int(self.probes.shape[0])

    def subset(self, rows: Tensor | slice) -> DivergenceStrategy:
        """The same strategy for a sub-batch (Hutchinson probes indexed by ``rows``)."""
        probes = None if self.probes is None else self.probes[:, rows]
        out = DivergenceStrategy(
            self.kind, strategy=self.strategy, probes=probes, closed=self.closed
        )
        out.vmap_failed = self.vmap_failed
        return out

    def _fall_back(self, v: VelocityField, error: RuntimeError) -> None:
        if _first_fallback(v):  # once per field, not once per solve
            warnings.warn(
                f"batched divergence failed for field {field_name(v)} ({error}); "
                "using the loop of single backward passes from now on",
                RuntimeWarning,
                stacklevel=3,
            )
        self.vmap_failed = True

    def __call__(
        self,
        v: VelocityField,
        x: Tensor,
        t: Tensor,
        *,
        create_graph: bool = False,
        extras: Extras | None = None,
    ) -> tuple[Tensor, Tensor]:
        r"""``(v(x, t), columns)``: the velocity ``(B, *event)`` and divergence columns ``(B, K)``.

        Args:
            v: the field (called as ``v(x, t, **extras)``).
            x: validated points ``(B, *event)``.
            t: times, a ``(B,)`` tensor.
            create_graph: keep the graph (differentiable results; w.r.t. ``x`` when
                ``x.requires_grad``); otherwise both outputs are detached.
            extras: keyword arguments for the field.
        """
        batch, dim = x.shape[0], math.prod(x.shape[1:])
        if self.kind == "closed_form":
            assert self.closed is not None
            out, div = call_with_closed_form_divergence(v, x, t, self.closed, extras)
            if not isinstance(div, Tensor) or div.shape != (batch,):
                shape = tuple(div.shape) if isinstance(div, Tensor) else type(div).__name__
                raise ValueError(
                    f"the divergence(x, t) of field {field_name(v)} returned {shape}, "
                    f"expected shape ({batch},)"
                )
            columns = div.to(out.dtype).unsqueeze(1)
            return (out, columns) if create_graph else (out.detach(), columns.detach())
        rows = BATCHED_ROWS.get(x.device.type, BATCHED_ROWS["cpu"])
        with torch.enable_grad():
            x_in = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
            if self.kind == "exact" and self.strategy == "forward":
                chunk = max(1, min(dim, max(rows // batch, MIN_CHUNK)))
                out, div = _exact_forward(v, x_in, t, chunk, extras)
                columns = div.unsqueeze(1)
            else:
                out = call_checked(v, x_in, t, extras)
                _check_field_output(v, x_in, out)
                y = out if out.dim() == 2 else out.reshape(batch, dim)
                columns = self._vjp_columns(v, y, x_in, create_graph, rows)
        if not create_graph:
            out, columns = out.detach(), columns.detach()
        return out, columns

    def _vjp_columns(
        self, v: VelocityField, y: Tensor, x: Tensor, create_graph: bool, rows: int
    ) -> Tensor:
        batch, dim = y.shape
        if self.kind == "hutchinson":
            assert self.probes is not None
            chunk = 1 if self.vmap_failed else max(1, rows // batch)
            try:
                return _hutchinson(v, y, x, self.probes, create_graph, chunk).T
            except RuntimeError as error:
                if chunk == 1 or self.probes.shape[0] == 1 or not _is_vmap_failure(error):
                    raise
                self._fall_back(v, error)
                return _hutchinson(v, y, x, self.probes, create_graph, 1).T
        if self.strategy == "loop" or self.vmap_failed:
            return _exact_loop(v, y, x, create_graph).unsqueeze(1)
        if self.strategy == "auto":
            chosen, chunk = choose_strategy(batch, dim, x.device)
            if chosen == "loop":
                return _exact_loop(v, y, x, create_graph).unsqueeze(1)
            try:
                return _exact_batched(v, y, x, create_graph, chunk, self._bases).unsqueeze(1)
            except RuntimeError as error:
                if not _is_vmap_failure(error):
                    raise
                self._fall_back(v, error)
                return _exact_loop(v, y, x, create_graph).unsqueeze(1)
        chunk = max(1, min(dim, max(rows // batch, MIN_CHUNK)))
        return _exact_batched(v, y, x, create_graph, chunk, self._bases).unsqueeze(1)


_FELL_BACK: weakref.WeakSet = weakref.WeakSet()
"""Fields (a bound method's object) whose batched divergence failed and was warned about."""


def _first_fallback(v: object) -> bool:
    """Whether this is the first batched-divergence failure of field ``v`` (remembered weakly)."""
    key = getattr(v, "__self__", v)
    try:
        if key in _FELL_BACK:
            return False
        _FELL_BACK.add(key)
    except TypeError:  # not weak-referenceable or not hashable: warn every time
        pass
    return True


@dataclass(frozen=True)
class DivergenceResult:
    r"""The divergence of a field at a batch of points, with its Monte Carlo error.

    Attributes:
        value: :math:`\nabla\cdot v(x, t)` per sample, ``(B,)``: exact, or for Hutchinson the mean
            :math:`\frac1K\sum_k \varepsilon_k^\top (\partial v/\partial x)\,\varepsilon_k`.
        stderr: Hutchinson with :math:`K \ge 2` probes: the sample standard error
            :math:`s_K/\sqrt K` per sample, ``(B,)``; ``None`` for exact methods and for one probe.
        n_probes: :math:`K` for Hutchinson, ``None`` for exact methods.
    """

    value: Tensor
    stderr: Tensor | None = None
    n_probes: int | None = None


def _check_result_flags(caller: str, return_result: object, return_stderr: object) -> None:
    """``return_result`` / the deprecated ``return_stderr`` of :func:`divergence` and
    :func:`velocity_and_divergence`: bools, not both; the tuple form warns."""
    if not isinstance(return_result, bool) or not isinstance(return_stderr, bool):
        raise TypeError("return_result and return_stderr must be bools")
    if return_stderr:
        if return_result:
            raise ValueError("give return_result=True alone: the result carries the stderr")
        warnings.warn(
            f"{caller}(..., return_stderr=True) returning a tuple is deprecated and will be "
            "removed in the next release: pass return_result=True and read result.value and "
            "result.stderr",
            DeprecationWarning,
            stacklevel=3,
        )


def _divergence_result(columns: Tensor, method: str) -> DivergenceResult:
    """The :class:`DivergenceResult` of per-probe columns ``(B, K)``."""
    hutchinson = method == "hutchinson"
    stderr = _stderr(columns) if hutchinson and columns.shape[1] >= 2 else None
    return DivergenceResult(columns.mean(dim=1), stderr, columns.shape[1] if hutchinson else None)


def _velocity_and_columns(
    v: VelocityField,
    x: Tensor,
    t: float | Tensor,
    method: str,
    *,
    create_graph: bool,
    probes: Tensor | None,
    n_probes: int,
    noise: str,
    generator: torch.Generator | None,
    return_stderr: bool,
    strategy: str | None,
    extras: Extras | None,
) -> tuple[Tensor, Tensor]:
    """Check the arguments, then ``(v(x, t), columns)``: one divergence column per Hutchinson
    probe ``(B, K)``, or the exact divergence ``(B, 1)``."""
    if not callable(v):
        raise TypeError(f"the velocity field must be callable v(x, t), got {type(v).__name__}")
    _check_method(method, strategy)
    x = check_batched("x", x)
    tb = as_time(t, x)
    extras_ = check_extras(extras)
    if method == "hutchinson":
        eps = DivergenceStrategy.draw_probes(x, n_probes, noise, generator, probes)
        if return_stderr and eps.shape[0] < 2:
            raise ValueError("return_stderr needs at least 2 probes (n_probes >= 2 or K >= 2)")
        chosen = DivergenceStrategy("hutchinson", probes=eps)
    elif return_stderr:
        raise ValueError("return_stderr applies to method='hutchinson' only")
    elif probes is not None:
        raise ValueError("probes applies to method='hutchinson' only")
    else:
        exact = "loop" if method == "loop" else (strategy or "auto")
        chosen = DivergenceStrategy("exact", strategy=exact)
    return chosen(v, x, tb, create_graph=create_graph, extras=extras_)


def _stderr(columns: Tensor) -> Tensor:
    """The sample standard error of the mean over the probe columns, ``(B,)``."""
    return columns.std(dim=1, correction=1) / math.sqrt(columns.shape[1])


def velocity_and_divergence(
    v: VelocityField,
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
    extras: Extras | None = None,
    return_result: bool = False,
) -> tuple[Tensor, ...] | tuple[Tensor, DivergenceResult]:
    r"""The field and its divergence from one forward pass: ``(v(x, t), div)``.

    Same arguments as :func:`divergence`; this is what an ODE solve of the augmented state
    :math:`[z, \int \nabla\cdot v]` needs (theory §3), without evaluating the field twice. The
    velocity is detached unless ``create_graph=True``. With ``return_result=True`` the second
    element is a :class:`DivergenceResult` (value, Hutchinson standard error, probes);
    ``return_stderr=True`` (a 3-tuple) is deprecated.

    Example:
        >>> import torch
        >>> velocity, div = velocity_and_divergence(lambda x, t: -x, torch.ones(2, 3), 0.5)
        >>> div
        tensor([-3., -3.])
    """
    _check_result_flags("velocity_and_divergence", return_result, return_stderr)
    out, columns = _velocity_and_columns(
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
        extras=extras,
    )
    if return_result:
        return out, _divergence_result(columns, method)
    div = columns.mean(dim=1)
    if return_stderr:
        return out, div, _stderr(columns)
    return out, div


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
    method: str = "exact",
    *,
    create_graph: bool = False,
    probes: Tensor | None = None,
    n_probes: int = 1,
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
    return_stderr: bool = False,
    strategy: str | None = None,
    extras: Extras | None = None,
    return_result: bool = False,
) -> Tensor | DivergenceResult | tuple[Tensor, Tensor]:
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
        return_stderr: deprecated (returns the tuple ``(estimate, stderr)`` with a
            ``DeprecationWarning``; goes in the next release): pass ``return_result=True`` and
            read ``result.value`` and ``result.stderr`` instead.
        strategy: force an exact strategy: ``"batched"``, ``"loop"``, ``"forward"``, or
            ``"auto"``/``None`` (by size, :func:`choose_strategy`).
        extras: keyword arguments for a conditional field, ``v(x, t, **extras)``, passed as
            they are.
        return_result: return a :class:`DivergenceResult`: the divergence and, for Hutchinson
            with :math:`K \ge 2` probes, the sample standard error :math:`s_K / \sqrt K`.

    Returns:
        The plain form: the divergence, always a tensor of shape ``(B,)``. With
        ``return_result=True``: a :class:`DivergenceResult`. Exact
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
        >>> result = divergence(
        ...     field, x, 0.5, "hutchinson", n_probes=64, generator=g, return_result=True
        ... )
        >>> result.value.shape, result.stderr.shape
        (torch.Size([4]), torch.Size([4]))

    References:
        Chen et al. (2018), arXiv:1806.07366, Theorem 1; Grathwohl et al. (2019),
        arXiv:1810.01367, §3 (Hutchinson's estimator).
    """
    _check_result_flags("divergence", return_result, return_stderr)
    _, columns = _velocity_and_columns(
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
        extras=extras,
    )
    value = columns.mean(dim=1)
    if return_stderr:
        return value, _stderr(columns)
    return _divergence_result(columns, method) if return_result else value
