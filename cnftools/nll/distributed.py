"""``torch.distributed`` for dataset NLL: rank and world, broadcast, gather, devices.

Units are dealt round-robin to the ranks (the k-th unit still to compute goes to rank
``k % world``); rank 0 gathers the finished units with ``gather_object``. Without an initialised
process group everything here is the identity of a one-process run.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from cnftools._resources import choose_threads  # the thread policy lives in _resources

__all__ = ["broadcast", "choose_threads", "default_device", "gather", "rank_and_world"]


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
