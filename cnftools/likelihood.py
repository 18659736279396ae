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

The divergence is exact by default (``estimator=None``): the field's closed form when it offers
one (:func:`cnftools.fields.closed_form_divergence`, e.g. the marginal fields of
:mod:`cnftools.marginals`), otherwise the trace of the Jacobian from one forward pass of the field
and :math:`d` vector-Jacobian products (:mod:`cnftools.divergences`). ``estimator=Hutchinson(K)``
(:mod:`cnftools.estimators`) uses :math:`K` probe vectors :math:`\varepsilon_k` drawn once and held
fixed for the whole solve, integrates each probe's estimate separately, and reports the per-sample
standard error of their mean.

Every function returns one result dataclass (:class:`LikelihoodResult`, :class:`SampleResult`);
solver settings are one :class:`~cnftools.SolverConfig` with the keywords ``method``, ``rtol``,
``atol`` (and ``accuracy``) as sugar over it (:func:`cnftools._ode.resolve_config`).

Gradients only when asked: by default the solve keeps no graph, whatever the field's parameters
(memory as under ``torch.no_grad()``). Asked means ``x.requires_grad`` or ``grad=True`` (direct
backpropagation through the solver) or ``SolverConfig(adjoint=True)`` (checkpointed replay of the same steps:
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

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Unpack

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from cnftools._accuracy import to_accuracy
from cnftools._checks import check_batched
from cnftools._divergence_evaluator import DivergenceEvaluator
from cnftools._likelihood_engine import (
    LikelihoodResult,
    Problem,
    SampleResult,
    augmented_solve,
    rows_stand_alone,
    solve_likelihood,
    time_grid,
    wants_graph,
)
from cnftools._ode import NFE, SolverConfig, SolverKeywords, check_reach, resolve_config
from cnftools._progress import reporting
from cnftools._resources import with_thread_policy
from cnftools.estimators import Estimator, Hutchinson, check_estimator
from cnftools.fields import VelocityField, check_callable, check_extras

__all__ = [
    "LikelihoodResult",
    "SampleResult",
    "check_prior",
    "log_likelihood",
    "sample",
    "sample_with_log_prob",
]


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


def _field_params(v: object) -> tuple[tuple[Tensor, ...], bool]:
    """The field's parameters, and whether they are known (False for a plain closure)."""
    owner = v if isinstance(v, nn.Module) else getattr(v, "__self__", None)
    if isinstance(owner, nn.Module):
        return tuple(owner.parameters()), True
    return (), False


def _check_progress(progress: object) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {type(progress).__name__}")
    return progress


def _problem(
    v: VelocityField,
    start: Tensor,
    prior: Distribution | None,
    estimator: Estimator | None,
    *,
    reverse: bool,
    context: str,
    extras: dict,
    divergence: bool = True,
) -> Problem:
    """The checked problem of one public call: the divergence evaluator (Hutchinson's probes
    drawn once, for the whole call; none for plain sampling) and whether the field's rows stand
    alone (asked once, however many solves the call makes)."""
    evaluator = DivergenceEvaluator.for_spec(v, estimator, start) if divergence else None
    params, known = _field_params(v)
    t_start = 1.0 if reverse else 0.0
    compact = rows_stand_alone(v, start.detach(), t_start, extras, context)
    return Problem(v, start, prior, evaluator, params, known, reverse, context, extras, compact)


def _run(
    problem: Problem,
    config: SolverConfig,
    grad: bool | None,
    times: list[float] | None,
    progress: bool | None,
) -> LikelihoodResult:
    """The solve of :func:`log_likelihood` and :func:`sample_with_log_prob`."""
    with reporting(progress):
        nfe = NFE()
        graph = wants_graph(problem, config, grad)
        if config.accuracy is not None:
            return to_accuracy(problem, config, graph=graph, nfe=nfe)
        return solve_likelihood(problem, config, graph=graph, nfe=nfe, times=times)


def _likelihood_options(
    estimator: object,
    config: SolverConfig | None,
    solver_keywords: dict,
    like: Tensor,
    times: object,
    grad: object,
    progress: object,
) -> tuple[Estimator | None, SolverConfig, list[float] | None, bool | None, bool | None]:
    """The options :func:`log_likelihood` and :func:`sample_with_log_prob` share, checked."""
    spec = check_estimator(estimator)
    config_ = resolve_config(config, **solver_keywords)
    check_reach(config_, like.dtype, hutchinson=isinstance(spec, Hutchinson))
    times_ = _check_times(times, like)
    if config_.accuracy is not None and (times_ is not None or config_.error_estimate):
        raise ValueError(
            "accuracy= reports its own error estimate and takes no times= or error_estimate="
        )
    return spec, config_, times_, _check_grad(grad), _check_progress(progress)


@with_thread_policy
def log_likelihood(
    v: VelocityField,
    x: Tensor,
    prior: Distribution | None = None,
    *,
    estimator: Estimator | None = None,
    config: SolverConfig | None = None,
    times: Sequence[float] | Tensor | None = None,
    grad: bool | None = None,
    extras: Mapping[str, object] | None = None,
    progress: bool | None = None,
    **solver: Unpack[SolverKeywords],
) -> LikelihoodResult:
    r"""The exact log-likelihood :math:`\log p_1(x)` of a continuous normalizing flow (theory §3).

    Integrates :math:`dz/dt = v(z, t)`, :math:`dA/dt = \operatorname{div} v(z, t)` from
    :math:`z_1 = x`, :math:`t = 1` down to :math:`t = 0` in one solve and returns

    .. math::

        \log p_1(x) = \log \pi(z_0) - \int_0^1 \operatorname{div} v(z_t, t)\, dt .

    Args:
        v: the velocity field ``v(x, t)``; called with ``x`` of shape ``(B, *event)`` and ``t`` of
            shape ``(B,)``.
        x: data points, shape ``(B, *event)``, finite.
        prior: :math:`\pi`, the density at :math:`t = 0`: ``None`` for :math:`\mathcal N(0, I)`, or
            a ``torch.distributions.Distribution`` with ``event_shape == x.shape[1:]`` and empty
            batch shape (e.g. a marginal's exact ``prior()``).
        estimator: how the divergence is taken (:mod:`cnftools.estimators`): ``None`` (default)
            the field's closed form if it offers one, else ``Exact()``; ``Exact(strategy)``;
            ``Hutchinson(n_probes, noise, probes, generator)`` (probes fixed for the whole solve;
            ``result.stderr`` for :math:`K \ge 2`); ``ClosedForm()``.
        config: a :class:`~cnftools.SolverConfig`, the one carrier of solver settings (method,
            tolerances, ``steps`` of a fixed grid, ``adjoint``, ``max_steps``,
            ``error_estimate``, ``accuracy``).
        **solver: keyword sugar over ``config`` (:class:`~cnftools._ode.SolverKeywords`, the same
            four names in every entry point, merged by one rule): ``method``, ``rtol``, ``atol``
            (an adaptive ``method`` drops the config's grid) and ``accuracy``, which asks for
            nats and gets nats: the target absolute error of each row's
            :math:`\log p_1(x)` (e.g. ``1e-6``). The engine then chooses method and tolerance
            (:meth:`SolverConfig.accuracy_plan`), checks itself with a second, tighter solve,
            solves again only the rows whose estimated error is above the target, and reports
            each row's estimated error in ``result.error_estimate`` (an estimate, not a
            guaranteed bound: ``docs/benchmarks.md`` states how often the true error exceeds it).
            Exclusive with ``method``, ``rtol``, ``atol`` and ``times``.
        times: times in :math:`[0, 1]` at which to report :math:`\log p_t(z_t)` and :math:`z_t`
            along each trajectory (density evolution): ``result.log_prob_t``,
            ``result.trajectory``.
        grad: gradients of the result. ``None`` (default): only when asked for, that is when
            ``x.requires_grad`` (direct backpropagation) or ``config.adjoint`` (w.r.t. ``x`` and
            the field's parameters); otherwise the solve keeps no graph and the result has no
            ``grad_fn``, whatever the field's parameters (memory as under ``torch.no_grad()``).
            ``True``: differentiable w.r.t. the field's parameters too (maximum-likelihood
            training; by the adjoint if ``config.adjoint``; the adjoint needs an ``nn.Module``
            field). ``False``: never.
        extras: keyword arguments for a conditional field, ``v(x, t, **extras)``: tensors whose
            first dimension is ``B`` follow their rows; anything else is passed as is.
        progress: report a long solve's time reached and evaluations on stderr (after 3 s, once
            a second): ``True``, ``False``, or ``None`` (default) when stderr is a terminal.

    Returns:
        A :class:`LikelihoodResult`: ``log_prob`` :math:`\log p_1(x)` of shape ``(B,)``, the
        noise-side points, the evaluations, and what was asked for (times, error estimates).

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
        >>> result = cnftools.log_likelihood(marginal, x, rtol=1e-9, atol=1e-9)
        >>> # p_1 = N(0, (1 + 0.1^2) I): log p_1(0) = -log(2 pi 1.01)
        >>> round(float(result.log_prob[0]), 6), round(-math.log(2 * math.pi * 1.01), 6)
        (-1.847827, -1.847827)

    References:
        Chen et al. (2018), arXiv:1806.07366; Grathwohl et al. (2019), arXiv:1810.01367, eq. (4).
    """
    check_callable(v)
    x = check_batched("x", x)
    prior_ = check_prior(prior, tuple(x.shape[1:]), x.dtype, x.device)
    extras_ = check_extras(extras)
    spec, config_, times_, grad_, progress_ = _likelihood_options(
        estimator, config, solver, x, times, grad, progress
    )
    problem = _problem(v, x, prior_, spec, reverse=True, context="log_likelihood", extras=extras_)
    return _run(problem, config_, grad_, times_, progress_)


@with_thread_policy
def sample_with_log_prob(
    v: VelocityField,
    z0: Tensor,
    prior: Distribution | None = None,
    *,
    estimator: Estimator | None = None,
    config: SolverConfig | None = None,
    times: Sequence[float] | Tensor | None = None,
    grad: bool | None = None,
    extras: Mapping[str, object] | None = None,
    progress: bool | None = None,
    **solver: Unpack[SolverKeywords],
) -> LikelihoodResult:
    r"""Samples :math:`x_1` and their log-density :math:`\log p_1(x_1)` in one forward solve.

    From draws :math:`z_0 \sim \pi`, integrates :math:`dz/dt = v`,
    :math:`dA/dt = \operatorname{div} v` from :math:`t = 0` to :math:`1`: :math:`x_1 = z_1`,
    :math:`\log p_1(x_1) = \log\pi(z_0) - A_1`.

    Args:
        v: the velocity field.
        z0: draws from the prior, ``(B, *event)`` (e.g. ``torch.randn(n, d)`` for the standard
            normal, or ``prior.sample((n,))``): you choose the generator, dtype and device.
        prior: :math:`\pi`, the density ``z0`` was drawn from; ``None`` for
            :math:`\mathcal N(0, I)`.
        estimator, config, times, progress: as in :func:`log_likelihood`.
        grad: as in :func:`log_likelihood` (asked for when ``z0.requires_grad``).
        extras: as in :func:`log_likelihood` (rows follow the samples).
        **solver: ``method``, ``rtol``, ``atol`` as in :func:`log_likelihood` (``accuracy`` is
            refused: the error of a sample's log-density is the solve's).

    Returns:
        A :class:`LikelihoodResult`: ``x`` the samples ``(B, *event)``, ``log_prob`` their
        log-density ``(B,)``, ``z0`` the draws.

    Example:
        >>> import torch, cnftools
        >>> marginal = cnftools.GaussianMarginal(
        ...     cnftools.OTPath(0.1),
        ...     torch.zeros(2, dtype=torch.float64),
        ...     torch.eye(2, dtype=torch.float64),
        ... )
        >>> z0 = torch.randn(4, 2, dtype=torch.float64)
        >>> result = cnftools.sample_with_log_prob(marginal, z0)
        >>> torch.allclose(result.log_prob, marginal.log_prob(result.x, 1.0), atol=1e-4)
        True

    References:
        Chen et al. (2018), arXiv:1806.07366, §4.
    """
    check_callable(v)
    z0 = check_batched("z0", z0)
    prior_ = check_prior(prior, tuple(z0.shape[1:]), z0.dtype, z0.device)
    extras_ = check_extras(extras)
    spec, config_, times_, grad_, progress_ = _likelihood_options(
        estimator, config, solver, z0, times, grad, progress
    )
    if config_.accuracy is not None:
        raise ValueError(
            "accuracy= applies to log_likelihood and dataset_nll only (a sample's log-density "
            "error is the solve's): set rtol/atol"
        )
    problem = _problem(
        v, z0, prior_, spec, reverse=False, context="sample_with_log_prob", extras=extras_
    )
    return _run(problem, config_, grad_, times_, progress_)


@with_thread_policy
def sample(
    v: VelocityField,
    x0: Tensor,
    *,
    config: SolverConfig | None = None,
    times: Sequence[float] | Tensor | None = None,
    grad: bool | None = None,
    extras: Mapping[str, object] | None = None,
    progress: bool | None = None,
    **solver: Unpack[SolverKeywords],
) -> SampleResult:
    r"""Integrate :math:`dz/dt = v(z, t)` from :math:`z_0 = x_0` at :math:`t = 0` to :math:`t = 1`.

    Args:
        v: the velocity field.
        x0: starting points (noise), shape ``(B, *event)``.
        config, progress: as in :func:`log_likelihood`.
        times: times in :math:`[0, 1]` at which to record the trajectory :math:`z_t`:
            ``result.trajectory``, shape ``(T, B, *event)`` in the order given.
        grad: as in :func:`log_likelihood` (asked for when ``x0.requires_grad``).
        extras: as in :func:`log_likelihood`.
        **solver: ``method``, ``rtol``, ``atol`` as in :func:`log_likelihood`.

    Returns:
        A :class:`SampleResult`: ``x`` (:math:`z_1`, ``(B, *event)``), the evaluations, and the
        trajectory at ``times``.

    Example:
        >>> import torch, cnftools
        >>> v = lambda x, t: -x  # z_t = z_0 e^{-t}
        >>> x0 = torch.ones(2, 3, dtype=torch.float64)
        >>> x1 = cnftools.sample(v, x0, rtol=1e-10, atol=1e-10).x
        >>> float((x1 - x0 * math.exp(-1)).abs().max()) < 1e-9
        True
        >>> result = cnftools.sample(v, x0, times=[0.0, 0.5, 1.0])
        >>> result.trajectory.shape, result.x.shape
        (torch.Size([3, 2, 3]), torch.Size([2, 3]))

    References:
        Lipman et al. (2022), arXiv:2210.02747, §2 (sampling by solving the flow ODE).
    """
    check_callable(v)
    x0 = check_batched("x0", x0)
    extras_ = check_extras(extras)
    config_ = resolve_config(config, **solver)
    if config_.accuracy is not None or config_.error_estimate:
        raise ValueError(
            "accuracy= and error_estimate apply to the likelihood functions only; sample() "
            "integrates the points alone"
        )
    check_reach(config_, x0.dtype)
    times_ = _check_times(times, x0)
    problem = _problem(
        v, x0, None, None, reverse=False, context="sample", extras=extras_, divergence=False
    )
    nfe = NFE()
    graph = wants_graph(problem, config_, _check_grad(grad))
    grid, index = time_grid(times_, x0, reverse=False)
    with reporting(_check_progress(progress)):
        solve = augmented_solve(problem, grid, config_, graph=graph, nfe=nfe, phase="forward")
    trajectory = times_t = None
    if times_ is not None:
        times_t = torch.tensor(times_, dtype=x0.dtype, device=x0.device)
        trajectory = solve.z[index]
    return SampleResult(solve.z[-1], nfe, times_t, trajectory, config_)
