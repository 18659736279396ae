r"""The conditional flow-matching training loop and minibatch-OT pairing.

:func:`train_cfm` minimises :func:`~cnftools.training.objectives.cfm_loss` (theory §6) for any
Gaussian path and any ``nn.Module`` field ``v(x, t)`` with Adam (or an optimizer you pass). All
randomness (data minibatches, :math:`t`, :math:`x_0`) comes from one generator seeded with
``Batches.seed``, so two runs from the same initial weights give identical loss histories and
weights on CPU. Its options come grouped in the small frozen objects of
:mod:`~cnftools.training.options` (:class:`~cnftools.training.options.Batches`,
:class:`~cnftools.training.options.Optimization`, :class:`~cnftools.training.options.Monitor`).

With ``Batches(minibatch_ot=True)`` each batch of noise :math:`x_0` is re-paired with the data batch
:math:`x_1` by an exact optimal assignment for the cost :math:`\lVert x_0^i - x_1^j\rVert^2`
(:func:`minibatch_ot_pairing`), which straightens the learned paths (Tong et al. 2023).

References:
    Lipman et al. (2022), arXiv:2210.02747; Tong et al., Improving and generalizing flow-based
    generative models with minibatch optimal transport (2023), arXiv:2302.00482.

Theory sections cited here (pages under ``docs/theory/``):

- §6: ``docs/theory/flow-matching.md#flow-matching-objectives``
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from tqdm.auto import tqdm

from cnftools._checks import check_batched, check_int, check_same_shape
from cnftools._resources import with_thread_policy
from cnftools.fields import Extras, check_extras
from cnftools.paths import GaussianPath
from cnftools.training.draws import DataSource, Draws
from cnftools.training.objectives import cfm_loss
from cnftools.training.options import Batches, Checkpointing, Monitor, Optimization
from cnftools.training.resume import Run, run_settings

__all__ = ["TrainResult", "minibatch_ot_pairing", "train_cfm"]


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_cfm` returns.

    Attributes:
        field: the trained field (the same object that was passed in).
        history: a DataFrame with one row per step: ``step`` (1-based), ``loss`` (the minibatch
            CFM loss before that step's update), ``lr``, ``seconds`` (wall time since the start).
            A resumed run's history starts at its first step, earlier sessions included.
        optimizer: the optimizer (its state is in the run's checkpoints, see
            :class:`~cnftools.training.Checkpointing`).
        seconds: total wall time of the run (earlier sessions of a resumed run included).
        resumed_from: the step the run was resumed from (0: started afresh).
    """

    field: nn.Module
    history: pd.DataFrame
    optimizer: torch.optim.Optimizer
    seconds: float
    resumed_from: int = 0


def minibatch_ot_pairing(x0: Tensor, x1: Tensor) -> Tensor:
    r"""Reorder ``x0`` so that ``(x0[i], x1[i])`` is an exact optimal assignment.

    Solves :math:`\min_\pi \sum_i \lVert x_0^{\pi(i)} - x_1^i\rVert^2` over permutations with
    :func:`scipy.optimize.linear_sum_assignment` (Hungarian-type, :math:`O(B^3)`; the cost matrix is
    computed on ``x0``'s device and copied to the CPU).

    Args:
        x0: noise, shape ``(B, *event)``.
        x1: data, shape ``(B, *event)``.

    Returns:
        ``x0`` permuted along the batch, shape ``(B, *event)``.

    Example:
        >>> import torch
        >>> x1 = torch.tensor([[0.0], [10.0]])
        >>> minibatch_ot_pairing(torch.tensor([[9.0], [1.0]]), x1)
        tensor([[1.],
                [9.]])

    References:
        Tong et al. (2023), arXiv:2302.00482, §3.2 (OT-CFM).
    """
    x0 = check_batched("x0", x0)
    x1 = check_batched("x1", x1)
    check_same_shape("x0", x0, "x1", x1)
    batch = x0.shape[0]
    cost = torch.cdist(x0.reshape(batch, -1), x1.reshape(batch, -1)) ** 2
    rows, cols = linear_sum_assignment(cost.detach().cpu().double().numpy())
    order = torch.empty(batch, dtype=torch.long)
    order[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return x0[order.to(x0.device)]


def _paired_within_labels(x0: Tensor, x1: Tensor, extras: dict) -> Tensor:
    r"""Minibatch OT of ``x0`` to ``x1`` within each group of rows whose per-row extras agree.

    Pairing across labels would bias the noise each class sees (OT sends a class the noise nearest
    to it, so :math:`x_0 \mid y` would no longer be :math:`\mathcal N(0, I)`); within a group the
    noise is still an i.i.d. draw, re-ordered.
    """
    batch = x1.shape[0]
    keys = []
    for key, value in extras.items():
        if not (isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch):
            continue
        if value.is_floating_point() or value.is_complex():
            raise ValueError(
                "Batches(minibatch_ot=True) pairs noise with data within groups of equal labels; "
                f"extras[{key!r}] is {value.dtype} (a continuous condition), so there are no such "
                "groups, and pairing across conditions would bias the noise each one sees: "
                "use Batches(minibatch_ot=False)"
            )
        keys.append(value.reshape(batch, -1).long())
    if not keys:
        return minibatch_ot_pairing(x0, x1)
    groups = torch.unique(torch.cat(keys, dim=1), dim=0, return_inverse=True)[1]
    paired = x0.clone()
    for group in torch.unique(groups):
        rows = (groups == group).nonzero().flatten()
        paired[rows] = minibatch_ot_pairing(x0[rows], x1[rows])
    return paired


def _check_inputs(
    field: object, path: object, data: object, steps: object, options: tuple, extras: object
) -> tuple[list[nn.Parameter], Extras]:
    """Every check of :func:`train_cfm`'s arguments, before any work; the trainable parameters
    and the checked extras."""
    if not isinstance(field, nn.Module):
        raise TypeError(
            f"field must be a torch.nn.Module with forward(x, t), got {type(field).__name__}"
        )
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a cnftools GaussianPath, got {type(path).__name__}")
    check_int("steps", steps, low=1)
    for name, value, kind in zip(_OPTION_NAMES, options, _OPTIONS, strict=True):
        if not isinstance(value, kind) and not (kind is Checkpointing and value is None):
            raise TypeError(
                f"{name} must be a cnftools.{kind.__name__}, got {type(value).__name__}; e.g. "
                f"{name}=cnftools.{kind.__name__}(...)"
            )
    batch_size = options[0].size
    extras = check_extras(extras)
    if isinstance(data, Tensor):
        check_batched("data", data)
        if batch_size > data.shape[0]:
            raise ValueError(
                f"batches.size={batch_size} exceeds the {data.shape[0]} data points; "
                "use a smaller Batches(size=...)"
            )
        for key, value in extras.items():
            per_row = isinstance(value, Tensor) and value.dim() >= 1
            if per_row and value.shape[0] == data.shape[0] and value.device != data.device:
                raise ValueError(
                    f"extras[{key!r}] is on {value.device} but data is on {data.device}; "
                    "per-row extras are indexed with the data's rows: put them on one device"
                )
    elif not callable(data):
        raise TypeError("data must be a tensor (N, *event) or a sampler data(n, generator)")
    elif extras:
        raise ValueError(
            "extras= goes with tensor data; a sampler gives its conditioning by returning "
            "(x1, extras) from data(n, generator)"
        )
    params = [p for p in field.parameters() if p.requires_grad]
    if not params:
        raise ValueError("field has no trainable parameters")
    if options[3] is not None:
        options[3].check_writable()
    return params, extras


_OPTION_NAMES = ("batches", "optimization", "monitor", "checkpoints")
_OPTIONS = (Batches, Optimization, Monitor, Checkpointing)


@with_thread_policy
def train_cfm(
    field: nn.Module,
    path: GaussianPath,
    data: DataSource,
    *,
    steps: int,
    batches: Batches = Batches(),
    optimization: Optimization = Optimization(),
    monitor: Monitor = Monitor(),
    checkpoints: Checkpointing | None = None,
    extras: Extras | None = None,
) -> TrainResult:
    r"""Train a velocity field with conditional flow matching (theory §6).

    Each step draws a data batch :math:`x_1`, noise :math:`x_0 \sim \mathcal N(0, I)` (re-paired
    by minibatch OT when ``batches.minibatch_ot``), times :math:`t \sim \mathcal U[t_{\min},
    t_{\max})`, and takes one optimizer step on ``cfm_loss(field, path, x1, t, x0, extras=...)``.

    The field trains where its parameters are, in their dtype: move it first
    (``field.to(device, dtype)``); the batches follow it.

    Conditional training (class labels, context vectors; docs/guide/conditional.md): pass
    ``extras={"y": labels}`` with tensor ``data``. Every tensor in ``extras`` whose first dimension
    is ``N`` (the number of data rows) holds one value per row and is indexed with the same
    minibatch rows as ``data`` (so ``x1[b]`` keeps its label); anything else is passed as is on
    every step. The field is called as ``field(x, t, **extras)``. Minibatch OT re-orders the noise
    :math:`x_0`, never :math:`x_1`, so the pairs (:math:`x_1`, label) are kept, and it pairs only
    within groups of rows with equal labels: pairing across classes would hand each class the
    noise nearest to it, so its noise would no longer be :math:`\mathcal N(0, I)` and the learned
    conditional flows would start from the wrong distribution. Continuous (floating) per-row
    conditions admit no such groups and refuse minibatch OT. A sampler gives conditioning by
    returning ``(x1, extras)`` instead of ``x1``.

    Threads: cnftools' thread policy (docs/guide/likelihood.md#threads): a ``cnftools.threads(n)``
    block, else ``CNFTOOLS_THREADS``, else the idle cores of the machine (1 when it is busy);
    the caller's torch thread count is restored afterwards.

    Args:
        field: an ``nn.Module`` with ``forward(x, t)`` (e.g. :class:`~cnftools.MLPField`), trained
            in place on its parameters' device and dtype.
        path: the conditional probability path (OT, VE, VP or user-defined).
        data: a tensor ``(N, *event)`` (shuffled into epochs without replacement; the last partial
            batch of each epoch is dropped) or a sampler ``data(n, generator) -> (n, *event)``
            (e.g. ``eight_gaussians().sample``), which may also return ``(x1, extras)`` with
            per-row tensors of first dimension ``n``. Batches are moved to the field's
            device/dtype (floating extras too; integer labels keep their dtype).
        steps: number of optimizer steps.
        batches: what each step draws (:class:`~cnftools.training.Batches`: size, time range,
            minibatch OT, seed).
        optimization: how the parameters are updated (:class:`~cnftools.training.Optimization`:
            optimizer, learning rate and schedule, gradient clipping).
        monitor: progress bar and callback (:class:`~cnftools.training.Monitor`).
        checkpoints: where the run is saved every few steps and how it resumes
            (:class:`~cnftools.training.Checkpointing`); ``None``: no checkpoints.
        extras: keyword arguments for the field, e.g. ``{"y": labels}`` with ``labels`` of shape
            ``(N,)`` for tensor ``data`` (only with tensor data; a sampler returns its own).

    Returns:
        A :class:`TrainResult` with the loss history as a DataFrame.

    Raises:
        ValueError: bad arguments, a field whose output shape differs from the data's, or a
            non-finite loss (with the step number).

    Example:
        >>> import torch, cnftools
        >>> from cnftools.data import eight_gaussians
        >>> _ = torch.manual_seed(0)
        >>> v = cnftools.MLPField(2, hidden=(32, 32))
        >>> result = cnftools.train_cfm(
        ...     v,
        ...     cnftools.OTPath(0.05),
        ...     eight_gaussians().sample,
        ...     steps=20,
        ...     batches=cnftools.Batches(size=64),
        ... )
        >>> list(result.history.columns), len(result.history)
        (['step', 'loss', 'lr', 'seconds'], 20)
        >>> labels = torch.randint(0, 3, (100,))
        >>> c = cnftools.MLPField(2, hidden=(16,), num_classes=3)
        >>> x = torch.randn(100, 2) + 3 * labels[:, None]
        >>> r = cnftools.train_cfm(
        ...     c,
        ...     cnftools.OTPath(0.05),
        ...     x,
        ...     extras={"y": labels},
        ...     steps=5,
        ...     batches=cnftools.Batches(size=20),
        ... )
        >>> len(r.history)
        5

    References:
        Lipman et al. (2022), arXiv:2210.02747, Algorithm 1; Tong et al. (2023), Algorithm 2.
    """
    options = (batches, optimization, monitor, checkpoints)
    params, extras = _check_inputs(field, path, data, steps, options, extras)
    device, dtype = params[0].device, params[0].dtype
    opt, scheduler = optimization.build(params, steps)
    generator = torch.Generator(device=device).manual_seed(int(batches.seed))
    draws = Draws(data, extras, batches.size, generator, device, dtype)
    settings = run_settings(steps, batches, optimization, opt, data, path)
    run = Run(field, path, opt, scheduler, generator, draws, settings)
    if checkpoints is not None and checkpoints.resume and os.path.exists(checkpoints.file):
        run.restore(checkpoints.file, device)
    resumed_from = run.step
    bar = None
    if monitor.progress:
        bar = tqdm(total=steps, initial=min(run.step, steps), desc="train_cfm")
    field.train()
    try:
        while run.step < steps and not run.stopped:
            step = run.step + 1
            loss = _step(run, params, batches, optimization, step)
            run.step = step
            if step % monitor.every == 0 or step == steps:
                run.stopped = _report(step, loss, field, bar, monitor)
            if checkpoints is not None and (
                step % checkpoints.every == 0 or step == steps or run.stopped
            ):
                run.save(checkpoints.file)
    finally:
        if bar is not None:
            bar.close()
    history = run.history
    return TrainResult(field, history.frame(), opt, history.elapsed(), resumed_from)


def _step(
    run: Run, params: list, batches: Batches, optimization: Optimization, step: int
) -> Tensor:
    """One optimizer step of ``run``: draw, pair, loss, update, record; returns the loss."""
    x1, extras = next(run.draws)
    generator = run.generator
    x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
    if batches.minibatch_ot:
        # permutes x0 only, within groups of equal labels: (x1, extras) stay paired
        x0 = _paired_within_labels(x0, x1, extras)
    try:
        loss = cfm_loss(
            run.field,
            run.path,
            x1,
            None,
            x0,
            generator,
            t_min=batches.t_min,
            t_max=batches.t_max,
            extras=extras,
        )
    except ValueError as error:
        raise ValueError(f"train_cfm, step {step}: {error}") from error
    opt = run.optimizer
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if optimization.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, optimization.max_grad_norm)
    opt.step()
    run.history.record(loss, opt)
    if run.scheduler is not None:
        run.scheduler.step()
    run.history.tick()
    return loss


def _report(step: int, loss: Tensor, field: nn.Module, bar: Any, monitor: Monitor) -> bool:
    """Refresh the progress bar and call the callback; whether the callback asks to stop."""
    value = float(loss.detach())
    if bar is not None:
        bar.set_postfix(loss=f"{value:.4g}")
        bar.update(step - bar.n)
    return monitor.callback is not None and bool(monitor.callback(step, value, field))
