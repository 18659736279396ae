"""Is ``accuracy=``'s reported per-row bound a bound? Counted against closed forms.

For every affine path of ``cnftools.cases`` (OT, VE, VP and the user "cosine" path) × data kind
(Gaussian, mixture of 4, empirical of 32 points) × d in {1, 2, 8, 32, 64} × target accuracy
1e-3 ... 1e-8 (and float32 where the target is within its reach, >= 1e-4), ``log_likelihood(q, x,
accuracy=a)`` is compared with the exact log p_1 of the marginal (theory §9–§10) on ``--rows``
rows, of which a quarter lie 2.5 times a sample's distance from the data's mean (where the field
changes fastest). The marginal's closed-form divergence is used: the bound is about the solver.

Counted per row: the true error above the reported bound (``result.error_estimate``), and the true
error above the requested accuracy. The table prints the counts per target and dtype, the worst
ratios, and the evaluations per row.

Empirical data are singular at t = 1 on paths whose noise vanishes there (VE with sigma_min -> 0,
VP): those pairs are skipped, as in the tests.

Run: ``python benchmarks/accuracy_bound.py`` (``--quick``: d in {2, 8}, 16 rows).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import cnftools
from cnftools.cases import AFFINE_PATH_CASES, DataCase

TARGETS = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
KINDS = {"gaussian": 1, "mixture": 4, "empirical": 32}


def rows_with_outliers(q, n: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    x = q.sample(n, 1.0, torch.Generator().manual_seed(seed))
    centre = x.mean(dim=0, keepdim=True)
    far = n // 4
    x[:far] = centre + 2.5 * (x[:far] - centre)
    return x.to(dtype)


def closed_form_cases(dims: list[int]):
    """Every ``(path name, data kind, d, DataCase, path)`` of the grid; empirical data are skipped
    on paths singular at t = 1."""
    for path_name, path_case in AFFINE_PATH_CASES.items():
        path = path_case.build()
        for kind, components in KINDS.items():
            if kind == "empirical" and path_case.singular_at_one:
                continue
            for d in dims:
                yield path_name, kind, d, DataCase(kind, d, components, seed=100 + d), path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--dims", type=int, nargs="*", default=[1, 2, 8, 32, 64])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--targets", type=float, nargs="*", default=list(TARGETS))
    args = parser.parse_args()
    if args.quick:
        args.dims, args.rows = [2, 8], 16
    torch.set_num_threads(args.threads)
    totals: dict[tuple[str, float], list[float]] = {}
    started = time.perf_counter()
    for path_name, kind, d, case, path in closed_form_cases(args.dims):
        q = case.marginal(path)
        for dtype in (torch.float64, torch.float32):
            x = rows_with_outliers(q, args.rows, d, torch.float64)
            exact = q.log_prob(x, 1.0)
            q_run = q if dtype == torch.float64 else case.marginal(path, dtype=dtype)
            prior = q_run.prior()
            for target in args.targets:
                if dtype == torch.float32 and target < 1e-4:
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    result = cnftools.log_likelihood(q_run, x.to(dtype), prior, accuracy=target)
                error = (result.log_prob.double() - exact).abs()
                bound = result.error_estimate.double()
                key = (str(dtype).replace("torch.", ""), target)
                cell = totals.setdefault(key, [0, 0, 0, 0.0, 0.0, 0, 0])
                cell[0] += int((error > bound).sum())
                cell[1] += int((error > target).sum())
                cell[2] += x.shape[0]
                cell[3] = max(cell[3], float((error / bound).max()))
                cell[4] = max(cell[4], float(error.max() / target))
                cell[5] += result.nfe.total
                cell[6] += int(any("not reached" in str(w.message) for w in caught))
                if (error > bound).any() or (error > target).any():
                    print(
                        f"  miss: {path_name} / {kind} d={d} {key[0]} a={target:g}: "
                        f"{int((error > bound).sum())} over bound, "
                        f"{int((error > target).sum())} over target, worst "
                        f"{float(error.max()):.3g}",
                        flush=True,
                    )
    print(f"\n{time.perf_counter() - started:.0f} s, {args.rows} rows per case, dims {args.dims}")
    print(
        "| dtype | accuracy | rows | true error > bound | true error > accuracy | worst error/bound "
        "| worst error/accuracy | solves warned |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for (dtype, target), c in sorted(totals.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        print(
            f"| {dtype} | {target:g} | {c[2]} | {c[0]} | {c[1]} | {c[3]:.2g} | {c[4]:.2g} | {c[6]} |"
        )


if __name__ == "__main__":
    main()
