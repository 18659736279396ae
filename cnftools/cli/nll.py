"""``cnftools nll``: every row's log-likelihood under a trained checkpoint, as a Parquet file.

It loads a checkpoint written by ``cnftools train`` and writes one row per data point with
:func:`cnftools.dataset_nll` (resumable; works under ``torchrun``), with optional baselines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
from pathlib import Path

import torch

from cnftools.cli.common import (
    DTYPES,
    UsageError,
    add_common_arguments,
    add_data_arguments,
    add_solver_arguments,
    builtin_dataset,
    check_device,
    check_writable,
    digits_split_labels,
    load_rows,
    solver_config,
    thread_count,
)
from cnftools.data import Dequantization
from cnftools.estimators import Hutchinson
from cnftools.nll import (
    DataOptions,
    Execution,
    Output,
    PerRow,
    RowsFailedError,
    RunInterrupted,
    dataset_nll,
    gaussian_baseline_nll,
    histogram_baseline_nll,
    read_rows,
)
from cnftools.training import load_checkpoint

__all__ = ["HELP", "add_arguments", "run"]

HELP = (
    "compute every row's log-likelihood (nats; bits/dim for integer data) under a trained "
    "checkpoint; writes a resumable Parquet file; runs under torchrun"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Example: cnftools nll --model digits.pt --dataset digits --split test --out test.parquet "
        "--baselines. Under torchrun: torchrun --nproc-per-node 4 -m cnftools.cli nll ... "
        "(rank 0 writes --out)."
    )
    p.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="CKPT",
        help="checkpoint from `cnftools train` (loaded with weights_only=True)",
    )
    add_data_arguments(p, "test")
    _add_output_arguments(p)
    _add_run_arguments(p)
    add_solver_arguments(p)
    _add_scale_arguments(p)
    p.add_argument(
        "--json", action="store_true", help="print the summary as JSON (NaN written as null)"
    )
    add_common_arguments(p)


def _add_output_arguments(p: argparse.ArgumentParser) -> None:
    """Where the rows go and how a run resumes (cnftools.nll.Output)."""
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="FILE.parquet",
        help="write one row per data point here (chunks go to FILE.parquet.chunks/ while running)",
    )
    p.add_argument(
        "--resume", action="store_true", help="continue an interrupted run writing the same --out"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="discard an existing --out and its chunks"
    )
    p.add_argument(
        "--keep-chunks", action="store_true", help="keep FILE.parquet.chunks/ after finishing"
    )
    p.add_argument(
        "--run-id",
        default=None,
        help="identity of the model for --resume instead of its content fingerprint (rarely "
        "needed: a checkpoint's weights are fingerprinted)",
    )


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Batch size and the divergence (defaults from cnftools.nll.Execution)."""
    defaults = Execution()
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"rows per ODE solve (default {defaults.batch_size})",
    )
    p.add_argument(
        "--divergence",
        choices=("exact", "hutchinson"),
        default="exact",
        help="divergence: exact (default; the field's closed form if it has one) or hutchinson",
    )
    p.add_argument(
        "--probes",
        type=int,
        default=1,
        help="Hutchinson probes per solve (default 1; >= 2 gives a per-row stderr)",
    )
    p.add_argument(
        "--target-stderr",
        type=float,
        default=None,
        help="Hutchinson: add probes until the probe part of the mean NLL's stderr is at most this (nats)",
    )
    p.add_argument(
        "--max-probes",
        type=int,
        default=defaults.max_probes,
        help=f"cap on probes per row for --target-stderr (default {defaults.max_probes})",
    )


def _add_scale_arguments(p: argparse.ArgumentParser) -> None:
    """Dequantization, bits per dimension and the baselines."""
    p.add_argument(
        "--dequantize",
        type=int,
        default=None,
        metavar="L",
        help="integer data in 0..L-1 (adds bits/dim); default: the checkpoint's setting; 0 turns it off",
    )
    p.add_argument(
        "--dequantize-samples",
        type=int,
        default=1,
        metavar="K",
        help="importance samples K of the dequantized bound (default 1)",
    )
    p.add_argument(
        "--centered",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="y = 2(x+u)/L - 1 scaling (default: the checkpoint's)",
    )
    p.add_argument(
        "--bpd-dims",
        type=int,
        default=None,
        metavar="D",
        help="bits/dim for continuous data: report nll / (D ln 2), D the number of dimensions in "
        "your convention (integer data with --dequantize get bits/dim over their own dimensions)",
    )
    p.add_argument(
        "--baselines",
        action="store_true",
        help="also report a full-covariance Gaussian and an independent per-dimension histogram, "
        "fitted on --baseline-data (default for a built-in dataset: its train split), on the same "
        "dequantized scale",
    )
    p.add_argument(
        "--baseline-data",
        type=Path,
        default=None,
        metavar="FILE",
        help="training rows for --baselines",
    )


def run(args: argparse.Namespace) -> int:

    device = check_device(args.device) if args.device else None
    for flag in ("resume", "overwrite", "keep_chunks"):
        if getattr(args, flag) and args.out is None:
            name = "--" + flag.replace("_", "-")
            raise UsageError(f"{name} needs --out FILE.parquet (without it nothing is stored)")
    if args.resume and args.overwrite:
        raise UsageError(
            "--resume and --overwrite contradict each other: --resume continues the run at "
            "--out, --overwrite discards it; give one"
        )
    if args.out is not None:
        check_writable(args.out)
    started = _init_distributed()
    try:
        return _nll(args, device)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        raise UsageError(str(error)) from None
    except RowsFailedError as error:  # every row failed: a result, not a usage error
        print(f"cnftools nll: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as error:  # Ctrl-C: the lock is released, finished rows are kept
        print(_interrupted(args, error), file=sys.stderr)
        return 130
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _interrupted(args: argparse.Namespace, error: KeyboardInterrupt) -> str:
    """What an interrupted run kept, and the exact command that continues it."""
    if args.out is None:
        return (
            "cnftools nll: interrupted; nothing was kept (without --out nothing is written): "
            "run with --out FILE.parquet to make a run resumable"
        )
    chunks = args.out.with_name(args.out.name + ".chunks")
    if not isinstance(error, RunInterrupted) and not chunks.is_dir():
        # stopped before the run began (loading the model or the data): nothing is stored
        return (
            "cnftools nll: interrupted before any row was computed; nothing was kept; run it "
            f"again with:\n  {shlex.join(['cnftools', *getattr(args, 'argv', [])])}"
        )
    kept = ""
    if isinstance(error, RunInterrupted):
        of = "" if error.rows is None else f" of {error.rows}"
        kept = f"{error.kept}{of} rows "
    again = [a for a in getattr(args, "argv", []) if a != "--overwrite"]
    if "--resume" not in again:
        again.append("--resume")
    return (
        f"cnftools nll: interrupted; {kept}kept in {os.fspath(chunks)}/ (the lock is released); "
        f"continue with:\n  {shlex.join(['cnftools', *again])}"
    )


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment) start the process group: nccl on CUDA,
    gloo on CPU. Returns whether this call started it."""

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)
    return True


def _load_model(path: Path, device: torch.device | None):

    if not path.is_file():
        raise UsageError(f"--model {str(path)!r}: no such file")
    try:
        return load_checkpoint(path, map_location=device or "cpu")
    except Exception as error:
        text = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        raise UsageError(
            f"--model {str(path)!r} is not a readable cnftools checkpoint ({text}); make one with "
            "`cnftools train`"
        ) from None


def _json_safe(value: object) -> object:
    """NaN and inf become ``None`` (JSON has no NaN); containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _nll(args: argparse.Namespace, device: torch.device | None) -> int:

    ckpt = _load_model(args.model, device)
    field = ckpt.field
    if args.dtype:
        field = field.to(DTYPES[args.dtype])
    rows, levels = load_rows(args)
    stored = (ckpt.extra or {}).get("dequantization")
    if args.dequantize is not None:
        levels = args.dequantize or None
    elif stored:
        levels = int(stored["levels"])
    elif rows.is_floating_point():
        levels = None
    centered = (
        args.centered if args.centered is not None else bool(stored and stored.get("centered"))
    )
    deq = None if levels is None else Dequantization(levels, args.dequantize_samples, centered)
    if deq is None and args.centered is not None:
        flag = "--centered" if args.centered else "--no-centered"
        raise UsageError(
            f"{flag} sets the scaling of dequantized integer data, but this run has no "
            "dequantization (float data, or --dequantize 0): drop the flag, or pass --dequantize L"
        )
    if deq is not None and args.bpd_dims is not None:
        raise UsageError(
            "--bpd-dims is for continuous data; dequantized integer data get bits/dim over "
            "their own dimensions: drop --bpd-dims"
        )
    extras = None
    if (ckpt.extra or {}).get("conditional"):
        if args.dataset != "digits":
            raise UsageError(
                "--model is class-conditional (trained with --conditional on digit labels): "
                "score it on --dataset digits, whose labels it needs"
            )
        extras = {"y": PerRow(digits_split_labels(args.split))}
    frame = dataset_nll(
        field,
        rows,
        estimator=Hutchinson(args.probes) if args.divergence == "hutchinson" else None,
        config=solver_config(args),
        data_options=DataOptions(extras=extras, dequantization=deq, bpd_dims=args.bpd_dims),
        output=None if args.out is None else _output(args),
        execution=Execution(
            batch_size=args.batch_size,
            device=device,
            dtype=DTYPES[args.dtype] if args.dtype else None,
            num_threads=thread_count(args),
            progress=args.progress,
            seed=args.seed,
            target_stderr=args.target_stderr,
            max_probes=args.max_probes,
        ),
    )
    if frame is None:  # a rank other than 0 under torchrun
        return 0
    summary = dict(frame.attrs["summary"])
    if args.baselines:
        summary["baselines"] = _baselines(args, rows, deq)
    if args.json:
        print(json.dumps(_json_safe(summary), indent=1, default=str, allow_nan=False))
    else:
        _print_summary(summary, deq, args.out)
    return 0 if summary["failures"] == 0 else 1


def _output(args: argparse.Namespace) -> Output:
    return Output(
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        keep_chunks=args.keep_chunks,
        run_id=args.run_id,
    )


def _baselines(args: argparse.Namespace, test: torch.Tensor, deq: object) -> dict[str, float]:

    if not isinstance(deq, Dequantization):
        raise UsageError("--baselines needs integer data with a dequantization (--dequantize L)")
    if args.baseline_data is not None:
        rows = read_rows(args.baseline_data, args.columns.split(",") if args.columns else None)
        train = rows.read_all()
    elif args.dataset is not None:
        train, _ = builtin_dataset(args.dataset, "train", args.n, args.seed)
    else:
        raise UsageError("--baselines with --data needs --baseline-data TRAIN_FILE")
    dim = math.prod(test.shape[1:])
    scale = dim * math.log(2.0)
    gauss = gaussian_baseline_nll(train, test, deq, seed=args.seed) / scale
    hist = histogram_baseline_nll(train, test, deq.levels) / scale
    return {
        "gaussian_bpd": float(gauss.mean()),
        "gaussian_bpd_stderr": float(gauss.std() / math.sqrt(len(gauss))),
        "histogram_bpd": float(hist.mean()),
        "histogram_bpd_stderr": float(hist.std() / math.sqrt(len(hist))),
        "uniform_bpd": math.log2(deq.levels),
    }


def _print_summary(summary: dict, deq: object, out: Path | None) -> None:
    print(f"rows {summary['rows']}, ok {summary['ok']}, failures {summary['failures']}")
    print(
        f"mean NLL {summary['mean_nll']:.5f} ± {summary['nll_stderr']:.5f} nats (± = sampling stderr)"
    )
    if "probe_stderr" in summary:
        print(
            f"probe part of the stderr {summary['probe_stderr']:.5f} nats ({summary.get('probes_per_row', '?')} probes/row)"
        )
    if "mean_bpd" in summary:
        how = f"K = {deq.samples}" if isinstance(deq, Dequantization) else "continuous density"
        print(f"mean bits/dim {summary['mean_bpd']:.4f} ± {summary['bpd_stderr']:.4f} ({how})")
    print(
        f"total NFE {summary.get('total_nfe')}, {summary.get('rows_per_s', float('nan')):.1f} rows/s, "
        f"{summary.get('seconds', float('nan')):.1f} s"
    )
    if "baselines" in summary:
        b = summary["baselines"]
        print(
            f"baseline full-covariance Gaussian: {b['gaussian_bpd']:.4f} ± {b['gaussian_bpd_stderr']:.4f} bits/dim"
        )
        print(
            f"baseline per-dimension histogram:  {b['histogram_bpd']:.4f} ± {b['histogram_bpd_stderr']:.4f} bits/dim"
        )
        print(f"uniform on the cube:               {b['uniform_bpd']:.4f} bits/dim")
    if out is not None:
        print(f"rows written to {out}")
