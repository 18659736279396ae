"""A training run's state: its loss history, and the checkpoint it is saved to and resumed from.

:class:`Run` gathers what :func:`~cnftools.training.train_cfm` changes as it goes (the field's
weights, the optimizer and learning-rate schedule, the generator, the position in the data, the
history) with the settings that must not change across a resume. :meth:`Run.save` writes it as an
ordinary cnftools checkpoint (:func:`~cnftools.training.checkpoints.save_checkpoint`) whose
``extra["train_cfm"]`` holds the run's state; :meth:`Run.restore` reads it back, checking the
settings first.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from torch import Tensor, nn

from cnftools.paths import GaussianPath
from cnftools.training.checkpoint_format import read_payload
from cnftools.training.checkpoints import describe_path, save_checkpoint
from cnftools.training.draws import DataSource, Draws
from cnftools.training.options import Batches, Optimization

__all__ = ["RUN_KEY", "History", "Run", "run_settings"]

RUN_KEY = "train_cfm"
"""The ``extra`` entry of a checkpoint that holds a run's state."""

_RUN_VERSION = 1


class History:
    """The per-step records of a run: loss (kept on the device until read), lr, wall time.

    Wall times count from the run's first step, earlier sessions of a resumed run included.
    """

    def __init__(self) -> None:
        self.losses: list[Tensor] = []
        self.lrs: list[float] = []
        self.seconds: list[float] = []
        self.before = 0.0  # seconds spent in earlier sessions of a resumed run
        self.start = time.perf_counter()

    def record(self, loss: Tensor, opt: torch.optim.Optimizer) -> None:
        self.losses.append(loss.detach())
        self.lrs.append(float(opt.param_groups[0]["lr"]))

    def tick(self) -> None:
        self.seconds.append(self.elapsed())

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def loss_values(self) -> Tensor:
        """Every loss so far as a float64 CPU tensor (exact: a widening conversion)."""
        if not self.losses:
            return torch.zeros(0, dtype=torch.float64)
        return torch.cat([loss.reshape(-1).cpu().double() for loss in self.losses])

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "step": range(1, len(self.lrs) + 1),
                "loss": self.loss_values().numpy(),
                "lr": self.lrs,
                "seconds": self.seconds,
            }
        )

    def state(self) -> dict[str, Any]:
        return {
            "loss": self.loss_values(),
            "lr": torch.tensor(self.lrs, dtype=torch.float64),
            "seconds": torch.tensor(self.seconds, dtype=torch.float64),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.losses = [state["loss"].to(torch.float64)]
        self.lrs = [float(v) for v in state["lr"].tolist()]
        self.seconds = [float(v) for v in state["seconds"].tolist()]
        self.before = self.seconds[-1] if self.seconds else 0.0
        self.start = time.perf_counter()


def run_settings(
    steps: int,
    batches: Batches,
    optimization: Optimization,
    optimizer: torch.optim.Optimizer,
    data: DataSource,
    path: GaussianPath,
) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues (plain values)."""
    shape = list(data.shape) if isinstance(data, Tensor) else None
    return {
        "batches.size": batches.size,
        "batches.t_min": float(batches.t_min),
        "batches.t_max": float(batches.t_max),
        "batches.minibatch_ot": batches.minibatch_ot,
        "batches.seed": int(batches.seed),
        "optimizer": type(optimizer).__name__,
        "optimization.lr": optimization.lr,
        "optimization.lr_schedule": optimization.lr_schedule,
        "optimization.max_grad_norm": optimization.max_grad_norm,
        # a schedule is a function of the run's length; a constant rate lets a run grow
        "steps": steps if optimization.lr_schedule is not None else None,
        "data": "a sampler" if shape is None else f"a tensor of shape {tuple(shape)}",
        "path": describe_path(path),
    }


@dataclass
class Run:
    """What a run changes as it goes, and the settings it keeps (see the module docstring)."""

    field: nn.Module
    path: GaussianPath
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator
    draws: Draws
    settings: dict[str, Any]
    history: History = field(default_factory=History)
    step: int = 0
    stopped: bool = False

    def save(self, file: str | os.PathLike[str]) -> None:
        """Write the run to ``file`` (atomically: the previous checkpoint survives a crash)."""
        state = {
            "version": _RUN_VERSION,
            "step": self.step,
            "stopped": self.stopped,
            "settings": self.settings,
            "generator": self.generator.get_state(),
            "draws": self.draws.state(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "history": self.history.state(),
        }
        save_checkpoint(
            file, self.field, self.path, extra={RUN_KEY: state}, optimizer=self.optimizer
        )

    def restore(self, file: str | os.PathLike[str], device: torch.device) -> None:
        """Continue from ``file``. Everything is checked (the file, the run state, the settings,
        the weights' names and shapes) before the field, the optimizer or the generator change."""
        name = os.fspath(file)
        try:
            payload = read_payload(file, device)
        except ValueError as error:
            raise ValueError(f"Checkpointing.file {name!r} cannot be resumed: {error}") from None
        state = payload["extra"].get(RUN_KEY)
        if not isinstance(state, dict) or state.get("version") != _RUN_VERSION:
            raise ValueError(
                f"Checkpointing.file {name!r} holds no train_cfm run state (a checkpoint saved "
                "by other means, or by another cnftools version); give another file, or "
                "Checkpointing(resume=False) to overwrite it"
            )
        _compare_settings(name, state["settings"], self.settings)
        stored = payload["state_dict"]
        shapes = {key: tuple(value.shape) for key, value in self.field.state_dict().items()}
        kind = payload["model"]["class"]
        if kind != type(self.field).__name__ or shapes != {
            key: tuple(value.shape) for key, value in stored.items()
        }:
            raise ValueError(
                f"Checkpointing.file {name!r} holds the weights of another field (a {kind}); "
                "resume with the field the run was started with"
            )
        if payload["optimizer"] is None:
            raise ValueError(f"Checkpointing.file {name!r} holds no optimizer state to resume")
        self.optimizer.load_state_dict(payload["optimizer"])
        self.field.load_state_dict(stored)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"].cpu())
        self.draws.restore(state["draws"])
        self.history.restore(state["history"])
        self.step = int(state["step"])
        self.stopped = bool(state["stopped"])


def _compare_settings(name: str, stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a resume whose settings differ from the stored run's, naming each difference."""
    differing = [
        f"{key}: {stored.get(key)!r} in the file, {value!r} now"
        for key, value in current.items()
        if stored.get(key) != value
    ]
    if differing:
        raise ValueError(
            f"Checkpointing.file {name!r} holds a run with other settings ("
            + "; ".join(differing)
            + "); resume with the run's own settings, or give another file or "
            "Checkpointing(resume=False) to start afresh"
        )
