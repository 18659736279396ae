"""``cnftools train`` and ``cnftools nll``: make a checkpoint, then score a dataset with it.

``cnftools train`` fits an :class:`~cnftools.MLPField` by conditional flow matching to a data file
(``.npy``, ``.csv``, ``.parquet``) or a built-in dataset and saves a checkpoint that
``torch.load(weights_only=True)`` reads (no pickled code). ``cnftools nll`` loads such a checkpoint
and writes one row per data point to a Parquet file with :func:`cnftools.dataset_nll`
(resumable; works under ``torchrun``). Registered with :func:`cnftools.cli.register_command`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from cnftools.cli import UsageError, check_device, check_writable, register_command

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_DATASETS = ("digits", "eight_gaussians", "checkerboard", "two_moons", "spirals")
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0


# ----------------------------------------------------------------------------------------------
def digits_split(split: str) -> torch.Tensor:
    """scikit-learn's digits, split 80/20 by a fixed permutation (seed 0): 1438 train, 359 test.

    ``split`` is ``"train"``, ``"test"`` or ``"all"``; integers ``0..16``, shape ``(N, 64)``.
    """
    from cnftools.data import load_digits

    data = load_digits()
    if split == "all":
        return data
    order = torch.randperm(
        data.shape[0], generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED)
    )
    n_test = round(_DIGITS_TEST_FRACTION * data.shape[0])
    index = order[:n_test] if split == "test" else order[n_test:]
    return data[index.sort().values]


def _builtin(name: str, split: str, n: int, seed: int) -> tuple[torch.Tensor, int | None]:
    """Rows of a built-in dataset and its number of integer levels (``None``: continuous)."""
    from cnftools import data as datasets

    if name == "digits":
        return digits_split(split), datasets.DIGITS_LEVELS
    # synthetic sets: a different seed for each split so that train and test never coincide
    gen = torch.Generator().manual_seed(seed + {"train": 0, "test": 1, "all": 2}[split])
    if name == "eight_gaussians":
        return datasets.eight_gaussians(dtype=torch.float64).sample(n, gen), None
    if name == "checkerboard":
        return datasets.Checkerboard().sample(n, gen, dtype=torch.float64), None
    if name == "two_moons":
        return datasets.two_moons(n, gen, dtype=torch.float64), None
    return datasets.spirals(n, gen, dtype=torch.float64), None


def _load_rows(args: argparse.Namespace) -> tuple[torch.Tensor, int | None]:
    """The ``--data`` file or ``--dataset`` as a tensor, and the dataset's levels (if known)."""
    if args.dataset is not None:
        return _builtin(args.dataset, args.split, args.n, args.seed)
    from cnftools.nll import read_rows

    columns = args.columns.split(",") if args.columns else None
    rows = read_rows(args.data, columns)
    return rows.read_all(), None


def _add_data_arguments(p: argparse.ArgumentParser, default_split: str) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--data", type=Path, metavar="FILE", help="data file: .npy (N, *event), .csv or .parquet"
    )
    group.add_argument(
        "--dataset",
        choices=_DATASETS,
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


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=None,
        help="cpu or cuda[:N] (default: cpu; under torchrun cuda:LOCAL_RANK when available)",
    )
    p.add_argument(
        "--dtype",
        choices=list(_DTYPES),
        default=None,
        help="float64 or float32 (train default: float32; nll default: the model's own dtype)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads on the CPU (default: the idle cores of this process's share of the "
        "machine, from the load average; 1 on a busy machine)",
    )
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress bar (default: when stderr is a terminal)",
    )


# ----------------------------------------------------------------------------------------------
def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = (
        "Example: cnftools train --dataset digits --split train --dequantize 17 --hidden 256,256,256 "
        "--steps 3000 --out digits.pt"
    )
    _add_data_arguments(p, "train")
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
        help="hidden layer widths (default 256,256,256)",
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
    _add_common(p)


def _threads(args: argparse.Namespace, device: torch.device) -> int:
    from cnftools.nll.distributed import choose_threads

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    return args.threads if args.threads is not None else choose_threads(device)


def _run_train(args: argparse.Namespace) -> int:
    from cnftools.nll.distributed import threads

    device = check_device(args.device or "cpu")
    check_writable(args.out)  # before any training: a run must not end in an unwritable path
    try:
        with threads(_threads(args, device)):
            return _train(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None


def _train(args: argparse.Namespace) -> int:
    from cnftools.data import dequantize
    from cnftools.models import MLPField
    from cnftools.paths import OTPath, VEPath, VPPath
    from cnftools.training import save_checkpoint, train_cfm

    # Flags that do not apply are refused, not ignored.
    if args.path == "ot" and args.sigma_max is not None:
        raise ValueError("--sigma-max applies to --path ve only (OT has sigma_min alone)")
    if args.path == "vp" and (args.sigma_min is not None or args.sigma_max is not None):
        raise ValueError(
            "--sigma-min/--sigma-max do not apply to --path vp (beta_min=0.1, beta_max=20)"
        )
    rows, levels = _load_rows(args)
    levels = args.dequantize if args.dequantize is not None else levels
    if args.centered and levels is None:
        raise ValueError("--centered applies only with a dequantization (--dequantize L or digits)")
    dtype = _DTYPES[args.dtype] if args.dtype else torch.float32
    device = torch.device(args.device or "cpu")
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
    hidden = tuple(int(w) for w in args.hidden.split(",") if w)
    event = tuple(rows.shape[1:])
    field = MLPField(
        event[0] if len(event) == 1 else event,
        hidden,
        activation=args.activation,
        time_embedding=args.time_embedding,
        device=device,
        dtype=dtype,
    )
    if levels is not None:
        x = rows.to(device)
        centered = args.centered

        def sampler(n: int, gen: torch.Generator) -> torch.Tensor:
            index = torch.randint(0, x.shape[0], (n,), generator=gen, device=gen.device)
            return dequantize(x[index.to(x.device)], levels, gen, centered=centered, dtype=dtype)

        data: object = sampler
    else:
        data = rows.to(device=device, dtype=dtype)
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
        progress=bool(args.progress if args.progress is not None else sys.stderr.isatty()),
    )
    extra = {
        "dequantization": None
        if levels is None
        else {"levels": int(levels), "centered": bool(args.centered)},
        "data": str(args.data) if args.data is not None else f"{args.dataset}:{args.split}",
        "steps": args.steps,
        "final_loss": float(result.history["loss"].tail(50).mean()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, field, path=path, extra=extra)
    print(
        f"trained {args.steps} steps in {result.seconds:.1f} s, loss (last 50) "
        f"{extra['final_loss']:.4g}; checkpoint written to {args.out}"
    )
    return 0


# ----------------------------------------------------------------------------------------------
def _add_nll_arguments(p: argparse.ArgumentParser) -> None:
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
    _add_data_arguments(p, "test")
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
    p.add_argument("--batch-size", type=int, default=256, help="rows per ODE solve (default 256)")
    p.add_argument(
        "--divergence",
        choices=("exact", "hutchinson"),
        default="exact",
        help="divergence (default exact)",
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
        default=1024,
        help="cap on probes per row for --target-stderr (default 1024)",
    )
    p.add_argument(
        "--method",
        default="dopri5",
        help="ODE solver: dopri5 (default), dopri8, bosh3, rk4, euler, ...",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="relative tolerance, adaptive solvers (default 1e-5)",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=1e-5,
        help="absolute tolerance, adaptive solvers (default 1e-5)",
    )
    p.add_argument(
        "--step-size",
        type=float,
        default=None,
        help="step of a fixed-grid solver (e.g. 0.02 with rk4)",
    )
    p.add_argument(
        "--solver-steps",
        type=int,
        default=None,
        metavar="N",
        help="number of steps of a fixed-grid solver (instead of --step-size)",
    )
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
    p.add_argument(
        "--json", action="store_true", help="print the summary as JSON (NaN written as null)"
    )
    p.add_argument(
        "--run-id",
        default=None,
        help="identity of the model for --resume instead of its content fingerprint (rarely "
        "needed: a checkpoint's weights are fingerprinted)",
    )
    _add_common(p)


def _run_nll(args: argparse.Namespace) -> int:
    from cnftools.nll import RowsFailedError

    device = check_device(args.device) if args.device else None
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
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _init_distributed() -> bool:
    """Under torchrun (WORLD_SIZE > 1 in the environment) start the process group: nccl on CUDA,
    gloo on CPU. Returns whether this call started it."""
    import os

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
    from cnftools.training import load_checkpoint

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
    from cnftools import Dequantization, dataset_nll

    ckpt = _load_model(args.model, device)
    field = ckpt.field
    if args.dtype:
        field = field.to(_DTYPES[args.dtype])
    rows, levels = _load_rows(args)
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
    frame = dataset_nll(
        field,
        rows,
        batch_size=args.batch_size,
        divergence=args.divergence,
        n_probes=args.probes,
        seed=args.seed,
        target_stderr=args.target_stderr,
        max_probes=args.max_probes,
        method=args.method,
        rtol=args.rtol,
        atol=args.atol,
        step_size=args.step_size,
        steps=args.solver_steps,
        dequantization=deq,
        device=device,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        keep_chunks=args.keep_chunks,
        progress=args.progress,
        run_id=args.run_id,
        num_threads=_threads(args, device or torch.device("cpu")),
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


def _baselines(args: argparse.Namespace, test: torch.Tensor, deq: object) -> dict[str, float]:
    from cnftools.nll import Dequantization, gaussian_baseline_nll, histogram_baseline_nll

    if not isinstance(deq, Dequantization):
        raise UsageError("--baselines needs integer data with a dequantization (--dequantize L)")
    if args.baseline_data is not None:
        from cnftools.nll import read_rows

        rows = read_rows(args.baseline_data, args.columns.split(",") if args.columns else None)
        train = rows.read_all()
    elif args.dataset is not None:
        train, _ = _builtin(args.dataset, "train", args.n, args.seed)
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
        k = getattr(deq, "samples", 1)
        print(f"mean bits/dim {summary['mean_bpd']:.4f} ± {summary['bpd_stderr']:.4f} (K = {k})")
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


register_command(
    "train",
    "train an MLP velocity field by conditional flow matching on a data file or built-in dataset "
    "and save a checkpoint (weights and plain config only)",
    _add_train_arguments,
    _run_train,
)
register_command(
    "nll",
    "compute every row's log-likelihood (nats; bits/dim for integer data) under a trained "
    "checkpoint; writes a resumable Parquet file; runs under torchrun",
    _add_nll_arguments,
    _run_nll,
)
