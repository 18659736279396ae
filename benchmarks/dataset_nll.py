"""Rows per second of ``cnftools.dataset_nll``: exact vs Hutchinson, d = 2 and 64, 1 vs 2 processes.

Each process uses ONE torch thread (``torch.set_num_threads(1)``), so that two processes on a
2-core machine compare with one process on one core; the 2-process runs use the gloo backend
(``torch.multiprocessing`` spawn, as ``torchrun`` would), with units dealt round-robin to the ranks.
The field is an ``MLPField(d, hidden=(64, 64))`` in float32, the solver fixed-grid RK4 with 8 steps
(the same work for every row, so rows/s compare like with like). Timing starts after a barrier
and ends when rank 0 has the merged frame (gathering included); process start-up is excluded.

Run:  python benchmarks/dataset_nll.py            (about 1 minute on 2 idle cores)
      python benchmarks/dataset_nll.py --quick    (a smoke run)
      python benchmarks/dataset_nll.py --threads  (one process: 1 vs 2 torch threads vs the
                                                   automatic choice, small tensors; the load
                                                   average is printed with it)
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
    n = {(2, "exact"): 32768, (2, "hutchinson"): 32768, (64, "exact"): 2048}.get(
        (d, divergence), 16384
    )
    if quick:
        n //= 8
    return n, min(256, n // 8)


def _case(d: int, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    import cnftools

    torch.manual_seed(seed)
    field = cnftools.MLPField(d, hidden=(64, 64))
    return field, torch.randn(32768, d, generator=torch.Generator().manual_seed(1))


def _estimator(divergence: str) -> object:
    """The divergence spec of a table row's name: ``"exact"`` or ``"hutchinson"`` (one probe)."""
    import cnftools

    return cnftools.Exact() if divergence == "exact" else cnftools.Hutchinson(n_probes=1)


def _nll(field: torch.nn.Module, x: torch.Tensor, divergence: str, steps: int, **run: object):
    """One ``dataset_nll`` call: rk4 on ``steps`` steps, no progress bar, ``run`` the
    :class:`~cnftools.nll.Execution` fields."""
    import cnftools
    from cnftools.nll import Execution

    return cnftools.dataset_nll(
        field,
        x,
        estimator=_estimator(divergence),
        config=cnftools.SolverConfig("rk4", steps=steps),
        execution=Execution(progress=False, **run),
    )


def _measure(d: int, divergence: str, quick: bool) -> tuple[float, int]:
    n, batch = _rows(d, divergence, quick)
    field, x = _case(d)
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    frame = _nll(field, x[:n], divergence, 8, batch_size=batch)
    seconds = time.perf_counter() - start
    if frame is not None:
        assert (frame["status"] == "ok").all() and len(frame) == n
    return n / seconds, n


def _control(world: int) -> float:
    """Machine ceiling: 256x256 float32 matmuls per second, summed over the processes."""
    a = torch.randn(256, 256)
    iterations = 3000
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    for _ in range(iterations):
        a @ a
    if dist.is_initialized():
        dist.barrier()
    return world * iterations / (time.perf_counter() - start)


def _warm_up() -> None:
    """One small untimed run per case: imports, autograd and allocator start-up are not timed."""
    for d, divergence in CASES:
        field, x = _case(d)
        _nll(field, x[:64], divergence, 2, batch_size=32)


def _worker(rank: int, world: int, init: str, quick: bool, results: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        _warm_up()
        for d, divergence in CASES:
            rate, _ = _measure(d, divergence, quick)
            if rank == 0:
                results[(d, divergence)] = rate
        rate = _control(world)
        if rank == 0:
            results["control"] = rate
    finally:
        dist.destroy_process_group()


def _threads_table(quick: bool) -> None:
    """rows/s of one process with 1 and 2 torch threads and with dataset_nll's own choice."""
    from cnftools._resources import choose_threads

    n = 1024 if quick else 4096
    field, x = _case(2)
    auto = choose_threads(torch.device("cpu"))
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.2f}, "
          f"MLPField(2, (64, 64)) float32, rk4 x 8 steps, batch 64, {n} rows; automatic: {auto}")  # fmt: skip
    print()
    print("| torch threads | rows/s | vs 1 thread |")
    print("|---|---|---|")
    rates = {}
    for label, count in (("1", 1), ("2", 2), (f"automatic ({auto})", None)):
        _nll(field, x[:64], "exact", 2, batch_size=64, num_threads=count or auto)
        start = time.perf_counter()
        _nll(field, x[:n], "exact", 8, batch_size=64, num_threads=count)
        rates[label] = n / (time.perf_counter() - start)
        print(f"| {label} | {rates[label]:,.0f} | {rates[label] / rates['1']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1/8 of the rows (a smoke run)")
    parser.add_argument("--threads", action="store_true", help="the thread-count table only")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(max(2, torch.get_num_threads()))
        _threads_table(args.quick)
        return
    torch.set_num_threads(1)
    _warm_up()
    one = {case: _measure(*case, args.quick) for case in CASES}
    one_control = _control(1)
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
        print(
            f"| {case[0]} | {case[1]} | {n} | {rate1:,.0f} | {rate2:,.0f} | {rate2 / rate1:.2f}x |"
        )
    control = two["control"]
    print(
        f"| control: 256x256 matmuls/s | | | {one_control:,.0f} | {control:,.0f} | "
        f"{control / one_control:.2f}x |"
    )
    print()
    print("The control row is the machine's own ceiling at the time of the run: two independent")
    print(
        "processes doing pure matmuls. On 2 free cores it is ~2x; less means other jobs hold a core."
    )


if __name__ == "__main__":
    main()
