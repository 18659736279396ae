r"""Baselines on the same dequantized scale as :func:`cnftools.dataset_nll`, to compare with a flow.

A full-covariance Gaussian (:func:`gaussian_baseline_nll`) and independent per-dimension histograms
(:func:`histogram_baseline_nll`), both scored with the importance-weighted dequantization bound of
:class:`~cnftools.Dequantization`.

References:
    Theis et al. (2016), arXiv:1511.01844; Ho et al., Flow++ (2019), arXiv:1902.00275.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from cnftools.data import (
    Dequantization,
    check_integer_data,
    dequantize,
    dequantized_nll,
)

__all__ = ["gaussian_baseline_nll", "histogram_baseline_nll"]


def gaussian_baseline_nll(
    train: Tensor,
    test: Tensor,
    dequantization: Dequantization,
    *,
    seed: int = 0,
    shrinkage: float = 1e-6,
) -> Tensor:
    r"""Dequantized NLL (nats, data space) of a full-covariance Gaussian fitted to dequantized data.

    Fit :math:`\mathcal N(\hat m, \hat S + \lambda I)` by maximum likelihood to :math:`y(x + u)` of
    ``train`` (one noise draw), then score ``test`` with the same :math:`K`-sample bound as
    :func:`dataset_nll`: :math:`-\log\frac1K\sum_k \mathcal N(y_k) |\partial y/\partial x'|`.

    Args:
        train: integer rows ``(N, *event)``.
        test: integer rows ``(M, *event)``.
        dequantization: levels, :math:`K`, scaling.
        seed: seeds the noise draws.
        shrinkage: :math:`\lambda`, added to the covariance's diagonal (relative to its mean
            diagonal).

    Returns:
        ``(M,)`` float64 NLLs; divide by :math:`D\ln 2` for bpd.

    Example:
        >>> import torch
        >>> from cnftools import Dequantization
        >>> rows = torch.randint(0, 4, (50, 2), generator=torch.Generator().manual_seed(0))
        >>> gaussian_baseline_nll(rows[:40], rows[40:], Dequantization(4)).shape
        torch.Size([10])
    """
    if not isinstance(dequantization, Dequantization):
        raise TypeError(f"dequantization must be a Dequantization, got {dequantization!r}")
    train = check_integer_data("train", train, dequantization.levels)
    test = check_integer_data("test", test, dequantization.levels)
    gen = torch.Generator().manual_seed(seed)
    deq = dequantization
    train = train.reshape(train.shape[0], -1).to("cpu")
    test = test.reshape(test.shape[0], -1).to("cpu")
    y = dequantize(train, deq.levels, gen, centered=deq.centered, dtype=torch.float64)
    mean = y.mean(dim=0)
    cov = torch.cov(y.T, correction=0)
    cov = cov + shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    return dequantized_nll(
        normal.log_prob,
        test,
        deq.levels,
        samples=deq.samples,
        centered=deq.centered,
        generator=gen,
        dtype=torch.float64,
    )


def histogram_baseline_nll(
    train: Tensor, test: Tensor, levels: int, *, alpha: float = 1.0
) -> Tensor:
    r"""NLL (nats) of independent per-dimension histograms with add-:math:`\alpha` smoothing.

    :math:`P(x) = \prod_j \hat P_j(x_j)`, :math:`\hat P_j(l) = (n_{jl} + \alpha)/(N + \alpha L)`.
    On the dequantized scale its density is :math:`L\hat P_j` on each bin of width :math:`1/L`, so
    the dequantized bound is exact here: the bpd equals :math:`-\log_2 P(x)/D` for every :math:`K`.

    Args:
        train: integer rows ``(N, *event)`` in ``0..levels-1``.
        test: integer rows ``(M, *event)``.
        levels: :math:`L`.
        alpha: the smoothing count.

    Returns:
        ``(M,)`` float64 NLLs.

    Example:
        >>> import torch
        >>> histogram_baseline_nll(torch.tensor([[0], [1]]), torch.tensor([[0]]), 2, alpha=0.0)
        tensor([0.6931], dtype=torch.float64)
    """
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    train = check_integer_data("train", train, levels)
    test = check_integer_data("test", test, levels)
    if train[0].numel() != test[0].numel():
        raise ValueError(
            f"train and test must have the same event size, got {tuple(train.shape)}, {tuple(test.shape)}"
        )
    # A baseline on host memory: counts are small (D × L) and the result is a float64 frame column.
    train = train.reshape(train.shape[0], -1).to("cpu").round().long()
    test = test.reshape(test.shape[0], -1).to("cpu").round().long()
    counts = torch.zeros(train.shape[1], levels, dtype=torch.float64)
    counts.scatter_add_(1, train.T, torch.ones(train.T.shape, dtype=torch.float64))
    probs = (counts + alpha) / (train.shape[0] + alpha * levels)
    log_p = torch.log(probs).gather(1, test.T)  # (D, M)
    return -log_p.sum(dim=0)
