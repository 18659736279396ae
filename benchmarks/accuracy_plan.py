"""Which first solve should ``accuracy=`` plan? Evaluations and time of each plan, per target.

``accuracy=`` solves once at the method and tolerance of :data:`cnftools._ode.ACCURACY_PLAN`,
then checks itself with a solve ten times tighter (and solves again the rows whose estimate is
above the target). This script runs ``log_likelihood(field, x, accuracy=target)`` under several
plans, each a single ``(method, tolerance / accuracy)`` for every target, on the time-to-accuracy
benchmark's field (``benchmarks/time_to_accuracy.py``: the opaque OT field of a Gaussian,
B = 256, float64, exact divergence) and prints, per d and target, the evaluations (first solve +
check and rounds), the seconds (minimum over ``--rounds``, interleaved), the delivered max error
and the largest reported estimate, both over the target. The plan that ``ACCURACY_PLAN`` keeps
for each target is the one with the fewest evaluations here; the honesty of its estimate is
counted separately by ``benchmarks/accuracy_bound.py``.

Run: ``python benchmarks/accuracy_plan.py --threads 1`` (``--dims 2 16 64``).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from time_to_accuracy import gaussian_case

import cnftools
import cnftools._ode as ode

PLANS = {
    "dopri8, tol = accuracy": ("dopri8", 1.0),
    "dopri5, tol = accuracy / 10": ("dopri5", 0.1),
    "dopri5, tol = accuracy / 3": ("dopri5", 0.3),
    "dopri5, tol = accuracy / 30": ("dopri5", 0.03),
}
TARGETS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="*", default=[2, 16, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kept = ode.ACCURACY_PLAN
    print("| d | accuracy | plan | evaluations | seconds | max error / accuracy "
          "| max estimate / accuracy |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    try:
        for d in args.dims:
            field, x, exact = gaussian_case(d, 256, torch.device("cpu"))
            for target in TARGETS:
                seconds: dict[str, float] = {}
                last: dict[str, cnftools.LikelihoodResult] = {}
                for _ in range(args.rounds):
                    for name, (method, ratio) in PLANS.items():
                        ode.ACCURACY_PLAN = ((0.0, method, ratio),)
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            start = time.perf_counter()
                            result = cnftools.log_likelihood(field, x, accuracy=target)
                            elapsed = time.perf_counter() - start
                        seconds[name] = min(seconds.get(name, elapsed), elapsed)
                        last[name] = result
                for name, result in last.items():
                    error = float((result.log_prob - exact).abs().max())
                    estimate = float(result.error_estimate.max())
                    print(
                        f"| {d} | {target:g} | {name} | {result.nfe.estimate}+{result.nfe.forward} "
                        f"| {seconds[name]:.3f} | {error / target:.2g} | {estimate / target:.2g} |",
                        flush=True,
                    )
    finally:
        ode.ACCURACY_PLAN = kept


if __name__ == "__main__":
    main()
