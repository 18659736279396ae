r"""The divergence evaluator: velocity and divergence columns from one forward pass of a field.

Internal to cnftools (the public vocabulary is :mod:`cnftools.estimators`): the likelihood engine,
:func:`cnftools.divergence` and :func:`cnftools.velocity_and_divergence` build a
:class:`DivergenceEvaluator` from a spec and call it once per evaluation. It holds what lives
between calls: Hutchinson's fixed probes, the cached basis chunks, and whether batched
vector-Jacobian products failed for this field (then the loop of single products, the same
numbers).

Every exact strategy computes the Jacobian's diagonal as a contiguous ``(B, d)`` tensor and
reduces it by one ``sum(dim=1)``, so the reduction order is the same whichever strategy runs
(a sum over a strided view of the same entries adds in another order); ``"auto"`` chooses by
sizes (:func:`choose_strategy`), never by timings. At a given batch the batched chunks of every
size and the loop give the same diagonal entries on the fields measured (an ``MLPField`` and the
time-to-accuracy benchmark's field, B = 256, d = 8 and 64), hence the same bits; at small batches
(B = 1, 7) the matrix products of other shapes may round the entries differently.

References:
    Grathwohl et al., FFJORD (2019), arXiv:1810.01367, §3; Chen et al. (2018), arXiv:1806.07366.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import vmap

from cnftools._checks import quiet_jvp
from cnftools.estimators import ClosedForm, Estimator, Exact, Hutchinson
from cnftools.fields import (
    Extras,
    VelocityField,
    call_checked,
    call_with_closed_form_divergence,
    closed_form_divergence,
    field_name,
)

__all__ = ["BATCHED_ROWS", "MIN_CHUNK", "DivergenceEvaluator", "choose_strategy"]

BATCHED_ROWS: dict[str, int] = {"cpu": 4096, "cuda": 65536}
"""Target rows (``chunk * B``) per batched backward pass, by device type (default: the cpu value).

Measured on one CPU thread, float64 (the project's 2-core x86_64 machine, December 2026, under
load: ratios only). On the time-to-accuracy benchmark's field (``benchmarks/time_to_accuracy.py``:
an opaque Gaussian OT field, two 64x64 products) at d = 64, B = 256, 16 basis vectors per pass
(4096 rows) was the fastest chunk of the loop and 4 ... 64 per pass (engine measurements: 14.2 ms
per evaluation against 13.4-19.8 ms for the others, and a solve to 1e-6 nats in 1.058 s against
1.355 s with 64 per pass and 1.484 s with the loop); measured again per evaluation, 8, 16 and 32
per pass were within the noise of each other (10-12 ms, the loop 13.5 ms), and the rule's
choices at B = 128 (32 per pass) and B = 64 (64) were the fastest there. The floor depends on
the field, not on (B, d) alone: on the 3x256 SiLU MLP of ``benchmarks/divergence.py`` the loop
was 10% faster than 16 per pass at d = 16 and 64, B = 256, and 4 per pass 11% faster than one
pass at d = 64, B = 64 (``python benchmarks/divergence.py --chunks --dims 16 64 --batches 256
128 64 --dtypes float64 --threads 1``, which also shows that every chunk and the loop gave the
same bits there). The cuda value is a memory-bounded guess, not a measurement."""

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
# Every exact strategy computes the Jacobian's diagonal as a contiguous (B, d) tensor and
# reduces it by one ``sum(dim=1)``: the same reduction order whichever strategy runs (a row's
# sum does not depend on the number of rows either).
def _diagonal_loop(
    v: VelocityField,
    y: Tensor,
    x: Tensor,
    create_graph: bool,
    bases: dict[tuple, Tensor] | None = None,
) -> Tensor:
    """The diagonal ``(B, d)`` by ``d`` single VJPs, the ``i``-th with the cotangent ``e_i`` on
    every row (the basis rows of :func:`_basis_chunk`, cached in ``bases`` between calls).

    The cotangent holds the values the gradient of ``y[:, i].sum()`` would seed, so the numbers
    are those of that form, without its two extra autograd nodes per column."""
    batch, dim = y.shape
    basis = _cached_basis(bases, 0, dim, batch, dim, y)
    entries = []
    for i in range(dim):
        g = _grad(v, y, x, basis[i], create_graph=create_graph, batched=False)
        entries.append(g.reshape(batch, dim)[:, i])
    return torch.stack(entries, dim=1)


def _basis_chunk(start: int, size: int, batch: int, dim: int, like: Tensor) -> Tensor:
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)[start : start + size]
    return eye[:, None, :].expand(size, batch, dim)


def _cached_basis(
    bases: dict[tuple, Tensor] | None, start: int, size: int, batch: int, dim: int, like: Tensor
) -> Tensor:
    """:func:`_basis_chunk`, kept in ``bases`` (``None``: not cached) for the next call."""
    key = (start, size, batch, dim, like.dtype, like.device)
    basis = bases.get(key) if bases is not None else None
    if basis is None:
        basis = _basis_chunk(start, size, batch, dim, like)
        if bases is not None:
            bases[key] = basis
    return basis


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
        basis = _cached_basis(bases, start, size, batch, dim, y)
        if size == 1:
            g = _grad(v, y, x, basis[0], create_graph=create_graph, batched=False)[None]
        else:
            g = _grad(v, y, x, basis, create_graph=create_graph, batched=True)
        g = g.reshape(size, batch, dim)
        if size != dim:
            g = g[:, :, start : start + size]
        parts.append(g.diagonal(dim1=0, dim2=2))  # (B, size)
    # always a new contiguous (B, d) tensor, even from one chunk: a sum over the rows of a
    # strided diagonal view adds in another order than over contiguous rows (measured: the same
    # entries summed 1e-15 apart), which would make the bits depend on the chunk count
    return torch.cat(parts, dim=1)


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


class DivergenceEvaluator:
    r"""How the divergence of a field is taken for one batch: the one fast path of cnftools.

    Three kinds, each returning the velocity and the divergence *columns* ``(B, K)`` from one
    forward pass of the field (:meth:`__call__`):

    - ``"exact"``: :math:`\operatorname{tr}\partial v/\partial x` by ``d`` VJPs, issued by
      ``strategy`` (``"auto"``: by size, :func:`choose_strategy`; or ``"batched"``, ``"loop"``,
      ``"forward"``). ``K = 1``.
    - ``"hutchinson"``: :math:`\varepsilon_k^\top (\partial v/\partial x)\varepsilon_k` for
      ``K`` probes held by the evaluator (fixed, e.g. for a whole ODE solve). ``K`` columns.
    - ``"closed_form"``: the field's own ``divergence(x, t)``. ``K = 1``.

    Batched VJPs (``is_grads_batched``, vmap) fail on some models (ops without a vmap rule, e.g.
    ``"NYI: querying is_contiguous inside of vmap"``). Then the evaluator warns once and uses
    the loop of single VJPs from that call on, for the exact basis and for Hutchinson's probes
    alike; the same numbers, more backward passes.

    Built by :meth:`for_spec` from a spec of :mod:`cnftools.estimators`.

    Example:
        >>> import torch
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> t = torch.full((5,), 0.5, dtype=torch.float64)
        >>> evaluator = DivergenceEvaluator.for_spec(lambda x, t: -2 * x, Exact(), x)
        >>> velocity, columns = evaluator(lambda x, t: -2 * x, x, t)
        >>> columns[:, 0]
        tensor([-6., -6., -6., -6., -6.], dtype=torch.float64)

    References:
        Grathwohl et al. (2019), arXiv:1810.01367, §3; Chen et al. (2018), arXiv:1806.07366.
    """

    def __init__(
        self,
        kind: str,
        *,
        strategy: str = "auto",
        probes: Tensor | None = None,
        closed: Callable[[Tensor, Tensor], Tensor] | None = None,
    ) -> None:
        assert kind in ("exact", "hutchinson", "closed_form"), kind
        assert (kind == "hutchinson") == (probes is not None)
        assert (kind == "closed_form") == (closed is not None)
        self.kind = kind
        self.strategy = strategy
        self.probes = probes
        self.closed = closed
        self.vmap_failed = False  # set once a batched VJP failed: the loop from then on
        self._bases: dict[tuple, Tensor] = {}  # basis chunks reused across calls

    @classmethod
    def for_spec(
        cls, v: VelocityField, spec: Estimator | None, like: Tensor
    ) -> DivergenceEvaluator:
        """The evaluator of ``spec`` for field ``v`` and points ``like`` ``(B, *event)``.

        ``None``: the field's closed form when it offers one, else :class:`Exact`. Hutchinson's
        probes are drawn here, once, in ``like``'s dtype and on its device.
        """
        if spec is None:
            closed = closed_form_divergence(v)
            if closed is not None:
                return cls("closed_form", closed=closed)
            return cls("exact")
        if isinstance(spec, Exact):
            return cls("exact", strategy=spec.strategy)
        if isinstance(spec, Hutchinson):
            return cls("hutchinson", probes=spec.draw(like))
        assert isinstance(spec, ClosedForm), spec
        closed = closed_form_divergence(v)
        if closed is None:
            raise ValueError(
                f"estimator=ClosedForm() but the field {field_name(v)} has no closed-form "
                "divergence(x, t) (see cnftools.fields.closed_form_divergence): use "
                "cnftools.Exact() or leave estimator=None"
            )
        return cls("closed_form", closed=closed)

    @property
    def columns(self) -> int:
        """``K``: divergence columns per call (probes for Hutchinson, else 1)."""
        return 1 if self.probes is None else int(self.probes.shape[0])

    def subset(self, rows: Tensor | slice) -> DivergenceEvaluator:
        """The same strategy for a sub-batch (Hutchinson probes indexed by ``rows``)."""
        probes = None if self.probes is None else self.probes[:, rows]
        out = DivergenceEvaluator(
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
        batch = y.shape[0]
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
        # every exact strategy: the diagonal (B, d), reduced here by one sum in one order
        return self._diagonal(v, y, x, create_graph, rows).sum(dim=1).unsqueeze(1)

    def _diagonal(
        self, v: VelocityField, y: Tensor, x: Tensor, create_graph: bool, rows: int
    ) -> Tensor:
        batch, dim = y.shape
        if self.strategy == "loop" or self.vmap_failed:
            return _diagonal_loop(v, y, x, create_graph, self._bases)
        if self.strategy == "auto":
            chosen, chunk = choose_strategy(batch, dim, x.device)
            if chosen == "loop":
                return _diagonal_loop(v, y, x, create_graph, self._bases)
            try:
                return _diagonal_batched(v, y, x, create_graph, chunk, self._bases)
            except RuntimeError as error:
                if not _is_vmap_failure(error):
                    raise
                self._fall_back(v, error)
                return _diagonal_loop(v, y, x, create_graph, self._bases)
        chunk = max(1, min(dim, max(rows // batch, MIN_CHUNK)))
        return _diagonal_batched(v, y, x, create_graph, chunk, self._bases)


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
