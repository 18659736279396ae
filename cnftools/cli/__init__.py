"""The ``cnftools`` command line: ``cnftools validate``, ``cnftools train`` and ``cnftools nll``.

Thin over the library and :mod:`cnftools.validation`; nothing in the library imports this package.
Each command is a module with ``HELP``, ``add_arguments(parser)`` and ``run(args) -> int``, listed
in :data:`COMMANDS`. User errors raise :class:`UsageError`; :func:`main` prints them on one line
and exits with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from cnftools.cli import nll, train, validate
from cnftools.cli.common import UsageError, check_device, check_writable

__all__ = ["COMMANDS", "UsageError", "build_parser", "check_device", "check_writable", "main"]

COMMANDS: dict[str, ModuleType] = {"validate": validate, "train": train, "nll": nll}
"""The subcommands, in the order ``cnftools --help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cnftools`` command."""
    parser = argparse.ArgumentParser(
        prog="cnftools",
        description="Continuous normalizing flows and flow matching with exact likelihoods.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        description = getattr(command, "DESCRIPTION", command.HELP)
        p = sub.add_parser(name, help=command.HELP, description=description)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnftools`` console script."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to print a command to continue
    try:
        return int(args.run(args))
    except UsageError as error:  # the one place a user error becomes a message and exit 2
        print(f"cnftools {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
