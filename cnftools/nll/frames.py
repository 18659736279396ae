r"""Merging unit rows into the result frame, :func:`summarize`, and the probe-round plan.

With ``target_stderr`` the probe part of the mean NLL's standard error is
:math:`\sqrt{\sum_i s_i^2}/n`, where row :math:`i` after :math:`R_i` rounds has
:math:`s_i^2 = \sigma_i^2 / R_i` (:math:`\sigma_i^2` the variance of one round's value). The
fewest probe rounds meeting the target give each row :math:`R_i \propto \sigma_i`:

.. math::

    R_i = \Big\lceil \frac{\sigma_i \sum_j \sigma_j}{n^2 \varepsilon^2} \Big\rceil ,
    \qquad 1 \le R_i \le \lfloor \text{max\_probes} / \text{n\_probes} \rfloor ,

so extra rounds go only to the rows whose probe noise is large, and ``max_probes`` is a hard cap.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from cnftools.data import Dequantization

__all__ = ["combine", "combine_units", "plan_rounds", "summarize", "with_bpd"]


def with_bpd(frame: pd.DataFrame, dims: int | None) -> pd.DataFrame:
    r"""``frame`` with a ``bpd`` column :math:`= \mathrm{nll} / (D \ln 2)` after ``nll`` (any
    earlier one replaced); ``dims`` = :math:`D`, ``None`` removes the column."""
    frame = frame.drop(columns="bpd", errors="ignore")
    if dims is None:
        return frame
    frame.insert(
        int(frame.columns.get_loc("nll")) + 1, "bpd", frame["nll"] / (dims * math.log(2.0))
    )
    return frame


def combine(
    units: pd.DataFrame,
    dim: int,
    deq: Dequantization | None,
    hutchinson: bool,
    bpd_dims: int | None = None,
) -> pd.DataFrame:
    """Merge per-round unit rows into one row per data point (mean over its probe rounds).

    A ``bpd`` column comes with ``deq`` (over the data's ``dim`` values) or, for continuous data,
    with ``bpd_dims`` (the user's count of dimensions)."""
    units = units.sort_values(["index", "round"], kind="stable")
    grouped = units.groupby("index", sort=True)
    rounds = grouped["round"].count()
    # first non-"ok" status of each index, vectorised (a per-group Python callable is slow)
    not_ok = units["status"].where(units["status"] != "ok")
    any_error = not_ok.groupby(units["index"], sort=True).first().reindex(rounds.index)
    any_error = any_error.fillna("ok")
    log_prob = grouped["log_prob"].mean()
    variance = grouped["variance"].sum(min_count=1) / rounds**2  # NaN (K = 1) stays NaN
    frame = pd.DataFrame({"index": log_prob.index.to_numpy(dtype=np.int64)})
    bad = any_error.to_numpy() != "ok"
    lp = np.where(bad, np.nan, log_prob.to_numpy(dtype=np.float64))
    frame["log_prob"] = lp
    frame["nll"] = -lp
    if deq is not None:
        frame["bpd"] = -lp / (dim * math.log(2.0))
    elif bpd_dims is not None:
        frame["bpd"] = -lp / (bpd_dims * math.log(2.0))
    frame["nfe"] = grouped["nfe"].sum().to_numpy(dtype=np.int64)
    if hutchinson:
        frame["stderr"] = np.where(bad, np.nan, np.sqrt(variance.to_numpy(dtype=np.float64)))
        frame["rounds"] = rounds.to_numpy(dtype=np.int64)
    frame["status"] = any_error.to_numpy().astype(str)
    return frame


def combine_units(
    units: list[pd.DataFrame],
    dim: int,
    deq: Dequantization | None,
    hutchinson: bool,
    bpd_dims: int | None = None,
) -> pd.DataFrame:
    """:func:`combine` of a list of unit frames, without its sort and group-by when every row has
    one round (no ``target_stderr``): the columns are joined and, if needed, put in index order,
    so a long stream's merge holds little more than the result itself (the general path holds
    several copies of every row). The same frame as ``combine(pd.concat(units), ...)``."""
    if not units or any(bool((u["round"].to_numpy() != 0).any()) for u in units):
        return combine(pd.concat(units, ignore_index=True), dim, deq, hutchinson, bpd_dims)
    index = np.concatenate([u["index"].to_numpy(dtype=np.int64) for u in units])
    order = None if bool((np.diff(index) > 0).all()) else np.argsort(index, kind="stable")

    def column(name: str, dtype: type) -> np.ndarray:
        values = np.concatenate([u[name].to_numpy(dtype=dtype) for u in units])
        return values if order is None else values[order]

    status = pd.concat([u["status"] for u in units], ignore_index=True)
    if order is not None:
        index = index[order]
        status = status.iloc[order].reset_index(drop=True)
    bad = (status != "ok").to_numpy(dtype=bool)
    frame = pd.DataFrame({"index": index})
    lp = column("log_prob", np.float64)
    lp[bad] = np.nan
    frame["log_prob"] = lp
    frame["nll"] = -lp
    if deq is not None:
        frame["bpd"] = -lp / (dim * math.log(2.0))
    frame["nfe"] = column("nfe", np.int64)
    if hutchinson:
        variance = column("variance", np.float64)
        variance[bad] = np.nan
        frame["stderr"] = np.sqrt(variance)
        frame["rounds"] = np.ones(len(frame), dtype=np.int64)
    frame["status"] = status.astype(str)
    return frame if deq is not None else with_bpd(frame, bpd_dims)


def probe_stderr(units: pd.DataFrame) -> tuple[float, pd.Series, pd.Series, pd.Series]:
    """``(se, sigma2, rounds, ok)``: the mean's probe stderr and per-row one-round variances."""
    grouped = units.groupby("index", sort=True)
    ok = (units["status"] == "ok").groupby(units["index"], sort=True).all()
    rounds = grouped["round"].count()
    sigma2 = grouped["variance"].mean()  # one round's variance, averaged over the rounds done
    n = int(ok.sum())
    if n == 0:
        return math.nan, sigma2, rounds, ok
    se = math.sqrt(float((sigma2[ok] / rounds[ok]).sum())) / n
    return se, sigma2, rounds, ok


def plan_rounds(units: pd.DataFrame, target: float, max_rounds: int) -> dict[int, int]:
    """Rows that need more probe rounds: ``{index: total rounds}`` (empty when none or capped)."""
    se, sigma2, rounds, ok = probe_stderr(units)
    if not math.isfinite(se) or se <= target:
        return {}
    sigma = np.sqrt(sigma2[ok].to_numpy(dtype=np.float64))
    n = len(sigma)
    wanted = np.ceil(sigma * sigma.sum() / (n**2 * target**2) * 1.0000001)
    wanted = np.clip(wanted, 1, max_rounds).astype(np.int64)
    done = rounds[ok].to_numpy()
    more = wanted > done
    index = sigma2[ok].index.to_numpy()
    return {int(i): int(r) for i, r in zip(index[more], wanted[more], strict=True)}


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    r"""Dataset-level numbers from a :func:`~cnftools.dataset_nll` frame.

    Over the ``ok`` rows (:math:`n` of them): ``mean_nll`` :math:`= -\frac1n\sum_i \log p(x_i)`,
    ``nll_stderr`` its sampling standard error :math:`\mathrm{sd}/\sqrt n`, ``probe_stderr``
    (Hutchinson only) the part due to the probes, :math:`\sqrt{\sum_i \mathrm{stderr}_i^2}/n`,
    ``mean_bpd`` and ``bpd_stderr`` (with a ``bpd`` column: ``dequantization`` or
    ``bpd_dims``), ``total_nfe`` (summed over batches, not rows), ``failures`` (rows whose status is not ``ok``), and from the run
    (``frame.attrs["run"]``, when present) ``seconds``, ``rows_per_s``, ``probes_per_row`` (the
    most any row used), ``max_probes`` and ``target_met`` (with ``target_stderr``).

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
    keys = ("seconds", "rows_computed", "rows_per_s", "world_size", "probes_per_row", "max_probes")
    for key in keys:
        if key in run:
            out[key] = run[key]
    if run.get("target_stderr") is not None and "probe_stderr" in out:
        out["target_stderr"] = run["target_stderr"]
        out["target_met"] = bool(out["probe_stderr"] <= run["target_stderr"])
    return out
