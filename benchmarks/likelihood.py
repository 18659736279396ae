"""Likelihood throughput: cnftools.log_likelihood against flow_matching's ODESolver.compute_likelihood.

Both compute log p_1(x) of the same MLP field (3 hidden layers of 256, SiLU, float64) with the same
solver on the same grid: torchdiffeq's ``midpoint`` on a fixed grid of ``--steps`` steps from
t = 1 to t = 0 (step 1/steps, a dyadic number, so both libraries build identical grids), the
standard-normal prior, no gradients. Conventions: flow_matching integrates from t = 1 to t = 0 and
adds its log-det (the integral of the divergence over [1, 0], i.e. minus cnftools'
``divergence_integral``) to log p_0(x_0); cnftools does the same arithmetic, so the two numbers
agree to rounding (the ``max|dNLL|`` column). flow_matching passes the solver's scalar time to
the model; the benchmark's adapter expands it to shape (B,), as cnftools does itself.

- exact divergence: flow_matching loops over the d outputs with ``create_graph=True``;
  cnftools uses one forward pass and :mod:`cnftools.divergences`'s size-chosen strategy.
- Hutchinson: one Rademacher probe, held fixed for the solve by both; flow_matching draws it from
  the global RNG, so the benchmark re-draws the same probe from the same seed and hands it to
  cnftools (``Hutchinson(probes=...)``): the results must then agree to rounding. (flow_matching 1.0.10 builds
  that probe in the default dtype, which breaks float64 data; the benchmark sets the default
  dtype to float64 around its call.)

Times are the minimum over interleaved rounds (a load spike hits both libraries alike).

Memory: direct backpropagation keeps every step's graph; the adjoint method keeps the end states
only. Reported is the memory held for the backward pass after the forward solve (the distinct
storages saved by autograd, via ``torch.autograd.graph.saved_tensors_hooks``; parameters
excluded), and the wall time of forward + backward, as the number of rk4 steps grows.

Run: ``python benchmarks/likelihood.py`` (about 3 minutes on 2 CPU cores; ``--quick`` for a smoke
run; ``--threads 1`` to pin one intra-op thread).
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import time
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

import cnftools

try:
    from flow_matching.solver import ODESolver
except ImportError:  # pragma: no cover - optional comparison
    ODESolver = None

F64 = torch.float64


def mlp_field(d: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    time = cnftools.TimeFeatures(features=17)
    return cnftools.MLPField(d, (256, 256, 256), dtype=F64, time=time)


class _FMAdapter(nn.Module):
    """flow_matching calls ``model(x=x, t=t)`` with the solver's scalar t."""

    def __init__(self, field: nn.Module) -> None:
        super().__init__()
        self.field = field

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.field(x, t.reshape(1).expand(x.shape[0]) if t.dim() == 0 else t)


def _std_normal_log_prob(z: Tensor) -> Tensor:
    return -0.5 * z.pow(2).sum(dim=1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def _timed(fn: Callable[[], Tensor]) -> tuple[float, Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def compare(d: int, batch: int, steps: int, rounds: int, divergence: str) -> dict[str, object]:
    v = mlp_field(d)
    for p in v.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, d, dtype=F64, generator=torch.Generator().manual_seed(1))
    solver = ODESolver(velocity_model=_FMAdapter(v))
    grid = torch.tensor([1.0, 0.0], dtype=F64)
    seed = 1234

    def fm() -> Tensor:
        torch.manual_seed(seed)  # flow_matching draws its Hutchinson probe from the global RNG
        # flow_matching builds that probe as (bool * 2.0 - 1.0), i.e. in the *default* dtype, and
        # its einsum with float64 data then fails: make float64 the default for the call.
        default = torch.get_default_dtype()
        torch.set_default_dtype(F64)
        try:
            _, log_p = solver.compute_likelihood(
                x_1=x,
                log_p0=_std_normal_log_prob,
                step_size=1.0 / steps,
                method="midpoint",
                time_grid=grid,
                exact_divergence=divergence == "exact",
            )
        finally:
            torch.set_default_dtype(default)
        return log_p

    torch.manual_seed(seed)
    probe = ((torch.randn_like(x) < 0).to(F64) * 2.0 - 1.0)[None]  # the same probe
    midpoint = cnftools.SolverConfig("midpoint", steps=steps)

    def ours() -> Tensor:
        with torch.no_grad():
            spec = cnftools.Hutchinson(probes=probe) if divergence != "exact" else None
            return cnftools.log_likelihood(v, x, estimator=spec, config=midpoint).log_prob

    times = {"fm": [], "ours": []}
    outs: dict[str, Tensor] = {}
    for _ in range(rounds):
        for name, fn in (("fm", fm), ("ours", ours)):
            seconds, outs[name] = _timed(fn)
            times[name].append(seconds)
    t_fm, t_ours = min(times["fm"]), min(times["ours"])
    return {
        "d": d,
        "B": batch,
        "divergence": divergence,
        "fm_s": t_fm,
        "ours_s": t_ours,
        "ratio": t_fm / t_ours,
        "dnll": float((outs["fm"] - outs["ours"]).abs().max()),
    }


def fixed_grid_default(d: int, batch: int, rounds: int, steps: int = 20) -> dict[str, object]:
    """The issue's fixed-grid case: a trainable 3x128 SiLU MLP, midpoint with 20 steps, exact
    divergence, each library's *default* call (no ``torch.no_grad()``): flow_matching's
    ``compute_likelihood`` (``enable_grad=False`` by default) against ``cnftools.log_likelihood``
    (no graph unless gradients are asked for), and cnftools under ``no_grad`` for reference."""
    torch.manual_seed(d)
    v = cnftools.MLPField(d, (128, 128, 128), dtype=F64)  # parameters require grad
    x = torch.randn(batch, d, dtype=F64, generator=torch.Generator().manual_seed(3))
    solver = ODESolver(velocity_model=_FMAdapter(v))
    grid = torch.tensor([1.0, 0.0], dtype=F64)

    def fm() -> Tensor:
        _, log_p = solver.compute_likelihood(
            x_1=x,
            log_p0=_std_normal_log_prob,
            step_size=1.0 / steps,
            method="midpoint",
            time_grid=grid,
            exact_divergence=True,
        )
        return log_p

    midpoint = cnftools.SolverConfig("midpoint", steps=steps)

    def ours() -> Tensor:
        return cnftools.log_likelihood(v, x, config=midpoint).log_prob

    def ours_no_grad() -> Tensor:
        with torch.no_grad():
            return cnftools.log_likelihood(v, x, config=midpoint).log_prob

    times: dict[str, list[float]] = {"fm": [], "ours": [], "ours_ng": []}
    outs: dict[str, Tensor] = {}
    for _ in range(rounds):
        for name, fn in (("fm", fm), ("ours", ours), ("ours_ng", ours_no_grad)):
            seconds, outs[name] = _timed(fn)
            times[name].append(seconds)
    best = {k: min(t) for k, t in times.items()}
    return {
        "d": d,
        "B": batch,
        **best,
        "ratio": best["fm"] / best["ours"],
        "dnll": float((outs["fm"] - outs["ours"]).abs().max()),
    }


def memory(d: int, batch: int, steps: int, adjoint: bool) -> dict[str, object]:
    v = mlp_field(d)
    x = torch.randn(batch, d, dtype=F64, generator=torch.Generator().manual_seed(2))
    param_ptrs = {p.untyped_storage().data_ptr() for p in v.parameters()}
    refs: list[weakref.ref] = []

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in param_ptrs:
            refs.append(weakref.ref(t))
        return t

    gc.collect()
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # direct: grad=True (the default call keeps no graph); adjoint: the config asks for it
        config = cnftools.SolverConfig("rk4", steps=steps, adjoint=adjoint)
        result = cnftools.log_likelihood(v, x, config=config, grad=True)
    gc.collect()
    held: dict[int, int] = {}
    for ref in refs:
        t = ref()
        if t is not None:
            held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    result.log_prob.sum().backward()
    seconds = time.perf_counter() - start
    return {
        "steps": steps,
        "nfe_fwd": result.nfe.forward,
        "nfe_bwd": result.nfe.backward,
        "adjoint": adjoint,
        "held_mib": sum(held.values()) / 2**20,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small case of each kind")
    parser.add_argument("--steps", type=int, default=4, help="midpoint steps (power of 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--fixed-grid", action="store_true", help="only the default-call fixed-grid table"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if ODESolver is None:
        raise SystemExit("pip install --no-deps flow-matching to run this comparison")
    import flow_matching

    print(
        f"# torch {torch.__version__}, flow_matching {flow_matching.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.machine()}, float64, "
        f"midpoint with {args.steps} steps ({2 * args.steps} NFE), MLP 3x256 SiLU"
    )
    print(
        "\nDefault calls (trainable 3x128 SiLU MLP, no torch.no_grad()), midpoint, 20 steps, exact"
    )
    print(
        "\n| d | B | flow_matching (s) | cnftools (s) | speed-up | cnftools no_grad (s) | max dNLL |"
    )
    print("|---|---|---|---|---|---|---|")
    grid_cases = (
        [(2, 16), (64, 16)] if args.quick else [(d, b) for d in (2, 16, 64) for b in (16, 512)]
    )
    for d, batch in grid_cases:
        row = fixed_grid_default(d, batch, rounds=2 if batch >= 512 else 5)
        print(
            f"| {d} | {batch} | {row['fm']:.4f} | {row['ours']:.4f} | {row['ratio']:.2f}x | "
            f"{row['ours_ng']:.4f} | {row['dnll']:.1e} |",
            flush=True,
        )
    if args.fixed_grid:
        return
    print("\n| d | B | divergence | flow_matching (s) | cnftools (s) | speed-up | max abs dNLL |")
    print("|---|---|---|---|---|---|---|")
    cases = [(2, 16), (16, 16), (64, 16), (64, 512)] if not args.quick else [(16, 16)]
    for divergence in ("exact", "hutchinson"):
        for d, batch in cases:
            rounds = 1 if batch >= 512 else 3
            row = compare(d, batch, args.steps, rounds, divergence)
            print(
                f"| {row['d']} | {row['B']} | {divergence} | {row['fm_s']:.3f} | "
                f"{row['ours_s']:.3f} | {row['ratio']:.2f}x | {row['dnll']:.1e} |",
                flush=True,
            )
    print("\n| rk4 steps | NFE fwd | NFE bwd | gradients | held for backward (MiB) | fwd+bwd (s) |")
    print("|---|---|---|---|---|---|")
    for steps in (4, 16) if args.quick else (4, 16, 64):
        for adjoint in (False, True):
            row = memory(16, 64, steps, adjoint)
            print(
                f"| {steps} | {row['nfe_fwd']} | {row['nfe_bwd']} | "
                f"{'adjoint' if adjoint else 'direct'} | {row['held_mib']:.3f} | "
                f"{row['seconds']:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
