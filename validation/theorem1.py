"""theory §5, §9–§10: Theorem 1 on closed-form marginal paths (Gaussian, mixture, empirical data).

For data cases of :data:`cnftools.cases.DATA_CASES` and the affine paths (quick: a Gaussian, a
mixture and an empirical case on OT, VE, VP; full: every data case on every affine path, cosine
included, plus the residual with the closed-form divergence):

- Theorem 1: the closed-form marginal field ``u_t`` generates the closed-form ``p_t``: the relative
  continuity residual |r| / (|∂_t log p| + |div u| + |u·∇log p|) (theory §4) is at roundoff.
  Negative control: ``1.05 u`` must be caught.
- the closed-form ``u_t`` equals its definition, the posterior average
  Σ_i w_i u_t(x|x1ⁱ), w_i ∝ q_i p_t(x|x1ⁱ), built from the conditional path alone. Negative
  control: the average without the factor p_t(x|x1ⁱ) (theory §5's warning) must be caught.
- the closed-form divergence equals the trace of the autograd Jacobian. Negative control: the
  mixture divergence without its covariance term Σ w (g − ḡ)·u must be caught.
- the Gaussian flow map φ_t pushes p_0 to p_t: log p_t(φ_t(z)) + log det ∂φ_t/∂z = log p_0(z).

Theory sections cited here (pages under ``docs/theory/``):

- §4: ``docs/theory/divergence-and-continuity.md#continuity-equation``
- §5: ``docs/theory/marginals.md#theorem-1``
- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

import cnftools
from cnftools.cases import AFFINE_PATH_CASES, DATA_CASES
from cnftools.testing import jacobian_trace
from cnftools.validation._framework import Check, Context

SECTION = 5
SECTIONS = (5, 9, 10)  # the theory sections its rows check
TITLE = "Theorem 1: closed-form marginal paths and fields"

_QUICK_PATHS = ("OT(sigma_min=0)", "VE(0.1, 5)", "VP(0.1, 20)")
_QUICK_DATA = ("gaussian d=3", "mixture K=4 d=2", "empirical N=40 d=3 (weighted)")


def _scaled(field: Callable, factor: float) -> Callable[[Tensor, Tensor], Tensor]:
    """A deliberately wrong field: ``factor`` times ``field``."""
    return lambda x, t: factor * field(x, t)


def _grid(ctx: Context, t_max: float, n_times: int, batch: int) -> Tensor:
    times = torch.linspace(0.0, t_max, n_times, dtype=ctx.dtype, device=ctx.device)
    return times.repeat_interleave(batch)


def run(ctx: Context) -> Iterator[Check]:
    full = ctx.full
    n_times, batch = (21, 16) if full else (6, 4)
    paths = sorted(AFFINE_PATH_CASES) if full else _QUICK_PATHS
    data = sorted(DATA_CASES) if full else _QUICK_DATA
    # float64: exact formulas, roundoff only (observed ≲ 1e-13); the bound is 1e-10.
    # float32: eps32 ≈ 1.2e-7 amplified by log-sum-exp cancellation and autograd: 1e-3 / 1e-4.
    continuity_tol = ctx.tolerance(1e-10, 1e-3)
    exact_tol = ctx.tolerance(1e-10, 1e-4)
    generator = ctx.generator(51)
    for path_name in paths:
        path_case = AFFINE_PATH_CASES[path_name]
        path = path_case.build()
        for data_name in data:
            case = DATA_CASES[data_name]
            marginal = case.marginal(path, dtype=ctx.dtype, device=ctx.device, chunk_size=16)
            t = _grid(ctx, case.t_max(path_case), n_times, batch)
            x = 1.5 * torch.randn(
                t.shape[0], case.d, generator=generator, dtype=ctx.dtype, device=ctx.device
            )
            subject = f"{data_name}, {path_name}"
            rel = cnftools.continuity_relative_residual(marginal.log_prob, marginal.velocity, x, t)
            yield Check(
                "§5",
                "Theorem 1: continuity residual of (p_t, u_t)",
                subject,
                float(rel.max()),
                continuity_tol,
                "roundoff; relative residual, theory §4",
            )
            wrong = cnftools.continuity_relative_residual(
                marginal.log_prob, _scaled(marginal, 1.05), x, t
            )
            if full:
                closed = cnftools.continuity_relative_residual(
                    marginal.log_prob, marginal, x, t, estimator=cnftools.ClosedForm()
                )
                yield Check(
                    "§5",
                    "Theorem 1 residual with the closed-form div u_t",
                    subject,
                    float(closed.max()),
                    continuity_tol,
                    "roundoff; relative residual, theory §4",
                )
            yield Check(
                "§5",
                "Theorem 1 control: 1.05·u_t is rejected",
                subject,
                float(wrong.max()),
                1e-3,
                "a 5% wrong field leaves 0.05·∂_t log p",
                expect_fail=True,
            )
            div = marginal.divergence(x, t)
            ref = jacobian_trace(marginal.velocity, x, t)
            scale = max(1.0, float(ref.abs().max()))
            yield Check(
                "§9–10",
                "closed-form div u_t = tr ∂u/∂x (autograd)",
                subject,
                float((div - ref).abs().max()) / scale,
                exact_tol,
                "roundoff; error / max(1, max|div|)",
            )
            if case.kind == "mixture":
                yield _mixture_divergence_control(marginal, x, t, ref, scale, subject)
            if case.kind == "empirical":
                yield from _posterior_average_rows(ctx, case, path, marginal, x, t, subject)
            if case.kind == "gaussian":
                yield _flow_map_row(ctx, marginal, x, subject)


def _mixture_divergence_control(marginal, x, t, ref, scale, subject) -> Check:
    """Σ_k w_k tr A_k alone (no covariance term) must disagree with the autograd trace."""
    incomplete = marginal.statistics(x, t, divergence=True).weighted_trace
    return Check(
        "§10",
        "control: div without Σ w (g−ḡ)·u is rejected",
        subject,
        float((incomplete - ref).abs().max()) / scale,
        1e-3,
        "the covariance term is O(1) away from the modes",
        expect_fail=True,
    )


def _posterior_average_rows(ctx, case, path, marginal, x, t, subject) -> Iterator[Check]:
    """u_t(x) against Σ_i w_i u_t(x|x1ⁱ) with w from path.log_prob (Theorem 1's definition)."""
    p = case.parameters(ctx.dtype, ctx.device)
    points, weights = p["means"], p["weights"]
    batch = x.shape[0]
    log_cond = torch.stack(
        [path.log_prob(x, t, pt.expand(batch, -1)) for pt in points], dim=1
    )  # (B, N)
    cond_u = torch.stack(
        [path.conditional_velocity(x, t, pt.expand(batch, -1)) for pt in points], dim=1
    )  # (B, N, d)
    w = torch.softmax(log_cond + torch.log(weights), dim=1)
    expected = (w.unsqueeze(-1) * cond_u).sum(dim=1)
    got = marginal.velocity(x, t)
    scale = float(expected.abs().max())
    yield Check(
        "§5",
        "u_t = Σ w_i u_t(x|x1ⁱ), w ∝ q_i p_t(x|x1ⁱ)",
        subject,
        float((got - expected).abs().max()) / scale,
        ctx.tolerance(1e-11, 1e-4),
        "roundoff; posterior average from the conditional path",
    )
    naive = (weights[None, :, None] * cond_u).sum(dim=1)  # drops p_t(x|x1): the wrong formula
    yield Check(
        "§5",
        "control: average without p_t(x|x1) is rejected",
        subject,
        float((naive - expected).abs().max()) / scale,
        1e-3,
        "theory §5: the factor p_t(x|x1) q(x1) matters",
        expect_fail=True,
    )


def _flow_map_row(ctx, marginal, x, subject) -> Check:
    """Change of variables through φ_t (theory §9): log p_t(φ_t(z)) + log det = log p_0(z)."""
    errors = []
    for s in (0.25, 0.5, 1.0):
        phi = marginal.flow(x, s)
        lhs = marginal.log_prob(phi, s) + marginal.flow_log_det(
            torch.tensor(s, dtype=ctx.dtype, device=ctx.device)
        )
        errors.append(float((lhs - marginal.log_prob(x, 0.0)).abs().max()))
    return Check(
        "§9",
        "flow map φ_t: log p_t(φ_t(z)) + log det = log p_0(z)",
        subject,
        max(errors),
        ctx.tolerance(1e-10, 1e-3),
        "roundoff in nats; eigenbasis closed forms",
    )
