"""theory §6: Theorem 2, ∇θ L_FM = ∇θ L_CFM, checked two ways.

(a) Pointwise and exact, for empirical data q = Σ_i q_i δ(x_1 − x_1ⁱ) and fixed (t, x):
    Σ_i w_i ‖v − u_i‖² = ‖v − u‖² + Σ_i w_i ‖u_i − u‖²  and  Σ_i w_i ∇θ‖vθ − u_i‖² = ∇θ‖vθ − u‖²,
    with w_i from ``path.log_prob``, u_i from ``conditional_velocity`` and u from
    ``MixtureMarginal.velocity`` (covs=None) — an independent implementation of the marginal field.
    Negative control: the unweighted mean of the u_i in place of u breaks the identity.
(b) Statistically: over n independent minibatches, the mean gradients of ``cfm_loss`` and of
    ``fm_loss`` (against the exact empirical marginal field, at independently drawn x ~ p_t) agree:
    for every parameter component j, z_j = (ḡ_cfm − ḡ_fm)_j / sqrt(s²_cfm/n + s²_fm/n), and the
    row's error is max_j |z_j|. Its tolerance is the two-sided normal quantile for a family-wise
    false-alarm rate α = 1e-3 with a Bonferroni correction over the P components. Negative
    control: FM against the marginal of shifted data must exceed that threshold.

Theory sections cited here (pages under ``docs/theory/``):

- §6: ``docs/theory/flow-matching.md#flow-matching-objectives``
"""

from __future__ import annotations

from collections.abc import Iterator
from statistics import NormalDist

import torch
from torch import Tensor, nn

import cnftools
from cnftools.cases import PATH_CASES
from cnftools.training.objectives import empirical_posterior, theorem2_terms
from cnftools.validation._framework import Check, Context

SECTION = 6
SECTIONS = (6,)  # the theory sections its rows check
TITLE = "Theorem 2: flow matching and conditional flow matching have equal gradients"

FALSE_ALARM = 1e-3
"""Family-wise false-alarm rate of the statistical gradient check (b)."""


def empirical_problem(
    n_points: int, dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Data points (n, dim) spread over a few units and non-uniform weights (n,) summing to 1."""
    data = 1.5 * torch.randn(n_points, dim, generator=generator, dtype=dtype, device=device)
    weights = 0.5 + torch.rand(n_points, generator=generator, dtype=dtype, device=device)
    return data, weights / weights.sum()


def small_field(dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A small, fixed-initialisation MLPField (tanh, so every parameter gets a gradient)."""
    torch.manual_seed(seed)
    time = cnftools.TimeFeatures(features=5)
    return cnftools.MLPField(dim, hidden=(16, 16), activation="tanh", time=time).to(
        device=device, dtype=dtype
    )


def _flat_grad(loss: Tensor, params: list[Tensor], retain: bool = False) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain)
    return torch.cat([g.reshape(-1) for g in grads])


def pointwise_errors(
    path: cnftools.GaussianPath,
    field: nn.Module,
    x: Tensor,
    t: Tensor,
    data: Tensor,
    weights: Tensor,
    marginal_velocity: Tensor | None,
) -> dict[str, float]:
    """Relative errors of the value and gradient forms of the pointwise Theorem 2 identity."""
    params = [p for p in field.parameters() if p.requires_grad]
    terms = theorem2_terms(field, path, x, t, data, weights, marginal_velocity)
    gap = terms["cfm"] - terms["fm"] - terms["variance"]
    value_error = float(gap.detach().abs().max() / terms["cfm"].detach().abs().max())
    g_cfm = _flat_grad(terms["cfm"].sum(), params, retain=True)
    g_fm = _flat_grad(terms["fm"].sum(), params)
    grad_error = float((g_cfm - g_fm).abs().max() / g_fm.abs().max())
    return {"value": value_error, "gradient": grad_error}


def gradient_z_scores(
    path: cnftools.GaussianPath,
    field: nn.Module,
    data: Tensor,
    weights: Tensor,
    *,
    n_batches: int,
    batch_size: int,
    generator: torch.Generator,
    t_max: float = 0.95,
    fm_data: Tensor | None = None,
) -> Tensor:
    """Per-component z-scores of mean(∇ L_CFM) − mean(∇ L_FM) over independent minibatches.

    CFM batches draw x1 ~ q, t ~ U[0, t_max), x0 ~ N(0, I); FM batches draw their own
    x = ψ_t(x0) from the same law and regress on the empirical marginal field of ``fm_data``
    (default: ``data``; pass other points for a negative control).
    """
    params = [p for p in field.parameters() if p.requires_grad]
    marginal = cnftools.MixtureMarginal(path, data if fm_data is None else fm_data, None, weights)
    like = data
    g_cfm, g_fm = [], []
    for _ in range(n_batches):
        index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        loss = cnftools.cfm_loss(field, path, data[index], generator=generator, t_max=t_max)
        g_cfm.append(_flat_grad(loss, params))
        index = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        t = t_max * torch.rand(
            batch_size, generator=generator, dtype=like.dtype, device=like.device
        )
        x = path.sample(t, data[index], generator)
        g_fm.append(_flat_grad(cnftools.fm_loss(field, marginal, x, t), params))
    a, b = torch.stack(g_cfm), torch.stack(g_fm)
    scale = torch.sqrt(a.var(dim=0) / n_batches + b.var(dim=0) / n_batches)
    diff = a.mean(dim=0) - b.mean(dim=0)
    return torch.where(scale > 0, diff / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0)


def z_threshold(n_components: int, false_alarm: float = FALSE_ALARM) -> float:
    """Two-sided Bonferroni threshold: P(max_j |z_j| > z) ≤ false_alarm under the null."""
    return NormalDist().inv_cdf(1 - false_alarm / (2 * n_components))


def run(ctx: Context) -> Iterator[Check]:
    dim, n_points, batch = 2, 7, 32
    generator = ctx.generator(6)
    data, weights = empirical_problem(n_points, dim, generator, ctx.dtype, ctx.device)
    field = small_field(dim, ctx.dtype, ctx.device, seed=ctx.seed)
    yield from _pointwise_rows(ctx, generator, field, data, weights, batch)
    yield from _statistical_rows(ctx, field, data, weights, batch)


def _pointwise_rows(
    ctx: Context,
    generator: torch.Generator,
    field: nn.Module,
    data: Tensor,
    weights: Tensor,
    batch: int,
) -> Iterator[Check]:
    """(a) The pointwise identity on every path case; a wrong u as the negative control."""
    dim = data.shape[1]
    # float64: sums of ~N·d products of O(1–100) terms, roundoff ~1e-14 relative; 1e-10 leaves
    # margin. float32: eps ≈ 1.2e-7 times the same conditioning, plus the posterior softmax: 1e-4.
    tol = ctx.tolerance(1e-10, 1e-4)
    for name, case in PATH_CASES.items():
        path = case.build()
        x = 2 * torch.randn(batch, dim, generator=generator, dtype=ctx.dtype, device=ctx.device)
        t = 0.05 + 0.85 * torch.rand(batch, generator=generator, dtype=ctx.dtype, device=ctx.device)
        if case.affine:
            marginal = cnftools.MixtureMarginal(path, data, None, weights)
            u = marginal.velocity(x, t)
            log_w, u_i = empirical_posterior(path, x, t, data, weights)
            mixed = (log_w.exp().unsqueeze(-1) * u_i).sum(dim=1)
            yield Check(
                "§6",
                "Σ w_i u_t(x|x1ⁱ) = MixtureMarginal.velocity",
                name,
                float((mixed - u).abs().max() / u.abs().max()),
                tol,
                "roundoff; two implementations of u_t",
            )
            subject = f"{name}, u from MixtureMarginal"
        else:
            u = None
            subject = f"{name}, u = Σ w_i u_i"
        errors = pointwise_errors(path, field, x, t, data, weights, u)
        yield Check(
            "§6",
            "Thm 2 pointwise: values",
            subject,
            errors["value"],
            tol,
            "roundoff; exact identity",
        )
        yield Check(
            "§6",
            "Thm 2 pointwise: ∇θ",
            subject,
            errors["gradient"],
            tol,
            "roundoff; exact identity",
        )
        if name == "OT(sigma_min=0.1)":
            log_w, u_i = empirical_posterior(path, x, t, data, weights)
            wrong = u_i.mean(dim=1)
            bad = pointwise_errors(path, field, x, t, data, weights, wrong)
            yield Check(
                "§6",
                "Thm 2 pointwise with unweighted mean of u_i (negative control)",
                name,
                bad["value"],
                tol,
                "the identity must detect a wrong u",
                expect_fail=True,
            )


def _statistical_rows(
    ctx: Context, field: nn.Module, data: Tensor, weights: Tensor, batch: int
) -> Iterator[Check]:
    """(b) Mean gradients of CFM and FM over minibatches agree; FM on shifted data must not."""
    n_batches = 500 if ctx.full else 100
    stat_paths = (
        ["OT(sigma_min=0.1)", "VE(0.1, 5)", "VP(1, 5)"] if ctx.full else ["OT(sigma_min=0.1)"]
    )
    n_params = sum(p.numel() for p in field.parameters())
    threshold = z_threshold(n_params)
    why = f"family-wise false alarm {FALSE_ALARM:g}, Bonferroni over {n_params} components"
    for name in stat_paths:
        path = PATH_CASES[name].build()
        z = gradient_z_scores(
            path,
            field,
            data,
            weights,
            n_batches=n_batches,
            batch_size=batch,
            generator=ctx.generator(60),
        )
        yield Check(
            "§6",
            "Thm 2 statistical: max_j |z_j| of E∇L_CFM − E∇L_FM",
            f"{name}, {n_batches} batches × {batch}",
            float(z.abs().max()),
            threshold,
            why,
        )
    path = PATH_CASES["OT(sigma_min=0.1)"].build()
    z = gradient_z_scores(
        path,
        field,
        data,
        weights,
        n_batches=n_batches,
        batch_size=batch,
        generator=ctx.generator(61),
        fm_data=data + 0.5,
    )
    yield Check(
        "§6",
        "Thm 2 statistical, FM on shifted data (negative control)",
        f"OT(sigma_min=0.1), {n_batches} batches × {batch}",
        float(z.abs().max()),
        threshold,
        "the test must detect a wrong marginal field",
        expect_fail=True,
    )
