r"""Hypothesis strategies and explaining assertions for users' own test suites.

Requires ``hypothesis`` (installed with ``pip install -e ".[test]"``). The project's own tests use
this module, so everything here is exercised by cnftools' CI.

Strategies (each returns a hypothesis ``SearchStrategy``):

- paths: :func:`ot_paths`, :func:`ve_paths`, :func:`vp_paths`, :func:`builtin_paths`,
  :func:`user_affine_paths`, :func:`user_paths`, :func:`gaussian_paths`;
- :func:`times` in :math:`[0, 1]`, away from the singular end;
- data: :func:`spd_matrices` (covariances), :func:`gaussian_mixtures` (means, covariances,
  weights), :func:`points` (batched tensors ``(B, *event)`` of a given dtype);
- fields: :func:`mlp_fields`, small random MLP fields with smooth activations (also
  :func:`random_mlp_field` for a single seeded one, without hypothesis).

Settings: :func:`quick_settings`, for properties whose examples run an ODE solve (no shrinking, so
a failure is reported in seconds rather than minutes).

Assertions (each raises ``AssertionError`` with a message that explains the failure: the worst
batch row, the numbers on both sides and the tolerance):

- :func:`assert_theorem3`: :math:`\tfrac{d}{dt}\psi_t(x_0) = u_t(\psi_t(x_0)|x_1)` for a path;
- :func:`assert_generates`: the continuity equation (log form) for a density ``log_prob`` and a
  field ``v``;
- :func:`assert_divergence_matches_jacobian`: a divergence against the trace of the full autograd
  Jacobian;
- :func:`assert_log_likelihood_close`: the ODE log-likelihood against a closed form.

Example:
    >>> import torch
    >>> from cnftools import OTPath
    >>> from cnftools.testing import assert_theorem3
    >>> assert_theorem3(OTPath(sigma_min=0.1), torch.randn(8, 3, dtype=torch.float64), 0.3)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch import Tensor

from cnftools._checks import (
    as_time,
    check_batched,
    check_event_shape,
    check_tolerance,
    quiet_jvp,
)
from cnftools.paths import AffineGaussianPath, GaussianPath, OTPath, VEPath, VPPath

__all__ = [
    "SMOOTH_ACTIVATIONS",
    "MixtureParameters",
    "assert_divergence_matches_jacobian",
    "assert_generates",
    "assert_log_likelihood_close",
    "assert_theorem3",
    "builtin_paths",
    "gaussian_mixtures",
    "gaussian_paths",
    "jacobian_trace",
    "mlp_fields",
    "ot_paths",
    "points",
    "quick_settings",
    "random_mlp_field",
    "spd_matrices",
    "times",
    "user_affine_paths",
    "user_paths",
    "ve_paths",
    "vp_paths",
]


def quick_settings(max_examples: int = 10, **overrides: object) -> settings:
    """Hypothesis settings for properties whose examples are slow (ODE solves): fail fast.

    Hypothesis normally *shrinks* a failing example, re-running the property hundreds of times to
    find the simplest input that still fails, and then keeps looking for other distinct bugs.
    With an ODE log-likelihood per example (about 0.1–1 s each) that turned a one-second failure
    into minutes. These settings drop the shrink phase (``phases`` = explicit, reuse, generate),
    stop at the first bug (``report_multiple_bugs=False``) and disable the per-example deadline;
    the failing example is reported as drawn. Use it as a decorator, above ``@given``; keyword
    ``overrides`` are passed to :class:`hypothesis.settings` (e.g. ``derandomize=True``).

    Example:
        >>> from hypothesis import given
        >>> from cnftools.testing import quick_settings, times
        >>> @quick_settings(max_examples=3)
        ... @given(t=times())
        ... def test_time_in_range(t):
        ...     assert 0.0 <= t < 1.0
        >>> test_time_in_range()
    """
    options: dict[str, object] = {
        "max_examples": max_examples,
        "phases": (Phase.explicit, Phase.reuse, Phase.generate),
        "report_multiple_bugs": False,
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow],
    }
    options.update(overrides)
    return settings(**options)  # type: ignore[arg-type]


def ot_paths() -> st.SearchStrategy[OTPath]:
    """OT paths with ``sigma_min`` in [0, 0.5]."""
    return st.floats(0.0, 0.5).map(OTPath)


def ve_paths() -> st.SearchStrategy[VEPath]:
    """VE paths with ``sigma_min`` in [1e-3, 0.5] and ``sigma_max / sigma_min`` in [2, 1e4]."""
    return st.tuples(st.floats(1e-3, 0.5), st.floats(2.0, 1e4)).map(
        lambda p: VEPath(sigma_min=p[0], sigma_max=p[0] * p[1])
    )


def vp_paths() -> st.SearchStrategy[VPPath]:
    """VP paths with ``beta_min`` in [0, 1] and ``beta_max - beta_min`` in [0.5, 30]."""
    return st.tuples(st.floats(0.0, 1.0), st.floats(0.5, 30.0)).map(
        lambda p: VPPath(beta_min=p[0], beta_max=p[0] + p[1])
    )


def builtin_paths() -> st.SearchStrategy[AffineGaussianPath]:
    """Any of OT, VE, VP with random parameters."""
    return st.one_of(ot_paths(), ve_paths(), vp_paths())


def user_affine_paths() -> st.SearchStrategy[AffineGaussianPath]:
    r"""Random user-defined affine paths: :math:`a_t = t^p`, :math:`s_t = 1 - (1 - \sigma_{\min}) t^q`.

    ``p, q`` in [1, 3] and ``sigma_min`` in [0.01, 0.5]; derivatives come from autograd.
    """

    def build(params: tuple[float, float, float]) -> AffineGaussianPath:
        p, q, sigma_min = params
        return AffineGaussianPath(
            signal_scale=lambda t: t**p,
            noise_scale=lambda t: 1 - (1 - sigma_min) * t**q,
        )

    return st.tuples(st.floats(1.0, 3.0), st.floats(1.0, 3.0), st.floats(0.01, 0.5)).map(build)


def user_paths() -> st.SearchStrategy[GaussianPath]:
    r"""Random general user paths, whose std depends on the data point.

    :math:`\mu_t = \sin(\pi t/2)^p x_1`, :math:`\sigma_t(x_1) = 1 - t + t\,c\,(1 + \tanh^2 \bar x_1)`
    with ``p`` in [1, 3] and ``c`` in [0.01, 0.3].
    """

    def build(params: tuple[float, float]) -> GaussianPath:
        p, c = params

        def mean(t: Tensor, x1: Tensor) -> Tensor:
            return torch.sin(0.5 * math.pi * t) ** p * x1

        def std(t: Tensor, x1: Tensor) -> Tensor:
            event_mean = x1.reshape(x1.shape[0], -1).mean(dim=1).reshape(t.shape)
            return 1 - t + t * c * (1 + torch.tanh(event_mean) ** 2)

        return GaussianPath(mean, std)

    return st.tuples(st.floats(1.0, 3.0), st.floats(0.01, 0.3)).map(build)


def gaussian_paths() -> st.SearchStrategy[GaussianPath]:
    """Built-in, user affine and general user paths."""
    return st.one_of(builtin_paths(), user_affine_paths(), user_paths())


def times(*, margin: float = 1e-3, singular_ends: bool = True) -> st.SearchStrategy[float]:
    """Times in [0, 1], kept ``margin`` away from t = 1 (where OT σ_min=0 and VP are singular)."""
    return st.floats(0.0, 1.0 - margin if singular_ends else 1.0)


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
    scale = float(u.abs().max().clamp_min(torch.finfo(u.dtype).tiny))
    per_row = (dpsi - u).reshape(x1.shape[0], -1).abs().max(dim=1).values
    error = float(per_row.max()) / scale
    if not error <= rtol:
        row = int(per_row.argmax())
        raise AssertionError(
            f"Theorem 3 fails for {path!r}: max|dψ/dt - u_t(ψ_t|x1)| / max|u| = {error:.3e} "
            f"> rtol {rtol:.1e}; worst row {row} at t = {float(t[row])}"
        )


# ----------------------------------------------------------------------------------------------
# Data and field strategies


def _default_tolerance(dtype: torch.dtype, float64: float, float32: float) -> float:
    return float64 if dtype == torch.float64 else float32


def _random_orthogonal(dim: int, seed: int) -> Tensor:
    """A random orthogonal ``(dim, dim)`` float64 matrix (QR of a Gaussian matrix, signs fixed)."""
    g = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))


def _check_dim(dim: object) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    return dim


def _check_eigenvalue_range(low: float, high: float) -> None:
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise ValueError(
            f"need 0 < min_eigenvalue <= max_eigenvalue (finite), got {low} and {high}"
        )


def spd_matrices(
    dim: int,
    *,
    min_eigenvalue: float = 0.1,
    max_eigenvalue: float = 4.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> st.SearchStrategy[Tensor]:
    r"""Symmetric positive-definite ``(dim, dim)`` matrices (covariances).

    :math:`S = Q\,\mathrm{diag}(\lambda)\,Q^\top` with eigenvalues :math:`\lambda_j` drawn by
    hypothesis in ``[min_eigenvalue, max_eigenvalue]`` (so they shrink towards simple values) and
    :math:`Q` a random orthogonal matrix from a drawn seed. Built in float64, made exactly
    symmetric, then cast, so the condition number is at most ``max_eigenvalue / min_eigenvalue``.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from cnftools.testing import spd_matrices
        >>> S = find(spd_matrices(3), lambda S: True)  # the simplest example
        >>> bool((S == S.T).all()), bool((torch.linalg.eigvalsh(S) > 0).all())
        (True, True)
    """
    dim = _check_dim(dim)
    _check_eigenvalue_range(min_eigenvalue, max_eigenvalue)

    def build(params: tuple[list[float], int]) -> Tensor:
        eigenvalues, seed = params
        q = _random_orthogonal(dim, seed)
        s = (q * torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
        return (0.5 * (s + s.T)).to(dtype=dtype, device=device)

    eigenvalues = st.lists(st.floats(min_eigenvalue, max_eigenvalue), min_size=dim, max_size=dim)
    return st.tuples(eigenvalues, st.integers(0, 2**31 - 1)).map(build)


class MixtureParameters(NamedTuple):
    """Parameters of a Gaussian mixture :math:`\\sum_k w_k \\mathcal N(m_k, S_k)`.

    Unpacks straight into :class:`~cnftools.marginals.MixtureMarginal`:
    ``MixtureMarginal(path, *params)``.

    Attributes:
        means: ``(K, d)``.
        covs: ``(K, d, d)``, symmetric positive definite.
        weights: ``(K,)``, positive, summing to one.
    """

    means: Tensor
    covs: Tensor
    weights: Tensor


def gaussian_mixtures(
    dim: int,
    *,
    min_components: int = 1,
    max_components: int = 4,
    mean_scale: float = 3.0,
    min_eigenvalue: float = 0.05,
    max_eigenvalue: float = 2.0,
    min_weight: float = 0.05,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> st.SearchStrategy[MixtureParameters]:
    r"""Gaussian mixtures in dimension ``dim``: means, SPD covariances and weights.

    Means have entries in ``[-mean_scale, mean_scale]``; covariances come from
    :func:`spd_matrices`; weights are drawn in ``[min_weight, 1]`` and normalised, so no component
    is negligible.

    Example:
        >>> import torch, cnftools
        >>> from hypothesis import find
        >>> from cnftools.testing import gaussian_mixtures
        >>> params = find(gaussian_mixtures(2), lambda p: len(p.weights) == 3)
        >>> marginal = cnftools.MixtureMarginal(cnftools.OTPath(0.1), *params)
        >>> marginal.num_components, round(float(params.weights.sum()), 12)
        (3, 1.0)
    """
    dim = _check_dim(dim)
    if not 1 <= min_components <= max_components:
        raise ValueError(
            f"need 1 <= min_components <= max_components, got {min_components}, {max_components}"
        )
    if not 0 < min_weight <= 1:
        raise ValueError(f"min_weight must lie in (0, 1], got {min_weight}")

    @st.composite
    def build(draw: st.DrawFn) -> MixtureParameters:
        k = draw(st.integers(min_components, max_components))
        entries = st.floats(-mean_scale, mean_scale)
        means = torch.tensor(
            draw(st.lists(st.lists(entries, min_size=dim, max_size=dim), min_size=k, max_size=k)),
            dtype=torch.float64,
        )
        cov = spd_matrices(dim, min_eigenvalue=min_eigenvalue, max_eigenvalue=max_eigenvalue)
        covs = torch.stack(draw(st.lists(cov, min_size=k, max_size=k)))
        w = torch.tensor(
            draw(st.lists(st.floats(min_weight, 1.0), min_size=k, max_size=k)),
            dtype=torch.float64,
        )
        out = (means, covs, w / w.sum())
        return MixtureParameters(*(a.to(dtype=dtype, device=device) for a in out))

    return build()


def points(
    event_shape: int | tuple[int, ...] = 2,
    *,
    min_batch: int = 1,
    max_batch: int = 8,
    scale: float = 3.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> st.SearchStrategy[Tensor]:
    """Batched points: tensors of shape ``(B, *event_shape)`` with entries in ``[-scale, scale]``.

    ``B`` is drawn in ``[min_batch, max_batch]``. Every entry is drawn by hypothesis (so failures
    shrink to simple points), in float64, then cast to ``dtype`` and moved to ``device``. Meant for
    small events (up to a few hundred entries per row); for images draw a seed with
    ``st.integers()`` and generate the tensor from it.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from cnftools.testing import points
        >>> x = find(points((2, 3), dtype=torch.float32), lambda x: x.shape[0] == 4)
        >>> x.shape, x.dtype
        (torch.Size([4, 2, 3]), torch.float32)
    """
    shape = check_event_shape("event_shape", event_shape)
    if not 1 <= min_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= max_batch, got {min_batch}, {max_batch}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    size = math.prod(shape)
    entries = st.floats(-scale, scale)

    def build(values: list[list[float]]) -> Tensor:
        flat = torch.tensor(values, dtype=torch.float64)
        return flat.reshape(len(values), *shape).to(dtype=dtype, device=device)

    rows = st.lists(entries, min_size=size, max_size=size)
    return st.lists(rows, min_size=min_batch, max_size=max_batch).map(build)


SMOOTH_ACTIVATIONS = ("tanh", "silu", "softplus", "gelu")
"""Activations of :func:`random_mlp_field`: all infinitely differentiable."""


def random_mlp_field(
    dim: int | tuple[int, ...],
    *,
    hidden: tuple[int, ...] = (16, 16),
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    r"""A small random MLP velocity field :math:`v(x, t)`, reproducible from ``seed``.

    A :class:`~cnftools.models.MLPField` with a smooth activation and a slow sinusoidal time
    embedding (5 features, frequencies up to :math:`2\pi`), so it is smooth in :math:`x` and
    :math:`t` and cheap to integrate. Its weights are drawn in float64 on the CPU from ``seed``
    (the global RNG is left untouched), then cast to ``dtype`` and moved to ``device``: the same
    seed gives the same field on every device.

    Args:
        dim: the event size ``d`` or the event shape.
        hidden: hidden-layer widths.
        activation: one of :data:`SMOOTH_ACTIVATIONS`.
        seed: the weights' seed.
        dtype: parameter dtype.
        device: parameter device.

    Example:
        >>> import torch
        >>> from cnftools.testing import random_mlp_field
        >>> v = random_mlp_field(3, seed=1)
        >>> v(
        ...     torch.zeros(4, 3, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
        ... ).shape
        torch.Size([4, 3])
    """
    from cnftools.models import MLPField

    if activation not in SMOOTH_ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {SMOOTH_ACTIVATIONS} (smooth: the continuity and "
            f"divergence checks differentiate the field), got {activation!r}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        field = MLPField(
            dim,
            hidden=tuple(hidden),
            activation=activation,
            time_embedding="sinusoidal",
            time_features=5,
            time_max_frequency=2.0,
            dtype=torch.float64,
        )
    return field.to(dtype=dtype, device=device)


def mlp_fields(
    dim: int | tuple[int, ...],
    *,
    hidden: tuple[int, ...] = (16, 16),
    activations: tuple[str, ...] = SMOOTH_ACTIVATIONS,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
) -> st.SearchStrategy[torch.nn.Module]:
    """Small random MLP fields (see :func:`random_mlp_field`): a drawn seed and activation.

    Example:
        >>> import torch
        >>> from hypothesis import find
        >>> from cnftools.testing import mlp_fields
        >>> v = find(mlp_fields(2), lambda v: True)
        >>> v(torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)).shape
        torch.Size([3, 2])
    """
    return st.tuples(st.integers(0, 2**31 - 1), st.sampled_from(activations)).map(
        lambda p: random_mlp_field(
            dim, hidden=hidden, activation=p[1], seed=p[0], dtype=dtype, device=device
        )
    )


# ----------------------------------------------------------------------------------------------
# Assertions


def _time_batch(t: float | Tensor, x: Tensor) -> Tensor:
    return as_time(t, x).clone()


def _row_message(row: int, t: Tensor) -> str:
    return f"row {row} (t = {float(t[row]):.6g})"


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
    """Per-row Jacobians ``(B, d, d)`` and their traces ``(B,)``."""
    batch = x.shape[0]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = v(xg, t)
        if out.shape != x.shape:
            raise AssertionError(
                f"the field returned shape {tuple(out.shape)} for x of shape {tuple(x.shape)}; "
                "a velocity field must return the shape of x"
            )
        flat = out.reshape(batch, -1)
        d = flat.shape[1]
        rows = []
        for i in range(d):
            (grad,) = torch.autograd.grad(
                flat[:, i].sum(), xg, retain_graph=i < d - 1, allow_unused=True
            )
            grad = torch.zeros_like(xg) if grad is None else grad
            rows.append(grad.reshape(batch, d))
    jac = torch.stack(rows, dim=1).detach()  # (B, d_out, d_in)
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
    cnftools' exact divergence (:func:`cnftools.divergence.divergence`).

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
    jac, trace = _full_jacobian(v, x, tt)
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


def _default_divergence(
    v: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Callable[[Tensor, Tensor], Tensor], str]:
    from cnftools.divergence import divergence as exact_divergence
    from cnftools.fields import closed_form_divergence

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
    divergence: str | Callable[[Tensor, Tensor], Tensor] = "exact",
) -> None:
    r"""Assert that ``v`` generates the density path ``log_prob``: the continuity equation holds.

    Uses the log form of THEORY §4 (:mod:`cnftools.continuity`),

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
        divergence: how :math:`\nabla\cdot v` is computed: ``"exact"`` (autograd, default; an
            independent check of the field), ``"closed_form"`` (the field's own ``divergence``) or
            a callable ``(x, t) -> (B,)``; see :func:`cnftools.continuity.continuity_terms`.

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
    from cnftools.continuity import continuity_terms

    rtol = check_tolerance("rtol", rtol)
    x = check_batched("x", x)
    tt = _time_batch(t, x)
    if rtol is None:
        rtol = _default_tolerance(x.dtype, 1e-9, 1e-3)
    terms = continuity_terms(log_prob, v, x, tt, divergence=divergence)
    residual, scale = terms.residual, terms.scale
    relative = torch.where(
        scale > 0, residual.abs() / torch.where(scale > 0, scale, torch.ones_like(scale)), 0
    )
    relative = torch.nan_to_num(relative, nan=math.inf)
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


def assert_log_likelihood_close(
    v: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    expected: Tensor | Callable[[Tensor], Tensor],
    prior: torch.distributions.Distribution | None = None,
    *,
    atol: float | None = None,
    rtol: float = 0.0,
    solver: dict[str, object] | None = None,
    generator: torch.Generator | None = None,
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
            :math:`\mathcal N(0, I)` for VE and VP (THEORY §9).
        atol: absolute tolerance in nats (default 1e-6 in float64, 1e-3 in float32: a few times
            the default solver tolerance, plus float32 roundoff on :math:`|\log p| \sim 10`).
        rtol: relative tolerance (default 0).
        solver: keyword arguments for ``log_likelihood`` (``method``, ``rtol``, ``atol``,
            ``steps``, ``divergence``, ...). Default ``{"rtol": 1e-9, "atol": 1e-9}`` in float64 and
            ``{"rtol": 1e-6, "atol": 1e-6}`` in float32 (dopri5).
        generator: random generator for the Hutchinson probes of a stochastic ``divergence``
            in ``solver`` (the default, exact divergence draws nothing), so that a failure
            message can be reproduced exactly.

    Raises:
        AssertionError: naming the worst row, both log-likelihoods and their difference, the
            pieces of the computed value (:math:`\log\pi(z_0)` and :math:`\int \nabla\cdot v`), the
            number of field evaluations and the solver settings.

    Example:
        >>> import torch, cnftools
        >>> from cnftools.testing import assert_log_likelihood_close
        >>> m, S = torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
        >>> marginal = cnftools.GaussianMarginal(cnftools.OTPath(0.1), m, S)
        >>> x = torch.tensor([[0.5, -1.0], [2.0, 0.3], [0.0, 0.0]], dtype=torch.float64)
        >>> assert_log_likelihood_close(marginal, x, lambda x: marginal.log_prob(x, 1.0))
    """
    from cnftools.likelihood import log_likelihood

    atol = check_tolerance("atol", atol)
    rtol = check_tolerance("rtol", rtol, allow_none=False)
    x = check_batched("x", x)
    if atol is None:
        atol = _default_tolerance(x.dtype, 1e-6, 1e-3)
    if solver is None:
        tight = _default_tolerance(x.dtype, 1e-9, 1e-6)
        solver = {"rtol": tight, "atol": tight}
    if callable(expected):
        expected = expected(x)
    expected = torch.as_tensor(expected).detach()
    if expected.shape != (x.shape[0],):
        raise AssertionError(
            f"expected has shape {tuple(expected.shape)}; need one log-density per row, "
            f"shape (B,) = ({x.shape[0]},)"
        )
    with torch.no_grad():
        extra = {} if generator is None else {"generator": generator}
        result = log_likelihood(v, x, prior, return_result=True, **solver, **extra)
    got = result.log_prob.detach()
    expected = expected.to(device=got.device, dtype=got.dtype)
    difference = got - expected
    excess = torch.nan_to_num(difference.abs() - (atol + rtol * expected.abs()), nan=math.inf)
    if bool((excess > 0).any()):
        row = int(excess.argmax())
        options = ", ".join(f"{k}={val!r}" for k, val in solver.items())
        raise AssertionError(
            f"log-likelihood does not match the closed form at row {row}: ODE log p_1(x) = "
            f"{float(got[row]):.10g}, expected {float(expected[row]):.10g}, |difference| = "
            f"{float(difference[row].abs()):.3e} > atol + rtol·|expected| = {atol:.1e} + "
            f"{rtol:.1e}·{float(expected[row].abs()):.3g}; computed as log prior(z0) = "
            f"{float(result.log_prior[row]):.10g} minus ∫div v dt = "
            f"{float(result.divergence_integral[row]):.10g}, {result.nfe.forward} field "
            f"evaluations ({options}); is the prior the true p_0 of this field?"
        )
