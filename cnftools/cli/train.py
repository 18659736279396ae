"""``cnftools train``: fit a field by conditional flow matching and save a checkpoint.

It fits an :class:`~cnftools.MLPField` (class-conditional with ``--conditional``) to a data file
(``.npy``, ``.csv``, ``.parquet``) or a built-in dataset and saves a checkpoint that
``torch.load(weights_only=True)`` reads (no pickled code).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from cnftools._resources import entry_threads
from cnftools.cli.common import (
    DTYPES,
    UsageError,
    add_common_arguments,
    add_data_arguments,
    check_device,
    check_writable,
    digits_split_labels,
    load_rows,
    thread_count,
)
from cnftools.data import dequantize
from cnftools.paths import OTPath, VEPath, VPPath
from cnftools.training import (
    Batches,
    MLPField,
    Monitor,
    Optimization,
    TimeFeatures,
    save_checkpoint,
    train_cfm,
)

__all__ = ["HELP", "MAX_PARAMETERS", "add_arguments", "run"]

MAX_PARAMETERS = 2**30
"""Most parameters ``cnftools train`` builds where the available memory cannot be read (where it
can, the model, its gradients, Adam's two moments and the activations must fit in it)."""

_FIELD_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(MLPField).parameters.items()
}
"""The defaults of :class:`~cnftools.MLPField`'s arguments (the flags take theirs from them)."""
_BATCHES = Batches()
T = TypeVar("T")
_TIME = TimeFeatures()

HELP = (
    "train an MLP velocity field by conditional flow matching on a data file or built-in dataset "
    "and save a checkpoint (weights and plain config only)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Example: cnftools train --dataset digits --split train --dequantize 17 --hidden 256,256,256 "
        "--steps 3000 --out digits.pt"
    )
    add_data_arguments(p, "train")
    p.add_argument(
        "--out", type=Path, required=True, metavar="CKPT", help="checkpoint file to write (.pt)"
    )
    p.add_argument(
        "--path", choices=("ot", "ve", "vp"), default="ot", help="probability path (default ot)"
    )
    p.add_argument(
        "--sigma-min", type=float, default=None, help="OT/VE sigma_min (default: the path's own)"
    )
    p.add_argument(
        "--sigma-max", type=float, default=None, help="VE sigma_max (default: the path's own)"
    )
    hidden = ",".join(str(width) for width in _FIELD_DEFAULTS["hidden"])
    p.add_argument(
        "--hidden",
        default=hidden,
        metavar="W,W,...",
        help=f"hidden layer widths, comma-separated positive integers (default {hidden}); "
        "a model that does not fit in the available memory is refused before it is built",
    )
    p.add_argument(
        "--activation",
        default=_FIELD_DEFAULTS["activation"],
        help=f"silu, softplus, tanh or gelu (default {_FIELD_DEFAULTS['activation']})",
    )
    p.add_argument(
        "--time-embedding",
        default=_TIME.kind,
        help=f"sinusoidal, fourier or linear (default {_TIME.kind})",
    )
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=_BATCHES.size,
        help=f"examples per step (default {_BATCHES.size}; at most the number of rows)",
    )
    p.add_argument(
        "--lr",
        type=float,
        default=Optimization.DEFAULT_LR,
        help=f"Adam learning rate (default {Optimization.DEFAULT_LR:g})",
    )
    p.add_argument(
        "--minibatch-ot",
        action="store_true",
        default=_BATCHES.minibatch_ot,
        help="pair noise and data by exact minibatch OT",
    )
    p.add_argument(
        "--t-max",
        type=float,
        default=_BATCHES.t_max,
        help=f"largest training time (default {_BATCHES.t_max:g}; e.g. 0.999 for vp)",
    )
    p.add_argument(
        "--dequantize",
        type=int,
        default=None,
        metavar="L",
        help="the data are integers 0..L-1: train on y = (x + u)/L with fresh u ~ U[0,1) each step "
        "(stored in the checkpoint; digits: default 17)",
    )
    p.add_argument("--centered", action="store_true", help="with --dequantize: y = 2(x + u)/L - 1")
    p.add_argument(
        "--conditional",
        action="store_true",
        help="train a class-conditional field v(x, t, y) on the dataset's labels (--dataset "
        "digits); `cnftools nll` then reports log p(x | y) with each row's own label",
    )
    add_common_arguments(p)


def parse_hidden(text: str) -> tuple[int, ...]:
    """``--hidden W,W,...``: positive integer widths (empty: no hidden layer), or a UsageError."""
    parts = [part.strip() for part in text.split(",")]
    if text.strip() == "":
        return ()
    if not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise UsageError(
            f"--hidden {text!r}: expected comma-separated positive integers (layer widths), "
            "e.g. 256,256,256"
        )
    return tuple(int(part) for part in parts)


def _available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now on ``device`` (``None`` where it cannot be read)."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # pragma: no cover - needs a GPU
            return None
    found: list[int] = []
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    if not found:  # no /proc (macOS): the free pages; none on Windows
        with contextlib.suppress(AttributeError, OSError, ValueError):
            found.append(int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")))
    try:  # a container's own limit (cgroup v2), below the machine's
        with open("/sys/fs/cgroup/memory.max") as handle:
            limit = handle.read().strip()
        with open("/sys/fs/cgroup/memory.current") as handle:
            used = int(handle.read().strip())
        if limit.isdigit():
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _check_model_size(field_args: dict, batch_size: int, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model that cannot fit: its parameters are counted
    on the ``meta`` device (no memory), then the model, its gradients, Adam's two moments and a
    batch's activations are compared with the memory available (or :data:`MAX_PARAMETERS`)."""
    dtype = field_args["dtype"]
    with torch.device("meta"):
        skeleton = MLPField(**{**field_args, "device": "meta"})
    parameters = sum(p.numel() for p in skeleton.parameters())
    itemsize = torch.empty((), dtype=dtype, device="meta").element_size()
    widths = sum(field_args["hidden"]) + 2 * skeleton.dim
    need = (4 * parameters + 4 * batch_size * widths) * itemsize
    available = _available_memory(device)
    hidden = ",".join(str(w) for w in field_args["hidden"])
    if available is None:
        if parameters > MAX_PARAMETERS:
            raise UsageError(
                f"--hidden {hidden}: the model would have {parameters:,} parameters, more than "
                f"the {MAX_PARAMETERS:,} cnftools train builds when the available memory cannot "
                "be read; choose smaller widths"
            )
        return
    if need > available:
        raise UsageError(
            f"--hidden {hidden}: the model would have {parameters:,} parameters and training it "
            f"needs about {need / 2**30:,.1f} GiB (weights, gradients, Adam's moments, "
            f"activations) but {available / 2**30:,.1f} GiB are available on {device}; choose "
            "smaller widths"
        )


def run(args: argparse.Namespace) -> int:

    device = check_device(args.device or "cpu")
    args.hidden = parse_hidden(args.hidden) if isinstance(args.hidden, str) else args.hidden
    check_writable(args.out)  # before any training: a run must not end in an unwritable path
    try:
        with entry_threads(device, thread_count(args)):
            return _train(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None


def _train(args: argparse.Namespace) -> int:
    _refuse_flags_that_do_not_apply(args)
    rows, levels = load_rows(args)
    labels = digits_split_labels(args.split) if args.conditional else None
    levels = args.dequantize if args.dequantize is not None else levels
    if args.centered and levels is None:
        raise ValueError("--centered applies only with a dequantization (--dequantize L or digits)")
    dtype = DTYPES[args.dtype] if args.dtype else torch.float32
    device = torch.device(args.device or "cpu")
    labels = None if labels is None else labels.to(device)
    path = _path(args)
    event = tuple(rows.shape[1:])
    field_args = {
        "dim": event[0] if len(event) == 1 else event,
        "hidden": args.hidden,
        "activation": args.activation,
        "time": _built("--time-embedding", lambda: TimeFeatures(args.time_embedding)),
        "num_classes": None if labels is None else int(labels.max()) + 1,
        "dtype": dtype,
    }
    batches = _built(
        "--batch-size/--t-max/--seed",
        lambda: Batches(
            size=min(args.batch_size, rows.shape[0]),
            t_max=args.t_max,
            minibatch_ot=args.minibatch_ot,
            seed=args.seed,
        ),
    )
    optimization = _built("--lr", lambda: Optimization(lr=args.lr))
    _check_model_size(field_args, batches.size, device)
    field = MLPField(**field_args, device=device)
    data, extras = _data(args, rows, labels, levels, dtype, device)
    result = train_cfm(
        field,
        path,
        data,  # type: ignore[arg-type]
        steps=args.steps,
        batches=batches,
        optimization=optimization,
        monitor=Monitor(progress=bool(_progress(args))),
        extras=extras,
    )
    extra = {
        "dequantization": None
        if levels is None
        else {"levels": int(levels), "centered": bool(args.centered)},
        "data": str(args.data) if args.data is not None else f"{args.dataset}:{args.split}",
        "steps": args.steps,
        "final_loss": float(result.history["loss"].tail(50).mean()),
        "conditional": "digit labels" if labels is not None else None,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_checkpoint(args.out, field, path=path, extra=extra)
    except OSError as error:  # a full disk: keep the trained model somewhere if at all possible
        return _save_elsewhere(error, field, path, extra)
    print(
        f"trained {args.steps} steps in {result.seconds:.1f} s, loss (last 50) "
        f"{extra['final_loss']:.4g}; checkpoint written to {args.out}"
    )
    return 0


def _built(flags: str, build: Callable[[], T]) -> T:
    """An option object built from flags; its error, if any, prefixed with the flags."""
    try:
        return build()
    except (TypeError, ValueError) as error:
        raise ValueError(f"{flags}: {error}") from None


def _progress(args: argparse.Namespace) -> bool:
    """``--progress``/``--no-progress``, else a bar when stderr is a terminal."""
    return bool(args.progress if args.progress is not None else sys.stderr.isatty())


def _refuse_flags_that_do_not_apply(args: argparse.Namespace) -> None:
    """Flags that do not apply are refused, not ignored."""
    if args.path == "ot" and args.sigma_max is not None:
        raise ValueError("--sigma-max applies to --path ve only (OT has sigma_min alone)")
    if args.path == "vp" and (args.sigma_min is not None or args.sigma_max is not None):
        raise ValueError(
            "--sigma-min/--sigma-max do not apply to --path vp (beta_min=0.1, beta_max=20)"
        )
    if args.conditional and args.dataset != "digits":
        raise ValueError("--conditional needs labelled data: --dataset digits")


def _path(args: argparse.Namespace) -> OTPath | VEPath | VPPath:
    """The probability path of ``--path``, with the path's own defaults for unset sigmas."""
    if args.path == "vp":
        return VPPath()
    given = {"sigma_min": args.sigma_min, "sigma_max": args.sigma_max}
    kw = {name: value for name, value in given.items() if value is not None}
    return OTPath(**kw) if args.path == "ot" else VEPath(**kw)


def _data(
    args: argparse.Namespace,
    rows: torch.Tensor,
    labels: torch.Tensor | None,
    levels: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[object, dict | None]:
    """What :func:`train_cfm` trains on: the rows (and labels as extras), or a sampler that
    dequantizes freshly drawn rows on every step."""
    if levels is None:
        data = rows.to(device=device, dtype=dtype)
        return data, None if labels is None else {"y": labels}
    x = rows.to(device)
    centered = args.centered

    def sampler(n: int, gen: torch.Generator) -> object:
        index = torch.randint(0, x.shape[0], (n,), generator=gen, device=gen.device)
        index = index.to(x.device)
        x1 = dequantize(x[index], levels, gen, centered=centered, dtype=dtype)
        return x1 if labels is None else (x1, {"y": labels[index]})

    return sampler, None


def _save_elsewhere(error: OSError, field: MLPField, path: object, extra: dict) -> int:
    """The checkpoint could not be written at ``--out``: try the temporary folder, and say where
    the model (and the previous checkpoint) are. Exit status 1."""
    fallback = Path(tempfile.gettempdir()) / f"cnftools-train-{os.getpid()}.pt"
    try:
        save_checkpoint(fallback, field, path=path, extra=extra)  # type: ignore[arg-type]
    except OSError as second:
        where = f"it could not be saved to {os.fspath(fallback)!r} either ({second.strerror}): "
        where += "the trained model is lost"
    else:
        where = f"the trained model was saved to {os.fspath(fallback)!r} instead"
    print(f"cnftools train: error: {error}; {where}", file=sys.stderr)
    return 1
