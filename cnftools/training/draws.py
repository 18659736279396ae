"""The minibatches of a training run: epochs of a tensor's rows, or calls to a sampler.

:class:`Draws` hands :func:`~cnftools.training.train_cfm` one ``(x1, extras)`` batch per step, on
the field's device and dtype, from the run's one generator. Its position (the current epoch's
permutation and the next row of it) is :meth:`Draws.state`, so a run restored from its checkpoint
draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from cnftools._checks import check_batched
from cnftools.fields import check_extras, select_extras

__all__ = ["DataSource", "Draws"]

DataSource = Tensor | Callable[[int, torch.Generator], Tensor | tuple[Tensor, Mapping[str, object]]]


def _per_row(value: object, rows: int, device: torch.device, dtype: torch.dtype) -> object:
    """A per-row extra (a tensor with first dimension ``rows``) moved to the training device
    (floating ones also to the training dtype); anything else as is."""
    if not (isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == rows):
        return value
    return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)


def _sampled(
    out: object, batch_size: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, dict]:
    """Check a sampler's return, ``x1`` or ``(x1, extras)``, and move it to device/dtype."""
    name = "data(batch_size, generator)"
    extras: dict = {}
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(f"{name} must return x1 or a pair (x1, extras dict)")
        out, extras = out[0], check_extras(out[1])
    x1 = check_batched(name, out)
    if x1.shape[0] != batch_size:
        raise ValueError(f"{name} returned {x1.shape[0]} rows, expected batches.size={batch_size}")
    extras = {k: _per_row(e, batch_size, device, dtype) for k, e in extras.items()}
    return x1.to(device=device, dtype=dtype), extras


class Draws:
    """Minibatches ``(x1, extras)`` of ``size`` rows: epochs of a random permutation of tensor
    ``data`` (per-row extras indexed by the same rows; the last partial batch of an epoch is
    dropped) or calls ``data(size, generator)`` of a sampler.

    Args:
        data: a tensor ``(N, *event)`` or a sampler.
        extras: checked extras (with tensor data only).
        size: rows per batch.
        generator: the run's generator (permutations and the sampler's draws).
        device: where batches go (the field's device).
        dtype: the floating dtype of batches (the field's dtype).
    """

    def __init__(
        self,
        data: DataSource,
        extras: dict,
        size: int,
        generator: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.data = data
        self.extras = extras
        self.size = size
        self.generator = generator
        self.device = device
        self.dtype = dtype
        self.perm: Tensor | None = None
        self.start = 0

    def __iter__(self) -> Draws:
        return self

    def __next__(self) -> tuple[Tensor, dict]:
        data, size = self.data, self.size
        if not isinstance(data, Tensor):
            return _sampled(data(size, self.generator), size, self.device, self.dtype)
        n = data.shape[0]
        if self.perm is None or self.start + size > n:
            gen = self.generator
            self.perm = torch.randperm(n, generator=gen, device=gen.device)
            self.start = 0
        index = self.perm[self.start : self.start + size].to(data.device)
        self.start += size
        rows = {
            k: _per_row(e, size, self.device, self.dtype)
            for k, e in select_extras(self.extras, n, index).items()
        }
        return data[index].to(device=self.device, dtype=self.dtype), rows

    def state(self) -> dict[str, Any]:
        """The position in the data: the current epoch's permutation (``None`` before the first
        batch, and for a sampler) and the next row of it."""
        return {"perm": None if self.perm is None else self.perm.cpu(), "start": self.start}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state`'s position."""
        perm = state["perm"]
        self.perm = None if perm is None else perm.to(self.generator.device)
        self.start = int(state["start"])
