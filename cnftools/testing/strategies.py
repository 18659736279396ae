r"""Hypothesis strategies for property tests of paths, data and fields (needs ``hypothesis``).

- paths: :func:`ot_paths`, :func:`ve_paths`, :func:`vp_paths`, :func:`builtin_paths`,
  :func:`user_affine_paths`, :func:`user_paths`, :func:`gaussian_paths`;
- :func:`times` in :math:`[0, 1]`, away from the singular end;
- data: :func:`spd_matrices` (covariances), :func:`gaussian_mixtures` (means, covariances,
  weights), :func:`points` (batched tensors ``(B, *event)`` of a given dtype);
- fields: :func:`mlp_fields`, small random MLP fields with smooth activations (also
  :func:`random_mlp_field` for a single seeded one);
- settings: :func:`quick_settings`, for properties whose examples run an ODE solve (no
  shrinking, so a failure is reported in seconds rather than minutes).
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch import Tensor

from cnftools._checks import check_event_shape, check_int
from cnftools.cases import random_spd
from cnftools.data import GaussianMixture
from cnftools.paths import AffineGaussianPath, GaussianPath, OTPath, VEPath, VPPath
from cnftools.testing import STRATEGIES
from cnftools.training.features import TimeFeatures
from cnftools.training.models import MLPField

__all__ = list(STRATEGIES)  # the names cnftools.testing serves lazily from this module


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
    dim = check_int("dim", dim, low=1)
    _check_eigenvalue_range(min_eigenvalue, max_eigenvalue)

    def build(params: tuple[list[float], int]) -> Tensor:
        eigenvalues, seed = params
        lam = torch.tensor(eigenvalues, dtype=torch.float64)
        return random_spd(dim, torch.Generator().manual_seed(seed), dtype, device, eigenvalues=lam)

    eigenvalues = st.lists(st.floats(min_eigenvalue, max_eigenvalue), min_size=dim, max_size=dim)
    return st.tuples(eigenvalues, st.integers(0, 2**31 - 1)).map(build)


MixtureParameters = GaussianMixture
"""The mixture parameters :func:`gaussian_mixtures` draws: a validated
:class:`cnftools.data.GaussianMixture` (``means`` ``(K, d)``, ``covs`` ``(K, d, d)``, ``weights``
``(K,)``), which unpacks straight into ``MixtureMarginal(path, *params)``."""


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
    dim = check_int("dim", dim, low=1)
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
        return GaussianMixture(*(a.to(dtype=dtype, device=device) for a in out))

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

    A :class:`~cnftools.training.models.MLPField` with a smooth activation and a slow sinusoidal time
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
            time=TimeFeatures("sinusoidal", 5, max_frequency=2.0),
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
