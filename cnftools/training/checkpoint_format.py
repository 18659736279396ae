r"""The checkpoint file format: plain payloads, checksums, atomic writes and checked reads.

What :func:`~cnftools.training.checkpoints.save_checkpoint` writes and
:func:`~cnftools.training.checkpoints.load_checkpoint` reads, below the API: a dict of tensors and
plain Python values (:func:`to_plain` refuses anything ``torch.load(weights_only=True)`` could not
give back), a SHA-256 **checksum** of the whole content (:func:`payload_checksum`), an atomic
write (:func:`write_atomically`: a temporary file in the same directory, flushed and fsynced,
then renamed over the target; leftovers of killed saves are removed by the next save), and a read
(:func:`read_payload`) that verifies the zip archive's CRC32s, the checksum and the entries before
anything is built.

References:
    PyTorch, Saving and loading models (``torch.save``, ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import re
import socket
import uuid
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnftools._resources import process_alive

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "payload_checksum",
    "read_payload",
    "temporary_name",
    "to_plain",
    "write_atomically",
]

CHECKPOINT_FORMAT = "cnftools.checkpoint"
CHECKPOINT_VERSION = 2
"""2: with a ``checksum`` entry (version 1 files, without one, still load: their zip CRCs are
verified)."""


_PLAIN_SCALARS = (bool, int, float, str)


_MAX_NESTING = 100
"""Deepest nesting of lists, tuples and dicts that :func:`to_plain` stores."""


def to_plain(name: str, value: object, depth: int = 0) -> object:
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
        items = [to_plain(f"{name}[{i}]", item, depth + 1) for i, item in enumerate(value)]  # type: ignore[attr-defined]
        return items if type(value) is list else tuple(items)
    if type(value) is dict:
        out = {}
        for key, item in value.items():  # type: ignore[attr-defined]
            if type(key) not in (str, int):
                raise TypeError(f"{name} has a key of type {type(key).__name__}; use str keys")
            out[key] = to_plain(f"{name}[{key!r}]", item, depth + 1)
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


def payload_checksum(payload: Mapping[str, Any]) -> str:
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


def temporary_name(base: str) -> str:
    """``.BASE.HOST.PID.RANDOM.tmp``: whose it is, so that leftovers can be told from live saves."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
    return f".{base}.{host}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"


def _remove_leftovers(directory: str, base: str) -> None:
    """Remove temporary files of earlier saves of ``base`` whose writer is gone: names of exactly
    this module's form, written on this host by a process that no longer runs."""
    host = temporary_name(base).split(".")[-4]
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


def write_atomically(payload: dict[str, Any], file: str | os.PathLike[str]) -> None:
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
    temporary = os.path.join(directory, temporary_name(base))
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


def read_payload(file: str | os.PathLike[str], map_location: object) -> dict[str, Any]:
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
    if payload["version"] >= 2 and payload.get("checksum") != payload_checksum(payload):
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
