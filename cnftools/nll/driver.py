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

import contextlib
import copy
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from cnftools._checks import SUPPORTED_DTYPES, check_device, check_int
from cnftools._ode import SolverConfig, check_reach, resolve_config
from cnftools._resources import check_threads, entry_threads
from cnftools.data import Dequantization
from cnftools.fields import (
    check_extras,
    closed_form_divergence,
    field_name,
    required_keywords,
    takes_labels,
)
from cnftools.likelihood import check_prior, log_likelihood
from cnftools.nll import distributed as dist
from cnftools.nll.fingerprint import Unfingerprintable, fingerprint, settings_key
from cnftools.nll.job import Job, RunInterrupted
from cnftools.nll.sources import Batch, PerRow, RowSource, Shared, read_rows, tensor_digest
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


@contextlib.contextmanager
def _modes_restored(v: object) -> Iterator[None]:
    """Restore the train/eval mode of every submodule of a caller's ``nn.Module`` on exit: a run
    evaluates the field in eval mode, and must not leave the caller's module switched."""
    modes = [(m, m.training) for m in v.modules()] if isinstance(v, nn.Module) else []
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


class _SharedBound:
    """The field with the ``Shared`` extras bound as keywords, ``v(x, t, **shared, **per_row)``.

    ``log_likelihood`` then never sees them, so no rule of its own (a tensor whose first
    dimension is the batch is sliced when rows are solved again) can split them. A closed-form
    divergence of the field is kept, with the same values bound.
    """

    def __init__(self, v: Callable[..., Tensor], shared: Mapping[str, Any]) -> None:
        self.field, self.shared = v, dict(shared)
        self.__qualname__ = field_name(v)  # error messages name the user's field
        closed = closed_form_divergence(v)
        if closed is not None:
            self.divergence = lambda x, t, **extras: closed(x, t, **self.shared, **extras)

    def __call__(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
        return self.field(x, t, **self.shared, **extras)


def _bare_extra_error(key: str, value: object, n: int | None) -> ValueError:
    """The error for a tensor or array in ``extras=`` that does not say how it is used."""
    shape = tuple(value.shape)  # type: ignore[attr-defined]
    wrap = (
        f"wrap it as cnftools.nll.PerRow(...) to give data row i the value {key}[i] (sliced with "
        f"every batch), or as cnftools.nll.Shared(...) to pass it whole to every call of the field"
    )
    if n is None:
        return ValueError(
            f"extras[{key!r}] is an array of shape {shape}: say how it is used. With a stream the "
            f"number of rows is not known, so per-row values must come from the dataset's (x, y) "
            f"items; to pass it whole to every call, wrap it as cnftools.nll.Shared(...)"
        )
    if shape[0] == n:
        return ValueError(
            f"extras[{key!r}] has {n} rows, as many as the data, so it could be per row or "
            f"shared: {wrap}"
        )
    return ValueError(
        f"extras[{key!r}] has {shape[0]} rows for {n} data rows: a per-row extra needs one "
        f"entry per data row (cnftools.nll.PerRow(...) with {n} rows); if it is not per row, "
        f"wrap it as cnftools.nll.Shared(...) to pass it whole to every call"
    )


def _split_extras(
    extras: Mapping[str, Any] | None, n: int | None
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``extras=`` as per-row tensors (:class:`PerRow`) and values passed whole (the rest).

    A tensor or array with a dimension must say which it is (:class:`PerRow` or
    :class:`Shared`): its first dimension equalling the number of rows would otherwise decide,
    and a shared table of ``N`` rows would be split silently.
    """
    given = check_extras(extras)
    per_row: dict[str, Tensor] = {}
    shared: dict[str, Any] = {}
    for key, value in given.items():
        if isinstance(value, PerRow):
            per_row[key] = value.values
        elif isinstance(value, Shared):
            shared[key] = value.value
        elif isinstance(value, Tensor | np.ndarray) and value.ndim >= 1:
            raise _bare_extra_error(key, value, n)
        else:
            shared[key] = value
    if per_row and n is None:
        raise ValueError(
            f"extras {sorted(per_row)}: PerRow values need the number of rows, which a stream "
            "does not know in advance; let the dataset yield (x, y) items for per-row values"
        )
    return per_row, shared


def _extras_identity(
    row_extras: dict[str, Tensor], constant: dict[str, Any], need: bool
) -> dict[str, str]:
    """Content of ``extras=`` for the run's identity: per-row tensors hashed whole, constants by
    :func:`~cnftools.nll.fingerprint.fingerprint` (arrays of any size by every byte)."""
    parts = {k: "per-row " + tensor_digest(val) for k, val in row_extras.items()}
    for key, val in constant.items():
        try:
            parts[key] = fingerprint(val, name=f"extras[{key!r}]")
        except Unfingerprintable as error:
            if need:
                raise ValueError(
                    f"resume=True cannot check that extras[{key!r}] is the one of the run it "
                    f"continues: {error}. Pass "
                    "run_id='a name you change whenever the model or extras change' (--run-id), "
                    "or run without resume"
                ) from error
            parts[key] = "unfingerprintable"
    return {"extras": settings_key(parts)}


def _check_labels(
    v: object, rows: RowSource, first: Batch, row_extras: Mapping[str, Tensor], shared: Mapping
) -> Batch:
    """Pass a dataset's ``(x, y)`` labels to a field that takes them, drop them for one that does
    not (:func:`cnftools.fields.takes_labels`), and refuse a conditional field without labels."""
    item_keys = sorted(set(first.extras) - set(row_extras))
    if item_keys and not all(takes_labels(v, k) for k in item_keys):
        # (x, label) items for a field that takes no label (an unconditional model on a
        # labelled dataset): the labels do not enter log p(x), so they are not passed
        rows.item_extras = False
        first = rows.first(first.size)
    given = set(first.extras) | set(shared)
    if getattr(v, "conditional", None) is True and not given:
        raise ValueError(
            f"v ({field_name(v)}) is a conditional field (v.conditional is True) but the data "
            "carries no labels: give a dataset of (x, y) items, or extras={'y': "
            "cnftools.nll.PerRow(labels)}"
        )
    missing = [k for k in required_keywords(v) if k not in given]
    if missing and item_keys:  # the items carry labels, under another name
        raise ValueError(
            f"v ({field_name(v)}) requires the keyword argument(s) {missing}; the data's items "
            f"carry {item_keys}, passed under that name: name the field's label argument "
            f"{item_keys[0]!r} (e.g. lambda x, t, {item_keys[0]}: v(x, t, {missing[0]}="
            f"{item_keys[0]})), or pass extras={{{missing[0]!r}: cnftools.nll.PerRow(labels)}}"
        )
    if missing:
        raise ValueError(
            f"v ({field_name(v)}) requires the keyword argument(s) {missing}, which neither the "
            f"data nor extras= gives: pass extras={{{missing[0]!r}: cnftools.nll.PerRow(...)}} "
            "for one value per row, a Shared(...) or plain value for one value for all rows, or "
            "a dataset of (x, y) items"
        )
    return first


def _trial_call(
    v: Callable[..., Tensor],
    first: Tensor,
    s: Settings,
    event: tuple,
    row_extras: Mapping[str, Tensor],
) -> None:
    """Evaluate the field once on a finite first row, so that a wrong dimension, dtype or
    argument fails before any work (and, with dequantization, check that the rows are integers)."""
    first = first.to("cpu")
    finite = torch.isfinite(first.to(torch.float64)).reshape(first.shape[0], -1).all(dim=1)
    if not bool(finite.any()):
        return  # every row of the first batch is non-finite: each is reported in its status
    if s.dequantization is not None:
        values = first[finite].to(torch.float64)
        fractional = (values != torch.round(values)).reshape(values.shape[0], -1).any(dim=1)
        if bool(fractional.any()):
            row = int(torch.nonzero(finite).flatten()[int(fractional.nonzero()[0])])
            flat = first[row].reshape(-1).to(torch.float64)
            value = float(flat[flat != torch.round(flat)][0])
            raise ValueError(
                f"dequantization={s.dequantization!r} needs integer data in "
                f"0..{s.dequantization.levels - 1}, but data row {row} holds {value!r}: the "
                "data look continuous (or already dequantized); drop dequantization= for "
                "continuous data, or pass the integer values"
            )
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
        if isinstance(out, Tensor) and out.dim() == x.dim() and out.shape[1:] == x.shape[1:]:
            raise ValueError(  # the event is right, the row count is not
                f"the field v maps data rows of shape {tuple(x.shape)} to {shape}: {out.shape[0]} "
                f"rows for {x.shape[0]}; does it read a tensor of {out.shape[0]} rows that is "
                "not sliced with the batch (a closure over per-row values, or a Shared extra)? "
                "dataset_nll calls the field on batches of rows: pass per-row values as "
                "extras={'name': cnftools.nll.PerRow(values)} and take them as a keyword argument"
            )
        raise ValueError(
            f"the field v maps data rows of shape {tuple(x.shape)} to {shape}; it must return the "
            f"input's shape (is the data's dimension {event} the one the field was built for?)"
        )
    if out.dtype != x.dtype:
        raise TypeError(
            f"the field v returns {out.dtype} for data rows of {x.dtype}; it must return the "
            f"input's dtype: convert the model (e.g. v.to({x.dtype})) or pass dtype= to compute "
            "in the model's dtype"
        )
    if out.device != x.device:
        raise ValueError(f"the field v returns a tensor on {out.device} for rows on {x.device}")


def _infer_dtype(first: Tensor, v: object, deq: Dequantization | None) -> torch.dtype:
    if first.is_floating_point() and deq is None:
        return first.dtype
    if isinstance(v, nn.Module) and any(True for _ in v.parameters()):
        return next(v.parameters()).dtype
    if first.is_floating_point():
        return first.dtype
    return torch.get_default_dtype()


def _code_versions() -> dict[str, str]:
    """Versions of the library code the run executes (identified by name in fingerprints)."""
    import platform

    import numpy

    from cnftools._version import VERSION

    return {
        "cnftools": VERSION,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def _identity(v: object, prior: object, run_id: str | None, need: bool) -> dict[str, Any]:
    """Fingerprints of the field and the prior, or the user's ``run_id``; the code versions."""
    if run_id is not None:
        if not isinstance(run_id, str) or not run_id:
            raise TypeError(f"run_id must be a non-empty string, got {run_id!r}")
        return {"run_id": run_id, "code": _code_versions()}
    try:
        identity = {"field": fingerprint(v), "prior": fingerprint(prior, name="prior")}
    except Unfingerprintable as error:
        if not need:
            return {"field": "unfingerprintable", "code": _code_versions()}
        raise ValueError(
            f"resume=True cannot check that the field and prior are the ones of the run it "
            f"continues, because a part of them cannot be read: {error}. Pass run_id='a name "
            "you change whenever the model changes' (--run-id), or run without resume"
        ) from error
    return {**identity, "code": _code_versions()}


def _option_identity(value: object) -> str:
    """A ``solver_options`` value in the run's identity: plain values by ``repr``, others by
    content (a ``repr`` can truncate or hide state)."""
    if value is None or type(value) in (bool, int, float, str):
        return repr(value)
    try:
        return f"fingerprint:{fingerprint(value)}"
    except Unfingerprintable as error:
        raise ValueError(f"solver_options: {error}") from error


def _check_out(
    out: str | os.PathLike[str] | None, resume: bool, overwrite: bool, keep_chunks: bool
) -> Path | None:
    """``out=`` and the flags that need it, before any work."""
    if out is None:
        for flag, given in (
            ("resume", resume), ("overwrite", overwrite), ("keep_chunks", keep_chunks)
        ):  # fmt: skip
            if given:
                raise ValueError(
                    f"{flag}=True needs out= (the .parquet file of the run): without out nothing "
                    "is stored, so there is nothing to resume, overwrite or keep"
                )
        return None
    if not isinstance(out, str | os.PathLike):
        raise TypeError(f"out must be a path to a .parquet file, got {type(out).__name__}")
    if resume and overwrite:
        raise ValueError(
            "resume=True (--resume) and overwrite=True (--overwrite) contradict each other: "
            "resume continues the run at out, overwrite discards it; give one"
        )
    path = Path(out)
    if path.is_dir():
        raise ValueError(
            f"out {os.fspath(path)!r} is a directory; give a .parquet file name (e.g. "
            f"{os.fspath(path / 'nll.parquet')!r})"
        )
    chunks = path.with_name(path.name + ".chunks")
    if chunks.exists() and not chunks.is_dir():
        raise ValueError(
            f"{os.fspath(chunks)!r}, where the chunks of out go, is a file, not a directory "
            "cnftools made; move it away or choose another out"
        )
    lock = path.with_name(path.name + ".lock")
    if lock.is_dir():
        raise ValueError(
            f"{os.fspath(lock)!r}, the lock file of out, is a directory; move it away or choose "
            "another out"
        )
    return path


_SET_BY_DATASET_NLL = {
    "v", "x", "prior", "config", "return_result", "extras", "divergence", "n_probes", "generator",
}  # fmt: skip
"""``log_likelihood`` arguments that ``dataset_nll`` sets itself (not allowed in solver_options)."""


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
        "config=SolverConfig(rtol=1e-7, atol=1e-7)) and the probe distribution as noise=",
        DeprecationWarning,
        stacklevel=3,
    )
    given = dict(solver_options)
    if "noise" in given and "noise" in passed:
        raise ValueError("give noise= alone, not also in solver_options")
    known = set(inspect.signature(log_likelihood).parameters) - _SET_BY_DATASET_NLL
    unknown = sorted(str(k) for k in given if k not in known)
    if unknown:
        raise ValueError(
            f"solver_options has unknown or reserved key(s) {unknown}: log_likelihood options "
            f"that dataset_nll passes on are {sorted(known)}; solver settings go in "
            "config=SolverConfig(...), probes in divergence=/n_probes=/noise="
        )
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
    bpd_dims: int | None = None,
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
        batch_size: rows per ODE solve. With ``divergence="exact"`` a row's value does not
            depend on it (every row is solved on its own steps; equal to ~1e-12 relative in
            float64, docs/guarantees.md), except for a field of one time per batch
            (``as_velocity(..., time="scalar")``); Hutchinson probes are drawn per batch, so
            those values do. Resume and multi-process runs keep it.
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
            checked by content (docs/guarantees.md). When there is none, start one. Needs
            ``out``; contradicts ``overwrite``.
        overwrite: discard an existing ``out`` and its chunk directory instead of failing. Needs
            ``out``.
        keep_chunks: keep the chunk directory after the final file is written. Needs ``out``.
        progress: a tqdm bar (rows, rows/s) on rank 0; default: on when stderr is a terminal.
        run_id: the identity of the field and prior for ``resume``, instead of their content
            fingerprint (:func:`cnftools.nll.fingerprint`): needed when a part of ``v`` cannot
            be read (a generator, a file handle; the error names it). Change it whenever the
            model changes.
        num_threads: torch threads for the run, from 1 to the cores this process may use,
            restored afterwards. Default: cnftools' thread policy (an enclosing
            ``cnftools.threads(n)`` block, else ``CNFTOOLS_THREADS``, else on the CPU the idle
            cores of this process's share of the machine; docs/guide/likelihood.md#threads).
        extras: keyword arguments of a conditional field, ``v(x, t, **extras)``. A tensor or
            array must say how it is used: :class:`~cnftools.nll.PerRow` ``(y)`` gives data row
            ``i`` the value ``y[i]`` (``N`` rows, checked; sliced with every batch and shard,
            part of each batch's content hash), :class:`~cnftools.nll.Shared` ``(table)`` passes
            it whole to every call (never sliced). A bare tensor or array with a dimension is
            refused, naming the extra (its first dimension equalling ``N`` must not decide).
            Numbers, strings, 0-dim tensors and other objects are passed as they are. Shared
            values are part of the run's identity (tensors and arrays hashed whole). A stream
            (``DataLoader``, ``IterableDataset``) takes ``Shared`` values only; its per-row
            values come as ``(x, y)`` items.
        bpd_dims: bits/dim for continuous data: adds a ``bpd`` column :math:`= \mathrm{nll} /
            (D \ln 2)` with :math:`D` = ``bpd_dims``, the number of dimensions the NLL is
            shared over in your convention (e.g. ``C * H * W`` for images), and ``mean_bpd``
            to the summary. Not with ``dequantization``, which adds ``bpd`` over the data's
            own dimensions.

    Labels of a dataset: a dataset (or loader) of ``(x, y)`` items gives ``y`` per row, passed
    as ``v(x, t, y=...)`` when the field takes labels and dropped when it does not
    (:func:`cnftools.fields.takes_labels`: a field's boolean ``conditional`` attribute decides,
    as :class:`~cnftools.MLPField` and :class:`~cnftools.ConvField` have; otherwise a ``y``
    parameter or ``**kwargs`` in its signature). A conditional field (``conditional`` is
    ``True``, or a required parameter besides ``x`` and ``t``) on data without labels is an
    error before any solve.

    Returns:
        On rank 0 (or without ``torch.distributed``): a DataFrame, one row per data row in input
        order, with columns ``index`` (position in ``data``), ``log_prob`` (nats), ``nll``
        (:math:`-\log p`), ``bpd`` (with ``dequantization`` or ``bpd_dims``), ``nfe`` (function
        evaluations of the row's batch, summed over dequantization samples and probe rounds),
        ``stderr`` and
        ``rounds`` (Hutchinson), and ``status`` (``"ok"`` or the error text; failed rows have NaN
        values). ``frame.attrs["summary"]`` is :func:`~cnftools.summarize`'s dict;
        ``frame.attrs["run"]`` the settings and timing. Other ranks return ``None``.

    Raises:
        ValueError, TypeError: bad arguments or data, before any solve: among them a prior that
            is not a ``Distribution`` over the data's event shape in the computation's dtype, a
            field whose output has another shape or dtype than its input (one trial call), half
            precision, fractional data with ``dequantization``, an unusable ``device``, an extra
            of the wrong length or not marked ``PerRow``/``Shared``, unknown ``solver_options``
            keys, a conditional field without labels. Failing rows do not raise:
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
    if bpd_dims is not None:
        bpd_dims = check_int("bpd_dims", bpd_dims, low=1)
        if dequantization is not None:
            raise ValueError(
                "bpd_dims is for continuous data; with dequantization= the bpd column is already "
                "computed over the data's own dimensions: drop bpd_dims"
            )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    solver = resolve_config(
        config, method=method, rtol=rtol, atol=atol, step_size=step_size, steps=steps
    )
    if device is not None:
        device = check_device("device", device)
    if not callable(v):
        raise TypeError(f"v must be a callable velocity field v(x, t), got {type(v).__name__}")
    out_path = _check_out(out, resume, overwrite, keep_chunks)
    rank, world = dist.rank_and_world()
    rows = read_rows(data, columns)
    row_extras, constant_extras = _split_extras(extras, rows.n)
    rows.attach_extras(row_extras)
    first_batch = _check_labels(v, rows, rows.first(batch_size), row_extras, constant_extras)
    first = first_batch.x
    source = "dtype=" if dtype is not None else "inferred from the data and the field"
    dtype = dtype or _infer_dtype(first, v, dequantization)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"dataset_nll would compute in {dtype} ({source}); cnftools computes in float32 or "
            "float64 only (half precision overflows the log-densities and the solver's "
            "tolerances): pass dtype=torch.float32 or torch.float64 (rows are converted batch by "
            "batch)"
        )
    device = device if device is not None else dist.default_device(first, v, world)
    # what log_likelihood would refuse for every row (accuracy= with Hutchinson or below the
    # dtype's reach, tolerances below its rounding): refused once, before any work
    solver_keywords = ("method", "rtol", "atol", "step_size", "steps", "adjoint", "accuracy")
    effective = resolve_config(solver, **{k: passed[k] for k in solver_keywords if k in passed})
    check_reach(effective, dtype, divergence)
    need = out_path is not None and resume and run_id is None
    identity = _identity(v, prior, run_id, need=need)
    identity.update(_extras_identity(row_extras, constant_extras, need))
    with entry_threads(device, num_threads), _modes_restored(v):
        field = _prepare_field(v, device, dtype)
        if constant_extras:
            field = _SharedBound(field, constant_extras)
        settings = Settings(
            batch_size, divergence, n_probes, seed, solver, dequantization,
            passed, prior, device, dtype,
        )  # fmt: skip
        check_prior(prior, rows.event, settings.dtype, settings.device)
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
            "solver_options": {str(k): _option_identity(val) for k, val in sorted(passed.items())},
        }  # fmt: skip
        job = Job(field, rows, settings, run, rank, world, progress)
        job.bpd_dims = bpd_dims
        if out_path is None:
            try:
                return job.run(None, start_time, keep_chunks)
            except KeyboardInterrupt:
                raise RunInterrupted(0, rows.n, None) from None
        lock = RunLock(out_path)
        store = ChunkStore(out_path, run, settings_key(run))
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
