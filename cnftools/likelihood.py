r"""Exact log-likelihoods of continuous normalizing flows, sampling, and density evolution (theory §3).

A velocity field :math:`v(x, t)` transports :math:`p_0` (noise, :math:`t = 0`) to :math:`p_1` (data,
:math:`t = 1`) along :math:`dz_t/dt = v(z_t, t)`. The instantaneous change of variables

.. math::

    \frac{d}{dt}\log p_t(z_t) = -\operatorname{div} v(z_t, t)
    \quad\Longrightarrow\quad
    \log p_1(x) = \log p_0(z_0) - \int_0^1 \operatorname{div} v(z_t, t)\,dt

gives the likelihood of a data point :math:`x = z_1` by integrating the augmented state
:math:`[z_t, \int \operatorname{div} v]` from :math:`t = 1` back to :math:`t = 0` in one ODE solve
(:func:`log_likelihood`). Integrating forward from :math:`z_0 \sim p_0` gives samples
(:func:`sample`) and, in the same solve, their log-density (:func:`sample_with_log_prob`). Along the
way :math:`\log p_t(z_t) = \log p_0(z_0) - \int_0^t \operatorname{div} v` at any requested times
(density evolution, ``times=``).

The divergence is exact by default: the field's closed form when it offers one
(:func:`cnftools.fields.closed_form_divergence`, e.g. the marginal fields of
:mod:`cnftools.marginals`), otherwise the trace of the Jacobian from one forward pass of the field
and :math:`d` vector-Jacobian products (:mod:`cnftools.divergences`). ``divergence="hutchinson"``
uses :math:`K` probe vectors :math:`\varepsilon_k` drawn once and held fixed for the whole solve,
integrates each probe's estimate separately, and reports the per-sample standard error of their mean.

Gradients only when asked: by default the solve keeps no graph, whatever the field's parameters
(memory as under ``torch.no_grad()``). Asked means ``x.requires_grad`` or ``grad=True`` (direct
backpropagation through the solver) or ``adjoint=True`` (checkpointed replay of the same steps:
one state per step is kept instead of every step's graph); then the exact divergence is built
with ``create_graph=True``. Every row of a batch is solved on its own steps, so a row's
log-likelihood does not depend on the rest of its batch.

``accuracy=`` asks for nats instead of tolerances: the engine chooses method and tolerance, checks
itself with a tighter solve and solves again only the rows whose estimated error is above the
target (an estimate, not a guaranteed bound: measured rates in ``docs/benchmarks.md``). ``extras=`` passes
keyword arguments to a conditional field, ``v(x, t, **extras)``.

Shapes: data ``x`` and noise ``z0`` are ``(B, *event)``; log-densities are ``(B,)``.

References:
    Chen et al., Neural Ordinary Differential Equations (2018), arXiv:1806.07366;
    Grathwohl et al., FFJORD (2019), arXiv:1810.01367; theory §3, §9–§11.

Theory sections cited here (pages under ``docs/theory/``):

- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
- §11: ``docs/theory/divergence-and-continuity.md#divergence``
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from cnftools._checks import check_batched, check_event_shape, check_int
from cnftools._ode import (
    ACCURACY_SAFETY,
    ACCURACY_STEP,
    NFE,
    TOLERANCE_FLOOR,
    SolverConfig,
    SolverError,
    check_reach,
    integrate,
    resolve_config,
)
from cnftools._progress import reporter, reporting
from cnftools._resources import with_thread_policy
from cnftools.divergences import DivergenceStrategy
from cnftools.fields import (
    VelocityField,
    call_checked,
    check_callable,
    check_extras,
    closed_form_divergence,
    select_extras,
    shares_time,
)

__all__ = [
    "LikelihoodResult",
    "SampleResult",
    "check_prior",
    "log_likelihood",
    "sample",
    "sample_with_log_prob",
]

_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class LikelihoodResult:
    r"""Everything one augmented solve gives.

    Attributes:
        log_prob: :math:`\log p_1(x)`, shape ``(B,)`` (the mean over probes for Hutchinson).
        x: the data-side points :math:`x = z_1`, ``(B, *event)`` (the input of
            :func:`log_likelihood`, the samples of :func:`sample_with_log_prob`).
        z0: the noise-side points :math:`z_0`, ``(B, *event)``.
        log_prior: :math:`\log p_0(z_0)` under the prior, ``(B,)``.
        divergence_integral: :math:`\int_0^1 \operatorname{div} v(z_t, t)\,dt`, ``(B,)``.
        nfe: function evaluations (forward; backward, filled in when an adjoint ``backward()``
            runs; estimate).
        stderr: Hutchinson with :math:`K > 1` probes: the per-sample standard error of
            ``log_prob`` over probes, ``(B,)``; otherwise ``None``.
        times: the requested intermediate times, ``(T,)``, in the order given (or ``None``).
        log_prob_t: :math:`\log p_t(z_t)` at those times along each trajectory, ``(T, B)``.
        trajectory: :math:`z_t` at those times, ``(T, B, *event)``.
        error_estimate: a-posteriori estimate of ``|log_prob - exact|`` per sample, ``(B,)``, from
            a second solve with :meth:`SolverConfig.refined` (or ``None``).
        config: the solver configuration used.
    """

    log_prob: Tensor
    x: Tensor
    z0: Tensor
    log_prior: Tensor
    divergence_integral: Tensor
    nfe: NFE
    stderr: Tensor | None = None
    times: Tensor | None = None
    log_prob_t: Tensor | None = None
    trajectory: Tensor | None = None
    error_estimate: Tensor | None = None
    config: SolverConfig | None = None


@dataclass(frozen=True)
class SampleResult:
    """Samples with their solve's bookkeeping.

    Attributes:
        x: the samples :math:`z_1`, ``(B, *event)``.
        nfe: function evaluations.
        times: the requested times (or ``None``).
        trajectory: :math:`z_t` at those times, ``(T, B, *event)`` (or ``None``).
        config: the solver configuration used.
    """

    x: Tensor
    nfe: NFE
    times: Tensor | None = None
    trajectory: Tensor | None = None
    config: SolverConfig | None = None


# ---------------------------------------------------------------------------------------------
# Argument handling


def check_prior(
    prior: object,
    event: tuple[int, ...],
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Distribution | None:
    """The prior, checked before any solve: ``None`` or a ``Distribution`` with the data's event
    shape and an empty batch shape; with ``dtype`` and ``device``, one cheap draw checks that it
    samples there and that ``log_prob`` of one point is a ``(1,)`` tensor of that dtype (the one
    prior check of :func:`log_likelihood`, :func:`sample_with_log_prob` and ``dataset_nll``).

    Example:
        >>> check_prior(None, (2,)) is None
        True
    """
    if prior is None:
        return None
    if not isinstance(prior, Distribution):
        raise TypeError(
            f"prior must be None (the standard normal N(0, I)) or a "
            f"torch.distributions.Distribution with event_shape {event}, got "
            f"{type(prior).__name__} {prior!r:.40}"
        )
    if tuple(prior.event_shape) != event or tuple(prior.batch_shape) != ():
        hint = ""
        if tuple(prior.batch_shape) + tuple(prior.event_shape) == event:
            n = len(event) - len(prior.event_shape)
            hint = f"; wrap it as torch.distributions.Independent(prior, {n})"
        raise ValueError(
            f"prior must have event_shape {event} (the data's event shape, so that log_prob maps "
            f"(B, *event) to (B,)) and batch_shape (); got event_shape "
            f"{tuple(prior.event_shape)} and batch_shape {tuple(prior.batch_shape)}{hint}"
        )
    if dtype is None:
        return prior
    try:
        with torch.no_grad():
            draw = prior.sample((1,))
    except NotImplementedError:  # a prior without sampling: its log_prob is checked after solving
        return prior
    if draw.dtype != dtype:
        raise TypeError(
            f"prior samples {draw.dtype}, but the computation runs in {dtype}: the prior must be "
            f"built in the data's dtype {dtype} (torch would silently promote its log_prob)"
        )
    if device is not None and draw.device != device:
        raise ValueError(f"prior lives on {draw.device} but the data are on {device}")
    with torch.no_grad():
        out = prior.log_prob(draw)
    if not isinstance(out, Tensor) or out.shape != (1,) or out.dtype != dtype:
        got = (out.dtype, tuple(out.shape)) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"prior.log_prob of one point must be a (1,) tensor of {dtype}, got {got}")
    return prior


def _prior_log_prob(prior: Distribution | None, z: Tensor) -> Tensor:
    batch = z.shape[0]
    if prior is None:
        d = z[0].numel()
        return -0.5 * z.reshape(batch, -1).pow(2).sum(dim=1) - 0.5 * d * _LOG_2PI
    out = prior.log_prob(z)
    if out.shape != (batch,):
        raise ValueError(f"prior.log_prob returned shape {tuple(out.shape)}, expected ({batch},)")
    if out.dtype != z.dtype:
        raise TypeError(
            f"prior.log_prob returned {out.dtype} for {z.dtype} points: build the prior in the "
            f"data's dtype"
        )
    return out


def _check_grad(grad: object) -> bool | None:
    if grad is not None and not isinstance(grad, bool):
        raise TypeError(f"grad must be None, True or False, got {type(grad).__name__}")
    return grad


def _check_times(times: object, like: Tensor) -> list[float] | None:
    if times is None:
        return None
    if isinstance(times, Tensor):
        if times.dim() != 1 or not times.is_floating_point():
            raise ValueError(f"times must be a 1-D floating tensor, got shape {tuple(times.shape)}")
        values = [float(s) for s in times.detach().cpu().tolist()]
    elif isinstance(times, Sequence) and all(
        isinstance(s, Real) and not isinstance(s, bool) for s in times
    ):
        values = [float(s) for s in times]
    else:
        raise TypeError("times must be a 1-D tensor or a sequence of floats in [0, 1]")
    if not values:
        raise ValueError("times must not be empty")
    if not all(math.isfinite(s) and 0.0 <= s <= 1.0 for s in values):
        raise ValueError(f"times must lie in [0, 1], got {values}")
    if len(set(values)) != len(values):
        raise ValueError(f"times must be distinct, got {values}")
    return values


def _resolve_params(v: object, params: Iterable[Tensor] | None) -> tuple[tuple[Tensor, ...], bool]:
    """The field's parameters, and whether they are known (False for a plain closure)."""
    if params is not None:
        out = tuple(params)
        for p in out:
            if not isinstance(p, Tensor):
                raise TypeError(f"params must be tensors, got {type(p).__name__}")
        return out, True
    owner = v if isinstance(v, nn.Module) else getattr(v, "__self__", None)
    if isinstance(owner, nn.Module):
        return tuple(owner.parameters()), True
    return (), False


def _needs_graph(
    v: VelocityField,
    start: Tensor,
    params: tuple[Tensor, ...],
    *,
    known: bool,
    t_start: float,
    extras: dict,
) -> bool:
    """Whether the solve must be differentiable: grad mode on and something requires grad.

    For a field that is not an ``nn.Module`` (its parameters unknown), one extra field call, not
    counted in the NFE, tells whether its output requires grad.
    """
    if not torch.is_grad_enabled():
        return False
    if start.requires_grad or any(p.requires_grad for p in params):
        return True
    if known:
        return False
    # A plain callable may close over parameters: one probe evaluation tells.
    with torch.enable_grad():
        t = torch.full((start.shape[0],), t_start, dtype=start.dtype, device=start.device)
        out = call_checked(v, start.detach(), t, extras)
    return isinstance(out, Tensor) and out.requires_grad


def _time_grid(
    times: list[float] | None, like: Tensor, *, reverse: bool
) -> tuple[Tensor, list[int]]:
    """Output times for the solver (strictly monotone, 1 -> 0 if ``reverse``) and the index of
    each requested time in it."""
    points = {0.0, 1.0} | set(times or [])
    ordered = sorted(points, reverse=reverse)
    index = {s: i for i, s in enumerate(ordered)}
    grid = torch.tensor(ordered, dtype=like.dtype, device=like.device)
    return grid, [index[s] for s in (times or [])]


# ---------------------------------------------------------------------------------------------
# The augmented dynamics


def _check_progress(progress: object) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__}")
    return progress


def _divergence_strategy(
    v: VelocityField,
    like: Tensor,
    divergence: str,
    n_probes: int,
    noise: str,
    probes: Tensor | None,
    generator: torch.Generator | None,
) -> DivergenceStrategy:
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    check_int("n_probes", n_probes, low=1)
    if divergence == "exact":
        if probes is not None or n_probes != 1:
            raise ValueError("probes and n_probes apply to divergence='hutchinson' only")
        closed = closed_form_divergence(v)
        if closed is not None:
            return DivergenceStrategy("closed_form", closed=closed)
        return DivergenceStrategy("exact")
    if isinstance(probes, Tensor) and probes.shape == like.shape:
        probes = probes.unsqueeze(0)  # one probe given as (B, *event)
    eps = DivergenceStrategy.draw_probes(like, n_probes, noise, generator, probes)
    return DivergenceStrategy("hutchinson", probes=eps)


def _augmented(
    v: VelocityField, start: Tensor, strategy: DivergenceStrategy | None, extras: dict
) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    r"""``f(t, y, rows)`` for the state ``y = [vec(z), A]`` of shape ``(b, d + K)``:
    :math:`dz/dt = v(z, t)`, :math:`dA_k/dt = \operatorname{div}_k v(z, t)` (``K`` columns: one for
    the exact divergence, one per Hutchinson probe, none for plain sampling, ``strategy=None``).

    The velocity and the columns come from one forward pass of the field through the
    :class:`~cnftools.divergences.DivergenceStrategy`. The graph is kept (``create_graph``) exactly
    when the solve runs with gradients enabled: direct backpropagation, or the adjoint's backward
    solve.

    ``rows`` (the loop's rows still moving, ``None``: all) selects the rows' Hutchinson probes and
    per-row extras; the selection is cached until the loop's rows change.
    """
    batch, event = start.shape[0], tuple(start.shape[1:])
    d = math.prod(event)
    cache: list = [None, strategy, extras]  # rows, strategy and extras for those rows

    def f(t: Tensor, y: Tensor, rows: Tensor | None) -> Tensor:
        b = y.shape[0]
        if rows is None:
            rows_strategy, rows_extras = strategy, extras
        else:
            if cache[0] is not rows:
                subset = None if strategy is None else strategy.subset(rows)
                cache[:] = [rows, subset, select_extras(extras, batch, rows)]
            rows_strategy, rows_extras = cache[1], cache[2]
        z = y[:, :d].reshape(b, *event) if len(event) != 1 else y[:, :d]
        if rows_strategy is None:
            return call_checked(v, z, t, rows_extras).reshape(b, d)
        out, columns = rows_strategy(
            v, z, t, create_graph=torch.is_grad_enabled(), extras=rows_extras
        )
        return torch.cat([out.reshape(b, d), columns], dim=1)

    return f


# ---------------------------------------------------------------------------------------------
# The solves


@dataclass
class _Solve:
    """Outputs of one augmented solve: states at the grid, integrals A(t) = ∫_0^t div."""

    z: Tensor  # (T, B, *event), in grid order
    integral: Tensor  # (T, B, K): ∫_0^t div per probe column
    nfe: NFE


def _augmented_solve(
    v: VelocityField,
    start: Tensor,
    grid: Tensor,
    strategy: DivergenceStrategy | None,
    config: SolverConfig,
    params: tuple[Tensor, ...],
    *,
    graph: bool,
    nfe: NFE,
    phase: str,
    context: str,
    extras: dict,
) -> _Solve:
    if (
        torch.is_inference_mode_enabled()
        and strategy is not None
        and strategy.kind != "closed_form"
    ):
        # The autograd divergence needs normal tensors: leave inference mode for the solve.
        with torch.inference_mode(False):
            if strategy.probes is not None:
                strategy = strategy.subset(slice(None))
                strategy.probes = strategy.probes.clone()  # type: ignore[union-attr]
            extras = {k: e.clone() if isinstance(e, Tensor) else e for k, e in extras.items()}
            return _augmented_solve(
                v,
                start.clone(),
                grid.clone(),
                strategy,
                config,
                params,
                graph=False,
                nfe=nfe,
                phase=phase,
                context=context,
                extras=extras,
            )
    batch, event = start.shape[0], tuple(start.shape[1:])
    d = math.prod(event)
    columns = 0 if strategy is None else strategy.columns
    y0 = torch.cat([start.reshape(batch, d), start.new_zeros(batch, columns)], dim=1)
    f = _augmented(v, start, strategy, extras)
    compact = _rows_stand_alone(v, start.detach(), float(grid[0]), extras, context)
    shared = shares_time(v)  # a model of one time per batch: the rows share their steps
    progress = reporter(context, float(grid[0]), float(grid[-1]))
    if graph:
        solution = integrate(
            f,
            y0,
            grid,
            config,
            n_point=d,
            params=params,
            nfe=nfe,
            phase=phase,
            context=context,
            compact=compact,
            shared_steps=shared,
            progress=progress,
        )
    else:
        with torch.no_grad():
            solution = integrate(
                f,
                y0,
                grid,
                config.replace(adjoint=False) if config.adjoint else config,
                n_point=d,
                nfe=nfe,
                phase=phase,
                context=context,
                compact=compact,
                shared_steps=shared,
                progress=progress,
            )
    z = solution[:, :, :d].reshape(len(grid), batch, *event)
    integral_columns = solution[:, :, d:]
    # columns hold ∫_{grid[0]}^{t} div; shift so that they hold ∫_0^t div.
    zero_index = 0 if float(grid[0]) == 0.0 else len(grid) - 1
    integral = integral_columns - integral_columns[zero_index]
    return _Solve(z, integral, nfe)


_MIXING_WARNED: weakref.WeakSet = weakref.WeakSet()


def _rows_stand_alone(
    v: VelocityField, start: Tensor, t0: float, extras: dict, context: str
) -> bool:
    """Whether the field gives rows the same velocity apart as in their batch (1e-6 relative, far
    above the ~1e-16 of matrix products of other shapes): then rows that have finished may leave
    the evaluated batch. A field that cannot be called on part of its batch (e.g. one that closes
    over per-row tensors instead of taking them as ``extras``) keeps every row in every call; one
    whose rows change with their neighbours (batch statistics, attention across the batch) too,
    with a warning: its results depend on the batch."""
    batch = start.shape[0]
    if batch == 1:
        return True
    with torch.no_grad():
        t = start.new_full((batch,), t0)
        full = call_checked(v, start, t, extras)
        part = slice(0, min(2, batch - 1))  # two rows: batch statistics of one row may fail
        try:
            alone = call_checked(v, start[part], t[part], select_extras(extras, batch, part))
        except Exception:  # any failure on part of the batch: evaluate the whole batch only
            return False
        scale = full[part].abs().max().clamp(min=1.0)
        gap = float((alone - full[part]).abs().max() / scale)
    if gap <= 1e-6:
        return True
    with contextlib.suppress(TypeError):
        if v in _MIXING_WARNED:
            return False
        _MIXING_WARNED.add(v)
    batched = sorted(
        k for k, e in extras.items() if isinstance(e, Tensor) and e.dim() >= 1 and len(e) == batch
    )
    shared = (
        f"; or extras {batched} (first dimension {batch}, the batch's) are not per row: a tensor "
        "extra with one entry per row is split with the rows, so a table shared by every row "
        "must not have B rows (pass it in a closure or as a module attribute)"
        if batched
        else ""
    )
    warnings.warn(
        f"{context}: the field gives a row another velocity in its batch than alone (relative "
        f"difference {gap:.2g}): its rows are not independent (batch statistics such as BatchNorm "
        "in training mode, or attention across the batch), so each row's result depends on the "
        f"rest of its batch; call model.eval() or make the field act row by row{shared}",
        RuntimeWarning,
        stacklevel=5,
    )
    return False


def _check_result(name: str, value: Tensor, context: str) -> None:
    bad = torch.isnan(value) | (value == math.inf)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise SolverError(
            f"{context}: {name} is NaN or +inf for batch rows {rows[:10].tolist()}; "
            f"check the prior's log_prob at the solved z0 and the field there"
        )


def _wants_graph(
    v: VelocityField,
    start: Tensor,
    config: SolverConfig,
    params: tuple[Tensor, ...],
    *,
    grad: bool | None,
    known: bool,
    t_start: float,
    extras: dict,
) -> bool:
    """Whether the solve keeps a graph: only when gradients were asked for.

    Asked means ``grad=True``, ``adjoint=True`` or ``x.requires_grad``; ``grad=False`` never.
    Then the graph is built if grad mode is on and something requires grad.
    """
    if grad is False or not torch.is_grad_enabled():
        return False
    if grad is None and not (config.adjoint or start.requires_grad):
        return False
    return _needs_graph(v, start, params, known=known, t_start=t_start, extras=extras)


def _one_solve(
    v: VelocityField,
    start: Tensor,
    prior: Distribution | None,
    grid: Tensor,
    strategy: DivergenceStrategy,
    config: SolverConfig,
    params: tuple[Tensor, ...],
    *,
    reverse: bool,
    graph: bool,
    nfe: NFE,
    phase: str,
    context: str,
    extras: dict,
) -> tuple[_Solve, Tensor, Tensor, Tensor]:
    """One augmented solve: ``(solve, log_prior, per_probe ∫div (B, K), log_prob)``."""
    i0, i1 = (len(grid) - 1, 0) if reverse else (0, len(grid) - 1)
    solve = _augmented_solve(
        v,
        start,
        grid,
        strategy,
        config,
        params,
        graph=graph,
        nfe=nfe,
        phase=phase,
        context=context,
        extras=extras,
    )
    with torch.enable_grad() if graph else torch.no_grad():
        log_prior = _prior_log_prob(prior, solve.z[i0])
        per_probe = solve.integral[i1]
        log_prob = log_prior - per_probe.mean(dim=1)
    return solve, log_prior, per_probe, log_prob


def _likelihood(
    v: VelocityField,
    start: Tensor,
    prior: Distribution | None,
    *,
    reverse: bool,
    config: SolverConfig,
    strategy: DivergenceStrategy,
    params: tuple[Tensor, ...],
    known: bool,
    times: list[float] | None,
    error_estimate: bool,
    context: str,
    grad: bool | None,
    extras: dict,
) -> LikelihoodResult:
    nfe = NFE()
    graph = _wants_graph(
        v,
        start,
        config,
        params,
        grad=grad,
        known=known,
        t_start=1.0 if reverse else 0.0,
        extras=extras,
    )
    if graph and config.adjoint and not known:
        raise ValueError(
            "adjoint=True needs the field's parameters: v is not an nn.Module, so pass "
            "params=model.parameters() (the tensors the field depends on)"
        )
    if config.accuracy is not None:
        return _to_accuracy(
            v,
            start,
            prior,
            config,
            strategy,
            params,
            reverse=reverse,
            graph=graph,
            nfe=nfe,
            context=context,
            extras=extras,
        )
    grid, index = _time_grid(times, start, reverse=reverse)
    solve, log_prior, per_probe, log_prob = _one_solve(
        v,
        start,
        prior,
        grid,
        strategy,
        config,
        params,
        reverse=reverse,
        graph=graph,
        nfe=nfe,
        phase="forward",
        context=context,
        extras=extras,
    )
    i0, i1 = (len(grid) - 1, 0) if reverse else (0, len(grid) - 1)
    z0, x = solve.z[i0], solve.z[i1]
    div_integral = per_probe.mean(dim=1)
    _check_result("log p_1", log_prob, context)
    stderr = None
    if strategy.kind == "hutchinson" and per_probe.shape[1] > 1:
        stderr = per_probe.std(dim=1) / math.sqrt(per_probe.shape[1])
    times_t = log_prob_t = trajectory = None
    if times is not None:
        times_t = torch.tensor(times, dtype=start.dtype, device=start.device)
        trajectory = solve.z[index]
        log_prob_t = log_prior.unsqueeze(0) - solve.integral[index].mean(dim=2)
    estimate = None
    if error_estimate:
        refined = config.refined()
        with torch.no_grad():
            *_, fine_log_prob = _one_solve(
                v,
                start.detach(),
                prior,
                grid,
                strategy,
                refined,
                (),
                reverse=reverse,
                graph=False,
                nfe=nfe,
                phase="estimate",
                context=context,
                extras=extras,
            )
        estimate = (log_prob.detach() - fine_log_prob).abs()
        if not config.is_adaptive:  # Richardson: error(N) ≈ |l_N - l_2N| 2^p / (2^p - 1)
            estimate = estimate * (2**config.order / (2**config.order - 1))
    return LikelihoodResult(
        log_prob=log_prob,
        x=x,
        z0=z0,
        log_prior=log_prior,
        divergence_integral=div_integral,
        nfe=nfe,
        stderr=stderr,
        times=times_t,
        log_prob_t=log_prob_t,
        trajectory=trajectory,
        error_estimate=estimate,
        config=config,
    )


def _certificate(tight: Tensor, loose: Tensor, config: SolverConfig) -> Tensor:
    """Reported error of the tighter of two solves (``config`` is the tighter's):
    :data:`ACCURACY_SAFETY` times their difference, at least the looser solve's absolute tolerance
    (``ACCURACY_STEP`` times the tighter's). The difference alone can vanish by chance when both
    solves err alike; measured, the tighter solve's error then reached 1.8 times its own ``atol``
    (``benchmarks/accuracy_bound.py``), so its own tolerance is no floor."""
    return torch.clamp(ACCURACY_SAFETY * (tight - loose).abs(), min=ACCURACY_STEP * config.atol)


def _to_accuracy(
    v: VelocityField,
    start: Tensor,
    prior: Distribution | None,
    config: SolverConfig,
    strategy: DivergenceStrategy,
    params: tuple[Tensor, ...],
    *,
    reverse: bool,
    graph: bool,
    nfe: NFE,
    context: str,
    extras: dict,
) -> LikelihoodResult:
    r"""Solve until every row's estimated error is within ``config.accuracy`` nats.

    A first solve at the tolerance :meth:`SolverConfig.accuracy_plan` chooses, then a solve
    :data:`ACCURACY_STEP` times tighter; the tighter value is returned with an error estimate,
    :func:`_certificate` (twice the two solves' difference, at least the looser solve's ``atol``).
    It is an estimate, not a guaranteed bound: counted against closed forms in
    ``benchmarks/accuracy_bound.py``, a few rows in a thousand exceed it (``docs/benchmarks.md``).
    Rows whose estimate exceeds the target are solved again, alone, each round
    :data:`ACCURACY_STEP` times tighter, down to the tolerance floor.
    """
    assert config.accuracy is not None
    target = config.accuracy
    if start.dtype != torch.float64:
        warnings.warn(
            f"{context}: accuracy= in {start.dtype} estimates the solver's error only, not the "
            "field's own rounding in that dtype (measured on closed-form fields: rows missed the "
            "target by orders of magnitude, docs/benchmarks.md); use float64 for reference numbers",
            RuntimeWarning,
            stacklevel=3,
        )
    grid, _ = _time_grid(None, start, reverse=reverse)
    i0, i1 = (len(grid) - 1, 0) if reverse else (0, len(grid) - 1)
    coarse = config.accuracy_plan()
    *_, previous = _one_solve(
        v,
        start,
        prior,
        grid,
        strategy,
        coarse,
        params,
        reverse=reverse,
        graph=False,
        nfe=nfe,
        phase="estimate",
        context=context,
        extras=extras,
    )
    floor = max(TOLERANCE_FLOOR, 4 * torch.finfo(start.dtype).eps)  # check_reach's bound
    fine = coarse.tightened(ACCURACY_STEP, floor)
    solve, log_prior, per_probe, log_prob = _one_solve(
        v,
        start,
        prior,
        grid,
        strategy,
        fine,
        params,
        reverse=reverse,
        graph=graph,
        nfe=nfe,
        phase="forward",
        context=context,
        extras=extras,
    )
    z0, x = solve.z[i0], solve.z[i1]
    certified = _certificate(log_prob.detach(), previous, fine)
    batch = start.shape[0]
    stopped = ""
    while True:
        todo = (certified > target).nonzero().flatten()
        if todo.numel() == 0 or fine.atol <= floor:
            break
        tighter = fine.tightened(ACCURACY_STEP, floor)
        try:
            sub = _one_solve(
                v,
                start[todo],
                prior,
                grid,
                strategy.subset(todo),
                tighter,
                params,
                reverse=reverse,
                graph=graph,
                nfe=nfe,
                phase="forward",
                context=context,
                extras=select_extras(extras, batch, todo),
            )
        except SolverError as error:  # the rows keep the value and certificate they have
            stopped = f"; a {tighter.rtol:g} solve failed: {error}"
            break
        fine = tighter
        sub_solve, sub_prior, sub_probe, sub_log_prob = sub
        sub_certified = _certificate(sub_log_prob.detach(), log_prob[todo].detach(), fine)
        certified = certified.index_copy(0, todo, sub_certified)
        log_prob = log_prob.index_copy(0, todo, sub_log_prob)
        log_prior = log_prior.index_copy(0, todo, sub_prior)
        per_probe = per_probe.index_copy(0, todo, sub_probe)
        z0 = z0.index_copy(0, todo, sub_solve.z[i0])
        x = x.index_copy(0, todo, sub_solve.z[i1])
    _check_result("log p_1", log_prob, context)
    missed = certified > target
    if bool(missed.any()):
        reason = stopped or f" at the tolerance floor {floor:g}"
        warnings.warn(
            f"{context}: accuracy={target:g} not reached for {int(missed.sum())} of {batch} rows "
            f"(largest estimated error {float(certified.max()):.3g}; see result.error_estimate)"
            f"{reason}",
            RuntimeWarning,
            stacklevel=3,
        )
    stderr = None
    if strategy.kind == "hutchinson" and per_probe.shape[1] > 1:
        stderr = per_probe.std(dim=1) / math.sqrt(per_probe.shape[1])
    return LikelihoodResult(
        log_prob=log_prob,
        x=x,
        z0=z0,
        log_prior=log_prior,
        divergence_integral=per_probe.mean(dim=1),
        nfe=nfe,
        stderr=stderr,
        error_estimate=certified,
        config=fine,
    )


@with_thread_policy
def log_likelihood(
    v: VelocityField,
    x: Tensor,
    prior: Distribution | None = None,
    *,
    method: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    adjoint: bool | None = None,
    config: SolverConfig | None = None,
    accuracy: float | None = None,
    divergence: str = "exact",
    n_probes: int = 1,
    noise: str = "rademacher",
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
    params: Iterable[Tensor] | None = None,
    times: Sequence[float] | Tensor | None = None,
    error_estimate: bool = False,
    grad: bool | None = None,
    extras: Mapping[str, object] | None = None,
    progress: bool | None = None,
    return_result: bool = False,
) -> Tensor | LikelihoodResult:
    r"""The exact log-likelihood :math:`\log p_1(x)` of a continuous normalizing flow (theory §3).

    Integrates :math:`dz/dt = v(z, t)`, :math:`dA/dt = \operatorname{div} v(z, t)` from
    :math:`z_1 = x`, :math:`t = 1` down to :math:`t = 0` in one solve and returns

    .. math::

        \log p_1(x) = \log \pi(z_0) - \int_0^1 \operatorname{div} v(z_t, t)\, dt .

    Args:
        v: the velocity field ``v(x, t)``; called with ``x`` of shape ``(B, *event)`` and ``t`` of
            shape ``(B,)``. If it offers a closed-form ``divergence(x, t)`` (see
            :func:`cnftools.fields.closed_form_divergence`), the exact mode uses it.
        x: data points, shape ``(B, *event)``, finite.
        prior: :math:`\pi`, the density at :math:`t = 0`: ``None`` for :math:`\mathcal N(0, I)`, or
            a ``torch.distributions.Distribution`` with ``event_shape == x.shape[1:]`` and empty
            batch shape (e.g. a marginal's exact ``prior()``).
        method: solver (see :class:`~cnftools.SolverConfig`), default ``"dopri5"``.
        rtol: relative tolerance (adaptive methods), default ``1e-5``.
        atol: absolute tolerance (adaptive methods), default ``1e-5``.
        step_size: fixed-grid step size.
        steps: number of fixed-grid steps (alternative to ``step_size``).
        adjoint: gradients by checkpointed replay of the solver's steps (memory: one state per
            step instead of every step's graph); the same numbers as ``adjoint=False``.
        config: a :class:`~cnftools.SolverConfig`, the one carrier of all solver settings. The
            keywords ``method`` ... ``adjoint`` above and ``accuracy`` are thin sugar over it, merged
            by one rule (see :class:`~cnftools.SolverConfig`): a keyword given (not ``None``)
            overrides the config's field; ``steps``/``step_size`` replace the config's grid; an
            adaptive ``method`` drops the config's grid; a grid with an adaptive method, or a
            fixed-grid method without one, is an error.
        accuracy: ask for nats, get nats: the target absolute error of each row's
            :math:`\log p_1(x)` (e.g. ``1e-6``). The engine then chooses method and tolerance
            (:meth:`SolverConfig.accuracy_plan`), checks itself with a second, tighter solve,
            solves again only the rows whose estimated error is above the target, and reports
            each row's estimated error in ``result.error_estimate`` (an estimate, not a guaranteed
            bound: see ``docs/benchmarks.md`` for how often the true error exceeds it). Exclusive with ``method``, ``rtol``, ``atol``,
            ``step_size``, ``steps`` and ``times``.
        divergence: ``"exact"`` or ``"hutchinson"``.
        n_probes: Hutchinson probes :math:`K` (fixed for the whole solve).
        noise: Hutchinson probe distribution, ``"rademacher"`` or ``"gaussian"``.
        probes: your own fixed probes, ``(K, B, *event)`` (or ``(B, *event)``).
        generator: random generator for the probes (on ``x``'s device).
        params: the tensors the field depends on, for gradients (default: ``v.parameters()``
            when ``v`` is an ``nn.Module``); needed with ``adjoint=True`` for other callables.
        times: times in :math:`[0, 1]` at which to report :math:`\log p_t(z_t)` and :math:`z_t`
            along each trajectory (density evolution), in the result.
        error_estimate: also solve with :meth:`SolverConfig.refined` and report the difference
            per sample (in the result).
        grad: gradients of the result. ``None`` (default): only when asked for, that is when
            ``x.requires_grad`` (direct backpropagation) or ``adjoint=True`` (w.r.t. ``x`` and
            the field's parameters); otherwise the solve keeps no graph and the result has no
            ``grad_fn``, whatever the field's parameters (memory as under ``torch.no_grad()``).
            ``True``: differentiable w.r.t. the field's parameters too (maximum-likelihood
            training; by the adjoint if ``adjoint=True``). ``False``: never.
        extras: keyword arguments for a conditional field, ``v(x, t, **extras)``: tensors whose
            first dimension is ``B`` follow their rows; anything else is passed as is.
        progress: report a long solve's time reached and evaluations on stderr (after 3 s, once
            a second): ``True``, ``False``, or ``None`` (default) when stderr is a terminal.
        return_result: return a :class:`LikelihoodResult` instead of the tensor.

    Returns:
        :math:`\log p_1(x)`, shape ``(B,)``, or a :class:`LikelihoodResult`.

    Raises:
        ValueError, TypeError: bad input (non-finite ``x``, wrong prior event shape, unknown
            options), before any work.
        SolverError: the field went non-finite (rows named), the step size underflowed, or too
            many steps.

    Example:
        >>> import torch, cnftools
        >>> m, S = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
        >>> marginal = cnftools.GaussianMarginal(cnftools.OTPath(0.1), m, S)
        >>> x = torch.zeros(1, 2, dtype=torch.float64)
        >>> lp = cnftools.log_likelihood(marginal, x, rtol=1e-9, atol=1e-9)
        >>> # p_1 = N(0, (1 + 0.1^2) I): log p_1(0) = -log(2 pi 1.01)
        >>> round(float(lp[0]), 6), round(-math.log(2 * math.pi * 1.01), 6)
        (-1.847827, -1.847827)

    References:
        Chen et al. (2018), arXiv:1806.07366; Grathwohl et al. (2019), arXiv:1810.01367, eq. (4).
    """
    check_callable(v)
    x = check_batched("x", x)
    prior_ = check_prior(prior, tuple(x.shape[1:]), x.dtype, x.device)
    extras_ = check_extras(extras)
    strategy = _divergence_strategy(v, x, divergence, n_probes, noise, probes, generator)
    config_ = resolve_config(
        config,
        method=method,
        rtol=rtol,
        atol=atol,
        step_size=step_size,
        steps=steps,
        adjoint=adjoint,
        accuracy=accuracy,
    )
    check_reach(config_, x.dtype, divergence)
    times_ = _check_times(times, x)
    if config_.accuracy is not None and (times_ is not None or error_estimate):
        raise ValueError(
            "accuracy= reports its own error estimate and takes no times= or error_estimate="
        )
    params_, known = _resolve_params(v, params)
    with reporting(_check_progress(progress)):
        result = _likelihood(
            v,
            x,
            prior_,
            reverse=True,
            config=config_,
            strategy=strategy,
            params=params_,
            known=known,
            times=times_,
            error_estimate=bool(error_estimate),
            context="log_likelihood",
            grad=_check_grad(grad),
            extras=extras_,
        )
    return result if return_result else result.log_prob


def _check_draw_options(
    z0: Tensor,
    given_z0: bool,
    prior: Distribution | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    event_shape: Sequence[int] | None,
) -> None:
    """``dtype``, ``device`` and ``event_shape`` set the standard-normal draws only: given with
    ``z0`` or a ``prior`` they must agree with those draws, never be ignored silently."""
    if not given_z0 and prior is None:
        return
    source = "z0" if given_z0 else "prior.sample()"
    fix = "convert z0" if given_z0 else "build the prior in the dtype and on the device you want"
    if dtype is not None and dtype != z0.dtype:
        raise ValueError(
            f"dtype={dtype} but {source} is {z0.dtype}: dtype= sets the standard-normal draws "
            f"only; {fix}, or drop dtype="
        )
    if device is not None:
        want = torch.device(device)
        if want.type != z0.device.type or (want.index is not None and want != z0.device):
            raise ValueError(
                f"device={device!r} but {source} is on {z0.device}: device= sets the "
                f"standard-normal draws only; {fix}, or drop device="
            )
    if event_shape is not None and tuple(event_shape) != tuple(z0.shape[1:]):
        raise ValueError(
            f"event_shape={tuple(event_shape)} but {source} has event shape "
            f"{tuple(z0.shape[1:])}: event_shape= is for the standard-normal prior only; drop it"
        )


@with_thread_policy
def sample_with_log_prob(
    v: VelocityField,
    n: int | None = None,
    prior: Distribution | None = None,
    *,
    z0: Tensor | None = None,
    event_shape: Sequence[int] | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    method: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    adjoint: bool | None = None,
    config: SolverConfig | None = None,
    divergence: str = "exact",
    n_probes: int = 1,
    noise: str = "rademacher",
    params: Iterable[Tensor] | None = None,
    times: Sequence[float] | Tensor | None = None,
    error_estimate: bool = False,
    grad: bool | None = None,
    extras: Mapping[str, object] | None = None,
    progress: bool | None = None,
    return_result: bool = False,
) -> tuple[Tensor, Tensor] | LikelihoodResult:
    r"""Draw :math:`x_1` and its log-density :math:`\log p_1(x_1)` in one forward solve.

    :math:`z_0 \sim \pi`, then :math:`dz/dt = v`, :math:`dA/dt = \operatorname{div} v` from
    :math:`t = 0` to :math:`1`: :math:`x_1 = z_1`, :math:`\log p_1(x_1) = \log\pi(z_0) - A_1`.

    Args:
        v: the velocity field.
        n: number of samples (or give ``z0``).
        prior: :math:`\pi`; ``None`` for :math:`\mathcal N(0, I)` (then give ``event_shape``, or
            ``z0``). A ``Distribution`` is sampled with its own ``sample`` (global RNG).
        z0: your own draws from the prior, ``(B, *event)``, instead of ``n``.
        event_shape: the event shape for the standard-normal prior.
        dtype: dtype of the standard-normal draws (default: torch's default dtype).
        device: device of the standard-normal draws.
        generator: random generator for the standard-normal draws and Hutchinson probes.
        method, rtol, atol, step_size, steps, adjoint, config: as in :func:`log_likelihood`.
        divergence, n_probes, noise, params, times, error_estimate: as in :func:`log_likelihood`.
        grad: as in :func:`log_likelihood` (asked for when ``z0.requires_grad``).
        extras: as in :func:`log_likelihood` (rows follow the samples).
        progress: as in :func:`log_likelihood`.
        return_result: return a :class:`LikelihoodResult` (``x`` holds the samples).

    Returns:
        ``(x1, log_prob)`` of shapes ``(n, *event)`` and ``(n,)``, or a :class:`LikelihoodResult`.

    Example:
        >>> import torch, cnftools
        >>> marginal = cnftools.GaussianMarginal(
        ...     cnftools.OTPath(0.1),
        ...     torch.zeros(2, dtype=torch.float64),
        ...     torch.eye(2, dtype=torch.float64),
        ... )
        >>> x1, lp = cnftools.sample_with_log_prob(
        ...     marginal, 4, event_shape=(2,), dtype=torch.float64
        ... )
        >>> torch.allclose(lp, marginal.log_prob(x1, 1.0), atol=1e-4)
        True

    References:
        Chen et al. (2018), arXiv:1806.07366, §4.
    """
    check_callable(v)
    given_z0 = z0 is not None
    if z0 is not None:
        if n is not None:
            raise ValueError("give either n or z0, not both")
        z0 = check_batched("z0", z0)
        event = tuple(z0.shape[1:])
    else:
        n = check_int("n (or give z0)", n, low=1)
        if prior is None:
            if event_shape is None:
                raise ValueError("the standard-normal prior needs event_shape=(d,) (or give z0)")
            event = check_event_shape("event_shape", event_shape)
        else:
            if not isinstance(prior, Distribution):
                raise TypeError("prior must be None or a torch.distributions.Distribution")
            event = tuple(prior.event_shape)
    prior_ = check_prior(prior, event)
    if z0 is None:
        assert n is not None
        if prior_ is None:
            dev = torch.device(device) if device is not None else None
            z0 = torch.randn((n, *event), generator=generator, dtype=dtype, device=dev)
        else:
            z0 = prior_.sample((n,))
            if z0.shape != (n, *event):
                raise ValueError(f"prior.sample((n,)) returned shape {tuple(z0.shape)}")
        z0 = check_batched("z0", z0)
    _check_draw_options(z0, given_z0, prior_, dtype, device, event_shape)
    check_prior(prior_, event, z0.dtype, z0.device)
    extras_ = check_extras(extras)
    strategy = _divergence_strategy(v, z0, divergence, n_probes, noise, None, generator)
    config_ = resolve_config(
        config,
        method=method,
        rtol=rtol,
        atol=atol,
        step_size=step_size,
        steps=steps,
        adjoint=adjoint,
    )
    if config_.accuracy is not None:
        raise ValueError("accuracy applies to log_likelihood only")
    check_reach(config_, z0.dtype, divergence)
    times_ = _check_times(times, z0)
    params_, known = _resolve_params(v, params)
    with reporting(_check_progress(progress)):
        result = _likelihood(
            v,
            z0,
            prior_,
            reverse=False,
            config=config_,
            strategy=strategy,
            params=params_,
            known=known,
            times=times_,
            error_estimate=bool(error_estimate),
            context="sample_with_log_prob",
            grad=_check_grad(grad),
            extras=extras_,
        )
    return result if return_result else (result.x, result.log_prob)


@with_thread_policy
def sample(
    v: VelocityField,
    x0: Tensor,
    *,
    method: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    adjoint: bool | None = None,
    config: SolverConfig | None = None,
    params: Iterable[Tensor] | None = None,
    times: Sequence[float] | Tensor | None = None,
    grad: bool | None = None,
    extras: Mapping[str, object] | None = None,
    return_result: bool = False,
) -> Tensor | SampleResult:
    r"""Integrate :math:`dz/dt = v(z, t)` from :math:`z_0 = x_0` at :math:`t = 0` to :math:`t = 1`.

    Args:
        v: the velocity field.
        x0: starting points (noise), shape ``(B, *event)``.
        method, rtol, atol, step_size, steps, adjoint, config: as in :func:`log_likelihood`.
        params: the field's tensors, for adjoint gradients of a non-``nn.Module`` callable.
        times: times in :math:`[0, 1]` at which to record the trajectory :math:`z_t`; read it as
            ``result.trajectory``, shape ``(T, B, *event)`` in the order given, with
            ``return_result=True``. (Without ``return_result``, ``times=`` still returns the
            trajectory instead of :math:`z_1`, with a ``DeprecationWarning``: that form goes in
            the next release.)
        grad: as in :func:`log_likelihood` (asked for when ``x0.requires_grad``).
        extras: as in :func:`log_likelihood`.
        return_result: return a :class:`SampleResult` (samples, NFE, trajectory, config).

    Returns:
        The plain form: :math:`z_1`, shape ``(B, *event)``, always a tensor. With
        ``return_result=True``: a :class:`SampleResult`.

    Example:
        >>> import torch, cnftools
        >>> v = lambda x, t: -x  # z_t = z_0 e^{-t}
        >>> x0 = torch.ones(2, 3, dtype=torch.float64)
        >>> x1 = cnftools.sample(v, x0, rtol=1e-10, atol=1e-10)
        >>> float((x1 - x0 * math.exp(-1)).abs().max()) < 1e-9
        True
        >>> result = cnftools.sample(v, x0, times=[0.0, 0.5, 1.0], return_result=True)
        >>> result.trajectory.shape, result.x.shape
        (torch.Size([3, 2, 3]), torch.Size([2, 3]))

    References:
        Lipman et al. (2022), arXiv:2210.02747, §2 (sampling by solving the flow ODE).
    """
    check_callable(v)
    x0 = check_batched("x0", x0)
    extras_ = check_extras(extras)
    config_ = resolve_config(
        config,
        method=method,
        rtol=rtol,
        atol=atol,
        step_size=step_size,
        steps=steps,
        adjoint=adjoint,
    )
    if config_.accuracy is not None:
        raise ValueError("accuracy applies to log_likelihood only")
    times_ = _check_times(times, x0)
    params_, known = _resolve_params(v, params)
    nfe = NFE()
    graph = _wants_graph(
        v, x0, config_, params_, grad=_check_grad(grad), known=known, t_start=0.0, extras=extras_
    )
    if graph and config_.adjoint and not known:
        raise ValueError("adjoint=True needs params= for a field that is not an nn.Module")
    grid, index = _time_grid(times_, x0, reverse=False)
    solve = _augmented_solve(
        v,
        x0,
        grid,
        None,
        config_,
        params_,
        graph=graph,
        nfe=nfe,
        phase="forward",
        context="sample",
        extras=extras_,
    )
    x1 = solve.z[-1]
    trajectory = solve.z[index] if times_ is not None else None
    if return_result:
        times_t = None if times_ is None else torch.tensor(times_, dtype=x0.dtype, device=x0.device)
        return SampleResult(x1, nfe, times_t, trajectory, config_)
    if trajectory is not None:
        warnings.warn(
            "sample(..., times=...) returning the trajectory instead of z_1 is deprecated and will "
            "be removed in the next release: pass return_result=True and read result.trajectory "
            "(z_t at the times, (T, B, *event)) and result.x (z_1)",
            DeprecationWarning,
            stacklevel=2,
        )
        return trajectory
    return x1
