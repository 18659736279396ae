"""``cnftools validate``: run the experiments of :mod:`cnftools.validation` and report."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from cnftools._resources import entry_threads
from cnftools.cli.common import (
    DTYPES,
    UsageError,
    add_threads_argument,
    check_device,
    check_writable,
    thread_count,
)
from cnftools.validation import Context, Run, discover, run_experiments, write_report

__all__ = ["HELP", "add_arguments", "run"]

HELP = "check every theorem numerically against closed forms; non-zero exit on failure"
DESCRIPTION = (
    "Run the numerical checks of the theory (docs/theory/) and print one row per check "
    "(section, check, subject, error, tolerance, pass). Exit status 1 when any check fails."
)


def _device(text: str) -> torch.device:
    try:
        return check_device(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=_device, default=torch.device("cpu"), help="cpu (default) or cuda[:N]"
    )
    parser.add_argument(
        "--dtype",
        choices=[*DTYPES, "both"],
        default=None,
        help="floating precision of every check: float64, float32 or both "
        "(default: float64; with --full, both)",
    )
    parser.add_argument(
        "--full", action="store_true", help="run the full set of checks (slower, more cases)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write DIR/report.md and PNG figures into DIR"
    )
    parser.add_argument(
        "--only",
        action="append",
        default=None,
        metavar="NAME",
        help="run only the named experiment(s) (repeatable); see --list",
    )
    parser.add_argument("--list", action="store_true", help="list the experiments and exit")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:

    with contextlib.ExitStack() as stack:
        try:  # a bad CNFTOOLS_THREADS is a usage error, as in `cnftools nll` and `train`
            stack.enter_context(entry_threads(args.device, thread_count(args)))
        except (TypeError, ValueError) as error:
            raise UsageError(str(error)) from None
        return _validate(args)


def _validate(args: argparse.Namespace) -> int:

    experiments = discover()
    if args.list:
        for e in experiments:
            print(f"{e.name:<18} {e.heading}")
        return 0
    if args.only:
        known = {e.name for e in experiments}
        wanted = {name.strip().lower() for name in args.only}
        unknown = sorted(wanted - known)
        if unknown:
            print(f"unknown experiment(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
            return 2
        experiments = [e for e in experiments if e.name in wanted]
    dtype_choice = args.dtype or ("both" if args.full else "float64")
    dtypes = list(DTYPES.values()) if dtype_choice == "both" else [DTYPES[dtype_choice]]
    if args.out is not None:
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out {str(args.out)!r}: {error.strerror or error}") from None
        check_writable(args.out / "report.md")
    runs = []
    for index, dtype in enumerate(dtypes):
        # Figures come from the first dtype's run only (the second would overwrite them).
        out = args.out if index == 0 else None
        ctx = Context(device=args.device, dtype=dtype, full=args.full, seed=args.seed, out=out)
        mode = "full" if args.full else "quick"
        print(f"# cnftools validate: device={ctx.device} dtype={str(dtype)[6:]} mode={mode}\n")
        start = time.perf_counter()
        results, errors = run_experiments(ctx, experiments)
        run = Run(ctx, results, errors, time.perf_counter() - start)
        runs.append(run)
        held = f"; {run.claims_summary()}" if run.claims else ""
        print(
            f"{run.n_checks - run.n_failed}/{run.n_checks} checks passed{held}, "
            f"{len(errors)} experiment(s) crashed, {run.elapsed:.1f} s\n"
        )
    if args.out is not None:
        report = args.out / "report.md"
        write_report(report, runs)
        print(f"report written to {report}")
    return 1 if any(r.n_failed or r.errors for r in runs) else 0
