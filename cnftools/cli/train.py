"""``cnftools train``: fit a field by conditional flow matching and save a checkpoint.

It fits an :class:`~cnftools.MLPField` (class-conditional with ``--conditional``) to a data file
(``.npy``, ``.csv``, ``.parquet``) or a built-in dataset and saves a checkpoint that
``torch.load(weights_only=True)`` reads (no pickled code).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

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
from cnftools.training import MLPField, save_checkpoint, train_cfm

__all__ = ["HELP", "MAX_PARAMETERS", "add_arguments", "run"]

MAX_PARAMETERS = 2**30
"""Most parameters ``cnftools train`` builds where the available memory cannot be read (where it
can, the model, its gradients, Adam's two moments and the activations must fit in it)."""

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
    p.add_argument(
        "--hidden",
        default="256,256,256",
        metavar="W,W,...",
        help="hidden layer widths, comma-separated positive integers (default 256,256,256); "
        "a model that does not fit in the available memory is refused before it is built",
    )
    p.add_argument("--activation", default="silu", help="silu (default), softplus, tanh or gelu")
    p.add_argument(
        "--time-embedding", default="sinusoidal", help="sinusoidal (default), fourier or linear"
    )
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    p.add_argument("--batch-size", type=int, default=256, help="examples per step (default 256)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--minibatch-ot", action="store_true", help="pair noise and data by exact minibatch OT"
    )
    p.add_argument(
        "--t-max",
        type=float,
        default=1.0,
        help="largest training time (default 1; e.g. 0.999 for vp)",
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

    # Flags that do not apply are refused, not ignored.
    if args.path == "ot" and args.sigma_max is not None:
        raise ValueError("--sigma-max applies to --path ve only (OT has sigma_min alone)")
    if args.path == "vp" and (args.sigma_min is not None or args.sigma_max is not None):
        raise ValueError(
            "--sigma-min/--sigma-max do not apply to --path vp (beta_min=0.1, beta_max=20)"
        )
    if args.conditional and args.dataset != "digits":
        raise ValueError("--conditional needs labelled data: --dataset digits")
    rows, levels = load_rows(args)
    labels = digits_split_labels(args.split) if args.conditional else None
    levels = args.dequantize if args.dequantize is not None else levels
    if args.centered and levels is None:
        raise ValueError("--centered applies only with a dequantization (--dequantize L or digits)")
    dtype = DTYPES[args.dtype] if args.dtype else torch.float32
    device = torch.device(args.device or "cpu")
    labels = None if labels is None else labels.to(device)
    if args.path == "ot":
        path = OTPath(**({} if args.sigma_min is None else {"sigma_min": args.sigma_min}))
    elif args.path == "ve":
        kw = {
            k: v
            for k, v in (("sigma_min", args.sigma_min), ("sigma_max", args.sigma_max))
            if v is not None
        }
        path = VEPath(**kw)
    else:
        path = VPPath()
    event = tuple(rows.shape[1:])
    field_args = {
        "dim": event[0] if len(event) == 1 else event,
        "hidden": args.hidden,
        "activation": args.activation,
        "time_embedding": args.time_embedding,
        "num_classes": None if labels is None else int(labels.max()) + 1,
        "dtype": dtype,
    }
    _check_model_size(field_args, min(args.batch_size, rows.shape[0]), device)
    field = MLPField(**field_args, device=device)
    if levels is not None:
        x = rows.to(device)
        centered = args.centered

        def sampler(n: int, gen: torch.Generator) -> object:
            index = torch.randint(0, x.shape[0], (n,), generator=gen, device=gen.device)
            index = index.to(x.device)
            x1 = dequantize(x[index], levels, gen, centered=centered, dtype=dtype)
            return x1 if labels is None else (x1, {"y": labels[index]})

        data: object = sampler
        extras = None
    else:
        data = rows.to(device=device, dtype=dtype)
        extras = None if labels is None else {"y": labels}
    result = train_cfm(
        field,
        path,
        data,  # type: ignore[arg-type]
        steps=args.steps,
        batch_size=min(args.batch_size, rows.shape[0]),
        lr=args.lr,
        seed=args.seed,
        minibatch_ot=args.minibatch_ot,
        t_max=args.t_max,
        extras=extras,
        progress=bool(args.progress if args.progress is not None else sys.stderr.isatty()),
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
