r"""Dequantization of integer data and bits per dimension (theory §12).

Integer data :math:`x \in \{0, \dots, L-1\}^D` become :math:`y = (x + u)/L`,
:math:`u \sim \mathcal U[0,1)^D` (or :math:`y = 2(x+u)/L - 1` with ``centered=True``); a model's
NLL on :math:`y` converts to bits per dimension by :func:`bits_per_dim`, and the
importance-weighted bound over ``K`` dequantization samples is :func:`dequantized_nll`. Users
import these from :mod:`cnftools.data`, which re-exports them.

References:
    Theis, van den Oord, Bethge, A note on the evaluation of generative models (2016),
    arXiv:1511.01844 (dequantization); Ho et al., Flow++ (2019), arXiv:1902.00275 (bits/dim, K).

Theory sections cited here (pages under ``docs/theory/``):

- §12: ``docs/theory/bits-per-dim.md#bits-per-dimension``
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from cnftools._checks import check_finite, check_floating, check_int

__all__ = [
    "Dequantization",
    "bits_per_dim",
    "check_integer_data",
    "dequantization_log_det",
    "dequantize",
    "dequantized_nll",
    "importance_weighted_log_mean",
    "quantize",
]


@dataclass(frozen=True)
class Dequantization:
    r"""Uniform dequantization of integer data and its bits-per-dimension bound.

    Rows are integers :math:`x \in \{0, \dots, L-1\}^D`; the field models
    :math:`y = (x + u)/L \in [0, 1)^D` (or :math:`y = 2(x+u)/L - 1 \in [-1, 1)^D` with
    ``centered``), :math:`u \sim \mathcal U[0,1)^D`, and the reported value is the
    importance-weighted bound (:func:`dequantized_nll`)

    .. math::

        \log P(x) \ge \log \frac1K \sum_{k=1}^K p_Y\big(y(x + u_k)\big)
        \Big|\frac{\partial y}{\partial x'}\Big|,\qquad
        \mathrm{bpd} = \frac{-\log P(x)}{D \ln 2}.

    A reported bpd always states ``K``. Used by :func:`cnftools.dataset_nll`.

    Attributes:
        levels: :math:`L`, the number of integer values (17 for scikit-learn's digits, 256 for
            8-bit images).
        samples: :math:`K \ge 1` dequantization samples per row.
        centered: scale to :math:`[-1, 1)` instead of :math:`[0, 1)`.

    References:
        Theis et al. (2016), arXiv:1511.01844; Ho et al., Flow++ (2019), arXiv:1902.00275.

    Example:
        >>> Dequantization(levels=17, samples=4)
        Dequantization(levels=17, samples=4, centered=False)
    """

    levels: int
    samples: int = 1
    centered: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"Dequantization.levels must be an int >= 2, got {self.levels!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"Dequantization.samples must be an int >= 1, got {self.samples!r}")
        if not isinstance(self.centered, bool):
            raise TypeError(f"Dequantization.centered must be a bool, got {self.centered!r}")


def check_integer_data(name: str, x: object, levels: int) -> Tensor:
    """Check that ``x`` (the caller's argument ``name``) holds integers in ``0..levels-1``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integers in 0..{levels - 1}")
    if x.dim() < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, *event), got {tuple(x.shape)}")
    if x.is_floating_point():
        if not bool((x == torch.round(x)).all()):
            raise ValueError(f"{name} must hold integer values (it is already dequantized?)")
    elif x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name} must be an integer or floating tensor, got {x.dtype}")
    if bool((x < 0).any()) or bool((x > levels - 1).any()):
        raise ValueError(
            f"{name} must lie in 0..{levels - 1} (levels = {levels}), "
            f"got values in [{float(x.min())}, {float(x.max())}]"
        )
    return x


def dequantize(
    x: Tensor,
    levels: int,
    generator: torch.Generator | None = None,
    *,
    centered: bool = False,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Uniform dequantization and scaling: :math:`y = (x + u)/L`, :math:`u \sim \mathcal U[0,1)^D`.

    With ``centered=True``, :math:`y = 2(x + u)/L - 1 \in [-1, 1)^D`.

    Args:
        x: integers in ``0..levels-1``, shape ``(B, *event)`` (integer or integral float tensor).
        levels: :math:`L`, the number of values (17 for the digits, 256 for 8-bit images).
        generator: random generator on ``x``'s device.
        centered: scale to :math:`[-1, 1)` instead of :math:`[0, 1)`.
        dtype: output dtype (default: ``x``'s if floating, else torch's default).

    Returns:
        :math:`y`, same shape as ``x``.

    Example:
        >>> import torch
        >>> y = dequantize(torch.tensor([[0, 16]]), 17, torch.Generator().manual_seed(0))
        >>> bool(((y >= 0) & (y < 1)).all())
        True
    """
    levels = check_int("levels", levels, low=2)
    x = check_integer_data("x", x, levels)
    if dtype is None:
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
    u = torch.rand(x.shape, generator=generator, dtype=dtype, device=x.device)
    y = (x.to(dtype) + u) / levels
    return 2 * y - 1 if centered else y


def quantize(y: Tensor, levels: int, *, centered: bool = False) -> Tensor:
    """The inverse of :func:`dequantize` up to the noise: ``floor(L y)`` clipped to ``0..L-1`` (long).

    The clipping is deliberate and documented: it maps model *samples*, which may fall slightly
    outside the cube, to valid pixel values. Non-finite values are refused.
    """
    levels = check_int("levels", levels, low=2)
    y = check_finite("y", check_floating("y", y))
    unit = (y + 1) / 2 if centered else y
    return torch.clamp(torch.floor(unit * levels), 0, levels - 1).to(torch.long)


def dequantization_log_det(dim: int, levels: int, *, centered: bool = False) -> float:
    r""":math:`\sum \log|\partial y / \partial x'| = D \log(1/L)` (centered: :math:`D\log(2/L)`)."""
    levels = check_int("levels", levels, low=2)
    dim = check_int("dim", dim, low=1)
    return dim * math.log((2.0 if centered else 1.0) / levels)


def bits_per_dim(
    nll_nats: float | Tensor,
    dim: int,
    levels: int | None = None,
    *,
    centered: bool = False,
) -> float | Tensor:
    r"""Bits per dimension from a negative log-likelihood in nats (theory §12).

    .. math::

        \mathrm{bpd} = \frac{\mathrm{NLL}_y - \sum\log|\partial y/\partial x'|}{D \ln 2}
        = \frac{\mathrm{NLL}_y}{D\ln 2} + \log_2 L \quad (\text{centered: } \log_2(L/2)).

    Args:
        nll_nats: :math:`-\log p_Y(y)` per example (a float or a tensor of any shape), in nats, of
            the model on the scaled data :math:`y` (see :func:`dequantize`).
        dim: :math:`D`, the number of dimensions per example.
        levels: :math:`L`; ``None`` means the NLL is already in data space (no offset).
        centered: the scaling was :math:`y = 2x'/L - 1`.

    Returns:
        bpd, same type and shape as ``nll_nats``.

    Example:
        >>> bits_per_dim(0.0, 64, 17)  # a model uniform on [0, 1)^64: exactly log2(17)
        4.08746...
    """
    offset = 0.0
    if levels is not None:
        offset = -dequantization_log_det(dim, levels, centered=centered)
    else:
        check_int("dim", dim, low=1)
    return (nll_nats + offset) / (dim * math.log(2.0))


def dequantized_nll(
    log_prob_y: Callable[[Tensor], Tensor],
    x: Tensor,
    levels: int,
    *,
    samples: int = 1,
    centered: bool = False,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Importance-weighted dequantized NLL in data space (nats per example), with ``samples`` = K.

    .. math::

        -\log \frac1K \sum_{k=1}^K p_Y\big(y(x + u_k)\big)\,\Big|\frac{\partial y}{\partial x'}\Big|,
        \qquad u_k \sim \mathcal U[0,1)^D,

    an upper bound on :math:`-\log P(x)` that tightens as :math:`K` grows. Divide by
    :math:`D \ln 2` (``bits_per_dim(nll, D)``, no ``levels``) for bpd; always report :math:`K`.

    Args:
        log_prob_y: the model's log-density on scaled data, ``(B, *event) -> (B,)`` (e.g. a
            closure over ``cnftools.log_likelihood``).
        x: integer data, shape ``(B, *event)``.
        levels: :math:`L`.
        samples: :math:`K \ge 1`.
        centered: the scaling of :func:`dequantize`.
        generator: random generator on ``x``'s device.
        dtype: the dtype of the dequantized data.

    Returns:
        Shape ``(B,)``.
    """
    samples = check_int("samples", samples, low=1)
    dim = math.prod(x.shape[1:])
    log_det = dequantization_log_det(dim, levels, centered=centered)
    terms = []
    for _ in range(samples):
        y = dequantize(x, levels, generator, centered=centered, dtype=dtype)
        terms.append(log_prob_y(y) + log_det)
    return -importance_weighted_log_mean(torch.stack(terms, dim=0))


def importance_weighted_log_mean(terms: Tensor) -> Tensor:
    r""":math:`\log \frac1K \sum_{k=1}^K e^{\ell_k}` over the first dimension of ``terms``
    (``(K, B)`` -> ``(B,)``): the importance-weighted dequantization bound from the ``K``
    per-sample log-likelihoods :math:`\ell_k`, computed stably (log-sum-exp). The one
    implementation used by :func:`dequantized_nll`, the dataset NLL and the baselines.

    Example:
        >>> import torch
        >>> importance_weighted_log_mean(torch.log(torch.tensor([[1.0], [3.0]])))
        tensor([0.6931])
    """
    return torch.logsumexp(terms, dim=0) - math.log(terms.shape[0])
