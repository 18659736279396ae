r"""``dataset_nll``: every row's log-likelihood under a CNF, resumable, on one or many processes.

For every row :math:`x_i`, :math:`\log p_1(x_i) = \log p_0(z_0) - \int_0^1 \operatorname{div}
v(z_t, t)\,dt` (docs/theory/change-of-variables.md) by one augmented ODE solve per batch. Work is
cut into *units*, a batch of rows and a probe round (:mod:`cnftools.nll.units`); the rows are read
batch by batch (:mod:`cnftools.nll.sources`, streams included), finished units go to the chunk
store (:mod:`cnftools.nll.store`), and under ``torchrun`` units are dealt to the ranks
(:mod:`cnftools.nll.distributed`). The resume and failure contracts are in docs/guarantees.md.

References:
    Chen et al., Neural ODEs (2018), arXiv:1806.07366; Grathwohl et al., FFJORD (2019),
    arXiv:1810.01367; Ho et al., Flow++ (2019), arXiv:1902.00275.
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from cnftools._checks import check_int
from cnftools._ode import SolverConfig, resolve_config
from cnftools._resources import check_threads, entry_threads
from cnftools.data import Dequantization
from cnftools.fields import accepts_keyword, check_extras
from cnftools.nll import distributed as dist
from cnftools.nll.fingerprint import Unfingerprintable, fingerprint, settings_key
from cnftools.nll.job import Job, RunInterrupted
from cnftools.nll.sources import read_rows, tensor_digest
from cnftools.nll.store import ChunkStore, RunLock
from cnftools.nll.units import Settings

__all__ = ["dataset_nll"]


def _prepare_field(v: object, device: torch.device, dtype: torch.dtype) -> Callable[..., Tensor]:
    if not callable(v):
        raise TypeError(f"v must be a callable velocity field v(x, t), got {type(v).__name__}")
    if isinstance(v, nn.Module):
        params = list(v.parameters())
        if params and (params[0].device != device or params[0].dtype != dtype):
            v = copy.deepcopy(v).to(device=device, dtype=dtype)  # leave the caller's module alone
        v.eval()
    return v  # type: ignore[return-value]


def _split_extras(
    extras: Mapping[str, Any] | None, n: int | None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``extras=`` as per-row tensors (first dimension ``n``) and constants (the rest)."""
    given = check_extras(extras)
    per_row = {
        k: val.detach()
        for k, val in given.items()
        if isinstance(val, Tensor) and val.dim() >= 1 and n is not None and val.shape[0] == n
    }
    if n is None and any(isinstance(val, Tensor) and val.dim() >= 1 for val in given.values()):
        raise ValueError(
            "extras: with a streamed dataset the number of rows is not known, so a tensor cannot "
            "be told per-row or constant; let the dataset yield (x, y) items for per-row values"
        )
    return per_row, {k: val for k, val in given.items() if k not in per_row}


def _extras_identity(row_extras: dict[str, Tensor], constant: dict[str, Any]) -> str:
    """Content of ``extras=`` for the run's identity (per-row tensors are hashed whole too)."""
    parts = {k: tensor_digest(val) for k, val in row_extras.items()}
    for key, val in constant.items():
        parts[key] = tensor_digest(val) if isinstance(val, Tensor) else repr(val)
    return settings_key(parts)


def _trial_call(
    v: Callable[..., Tensor],
    first: Tensor,
    s: Settings,
    event: tuple,
    row_extras: Mapping[str, Tensor],
) -> None:
    """Evaluate the field once on a finite first row, so a wrong dimension fails before any work."""
    first = first.to("cpu")
    finite = torch.isfinite(first.to(torch.float64)).reshape(first.shape[0], -1).all(dim=1)
    if not bool(finite.any()):
        return  # every row of the first batch is non-finite: each is reported in its status
    x = first[finite][:1]
    extras = {**s.extras, **{k: val[finite][:1].to(s.device) for k, val in row_extras.items()}}
    if s.dequantization is not None:
        levels = s.dequantization.levels
        x = (x.to(torch.float64).clamp(0, levels - 1) + 0.5) / levels
    x = x.to(device=s.device, dtype=s.dtype)
    t = torch.full((1,), 0.5, device=s.device, dtype=s.dtype)
    try:
        with torch.no_grad():
            out = v(x, t, **extras)
    except Exception as error:
        raise ValueError(
            f"the field v fails on a data row of shape {tuple(x.shape)} (event shape {event}, "
            f"dtype {s.dtype}): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the field v maps data rows of shape {tuple(x.shape)} to {shape}; it must return the "
            f"input's shape (is the data's dimension {event} the one the field was built for?)"
        )


def _infer_dtype(first: Tensor, v: object, deq: Dequantization | None) -> torch.dtype:
    if first.is_floating_point() and deq is None:
        return first.dtype
    if isinstance(v, nn.Module) and any(True for _ in v.parameters()):
        return next(v.parameters()).dtype
    if first.is_floating_point():
        return first.dtype
    return torch.get_default_dtype()


def _identity(v: object, prior: object, run_id: str | None, need: bool) -> dict[str, str]:
    """Fingerprints of the field and the prior, or the user's ``run_id``."""
    if run_id is not None:
        if not isinstance(run_id, str) or not run_id:
            raise TypeError(f"run_id must be a non-empty string, got {run_id!r}")
        return {"run_id": run_id}
    try:
        return {"field": fingerprint(v), "prior": fingerprint(prior)}
    except Unfingerprintable as error:
        if not need:
            return {"field": "unfingerprintable"}
        raise ValueError(
            f"resume=True cannot check that the field and prior are the ones of the run it "
            f"continues: {error}. Pass run_id='a name you change whenever the model changes' "
            "(--run-id), or wrap the function in an nn.Module, or run without resume"
        ) from error


def _passed_options(solver_options: Mapping[str, Any] | None, noise: str) -> dict[str, Any]:
    """The keywords passed on to ``log_likelihood`` besides the config: ``noise`` when not the
    default, and the deprecated ``solver_options``. (They are recorded in the run's identity
    under ``"solver_options"``, so a run started with ``solver_options={"noise": ...}`` resumes
    with ``noise=``.)"""
    passed: dict[str, Any] = {} if noise == "rademacher" else {"noise": noise}
    if solver_options is None:
        return passed
    if not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be a dict, got {type(solver_options).__name__}")
    warnings.warn(
        "dataset_nll(solver_options={...}) is deprecated and will be removed in the next "
        "release: pass the solver settings as config=SolverConfig(...) (e.g. "
        "config=SolverConfig(norm='max_sample')) and the probe distribution as noise=",
        DeprecationWarning,
        stacklevel=3,
    )
    given = dict(solver_options)
    if "noise" in given and "noise" in passed:
        raise ValueError("give noise= alone, not also in solver_options")
    return {**given, **passed}


def dataset_nll(
    v: Callable[..., Tensor],
    data: object,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
    prior: object = None,
    divergence: str = "exact",
    n_probes: int = 1,
    noise: str = "rademacher",
    seed: int = 0,
    target_stderr: float | None = None,
    max_probes: int = 1024,
    method: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    step_size: float | None = None,
    steps: int | None = None,
    config: SolverConfig | None = None,
    solver_options: Mapping[str, Any] | None = None,
    dequantization: Dequantization | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    keep_chunks: bool = False,
    progress: bool | None = None,
    run_id: str | None = None,
    num_threads: int | None = None,
    extras: Mapping[str, Any] | None = None,
) -> pd.DataFrame | None:
    r"""Per-row log-likelihood of a dataset under a CNF, as a DataFrame.

    For every row, :math:`\log p_1(x) = \log p_0(z_0) - \int_0^1 \operatorname{div} v(z_t,t)\,dt`
    by one augmented ODE solve per batch (:func:`cnftools.likelihood.log_likelihood`;
    docs/theory/change-of-variables.md). With Hutchinson's estimator :math:`\operatorname{div} v
    \approx \frac1K\sum_k \varepsilon_k^\top (\partial v/\partial x)\varepsilon_k` each row's value
    is unbiased, hence so is the dataset mean; ``target_stderr`` adds probe rounds, only to the rows
    whose probe noise is large, until the probe part of the mean NLL's standard error,
    :math:`\sqrt{\sum_i \mathrm{stderr}_i^2}/n`, is at most ``target_stderr`` or every row has
    ``max_probes`` probes.

    Args:
        v: the velocity field ``v(x, t)`` (e.g. an :class:`~cnftools.MLPField`, or a
            :class:`~cnftools.MixtureMarginal`). An ``nn.Module`` is copied to ``device``/``dtype``
            when it is not already there (the caller's module is left alone).
        data: ``(N, *event)`` rows: a tensor, a numpy array, a DataFrame (``columns`` choose the
            columns; default all, which must be numeric), a map-style ``Dataset`` (items ``x`` or
            ``(x, y)``), a ``DataLoader`` or ``IterableDataset`` (streamed batch by batch, never
            held whole; re-read from the start on resume), or a path to a ``.npy``, ``.csv`` or
            ``.parquet`` file (see :func:`cnftools.nll.read_rows`).
        columns: column names, for a DataFrame or a ``.csv``/``.parquet`` file.
        batch_size: rows per ODE solve. Results depend on it (an adaptive solver steps a batch
            together), so resume and multi-process runs keep it.
        prior: the base density :math:`p_0` (default :math:`\mathcal N(0, I)`), passed on to
            ``log_likelihood``.
        divergence: ``"exact"`` or ``"hutchinson"``.
        n_probes: Hutchinson probes per solve (:math:`K`); ``>= 2`` gives a per-row ``stderr``.
        noise: Hutchinson probe distribution, ``"rademacher"`` or ``"gaussian"``.
        seed: seeds every random draw; unit ``(batch, round)`` uses a generator seeded from
            ``(seed, batch, round)``.
        target_stderr: Hutchinson only: add probe rounds (of ``n_probes`` each) until the probe
            standard error of the mean NLL is at most this (nats); needs ``n_probes >= 2``.
        max_probes: hard cap on the probes per row that ``target_stderr`` may use (at least
            ``n_probes``); a target not met within it gives a warning and
            ``summary["target_met"] = False``.
        method: ODE solver (default ``"dopri5"``); see :class:`~cnftools.SolverConfig`.
        rtol: relative tolerance of an adaptive solver (default ``1e-5``).
        atol: absolute tolerance of an adaptive solver (default ``1e-5``).
        step_size: step of a fixed-grid solver.
        steps: number of steps of a fixed-grid solver (instead of ``step_size``).
        config: a :class:`~cnftools.SolverConfig`, the carrier of every solver setting (``norm``,
            ``max_steps``, ...). The five keywords above are thin sugar over it, merged by the
            rule of :class:`~cnftools.SolverConfig` (a keyword given overrides the config's field;
            a grid with an adaptive method is an error).
        solver_options: deprecated (works with a ``DeprecationWarning``; goes in the next
            release): further keyword arguments of ``log_likelihood``. Pass the solver settings
            in ``config=SolverConfig(...)`` and the probe distribution as ``noise=`` instead.
        dequantization: a :class:`~cnftools.Dequantization` for integer data; adds ``bpd``.
        device: where to compute (default: the data's device, else the field's, else CPU; under
            ``torch.distributed``, ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
        dtype: computation dtype (default: the data's floating dtype; for integer data the field's
            parameter dtype, else torch's default).
        out: a ``.parquet`` file for the result; chunks go to ``out + ".chunks/"`` as they finish
            and ``out + ".lock"`` keeps a second process away.
        resume: continue a run killed or stopped earlier; its field, prior, data and settings are
            checked by content (docs/guarantees.md). When there is none, start one.
        overwrite: discard an existing ``out`` and its chunk directory instead of failing.
        keep_chunks: keep the chunk directory after the final file is written.
        progress: a tqdm bar (rows, rows/s) on rank 0; default: on when stderr is a terminal.
        run_id: the identity of the field and prior for ``resume``, instead of their content
            fingerprint: needed when ``v`` is (or holds) a plain function or lambda, whose code
            cannot be compared. Change it whenever the model changes.
        num_threads: torch threads for the run, from 1 to the cores this process may use,
            restored afterwards. Default: cnftools' thread policy (an enclosing
            ``cnftools.threads(n)`` block, else ``CNFTOOLS_THREADS``, else on the CPU the idle
            cores of this process's share of the machine; docs/guide/likelihood.md#threads).
        extras: keyword arguments of a conditional field, ``v(x, t, **extras)``. A tensor whose
            first dimension is the number of rows ``N`` is per row: sliced with every batch (and
            shard), part of each batch's content hash. Anything else is passed as is and is part
            of the run's identity. A dataset that yields ``(x, y)`` items gives ``extras["y"]``
            per row itself when the field takes a ``y`` argument (an unconditional field on a
            labelled dataset ignores the labels); with a stream (``IterableDataset``), per-row
            values must come that way.

    Returns:
        On rank 0 (or without ``torch.distributed``): a DataFrame, one row per data row in input
        order, with columns ``index`` (position in ``data``), ``log_prob`` (nats), ``nll``
        (:math:`-\log p`), ``bpd`` (with ``dequantization``), ``nfe`` (function evaluations of the
        row's batch, summed over dequantization samples and probe rounds), ``stderr`` and
        ``rounds`` (Hutchinson), and ``status`` (``"ok"`` or the error text; failed rows have NaN
        values). ``frame.attrs["summary"]`` is :func:`~cnftools.summarize`'s dict;
        ``frame.attrs["run"]`` the settings and timing. Other ranks return ``None``.

    Raises:
        ValueError, TypeError: bad arguments or data, before any solve. Failing rows do not raise:
            a batch that fails is retried row by row, each failed row gets its error in
            ``status``, and a warning gives the count and the first error.
        cnftools.nll.RowsFailedError: every row failed (a ``RuntimeError``; the first error is
            chained).
        FileExistsError: ``out`` or its chunks exist and neither ``resume`` nor ``overwrite``, or
            another process holds ``out``'s lock.
        cnftools.nll.ResumeError: the files at ``out`` cannot be continued safely.

    Example:
        >>> import torch, cnftools
        >>> field = cnftools.MixtureMarginal(
        ...     cnftools.OTPath(0.1), torch.zeros(1, 2, dtype=torch.float64)
        ... )
        >>> x = torch.randn(6, 2, dtype=torch.float64)
        >>> frame = cnftools.dataset_nll(
        ...     field, x, batch_size=4, method="rk4", step_size=0.05, progress=False
        ... )
        >>> list(frame.columns)
        ['index', 'log_prob', 'nll', 'nfe', 'status']

    References:
        Chen et al. (2018), arXiv:1806.07366; Grathwohl et al. (2019), arXiv:1810.01367;
        Ho et al. (2019), arXiv:1902.00275.
    """
    start_time = time.perf_counter()
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_int("seed", seed, low=0)
    n_probes = check_int("n_probes", n_probes, low=1)
    max_probes = check_int("max_probes", max_probes, low=1)
    if num_threads is not None:
        num_threads = check_threads("num_threads", num_threads)
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    hutchinson = divergence == "hutchinson"
    if noise not in ("rademacher", "gaussian"):
        raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
    if noise != "rademacher" and not hutchinson:
        raise ValueError("noise applies to divergence='hutchinson' only")
    passed = _passed_options(solver_options, noise)
    if target_stderr is not None:
        if not hutchinson:
            raise ValueError(
                "target_stderr applies to divergence='hutchinson' only (exact has no probe error)"
            )
        if isinstance(target_stderr, bool) or not (
            isinstance(target_stderr, int | float) and 0 < target_stderr < math.inf
        ):
            raise ValueError(f"target_stderr must be a finite number > 0, got {target_stderr!r}")
        if n_probes < 2:
            raise ValueError(
                "target_stderr needs n_probes >= 2 (a per-row standard error needs two probes)"
            )
        if max_probes < n_probes:
            raise ValueError(f"max_probes ({max_probes}) must be >= n_probes ({n_probes})")
    if dequantization is not None and not isinstance(dequantization, Dequantization):
        raise TypeError(
            f"dequantization must be a Dequantization(levels=..., samples=...), got {dequantization!r}"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    solver = resolve_config(
        config, method=method, rtol=rtol, atol=atol, step_size=step_size, steps=steps
    )
    rank, world = dist.rank_and_world()
    rows = read_rows(data, columns)
    row_extras, constant_extras = _split_extras(extras, rows.n)
    rows.attach_extras(row_extras)
    first_batch = rows.first(batch_size)
    if first_batch.extras and not all(accepts_keyword(v, k) for k in first_batch.extras):
        # (x, label) items for a field that takes no label (an unconditional model on a
        # labelled dataset): the labels do not enter log p(x), so they are not passed
        rows.item_extras = False
        first_batch = rows.first(batch_size)
    first = first_batch.x
    dtype = dtype or _infer_dtype(first, v, dequantization)
    device = torch.device(device) if device is not None else dist.default_device(first, v, world)
    identity = _identity(v, prior, run_id, need=out is not None and resume)
    identity["extras"] = _extras_identity(row_extras, constant_extras)
    with entry_threads(device, num_threads):
        field = _prepare_field(v, device, dtype)
        settings = Settings(
            batch_size, divergence, n_probes, seed, solver, dequantization,
            passed, prior, device, dtype, constant_extras,
        )  # fmt: skip
        _trial_call(field, first, settings, rows.event, first_batch.extras)
        del first, first_batch
        run = {
            "rows": rows.n, "event": list(rows.event), **identity, "batch_size": batch_size,
            "divergence": divergence, "n_probes": n_probes if hutchinson else None, "seed": seed,
            "target_stderr": target_stderr,
            "max_probes": max_probes if target_stderr is not None else None,
            "solver": {k: val for k, val in asdict(solver).items() if k != "adjoint"},
            "dequantization": None if dequantization is None else asdict(dequantization),
            "dtype": str(dtype).replace("torch.", ""),
            "solver_options": {str(k): repr(val) for k, val in sorted(passed.items())},
        }  # fmt: skip
        job = Job(field, rows, settings, run, rank, world, progress)
        if out is None:
            try:
                return job.run(None, start_time, keep_chunks)
            except KeyboardInterrupt:
                raise RunInterrupted(0, rows.n, None) from None
        lock = RunLock(Path(out))
        store = ChunkStore(Path(out), run, settings_key(run))
        try:
            if rank == 0:
                error = None
                try:
                    lock.acquire()
                    job.final_meta = store.open(resume, overwrite)
                except Exception as exc:  # every rank must learn of it, or they wait forever
                    error = exc
                error = dist.broadcast(error, world)
            else:
                error = dist.broadcast(None, world)
            if error is not None:
                raise error
            return job.run(store, start_time, keep_chunks)
        except BaseException as stop:
            if rank == 0 and store.created:
                store.discard_if_empty()
            if isinstance(stop, KeyboardInterrupt) and not isinstance(stop, RunInterrupted):
                lock.release()  # first: the message below tells the user to run again
                raise RunInterrupted(job.kept_rows(store), rows.n, Path(out)) from None
            raise
        finally:
            lock.release()
