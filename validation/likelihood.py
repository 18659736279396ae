r"""theory §3: the augmented-ODE log-likelihood against closed forms (§9–§10), density evolution,
adjoint versus direct gradients.

Rows:

- NLL vs closed form: ``log_likelihood(marginal, x, marginal.prior())`` (the exact :math:`p_0`)
  against the marginal's closed-form :math:`\log p_1(x)`, for OT, VE and VP paths with Gaussian and
  mixture data (empirical data in full mode). The NFE of each solve is in the subject.
- prior mismatch (negative control): the same solve scored under :math:`\mathcal N(0, I)` on VE,
  whose :math:`p_0` is far from it, must *miss* :math:`\log p_1` by far more than solver error.
- density evolution: :math:`\log p_t(z_t)` along the trajectories at intermediate times against
  the marginal's :math:`\log p_t`.
- adjoint vs direct: relative difference of the gradients (w.r.t. ``x`` and the parameters) of a
  small MLP field's log-likelihood by the two methods.
- full mode: empirical data with 2000 points in d = 32 (closed-form divergence), Hutchinson's
  estimate within four standard errors of the exact value.

With an output folder, writes ``nll_error_vs_tolerance.png``: the NLL error against ``rtol`` for
dopri5 and against the number of steps for rk4.

Theory sections cited here (pages under ``docs/theory/``):

- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

import cnftools
from cnftools.cases import DATA_CASES
from cnftools.training.features import TimeFeatures
from cnftools.training.models import MLPField
from cnftools.validation._figures import pyplot
from cnftools.validation._framework import Check, Context

SECTION = 3.0
SECTIONS = (3, 9)  # the theory sections its rows check
TITLE = "Likelihood by the augmented ODE"

_PATHS = {
    "OT(0.1)": lambda: cnftools.OTPath(0.1),
    "VE(0.1, 5)": lambda: cnftools.VEPath(0.1, 5.0),
    "VP(0.1, 20)": lambda: cnftools.VPPath(0.1, 20.0),
}


def _cases(full: bool) -> list[tuple[str, str]]:
    quick = [
        ("OT(0.1)", "gaussian d=3"),
        ("VE(0.1, 5)", "gaussian d=3"),
        ("VP(0.1, 20)", "gaussian d=3"),
        ("OT(0.1)", "mixture K=4 d=2"),
        ("VP(0.1, 20)", "mixture K=3 d=1"),
    ]
    if not full:
        return quick
    more = [
        ("OT(0.1)", "gaussian d=8"),
        ("VE(0.1, 5)", "gaussian d=8"),
        ("VP(0.1, 20)", "gaussian d=8"),
        ("VE(0.1, 5)", "mixture K=4 d=2"),
        ("OT(0.1)", "empirical N=40 d=3 (weighted)"),
        ("VE(0.1, 5)", "empirical N=40 d=3 (weighted)"),
    ]
    return quick + more


def run(ctx: Context) -> Iterator[Check]:
    dev, dt = ctx.device, ctx.dtype
    tol = 1e-11 if ctx.full else 1e-9
    solver = {"rtol": tol, "atol": tol} if dt == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    bound = ctx.tolerance(1e-7, 1e-3)
    why = (
        f"dopri5 at rtol=atol={solver['rtol']:g}: error a small multiple of the tolerance"
        if dt == torch.float64
        else "float32 rounding over ~100 steps of a ~5-nat log-density"
    )
    for i, (path_name, data) in enumerate(_cases(ctx.full)):
        marginal = DATA_CASES[data].marginal(_PATHS[path_name](), dtype=dt, device=dev)
        x = marginal.sample(8, 1.0, ctx.generator(i))
        times = [0.25, 0.5, 0.75] if i == 0 else None
        result = cnftools.log_likelihood(marginal, x, marginal.prior(), times=times, **solver)
        error = float((result.log_prob - marginal.log_prob(x, 1.0)).abs().max())
        yield Check(
            "§3",
            "log p_1 by the augmented ODE vs closed form (exact p_0)",
            f"{path_name}, {data}, B=8, NFE={result.nfe.forward}",
            error,
            bound,
            why,
        )
        if times is not None:
            worst = max(
                float(
                    (result.log_prob_t[j] - marginal.log_prob(result.trajectory[j], t)).abs().max()
                )
                for j, t in enumerate(times)
            )
            yield Check(
                "§3",
                "density evolution: log p_t(z_t) along trajectories vs closed form",
                f"{path_name}, {data}, t in {times}, NFE={result.nfe.forward}",
                worst,
                bound,
                "same solve as the row above, read at intermediate (stepped-to) times",
            )

    # Negative control: VE's p_0 is N(m, S + 25 I), not N(0, I).
    marginal = DATA_CASES["gaussian d=3"].marginal(_PATHS["VE(0.1, 5)"](), dtype=dt, device=dev)
    x = marginal.sample(8, 1.0, ctx.generator(100))
    result = cnftools.log_likelihood(marginal, x, **solver)
    yield Check(
        "§9",
        "standard prior instead of the true p_0 misses log p_1 (negative control)",
        f"VE(0.1, 5), gaussian d=3, NFE={result.nfe.forward}",
        float((result.log_prob - marginal.log_prob(x, 1.0)).abs().max()),
        1e-3,
        "log N(z0; 0, I) - log p_0(z0) is tens of nats for VE (p_0 has std ~5), far above solver error",
        expect_fail=True,
    )

    yield _adjoint_check(ctx)
    if ctx.full:
        yield _hard_field_check(ctx)
        yield _hutchinson_check(ctx)
    if ctx.out is not None:
        _figure(ctx)
        _figure_density_evolution(ctx)


def _small_mlp(ctx: Context) -> MLPField:
    torch.manual_seed(ctx.seed)
    time = TimeFeatures(features=5, max_frequency=2.0)
    return MLPField(3, (16, 16), time=time).to(ctx.device, ctx.dtype)


def _adjoint_check(ctx: Context) -> Check:
    v = _small_mlp(ctx)
    x0 = torch.randn(4, 3, generator=ctx.generator(200), dtype=ctx.dtype, device=ctx.device)
    tol = 1e-10 if ctx.dtype == torch.float64 else 1e-6
    grads, nfes = [], []
    for adjoint in (False, True):
        x = x0.clone().requires_grad_(True)
        v.zero_grad()
        config = cnftools.SolverConfig(rtol=tol, atol=tol, adjoint=adjoint)
        result = cnftools.log_likelihood(v, x, config=config)
        result.log_prob.sum().backward()
        grads.append(torch.cat([x.grad.flatten()] + [p.grad.flatten() for p in v.parameters()]))
        nfes.append(result.nfe)
    error = float((grads[1] - grads[0]).norm() / grads[0].norm())
    return Check(
        "§3",
        "adjoint vs direct gradient of log p_1 (relative)",
        f"MLP 3-16-16-3, dopri5 rtol={tol:g}, NFE fwd={nfes[0].forward}, "
        f"adjoint bwd={nfes[1].backward}",
        error,
        ctx.tolerance(1e-6, 1e-2),
        "two tolerance-controlled approximations of one gradient",
    )


def _hard_field_check(ctx: Context) -> Check:
    gen = ctx.generator(300)
    d, n_points, sigma = 32, 2000, 0.2
    points = 1.5 * torch.randn(n_points, d, generator=gen, dtype=ctx.dtype, device=ctx.device)
    marginal = cnftools.MixtureMarginal(cnftools.OTPath(sigma), points)
    x = marginal.sample(8, 1.0, gen)
    tol = 1e-10 if ctx.dtype == torch.float64 else 1e-6
    result = cnftools.log_likelihood(marginal, x, rtol=tol, atol=tol)
    sq = ((x[:, None, :] - points[None]) ** 2).sum(-1)
    expected = (
        torch.logsumexp(-0.5 * sq / sigma**2, dim=1)
        - math.log(n_points)
        - 0.5 * d * math.log(2 * math.pi * sigma**2)
    )
    return Check(
        "§10",
        "empirical data, many points: log p_1 vs closed-form mixture density",
        f"OT(0.2), N=2000, d=32, closed-form divergence, NFE={result.nfe.forward}",
        float((result.log_prob - expected).abs().max()),
        ctx.tolerance(1e-8, 1e-2),
        "per-sample error norm; ~50-nat divergence integral over ~100 steps",
    )


def _hutchinson_check(ctx: Context) -> Check:
    v = _small_mlp(ctx)
    x = torch.randn(6, 3, generator=ctx.generator(400), dtype=ctx.dtype, device=ctx.device)
    tol = ctx.tolerance(1e-9, 1e-6)  # float32: tolerances below ~5e-7 cannot be met
    with torch.no_grad():
        exact = cnftools.log_likelihood(v, x, rtol=tol, atol=tol).log_prob
        result = cnftools.log_likelihood(
            v,
            x,
            rtol=tol,
            atol=tol,
            estimator=cnftools.Hutchinson(64, generator=ctx.generator(401)),
        )
    z = float(((result.log_prob - exact).abs() / result.stderr).max())
    return Check(
        "§11",
        "Hutchinson (64 fixed probes) vs exact, in standard errors",
        f"MLP 3-16-16-3, B=6, NFE={result.nfe.forward}",
        z,
        4.0,
        "unbiased estimator: |error| / stderr below 4 (fixed seed)",
    )


def _figure(ctx: Context) -> None:
    path = ctx.figure_path("nll_error_vs_tolerance.png")
    if path is None:
        return
    plt = pyplot()

    marginal = DATA_CASES["gaussian d=3"].marginal(
        cnftools.OTPath(0.1), dtype=torch.float64, device=ctx.device
    )
    x = marginal.sample(8, 1.0, ctx.generator(500))
    exact = marginal.log_prob(x, 1.0)
    prior = marginal.prior()
    rtols = [1e-3, 1e-5, 1e-7, 1e-9, 1e-11]
    steps = [4, 8, 16, 32, 64, 128]
    adaptive, fixed = [], []
    for tol in rtols:
        r = cnftools.log_likelihood(marginal, x, prior, rtol=tol, atol=tol)
        adaptive.append((float((r.log_prob - exact).abs().max()), r.nfe.forward))
    for n in steps:
        grid = cnftools.SolverConfig("rk4", steps=n)
        lp = cnftools.log_likelihood(marginal, x, prior, config=grid).log_prob
        fixed.append(float((lp - exact).abs().max()))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].loglog(rtols, [e for e, _ in adaptive], "o-", label="dopri5")
    axes[0].loglog(rtols, rtols, "k:", label="error = rtol")
    for tol, (err, nfe) in zip(rtols, adaptive, strict=True):
        axes[0].annotate(f"{nfe}", (tol, err), fontsize=7)
    axes[0].set(xlabel="rtol = atol", ylabel="max |NLL error| (nats)", title="dopri5 (NFE marked)")
    axes[0].invert_xaxis()
    axes[0].legend()
    axes[1].loglog(steps, fixed, "s-", label="rk4")
    axes[1].loglog(steps, [fixed[0] * (steps[0] / n) ** 4 for n in steps], "k:", label="slope -4")
    axes[1].set(xlabel="steps", ylabel="max |NLL error| (nats)", title="rk4, fixed grid")
    axes[1].legend()
    fig.suptitle("OT(0.1), Gaussian d=3: log-likelihood error vs solver effort")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _figure_density_evolution(ctx: Context) -> None:
    """p_t along ODE trajectories (dots) on the closed-form marginal density (lines), 1-D mixture."""
    path = ctx.figure_path("density_evolution.png")
    if path is None:
        return
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6), sharey=False)
    times = [0.0, 0.25, 0.5, 0.75, 1.0]
    grid = torch.linspace(-4.5, 4.5, 400, dtype=ctx.dtype, device=ctx.device)[:, None]
    for ax, path_name in zip(axes, ["OT(0.1)", "VE(0.1, 5)", "VP(0.1, 20)"], strict=True):
        marginal = DATA_CASES["mixture K=3 d=1"].marginal(
            _PATHS[path_name](), dtype=ctx.dtype, device=ctx.device
        )
        x = marginal.sample(60, 1.0, ctx.generator(600))
        with torch.no_grad():
            r = cnftools.log_likelihood(
                marginal,
                x,
                marginal.prior(),
                times=times,
                rtol=ctx.tolerance(1e-8, 1e-6),
                atol=ctx.tolerance(1e-8, 1e-6),
            )
        for j, t in enumerate(times):
            density = marginal.log_prob(grid, t).exp().cpu().double().numpy()
            (line,) = ax.plot(grid[:, 0].cpu().double().numpy(), density, lw=1.2, label=f"t={t}")
            ax.plot(
                r.trajectory[j, :, 0].cpu().double().numpy(),
                r.log_prob_t[j].exp().cpu().double().numpy(),
                "o",
                ms=3,
                color=line.get_color(),
            )
        ax.set(title=f"{path_name}: closed-form p_t (lines), ODE (dots)", xlabel="x")
        ax.set_xlim(-4.5, 4.5)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
