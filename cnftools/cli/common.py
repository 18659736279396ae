"""What every ``cnftools`` command shares: the user-error type, device and output checks, the data
arguments (``--data``/``--dataset``, splits) and the common flags (device, dtype, seed, threads)."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from cnftools._ode import ADAPTIVE_METHODS, FIXED_GRID_METHODS, SolverConfig
from cnftools._resources import check_threads
from cnftools.data import (
    DIGITS_LEVELS,
    checkerboard,
    eight_gaussians,
    load_digit_labels,
    load_digits,
    spirals,
    two_moons,
)
from cnftools.nll import read_rows

__all__ = [
    "DATASETS",
    "DTYPES",
    "UsageError",
    "add_common_arguments",
    "add_data_arguments",
    "add_threads_argument",
    "builtin_dataset",
    "check_device",
    "check_writable",
    "digits_split",
    "digits_split_labels",
    "load_rows",
    "thread_count",
]

DTYPES = {"float64": torch.float64, "float32": torch.float32}
DATASETS = ("digits", "eight_gaussians", "checkerboard", "two_moons", "spirals")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


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


def _digits_rows(split: str, n: int) -> torch.Tensor | slice:
    """The rows of ``split`` among the ``n`` digits: a fixed 80/20 permutation (seed 0)."""
    if split == "all":
        return slice(None)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    n_test = round(_DIGITS_TEST_FRACTION * n)
    index = order[:n_test] if split == "test" else order[n_test:]
    return index.sort().values


def digits_split(split: str) -> torch.Tensor:
    """scikit-learn's digits, split 80/20 by a fixed permutation (seed 0): 1438 train, 359 test.

    ``split`` is ``"train"``, ``"test"`` or ``"all"``; integers ``0..16``, shape ``(N, 64)``.
    """

    data = load_digits()
    return data[_digits_rows(split, data.shape[0])]


def digits_split_labels(split: str) -> torch.Tensor:
    """The class labels ``0..9`` of :func:`digits_split`'s rows, in the same order: ``(N,)``."""

    labels = load_digit_labels()
    return labels[_digits_rows(split, labels.shape[0])]


def builtin_dataset(name: str, split: str, n: int, seed: int) -> tuple[torch.Tensor, int | None]:
    """Rows of a built-in dataset and its number of integer levels (``None``: continuous)."""

    if name == "digits":
        return digits_split(split), DIGITS_LEVELS
    # synthetic sets: a different seed for each split so that train and test never coincide
    gen = torch.Generator().manual_seed(seed + {"train": 0, "test": 1, "all": 2}[split])
    if name == "eight_gaussians":
        return eight_gaussians(dtype=torch.float64).sample(n, gen), None
    if name == "checkerboard":
        return checkerboard().sample(n, gen, dtype=torch.float64), None
    if name == "two_moons":
        return two_moons().sample(n, gen, dtype=torch.float64), None
    return spirals().sample(n, gen, dtype=torch.float64), None


def load_rows(args: argparse.Namespace) -> tuple[torch.Tensor, int | None]:
    """The ``--data`` file or ``--dataset`` as a tensor, and the dataset's levels (if known)."""
    if args.dataset is not None:
        return builtin_dataset(args.dataset, args.split, args.n, args.seed)

    columns = args.columns.split(",") if args.columns else None
    rows = read_rows(args.data, columns)
    return rows.read_all(), None


def add_data_arguments(p: argparse.ArgumentParser, default_split: str) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--data", type=Path, metavar="FILE", help="data file: .npy (N, *event), .csv or .parquet"
    )
    group.add_argument(
        "--dataset",
        choices=DATASETS,
        help="a built-in dataset instead of --data (digits needs scikit-learn)",
    )
    p.add_argument(
        "--columns",
        default=None,
        metavar="A,B,...",
        help="comma-separated column names of a .csv/.parquet file (default: all columns)",
    )
    p.add_argument(
        "--split",
        choices=("train", "test", "all"),
        default=default_split,
        help=f"split of a built-in dataset (default {default_split}); digits: a fixed 80/20 "
        "permutation (1438/359 rows); synthetic sets: independent samples per split",
    )
    p.add_argument(
        "--n",
        type=int,
        default=2000,
        help="rows drawn from a synthetic built-in dataset (default 2000)",
    )


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=None,
        help="cpu or cuda[:N] (default: cpu; under torchrun cuda:LOCAL_RANK when available)",
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="float64 or float32 (train default: float32; nll default: the model's own dtype)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_threads_argument(p)
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )


def thread_count(args: argparse.Namespace) -> int | None:
    """``--threads`` checked (1 to the usable cores), or ``None``: cnftools' thread policy."""
    if args.threads is None:
        return None
    try:
        return check_threads("--threads", args.threads)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads, 1 to the CPU cores this process may use (default: "
        "$CNFTOOLS_THREADS, else the idle cores of this process's share of the machine, from "
        "the load average; 1 on a busy machine)",
    )


def add_solver_arguments(p: argparse.ArgumentParser) -> None:
    """The solver flags, one per :class:`~cnftools.SolverConfig` setting a run may change; their
    defaults are the config's own (never restated here)."""
    defaults = SolverConfig()
    group = p.add_argument_group("ODE solver (cnftools.SolverConfig)")
    group.add_argument(
        "--method",
        default=defaults.method,
        help=f"solver: adaptive {sorted(ADAPTIVE_METHODS)} or fixed-grid "
        f"{sorted(FIXED_GRID_METHODS)} (with --steps); default {defaults.method}",
    )
    group.add_argument(
        "--rtol", type=float, default=defaults.rtol, help=f"relative tolerance ({defaults.rtol:g})"
    )
    group.add_argument(
        "--atol", type=float, default=defaults.atol, help=f"absolute tolerance ({defaults.atol:g})"
    )
    group.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help="number of uniform steps of a fixed-grid --method (e.g. --method rk4 --steps 50)",
    )
    group.add_argument(
        "--accuracy",
        type=float,
        default=None,
        metavar="NATS",
        help="ask for nats: each row's target error; the solver chooses method and tolerances "
        "(instead of --method/--rtol/--atol; an estimate, docs/benchmarks.md)",
    )


def solver_config(args: argparse.Namespace) -> SolverConfig:
    """The :class:`~cnftools.SolverConfig` of the solver flags (a ``ValueError`` for a bad
    combination, e.g. a fixed-grid method without ``--steps``)."""
    if args.accuracy is not None:
        defaults = SolverConfig()
        changed = [
            f"--{name}"
            for name in ("method", "rtol", "atol")
            if getattr(args, name) != getattr(defaults, name)
        ]
        if changed or args.steps is not None:
            given = changed + (["--steps"] if args.steps is not None else [])
            raise ValueError(f"--accuracy chooses the solver itself; drop {', '.join(given)}")
        return SolverConfig(accuracy=args.accuracy)
    if args.method in FIXED_GRID_METHODS and args.steps is None:
        raise ValueError(
            f"--method {args.method} is a fixed-grid method: give its number of steps, e.g. "
            "--steps 50 (or an adaptive --method with --rtol/--atol)"
        )
    if args.method in ADAPTIVE_METHODS and args.steps is not None:
        raise ValueError(
            f"--steps applies to fixed-grid methods {sorted(FIXED_GRID_METHODS)}; --method "
            f"{args.method} is adaptive: control it with --rtol/--atol"
        )
    return SolverConfig(args.method, rtol=args.rtol, atol=args.atol, steps=args.steps)
