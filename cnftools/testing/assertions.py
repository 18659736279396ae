r"""Explaining assertions for users' own test suites (no ``hypothesis`` needed).

Each raises ``AssertionError`` with a message that explains the failure: the worst batch row, the
numbers on both sides and the tolerance. A NaN or inf (in the field, its Jacobian, the density or
the expected value, even in one row) is a failure, never a pass: it is checked before any
tolerance test, since a comparison with NaN is False.

- :func:`assert_theorem3`: :math:`\tfrac{d}{dt}\psi_t(x_0) = u_t(\psi_t(x_0)|x_1)` for a path;
- :func:`assert_generates`: the continuity equation (log form) for a density ``log_prob`` and a
  field ``v``;
- :func:`assert_divergence_matches_jacobian`: a divergence against the trace of the full autograd
  Jacobian (:func:`jacobian_trace`, the reference trace used across cnftools' own checks);
- :func:`assert_log_likelihood_close`: the ODE log-likelihood against a closed form.

Theory sections cited here (pages under ``docs/theory/``):

- §4: ``docs/theory/divergence-and-continuity.md#continuity-equation``
- §9: ``docs/theory/marginals.md#gaussian-data``
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from cnftools._checks import as_time, check_batched, check_tolerance, quiet_jvp
from cnftools._ode import SolverConfig, SolverError, resolve_config
from cnftools.continuity import continuity_terms
from cnftools.divergences import divergence as exact_divergence
from cnftools.divergences import jacobian
from cnftools.estimators import Estimator, Exact, Hutchinson, check_estimator
from cnftools.fields import closed_form_divergence
from cnftools.likelihood import log_likelihood
from cnftools.paths import GaussianPath

__all__ = [
    "assert_divergence_matches_jacobian",
    "assert_generates",
    "assert_log_likelihood_close",
    "assert_theorem3",
    "jacobian_trace",
]


def _default_tolerance(dtype: torch.dtype, float64: float, float32: float) -> float:
    return float64 if dtype == torch.float64 else float32


def assert_theorem3(
    path: GaussianPath,
    x1: Tensor,
    t: float | Tensor,
    x0: Tensor | None = None,
    *,
    rtol: float | None = None,
    generator: torch.Generator | None = None,
) -> None:
    r"""Assert Theorem 3 for ``path``: :math:`\tfrac{d}{dt}\psi_t(x_0) = u_t(\psi_t(x_0)|x_1)`.

    The left side comes from forward-mode autograd through ``path.flow_map``, the right from
    ``path.conditional_velocity``; they are independent computations.

    Args:
        path: the path under test.
        x1: data points, shape ``(B, *event)``.
        t: time(s), float, 0-dim or ``(B,)``.
        x0: noise points (default: standard normal draws like ``x1``, from ``generator``).
        rtol: relative tolerance on max|Δ| / max|u| (default 1e-10 in float64, 1e-4 in float32);
            a finite number ``>= 0``.
        generator: random generator (on ``x1``'s device) for the default ``x0``, so that a
            failure message can be reproduced exactly.

    Raises:
        AssertionError: with the error, the tolerance and the worst batch row.
    """
    rtol = check_tolerance("rtol", rtol)
    x1 = check_batched("x1", x1)
    if x0 is None:
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
    if rtol is None:
        rtol = _default_tolerance(x1.dtype, 1e-10, 1e-4)
    t = torch.as_tensor(t, dtype=x1.dtype, device=x1.device).expand(x1.shape[0]).clone()
    psi, dpsi = quiet_jvp(lambda s: path.flow_map(x0, s, x1), (t,), (torch.ones_like(t),))
    u = path.conditional_velocity(psi, t, x1)
    _require_finite(f"ψ_t(x0) of {path!r}", psi, t)
    _require_finite(f"dψ_t/dt of {path!r}", dpsi, t)
    _require_finite(f"u_t(ψ_t|x1) of {path!r}", u, t)
    scale = float(u.abs().max().clamp_min(torch.finfo(u.dtype).tiny))
    per_row = (dpsi - u).reshape(x1.shape[0], -1).abs().max(dim=1).values
    error = float(per_row.max()) / scale
    if not error <= rtol:
        row = int(per_row.argmax())
        raise AssertionError(
            f"Theorem 3 fails for {path!r}: max|dψ/dt - u_t(ψ_t|x1)| / max|u| = {error:.3e} "
            f"> rtol {rtol:.1e}; worst row {row} at t = {float(t[row])}"
        )


def _time_batch(t: float | Tensor, x: Tensor) -> Tensor:
    return as_time(t, x).clone()


def _row_message(row: int, t: Tensor) -> str:
    return f"row {row} (t = {float(t[row]):.6g})"


def _require_finite(what: str, value: object, t: Tensor | None) -> None:
    """Fail (``AssertionError``) when ``value`` has a NaN or inf, naming the rows: a comparison
    with NaN is False, so a non-finite value must never reach a tolerance test."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return
    bad = ~torch.isfinite(value.detach()).reshape(value.shape[0], -1).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        first = int(rows[0])
        where = f"row {first}" if t is None else _row_message(first, t)
        raise AssertionError(
            f"{what} is not finite (NaN or inf) in {rows.numel()} of {value.shape[0]} rows, "
            f"first at {where}: nothing can be compared there; the field (or what it is checked "
            "against) is broken at these points"
        )


def jacobian_trace(v: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor) -> Tensor:
    r"""The exact divergence :math:`\mathrm{tr}\,\partial v/\partial x` from the full Jacobian.

    The reference implementation the assertions compare against: one reverse-mode pass per
    output coordinate (``d`` in all) builds every row's full ``(d, d)`` Jacobian, and its trace
    is summed. Assumes the batch rows of ``v`` are independent (true for any per-sample field).

    Args:
        v: a field ``v(x, t)``.
        x: points, shape ``(B, *event)``.
        t: times, shape ``(B,)``.

    Returns:
        Shape ``(B,)``.
    """
    return _full_jacobian(v, x, t)[1]


def _full_jacobian(
    v: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-row Jacobians ``(B, d, d)`` (:func:`cnftools.divergences.jacobian`; a field constant in
    ``x`` has Jacobian 0 here) and their traces ``(B,)``."""
    try:
        jac = jacobian(v, x, t, allow_constant=True)
    except ValueError as error:
        if "returned shape" not in str(error):
            raise
        raise AssertionError(f"{error} (a velocity field must return the shape of x)") from error
    return jac, torch.diagonal(jac, dim1=1, dim2=2).sum(dim=1)


def assert_divergence_matches_jacobian(
    v: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: float | Tensor,
    divergence: Callable[[Tensor, Tensor], Tensor] | Tensor | None = None,
    *,
    rtol: float | None = None,
    atol: float | None = None,
) -> None:
    r"""Assert that a divergence equals :math:`\mathrm{tr}\,\partial v/\partial x` of the full Jacobian.

    The reference is :func:`jacobian_trace`: ``d`` reverse-mode passes, no shortcuts. What is
    checked is, in order of preference: ``divergence`` when given (a callable
    ``divergence(x, t) -> (B,)`` or a ``(B,)`` tensor), else the field's closed-form divergence
    (:func:`cnftools.fields.closed_form_divergence`, e.g. a marginal's ``divergence``), else
    cnftools' exact divergence (:func:`cnftools.divergences.divergence`).

    The test is :math:`|\mathrm{div} - \mathrm{tr} J| \le \mathrm{atol} + \mathrm{rtol}\,
    \max(|\mathrm{tr} J|, \lVert J \rVert_{\max}\, d)` per row: the scale is the size of the
    Jacobian's entries times ``d``, so a trace that cancels to near zero is not held to an
    impossible relative bound.

    Args:
        v: the field ``v(x, t)``; its batch rows must be independent.
        x: points, shape ``(B, *event)``.
        t: time(s) in [0, 1]: float, 0-dim or ``(B,)``.
        divergence: what to check (see above).
        rtol: relative tolerance (default 1e-10 in float64, 1e-4 in float32: roundoff of a sum
            of ``d`` products, amplified by the conditioning of the field).
        atol: absolute tolerance (default 0). Tolerances must be finite numbers ``>= 0``
            (a NaN would make every comparison pass).

    Raises:
        AssertionError: naming the worst row, its time, both divergences, their difference, the
            Jacobian's diagonal (for ``d <= 8``) and the tolerance.

    Example:
        >>> import torch
        >>> from cnftools.testing import assert_divergence_matches_jacobian
        >>> A = torch.tensor([[1.0, 2.0], [0.0, -3.0]], dtype=torch.float64)
        >>> v = lambda x, t: x @ A.T
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> assert_divergence_matches_jacobian(
        ...     v, x, 0.5, lambda x, t: torch.full((4,), -2.0, dtype=x.dtype)
        ... )
        >>> assert_divergence_matches_jacobian(v, x, 0.5, torch.zeros(4, dtype=x.dtype))
        Traceback (most recent call last):
        ...
        AssertionError: divergence does not match the trace of the autograd Jacobian ...
    """
    rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
    x = check_batched("x", x)
    tt = _time_batch(t, x)
    if rtol is None:
        rtol = _default_tolerance(x.dtype, 1e-10, 1e-4)
    if atol is None:
        atol = 0.0
    source = "the given divergence"
    if divergence is None:
        divergence, source = _default_divergence(v)
    if callable(divergence):
        with torch.enable_grad():
            got = divergence(x, tt)
    else:
        got = divergence
    got = torch.as_tensor(got).detach()
    if got.shape != (x.shape[0],):
        raise AssertionError(
            f"{source} has shape {tuple(got.shape)}; a divergence must have shape (B,) = "
            f"({x.shape[0]},)"
        )
    with torch.no_grad():
        _require_finite("the field v(x, t)", v(x, tt), tt)
    jac, trace = _full_jacobian(v, x, tt)
    _require_finite("the field's Jacobian ∂v/∂x (from autograd)", jac, tt)
    got = got.to(trace.dtype)
    d = jac.shape[1]
    scale = torch.maximum(trace.abs(), jac.abs().amax(dim=(1, 2)) * d)
    excess = (got - trace).abs() - (atol + rtol * scale)
    if not bool(torch.isfinite(got).all()) or bool((excess > 0).any()):
        row = int(torch.nan_to_num(excess, nan=math.inf).argmax())
        diagonal = ""
        if d <= 8:
            values = ", ".join(f"{float(a):.6g}" for a in torch.diagonal(jac[row]))
            diagonal = f"; diag(J) = [{values}]"
        raise AssertionError(
            f"divergence does not match the trace of the autograd Jacobian at "
            f"{_row_message(row, tt)}: {source} = {float(got[row]):.12g}, tr J = "
            f"{float(trace[row]):.12g}, |difference| = {float((got - trace)[row].abs()):.3e} > "
            f"atol + rtol·scale = {atol:.1e} + {rtol:.1e}·{float(scale[row]):.3e}{diagonal}"
        )


_EXACT = Exact()


def _default_divergence(
    v: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Callable[[Tensor, Tensor], Tensor], str]:

    closed = closed_form_divergence(v)
    if closed is not None:
        return closed, "the field's closed-form divergence"
    return (lambda x, t: exact_divergence(v, x, t)), "cnftools.divergence(v, x, t)"


def assert_generates(
    log_prob: Callable[[Tensor, Tensor], Tensor],
    v: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    t: float | Tensor,
    *,
    rtol: float | None = None,
    estimator: Estimator = _EXACT,
) -> None:
    r"""Assert that ``v`` generates the density path ``log_prob``: the continuity equation holds.

    Uses the log form of theory §4 (:mod:`cnftools.continuity`),

    .. math::

        r(x, t) = \partial_t \log p_t(x) + \nabla\cdot v_t(x) + v_t(x)\cdot\nabla_x \log p_t(x),

    and requires, per row, the relative residual
    :math:`|r| / (|\partial_t \log p| + |\nabla\cdot v| + |v\cdot\nabla \log p|) \le` ``rtol``
    (the same number as :func:`cnftools.continuity.continuity_relative_residual`).

    Args:
        log_prob: ``log_prob(x, t) -> (B,)``, :math:`\log p_t(x)` written in torch operations
            (differentiable in ``x`` and in ``t``, which arrives with shape ``(B,)``).
        v: the field ``v(x, t)``.
        x: points, shape ``(B, *event)`` (where the density is not negligible, e.g. samples of
            :math:`p_t`).
        t: time(s) in [0, 1]: float, 0-dim or ``(B,)``; avoid the singular ends of your path.
        rtol: tolerance on the relative residual (default 1e-9 in float64, 1e-3 in float32: the
            closed-form cases reach about 1e-14 and 1e-6, and a wrong field gives order one; the
            margin covers fields whose terms nearly cancel). A finite number ``>= 0``.
        estimator: how :math:`\nabla\cdot v` is computed: ``Exact()`` (autograd, default; an
            independent check of the field) or ``ClosedForm()`` (the field's own ``divergence``);
            see :func:`cnftools.continuity.continuity_terms`.

    Raises:
        AssertionError: naming the worst row, its time, the residual, the relative residual, the
            three terms and the tolerance.

    Example:
        >>> import torch, cnftools
        >>> from cnftools.testing import assert_generates
        >>> path = cnftools.OTPath(sigma_min=0.1)
        >>> x1 = torch.randn(8, 2, dtype=torch.float64)
        >>> x = path.sample(0.5, x1)
        >>> log_p = lambda x, t: path.log_prob(x, t, x1)
        >>> assert_generates(log_p, lambda x, t: path.conditional_velocity(x, t, x1), x, 0.5)
        >>> assert_generates(log_p, lambda x, t: 1.1 * path.conditional_velocity(x, t, x1), x, 0.5)
        Traceback (most recent call last):
        ...
        AssertionError: the field does not generate the path (continuity equation fails) ...
    """

    rtol = check_tolerance("rtol", rtol)
    x = check_batched("x", x)
    tt = _time_batch(t, x)
    if rtol is None:
        rtol = _default_tolerance(x.dtype, 1e-9, 1e-3)
    try:
        terms = continuity_terms(log_prob, v, x, tt, estimator=estimator)
    except ValueError as error:
        if "non-finite" not in str(error):
            raise
        raise AssertionError(
            f"the continuity equation cannot be checked: {error} (at t = {float(tt[0]):.6g}); "
            "the field or the density is broken at these points"
        ) from error
    residual, scale = terms.residual, terms.scale
    relative = torch.where(
        scale > 0, residual.abs() / torch.where(scale > 0, scale, torch.ones_like(scale)), 0
    )
    # a NaN or inf anywhere is a failure, never a pass (a comparison with NaN is False)
    finite = torch.isfinite(residual) & torch.isfinite(scale)
    relative = torch.where(finite, torch.nan_to_num(relative, nan=math.inf), math.inf)
    if bool((relative > rtol).any()):
        row = int(relative.argmax())
        raise AssertionError(
            f"the field does not generate the path (continuity equation fails) at "
            f"{_row_message(row, tt)}: residual r = {float(residual[row]):.6g}, |r| / scale = "
            f"{float(relative[row]):.3e} > rtol {rtol:.1e}; terms: d/dt log p = "
            f"{float(terms.time_derivative[row]):.10g}, div v = {float(terms.divergence[row]):.10g}, "
            f"v·grad log p = {float(terms.transport[row]):.10g} "
            f"({int((relative > rtol).sum())} of {x.shape[0]} rows fail)"
        )


_FAILURES: dict[str, list[float]] = {}  # test id -> [failed ODE checks, seconds spent in them]
SHRINK_NOTICE_AFTER = 3
"""Failures of an ODE-backed assertion within one test after which the kit says, on stderr, that
hypothesis is shrinking (a first failure and its final replay make two even without shrinking)."""


def _say_when_shrinking(assertion: str, seconds: float) -> None:
    """Inside a hypothesis test, print on stderr what is happening when an ODE-backed assertion
    keeps failing: hypothesis is shrinking the example, one ODE solve per attempt, which can take
    minutes without a word. Printed at the third failure of the test and then every 20."""
    try:
        from hypothesis.control import currently_in_test_context
    except ImportError:  # hypothesis is optional
        return
    if not currently_in_test_context():
        return
    key = os.environ.get("PYTEST_CURRENT_TEST", "").removesuffix(" (call)")
    count, spent = _FAILURES.get(key, [0, 0.0])
    count, spent = count + 1, spent + seconds
    _FAILURES[key] = [count, spent]
    if count < SHRINK_NOTICE_AFTER or (count - SHRINK_NOTICE_AFTER) % 20:
        return
    test = f" in {key}" if key else ""
    print(
        f"cnftools.testing: {assertion} has failed {count} times{test} ({spent:.1f} s of ODE "
        "solves): hypothesis is shrinking the failing example, one solve per attempt, which can "
        "take minutes. To get the first failure at once, decorate the test with "
        "@cnftools.testing.quick_settings() above @given.",
        file=sys.stderr,
        flush=True,
    )


def _describe(config: SolverConfig, estimator: Estimator | None) -> str:
    """The solver settings of a failure message: ``dopri5, rtol=1e-09, atol=1e-09``."""
    if config.accuracy is not None:
        text = f"accuracy={config.accuracy:g}"
    elif config.is_adaptive:
        text = f"{config.method}, rtol={config.rtol:g}, atol={config.atol:g}"
    else:
        text = f"{config.method}, {config.steps} steps"
    if isinstance(estimator, Hutchinson):
        text += f", Hutchinson with {estimator.n_probes} probes"
    elif estimator is not None:
        text += f", {estimator!r}"
    return text


def assert_log_likelihood_close(
    v: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    expected: Tensor | Callable[[Tensor], Tensor],
    prior: torch.distributions.Distribution | None = None,
    *,
    atol: float | None = None,
    rtol: float = 0.0,
    config: SolverConfig | None = None,
    estimator: Estimator | None = None,
) -> None:
    r"""Assert that the ODE log-likelihood of ``v`` matches a closed form.

    Computes :math:`\log p_1(x) = \log \pi(z_0) - \int_0^1 \nabla\cdot v(z_t, t)\,dt` with
    :func:`cnftools.likelihood.log_likelihood` and checks
    :math:`|\log p_1(x) - \mathrm{expected}| \le \mathrm{atol} + \mathrm{rtol}\,|\mathrm{expected}|`
    per row.

    Args:
        v: the field ``v(x, t)``.
        x: data points, shape ``(B, *event)``.
        expected: the exact :math:`\log p_1(x)`: a ``(B,)`` tensor or a callable ``x -> (B,)``
            (e.g. ``lambda x: marginal.log_prob(x, 1.0)`` or a distribution's ``log_prob``).
        prior: :math:`\pi`, the density at :math:`t = 0` (``None``: :math:`\mathcal N(0, I)`). For a
            closed-form marginal pass its exact ``prior()``: :math:`p_0` is not
            :math:`\mathcal N(0, I)` for VE and VP (theory §9).
        atol: absolute tolerance in nats (default 1e-6 in float64, 1e-3 in float32: a few times
            the default solver tolerance, plus float32 roundoff on :math:`|\log p| \sim 10`).
        rtol: relative tolerance (default 0).
        config: the solver settings, a :class:`~cnftools.SolverConfig`. Default
            ``SolverConfig(rtol=1e-9, atol=1e-9)`` in float64 and ``SolverConfig(rtol=1e-6,
            atol=1e-6)`` in float32 (dopri5).
        estimator: the divergence spec, as in ``log_likelihood`` (default: the field's closed
            form if it offers one, else exact). Give a ``Hutchinson`` a ``generator`` so that a
            failure can be reproduced exactly.

    Raises:
        AssertionError: naming the worst row, both log-likelihoods and their difference, the
            pieces of the computed value (:math:`\log\pi(z_0)` and :math:`\int \nabla\cdot v`), the
            number of field evaluations and the solver settings; also when ``expected`` is not
            finite or the solve fails (e.g. the field returns NaN), with the solver's message.
            Inside a hypothesis test that keeps failing here (shrinking, one ODE solve per
            attempt), a line on stderr says so and points at :func:`quick_settings
            <cnftools.testing.strategies.quick_settings>`, from the third failure of the test on.

    Example:
        >>> import torch, cnftools
        >>> from cnftools.testing import assert_log_likelihood_close
        >>> m, S = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
        >>> marginal = cnftools.GaussianMarginal(cnftools.OTPath(0.1), m, S)
        >>> x = torch.tensor([[0.5, -1.0], [2.0, 0.3], [0.0, 0.0]], dtype=torch.float64)
        >>> assert_log_likelihood_close(marginal, x, lambda x: marginal.log_prob(x, 1.0))
    """

    atol = check_tolerance("atol", atol)
    rtol = check_tolerance("rtol", rtol, allow_none=False)
    x = check_batched("x", x)
    if atol is None:
        atol = _default_tolerance(x.dtype, 1e-6, 1e-3)
    if config is None:
        tight = _default_tolerance(x.dtype, 1e-9, 1e-6)
        config = SolverConfig(rtol=tight, atol=tight)
    config = resolve_config(config)
    estimator = check_estimator(estimator)
    if callable(expected):
        expected = expected(x)
    expected = torch.as_tensor(expected).detach()
    if expected.shape != (x.shape[0],):
        raise AssertionError(
            f"expected has shape {tuple(expected.shape)}; need one log-density per row, "
            f"shape (B,) = ({x.shape[0]},)"
        )
    _require_finite("expected", expected[:, None], None)
    started = time.perf_counter()
    with torch.no_grad():
        try:
            result = log_likelihood(v, x, prior, estimator=estimator, config=config)
        except SolverError as error:
            _say_when_shrinking("assert_log_likelihood_close", time.perf_counter() - started)
            raise AssertionError(
                f"the ODE log-likelihood of the field could not be computed ({_describe(config, estimator)})"
                f": {error}"
            ) from error
    got = result.log_prob.detach()
    expected = expected.to(device=got.device, dtype=got.dtype)
    difference = got - expected
    excess = torch.nan_to_num(difference.abs() - (atol + rtol * expected.abs()), nan=math.inf)
    if bool((excess > 0).any()):
        row = int(excess.argmax())
        settings = _describe(config, estimator)
        _say_when_shrinking("assert_log_likelihood_close", time.perf_counter() - started)
        raise AssertionError(
            f"log-likelihood does not match the closed form at row {row}: ODE log p_1(x) = "
            f"{float(got[row]):.10g}, expected {float(expected[row]):.10g}, |difference| = "
            f"{float(difference[row].abs()):.3e} > atol + rtol·|expected| = {atol:.1e} + "
            f"{rtol:.1e}·{float(expected[row].abs()):.3g}; computed as log prior(z0) = "
            f"{float(result.log_prior[row]):.10g} minus ∫div v dt = "
            f"{float(result.divergence_integral[row]):.10g}, {result.nfe.forward} field "
            f"evaluations ({settings}). Either the field is wrong (it does not carry the prior "
            f"to this density) or the prior is not the true p_0 of this field"
        )
