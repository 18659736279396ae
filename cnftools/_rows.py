"""The per-row bookkeeping of the adaptive Runge–Kutta loop (:mod:`cnftools._runge_kutta`).

Every row of a batch is its own system on its own steps. :class:`RowState` is what each row
carries from one step to the next (its state, time, proposed step, next output, attempts, the
controller's memory), for the rows still in the evaluated batch: finished rows leave it
(:meth:`RowState.compact`). :class:`Attempt` is what one step attempt found for every row, before
the state takes it. :func:`assemble` builds the output from the rows' landings on output times.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["Attempt", "RowState", "assemble"]


@dataclass(slots=True)
class RowState:
    """The per-row state of the rows in the evaluated batch (each tensor has one entry per row).

    Attributes:
        rows: the rows' indices in the original batch.
        y: their states ``(b, n)``.
        t: their times.
        h: the step each row proposes (unsigned).
        k_first: the first stage of each row's next step.
        target: each row's next output index.
        attempts: attempts since the row last landed on an output time.
        previous: the row's last accepted error ratio (0: none yet), for the controller.
        first: the solve has not attempted a step yet (every row is on its starting step; one
            flag for the batch, as every row attempts the first step together).
        moving: not finished (without compaction finished rows stay, frozen).
        evaluated: the ``rows`` argument of the dynamics: ``None`` while every row of the
            original batch is evaluated, in order (not a per-row tensor: kept by
            :meth:`compact`, which sets it).
    """

    rows: Tensor
    y: Tensor
    t: Tensor
    h: Tensor
    k_first: Tensor
    target: Tensor
    attempts: Tensor
    previous: Tensor
    moving: Tensor
    first: bool = True
    evaluated: Tensor | None = None

    def compact(self) -> None:
        """Let the finished rows leave the batch: keep the moving ones, in order."""
        moving = self.moving
        for name in _PER_ROW:
            setattr(self, name, getattr(self, name)[moving])
        self.evaluated = self.rows


_PER_ROW = tuple(item.name for item in fields(RowState) if item.name not in ("first", "evaluated"))


@dataclass(slots=True)
class Attempt:
    """One step attempted by every row: its outcome, before the state takes it.

    Attributes:
        step: the unsigned step (0 for rows not moving).
        signed: the step with the direction of time.
        t_new: the time the step reaches (exactly the output time where it lands).
        y_new: the state it reaches.
        inputs: the stage inputs (to explain a non-finite step).
        stages: the stages (the last is the next step's first where the method is FSAL).
        ratio: the error ratio (accepted when at most 1; non-finite where the step failed).
        accepted: the rows whose step is accepted.
        landed: accepted and on an output time.
        finishing: landed on the last output time.
        stuck: a step too small to move the time.
        summary: what the host reads after the step, ``(6,)`` float64: the numbers of rows with
            a non-finite ratio, over ``max_steps``, stuck, finishing and landed before the last
            output time, and the earliest time a row has reached (before the step).
    """

    step: Tensor
    signed: Tensor
    t_new: Tensor
    y_new: Tensor
    inputs: list[Tensor]
    stages: list[Tensor]
    ratio: Tensor
    accepted: Tensor
    landed: Tensor
    finishing: Tensor
    stuck: Tensor
    summary: Tensor


def assemble(y0: Tensor, n_times: int, pieces: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """States ``(T, B, n)`` from the rows' landings ``(output index, rows, states)`` (``y0`` at
    index 0); differentiable."""
    out = y0.new_zeros((n_times, *y0.shape))
    index = torch.cat([p[0] for p in pieces])
    rows = torch.cat([p[1] for p in pieces])
    values = torch.cat([p[2] for p in pieces])
    out = out.index_put((index, rows), values)
    first = torch.zeros(n_times, dtype=torch.bool, device=y0.device)
    first[0] = True
    return torch.where(first[:, None, None], y0.unsqueeze(0), out)
