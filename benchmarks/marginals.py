"""One pass vs two for the closed-form marginal fields (issue #12.6): velocity and divergence.

An exact log-likelihood solve of a closed-form marginal needs, at every step, the field
:math:`u_t(x)` and its divergence. Computed separately, each call walks all components again: the
distances (Mahalanobis terms), the log-sum-exp and the softmax weights are computed twice.
``velocity_and_divergence`` computes them once (docs/theory/marginals.md).

The hard case from the issue: empirical data (thousands of points), the OT path with
``sigma_min = 0.2``, ``d >= 32``, float64. Each row times, in interleaved rounds (a load spike from
other processes hits both alike; the minimum over rounds is reported):

- ``separate``: ``velocity(x, t)`` then ``divergence(x, t)`` (what the engine did before);
- ``one pass``: ``velocity_and_divergence(x, t)``;
- ``solve 2-pass`` / ``solve 1-pass``: a whole ``cnftools.log_likelihood`` on a field offering
  only ``__call__`` + ``divergence`` against the marginal itself (the engine takes the one pass),
  on a fixed midpoint grid of ``--steps`` steps (so both make exactly the same evaluations and the
  run stays short on a busy CPU; an adaptive solve makes the same per-evaluation saving). Both
  give the same numbers (``max Δ log p``, the largest absolute difference); ``max err`` is the
  solve's error against the exact ``log p_1`` (the error of the short grid, the same for both).

Ratios are two-pass time / one-pass time (> 1: the one pass is faster). With ``--threads 1`` on a
CPU the clock is the process's CPU time (other jobs on a shared machine then hardly disturb it);
otherwise it is wall time, and on a shared machine expect +-30% noise per cell.

Run: ``python benchmarks/marginals.py`` (a few minutes on 2 busy CPU cores), ``--quick`` for a smoke
run, ``--device cuda`` on a GPU, ``--markdown`` for a table to paste into the docs.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch
from torch import Tensor

import cnftools
from cnftools.cases import random_spd


class TwoPasses:
    """The marginal's field and its closed-form divergence, without the one-pass method."""

    def __init__(self, marginal: cnftools.MixtureMarginal) -> None:
        self.marginal = marginal

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.marginal.velocity(x, t)

    def divergence(self, x: Tensor, t: Tensor) -> Tensor:
        return self.marginal.divergence(x, t)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_times(
    fns: dict[str, Callable[[], object]], rounds: int, device: torch.device, warm_up: bool = True
) -> dict[str, float]:
    """Minimum wall time per function over interleaved rounds (after one warm-up call each)."""
    for fn in fns.values() if warm_up else ():
        fn()
    clock = _clock(device)
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = clock()
            fn()
            _sync(device)
            best[name] = min(best[name], clock() - start)
    return best


def _clock(device: torch.device) -> Callable[[], float]:
    """CPU time of this process on one CPU thread (insensitive to other jobs on a shared machine),
    wall time otherwise."""
    if device.type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def make_marginal(kind: str, n: int, d: int, device: torch.device) -> cnftools.MixtureMarginal:
    g = torch.Generator().manual_seed(0)
    means = torch.randn(n, d, generator=g, dtype=torch.float64).to(device)
    path = cnftools.OTPath(0.2)
    if kind == "empirical":
        return cnftools.MixtureMarginal(path, means)
    covs = torch.stack([random_spd(d, g, eigenvalues=(0.05, 0.5)) for _ in range(n)]).to(device)
    return cnftools.MixtureMarginal(path, means, covs)


def row(
    kind: str, n: int, d: int, batch: int, rounds: int, steps: int, device: torch.device
) -> dict:
    marginal = make_marginal(kind, n, d, device)
    g = torch.Generator(device=device).manual_seed(1)
    x = marginal.sample(batch, 1.0, generator=g)
    t = torch.full((batch,), 0.7, dtype=torch.float64, device=device)
    calls = best_times(
        {
            "separate": lambda: (marginal.velocity(x, t), marginal.divergence(x, t)),
            "one pass": lambda: marginal.velocity_and_divergence(x, t),
        },
        rounds,
        device,
    )
    two = TwoPasses(marginal)
    prior = marginal.prior()
    results: dict[str, cnftools.LikelihoodResult] = {}

    def solve(name: str, field) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                results[name] = cnftools.log_likelihood(
                    field, x, prior, config=cnftools.SolverConfig("midpoint", steps=steps)
                )

        return run

    solves = best_times(
        {"solve 2-pass": solve("two", two), "solve 1-pass": solve("one", marginal)},
        max(1, rounds // 3),
        device,
        warm_up=False,  # the calls above warmed everything up
    )
    one, other = results["one"], results["two"]
    diff = float((one.log_prob - other.log_prob).abs().max())
    exact = marginal.log_prob(x, 1.0)
    err = float((one.log_prob - exact).abs().max())
    return {
        "kind": kind,
        "N": n,
        "d": d,
        "B": batch,
        **calls,
        **solves,
        "nfe": f"{one.nfe.forward}/{other.nfe.forward}",
        "|Δ|": diff,
        "err": err,
    }


def print_table(rows: list[dict], markdown: bool) -> None:
    header = [
        "data", "N", "d", "B", "separate ms", "one pass ms", "ratio",
        "solve 2-pass s", "solve 1-pass s", "ratio", "NFE 1/2", "max Δ log p", "max err",
    ]  # fmt: skip
    lines = []
    for r in rows:
        lines.append(
            [
                r["kind"],
                str(r["N"]),
                str(r["d"]),
                str(r["B"]),
                f"{1e3 * r['separate']:.1f}",
                f"{1e3 * r['one pass']:.1f}",
                f"{r['separate'] / r['one pass']:.2f}×",
                f"{r['solve 2-pass']:.2f}",
                f"{r['solve 1-pass']:.2f}",
                f"{r['solve 2-pass'] / r['solve 1-pass']:.2f}×",
                r["nfe"],
                f"{r['|Δ|']:.1e}",
                f"{r['err']:.1e}",
            ]
        )
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True)))
    for line in lines:
        print("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small row, few rounds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--steps", type=int, default=8, help="midpoint steps of the solves")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.quick:
        grid = [("empirical", 500, 32, 16)]
        rounds = 3
    else:
        grid = [
            ("empirical", 2000, 32, 32),
            ("empirical", 4000, 64, 16),
            ("mixture", 32, 32, 32),
        ]
        rounds = 9
    print(
        f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"device {device}, {torch.get_num_threads()} threads, float64, OT sigma_min = 0.2, "
        f"calls at t = 0.7, solves: midpoint, {args.steps} steps, "
        f"clock: {'process CPU time' if _clock(device) is time.process_time else 'wall time'}"
    )
    rows = [row(kind, n, d, b, rounds, args.steps, device) for kind, n, d, b in grid]
    print_table(rows, args.markdown)


if __name__ == "__main__":
    main()
