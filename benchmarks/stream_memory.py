"""Peak resident memory of ``cnftools.dataset_nll`` over a stream, against the number of rows.

The stream is a ``DataLoader`` (batch 2,000) over an ``IterableDataset`` that draws float64 rows of
``d = 64`` on the fly (never held whole); the field is an ``MLPField(64, hidden=(64, 64))`` in
float64, solved with Euler in 2 steps and the exact divergence, on one torch thread; the allocator
is the default one (no ``MALLOC_*`` variables). Each row count runs in a fresh process: a warm-up
call of 4,000 rows, then the kernel's peak-RSS mark is reset (``/proc/self/clear_refs``) and the
measured call runs. "peak growth" is the peak RSS during the call minus the RSS before it; "result"
is the returned DataFrame's own size (``memory_usage(deep=True)``), which must grow with the rows.

Linux only (``/proc``). Run:

    python benchmarks/stream_memory.py                        (100,000 and 1,000,000 rows;
                                                               about 10 min on one core)
    python benchmarks/stream_memory.py --rows 20000 100000    (any row counts)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

DIM = 64
BATCH = 2000


def _status(key: str) -> float:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def measure(rows: int) -> dict[str, float]:
    """Run one stream of ``rows`` rows in this process; the measured numbers (MB)."""
    import torch

    import cnftools
    from cnftools.nll import Execution

    class Stream(torch.utils.data.IterableDataset):
        def __init__(self, n: int) -> None:
            self.n = n

        def __iter__(self):
            for start in range(0, self.n, BATCH):
                gen = torch.Generator().manual_seed(start)
                count = min(BATCH, self.n - start)
                yield from torch.randn(count, DIM, generator=gen, dtype=torch.float64)

    torch.manual_seed(0)
    field = cnftools.MLPField(DIM, hidden=(64, 64)).double()

    def run(n: int):
        loader = torch.utils.data.DataLoader(Stream(n), batch_size=BATCH)
        return cnftools.dataset_nll(
            field,
            loader,
            config=cnftools.SolverConfig("euler", steps=2),
            execution=Execution(batch_size=BATCH, progress=False, num_threads=1),
        )

    run(2 * BATCH)  # imports, caches and first allocations happen here, not in the measurement
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    before = _status("VmRSS")
    frame = run(rows)
    peak = _status("VmHWM")
    if len(frame) != rows or not (frame["status"] == "ok").all():
        raise RuntimeError("the stream's rows did not all come back ok")
    return {
        "rows": rows,
        "before_mb": before,
        "peak_growth_mb": peak - before,
        "result_mb": float(frame.memory_usage(deep=True).sum()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.child)))
        return
    print(f"dataset_nll over a DataLoader stream: d = {DIM}, float64, batch {BATCH}, Euler 2 steps")
    print(f"{'rows':>10} {'peak RSS growth (MB)':>21} {'per row (bytes)':>16} {'result (MB)':>12}")
    for rows in args.rows:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(rows)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        got = json.loads(out.strip().splitlines()[-1])
        per_row = got["peak_growth_mb"] * 1e6 / rows
        print(
            f"{rows:>10,} {got['peak_growth_mb']:>21.1f} {per_row:>16.0f} {got['result_mb']:>12.1f}"
        )


if __name__ == "__main__":
    main()
