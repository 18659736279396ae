"""``torch.distributed`` for dataset NLL: rank and world, broadcast, gather, devices, threads.

Units are dealt round-robin to the ranks (the k-th unit still to compute goes to rank
``k % world``); rank 0 gathers the finished units with ``gather_object``. Without an initialised
process group everything here is the identity of a one-process run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["broadcast", "choose_threads", "default_device", "gather", "rank_and_world", "threads"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def broadcast(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, rank: int, world: int) -> list[Any]:
    """Every rank's ``value`` on rank 0 (in rank order); ``[]`` on the other ranks."""
    if world == 1:
        return [value]
    boxes: list[Any] | None = [None] * world if rank == 0 else None
    torch.distributed.gather_object(value, boxes, dst=0)
    return boxes if boxes is not None else []


def default_device(first_rows: torch.Tensor, v: object, world: int) -> torch.device:
    """The data's device, else the field's, else CPU; under torchrun ``cuda:LOCAL_RANK``."""
    if world > 1:
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")
    if first_rows.device.type != "cpu":
        return first_rows.device
    if isinstance(v, nn.Module):
        for p in v.parameters():
            return p.device
    return torch.device("cpu")


def choose_threads(device: torch.device) -> int:
    r"""A torch thread count for a CPU run: the idle cores of this process's share of the machine.

    :math:`\max(1, \min(T, \lfloor (C - \text{load}) / P \rfloor))` with :math:`T` torch's
    current count, :math:`C` the usable cores, load the 1-minute load average and :math:`P` the
    processes of this machine under torchrun (``LOCAL_WORLD_SIZE``). On a busy machine that is
    1: several threads on tiny tensors then wait on each other (10–100x slower measured on a loaded
    2-core machine). Off the CPU the current count is kept.
    """
    current = torch.get_num_threads()
    if device.type != "cpu":
        return current
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = 0.0
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(current, math.floor((cores - load) / local)))


@contextlib.contextmanager
def threads(count: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(count)``; the previous count is restored."""
    previous = torch.get_num_threads()
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
