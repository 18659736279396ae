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
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Unpack

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from cnftools._checks import SUPPORTED_DTYPES
from cnftools._ode import SolverConfig, SolverKeywords, check_reach, resolve_config
from cnftools._resources import entry_threads
from cnftools.data import Dequantization
from cnftools.estimators import ClosedForm, Estimator, Exact, Hutchinson, check_estimator
from cnftools.fields import (
    OutputDeviceError,
    OutputDtypeError,
    OutputShapeError,
    call_checked,
    check_callable,
    check_extras,
    closed_form_divergence,
    field_name,
    required_keywords,
    takes_labels,
)
from cnftools.likelihood import check_prior
from cnftools.nll import distributed as dist
from cnftools.nll.fingerprint import Unfingerprintable, fingerprint, settings_key
from cnftools.nll.job import Job, RunInterrupted
from cnftools.nll.options import DataOptions, Execution, Output
from cnftools.nll.sources import Batch, PerRow, RowSource, Shared, read_rows, tensor_digest
from cnftools.nll.store import ChunkStore, RunLock
from cnftools.nll.units import Settings

__all__ = ["dataset_nll"]


def _prepare_field(v: object, device: torch.device, dtype: torch.dtype) -> Callable[..., Tensor]:
    check_callable(v)
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
            call_checked(v, x, t, extras)
    except (ValueError, TypeError, RuntimeError) as error:
        raise _trial_error(error, x, event) from error


def _trial_error(error: Exception, x: Tensor, event: tuple) -> Exception:
    """The trial call's error, in the words of a dataset run (what to pass to dataset_nll)."""
    if isinstance(error, OutputShapeError) and error.shape[:1] != x.shape[:1]:
        rows = error.shape[0] if error.shape else 0
        return ValueError(  # the event is right, the row count is not
            f"{error}: {rows} rows for {x.shape[0]}; does it read a tensor of {rows} rows that "
            "is not sliced with the batch (a closure over per-row values, or a Shared extra)? "
            "dataset_nll calls the field on batches of rows: pass per-row values as "
            "DataOptions(extras={'name': cnftools.nll.PerRow(values)}) and take them as a "
            "keyword argument"
        )
    if isinstance(error, OutputShapeError):
        return ValueError(
            f"{error} (is the data's dimension {event} the one the field was built for?)"
        )
    if isinstance(error, OutputDtypeError):
        return TypeError(f"{error}; or pass Execution(dtype=...) to compute in the model's dtype")
    if isinstance(error, OutputDeviceError):
        return error
    return ValueError(
        f"the field v fails on a data row of shape {tuple(x.shape)} (event shape {event}): "
        f"{type(error).__name__}: {error}"
    )


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


def _run_estimator(estimator: object) -> Estimator | None:
    """The divergence spec of a run: the probes are drawn per unit from ``Execution.seed``, so a
    Hutchinson spec gives ``n_probes`` and ``noise`` only."""
    spec = check_estimator(estimator)
    if isinstance(spec, Hutchinson) and (spec.generator is not None or spec.probes is not None):
        raise ValueError(
            "dataset_nll draws each unit's Hutchinson probes from its own generator, seeded from "
            "Execution(seed=...) and the unit, so a run resumes and shards bit for bit: give "
            "Hutchinson(n_probes=..., noise=...) without generator= or probes="
        )
    return spec


def _estimator_identity(spec: Estimator | None) -> dict[str, Any]:
    """The divergence part of the run's identity (what decides the numbers)."""
    if isinstance(spec, Hutchinson):
        return {"divergence": "hutchinson", "n_probes": spec.n_probes, "noise": spec.noise}
    if isinstance(spec, Exact):
        return {"divergence": "exact", "n_probes": None, "strategy": spec.strategy}
    # None: the field's closed form if it has one (part of the field's fingerprint), else exact
    name = "closed_form" if isinstance(spec, ClosedForm) else "exact"
    return {"divergence": name, "n_probes": None}


def _check_run_options(spec: Estimator | None, execution: Execution) -> None:
    """The probe-round options need Hutchinson with two probes or more."""
    if execution.target_stderr is None:
        return
    if not isinstance(spec, Hutchinson):
        raise ValueError(
            "Execution(target_stderr=...) applies to estimator=Hutchinson(...) only (an exact "
            "divergence has no probe error)"
        )
    if spec.n_probes < 2:
        raise ValueError(
            "Execution(target_stderr=...) needs Hutchinson(n_probes >= 2) (a per-row standard "
            "error needs two probes)"
        )
    if execution.max_probes < spec.n_probes:
        raise ValueError(
            f"Execution(max_probes={execution.max_probes}) must be >= Hutchinson(n_probes="
            f"{spec.n_probes})"
        )


def _option(value: object, kind: type, name: str) -> Any:
    """An option group or ``None``; anything else is refused by name."""
    if value is not None and not isinstance(value, kind):
        raise TypeError(
            f"{name} must be a cnftools.nll.{kind.__name__}(...) or None, got "
            f"{type(value).__name__}"
        )
    return value


@dataclass
class _Prepared:
    """What the checks before any solve found out: the rows, extras, dtype and device."""

    rows: RowSource
    row_extras: dict[str, Tensor]
    constant_extras: dict[str, Any]
    first_batch: Batch
    dtype: torch.dtype
    device: torch.device


def _prepare(
    v: Callable[..., Tensor], data: object, options: DataOptions, execution: Execution
) -> _Prepared:
    """Read the rows' shape, split the extras, check the labels; infer dtype and device."""
    rows = read_rows(data, options.columns)
    row_extras, constant_extras = _split_extras(options.extras, rows.n)
    rows.attach_extras(row_extras)
    first_batch = _check_labels(
        v, rows, rows.first(execution.batch_size), row_extras, constant_extras
    )
    first = first_batch.x
    dtype = execution.dtype
    source = "Execution(dtype=...)" if dtype is not None else "inferred from the data and field"
    dtype = dtype or _infer_dtype(first, v, options.dequantization)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"dataset_nll would compute in {dtype} ({source}); cnftools computes in float32 or "
            "float64 only (half precision overflows the log-densities and the solver's "
            "tolerances): pass Execution(dtype=torch.float32 or torch.float64) (rows are "
            "converted batch by batch)"
        )
    device = execution.device
    if device is None:
        device = dist.default_device(first, v, dist.rank_and_world()[1])
    return _Prepared(rows, row_extras, constant_extras, first_batch, dtype, device)


def dataset_nll(
    v: Callable[..., Tensor],
    data: object,
    prior: object = None,
    *,
    estimator: Estimator | None = None,
    config: SolverConfig | None = None,
    data_options: DataOptions | None = None,
    output: Output | None = None,
    execution: Execution | None = None,
    **solver: Unpack[SolverKeywords],
) -> pd.DataFrame | None:
    r"""Per-row log-likelihood of a dataset under a CNF, as a DataFrame.

    For every row, :math:`\log p_1(x) = \log p_0(z_0) - \int_0^1 \operatorname{div} v(z_t,t)\,dt`
    by one augmented ODE solve per batch (:func:`cnftools.log_likelihood`;
    docs/theory/change-of-variables.md). With Hutchinson's estimator :math:`\operatorname{div} v
    \approx \frac1K\sum_k \varepsilon_k^\top (\partial v/\partial x)\varepsilon_k` each row's
    value is unbiased, hence so is the dataset mean; ``Execution(target_stderr=...)`` adds probe
    rounds, only to the rows whose probe noise is large, until the probe part of the mean NLL's
    standard error, :math:`\sqrt{\sum_i \mathrm{stderr}_i^2}/n`, is at most the target or every
    row has ``max_probes`` probes.

    Args:
        v: the velocity field ``v(x, t)`` (e.g. an :class:`~cnftools.MLPField`, or a
            :class:`~cnftools.MixtureMarginal`). An ``nn.Module`` is copied to the device and
            dtype when it is not already there (the caller's module is left alone).
        data: ``(N, *event)`` rows: a tensor, a numpy array, a DataFrame, a map-style
            ``Dataset`` (items ``x`` or ``(x, y)``), a ``DataLoader`` or ``IterableDataset``
            (streamed batch by batch, never held whole; re-read from the start on resume), or a
            path to a ``.npy``, ``.csv`` or ``.parquet`` file (see :func:`cnftools.nll.read_rows`).
        prior: the base density :math:`p_0` (default :math:`\mathcal N(0, I)`), as in
            :func:`cnftools.log_likelihood`.
        estimator: the divergence spec, as in :func:`cnftools.log_likelihood`; a
            ``Hutchinson(n_probes, noise)`` takes no generator or probes here (each unit draws
            its own from ``Execution.seed``); ``n_probes >= 2`` gives a per-row ``stderr``.
        config: the solver settings, one :class:`~cnftools.SolverConfig`, as in
            :func:`cnftools.log_likelihood`.
        data_options: a :class:`~cnftools.nll.DataOptions`: columns, per-row extras (labels),
            dequantization, bits per dim.
        output: an :class:`~cnftools.nll.Output`: the ``.parquet`` file, resume, overwrite, kept
            chunks, run id. ``None``: nothing is stored, the frame is returned.
        execution: an :class:`~cnftools.nll.Execution`: batch size, device, dtype, threads,
            progress, seed, Hutchinson probe rounds.
        **solver: ``method``, ``rtol``, ``atol``, ``accuracy``: keyword sugar over ``config``, as
            in :func:`cnftools.log_likelihood`.

    Labels of a dataset: a dataset (or loader) of ``(x, y)`` items gives ``y`` per row, passed
    as ``v(x, t, y=...)`` when the field takes labels and dropped when it does not
    (:func:`cnftools.fields.takes_labels`). A conditional field on data without labels is an
    error before any solve.

    Returns:
        On rank 0 (or without ``torch.distributed``): a DataFrame, one row per data row in input
        order, with columns ``index`` (position in ``data``), ``log_prob`` (nats), ``nll``
        (:math:`-\log p`), ``bpd`` (with dequantization or ``bpd_dims``), ``nfe`` (function
        evaluations of the row's batch, summed over dequantization samples and probe rounds),
        ``stderr`` and ``rounds`` (Hutchinson), and ``status`` (``"ok"`` or the error text;
        failed rows have NaN values). ``frame.attrs["summary"]`` is :func:`~cnftools.summarize`'s
        dict; ``frame.attrs["run"]`` the settings and timing. Other ranks return ``None``.

    Raises:
        ValueError, TypeError: bad arguments or data, before any solve: among them a prior that
            is not a ``Distribution`` over the data's event shape in the computation's dtype, a
            field whose output has another shape or dtype than its input (one trial call), half
            precision, fractional data with dequantization, an unusable device, an extra of the
            wrong length or not marked ``PerRow``/``Shared``, a conditional field without labels.
            Failing rows do not raise: a batch that fails is retried row by row, each failed row
            gets its error in ``status``, and a warning gives the count and the first error.
        cnftools.nll.RowsFailedError: every row failed (a ``RuntimeError``; the first error is
            chained).
        FileExistsError: the output or its chunks exist and neither ``resume`` nor
            ``overwrite``, or another process holds the output's lock.
        cnftools.nll.ResumeError: the files at the output cannot be continued safely.

    Example:
        >>> import torch, cnftools
        >>> from cnftools.nll import Execution
        >>> field = cnftools.MixtureMarginal(
        ...     cnftools.OTPath(0.1), torch.zeros(1, 2, dtype=torch.float64)
        ... )
        >>> x = torch.randn(6, 2, dtype=torch.float64)
        >>> frame = cnftools.dataset_nll(
        ...     field,
        ...     x,
        ...     config=cnftools.SolverConfig("rk4", steps=20),
        ...     execution=Execution(batch_size=4, progress=False),
        ... )
        >>> list(frame.columns)
        ['index', 'log_prob', 'nll', 'nfe', 'status']

    References:
        Chen et al. (2018), arXiv:1806.07366; Grathwohl et al. (2019), arXiv:1810.01367;
        Ho et al. (2019), arXiv:1902.00275.
    """
    start_time = time.perf_counter()
    check_callable(v)
    spec = _run_estimator(estimator)
    options = _option(data_options, DataOptions, "data_options") or DataOptions()
    out = _option(output, Output, "output")  # None: nothing stored
    run_options = _option(execution, Execution, "execution") or Execution()
    _check_run_options(spec, run_options)
    solver_config = resolve_config(config, **solver)
    out_path = out.checked_path() if out is not None else None
    ready = _prepare(v, data, options, run_options)
    # what log_likelihood would refuse for every row (accuracy= with Hutchinson or below the
    # dtype's reach, tolerances below its rounding): refused once, before any work
    check_reach(solver_config, ready.dtype, hutchinson=isinstance(spec, Hutchinson))
    run_id = None if out is None else out.run_id
    need = out is not None and out.resume and run_id is None
    identity = _identity(v, prior, run_id, need=need)
    identity.update(_extras_identity(ready.row_extras, ready.constant_extras, need))
    with entry_threads(ready.device, run_options.num_threads), _modes_restored(v):
        field = _prepare_field(v, ready.device, ready.dtype)
        if ready.constant_extras:
            field = _SharedBound(field, ready.constant_extras)
        deq = options.dequantization
        settings = Settings(
            run_options.batch_size, spec, run_options.seed, solver_config, deq, prior, ready.device,
            ready.dtype,
        )  # fmt: skip
        check_prior(prior, ready.rows.event, settings.dtype, settings.device)
        _trial_call(
            field, ready.first_batch.x, settings, ready.rows.event, ready.first_batch.extras
        )
        run = {
            "rows": ready.rows.n, "event": list(ready.rows.event), **identity,
            "batch_size": run_options.batch_size, **_estimator_identity(spec),
            "seed": run_options.seed, "target_stderr": run_options.target_stderr,
            "max_probes": run_options.max_probes if run_options.target_stderr else None,
            "solver": {k: val for k, val in asdict(solver_config).items() if k != "adjoint"},
            "dequantization": None if deq is None else asdict(deq),
            "dtype": str(ready.dtype).replace("torch.", ""),
        }  # fmt: skip
        rank, world = dist.rank_and_world()
        job = Job(field, ready.rows, settings, run, rank, world, run_options.progress)
        job.bpd_dims = options.bpd_dims
        del ready
        return _execute(job, run, out, out_path, start_time)


def _execute(
    job: Job, run: dict, out: Output | None, out_path: Path | None, start_time: float
) -> pd.DataFrame | None:
    """Run the job: in memory, or into the chunk store at ``out_path`` under its lock."""
    if out is None:
        try:
            return job.run(None, start_time, False)
        except KeyboardInterrupt:
            raise RunInterrupted(0, job.rows.n, None) from None
    assert out_path is not None  # checked with out, before any work
    keep, rank, world = out.keep_chunks, job.rank, job.world
    lock = RunLock(out_path)
    store = ChunkStore(out_path, run, settings_key(run))
    try:
        if rank == 0:
            error = None
            try:
                lock.acquire()
                job.final_meta = store.open(out.resume, out.overwrite)
            except Exception as exc:  # every rank must learn of it, or they wait forever
                error = exc
            error = dist.broadcast(error, world)
        else:
            error = dist.broadcast(None, world)
        if error is not None:
            raise error
        return job.run(store, start_time, keep)
    except BaseException as stop:
        if rank == 0 and store.created:
            store.discard_if_empty()
        if isinstance(stop, KeyboardInterrupt) and not isinstance(stop, RunInterrupted):
            lock.release()  # first: the message below tells the user to run again
            raise RunInterrupted(job.kept_rows(store), job.rows.n, out_path) from None
        raise
    finally:
        lock.release()
