r"""The conditional flow-matching training loop, minibatch-OT pairing and checkpoints.

:func:`train_cfm` minimises :func:`~cnftools.objectives.cfm_loss` (THEORY §6) for any Gaussian path
and any ``nn.Module`` field ``v(x, t)`` with Adam (or an optimizer you pass). All randomness (data
minibatches, :math:`t`, :math:`x_0`) comes from one generator seeded with ``seed``, so two runs
from the same initial weights give identical loss histories and weights on CPU.

With ``minibatch_ot=True`` each batch of noise :math:`x_0` is re-paired with the data batch
:math:`x_1` by an exact optimal assignment for the cost :math:`\lVert x_0^i - x_1^j\rVert^2`
(:func:`minibatch_ot_pairing`), which straightens the learned paths (Tong et al. 2023).

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) hold only tensors and plain Python
values — the ``state_dict``, the model's ``config()`` dict and the path's description — and are
read back with ``torch.load(weights_only=True)``: no pickled code is ever executed. A save is
atomic (a temporary file in the same directory, flushed and fsynced, then renamed over the
target), so a process killed mid-save leaves the previous checkpoint intact; a load checks the
file, its keys and the model's configuration against the stored shapes before building anything.

References:
    Lipman et al. (2022), arXiv:2210.02747; Tong et al., Improving and generalizing flow-based
    generative models with minibatch optimal transport (2023), arXiv:2302.00482.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from cnftools._checks import check_batched, check_same_shape
from cnftools.fields import Extras, check_extras, select_extras
from cnftools.models import MLPField
from cnftools.objectives import cfm_loss
from cnftools.paths import GaussianPath, OTPath, VEPath, VPPath

__all__ = [
    "Checkpoint",
    "TrainResult",
    "describe_path",
    "load_checkpoint",
    "minibatch_ot_pairing",
    "path_from_description",
    "save_checkpoint",
    "train_cfm",
]

CHECKPOINT_FORMAT = "cnftools.checkpoint"
CHECKPOINT_VERSION = 1

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
    from scipy.optimize import linear_sum_assignment

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
    r"""Train a velocity field with conditional flow matching (THEORY §6).

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
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
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
        from tqdm.auto import tqdm

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


# ----------------------------------------------------------------------------------------------
def describe_path(path: GaussianPath | None) -> dict[str, Any] | None:
    """A plain-dict description of a built-in path, e.g. ``{"kind": "ot", "sigma_min": 0.1}``.

    User-defined paths are described as ``{"kind": "custom", "repr": repr(path)}`` (their
    callables cannot be stored safely; rebuild them in code).

    Example:
        >>> import cnftools
        >>> describe_path(cnftools.VPPath())
        {'kind': 'vp', 'beta_min': 0.1, 'beta_max': 20.0}
    """
    if path is None:
        return None
    if type(path) is OTPath:
        return {"kind": "ot", "sigma_min": path.sigma_min}
    if type(path) is VEPath:
        return {"kind": "ve", "sigma_min": path.sigma_min, "sigma_max": path.sigma_max}
    if type(path) is VPPath:
        return {"kind": "vp", "beta_min": path.beta_min, "beta_max": path.beta_max}
    if isinstance(path, GaussianPath):
        return {"kind": "custom", "repr": repr(path)}
    raise TypeError(f"path must be a cnftools GaussianPath or None, got {type(path).__name__}")


def path_from_description(description: Mapping[str, Any] | None) -> GaussianPath | None:
    """Rebuild a path from :func:`describe_path`'s dict; ``None`` for ``None`` or a custom path."""
    if description is None:
        return None
    kind = description.get("kind")
    args = {k: v for k, v in description.items() if k != "kind"}
    if kind == "ot":
        return OTPath(**args)
    if kind == "ve":
        return VEPath(**args)
    if kind == "vp":
        return VPPath(**args)
    if kind == "custom":
        return None
    raise ValueError(f"unknown path description {dict(description)!r}")


@dataclass
class Checkpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        field: the model with its weights loaded (in the stored dtype, on ``map_location``).
        path: the probability path rebuilt from its description (``None`` if none was stored or
            it was user-defined; see ``path_description``).
        path_description: the stored description dict, or ``None``.
        extra: the ``extra`` dict given to :func:`save_checkpoint` (``{}`` if none).
        optimizer_state: the optimizer's ``state_dict`` if one was saved, else ``None``.
    """

    field: nn.Module
    path: GaussianPath | None
    path_description: dict[str, Any] | None
    extra: dict[str, Any]
    optimizer_state: dict[str, Any] | None


_PLAIN_SCALARS = (bool, int, float, str)


def _to_plain(name: str, value: object) -> object:
    """``value`` as something ``torch.load(weights_only=True)`` reads back, or a ``TypeError``.

    NumPy scalars become Python numbers and NumPy arrays become tensors (both are common in
    ``extra``: ``np.float64`` is even a ``float`` subclass, which pickles as NumPy and then fails
    to load). Anything else that is not a tensor, a plain scalar, ``None``, a ``torch.dtype``,
    a list, a tuple or a dict with ``str``/``int`` keys is refused here, at save time.
    """
    if value is None or type(value) in _PLAIN_SCALARS or isinstance(value, torch.dtype):
        return value
    if isinstance(value, Tensor):
        if type(value) not in (Tensor, nn.Parameter):
            raise TypeError(
                f"{name} is a tensor subclass {type(value).__name__}; store a plain tensor"
            )
        return value
    if isinstance(value, np.generic) and not isinstance(value, np.void | np.object_):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype != object:
        return torch.from_numpy(np.array(value, copy=True))
    if type(value) in (list, tuple):
        items = [_to_plain(f"{name}[{i}]", item) for i, item in enumerate(value)]  # type: ignore[attr-defined]
        return items if type(value) is list else tuple(items)
    if type(value) is dict:
        out = {}
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) not in (str, int):
                raise TypeError(f"{name} has a key of type {type(key).__name__}; use str keys")
            out[key] = _to_plain(f"{name}[{key!r}]", item)
        return out
    raise TypeError(
        f"{name} is a {type(value).__name__}: checkpoints hold only tensors, numbers, strings, "
        "bools, None, lists, tuples and dicts (NumPy scalars and arrays are converted; for a "
        "DataFrame use DataFrame.to_dict('list'))"
    )


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX); a no-op where directories cannot be opened."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # Windows: the rename is as durable as the platform makes it
        return
    try:
        handle = os.open(directory, os.O_RDONLY | flags)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _write_atomically(payload: dict[str, Any], file: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file next to ``file``, fsync it, rename it over ``file``.

    A reader (or a process restarted after a crash) sees either the previous file or the complete
    new one, never a partial write: ``os.replace`` is atomic on POSIX and Windows within one
    directory. A killed process can leave a ``.<name>.<pid>.<random>.tmp`` file behind.
    """
    target = os.path.abspath(os.fspath(file))
    directory, base = os.path.split(target)
    if os.path.isdir(target):
        raise IsADirectoryError(f"checkpoint file {os.fspath(file)!r} is a directory")
    temporary = os.path.join(directory, f".{base}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, as for a plain open().
    handle = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
    )
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(payload, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def save_checkpoint(
    file: str | os.PathLike[str],
    field: nn.Module,
    path: GaussianPath | None = None,
    *,
    extra: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Save a field's weights, its configuration and the path's description.

    The file holds ``{"format", "version", "model": {"class", "config"}, "state_dict", "path",
    "extra", "optimizer"}``: tensors and plain values only, readable with
    ``torch.load(file, weights_only=True)``.

    The write is atomic: the payload goes to a temporary file in the same directory, is flushed
    and fsynced, and is renamed over ``file`` (then the directory is fsynced where the platform
    allows). A process killed at any moment leaves either the previous checkpoint or the new one,
    both loadable. Everything saved loads back: NumPy scalars and arrays in ``extra`` are stored
    as Python numbers and tensors, and anything ``torch.load(weights_only=True)`` could not read
    is refused here with a ``TypeError``.

    Args:
        file: where to write (its directory must exist and be writable).
        field: an ``nn.Module``. Its ``config()`` (if it has one, like :class:`~cnftools.MLPField`)
            must return a plain dict; other modules are saved by ``state_dict`` only and need a
            ``field=`` instance to load into.
        path: the training path, stored as :func:`describe_path`.
        extra: plain values to keep (step, history as ``DataFrame.to_dict("list")``, seed, ...).
        optimizer: store its ``state_dict`` for resuming.

    Example:
        >>> import os, tempfile, torch, cnftools
        >>> v = cnftools.MLPField(2, hidden=(8,))
        >>> file = os.path.join(tempfile.mkdtemp(), "v.pt")
        >>> cnftools.save_checkpoint(file, v, cnftools.OTPath(0.1), extra={"steps": 0})
        >>> ckpt = cnftools.load_checkpoint(file)
        >>> ckpt.path, ckpt.extra
        (OTPath(sigma_min=0.1), {'steps': 0})
    """
    if not isinstance(field, nn.Module):
        raise TypeError(f"field must be a torch.nn.Module, got {type(field).__name__}")
    config = field.config() if callable(getattr(field, "config", None)) else None
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"field.config() must return a dict, got {type(config).__name__}")
    config = _to_plain("field.config()", config)
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    extra = _to_plain("extra", extra)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": {"class": type(field).__name__, "config": config},
        "state_dict": field.state_dict(),
        "path": describe_path(path),
        "extra": extra,
        "optimizer": None if optimizer is None else _to_plain("optimizer", optimizer.state_dict()),
    }
    _write_atomically(payload, file)


def _read_payload(file: str | os.PathLike[str], map_location: object) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every way a file can be unreadable named."""
    name = os.fspath(file)
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        raise ValueError(
            f"checkpoint {name!r} is empty (0 bytes): the save that wrote it was interrupted; "
            "use an earlier checkpoint or save again"
        )
    if os.path.isfile(name) and not zipfile.is_zipfile(name):
        raise ValueError(
            f"checkpoint {name!r} is truncated or not a torch.save file (no complete zip archive, "
            "which torch.save writes): the save that wrote it may have been interrupted, or the "
            "file is something else; use an earlier checkpoint or save again"
        )
    try:
        payload = torch.load(name, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"checkpoint {name!r} holds objects other than tensors and plain values, so it is not "
            f"loaded (weights_only=True never runs pickled code); was it written by "
            f"cnftools.save_checkpoint? ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise ValueError(
            f"checkpoint {name!r} is truncated or not a torch.save file (the save that wrote it "
            f"may have been interrupted): {str(error).splitlines()[0] if str(error) else error!r}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{name!r} is not a cnftools checkpoint (no format={CHECKPOINT_FORMAT!r})")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{name!r}: unsupported checkpoint version {payload.get('version')!r}")
    expected = {
        "model": dict,
        "state_dict": dict,
        "path": (dict, type(None)),
        "extra": dict,
        "optimizer": (dict, type(None)),
    }
    for key, kind in expected.items():
        if key not in payload:
            raise ValueError(f"checkpoint {name!r} has no {key!r} entry: it is incomplete")
        if not isinstance(payload[key], kind):
            raise ValueError(
                f"checkpoint {name!r}: entry {key!r} is a {type(payload[key]).__name__}, "
                "not what save_checkpoint writes"
            )
    model = payload["model"]
    if not isinstance(model.get("class"), str) or not isinstance(model.get("config"), dict | None):
        raise ValueError(f"checkpoint {name!r}: entry 'model' needs a 'class' str and a 'config'")
    for key, value in payload["state_dict"].items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise ValueError(f"checkpoint {name!r}: state_dict entry {key!r} is not a tensor")
    return payload


def _check_config_against_state(
    name: str, config: dict[str, Any], state: Mapping[str, Tensor]
) -> None:
    """Refuse an MLPField config whose parameters differ from the stored ones, before building.

    The model is first built on the ``meta`` device (shapes only, no memory), from the same
    constructor that builds it for real, and its ``state_dict`` shapes are compared with the
    stored tensors'. A corrupt config (``hidden=[10**6, 10**6]``, 4 TB) is refused here.
    """
    stored_elements = sum(value.numel() for value in state.values())
    features = config.get("time_features")
    if isinstance(features, int) and not isinstance(features, bool) and features > stored_elements:
        raise ValueError(
            f"checkpoint {name!r}: config time_features={features} exceeds every stored weight "
            f"({stored_elements} numbers); the file is corrupt or was edited"
        )
    try:
        with torch.device("meta"):
            skeleton = MLPField.from_config(config)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"checkpoint {name!r}: the stored MLPField config is invalid: {error}"
        ) from error
    shapes = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    stored = {key: tuple(value.shape) for key, value in state.items()}
    if shapes != stored:
        missing = sorted(set(shapes) - set(stored))
        unexpected = sorted(set(stored) - set(shapes))
        differing = [k for k in shapes if k in stored and shapes[k] != stored[k]]
        detail = (
            f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
            if unexpected
            else f"{differing[0]} is {stored[differing[0]]} in the file but {shapes[differing[0]]} "
            "by the config"
        )
        implied = sum(math.prod(shape) for shape in shapes.values())
        raise ValueError(
            f"checkpoint {name!r}: the stored MLPField config (implying {implied} parameters) does "
            f"not match the stored weights ({detail}); the file is corrupt or was edited"
        )


def load_checkpoint(
    file: str | os.PathLike[str],
    *,
    field: nn.Module | None = None,
    map_location: torch.device | str | None = None,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    An :class:`~cnftools.MLPField` is rebuilt from its stored config (in the stored dtype); any other
    model needs ``field=`` — an instance of the same architecture to load the weights into.

    Everything is checked before a model is built: an empty, truncated or garbage file, a file
    holding pickled objects, a missing or malformed entry, and an MLPField config whose implied
    parameter shapes differ from the stored ``state_dict`` (so a corrupt config such as
    ``hidden=[10**6, 10**6]`` cannot allocate terabytes) each raise a ``ValueError`` naming the
    file.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an unreadable or incomplete file, not a cnftools checkpoint, an inconsistent
            config, or a non-MLPField model without ``field=``.
    """
    payload = _read_payload(file, map_location)
    model = payload["model"]
    state = payload["state_dict"]
    if field is None:
        if model["class"] != "MLPField" or model["config"] is None:
            raise ValueError(
                f"the checkpoint holds a {model['class']}: pass field=<an instance of it> to load "
                "its weights into"
            )
        _check_config_against_state(os.fspath(file), model["config"], state)
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        field = MLPField.from_config(
            model["config"], dtype=dtypes.pop() if len(dtypes) == 1 else None
        )
    else:
        if not isinstance(field, nn.Module):
            raise TypeError(f"field must be a torch.nn.Module, got {type(field).__name__}")
        if model["class"] != type(field).__name__:
            raise ValueError(
                f"the checkpoint holds a {model['class']}, not a {type(field).__name__}"
            )
    field.load_state_dict(state)
    if map_location is not None:
        field.to(map_location)
    return Checkpoint(
        field=field,
        path=path_from_description(payload["path"]),
        path_description=payload["path"],
        extra=payload["extra"],
        optimizer_state=payload["optimizer"],
    )
