"""The ``cnftools`` command line: ``cnftools validate`` (and, as they land, ``nll`` and ``train``).

Thin over the library and :mod:`cnftools.validation`; nothing in the library imports this module.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

__all__ = ["main"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}

# Subcommands registered by other modules of the CLI: name -> (add_arguments, run).
_EXTRA_COMMANDS: dict[
    str,
    tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
] = {}


def register_command(
    name: str,
    help_text: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace], int],
) -> None:
    """Register a subcommand (used by ``cnftools.cli_*`` modules)."""
    _EXTRA_COMMANDS[name] = (help_text, add_arguments, run)


def _device(text: str) -> torch.device:
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"--device {text}: CUDA is not available on this machine (torch {torch.__version__})"
        )
    return device


def _add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=_device, default=torch.device("cpu"), help="cpu (default) or cuda[:N]"
    )
    parser.add_argument(
        "--dtype",
        choices=[*_DTYPES, "both"],
        default="float64",
        help="floating precision of every check (default float64; 'both' runs each)",
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


def _run_validate(args: argparse.Namespace) -> int:
    from cnftools.validation import Context, discover, run_experiments, write_report

    experiments = discover()
    if args.list:
        for e in experiments:
            print(f"{e.name:<24} §{e.section:g}  {e.title}")
        return 0
    if args.only:
        known = {e.name for e in experiments}
        unknown = sorted(set(args.only) - known)
        if unknown:
            print(f"unknown experiment(s) {unknown}; known: {sorted(known)}", file=sys.stderr)
            return 2
        experiments = [e for e in experiments if e.name in args.only]
    dtypes = list(_DTYPES.values()) if args.dtype == "both" else [_DTYPES[args.dtype]]
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for dtype in dtypes:
        ctx = Context(device=args.device, dtype=dtype, full=args.full, seed=args.seed, out=args.out)
        print(
            f"# cnftools validate: device={ctx.device} dtype={str(dtype)[6:]} "
            f"mode={'full' if args.full else 'quick'}\n"
        )
        start = time.perf_counter()
        results, errors = run_experiments(ctx, experiments)
        elapsed = time.perf_counter() - start
        checks = [c for _, cs, _ in results for c in cs if not c.claim]
        claims = [c for _, cs, _ in results for c in cs if c.claim]
        n_failed = sum(not c.passed for c in checks)
        failed += n_failed + len(errors)
        held = f", {sum(c.held for c in claims)}/{len(claims)} claims held" if claims else ""
        print(
            f"{len(checks) - n_failed}/{len(checks)} checks passed{held}, {len(errors)} "
            f"experiment(s) crashed, {elapsed:.1f} s"
        )
        if args.out is not None:
            suffix = "" if len(dtypes) == 1 else f"_{str(dtype)[6:]}"
            report = args.out / f"report{suffix}.md"
            write_report(report, ctx, results, errors, elapsed)
            print(f"report written to {report}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cnftools`` command."""
    parser = argparse.ArgumentParser(
        prog="cnftools",
        description="Continuous normalizing flows and flow matching with exact likelihoods.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    validate = sub.add_parser(
        "validate",
        help="check every theorem numerically against closed forms; non-zero exit on failure",
        description="Run the numerical checks of THEORY.md and print one row per check "
        "(section, check, subject, error, tolerance, pass). Exit status 1 when any check fails.",
    )
    _add_validate_arguments(validate)
    validate.set_defaults(run=_run_validate)
    for name, (help_text, add_arguments, run) in _load_extra_commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def _load_extra_commands() -> dict:
    import importlib
    import pkgutil

    import cnftools

    for info in pkgutil.iter_modules(cnftools.__path__):
        if info.name.startswith("cli_"):
            importlib.import_module(f"cnftools.{info.name}")
    # Read the registry of the importable module: under ``python -m cnftools.cli`` this file runs
    # as ``__main__`` and the cli_* modules register into ``cnftools.cli``.
    return importlib.import_module("cnftools.cli")._EXTRA_COMMANDS


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnftools`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
