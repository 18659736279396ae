"""Could ``accuracy=`` check itself inside one solve? The embedded estimate against closed forms.

``accuracy=`` pays for its error estimate with a second solve (``cnftools._accuracy``). The cheaper
lever named in the engine issue is the per-row *embedded* estimate: every accepted step of an
embedded Runge–Kutta pair already computes :math:`e = h \\sum_i (b_i - \\hat b_i) k_i`, and
summing the log-density column's :math:`|e|` over a row's accepted steps is a per-row estimate of
that column's global error at no extra evaluation. This script measures whether that sum could be
reported as the row's error: for every affine path of ``cnftools.cases`` × Gaussian, mixture and
empirical data × ``--dims`` × targets 1e-3 ... 1e-8, one dopri8 solve at the tolerance
``accuracy=`` starts from (``atol`` = target, ``rtol`` = target / 100), the same rows as
``benchmarks/accuracy_bound.py`` (a quarter at 2.5 times a sample's distance from the mean), the
marginal's closed-form velocity and divergence, and its exact log p as the reference.

The sum ignores how the point columns' local errors propagate into the log-density column
(through the gradient of the divergence along the path), which is where it fails: printed per
case are the rows whose true error exceeds the summed estimate, the worst true error / estimate,
and the median estimate / true error (how loose it is where it holds).

The steps are recorded by the solve and replayed once to recover each step's embedded error (the
replay costs as many evaluations as the solve; the numbers are those of the recorded steps).

Run: ``python benchmarks/embedded_estimate.py`` (``--dims 2 8 --rows 32``; counts, not timings).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from accuracy_bound import TARGETS, closed_form_cases, rows_with_outliers

from cnftools._divergence_evaluator import DivergenceEvaluator
from cnftools._likelihood_engine import _augmented
from cnftools._ode import row_norm
from cnftools._runge_kutta import Stepping, StepRecord, rk_step, solve
from cnftools._tableaux import TABLEAUX


def summed_embedded_error(q, x: torch.Tensor, tol: float, method: str):
    """One solve from t = 1 to 0: ``(log p, sum of |e| of the log-density column)``."""
    batch, d = x.shape
    evaluator = DivergenceEvaluator.for_spec(q, None, x)
    f = _augmented(q, x, evaluator, {})
    y0 = torch.cat([x, x.new_zeros(batch, 1)], dim=1)
    stepping = Stepping(rtol=tol / 100, atol=tol, norm=row_norm(d))
    record = StepRecord()
    with torch.no_grad():
        out = solve(f, y0, [1.0, 0.0], method, stepping, record=record)
        log_prob = q.prior().log_prob(out[-1, :, :d]) + out[-1, :, d]
        tableau = TABLEAUX[method]
        summed = torch.zeros(batch, dtype=x.dtype)
        for rows, t, h, t_end, y, accepted, _ in record.steps:
            _, error, _, _ = rk_step(f, tableau, t, h, y, f(t, y, rows), rows, t_end)
            assert error is not None
            summed.index_add_(0, rows[accepted], error[accepted, d].abs())
    return log_prob, summed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--dims", type=int, nargs="*", default=[2, 8])
    parser.add_argument("--method", default="dopri8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    under = rows = 0
    worst, looseness = 0.0, []
    print("| path | data | d | target | rows err > estimate | worst err / estimate "
          "| median estimate / err | worst err / target |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for path_name, kind, d, case, path in closed_form_cases(args.dims):
        q = case.marginal(path)
        x = rows_with_outliers(q, args.rows, d, torch.float64)
        exact = q.log_prob(x, 1.0)
        for target in TARGETS:
            log_prob, summed = summed_embedded_error(q, x, target, args.method)
            error = (log_prob - exact).abs()
            ratio = error / summed
            n_under = int((error > summed).sum())
            under, rows = under + n_under, rows + x.shape[0]
            worst = max(worst, float(ratio.max()))
            looseness.append(float((summed / error).median()))
            if n_under:
                print(
                    f"| {path_name} | {kind} | {d} | {target:g} | {n_under} "
                    f"| {float(ratio.max()):.3g} | {float((summed / error).median()):.3g} "
                    f"| {float(error.max() / target):.3g} |",
                    flush=True,
                )
    looseness.sort()
    median = looseness[len(looseness) // 2] if looseness else math.nan
    print(
        f"\n{args.method}, {rows} rows: true error above the summed embedded estimate in {under} "
        f"({100 * under / max(rows, 1):.2f}%), worst {worst:.3g} times it; median over cases of "
        f"the median estimate / true error {median:.3g}; {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
