"""theory §12: bits per dimension of dequantized integer data.

- A model uniform on the cube gives exactly log₂ L bpd, with either scaling (y = x'/L or
  y = 2x'/L − 1).
- The offsets of theory §12: + 8 for y = x'/256 and + 7 for y = 2x'/256 − 1.
- Importance-weighted dequantization is a bound that tightens with K towards the exact discrete
  NLL. For a model with independent Gaussian coordinates the discrete probability of each cell is
  known in closed form, −log P(x) = −Σ log[Φ((x+1)/L; μ, σ) − Φ(x/L; μ, σ)], so both the bound's
  direction and its convergence are checked against an exact number.

Theory sections cited here (pages under ``docs/theory/``):

- §12: ``docs/theory/bits-per-dim.md#bits-per-dimension``
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from cnftools.data import bits_per_dim, dequantization_log_det, dequantized_nll
from cnftools.validation._framework import Check, Context

SECTION = 12
SECTIONS = (12,)  # the theory sections its rows check
TITLE = "Bits per dimension and importance-weighted dequantization"


def run(ctx: Context) -> Iterator[Check]:
    yield from _closed_form_rows()
    yield from _importance_weighted_rows(ctx)


def _closed_form_rows() -> Iterator[Check]:
    """The uniform model gives log₂ L bpd; theory §12's offsets (+8, +7) for 8-bit data."""
    for levels, dim in [(17, 64), (256, 3072)]:
        for centered in (False, True):
            # Uniform density on the scaled cube: 1 on [0,1)^D, 2^-D on [-1,1)^D.
            nll_y = dim * math.log(2.0) if centered else 0.0
            bpd = bits_per_dim(nll_y, dim, levels, centered=centered)
            yield Check(
                "§12",
                "uniform model on the cube: bpd = log₂ L",
                f"L={levels}, D={dim}, {'2x/L−1' if centered else 'x/L'}",
                abs(bpd - math.log2(levels)),
                1e-12,
                "closed form (Python floats)",
            )
    for centered, offset in ((False, 8.0), (True, 7.0)):
        got = bits_per_dim(0.0, 3072, 256, centered=centered)
        yield Check(
            "§12",
            f"offset of y = {'2x′/256 − 1' if centered else 'x′/256'} is +{offset:g} bits",
            "L=256, D=3072",
            abs(got - offset),
            1e-12,
            "closed form",
        )


def _importance_weighted_rows(ctx: Context) -> Iterator[Check]:
    """The importance-weighted bound against the exact discrete NLL of a factorised Gaussian."""
    exact_tol = ctx.tolerance(1e-12, 1e-5)
    levels, dim, n = 17, 8, 512
    generator = ctx.generator(12)
    f64 = {"dtype": torch.float64, "device": ctx.device}
    mu = torch.rand(dim, generator=generator, **f64)
    sigma = 0.1 + 0.2 * torch.rand(dim, generator=generator, **f64)
    x = torch.randint(0, levels, (n, dim), generator=generator, device=ctx.device)
    normal = torch.distributions.Normal(mu.to(ctx.dtype), sigma.to(ctx.dtype))

    def log_prob_y(y: Tensor) -> Tensor:
        return normal.log_prob(y).sum(dim=1)

    reference = torch.distributions.Normal(mu, sigma)
    lower = reference.cdf(x.double() / levels)
    upper = reference.cdf((x.double() + 1) / levels)
    exact = -(torch.log(upper - lower)).sum(dim=1)  # nats per example, data space
    bounds, stderr = {}, {}
    for k in (1, 10, 1000 if ctx.full else 200):
        nll = dequantized_nll(
            log_prob_y,
            x.to(ctx.dtype),
            levels,
            samples=k,
            generator=ctx.generator(k),
            dtype=ctx.dtype,
        )
        bounds[k] = float(nll.double().mean())
        stderr[k] = float((nll.double() - exact).std() / math.sqrt(n))
    k_max = max(bounds)
    gap_1, gap_max = bounds[1] - float(exact.mean()), bounds[k_max] - float(exact.mean())
    yield Check(
        "§12",
        "dequantized NLL is an upper bound: K=1 mean gap ≥ 0 (in standard errors below 0)",
        f"mean gap {gap_1:.4f} ± {stderr[1]:.4f} nats (exact NLL {float(exact.mean()):.4f})",
        max(-gap_1 / stderr[1], 0.0),
        3.0,
        "Jensen: E log p(x+u) ≤ log P(x); a Monte Carlo mean may dip ≤ 3 s.e. below",
    )
    yield Check(
        "§12",
        f"importance weighting tightens the bound: gap(K={k_max}) < gap(K=1)",
        f"K=1: {gap_1:.4f}, K=10: {bounds[10] - float(exact.mean()):.4f}, K={k_max}: {gap_max:.4f}",
        gap_max / gap_1,
        0.25,
        "the bound converges to −log P(x) as K grows (measured ratio ≪ 0.25)",
    )
    # The log-det of the scaling is D log(1/L): the bpd of the exact discrete model equals the
    # data-space NLL over D ln 2 (a consistency check of the two conversions).
    log_det = dequantization_log_det(dim, levels)
    bpd_via_y = bits_per_dim(float(exact.mean()) + log_det, dim, levels)
    yield Check(
        "§12",
        "bpd from NLL_y + offset = NLL_data / (D ln 2)",
        f"L={levels}, D={dim}",
        abs(bpd_via_y - float(exact.mean()) / (dim * math.log(2))),
        exact_tol,
        "two routes to the same number",
    )
