"""Exact-divergence throughput: cnftools' strategies against plain loops of d backward passes.

Every row times, in one run and interleaved round by round (so a load spike from other processes
hits all methods alike), the exact divergence of a 3x256 SiLU MLP field ``v(x, t)`` at ``(B, d)``:

- ``auto``: :func:`cnftools.divergence` with ``cnftools.Exact()``, the strategy chosen by size (the
  chosen one is shown),
- ``batched`` / ``loop`` / ``forward``: the same with the strategy forced (``Exact("batched")``, ...),
- ``plain``: a plain loop, one forward pass then d ``torch.autograd.grad`` calls through the
  retained graph (what one writes by hand),
- ``flow_matching``: the loop ``flow_matching.solver.ODESolver.compute_likelihood`` runs for its
  exact divergence (flow_matching 1.0.x exposes no divergence function, so its loop is reproduced
  here with its own ``flow_matching.utils.gradient`` helper and ``create_graph=True``, as in its
  source); skipped when flow_matching is not installed,
- ``floor``: d backward passes with a fixed cotangent through one retained graph, timed in the same
  rounds (the cost of d VJPs with no per-pass bookkeeping and no forward pass). Batched VJPs can
  beat it: they make fewer, larger passes.

Times are the minimum per call over interleaved rounds (the least disturbed measurement; rows
whose plain loop takes > 0.5 s get two rounds, no ``forward`` column, and, when auto picks the
loop, the ``loop`` column repeats ``auto`` since it is the same code); ratios are
``plain / auto`` and ``flow_matching / auto`` (> 1: auto is faster). On a shared machine expect
+-25% noise on any single cell.

Run: ``python benchmarks/divergence.py`` (about 2 minutes on 2 CPU cores), ``--quick`` for a smoke
run, ``--markdown`` for a table to paste into the docs.

``--chunks`` times instead, per ``(d, B)``, ``Exact("batched")`` with every chunk size (basis
vectors per backward pass: 2, 4, ..., d, set through
:data:`cnftools.divergences.BATCHED_ROWS`) against ``Exact("loop")``, marks the chunk ``"auto"``
takes, and says whether every chunk and the loop returned the same bits (they compute the same
diagonal entries at large batches, reduced in one order): the check that the size rule sits at
the measured floor of this machine, e.g. ``python benchmarks/divergence.py --chunks --dims 64
--batches 256 128 64 --dtypes float64 --threads 1``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

import cnftools
from cnftools.divergences import BATCHED_ROWS, choose_strategy

try:
    from flow_matching.utils import gradient as fm_gradient
except ImportError:  # pragma: no cover - optional comparison
    fm_gradient = None


class MLPField(nn.Module):
    """v(x, t) = MLP([x, t]), 3 hidden layers of 256 with SiLU."""

    def __init__(self, dim: int, width: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim + 1, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, width),
            nn.SiLU(),
            nn.Linear(width, dim),
        )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([x, t[:, None]], dim=1))


def plain_loop(v: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = v(x, t)
        total = torch.zeros(x.shape[0], dtype=x.dtype)
        for i in range(x.shape[1]):
            total += torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0][:, i]
    return total


def flow_matching_loop(v: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    assert fm_gradient is not None
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        ut = v(x, t)
        div = 0
        for i in range(ut.flatten(1).shape[1]):
            div += fm_gradient(ut[:, i], x, create_graph=True)[:, i]
    return div.detach()


def floor_fn(v: nn.Module, x: Tensor, t: Tensor) -> Callable[[], None]:
    """One backward pass through a retained graph, to be timed and multiplied by d."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        y = v(x, t)
    cotangent = torch.randn_like(y)

    def backward() -> None:
        torch.autograd.grad(y, x, cotangent, retain_graph=True)

    return backward


def time_methods(
    methods: dict[str, Callable[[], object]], rounds: int, min_s: float, expensive: bool
) -> tuple[dict[str, float], dict[str, object]]:
    """Best time per method over interleaved rounds, and each method's last output.

    Cheap rows: one warm-up call each, then ``rounds`` interleaved rounds (more while under
    ``min_s``). Expensive rows (a call of half a second or more, where warm-up effects are
    negligible): two timed rounds, no warm-up, so the whole table stays within a few minutes.
    """
    outputs: dict[str, object] = {}
    if expensive:
        rounds, min_s = 2, 0.0
    else:
        for name, fn in methods.items():
            outputs[name] = fn()
    best = {name: float("inf") for name in methods}
    start = time.perf_counter()
    done = 0
    while done < rounds or time.perf_counter() - start < min_s:
        for name, fn in methods.items():
            t0 = time.perf_counter()
            outputs[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
        done += 1
        if time.perf_counter() - start > 20 * min_s:
            break
    return best, outputs


def make_methods(
    field: nn.Module, x: Tensor, t: Tensor, expensive: bool, picked: str
) -> dict[str, Callable[[], object]]:
    methods: dict[str, Callable[[], object]] = {
        "auto": lambda: cnftools.divergence(field, x, t, cnftools.Exact()),
        "batched": lambda: cnftools.divergence(field, x, t, cnftools.Exact("batched")),
        "loop": lambda: cnftools.divergence(field, x, t, cnftools.Exact("loop")),
        "plain": lambda: plain_loop(field, x, t),
    }
    if expensive and picked == "loop":  # identical code to "auto" here: not timed twice
        del methods["loop"]
    if fm_gradient is not None:
        methods["flow_matching"] = lambda: flow_matching_loop(field, x, t)
    if not expensive:  # forward mode is the slowest on CPU; skipped on big rows
        methods["forward"] = lambda: cnftools.divergence(field, x, t, cnftools.Exact("forward"))
    backward = floor_fn(field, x, t)

    def floor() -> None:
        for _ in range(x.shape[1]):
            backward()

    methods["floor"] = floor
    return methods


def _grid(dims: list[int], batches: list[int], dtypes: list[torch.dtype]):
    """Every ``(dtype, d, B, field, x, t)`` measured: an ``MLPField`` per (dtype, d), seed 0."""
    for dtype in dtypes:
        for dim in dims:
            torch.manual_seed(0)
            field = MLPField(dim).to(dtype)
            for batch in batches:
                x = torch.randn(batch, dim, dtype=dtype)
                yield dtype, dim, batch, field, x, torch.rand(batch, dtype=dtype)


def run(dims: list[int], batches: list[int], dtypes: list[torch.dtype], rounds: int, min_s: float):
    rows = []
    for dtype, dim, batch, field, x, t in _grid(dims, batches, dtypes):
        strategy, chunk = choose_strategy(batch, dim, x.device)
        t0 = time.perf_counter()
        reference = plain_loop(field, x, t)
        expensive = time.perf_counter() - t0 > 0.5
        methods = make_methods(field, x, t, expensive, strategy)
        best, outputs = time_methods(methods, rounds, min_s, expensive)
        for name, output in outputs.items():  # every method computed the same numbers
            if name == "floor":
                continue
            error = float((output - reference).abs().max())  # type: ignore[operator]
            scale = float(reference.abs().max()) + 1.0
            assert error <= 1e-4 * scale, (name, dim, batch, error)
        if "loop" not in best:
            best["loop"] = best["auto"]
        rows.append((dtype, dim, batch, f"{strategy}({chunk})", best))
        print(format_row(rows[-1]), flush=True)
    return rows


COLUMNS = ["floor", "auto", "batched", "loop", "forward", "plain", "flow_matching"]


def header() -> str:
    names = " | ".join(f"{c} ms" for c in COLUMNS)
    return (
        f"| dtype | d | B | auto picks | {names} | plain/auto | fm/auto | auto/floor |\n"
        "|" + "---|" * (4 + len(COLUMNS) + 3)
    )


def format_row(row) -> str:
    dtype, dim, batch, picked, best = row
    cells = [f"{best[c] * 1e3:.2f}" if c in best else "n/a" for c in COLUMNS]
    fm = f"{best['flow_matching'] / best['auto']:.2f}" if "flow_matching" in best else "n/a"
    return (
        f"| {str(dtype).replace('torch.', '')} | {dim} | {batch} | {picked} | "
        + " | ".join(cells)
        + f" | {best['plain'] / best['auto']:.2f} | {fm} | {best['auto'] / best['floor']:.2f} |"
    )


def chunk_sizes(dim: int) -> list[int]:
    """2, 4, 8, ... below ``dim``, and ``dim`` itself (one pass)."""
    sizes = [2**k for k in range(1, dim.bit_length()) if 2**k < dim]
    return [*sizes, dim]


def chunk_methods(field: nn.Module, x: Tensor, t: Tensor) -> dict[str, Callable[[], Tensor]]:
    """``Exact("loop")`` and ``Exact("batched")`` at every chunk size of :func:`chunk_sizes`."""
    device_type = x.device.type
    saved = BATCHED_ROWS.get(device_type, BATCHED_ROWS["cpu"])

    def loop() -> Tensor:
        return cnftools.divergence(field, x, t, cnftools.Exact("loop"))

    def batched(chunk: int) -> Callable[[], Tensor]:
        def call() -> Tensor:
            BATCHED_ROWS[device_type] = chunk * x.shape[0]
            try:
                return cnftools.divergence(field, x, t, cnftools.Exact("batched"))
            finally:
                BATCHED_ROWS[device_type] = saved

        return call

    return {"loop": loop, **{str(c): batched(c) for c in chunk_sizes(x.shape[1])}}


def run_chunks(
    dims: list[int], batches: list[int], dtypes: list[torch.dtype], rounds: int, min_s: float
) -> None:
    """Per (d, B): ms per call of ``Exact("batched")`` at each chunk size and of the loop."""
    print("| dtype | d | B | auto picks | ms per call: loop, then chunk size | same bits |")
    print("|---|---|---|---|---|---|")
    for dtype, dim, batch, field, x, t in _grid(dims, batches, dtypes):
        methods = chunk_methods(field, x, t)
        best, outputs = time_methods(methods, rounds, min_s, expensive=False)
        first = outputs["loop"]
        same = all(torch.equal(o, first) for o in outputs.values())  # type: ignore[arg-type]
        strategy, chunk = choose_strategy(batch, dim, x.device)
        cells = ", ".join(f"{name}: {best[name] * 1e3:.2f}" for name in methods)
        print(
            f"| {str(dtype).replace('torch.', '')} | {dim} | {batch} | "
            f"{strategy}({chunk}) | {cells} | {'yes' if same else 'no'} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16, 64, 256])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 512])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=min(2, torch.get_num_threads()))
    parser.add_argument("--quick", action="store_true", help="d in {2, 16}, B in {16, 32}")
    parser.add_argument("--chunks", action="store_true", help="every chunk size against the loop")
    args = parser.parse_args()
    if args.quick:
        args.dims, args.batches, args.dtypes, args.rounds = [2, 16], [16, 32], ["float32"], 2
    torch.set_num_threads(args.threads)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"flow_matching {'yes' if fm_gradient is not None else 'not installed'}"
    )
    if args.chunks:
        run_chunks(args.dims, args.batches, dtypes, args.rounds, args.min_seconds)
        return
    print(header())
    start = time.perf_counter()
    rows = run(args.dims, args.batches, dtypes, args.rounds, args.min_seconds)
    print(f"\n# total {time.perf_counter() - start:.0f} s; all rows again:\n")
    print(header())
    for row in rows:
        print(format_row(row))


if __name__ == "__main__":
    main()
