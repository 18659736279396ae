r"""Hypothesis strategies and explaining assertions for users' own test suites.

The assertions (:mod:`cnftools.testing.assertions`) need nothing beyond cnftools; the strategies
(:mod:`cnftools.testing.strategies`) need ``hypothesis`` and are imported on first use, so
``from cnftools.testing import assert_generates`` works without it. The project's own tests use
this package, so everything here is exercised by cnftools' CI.

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

import importlib
from typing import Any

from cnftools.testing.assertions import (
    assert_divergence_matches_jacobian,
    assert_generates,
    assert_log_likelihood_close,
    assert_theorem3,
    jacobian_trace,
)

STRATEGIES = (
    "SMOOTH_ACTIVATIONS",
    "MixtureParameters",
    "builtin_paths",
    "gaussian_mixtures",
    "gaussian_paths",
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
)

__all__ = [
    "STRATEGIES",
    "assert_divergence_matches_jacobian",
    "assert_generates",
    "assert_log_likelihood_close",
    "assert_theorem3",
    "jacobian_trace",
    *STRATEGIES,
]


def __getattr__(name: str) -> Any:
    """The strategies, imported on first use (they need ``hypothesis``)."""
    if name not in STRATEGIES:
        raise AttributeError(f"module 'cnftools.testing' has no attribute {name!r}")
    try:
        strategies = importlib.import_module("cnftools.testing.strategies")
    except ImportError as error:
        raise ImportError(
            f"cnftools.testing.{name} is a hypothesis strategy and needs hypothesis: "
            "pip install hypothesis (the assertions work without it)"
        ) from error
    return getattr(strategies, name)


def __dir__() -> list[str]:
    """The module's names with the lazily imported strategies (listed whether or not hypothesis
    is installed; using one without it raises an ImportError that says so)."""
    return sorted(set(globals()) | set(__all__))
