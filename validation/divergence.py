"""theory §11: exact divergence against the Jacobian trace, and Hutchinson's estimator.

- Every exact strategy (``auto``, ``batched``, ``loop``, ``forward`` and ``method="loop"``) against
  the trace of the per-sample Jacobian from ``torch.autograd.functional.jacobian`` (B * d separate
  backward passes), for smooth random MLP fields on several event shapes. Error: the largest
  |div - tr J| / (Σ|J_ii| + 1).
- The exact divergence of the Theorem-3 conditional field of each affine path against its closed
  form d s_t s_t' / s_t² (theory §10 with one data point).
- Hutchinson (Rademacher and Gaussian probes): the mean of K probes minus the exact trace, in units
  of the true standard error sqrt(Var / K), Var computed from the Jacobian
  (Rademacher: Σ_{i≠j} A_ij (A_ij + A_ji); Gaussian: ‖A‖_F² + tr A²); the reported standard error
  against the true one; fixed probes reproduce bit for bit. Negative control: probes uniform on
  [-1, 1] (E[εεᵀ] = I/3, so the estimate is biased by a factor 1/3) must fail the 5-sigma test.

Theory sections cited here (pages under ``docs/theory/``):

- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
- §11: ``docs/theory/divergence-and-continuity.md#divergence``
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

import cnftools
from cnftools.cases import PATH_CASES
from cnftools.validation._figures import pyplot
from cnftools.validation._framework import Check, Context

SECTION = 11
SECTIONS = (11,)  # the theory sections its rows check
TITLE = "Divergence: exact strategies and Hutchinson's estimator"

_SIGMAS = 5.0


class _MLP(nn.Module):
    def __init__(self, event: tuple[int, ...], generator: torch.Generator, width: int = 32) -> None:
        super().__init__()
        dim = math.prod(event)
        self.l1, self.l2, self.l3 = (
            nn.Linear(dim + 1, width),
            nn.Linear(width, width),
            nn.Linear(width, dim),
        )
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = torch.cat([x.reshape(x.shape[0], -1), t[:, None]], dim=1)
        h = torch.tanh(self.l2(nn.functional.silu(self.l1(h))))
        return self.l3(h).reshape(x.shape)


def _jacobians(v: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    batch, dim = x.shape[0], x[0].numel()
    full = torch.autograd.functional.jacobian(lambda z: v(z, t), x).reshape(batch, dim, batch, dim)
    return torch.stack([full[b, :, b, :] for b in range(batch)])


def _variance(jac: Tensor, noise: str) -> Tensor:
    if noise == "rademacher":
        off = jac - torch.diag_embed(jac.diagonal(dim1=1, dim2=2))
        return (off * (off + off.transpose(1, 2))).sum((1, 2))
    return (jac**2).sum((1, 2)) + (jac * jac.transpose(1, 2)).sum((1, 2))


def _problem(ctx: Context, event: tuple[int, ...], batch: int, offset: int):
    generator = ctx.generator(offset)
    field = _MLP(event, torch.Generator().manual_seed(ctx.seed + offset))
    field = field.to(device=ctx.device, dtype=ctx.dtype)
    x = torch.randn(batch, *event, generator=generator, dtype=ctx.dtype, device=ctx.device)
    t = torch.rand(batch, generator=generator, dtype=ctx.dtype, device=ctx.device)
    return field, x, t, _jacobians(field, x, t)


def run(ctx: Context) -> Iterator[Check]:
    events = [(1,), (2,), (7,), (2, 3), (1, 4, 4)] + ([(32,), (3, 4, 4)] if ctx.full else [])
    batch = 16 if ctx.full else 4
    problems = [_problem(ctx, event, batch, i) for i, event in enumerate(events)]
    yield from _exact_rows(ctx, problems, events, batch)
    yield from _conditional_field_rows(ctx)
    yield from _hutchinson_rows(ctx, problems, batch)
    if ctx.full:
        _figure_cost(ctx)


def _exact_rows(
    ctx: Context,
    problems: list[tuple[nn.Module, Tensor, Tensor, Tensor]],
    events: list[tuple[int, ...]],
    batch: int,
) -> Iterator[Check]:
    """Every exact strategy against the trace of the per-sample autograd Jacobian."""
    tolerance = ctx.tolerance(1e-12, 2e-5)
    for strategy in ("auto", "batched", "loop", "forward"):
        worst = 0.0
        for field, x, t, jac in problems:
            trace = jac.diagonal(dim1=1, dim2=2)
            div = cnftools.divergence(field, x, t, cnftools.Exact(strategy))
            worst = max(
                worst, float(((div - trace.sum(-1)).abs() / (trace.abs().sum(-1) + 1)).max())
            )
        label = f"Exact({strategy!r})"
        yield Check(
            "§11",
            "exact divergence vs trace of autograd Jacobian",
            f"{label}; MLP fields, events {events}, B={batch}",
            worst,
            tolerance,
            "same VJPs in another order: a few ulps times d",
        )


def _conditional_field_rows(ctx: Context) -> Iterator[Check]:
    """The conditional field is affine in x: div u_t(x|x1) = d * (s s') / s^2 exactly."""
    for name in ("OT(sigma_min=0)", "VE(0.1, 5)", "VP(0.1, 20)", "cosine (user, affine)"):
        path = PATH_CASES[name].build()
        generator = ctx.generator(100)
        x1 = torch.randn(8, 2, 3, generator=generator, dtype=ctx.dtype, device=ctx.device)
        x = torch.randn(8, 2, 3, generator=generator, dtype=ctx.dtype, device=ctx.device)
        t = torch.linspace(0.05, 0.95, 8, dtype=ctx.dtype, device=ctx.device)
        div = cnftools.divergence(
            lambda x, s, x1=x1, p=path: p.conditional_velocity(x, s, x1), x, t
        )
        closed = 6 * path.noise_variance_rate(t) / path.noise_variance(t)
        yield Check(
            "§11",
            "exact div of u_t(x|x1) vs d s s'/s^2",
            f"{name}; t in 0.05..0.95, event (2, 3)",
            float(((div - closed).abs() / closed.abs().clamp(min=1)).max()),
            ctx.tolerance(1e-12, 1e-5),
            "affine field: its Jacobian is (s s'/s^2) I exactly",
        )


def _hutchinson_rows(
    ctx: Context, problems: list[tuple[nn.Module, Tensor, Tensor, Tensor]], batch: int
) -> Iterator[Check]:
    """Hutchinson's mean and reported standard error against the Jacobian's; a biased negative
    control; fixed probes reproduce."""
    n_probes = 4000 if ctx.full else 1000
    field, x, t, jac = problems[2]  # event (7,)
    exact = jac.diagonal(dim1=1, dim2=2).sum(-1)
    for noise in ("rademacher", "gaussian"):
        spec = cnftools.Hutchinson(n_probes, noise, generator=ctx.generator(200))
        result = cnftools.velocity_and_divergence(field, x, t, spec)
        estimate, stderr = result.divergence, result.stderr
        true_stderr = (_variance(jac, noise) / n_probes).sqrt()
        yield Check(
            "§11",
            "Hutchinson mean - exact, in true standard errors",
            f"{noise}, K={n_probes}, event (7,), B={batch}",
            float(((estimate - exact).abs() / true_stderr).max()),
            _SIGMAS,
            "unbiased: |z| > 5 has probability 6e-7 per sample",
        )
        yield Check(
            "§11",
            "reported vs true standard error (relative)",
            f"{noise}, K={n_probes}",
            float(((stderr - true_stderr).abs() / true_stderr).max()),
            0.2,
            "sample std of K draws: relative error ~ sqrt(kurtosis / 4K) < 0.1",
        )
    probes = torch.rand(
        (n_probes, *x.shape), generator=ctx.generator(300), dtype=ctx.dtype, device=ctx.device
    )
    probes = 2 * probes - 1
    biased = cnftools.divergence(field, x, t, cnftools.Hutchinson(probes=probes))
    true_stderr = (_variance(jac, "gaussian") / n_probes).sqrt()
    yield Check(
        "§11",
        "negative control: uniform[-1,1] probes (E[ee^T] = I/3)",
        f"K={n_probes}",
        float(((biased - exact).abs() / true_stderr).max()),
        _SIGMAS,
        "a biased estimator must be caught",
        expect_fail=True,
    )
    fixed = probes[:3]
    first = cnftools.divergence(field, x, t, cnftools.Hutchinson(probes=fixed))
    second = cnftools.divergence(field, x, t, cnftools.Hutchinson(probes=fixed))
    yield Check(
        "§11",
        "fixed probes reproduce",
        "K=3, same probes twice",
        float((first - second).abs().max()),
        0.0,
        "same inputs, same arithmetic",
    )


def _figure_cost(ctx: Context) -> None:
    """Wall time of exact (auto), the plain loop and Hutchinson (K=1) against d (full mode)."""
    path = ctx.figure_path("divergence_cost_vs_d.png")
    if path is None:
        return
    plt = pyplot()

    dims, batch = [2, 8, 32, 128], 64
    methods = {
        "exact (auto)": cnftools.Exact(),
        "plain loop": cnftools.Exact("loop"),
        "Hutchinson K=1": cnftools.Hutchinson(),
    }
    timings: dict[str, list[float]] = {name: [] for name in methods}
    for d in dims:
        torch.manual_seed(ctx.seed)
        field = nn.Sequential(nn.Linear(d, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU())
        field.append(nn.Linear(256, d))
        field = field.to(device=ctx.device, dtype=ctx.dtype)

        def v(x: Tensor, t: Tensor, field: nn.Module = field) -> Tensor:
            return field(x)

        x = torch.randn(batch, d, generator=ctx.generator(700), dtype=ctx.dtype, device=ctx.device)
        t = torch.full((batch,), 0.5, dtype=ctx.dtype, device=ctx.device)
        for name, method in methods.items():
            cnftools.divergence(v, x, t, method)  # warm-up
            best = math.inf
            for _ in range(3):
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                start = time.perf_counter()
                cnftools.divergence(v, x, t, method)
                if ctx.device.type == "cuda":
                    torch.cuda.synchronize(ctx.device)
                best = min(best, time.perf_counter() - start)
            timings[name].append(best * 1e3)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, values in timings.items():
        ax.loglog(dims, values, "o-", label=name)
    ax.set(
        xlabel="d", ylabel="ms per call (best of 3)", title=f"divergence cost, B={batch}, MLP 3×256"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
