"""Rows per second of ``cnftools.dataset_nll``: exact vs Hutchinson, d = 2 and 64, 1 vs 2 processes.

Each process uses ONE torch thread (``torch.set_num_threads(1)``), so that two processes on a
2-core machine compare with one process on one core; the 2-process runs use the gloo backend
(``torch.multiprocessing`` spawn, as ``torchrun`` would), with units dealt round-robin to the ranks.
The field is an ``MLPField(d, hidden=(64, 64))`` in float32, the solver fixed-grid RK4 with 8 steps
(the same work for every row, so rows/s compare like with like). Timing starts after a barrier
and ends when rank 0 has the merged frame (gathering included); process start-up is excluded.

Run:  python benchmarks/dataset_nll.py            (about 1-3 minutes on 2 cores)
      python benchmarks/dataset_nll.py --quick    (a smoke run)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = [(2, "exact"), (2, "hutchinson"), (64, "exact"), (64, "hutchinson")]


def _rows(d: int, divergence: str, quick: bool) -> tuple[int, int]:
    """(rows, batch size) per case: sized so that each case takes a few seconds on one core."""
    if d == 2:
        n = 8192
    else:
        n = 1024 if divergence == "exact" else 4096
    if quick:
        n //= 8
    return n, min(256, n // 8)


def _case(d: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    import cnftools

    torch.manual_seed(seed)
    field = cnftools.MLPField(d, hidden=(64, 64))
    return field, torch.randn(8192, d, generator=torch.Generator().manual_seed(1))


def _measure(d: int, divergence: str, quick: bool) -> tuple[float, int]:
    import cnftools

    n, batch = _rows(d, divergence, quick)
    field, x = _case(d)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    frame = cnftools.dataset_nll(
        field, x[:n], batch_size=batch, divergence=divergence, method="rk4", steps=8, progress=False
    )
    seconds = time.perf_counter() - start
    if frame is not None:
        assert (frame["status"] == "ok").all() and len(frame) == n
    return n / seconds, n


def _worker(rank: int, world: int, init: str, quick: bool, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for d, divergence in CASES:
            rate, _ = _measure(d, divergence, quick)
            if rank == 0:
                results[(d, divergence)] = rate
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/8 of the rows (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    one = {case: _measure(*case, args.quick) for case in CASES}
    with tempfile.TemporaryDirectory() as folder:
        manager = mp.Manager()
        results = manager.dict()
        init = f"file://{os.path.join(folder, 'rendezvous')}"
        mp.spawn(_worker, args=(2, init, args.quick, results), nprocs=2, join=True)
        two = dict(results)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 torch thread per process, "
          "MLPField(d, (64, 64)) float32, rk4 x 8 steps")  # fmt: skip
    print()
    print("| d | divergence | rows | rows/s, 1 process | rows/s, 2 processes | ratio |")
    print("|---|---|---|---|---|---|")
    for case in CASES:
        rate1, n = one[case]
        rate2 = two[case]
        print(f"| {case[0]} | {case[1]} | {n} | {rate1:,.0f} | {rate2:,.0f} | {rate2 / rate1:.2f}x |")


if __name__ == "__main__":
    main()
