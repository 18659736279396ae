"""theory §4: every conditional path's Theorem-3 field satisfies the continuity equation.

For each path of :data:`cnftools.cases.PATH_CASES` the log-form residual
r = ∂_t log p_t(x|x1) + div u_t(x|x1) + u_t(x|x1)·∇_x log p_t(x|x1) is computed by autograd
(:func:`cnftools.continuity_relative_residual`, divergence by autograd, independent of any closed
form) at points drawn from the path, on a grid of times inside (0, 1). The row's error is the
largest relative residual |r| / (|∂_t log p| + |div u| + |u·∇ log p|).

Negative controls (must be caught, relative residual > 1e-3): the field scaled by 1.05, and the
conditional field of another data point x1' evaluated against p_t(·|x1). A control's error is the
smallest, over the times, of the batch's largest relative residual: it must be caught at every time.

Theory sections cited here (pages under ``docs/theory/``):

- §4: ``docs/theory/divergence-and-continuity.md#continuity-equation``
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

import cnftools
from cnftools.cases import PATH_CASES
from cnftools.validation._framework import Check, Context

SECTION = 4
SECTIONS = (4,)  # the theory sections its rows check
TITLE = "Continuity equation: conditional paths and their fields"

_WRONG = 1e-3


def _worst(
    ctx: Context,
    path: cnftools.GaussianPath,
    make_field: Callable[[cnftools.GaussianPath, Tensor, Tensor], Callable],
    times: list[float],
    events: list[tuple[int, ...]],
    batch: int,
    offset: int,
    over_times: Callable[[list[float]], float] = max,
) -> float:
    """Largest relative residual over the batch, reduced over times/events by ``over_times``."""
    per_time = []
    for e, event in enumerate(events):
        generator = ctx.generator(offset + e)
        x1 = torch.randn(batch, *event, generator=generator, dtype=ctx.dtype, device=ctx.device)
        for t in times:
            x = path.sample(t, x1, generator=generator)
            relative = cnftools.continuity_relative_residual(
                lambda x, s, x1=x1: path.log_prob(x, s, x1),
                make_field(path, x1, x1.roll(1, dims=0)),
                x,
                t,
            )
            per_time.append(float(relative.max()))
    return over_times(per_time)


def _true_field(path: cnftools.GaussianPath, x1: Tensor, other: Tensor) -> Callable:
    return lambda x, t: path.conditional_velocity(x, t, x1)


def _scaled_field(path: cnftools.GaussianPath, x1: Tensor, other: Tensor) -> Callable:
    return lambda x, t: 1.05 * path.conditional_velocity(x, t, x1)


def _other_field(path: cnftools.GaussianPath, x1: Tensor, other: Tensor) -> Callable:
    return lambda x, t: path.conditional_velocity(x, t, other)


def run(ctx: Context) -> Iterator[Check]:
    if ctx.full:
        times = [0.02, 0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.98]
        events, batch = [(3,), (2, 3), (1, 4, 4)], 256
    else:
        times, events, batch = [0.1, 0.5, 0.9], [(3,)], 32
    where = f"t in {times[0]}..{times[-1]}, B={batch}, events {events}"
    # float64: theory §4 quotes <~1e-14 for closed forms; 1e-10 leaves room for autograd-derived
    # schedules. float32: ~300 eps measured for VP(0.1, 20) at small t (O(1) terms cancelling).
    tolerance = ctx.tolerance(1e-10, 5e-4)
    for i, name in enumerate(sorted(PATH_CASES)):
        path = PATH_CASES[name].build()
        yield Check(
            "§4",
            "relative residual of u_t(x|x1) on p_t(x|x1)",
            f"{name}; {where}",
            _worst(ctx, path, _true_field, times, events, batch, 10 * i),
            tolerance,
            "terms by autograd from closed forms: rounding only",
        )
        yield Check(
            "§4",
            "negative control: 1.05 u_t(x|x1)",
            name,
            _worst(ctx, path, _scaled_field, times, events[:1], batch, 10 * i, min),
            _WRONG,
            "a 5% error in the field must be visible",
            expect_fail=True,
        )
        yield Check(
            "§4",
            "negative control: u_t(x|x1') of another x1'",
            name,
            _worst(ctx, path, _other_field, times, events[:1], batch, 10 * i, min),
            _WRONG,
            "another data point's field does not generate p_t(.|x1)",
            expect_fail=True,
        )
