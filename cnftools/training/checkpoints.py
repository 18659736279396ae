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
against the stored shapes before building anything.

References:
    PyTorch, Saving and loading models (``torch.save``, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import pickle
import re
import socket
import uuid
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnftools._resources import process_alive
from cnftools.paths import GaussianPath, OTPath, VEPath, VPPath
from cnftools.training.models import ConvField, MLPField

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
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

CHECKPOINT_FORMAT = "cnftools.checkpoint"
CHECKPOINT_VERSION = 2
"""2: with a ``checksum`` entry (version 1 files, without one, still load: their zip CRCs are
verified)."""

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


_PLAIN_SCALARS = (bool, int, float, str)


_MAX_NESTING = 100
"""Deepest nesting of lists, tuples and dicts that :func:`_to_plain` stores."""


def _to_plain(name: str, value: object, depth: int = 0) -> object:
    """``value`` as something ``torch.load(weights_only=True)`` reads back, or a ``TypeError``.

    NumPy scalars become Python numbers and NumPy arrays become tensors (both are common in
    ``extra``: ``np.float64`` is even a ``float`` subclass, which pickles as NumPy and then fails
    to load). Anything else that is not a tensor, a plain scalar, ``None``, a ``torch.dtype``,
    a list, a tuple or a dict with ``str``/``int`` keys is refused here, at save time.
    """
    if depth > _MAX_NESTING:  # a container that holds itself, or one absurdly deep
        raise TypeError(
            f"{name} is nested deeper than {_MAX_NESTING} levels (a list or dict that contains "
            "itself?); checkpoints hold plain, finite nesting"
        )
    if value is None or type(value) in _PLAIN_SCALARS or isinstance(value, torch.dtype):
        return value
    if isinstance(value, Tensor):
        if type(value) not in (Tensor, nn.Parameter):
            raise TypeError(
                f"{name} is a tensor subclass {type(value).__name__}; store a plain tensor"
            )
        if value.layout != torch.strided:
            raise TypeError(
                f"{name} is a tensor of layout {value.layout}; store value.to_dense() (a "
                "checkpoint holds strided tensors)"
            )
        return value
    if isinstance(value, np.ma.MaskedArray):
        raise TypeError(
            f"{name} is a NumPy masked array: its mask would be lost; store value.filled(...) "
            "and value.mask (np.ma.getmaskarray(value)) as two arrays"
        )
    if isinstance(value, np.generic | np.ndarray):
        _check_numpy_kind(name, value)
    if isinstance(value, np.generic) and not isinstance(value, np.void | np.object_):
        return value.item()
    if isinstance(value, np.ndarray) and value.dtype != object:
        native = value.astype(value.dtype.newbyteorder("="), copy=True)  # big-endian: exact
        return torch.from_numpy(native)
    if type(value) in (list, tuple):
        items = [_to_plain(f"{name}[{i}]", item, depth + 1) for i, item in enumerate(value)]  # type: ignore[attr-defined]
        return items if type(value) is list else tuple(items)
    if type(value) is dict:
        out = {}
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) not in (str, int):
                raise TypeError(f"{name} has a key of type {type(key).__name__}; use str keys")
            out[key] = _to_plain(f"{name}[{key!r}]", item, depth + 1)
        return out
    raise TypeError(
        f"{name} is a {type(value).__name__}: checkpoints hold only tensors, numbers, strings, "
        "bools, None, lists, tuples and dicts (NumPy scalars and arrays are converted; for a "
        "DataFrame use DataFrame.to_dict('list'))"
    )


def _check_numpy_kind(name: str, value: np.generic | np.ndarray) -> None:
    """Refuse NumPy values a checkpoint cannot give back exactly (refused at save, not at load)."""
    kind = value.dtype.kind
    what = "array" if isinstance(value, np.ndarray) else "scalar"
    if kind in "mM":
        raise TypeError(
            f"{name} is a NumPy {value.dtype} {what}: a checkpoint cannot give it back exactly "
            "(datetime64[ns] would load as an int, others as datetime objects that "
            "weights_only=True refuses); store str(value) (ISO 8601) or value.astype('int64') "
            "with its unit"
        )
    if value.dtype in (np.longdouble, np.clongdouble) and value.dtype.itemsize > 8 * (
        1 + (kind == "c")
    ):
        raise TypeError(
            f"{name} is a NumPy {value.dtype} {what}, more precise than a float64: a checkpoint "
            "cannot give it back exactly; store str(value), or float(value) if float64 suffices"
        )
    if isinstance(value, np.ndarray) and kind in "USV":
        raise TypeError(
            f"{name} is a NumPy array of dtype {value.dtype} (text, bytes or records): a "
            "checkpoint holds tensors of numbers; store value.tolist()"
        )


def _payload_checksum(payload: Mapping[str, Any]) -> str:
    """SHA-256 of a payload's content, its ``checksum`` entry left out (see the module
    docstring): the same for the file written and the file read back on any device."""
    h = hashlib.sha256()
    _digest(h, {k: v for k, v in payload.items() if k != "checksum"})
    return h.hexdigest()


def _digest(h: Any, value: object) -> None:
    def put(tag: str, data: bytes = b"") -> None:
        h.update(f"{tag}:{len(data)}:".encode())
        h.update(data)

    if isinstance(value, Tensor):
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        put("tensor", f"{flat.dtype}{tuple(value.shape)}".encode())
        put("bytes", flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, dict):
        put("dict", str(len(value)).encode())
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _digest(h, key)
            _digest(h, value[key])
    elif isinstance(value, list | tuple):
        put(type(value).__name__, str(len(value)).encode())
        for item in value:
            _digest(h, item)
    elif isinstance(value, bytes):
        put("bytes", value)
    else:  # None, bool, int, float, complex, str, torch.dtype: by exact repr
        put(type(value).__name__, repr(value).encode())


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


_TEMPORARY = re.compile(r"\.(?P<base>.+)\.(?P<host>[^/]+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp")


def _temporary_name(base: str) -> str:
    """``.BASE.HOST.PID.RANDOM.tmp``: whose it is, so that leftovers can be told from live saves."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f".{base}.{host}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"

    return True


def _remove_leftovers(directory: str, base: str) -> None:
    """Remove temporary files of earlier saves of ``base`` whose writer is gone: names of exactly
    this module's form, written on this host by a process that no longer runs."""
    host = _temporary_name(base).split(".")[-4]
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if not match or match["base"] != base or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not process_alive(pid):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(directory, name))


def _write_atomically(payload: dict[str, Any], file: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file next to ``file``, fsync it, rename it over ``file``.

    A reader (or a process restarted after a crash) sees either the previous file or the complete
    new one, never a partial write: ``os.replace`` is atomic on POSIX and Windows within one
    directory. A failed write (``OSError``: a full disk) removes the temporary file and raises an
    ``OSError`` (same ``errno``) saying that the previous file is unchanged. A killed process can
    leave a ``.<name>.<host>.<pid>.<random>.tmp`` file behind: the next save removes it.
    """
    target = os.path.abspath(os.fspath(file))
    directory, base = os.path.split(target)
    if os.path.isdir(target):
        raise IsADirectoryError(f"checkpoint file {os.fspath(file)!r} is a directory")
    _remove_leftovers(directory, base)
    temporary = os.path.join(directory, _temporary_name(base))
    previous = os.path.exists(target)
    try:
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
    except OSError as error:
        kept = (
            f"the previous checkpoint {target!r} is unchanged"
            if previous
            else f"no file was written at {target!r}"
        )
        reason = error.strerror or str(error) or type(error).__name__
        raise OSError(
            error.errno or errno.EIO, f"could not write the checkpoint {target!r}: {reason}; {kept}"
        ) from error
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
    payload["checksum"] = _payload_checksum(payload)
    _write_atomically(payload, file)


def _check_map_location(map_location: object) -> None:
    """A ``map_location`` naming a device this machine lacks: say so, before reading."""
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return
    try:
        device = torch.device(map_location)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"map_location={map_location!r} is not a device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"map_location={map_location!r}: CUDA is not available on this machine (torch "
            f"{torch.__version__}); load with map_location='cpu'"
        )


def _is_zipfile(name: str) -> bool:
    try:
        return zipfile.is_zipfile(name)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):  # a damaged end record
        return False


def _check_archive(name: str) -> None:
    """Verify the CRC32 of every member of the zip archive ``torch.save`` wrote."""
    try:
        with zipfile.ZipFile(name) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"checkpoint {name!r} is damaged: its zip archive cannot be read ({error}); use an "
            "earlier checkpoint or save again"
        ) from None
    if bad is not None:
        raise ValueError(
            f"checkpoint {name!r} is damaged: member {bad!r} of its zip archive fails its CRC32 "
            "or header check (a changed byte); use an earlier checkpoint or save again"
        )


def _read_payload(file: str | os.PathLike[str], map_location: object) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every way a file can be unreadable named."""
    name = os.fspath(file)
    _check_map_location(map_location)
    if os.path.isfile(name) and os.path.getsize(name) == 0:
        raise ValueError(
            f"checkpoint {name!r} is empty (0 bytes): the save that wrote it was interrupted; "
            "use an earlier checkpoint or save again"
        )
    if os.path.isfile(name) and not _is_zipfile(name):
        raise ValueError(
            f"checkpoint {name!r} is truncated or not a torch.save file (no complete zip archive, "
            "which torch.save writes): the save that wrote it may have been interrupted, or the "
            "file is something else; use an earlier checkpoint or save again"
        )
    if os.path.isfile(name):
        _check_archive(name)
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
        first = str(error).splitlines()[0] if str(error) else repr(error)
        if "cuda" in first.lower() and not torch.cuda.is_available():
            raise ValueError(
                f"checkpoint {name!r} holds CUDA tensors and CUDA is not available on this "
                "machine; load with map_location='cpu'"
            ) from error
        raise ValueError(
            f"checkpoint {name!r} is damaged, truncated or not a torch.save file (the save that "
            f"wrote it may have been interrupted): {first}"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{name!r} is not a cnftools checkpoint (no format={CHECKPOINT_FORMAT!r})")
    if payload.get("version") not in (1, CHECKPOINT_VERSION):
        raise ValueError(f"{name!r}: unsupported checkpoint version {payload.get('version')!r}")
    if payload["version"] >= 2 and payload.get("checksum") != _payload_checksum(payload):
        raise ValueError(
            f"checkpoint {name!r} is damaged: its content does not match its checksum (a changed "
            "byte, or an edited file); use an earlier checkpoint or save again"
        )
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
    payload = _read_payload(file, map_location)
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
