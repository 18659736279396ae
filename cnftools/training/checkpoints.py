r"""Checkpoints of trained fields: atomic, checksummed, loadable with ``weights_only=True``.

Checkpoints (:func:`save_checkpoint`, :func:`load_checkpoint`) hold only tensors and plain Python
values — the ``state_dict``, the model's ``config()`` dict and the path's description — and are
read back with ``torch.load(weights_only=True)``: no pickled code is ever executed. A save is
atomic (a temporary file in the same directory, flushed and fsynced, then renamed over the
target), so a process killed mid-save leaves the previous checkpoint intact; a failed save (a full
disk) removes its temporary file and says that the previous checkpoint is unchanged. Temporary
files of saves that were killed are removed by the next save to the same file.

Every checkpoint carries a SHA-256 **checksum** of its whole content (every tensor's dtype, shape
and bytes, every plain value), verified on load together with the CRC32 of every member of the
zip archive ``torch.save`` writes: a flipped byte is refused, never loaded. A load checks the
file, its keys and the model's configuration (bounded: layer count, widths, parameter count)
against the stored shapes before building anything. The file format itself (plain payloads,
checksums, atomic writes, checked reads) lives in :mod:`~cnftools.training.checkpoint_format`;
this module is the API over it.

References:
    PyTorch, Saving and loading models (``torch.save``, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cnftools.paths import GaussianPath, OTPath, VEPath, VPPath
from cnftools.training.checkpoint_format import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    payload_checksum,
    read_payload,
    to_plain,
    write_atomically,
)
from cnftools.training.models import ConvField, MLPField

__all__ = [
    "REBUILDABLE",
    "Checkpoint",
    "describe_path",
    "load_checkpoint",
    "path_from_description",
    "save_checkpoint",
]

REBUILDABLE: dict[str, type[MLPField] | type[ConvField]] = {
    "MLPField": MLPField,
    "ConvField": ConvField,
}
"""Model classes :func:`load_checkpoint` rebuilds from their stored ``config()`` (no ``field=``)."""

MAX_LAYERS = 1024
"""Most hidden layers a stored config may ask for (a crafted ``hidden=[1] * 200000`` is refused
before anything is built)."""


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
    config = to_plain("field.config()", config)
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
    extra = to_plain("extra", extra)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": {"class": type(field).__name__, "config": config},
        "state_dict": field.state_dict(),
        "path": describe_path(path),
        "extra": extra,
        "optimizer": None if optimizer is None else to_plain("optimizer", optimizer.state_dict()),
    }
    payload["checksum"] = payload_checksum(payload)
    write_atomically(payload, file)


def _check_config_against_state(
    name: str,
    cls: type[MLPField] | type[ConvField],
    config: dict[str, Any],
    state: Mapping[str, Tensor],
) -> None:
    """Refuse a model config whose parameters differ from the stored ones, before building.

    The model is first built on the ``meta`` device (shapes only, no memory), from the same
    constructor that builds it for real, and its ``state_dict`` shapes are compared with the
    stored tensors'. A corrupt config (``hidden=[10**6, 10**6]``, 4 TB) is refused here.
    """
    stored_elements = sum(value.numel() for value in state.values())
    hidden = config.get("hidden", ())
    if isinstance(hidden, list | tuple):
        if len(hidden) > MAX_LAYERS or len(hidden) > len(state):
            raise ValueError(
                f"checkpoint {name!r}: the stored {cls.__name__} config asks for {len(hidden)} "
                f"hidden layers, but the file holds {len(state)} weight tensors (and at most "
                f"{MAX_LAYERS} layers are accepted); the file is corrupt or was edited"
            )
        for width in hidden:
            if isinstance(width, int) and not isinstance(width, bool) and width > stored_elements:
                raise ValueError(
                    f"checkpoint {name!r}: config hidden width {width} exceeds every stored "
                    f"weight ({stored_elements} numbers); the file is corrupt or was edited"
                )
    features = config.get("time_features")
    if isinstance(features, int) and not isinstance(features, bool) and features > stored_elements:
        raise ValueError(
            f"checkpoint {name!r}: config time_features={features} exceeds every stored weight "
            f"({stored_elements} numbers); the file is corrupt or was edited"
        )
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(config)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"checkpoint {name!r}: the stored {cls.__name__} config is invalid: {error}"
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
            f"checkpoint {name!r}: the stored {cls.__name__} config (implying {implied} parameters) does "
            f"not match the stored weights ({detail}); the file is corrupt or was edited"
        )


def load_checkpoint(
    file: str | os.PathLike[str],
    *,
    field: nn.Module | None = None,
    map_location: torch.device | str | None = None,
) -> Checkpoint:
    """Load a checkpoint written by :func:`save_checkpoint` with ``torch.load(weights_only=True)``.

    An :class:`~cnftools.MLPField` or :class:`~cnftools.ConvField` is rebuilt from its stored
    config (in the stored dtype); any other model needs ``field=`` — an instance of the same
    architecture to load the weights into.

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
    payload = read_payload(file, map_location)
    try:  # before anything is built
        path = path_from_description(payload["path"])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"checkpoint {os.fspath(file)!r}: the stored path description {payload['path']!r} "
            f"is invalid ({error}); the file was not written by save_checkpoint as it is"
        ) from error
    model = payload["model"]
    state = payload["state_dict"]
    if field is None:
        cls = REBUILDABLE.get(model["class"])
        if cls is None or model["config"] is None:
            raise ValueError(
                f"the checkpoint holds a {model['class']}: pass field=<an instance of it> to load "
                "its weights into"
            )
        _check_config_against_state(os.fspath(file), cls, model["config"], state)
        dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
        field = cls.from_config(model["config"], dtype=dtypes.pop() if len(dtypes) == 1 else None)
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
        path=path,
        path_description=payload["path"],
        extra=payload["extra"],
        optimizer_state=payload["optimizer"],
    )
