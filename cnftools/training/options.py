r"""The options of :func:`~cnftools.training.train_cfm`, grouped in small frozen objects.

- :class:`Batches`: what each step trains on (batch size, the range of the drawn times, minibatch
  OT pairing, the seed of every random draw);
- :class:`Optimization`: how the field's parameters are updated (optimizer, learning rate and its
  schedule, gradient clipping);
- :class:`Monitor`: what the caller sees while it runs (progress bar, a callback that may stop it);
- :class:`Checkpointing`: where the run's checkpoints go and how a run resumes.

Each object checks its values when it is made, so a bad one raises a ``ValueError`` (or a
``TypeError`` for a value of the wrong kind) naming the field, what it expects and the fix, before
any training starts. The objects are frozen: use :func:`dataclasses.replace` to change one field.

Example:
    >>> import dataclasses
    >>> batches = Batches(size=64, minibatch_ot=True)
    >>> dataclasses.replace(batches, t_max=0.999).t_max
    0.999
    >>> Batches(size=0)
    Traceback (most recent call last):
    ...
    ValueError: Batches.size must be an int >= 1, got 0; give the examples per step, e.g. Batches(size=256)
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral, Real
from typing import ClassVar

import torch
from torch import nn

__all__ = ["LR_SCHEDULES", "Batches", "Checkpointing", "Monitor", "Optimization"]

LR_SCHEDULES = (None, "cosine")
"""The admissible :attr:`Optimization.lr_schedule` values."""

OptimizerChoice = torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None
Callback = Callable[[int, float, nn.Module], bool | None]


def _int(owner: str, name: str, value: object, low: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or int(value) < low:
        raise ValueError(f"{owner}.{name} must be an int >= {low}, got {value!r}; {fix}")


def _real(owner: str, name: str, value: object, fix: str) -> float:
    """A finite real number (``bool`` refused), or an error naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}.{name} must be a real number, got {type(value).__name__}; {fix}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{owner}.{name} must be finite, got {value}; {fix}")
    return float(value)


def _flag(owner: str, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(
            f"{owner}.{name} must be True or False, got {value!r}; e.g. {owner}({name}=True)"
        )


@dataclass(frozen=True)
class Batches:
    r"""What each training step draws: ``size`` data rows :math:`x_1`, as many noise rows
    :math:`x_0 \sim \mathcal N(0, I)` and times :math:`t \sim \mathcal U[t_{\min}, t_{\max})`.

    Attributes:
        size: examples per step (at most the number of rows of tensor data).
        t_min: lower end of the time draws, in ``[0, t_max)``.
        t_max: upper end (exclusive) of the time draws, in ``(t_min, 1]``; e.g. ``1 - 1e-3`` for
            a VP path, whose conditional velocity is singular at ``t = 1``.
        minibatch_ot: re-pair :math:`x_0` with :math:`x_1` by an exact optimal assignment on each
            batch (within groups of equal labels for conditional data; Tong et al. 2023).
        seed: seeds the one generator (on the field's device) behind every random draw (data
            minibatches, :math:`t`, :math:`x_0`), so two runs from the same initial weights give
            identical loss histories and weights on CPU.
    """

    size: int = 256
    t_min: float = 0.0
    t_max: float = 1.0
    minibatch_ot: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        _int("Batches", "size", self.size, 1, "give the examples per step, e.g. Batches(size=256)")
        low = _real("Batches", "t_min", self.t_min, "e.g. Batches(t_min=0.0)")
        high = _real("Batches", "t_max", self.t_max, "e.g. Batches(t_max=1.0)")
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(
                f"Batches.t_min and Batches.t_max must satisfy 0 <= t_min < t_max <= 1, got "
                f"t_min={self.t_min}, t_max={self.t_max}; e.g. Batches(t_min=0.0, t_max=0.999)"
            )
        _flag("Batches", "minibatch_ot", self.minibatch_ot)
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise TypeError(f"Batches.seed must be an int, got {self.seed!r}; e.g. Batches(seed=0)")


@dataclass(frozen=True)
class Optimization:
    r"""How the field's parameters are updated.

    Attributes:
        optimizer: ``None`` (Adam), an optimizer instance over the field's parameters, or a
            factory ``optimizer(params) -> Optimizer``.
        lr: Adam's learning rate (default :attr:`DEFAULT_LR`). Only with ``optimizer=None``: an
            optimizer you pass carries its own, so giving both is refused.
        lr_schedule: ``None`` (constant) or ``"cosine"``: the learning rate of every parameter
            group decays as :math:`\tfrac12(1 + \cos(\pi k / \text{steps}))` over the run.
        max_grad_norm: clip the gradient norm to this value before each update (``None``: no
            clipping).
    """

    DEFAULT_LR: ClassVar[float] = 1e-3
    """Adam's learning rate when ``lr`` is not given."""

    optimizer: OptimizerChoice = None
    lr: float | None = None
    lr_schedule: str | None = None
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if not (self.optimizer is None or callable(self.optimizer)) and not isinstance(
            self.optimizer, torch.optim.Optimizer
        ):
            raise TypeError(
                "Optimization.optimizer must be None (Adam), an Optimizer or a factory "
                f"optimizer(params) -> Optimizer, got {type(self.optimizer).__name__}; e.g. "
                "Optimization(optimizer=lambda p: torch.optim.SGD(p, lr=0.1))"
            )
        if self.lr is not None:
            lr = _real("Optimization", "lr", self.lr, "e.g. Optimization(lr=1e-3)")
            if not lr > 0:
                raise ValueError(
                    f"Optimization.lr must be > 0, got {self.lr}; e.g. Optimization(lr=1e-3)"
                )
            if self.optimizer is not None:
                raise ValueError(
                    f"Optimization.lr={self.lr} applies to the default Adam only: the optimizer "
                    "you pass carries its own learning rate; set it there and leave lr out"
                )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"Optimization.lr_schedule must be one of {LR_SCHEDULES}, got "
                f"{self.lr_schedule!r}; e.g. Optimization(lr_schedule='cosine')"
            )
        if self.max_grad_norm is not None:
            fix = "e.g. Optimization(max_grad_norm=1.0), or None for no clipping"
            if not _real("Optimization", "max_grad_norm", self.max_grad_norm, fix) > 0:
                raise ValueError(
                    f"Optimization.max_grad_norm must be > 0 or None, got {self.max_grad_norm}; "
                    f"{fix}"
                )

    def build(
        self, params: list[nn.Parameter], steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The optimizer over ``params`` and the learning-rate scheduler of a ``steps`` run."""
        if self.optimizer is None:
            lr = self.DEFAULT_LR if self.lr is None else self.lr
            opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
        elif isinstance(self.optimizer, torch.optim.Optimizer):
            opt = self.optimizer
        else:
            opt = self.optimizer(params)
            if not isinstance(opt, torch.optim.Optimizer):
                raise TypeError(
                    "Optimization.optimizer(params) must return a torch.optim.Optimizer, got "
                    f"{type(opt).__name__}; e.g. lambda p: torch.optim.Adam(p, lr=1e-3)"
                )
        if self.lr_schedule != "cosine":
            return opt, None
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
        )
        return opt, scheduler


@dataclass(frozen=True)
class Monitor:
    """What the caller sees while :func:`~cnftools.training.train_cfm` runs.

    Attributes:
        progress: show a tqdm progress bar with the running loss.
        callback: ``callback(step, loss, field)`` every ``every`` steps and at the last step;
            return ``True`` to stop early.
        every: how often to call ``callback`` and refresh the progress bar (in steps).
    """

    progress: bool = False
    callback: Callback | None = None
    every: int = 100

    def __post_init__(self) -> None:
        _flag("Monitor", "progress", self.progress)
        if self.callback is not None and not callable(self.callback):
            raise TypeError(
                f"Monitor.callback must be callable or None, got {type(self.callback).__name__}; "
                "e.g. Monitor(callback=lambda step, loss, field: loss < 0.1)"
            )
        _int("Monitor", "every", self.every, 1, "e.g. Monitor(every=100)")


@dataclass(frozen=True)
class Checkpointing:
    """Where a run's checkpoints go and how a run resumes.

    :func:`~cnftools.training.train_cfm` saves the run to ``file`` every ``every`` steps and when
    it ends (its last step, or a callback that stops it): an ordinary cnftools checkpoint (the
    field, the path, the optimizer; :func:`~cnftools.load_checkpoint` and ``cnftools nll
    --model`` read it) whose ``extra["train_cfm"]`` holds the run's state (step, generator,
    position in the data, learning-rate schedule, loss history). Saves are atomic: a run killed
    at any moment leaves the previous checkpoint.

    With ``resume=True`` and an existing ``file``, the run continues from it: on CPU the resumed
    run draws the same batches and gives bit-identical losses and weights to a run that was
    never interrupted. The settings must be the run's own (batches, optimization, the data's
    shape, the path, and ``steps`` under a learning-rate schedule); a difference is refused
    with the setting named. ``steps`` may grow for a constant learning rate. A run stopped by
    its callback is finished: resuming it returns it as it is.

    Attributes:
        file: the checkpoint file (its folder must exist and be writable).
        every: save every this many steps (and at the end).
        resume: continue from ``file`` when it exists (``False``: start afresh and overwrite it).
    """

    file: str | os.PathLike[str]
    every: int = 1000
    resume: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.file, str | os.PathLike):
            raise TypeError(
                f"Checkpointing.file must be a str or a path, got {type(self.file).__name__}; "
                'e.g. Checkpointing("run.pt")'
            )
        _int("Checkpointing", "every", self.every, 1, 'e.g. Checkpointing("run.pt", every=500)')
        _flag("Checkpointing", "resume", self.resume)

    def check_writable(self) -> None:
        """Refuse, before any work, a file that is a folder or whose folder cannot be written."""
        file = os.fspath(self.file)
        folder = os.path.dirname(os.path.abspath(file))
        if os.path.isdir(file):
            raise ValueError(f"Checkpointing.file {file!r} is a folder; give a file name")
        if not os.path.isdir(folder):
            raise ValueError(
                f"Checkpointing.file {file!r}: its folder {folder!r} does not exist; create it "
                "first"
            )
        if not os.access(folder, os.W_OK):
            raise ValueError(
                f"Checkpointing.file {file!r}: its folder {folder!r} is not writable; choose "
                "another place"
            )
