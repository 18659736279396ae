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

__all__ = ["UsageError", "check_device", "check_writable", "main"]


class UsageError(Exception):
    """A user error on the command line: :func:`main` prints its message on one line, exit 2."""


def check_device(text: str, flag: str = "--device") -> torch.device:
    """``torch.device(text)``, or :class:`UsageError` naming ``flag`` when it is not usable here."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError) as error:
        raise UsageError(f"{flag} {text!r}: not a device ({error}); use cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"{flag} {text}: CUDA is not available on this machine (torch {torch.__version__})"
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise UsageError(
            f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {text}: use cpu or cuda[:N]")
    return device


def check_writable(path: Path, flag: str = "--out") -> None:
    """Check, before any work, that ``path`` can be written (its folder is created if needed)."""
    import os
    import tempfile

    if path.is_dir():
        raise UsageError(f"{flag} {os.fspath(path)!r} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".probe"):
            pass
    except OSError as error:
        raise UsageError(
            f"{flag} {os.fspath(path)!r} is not writable ({error.strerror or error})"
        ) from None


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
    try:
        return check_device(text)
    except UsageError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", type=_device, default=torch.device("cpu"), help="cpu (default) or cuda[:N]"
    )
    parser.add_argument(
        "--dtype",
        choices=[*_DTYPES, "both"],
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


def _run_validate(args: argparse.Namespace) -> int:
    from cnftools.validation import Context, Run, discover, run_experiments, write_report

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
    dtype_choice = args.dtype or ("both" if args.full else "float64")
    dtypes = list(_DTYPES.values()) if dtype_choice == "both" else [_DTYPES[dtype_choice]]
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
        held = (
            f", {sum(c.held for c in run.claims)}/{len(run.claims)} claims held"
            if run.claims
            else ""
        )
        print(
            f"{run.n_checks - run.n_failed}/{run.n_checks} checks passed{held}, "
            f"{len(errors)} experiment(s) crashed, {run.elapsed:.1f} s\n"
        )
    if args.out is not None:
        report = args.out / "report.md"
        write_report(report, runs)
        print(f"report written to {report}")
    return 1 if any(r.n_failed or r.errors for r in runs) else 0


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
    try:
        return int(args.run(args))
    except UsageError as error:  # the one place a user error becomes a message and exit 2
        print(f"cnftools {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
