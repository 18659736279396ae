r"""Dataset negative log-likelihood: batches, a DataFrame, resumable chunks, torch.distributed.

:func:`dataset_nll` computes, for every row :math:`x_i` of a dataset, the CNF log-likelihood of
THEORY §3,

.. math::

    \log p_1(x_i) = \log p_0(z_0) - \int_0^1 \operatorname{div} v(z_t, t)\, dt ,

by one augmented ODE solve per batch (:func:`cnftools.likelihood.log_likelihood`), and returns a
:class:`pandas.DataFrame` with one row per data point, in the input order. With a
:class:`Dequantization` (THEORY §12) the rows are integers :math:`x \in \{0,\dots,L-1\}^D`, the
field models :math:`y = (x + u)/L` (or :math:`2(x+u)/L - 1`), and the frame holds the
importance-weighted bound with :math:`K` samples,

.. math::

    \log P(x) \ge \log \frac1K \sum_{k=1}^K p_Y\big(y(x + u_k)\big)
    \Big|\frac{\partial y}{\partial x'}\Big|,\qquad
    \mathrm{bpd} = \frac{-\log P(x)}{D \ln 2}.

Work is split into *units* — a batch of ``batch_size`` consecutive rows (and, with
``target_stderr``, a round of Hutchinson probes). Every random draw of a unit (dequantization noise,
probes) comes from a generator seeded by ``(seed, batch, round)``, so a unit's numbers do not
depend on which process computes it, on the number of processes, or on an interruption.

With ``out=FILE.parquet``, each finished unit is written at once, atomically (a temporary file,
``fsync``, then ``os.replace``), to the chunk directory ``FILE.parquet.chunks/``::

    FILE.parquet.chunks/
        meta.json                          the run's settings (checked on resume)
        unit-b00000000-r000.parquet        rows of batch 0, probe round 0
        unit-b00000001-r000.parquet        ...

A run killed at any moment (SIGKILL included) and started again with ``resume=True`` reads the
finished units and computes only the missing ones; at the end ``FILE.parquet`` is written
atomically (exactly one row per input row) and the chunk directory is removed (unless
``keep_chunks``).

Under ``torchrun`` (``torch.distributed`` initialised) units are dealt round-robin to the ranks,
each rank runs on its own device (``cuda:LOCAL_RANK`` when CUDA is available, else CPU), and rank 0
gathers the results, writes ``out`` and returns the merged frame — identical to a one-process run
with the same settings on the same kind of device. Other ranks return ``None``.

References:
    Chen et al., Neural ODEs (2018), arXiv:1806.07366; Grathwohl et al., FFJORD (2019),
    arXiv:1810.01367 (Hutchinson); Theis et al. (2016), arXiv:1511.01844 (dequantization);
    Ho et al., Flow++ (2019), arXiv:1902.00275 (importance-weighted dequantization).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from cnftools._ode import SolverConfig

__all__ = [
    "Dequantization",
    "dataset_nll",
    "gaussian_baseline_nll",
    "histogram_baseline_nll",
    "summarize",
]

_FORMAT = "cnftools.dataset_nll/1"
_META_KEY = b"cnftools.dataset_nll"
_MAX_ERROR_TEXT = 400


# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dequantization:
    r"""Uniform dequantization of integer data and its bits-per-dimension bound (THEORY §12).

    Rows are integers :math:`x \in \{0, \dots, L-1\}^D`; the field models
    :math:`y = (x + u)/L \in [0, 1)^D` (or :math:`y = 2(x+u)/L - 1 \in [-1, 1)^D` with
    ``centered``), :math:`u \sim \mathcal U[0,1)^D`, and the reported value is the
    importance-weighted bound :math:`\log \frac1K \sum_k p_Y(y_k) |\partial y/\partial x'|` on
    :math:`\log P(x)`; bpd :math:`= -\log P(x) / (D \ln 2)`. A reported bpd always states ``K``.

    Attributes:
        levels: :math:`L`, the number of integer values (17 for scikit-learn's digits, 256 for
            8-bit images).
        samples: :math:`K \ge 1` dequantization samples per row.
        centered: scale to :math:`[-1, 1)` instead of :math:`[0, 1)`.

    Example:
        >>> Dequantization(levels=17, samples=4)
        Dequantization(levels=17, samples=4, centered=False)
    """

    levels: int
    samples: int = 1
    centered: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.levels, bool) or not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"Dequantization.levels must be an int >= 2, got {self.levels!r}")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"Dequantization.samples must be an int >= 1, got {self.samples!r}")
        if not isinstance(self.centered, bool):
            raise TypeError(f"Dequantization.centered must be a bool, got {self.centered!r}")


# ----------------------------------------------------------------------------------------------
# Row sources: random access to rows [start, stop) as a tensor (B, *event)
class _Rows:
    def __init__(self, n: int, event: tuple[int, ...], get: Callable[[int, int], Tensor]) -> None:
        self.n, self.event, self._get = n, event, get

    def get(self, start: int, stop: int) -> Tensor:
        return self._get(start, stop)


def _from_tensor(x: Tensor) -> _Rows:
    if x.dim() < 2:
        raise ValueError(
            f"data must have shape (N, *event) with at least one event dimension, got "
            f"{tuple(x.shape)}; for 1-D data use x[:, None]"
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"data must hold real numbers, got dtype {x.dtype}")
    return _Rows(x.shape[0], tuple(x.shape[1:]), lambda a, b: x[a:b])


def _from_frame(frame: pd.DataFrame, columns: Sequence[str] | None) -> _Rows:
    if columns is None:
        numeric = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c])]
        if len(numeric) != frame.shape[1]:
            other = [c for c in frame.columns if c not in numeric]
            raise ValueError(
                f"data has non-numeric columns {other[:10]}; choose the data columns with columns=[...]"
            )
        columns = list(frame.columns)
    else:
        if isinstance(columns, str):
            raise TypeError("columns must be a list of column names, not a single string")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"columns {missing} are not in the data; available columns: {list(frame.columns)[:20]}"
            )
        bad = [c for c in columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise TypeError(f"columns {bad} are not numeric")
    values = frame[list(columns)].to_numpy()
    return _from_tensor(torch.from_numpy(np.ascontiguousarray(values)))


def _from_dataset(dataset: torch.utils.data.Dataset) -> _Rows:
    def item(i: int) -> Tensor:
        value = dataset[i]
        if isinstance(value, tuple | list):  # (x, label, ...): the first entry is the data
            value = value[0]
        return torch.as_tensor(value)

    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError("data (a Dataset) is empty")
    first = item(0)
    return _Rows(n, tuple(first.shape), lambda a, b: torch.stack([item(i) for i in range(a, b)]))


def _from_loader(loader: torch.utils.data.DataLoader) -> _Rows:
    parts = []
    for value in loader:
        if isinstance(value, tuple | list):
            value = value[0]
        parts.append(torch.as_tensor(value))
    if not parts:
        raise ValueError("data (a DataLoader) yielded no batches")
    return _from_tensor(torch.cat(parts))


def _from_path(path: Path, columns: Sequence[str] | None) -> _Rows:
    if not path.exists():
        raise FileNotFoundError(f"data file {os.fspath(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        return _from_tensor(torch.from_numpy(np.ascontiguousarray(array)))
    if suffix == ".csv":
        return _from_frame(pd.read_csv(path), columns)
    if suffix in (".parquet", ".pq"):
        return _from_frame(pd.read_parquet(path), columns)
    raise ValueError(f"data file {os.fspath(path)!r}: expected a .npy, .csv or .parquet file")


def _rows(data: object, columns: Sequence[str] | None) -> _Rows:
    if columns is not None and not isinstance(data, pd.DataFrame | str | os.PathLike):
        raise ValueError("columns= applies to a DataFrame or a .csv/.parquet file only")
    if isinstance(data, Tensor):
        rows = _from_tensor(data.detach())
    elif isinstance(data, np.ndarray):
        if data.dtype == object:
            raise TypeError("data is a numpy array of objects; expected numbers")
        rows = _from_tensor(torch.from_numpy(np.ascontiguousarray(data)))
    elif isinstance(data, pd.DataFrame):
        rows = _from_frame(data, columns)
    elif isinstance(data, str | os.PathLike):
        rows = _from_path(Path(data), columns)
    elif isinstance(data, torch.utils.data.DataLoader):
        rows = _from_loader(data)
    elif isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        rows = _from_dataset(data)
    else:
        raise TypeError(
            "data must be a tensor, a numpy array, a DataFrame, a map-style Dataset, a DataLoader "
            f"or a path to a .npy/.csv/.parquet file, got {type(data).__name__}"
        )
    if rows.n < 1:
        raise ValueError("data has no rows")
    return rows


# ----------------------------------------------------------------------------------------------
# Distributed helpers
def _dist() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _broadcast(value: Any, world: int) -> Any:
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _gather(value: Any, rank: int, world: int) -> list[Any]:
    if world == 1:
        return [value]
    boxes: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(value, boxes, dst=0)
    return boxes if boxes is not None else []


def _default_device(rows: _Rows, v: object, world: int) -> torch.device:
    if world > 1:
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")
    probe = rows.get(0, 1)
    if probe.device.type != "cpu":
        return probe.device
    if isinstance(v, nn.Module):
        for p in v.parameters():
            return p.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------
def _unit_seed(*parts: int) -> int:
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _fingerprint_module(v: object) -> str:
    name = v.__qualname__ if callable(v) and hasattr(v, "__qualname__") else type(v).__qualname__
    digest = hashlib.sha256(name.encode())
    if isinstance(v, nn.Module):
        tensors = v.state_dict()
    else:  # e.g. a closed-form marginal: its tensor attributes
        tensors = (
            {k: t for k, t in vars(v).items() if isinstance(t, Tensor)}
            if hasattr(v, "__dict__")
            else {}
        )
    if tensors:
        for name, tensor in tensors.items():
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            if tensor.is_floating_point() and tensor.numel():
                t64 = tensor.detach().to("cpu", torch.float64)
                digest.update(f"{float(t64.sum()):.12e}{float(t64.abs().sum()):.12e}".encode())
    return digest.hexdigest()[:16]


def _fingerprint_rows(rows: _Rows) -> str:
    digest = hashlib.sha256()
    for start in {0, max(0, rows.n - 8)}:
        block = rows.get(start, min(rows.n, start + 8)).detach().to("cpu", torch.float64)
        digest.update(np.ascontiguousarray(block.numpy()).tobytes())
    return digest.hexdigest()[:16]


def _write_atomic(table: Any, path: Path) -> None:
    """Write a pyarrow table to ``path`` atomically: temp file in the same folder, fsync, replace."""
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _to_table(frame: pd.DataFrame, meta: Mapping[str, Any]) -> Any:
    import pyarrow as pa

    table = pa.Table.from_pandas(frame, preserve_index=False)
    old = table.schema.metadata or {}
    return table.replace_schema_metadata({**old, _META_KEY: json.dumps(meta).encode()})


def _read_meta(path: Path) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception:  # an unreadable file is treated as missing
        return None
    raw = metadata.get(_META_KEY)
    return None if raw is None else json.loads(raw)


def _unit_name(batch: int, round_: int) -> str:
    return f"unit-b{batch:08d}-r{round_:03d}.parquet"


# ----------------------------------------------------------------------------------------------
@dataclass
class _Settings:
    batch_size: int
    divergence: str
    n_probes: int
    seed: int
    config: Any  # cnftools._ode.SolverConfig
    dequantization: Dequantization | None
    solver_kwargs: dict[str, Any]
    prior: object
    device: torch.device
    dtype: torch.dtype


def _solve(v: Callable[..., Tensor], y: Tensor, s: _Settings, generator: torch.Generator | None):
    """One batch through :func:`cnftools.likelihood.log_likelihood`: ``(log_prob, nfe, stderr)``."""
    from cnftools.likelihood import log_likelihood

    kwargs: dict[str, Any] = dict(s.solver_kwargs)
    if s.divergence == "hutchinson":
        kwargs.update(divergence="hutchinson", n_probes=s.n_probes, generator=generator)
    with torch.no_grad():  # no graph through the solver: only the divergence needs autograd
        result = log_likelihood(v, y, s.prior, config=s.config, return_result=True, **kwargs)
    stderr = result.stderr
    return (
        result.log_prob.detach(),
        int(result.nfe.total),
        None if stderr is None else stderr.detach(),
    )


def _compute_unit(
    v: Callable[..., Tensor], rows: _Rows, batch: int, round_: int, s: _Settings
) -> pd.DataFrame:
    start = batch * s.batch_size
    stop = min(rows.n, start + s.batch_size)
    n = stop - start
    log_prob = np.full(n, np.nan)
    variance = np.full(n, np.nan)
    nfe = np.zeros(n, dtype=np.int64)
    status = np.array(["ok"] * n, dtype=object)
    x = rows.get(start, stop)
    if x.shape[1:] != rows.event:
        raise ValueError(
            f"rows {start}..{stop - 1} have event shape {tuple(x.shape[1:])}, expected {rows.event}"
        )
    x = x.to(s.device)
    deq = s.dequantization
    if deq is not None:
        bad = (x < 0) | (x > deq.levels - 1) | (x != torch.round(x))
        finite = torch.isfinite(x.to(torch.float64)).reshape(n, -1).all(dim=1)
        valid = finite & ~bad.reshape(n, -1).any(dim=1)
        status[~finite.cpu().numpy()] = "error: non-finite input (NaN or inf)"
        out_of_range = (finite & ~valid).cpu().numpy()
        status[out_of_range] = f"error: not an integer in 0..{deq.levels - 1} (dequantization)"
    else:
        x = x.to(s.dtype)
        valid = torch.isfinite(x).reshape(n, -1).all(dim=1)
        status[~valid.cpu().numpy()] = "error: non-finite input (NaN or inf)"
    keep = valid.cpu().numpy()
    if keep.any():
        xs = x[valid]
        probe_gen = None
        if s.divergence == "hutchinson":
            probe_gen = torch.Generator(device=s.device).manual_seed(
                _unit_seed(s.seed, batch, round_, 0)
            )
        try:
            if deq is None:
                lp, used, se = _solve(v, xs, s, probe_gen)
                var = None if se is None else se**2
            else:
                lp, used, var = _dequantized(v, xs, batch, s, probe_gen)
            log_prob[keep] = lp.to("cpu", torch.float64).numpy()
            if var is not None:
                variance[keep] = var.to("cpu", torch.float64).numpy()
            nfe[keep] = used
            nonfinite = keep & ~np.isfinite(log_prob)
            status[nonfinite] = "error: non-finite log_prob"
            log_prob[nonfinite] = np.nan
        except Exception as error:  # recorded per row, the run goes on
            text = f"error: {type(error).__name__}: {error}".replace("\n", " ")[:_MAX_ERROR_TEXT]
            status[keep] = text
    frame = pd.DataFrame(
        {
            "index": np.arange(start, stop, dtype=np.int64),
            "round": np.full(n, round_, dtype=np.int64),
            "log_prob": log_prob,
            "variance": variance,
            "nfe": nfe,
            "status": status.astype(str),
        }
    )
    return frame


def _dequantized(
    v: Callable[..., Tensor], x: Tensor, batch: int, s: _Settings, probe_gen: torch.Generator | None
) -> tuple[Tensor, int, Tensor | None]:
    from cnftools.data import dequantization_log_det, dequantize

    deq = s.dequantization
    assert deq is not None
    dim = math.prod(x.shape[1:])
    log_det = dequantization_log_det(dim, deq.levels, centered=deq.centered)
    # the dequantization noise depends on (seed, batch) only: probe rounds reuse it
    noise_gen = torch.Generator(device=s.device).manual_seed(_unit_seed(s.seed, batch, 0, 1))
    terms, variances, total = [], [], 0
    for _ in range(deq.samples):
        y = dequantize(x, deq.levels, noise_gen, centered=deq.centered, dtype=s.dtype)
        lp, used, se = _solve(v, y, s, probe_gen)
        terms.append(lp + log_det)
        variances.append(None if se is None else se**2)
        total += used
    stacked = torch.stack(terms)
    value = torch.logsumexp(stacked, dim=0) - math.log(deq.samples)
    var = None
    if all(w is not None for w in variances):
        # delta method: d logmeanexp / d term_k = softmax weight w_k
        weights = torch.softmax(stacked, dim=0)
        var = (weights**2 * torch.stack(variances)).sum(dim=0)  # type: ignore[arg-type]
    return value, total, var


# ----------------------------------------------------------------------------------------------
def _combine(
    units: pd.DataFrame, dim: int, deq: Dequantization | None, hutchinson: bool
) -> pd.DataFrame:
    """Merge per-round unit rows into one row per data point (mean over probe rounds)."""
    units = units.sort_values(["index", "round"], kind="stable")
    grouped = units.groupby("index", sort=True)
    rounds = grouped["round"].count()
    # First non-"ok" status of each index (vectorised: a per-group Python callable costs
    # ~25 µs a row, a serial cost that would cap the speed-up of a multi-process run).
    not_ok = units["status"].where(units["status"] != "ok")
    any_error = not_ok.groupby(units["index"], sort=True).first().reindex(rounds.index)
    any_error = any_error.fillna("ok")
    log_prob = grouped["log_prob"].mean()
    variance = grouped["variance"].sum(min_count=1) / rounds**2  # NaN (K = 1) stays NaN
    frame = pd.DataFrame({"index": log_prob.index.to_numpy(dtype=np.int64)})
    lp = log_prob.to_numpy(dtype=np.float64)
    bad = any_error.to_numpy() != "ok"
    lp = np.where(bad, np.nan, lp)
    frame["log_prob"] = lp
    frame["nll"] = -lp
    if deq is not None:
        frame["bpd"] = -lp / (dim * math.log(2.0))
    frame["nfe"] = grouped["nfe"].sum().to_numpy(dtype=np.int64)
    if hutchinson:
        frame["stderr"] = np.where(bad, np.nan, np.sqrt(variance.to_numpy(dtype=np.float64)))
        frame["rounds"] = rounds.to_numpy(dtype=np.int64)
    frame["status"] = any_error.to_numpy().astype(str)
    return frame


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    r"""Dataset-level numbers from a :func:`dataset_nll` frame.

    Over the ``ok`` rows (:math:`n` of them): ``mean_nll`` :math:`= -\frac1n\sum_i \log p(x_i)`,
    ``nll_stderr`` its sampling standard error :math:`\mathrm{sd}/\sqrt n`, ``probe_stderr`` (Hutchinson
    only) the part due to the probes, :math:`\sqrt{\sum_i \mathrm{stderr}_i^2}/n`, ``mean_bpd`` and
    ``bpd_stderr`` (with dequantization), ``total_nfe`` (summed over batches, not rows), ``failures``
    (rows whose status is not ``ok``), and from the run (``frame.attrs["run"]``, when present)
    ``seconds`` and ``rows_per_s`` (rows computed by this call per second of wall time).

    Example:
        >>> import pandas as pd
        >>> frame = pd.DataFrame(
        ...     {
        ...         "index": [0, 1],
        ...         "log_prob": [-1.0, -3.0],
        ...         "nll": [1.0, 3.0],
        ...         "nfe": [8, 8],
        ...         "status": ["ok", "ok"],
        ...     }
        ... )
        >>> s = summarize(frame)
        >>> s["mean_nll"], s["nll_stderr"], s["failures"]
        (2.0, 1.0, 0)
    """
    ok = frame["status"] == "ok"
    nll = frame.loc[ok, "nll"].to_numpy(dtype=np.float64)
    n = int(ok.sum())
    out: dict[str, Any] = {
        "rows": len(frame),
        "ok": n,
        "failures": len(frame) - n,
        "mean_nll": float(nll.mean()) if n else math.nan,
        "nll_stderr": float(nll.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
    }
    if "bpd" in frame:
        bpd = frame.loc[ok, "bpd"].to_numpy(dtype=np.float64)
        out["mean_bpd"] = float(bpd.mean()) if n else math.nan
        out["bpd_stderr"] = float(bpd.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    if "stderr" in frame:
        se = frame.loc[ok, "stderr"].to_numpy(dtype=np.float64)
        out["probe_stderr"] = float(math.sqrt(np.sum(se**2)) / n) if n else math.nan
    run = frame.attrs.get("run", {})
    # total NFE: every row of a batch shares that batch's evaluations, count each batch once
    if "nfe" in frame:
        batch_size = run.get("batch_size")
        if batch_size:
            per_batch = frame.groupby(frame["index"] // batch_size)["nfe"].max()
            out["total_nfe"] = int(per_batch.sum())
        else:
            out["total_nfe"] = int(frame["nfe"].sum())
    for key in ("seconds", "rows_computed", "rows_per_s", "world_size", "probes_per_row"):
        if key in run:
            out[key] = run[key]
    return out


# ----------------------------------------------------------------------------------------------
def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _prepare_field(v: object, device: torch.device, dtype: torch.dtype) -> Callable[..., Tensor]:
    if not callable(v):
        raise TypeError(f"v must be a callable velocity field v(x, t), got {type(v).__name__}")
    if isinstance(v, nn.Module):
        params = [p for p in v.parameters()]
        if params and (params[0].device != device or params[0].dtype != dtype):
            v = copy.deepcopy(v).to(device=device, dtype=dtype)  # leave the caller's module alone
        v.eval()
    return v  # type: ignore[return-value]


def _check_field(v: Callable[..., Tensor], rows: _Rows, s: _Settings) -> None:
    """Evaluate the field once on a finite row, so that a wrong dimension fails before any work."""
    x = None
    for start in range(0, rows.n, max(1, s.batch_size)):
        block = rows.get(start, min(rows.n, start + s.batch_size)).to("cpu")
        finite = torch.isfinite(block.to(torch.float64)).reshape(block.shape[0], -1).all(dim=1)
        if bool(finite.any()):
            x = block[finite][:1]
            break
    if x is None:
        return  # every row is non-finite: each is reported in its status
    if s.dequantization is not None:
        x = (
            x.to(torch.float64).clamp(0, s.dequantization.levels - 1) + 0.5
        ) / s.dequantization.levels
    x = x.to(device=s.device, dtype=s.dtype)
    t = torch.full((1,), 0.5, device=s.device, dtype=s.dtype)
    try:
        with torch.no_grad():
            out = v(x, t)
    except Exception as error:
        raise ValueError(
            f"the field v fails on a data row of shape {tuple(x.shape)} (event shape {rows.event}, "
            f"dtype {s.dtype}): {type(error).__name__}: {error}"
        ) from error
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the field v maps data rows of shape {tuple(x.shape)} to {shape}; it must return the "
            f"input's shape (is the data's dimension {rows.event} the one the field was built for?)"
        )


def dataset_nll(
    v: Callable[..., Tensor],
    data: object,
    *,
    columns: Sequence[str] | None = None,
    batch_size: int = 256,
    prior: object = None,
    divergence: str = "exact",
    n_probes: int = 1,
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
) -> pd.DataFrame | None:
    r"""Per-row log-likelihood of a dataset under a CNF, as a DataFrame (THEORY §3, §11, §12).

    For every row, :math:`\log p_1(x) = \log p_0(z_0) - \int_0^1 \operatorname{div} v(z_t,t)\,dt`
    by one augmented ODE solve per batch (:func:`cnftools.likelihood.log_likelihood`). With
    Hutchinson's estimator :math:`\operatorname{div} v \approx \frac1K\sum_k \varepsilon_k^\top
    (\partial v/\partial x)\varepsilon_k` each row's value is unbiased, hence so is the dataset
    mean; ``target_stderr`` adds probe rounds until the probe part of the mean NLL's standard error,
    :math:`\sqrt{\sum_i \mathrm{stderr}_i^2}/n`, is at most ``target_stderr``.

    Args:
        v: the velocity field ``v(x, t)`` (e.g. an :class:`~cnftools.MLPField`, or a
            :class:`~cnftools.MixtureMarginal`). An ``nn.Module`` is copied to ``device``/``dtype``
            when it is not already there (the caller's module is left alone).
        data: ``(N, *event)`` rows: a tensor, a numpy array, a DataFrame (``columns`` choose the
            columns; default all, which must be numeric), a map-style ``Dataset`` (items ``x`` or
            ``(x, ...)``), a ``DataLoader`` (read once, in its order, into memory), or a path to a
            ``.npy``, ``.csv`` or ``.parquet`` file.
        columns: column names, for a DataFrame or a ``.csv``/``.parquet`` file.
        batch_size: rows per ODE solve. Results depend on it (an adaptive solver steps a batch
            together), so resume and multi-process runs keep it.
        prior: the base density :math:`p_0` (default :math:`\mathcal N(0, I)`), passed on to
            ``log_likelihood``.
        divergence: ``"exact"`` or ``"hutchinson"``.
        n_probes: Hutchinson probes per solve (:math:`K`); ``>= 2`` gives a per-row ``stderr``.
        seed: seeds every random draw; unit ``(batch, round)`` uses a generator seeded from
            ``(seed, batch, round)``.
        target_stderr: Hutchinson only: add probe rounds (of ``n_probes`` each) until the probe
            standard error of the mean NLL is at most this (nats); needs ``n_probes >= 2``.
        max_probes: cap on the probes per row that ``target_stderr`` may use.
        method: ODE solver (default ``"dopri5"``; ``"rk4"``, ``"euler"``, ...); see
            :class:`~cnftools.SolverConfig`.
        rtol: relative tolerance of an adaptive solver (default ``1e-5``).
        atol: absolute tolerance of an adaptive solver (default ``1e-5``).
        step_size: step of a fixed-grid solver.
        steps: number of steps of a fixed-grid solver (instead of ``step_size``).
        config: a :class:`~cnftools.SolverConfig`; the keywords above, when given, override it.
        solver_options: further keyword arguments of ``log_likelihood`` (e.g. ``noise=
            "gaussian"`` probes); values must be plain (they are recorded for resume).
        dequantization: a :class:`Dequantization` for integer data; adds the ``bpd`` column.
        device: where to compute (default: the data's device, else the field's, else CPU; under
            ``torch.distributed``, ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
        dtype: computation dtype (default: the data's floating dtype; for integer data the field's
            parameter dtype, else torch's default).
        out: a ``.parquet`` file for the result; chunks go to ``out + ".chunks/"`` as they finish.
        resume: continue a run killed or stopped earlier (same settings, checked); when there is
            none, start one (so ``resume=True`` is safe to pass always).
        overwrite: discard an existing ``out`` and its chunk directory instead of failing.
        keep_chunks: keep the chunk directory after the final file is written.
        progress: a tqdm bar (rows, rows/s) on rank 0; default: on when stderr is a terminal.

    Returns:
        On rank 0 (or without ``torch.distributed``): a DataFrame, one row per data row in input
        order, with columns ``index`` (position in ``data``), ``log_prob`` (nats), ``nll``
        (:math:`-\log p`), ``bpd`` (with ``dequantization``), ``nfe`` (function evaluations of the
        row's batch, summed over dequantization samples and probe rounds), ``stderr`` and
        ``rounds`` (Hutchinson), and ``status`` (``"ok"`` or the error text; failed rows have NaN
        values). ``frame.attrs["summary"]`` is :func:`summarize`'s dict; ``frame.attrs["run"]``
        the settings and timing. Other ranks return ``None``.

    Raises:
        ValueError, TypeError: bad arguments or data (missing columns, a field that does not map
            the data's shape to itself), before any solve. A failing batch does not raise: its rows
            get the error in ``status``.
        FileExistsError: ``out`` or its chunks exist and neither ``resume`` nor ``overwrite``.

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
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    n_probes = _check_int("n_probes", n_probes, 1)
    max_probes = _check_int("max_probes", max_probes, 1)
    if divergence not in ("exact", "hutchinson"):
        raise ValueError(f"divergence must be 'exact' or 'hutchinson', got {divergence!r}")
    hutchinson = divergence == "hutchinson"
    if target_stderr is not None:
        if not hutchinson:
            raise ValueError(
                "target_stderr applies to divergence='hutchinson' only (exact has no probe error)"
            )
        if not (isinstance(target_stderr, int | float) and target_stderr > 0):
            raise ValueError(f"target_stderr must be a number > 0, got {target_stderr!r}")
        if n_probes < 2:
            raise ValueError(
                "target_stderr needs n_probes >= 2 (a per-row standard error needs two probes)"
            )
    if dequantization is not None and not isinstance(dequantization, Dequantization):
        raise TypeError(
            f"dequantization must be a Dequantization(levels=..., samples=...), got {dequantization!r}"
        )
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")

    from cnftools._ode import resolve_config

    solver = resolve_config(
        config, method=method, rtol=rtol, atol=atol, step_size=step_size, steps=steps
    )
    rank, world = _dist()
    rows = _rows(data, columns)
    sample = rows.get(0, 1)
    if dtype is None:
        if sample.is_floating_point() and dequantization is None:
            dtype = sample.dtype
        elif isinstance(v, nn.Module) and any(True for _ in v.parameters()):
            dtype = next(v.parameters()).dtype
        elif sample.is_floating_point():
            dtype = sample.dtype
        else:
            dtype = torch.get_default_dtype()
    device = torch.device(device) if device is not None else _default_device(rows, v, world)
    field = _prepare_field(v, device, dtype)
    settings = _Settings(
        batch_size, divergence, n_probes, seed, solver, dequantization,
        dict(solver_options or {}), prior, device, dtype,
    )  # fmt: skip
    _check_field(field, rows, settings)
    dim = math.prod(rows.event)
    n_batches = math.ceil(rows.n / batch_size)

    meta = {
        "format": _FORMAT,
        "rows": rows.n,
        "event": list(rows.event),
        "data": _fingerprint_rows(rows),
        "field": _fingerprint_module(v),
        "batch_size": batch_size,
        "divergence": divergence,
        "n_probes": n_probes if hutchinson else None,
        "seed": seed,
        "target_stderr": target_stderr,
        "max_probes": max_probes if target_stderr is not None else None,
        "solver": {key: value for key, value in asdict(solver).items() if key != "adjoint"},
        "prior": None if prior is None else repr(prior),
        "dequantization": None if dequantization is None else asdict(dequantization),
        "dtype": str(dtype).replace("torch.", ""),
        "solver_options": {str(k): repr(v) for k, v in sorted((solver_options or {}).items())},
    }
    store = _Store(Path(out), meta, resume, overwrite, rank, world) if out is not None else None
    if store is not None and store.complete:  # resumed after the final file was written
        if rank != 0:
            return None
        assert store.final is not None
        frame = store.final
        frame.attrs.clear()
        return _finish(frame, None, meta, rank, world, start_time, 0, keep_chunks, dequantization)

    show = progress if progress is not None else sys.stderr.isatty()
    bar = None
    if show and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=rows.n, unit="row", desc="dataset_nll" + (f" rank 0/{world}" if world > 1 else "")
        )
    computed_rows = 0
    all_units: list[pd.DataFrame] = []
    rounds_done = 0
    rounds_target = 1
    try:
        while rounds_done < rounds_target:
            wanted = [(b, r) for r in range(rounds_done, rounds_target) for b in range(n_batches)]
            done = _broadcast(store.existing() if store is not None and rank == 0 else set(), world)
            todo = [u for u in wanted if u not in done]
            mine = todo[rank::world]
            if bar is not None:
                bar.reset(total=len(wanted) * batch_size if rounds_done else rows.n)
                bar.update(min(bar.total, (len(wanted) - len(todo)) * batch_size))
            frames = []
            for batch, round_ in mine:
                frame = _compute_unit(field, rows, batch, round_, settings)
                if store is not None:
                    store.write_unit(batch, round_, frame)
                frames.append(frame)
                computed_rows += len(frame)
                if bar is not None:
                    bar.update(len(frame) * (world if world > 1 else 1))
            gathered = _gather(frames, rank, world)
            if rank == 0:
                for part in gathered:
                    all_units.extend(part)
                if store is not None:
                    all_units.extend(store.read_units([u for u in wanted if u in done]))
            rounds_done = rounds_target
            if target_stderr is not None:
                decision = None
                if rank == 0:
                    decision = _more_rounds(
                        all_units, rounds_done, target_stderr, n_probes, max_probes
                    )
                rounds_target = _broadcast(decision, world)
    finally:
        if bar is not None:
            bar.close()
    computed = sum(_gather(computed_rows, rank, world)) if world > 1 else computed_rows
    if rank != 0:
        if world > 1:
            torch.distributed.barrier()
        return None
    units = pd.concat(all_units, ignore_index=True)
    frame = _combine(units, dim, dequantization, hutchinson)
    if len(frame) != rows.n or not np.array_equal(frame["index"].to_numpy(), np.arange(rows.n)):
        raise RuntimeError(f"internal error: merged {len(frame)} rows for {rows.n} inputs")
    result = _finish(
        frame, store, meta, rank, world, start_time, computed, keep_chunks, dequantization
    )
    if world > 1:
        torch.distributed.barrier()
    return result


def _more_rounds(
    units: list[pd.DataFrame], rounds: int, target: float, n_probes: int, max_probes: int
) -> int:
    """Rounds needed so that the probe stderr of the mean NLL is <= target (var ∝ 1/rounds)."""
    frame = pd.concat(units, ignore_index=True)
    frame = frame[frame["round"] < rounds]
    ok = (frame["status"] == "ok").groupby(frame["index"]).all()
    var = frame.groupby("index")["variance"].sum() / rounds**2
    var = var[ok]
    if len(var) == 0:
        return rounds
    se = math.sqrt(float(var.sum())) / len(var)
    if se <= target:
        return rounds
    needed = math.ceil(rounds * (se / target) ** 2 * 1.0000001)
    return max(rounds + 1, min(needed, max(rounds, max_probes // n_probes)))


def _finish(
    frame: pd.DataFrame,
    store: _Store | None,
    meta: dict[str, Any],
    rank: int,
    world: int,
    start_time: float,
    computed: int,
    keep_chunks: bool,
    deq: Dequantization | None,
) -> pd.DataFrame:
    seconds = time.perf_counter() - start_time
    run = {
        **{k: meta[k] for k in ("batch_size", "divergence", "n_probes", "seed", "solver", "dtype")},
        "dequantization": meta["dequantization"],
        "world_size": world,
        "seconds": seconds,
        "rows_computed": computed,
        "rows_per_s": computed / seconds if seconds > 0 else math.nan,
    }
    if "rounds" in frame and meta["n_probes"]:
        run["probes_per_row"] = int(frame["rounds"].max()) * int(meta["n_probes"])
    frame.attrs["run"] = run
    frame.attrs["summary"] = summarize(frame)
    if store is not None and rank == 0:
        store.write_final(frame, keep_chunks)
    return frame


# ----------------------------------------------------------------------------------------------
class _Store:
    """The chunk directory of one ``out`` file (see the module docstring for the layout)."""

    def __init__(
        self, out: Path, meta: dict[str, Any], resume: bool, overwrite: bool, rank: int, world: int
    ) -> None:
        if out.suffix.lower() not in (".parquet", ".pq"):
            raise ValueError(f"out must be a .parquet file, got {os.fspath(out)!r}")
        self.out = out
        self.dir = out.with_name(out.name + ".chunks")
        self.meta = meta
        self.final: pd.DataFrame | None = None
        error: str | None = None
        if rank == 0:
            try:
                self._open(resume, overwrite)
            except (FileExistsError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        error, self.complete = _broadcast((error, self.final is not None), world)
        if error is not None:
            kind, _, text = error.partition(": ")
            raise (FileExistsError if kind == "FileExistsError" else ValueError)(text)

    def _open(self, resume: bool, overwrite: bool) -> None:
        exists = self.out.exists() or self.dir.exists()
        if exists and overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.out.unlink(missing_ok=True)
        elif exists and not resume:
            raise FileExistsError(
                f"{os.fspath(self.out)!r} or its chunk directory already exists; pass resume=True "
                "(--resume) to continue that run, or overwrite=True (--overwrite) to start again"
            )
        if resume and self.out.exists():
            stored = _read_meta(self.out)
            if stored is not None:
                self._compare(stored, os.fspath(self.out))
                frame = pd.read_parquet(self.out)
                if len(frame) == self.meta["rows"]:
                    self.final = frame
                    shutil.rmtree(self.dir, ignore_errors=True)
                    return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.dir.mkdir(exist_ok=True)
        meta_file = self.dir / "meta.json"
        if meta_file.exists():
            self._compare(json.loads(meta_file.read_text()), os.fspath(meta_file))
        else:
            tmp = self.dir / f".meta.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(self.meta, indent=1))
            os.replace(tmp, meta_file)
        for stale in self.dir.glob(".*.tmp"):  # temp files of a killed run
            stale.unlink(missing_ok=True)

    def _compare(self, stored: Mapping[str, Any], where: str) -> None:
        differ = sorted(
            k for k in set(stored) | set(self.meta) if stored.get(k) != self.meta.get(k)
        )
        if differ:
            detail = ", ".join(f"{k}: {stored.get(k)!r} -> {self.meta.get(k)!r}" for k in differ)
            raise ValueError(
                f"cannot resume: {where} was made with other settings or data ({detail}); "
                "use overwrite=True (--overwrite) to start again"
            )

    def existing(self) -> set[tuple[int, int]]:
        units = set()
        for path in self.dir.glob("unit-b*-r*.parquet"):
            stem = path.name[len("unit-b") : -len(".parquet")]
            batch, _, round_ = stem.partition("-r")
            units.add((int(batch), int(round_)))
        return units

    def write_unit(self, batch: int, round_: int, frame: pd.DataFrame) -> None:
        _write_atomic(
            _to_table(frame, {"batch": batch, "round": round_}),
            self.dir / _unit_name(batch, round_),
        )

    def read_units(self, units: Iterable[tuple[int, int]]) -> list[pd.DataFrame]:
        return [pd.read_parquet(self.dir / _unit_name(b, r)) for b, r in units]

    def write_final(self, frame: pd.DataFrame, keep_chunks: bool) -> None:
        _write_atomic(_to_table(frame, self.meta), self.out)
        if not keep_chunks:
            shutil.rmtree(self.dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Baselines on the same dequantized scale (THEORY §12), for comparison with a flow's bpd
def gaussian_baseline_nll(
    train: Tensor,
    test: Tensor,
    dequantization: Dequantization,
    *,
    seed: int = 0,
    shrinkage: float = 1e-6,
) -> Tensor:
    r"""Dequantized NLL (nats, data space) of a full-covariance Gaussian fitted to dequantized data.

    Fit :math:`\mathcal N(\hat m, \hat S + \lambda I)` by maximum likelihood to :math:`y(x + u)` of
    ``train`` (one noise draw), then score ``test`` with the same :math:`K`-sample bound as
    :func:`dataset_nll`: :math:`-\log\frac1K\sum_k \mathcal N(y_k) |\partial y/\partial x'|`.

    Args:
        train: integer rows ``(N, *event)``.
        test: integer rows ``(M, *event)``.
        dequantization: levels, :math:`K`, scaling.
        seed: seeds the noise draws.
        shrinkage: :math:`\lambda`, added to the covariance's diagonal (relative to its mean
            diagonal).

    Returns:
        ``(M,)`` float64 NLLs; divide by :math:`D\ln 2` for bpd.
    """
    from cnftools.data import dequantization_log_det, dequantize

    gen = torch.Generator().manual_seed(seed)
    deq = dequantization
    train = train.reshape(train.shape[0], -1).to("cpu")
    test = test.reshape(test.shape[0], -1).to("cpu")
    y = dequantize(train, deq.levels, gen, centered=deq.centered, dtype=torch.float64)
    mean = y.mean(dim=0)
    cov = torch.cov(y.T, correction=0)
    cov = cov + shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype)
    normal = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    log_det = dequantization_log_det(test.shape[1], deq.levels, centered=deq.centered)
    terms = [
        normal.log_prob(
            dequantize(test, deq.levels, gen, centered=deq.centered, dtype=torch.float64)
        )
        + log_det
        for _ in range(deq.samples)
    ]
    return -(torch.logsumexp(torch.stack(terms), dim=0) - math.log(deq.samples))


def histogram_baseline_nll(
    train: Tensor, test: Tensor, levels: int, *, alpha: float = 1.0
) -> Tensor:
    r"""NLL (nats) of independent per-dimension histograms with add-:math:`\alpha` smoothing.

    :math:`P(x) = \prod_j \hat P_j(x_j)`, :math:`\hat P_j(l) = (n_{jl} + \alpha)/(N + \alpha L)`.
    On the dequantized scale its density is :math:`L\hat P_j` on each bin of width :math:`1/L`, so
    the dequantized bound is exact here: the bpd equals :math:`-\log_2 P(x)/D` for every :math:`K`.

    Args:
        train: integer rows ``(N, *event)`` in ``0..levels-1``.
        test: integer rows ``(M, *event)``.
        levels: :math:`L`.
        alpha: the smoothing count.

    Returns:
        ``(M,)`` float64 NLLs.

    Example:
        >>> import torch
        >>> histogram_baseline_nll(torch.tensor([[0], [1]]), torch.tensor([[0]]), 2, alpha=0.0)
        tensor([0.6931], dtype=torch.float64)
    """
    from cnftools.data import _check_integer_data

    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    train = _check_integer_data(train, levels)
    test = _check_integer_data(test, levels)
    if train[0].numel() != test[0].numel():
        raise ValueError(
            f"train and test must have the same event size, got {tuple(train.shape)}, {tuple(test.shape)}"
        )
    # A baseline on host memory: counts are small (D × L) and the result is a float64 frame column.
    train = train.reshape(train.shape[0], -1).to("cpu").round().long()
    test = test.reshape(test.shape[0], -1).to("cpu").round().long()
    counts = torch.zeros(train.shape[1], levels, dtype=torch.float64)
    counts.scatter_add_(1, train.T, torch.ones(train.T.shape, dtype=torch.float64))
    probs = (counts + alpha) / (train.shape[0] + alpha * levels)
    log_p = torch.log(probs).gather(1, test.T)  # (D, M)
    return -log_p.sum(dim=0)
