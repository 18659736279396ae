"""What one divergence evaluation costs for an image field: exact (d VJPs) against Hutchinson.

For a :class:`cnftools.ConvField` on ``(B, C, H, W)`` images, each row times, per call, at
``t = 0.5``:

- ``forward``: one field evaluation ``v(x, t)`` (no graph),
- ``exact``: ``cnftools.divergence(v, x, t, cnftools.Exact())`` (the exact trace, :math:`d = CHW` vector-Jacobian
  products, batched by cnftools' default strategy),
- ``hutchinson``: ``cnftools.divergence(v, x, t, cnftools.Hutchinson())`` with one Rademacher probe
  (one VJP),

and the ratio ``exact / hutchinson``. An ODE solve for a likelihood pays this at every field
evaluation (dopri5: 6 per step), so the ratio is the price of exactness per solve; Hutchinson pays
instead in variance, which ``dataset_nll(..., execution=Execution(target_stderr=...))`` averages
down over probe rounds.

Times are the minimum over ``--repeats`` calls (the least disturbed on a shared machine; expect
+-25 % noise per cell).

Run: ``python benchmarks/image_divergence.py`` (a few minutes on one CPU core; the 3x32x32
exact row dominates), ``--markdown`` for a table to paste into the docs.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import torch

import cnftools

CASES = ((1, 8, 8, 64), (3, 32, 32, 2))
"""(C, H, W, batch) of each row."""


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(
    channels: int, height: int, width: int, batch: int, hidden: tuple[int, ...], repeats: int
):
    torch.manual_seed(0)
    field = cnftools.ConvField(channels, hidden=hidden)
    x = torch.randn(batch, channels, height, width)
    t = torch.full((batch,), 0.5)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        forward = best_time(lambda: field(x, t), repeats)
    exact = best_time(
        lambda: cnftools.divergence(field, x, t, cnftools.Exact()),
        1 if x[0].numel() > 256 else repeats,
    )
    probe = cnftools.Hutchinson(n_probes=1, generator=gen)  # fresh probes per call, from gen
    hutch = best_time(lambda: cnftools.divergence(field, x, t, probe), repeats)
    return {
        "image": f"{channels}x{height}x{width}",
        "d": channels * height * width,
        "batch": batch,
        "forward_ms": 1e3 * forward,
        "exact_ms": 1e3 * exact,
        "hutchinson_ms": 1e3 * hutch,
        "exact/hutchinson": exact / hutch,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="32,32,32", help="ConvField hidden channels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    rows = [measure(c, h, w, b, hidden, args.repeats) for c, h, w, b in CASES]
    print(
        f"ConvField(C, hidden={hidden}), float32, {args.threads} threads, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}"
    )
    head = list(rows[0])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
    else:
        print("  ".join(f"{h:>16}" for h in head))
    for row in rows:
        cells = [f"{v:.1f}" if isinstance(v, float) else str(v) for v in row.values()]
        print(
            ("| " + " | ".join(cells) + " |")
            if args.markdown
            else "  ".join(f"{c:>16}" for c in cells)
        )


if __name__ == "__main__":
    main()
