"""Where a likelihood solve's time goes: the field, the exact divergence, and everything else.

On the time-to-accuracy benchmark's field (``benchmarks/time_to_accuracy.py``: the opaque OT field
of a Gaussian, B = 256, float64), one ``log_likelihood`` solve at ``--tol`` is timed with its
evaluation count; then one evaluation of the same augmented dynamics on the whole batch is timed
on its own, split into the field's forward pass and the divergence's backward passes. What the
evaluations do not explain is the loop (step control, landing, compaction) and the driver. The
same for torchode 1.0.1's solve and its dynamics (exact divergence in chunks of 16 VJPs), when it
is installed. Times are minima over ``--rounds``; later evaluations of a solve run on fewer rows
(finished rows leave), so ``evaluations x per evaluation`` is an upper bound of the evaluations'
share and the remainder a lower bound of the loop's.

Run: ``python benchmarks/solve_breakdown.py --threads 1`` (d = 2 at tol 1e-5 and d = 64 at tol
1e-7 by default; ``--cases 64:1e-6``).
"""

from __future__ import annotations

import argparse

import torch
from image_divergence import best_time as fastest
from time_to_accuracy import chunked_trace, gaussian_case, torchode_runner

import cnftools
from cnftools._divergence_evaluator import DivergenceEvaluator
from cnftools._likelihood_engine import _augmented

try:
    import torchode
except ImportError:  # pragma: no cover - optional peer
    torchode = None


def breakdown(d: int, tol: float, rounds: int) -> None:
    field, x, exact = gaussian_case(d, 256, torch.device("cpu"))
    result = cnftools.log_likelihood(field, x, rtol=tol, atol=tol)
    evaluations = result.nfe.total
    error = float((result.log_prob - exact).abs().max())
    solve = fastest(lambda: cnftools.log_likelihood(field, x, rtol=tol, atol=tol), rounds)
    evaluator = DivergenceEvaluator.for_spec(field, None, x)
    f = _augmented(field, x, evaluator, {})
    y = torch.cat([x, x.new_zeros(256, 1)], dim=1)
    t = torch.full((256,), 0.5, dtype=x.dtype)
    with torch.no_grad():  # as the solve calls it: no graph kept
        per_eval = fastest(lambda: f(t, y, None), 5 * rounds)
        forward = fastest(lambda: field(x, t), 5 * rounds)
    rest = solve - evaluations * per_eval
    print(
        f"| d = {d}, tol {tol:g} | cnftools dopri5 | {evaluations} | {error:.1e} | {solve:.4f} "
        f"| {per_eval * 1e3:.3f} | {forward * 1e3:.3f} | {(per_eval - forward) * 1e3:.3f} "
        f"| {rest * 1e3 / evaluations:.3f} |",
        flush=True,
    )
    if torchode is None:
        return
    run = torchode_runner(field, x)
    calls = []
    original = field.forward

    def counting(z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return original(z, s)

    field.forward = counting  # type: ignore[method-assign]
    error = float((run(tol) - exact).abs().max())
    field.forward = original  # type: ignore[method-assign]
    solve = fastest(lambda: run(tol), rounds)
    per_eval = fastest(lambda: _torchode_dynamics(field, x, t), 5 * rounds)
    rest = solve - len(calls) * per_eval
    print(
        f"| d = {d}, tol {tol:g} | torchode dopri5 | {len(calls)} | {error:.1e} | {solve:.4f} "
        f"| {per_eval * 1e3:.3f} | {forward * 1e3:.3f} | {(per_eval - forward) * 1e3:.3f} "
        f"| {rest * 1e3 / len(calls):.3f} |",
        flush=True,
    )


def _torchode_dynamics(field: torch.nn.Module, x: torch.Tensor, t: torch.Tensor) -> None:
    """One evaluation of the peer's augmented dynamics, as ``torchode_runner`` builds it."""
    with torch.enable_grad():
        z = x.detach().requires_grad_(True)
        dz = field(z, t)
        chunked_trace(dz, z)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["2:1e-5", "64:1e-7"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        "| case | solver | evaluations | max error | solve (s) | per evaluation (ms) "
        "| field forward (ms) | divergence (ms) | rest per evaluation (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        d, tol = case.split(":")
        breakdown(int(d), float(tol), args.rounds)


if __name__ == "__main__":
    main()
