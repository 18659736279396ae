r"""The conditional flow-matching training loop and minibatch-OT pairing.

:func:`train_cfm` minimises :func:`~cnftools.training.objectives.cfm_loss` (theory §6) for any
Gaussian path and any ``nn.Module`` field ``v(x, t)`` with Adam (or an optimizer you pass). All
randomness (data minibatches, :math:`t`, :math:`x_0`) comes from one generator seeded with
``seed``, so two runs from the same initial weights give identical loss histories and weights on
CPU.

With ``minibatch_ot=True`` each batch of noise :math:`x_0` is re-paired with the data batch
:math:`x_1` by an exact optimal assignment for the cost :math:`\lVert x_0^i - x_1^j\rVert^2`
(:func:`minibatch_ot_pairing`), which straightens the learned paths (Tong et al. 2023).

References:
    Lipman et al. (2022), arXiv:2210.02747; Tong et al., Improving and generalizing flow-based
    generative models with minibatch optimal transport (2023), arXiv:2302.00482.

Theory sections cited here (pages under ``docs/theory/``):

- §6: ``docs/theory/flow-matching.md#flow-matching-objectives``
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import pandas as pd
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from tqdm.auto import tqdm

from cnftools._checks import check_batched, check_int, check_same_shape
from cnftools._resources import with_thread_policy
from cnftools.fields import Extras, check_extras, select_extras
from cnftools.paths import GaussianPath
from cnftools.training.objectives import cfm_loss

__all__ = ["TrainResult", "minibatch_ot_pairing", "train_cfm"]

DataSource = Tensor | Callable[[int, torch.Generator], Tensor | tuple[Tensor, Mapping[str, object]]]


@dataclass
class TrainResult:
    """What :func:`train_cfm` returns.

    Attributes:
        field: the trained field (the same object that was passed in).
        history: a DataFrame with one row per step: ``step`` (1-based), ``loss`` (the minibatch
            CFM loss before that step's update), ``lr``, ``seconds`` (wall time since the start).
        optimizer: the optimizer, e.g. to save its state for resuming.
        seconds: total wall time.
    """

    field: nn.Module
    history: pd.DataFrame
    optimizer: torch.optim.Optimizer
    seconds: float


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
        raise ValueError(f"{name} returned {x1.shape[0]} rows, expected batch_size={batch_size}")
    extras = {k: _per_row(e, batch_size, device, dtype) for k, e in extras.items()}
    return x1.to(device=device, dtype=dtype), extras


def _batches(
    data: DataSource,
    extras: dict,
    batch_size: int,
    generator: torch.Generator,
    device: torch.device,
    dtype: torch.dtype,
) -> Iterator[tuple[Tensor, dict]]:
    """Minibatches ``(x1, extras)``: epochs of a random permutation (tensor data; per-row extras
    indexed by the same rows) or calls to a sampler."""
    if callable(data) and not isinstance(data, Tensor):
        while True:
            yield _sampled(data(batch_size, generator), batch_size, device, dtype)
    assert isinstance(data, Tensor)
    n = data.shape[0]
    while True:
        perm = torch.randperm(n, generator=generator, device=generator.device)
        for start in range(0, n - batch_size + 1, batch_size):
            index = perm[start : start + batch_size].to(data.device)
            rows = {
                k: _per_row(e, batch_size, device, dtype)
                for k, e in select_extras(extras, n, index).items()
            }
            yield data[index].to(device=device, dtype=dtype), rows


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
                "minibatch_ot=True pairs noise with data within groups of equal labels; "
                f"extras[{key!r}] is {value.dtype} (a continuous condition), so there are no such "
                "groups, and pairing across conditions would bias the noise each one sees: "
                "use minibatch_ot=False"
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


@with_thread_policy
def train_cfm(
    field: nn.Module,
    path: GaussianPath,
    data: DataSource,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
    seed: int = 0,
    minibatch_ot: bool = False,
    t_min: float = 0.0,
    t_max: float = 1.0,
    max_grad_norm: float | None = None,
    lr_schedule: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = False,
    callback: Callable[[int, float, nn.Module], bool | None] | None = None,
    callback_every: int = 100,
    extras: Extras | None = None,
) -> TrainResult:
    r"""Train a velocity field with conditional flow matching (theory §6).

    Each step draws a data batch :math:`x_1`, noise :math:`x_0 \sim \mathcal N(0, I)` (re-paired
    by minibatch OT when ``minibatch_ot``), times :math:`t \sim \mathcal U[t_{\min}, t_{\max})`,
    and takes one optimizer step on ``cfm_loss(field, path, x1, t, x0, extras=...)``.

    Conditional training (class labels, context vectors; docs/guide/conditional.md): pass
    ``extras={"y": labels}`` with tensor ``data``. Every tensor in ``extras`` whose first dimension
    is ``N`` (the number of data rows) holds one value per row and is indexed with the same
    minibatch rows as ``data`` (so ``x1[b]`` keeps its label); anything else is passed as is on
    every step. The field is called as ``field(x, t, **extras)``. Minibatch OT re-orders the noise
    :math:`x_0`, never :math:`x_1`, so the pairs (:math:`x_1`, label) are kept, and it pairs only
    within groups of rows with equal labels: pairing across classes would hand each class the
    noise nearest to it, so its noise would no longer be :math:`\mathcal N(0, I)` and the learned
    conditional flows would start from the wrong distribution. Continuous (floating) per-row
    conditions admit no such groups and refuse ``minibatch_ot=True``. A sampler gives
    conditioning by returning ``(x1, extras)`` instead of ``x1``.

    Threads: cnftools' thread policy (docs/guide/likelihood.md#threads): a ``cnftools.threads(n)``
    block, else ``CNFTOOLS_THREADS``, else the idle cores of the machine (1 when it is busy);
    the caller's torch thread count is restored afterwards.

    Args:
        field: an ``nn.Module`` with ``forward(x, t)`` (e.g. :class:`~cnftools.MLPField`); it is
            moved to ``device``/``dtype`` when those are given, and trained in place.
        path: the conditional probability path (OT, VE, VP or user-defined).
        data: a tensor ``(N, *event)`` (shuffled into epochs without replacement; the last partial
            batch of each epoch is dropped) or a sampler ``data(n, generator) -> (n, *event)``
            (e.g. ``eight_gaussians().sample``), which may also return ``(x1, extras)`` with
            per-row tensors of first dimension ``n``. Batches are moved to the field's
            device/dtype (floating extras too; integer labels keep their dtype).
        steps: number of optimizer steps.
        batch_size: examples per step (at most ``N`` for tensor data).
        lr: Adam learning rate (ignored when ``optimizer`` is an instance).
        optimizer: an optimizer instance over ``field``'s parameters, or a factory
            ``optimizer(params) -> Optimizer``; default Adam(lr).
        seed: seeds the one generator (on the field's device) behind every random draw.
        minibatch_ot: pair :math:`x_0` and :math:`x_1` by exact OT on each batch.
        t_min: lower end of the time draws.
        t_max: upper end (exclusive) of the time draws; e.g. ``1 - 1e-3`` for VP.
        max_grad_norm: clip the gradient norm to this value (``None``: no clipping).
        lr_schedule: ``None`` (constant) or ``"cosine"``: the learning rate of every parameter
            group decays as :math:`\tfrac12(1 + \cos(\pi k / \text{steps}))` over the run.
        device: where to train (default: the field's parameters' device).
        dtype: training dtype (default: the field's parameters' dtype).
        progress: show a tqdm progress bar with the running loss.
        callback: ``callback(step, loss, field)`` every ``callback_every`` steps and at the last
            step; return ``True`` to stop early.
        callback_every: how often to call ``callback`` (and refresh the progress bar).
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
        ...     v, cnftools.OTPath(0.05), eight_gaussians().sample, steps=20, batch_size=64
        ... )
        >>> list(result.history.columns), len(result.history)
        (['step', 'loss', 'lr', 'seconds'], 20)
        >>> labels = torch.randint(0, 3, (100,))
        >>> c = cnftools.MLPField(2, hidden=(16,), num_classes=3)
        >>> x = torch.randn(100, 2) + 3 * labels[:, None]
        >>> r = cnftools.train_cfm(
        ...     c, cnftools.OTPath(0.05), x, extras={"y": labels}, steps=5, batch_size=20
        ... )
        >>> len(r.history)
        5

    References:
        Lipman et al. (2022), arXiv:2210.02747, Algorithm 1; Tong et al. (2023), Algorithm 2.
    """
    if not isinstance(field, nn.Module):
        raise TypeError(
            f"field must be a torch.nn.Module with forward(x, t), got {type(field).__name__}"
        )
    if not isinstance(path, GaussianPath):
        raise TypeError(f"path must be a cnftools GaussianPath, got {type(path).__name__}")
    for name, value, low in (
        ("steps", steps, 1),
        ("batch_size", batch_size, 1),
        ("callback_every", callback_every, 1),
    ):
        check_int(name, value, low=low)
    extras = check_extras(extras)
    if isinstance(data, Tensor):
        check_batched("data", data)
        if batch_size > data.shape[0]:
            raise ValueError(f"batch_size={batch_size} exceeds the {data.shape[0]} data points")
    elif not callable(data):
        raise TypeError("data must be a tensor (N, *event) or a sampler data(n, generator)")
    elif extras:
        raise ValueError(
            "extras= goes with tensor data; a sampler gives its conditioning by returning "
            "(x1, extras) from data(n, generator)"
        )
    if isinstance(data, Tensor):
        for key, value in extras.items():
            per_row = isinstance(value, Tensor) and value.dim() >= 1
            if per_row and value.shape[0] == data.shape[0] and value.device != data.device:
                raise ValueError(
                    f"extras[{key!r}] is on {value.device} but data is on {data.device}; "
                    "per-row extras are indexed with the data's rows: put them on one device"
                )
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
    params = [p for p in field.parameters() if p.requires_grad]
    if not params:
        raise ValueError("field has no trainable parameters")
    if device is not None or dtype is not None:
        field.to(device=device, dtype=dtype)
    device = params[0].device
    dtype = params[0].dtype
    if optimizer is None:
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr)
    elif isinstance(optimizer, torch.optim.Optimizer):
        opt = optimizer
    elif callable(optimizer):
        opt = optimizer(params)
    else:
        raise TypeError("optimizer must be an Optimizer, a factory optimizer(params) or None")

    if lr_schedule not in (None, "cosine"):
        raise ValueError(f"lr_schedule must be None or 'cosine', got {lr_schedule!r}")
    scheduler = None
    if lr_schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, steps) / steps))
        )
    generator = torch.Generator(device=device).manual_seed(int(seed))
    batches = _batches(data, extras, batch_size, generator, device, dtype)
    bar = None
    if progress:
        bar = tqdm(total=steps, desc="train_cfm")
    losses: list[Tensor] = []
    lrs: list[float] = []
    seconds: list[float] = []
    start = time.perf_counter()
    field.train()
    try:
        for step in range(1, steps + 1):
            x1, batch_extras = next(batches)
            x0 = torch.randn(x1.shape, generator=generator, dtype=dtype, device=device)
            if minibatch_ot:
                # permutes x0 only, within groups of equal labels: (x1, extras) stay paired
                x0 = _paired_within_labels(x0, x1, batch_extras)
            try:
                loss = cfm_loss(
                    field,
                    path,
                    x1,
                    None,
                    x0,
                    generator,
                    t_min=t_min,
                    t_max=t_max,
                    extras=batch_extras,
                )
            except ValueError as error:
                raise ValueError(f"train_cfm, step {step}: {error}") from error
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            losses.append(loss.detach())
            lrs.append(float(opt.param_groups[0]["lr"]))
            if scheduler is not None:
                scheduler.step()
            seconds.append(time.perf_counter() - start)
            report = step % callback_every == 0 or step == steps
            if report:
                value = float(loss.detach())
                if bar is not None:
                    bar.set_postfix(loss=f"{value:.4g}")
                    bar.update(step - bar.n)
                if callback is not None and callback(step, value, field):
                    break
    finally:
        if bar is not None:
            bar.close()
    history = pd.DataFrame(
        {
            "step": range(1, len(losses) + 1),
            "loss": torch.stack(losses).cpu().double().numpy() if losses else [],
            "lr": lrs,
            "seconds": seconds,
        }
    )
    return TrainResult(field, history, opt, time.perf_counter() - start)
