"""Speed and results of ``log_likelihood`` in two checkouts of cnftools, side by side.

Each checkout runs in its own process (its ``cnftools`` first on ``sys.path``), rounds
interleaved, the minimum of each taken; the same seeded ``MLPField`` and data in both. The last
column says whether the two checkouts returned the same bits (the sum of ``log p`` compared
exactly). Made for a refactor's claim "speed and results unchanged" (issue 19: 0.1 against 0.2).

Usage::

    git worktree add --detach /tmp/old 7f78343
    python benchmarks/compare_checkouts.py --old /tmp/old --new . --rounds 2

Both the 0.1 API (a tensor) and the 0.2 API (a ``LikelihoodResult``) are read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import cnftools
torch.set_num_threads(1)
out = {"file": cnftools.__file__}
for d, batch, tol, method in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    field = cnftools.MLPField(d, hidden=[128, 128]).double()
    x = torch.randn(batch, d, dtype=torch.float64)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        result = cnftools.log_likelihood(field, x, rtol=tol, atol=tol, method=method)
        best = min(best, time.perf_counter() - start)
    log_prob = getattr(result, "log_prob", result)
    out[f"d={d} B={batch} {method} tol={tol:g}"] = [best, float(log_prob.sum()).hex()]
print(json.dumps(out))
"""

CASES = [(2, 256, 1e-6, "dopri5"), (16, 256, 1e-6, "dopri5"), (64, 256, 1e-6, "dopri5")]
CASES += [(16, 256, 1e-8, "dopri8")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the checkout to compare against")
    parser.add_argument("--new", required=True, help="the checkout under test")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default 2)")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name in ("old", "new"):
            path = os.path.abspath(getattr(args, name))
            done = subprocess.run(
                [sys.executable, "-c", CHILD, path, json.dumps(CASES)],
                capture_output=True,
                text=True,
                cwd=os.path.dirname(path) or "/",
                check=True,
            )
            runs[name].append(json.loads(done.stdout))
    print(f"old: {runs['old'][0]['file']}\nnew: {runs['new'][0]['file']}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print("| case | old (ms) | new (ms) | new / old | same bits |\n|---|---|---|---|---|")
    for key in runs["old"][0]:
        if key == "file":
            continue
        old = min(run[key][0] for run in runs["old"])
        new = min(run[key][0] for run in runs["new"])
        same = runs["old"][0][key][1] == runs["new"][0][key][1]
        print(f"| {key} | {old * 1e3:.1f} | {new * 1e3:.1f} | {new / old:.2f} | {same} |")


if __name__ == "__main__":
    main()
