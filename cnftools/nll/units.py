r"""One unit of a dataset-NLL run: a batch's rows (or the subset of them that a probe round needs).

A unit's value for each row is :math:`\log p_1(x)` by :func:`cnftools.log_likelihood`, or with a
:class:`~cnftools.Dequantization` the importance-weighted bound (docs/theory/change-of-variables.md)

.. math::

    \log P(x) \ge \log \frac1K \sum_{k=1}^K p_Y\big(y(x + u_k)\big)
    \Big|\frac{\partial y}{\partial x'}\Big| .

Every random draw comes from a generator seeded by ``(seed, batch, round)`` (:func:`unit_seed`),
so a unit's numbers do not depend on which process computes it or when. A batch whose solve raises
is retried row by row, so that one bad row does not fail its neighbours.

References:
    Grathwohl et al., FFJORD (2019), arXiv:1810.01367; Ho et al., Flow++ (2019), arXiv:1902.00275.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from cnftools._ode import SolverConfig
from cnftools.data import (
    Dequantization,
    dequantization_log_det,
    dequantize,
    importance_weighted_log_mean,
)
from cnftools.estimators import Estimator, Hutchinson
from cnftools.likelihood import log_likelihood

__all__ = ["MAX_ERROR_TEXT", "Settings", "compute_unit", "unit_seed"]

MAX_ERROR_TEXT = 400


@dataclass
class Settings:
    """What every unit of a run shares."""

    batch_size: int
    estimator: Estimator | None  # a Hutchinson spec here has no generator and no probes
    seed: int
    config: SolverConfig
    dequantization: Dequantization | None
    prior: object
    device: torch.device
    dtype: torch.dtype
    extras: dict[str, Any] = field(default_factory=dict)  # constant extras (not per row)

    @property
    def hutchinson(self) -> bool:
        return isinstance(self.estimator, Hutchinson)

    @property
    def n_probes(self) -> int:
        """Hutchinson probes per solve (1 for an exact divergence)."""
        return self.estimator.n_probes if isinstance(self.estimator, Hutchinson) else 1


def unit_seed(*parts: int) -> int:
    """A 63-bit seed from integers (``numpy.random.SeedSequence``), e.g. ``(seed, batch, round)``."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def _solve(
    v: Callable[..., Tensor],
    y: Tensor,
    s: Settings,
    generator: torch.Generator | None,
    extras: Mapping[str, Any],
):
    """One solve through :func:`cnftools.likelihood.log_likelihood`: ``(log_prob, nfe, stderr)``."""
    estimator = s.estimator
    if isinstance(estimator, Hutchinson):  # the unit's own generator draws its probes
        estimator = dataclasses.replace(estimator, generator=generator)
    with torch.no_grad():  # no graph through the solver: only the divergence needs autograd
        result = log_likelihood(
            v, y, s.prior, estimator=estimator, config=s.config, extras=extras or None
        )
    stderr = result.stderr
    return (
        result.log_prob.detach(),
        int(result.nfe.total),
        None if stderr is None else stderr.detach(),
    )


def _value(
    v: Callable[..., Tensor],
    ys: list[Tensor],
    log_det: float,
    s: Settings,
    gen,
    extras: Mapping[str, Any],
) -> tuple[Tensor, int, Tensor | None]:
    """Row values from the ``K`` inputs ``ys`` (K = 1 without dequantization)."""
    terms, variances, total = [], [], 0
    for y in ys:
        lp, used, se = _solve(v, y, s, gen, extras)
        terms.append(lp + log_det)
        variances.append(None if se is None else se**2)
        total += used
    if len(ys) == 1:
        return terms[0], total, variances[0]
    stacked = torch.stack(terms)
    value = importance_weighted_log_mean(stacked)
    var = None
    if all(w is not None for w in variances):
        # delta method: d logmeanexp / d term_k = softmax weight w_k
        weights = torch.softmax(stacked, dim=0)
        var = (weights**2 * torch.stack(variances)).sum(dim=0)  # type: ignore[arg-type]
    return value, total, var


def _error_text(error: BaseException) -> str:
    return f"error: {type(error).__name__}: {error}".replace("\n", " ")[:MAX_ERROR_TEXT]


def compute_unit(
    v: Callable[..., Tensor],
    x: Tensor,
    start: int,
    rows: np.ndarray,
    batch: int,
    round_: int,
    s: Settings,
    extras: Mapping[str, Tensor] | None = None,
) -> tuple[pd.DataFrame, BaseException | None]:
    """Values of the rows ``rows`` (positions within the batch ``x``) of unit ``(batch, round)``.

    ``extras`` (per-row tensors of the batch, e.g. a dataset's labels ``y``) are part of the
    batch's content hash and are sliced with the rows; with the run's constant extras they reach
    the field as ``v(x, t, **extras)``.

    Returns:
        The unit's frame (``index``, ``round``, ``log_prob``, ``variance``, ``nfe``, ``status``)
        and the first exception met (``None`` when every row succeeded).
    """
    n = x.shape[0]
    log_prob = np.full(n, np.nan)
    variance = np.full(n, np.nan)
    nfe = np.zeros(n, dtype=np.int64)
    status = np.array(["ok"] * n, dtype=object)
    first_error: BaseException | None = None
    x = x.to(s.device)
    valid, ys, log_det = _inputs(x, s, batch, status)
    keep = valid.cpu().numpy()
    wanted = np.zeros(n, dtype=bool)
    wanted[rows] = True
    position = np.cumsum(keep) - 1  # row i of the batch is row position[i] of xs
    todo = np.flatnonzero(keep & wanted)
    if todo.size:
        valid_extras = {k: val.to(s.device)[valid] for k, val in (extras or {}).items()}

        def solve(index: np.ndarray, generator) -> tuple[Tensor, int, Tensor | None]:
            pick = torch.as_tensor(position[index], device=s.device)
            extras_ = {**s.extras, **{k: val[pick] for k, val in valid_extras.items()}}
            return _value(v, [y[pick] for y in ys], log_det, s, generator, extras_)

        try:
            lp, used, var = solve(todo, _probe_generator(s, batch, round_))
            log_prob[todo] = lp.to("cpu", torch.float64).numpy()
            if var is not None:
                variance[todo] = var.to("cpu", torch.float64).numpy()
            nfe[todo] = used
        except Exception as error:
            first_error = error
            if todo.size == 1:
                status[todo] = _error_text(error)
            for i in todo if todo.size > 1 else ():  # one bad row must not fail its neighbours
                try:
                    lp, used, var = solve(np.array([i]), _probe_generator(s, batch, round_, i))
                except Exception as row_error:
                    status[i] = _error_text(row_error)
                    continue
                log_prob[i] = float(lp[0])
                variance[i] = math.nan if var is None else float(var[0])
                nfe[i] = used
        nonfinite = np.zeros(n, dtype=bool)
        nonfinite[todo] = ~np.isfinite(log_prob[todo]) & (status[todo] == "ok")
        status[nonfinite] = "error: non-finite log_prob"
        log_prob[nonfinite] = np.nan
    frame = pd.DataFrame(
        {
            "index": np.arange(start, start + n, dtype=np.int64),
            "round": np.full(n, round_, dtype=np.int64),
            "log_prob": log_prob,
            "variance": variance,
            "nfe": nfe,
            "status": status.astype(str),
        }
    )
    frame = frame.iloc[np.sort(rows)].reset_index(drop=True)
    if first_error is None and (frame["status"] != "ok").any():
        first_error = ValueError(frame.loc[frame["status"] != "ok", "status"].iloc[0])
    return frame, first_error


def _inputs(
    x: Tensor, s: Settings, batch: int, status: np.ndarray
) -> tuple[Tensor, list[Tensor], float]:
    """The batch's valid rows (finite; integers in range with dequantization), marking the others'
    ``status``; the solver inputs (``K`` dequantized copies, or the rows) and the log-determinant."""
    n = x.shape[0]
    deq = s.dequantization
    finite = torch.isfinite(x.to(torch.float64)).reshape(n, -1).all(dim=1)
    status[~finite.cpu().numpy()] = "error: non-finite input (NaN or inf)"
    if deq is None:
        x = x.to(s.dtype)
        return finite, [x[finite]], 0.0
    bad = ((x < 0) | (x > deq.levels - 1) | (x != torch.round(x))).reshape(n, -1).any(dim=1)
    valid = finite & ~bad
    status[(finite & bad).cpu().numpy()] = (
        f"error: not an integer in 0..{deq.levels - 1} (dequantization)"
    )
    xs = x[valid]
    log_det = dequantization_log_det(math.prod(x.shape[1:]), deq.levels, centered=deq.centered)
    # the noise depends on (seed, batch) only and is drawn for the batch's valid rows, so a
    # probe round that computes a subset of them reuses each row's own noise
    noise = torch.Generator(device=s.device).manual_seed(unit_seed(s.seed, batch, 0, 1))
    ys = (
        [
            dequantize(xs, deq.levels, noise, centered=deq.centered, dtype=s.dtype)
            for _ in range(deq.samples)
        ]
        if xs.shape[0]
        else []
    )
    return valid, ys, log_det


def _probe_generator(s: Settings, batch: int, round_: int, row: int | None = None):
    if not s.hutchinson:
        return None
    parts = (s.seed, batch, round_, 0) if row is None else (s.seed, batch, round_, 2, row)
    return torch.Generator(device=s.device).manual_seed(unit_seed(*parts))
