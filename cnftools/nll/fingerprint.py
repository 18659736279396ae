"""Content fingerprints of a dataset-NLL run: the field, the prior and every setting.

A resumed run must compute the same function of the same data as the run it continues, or refuse.
:func:`fingerprint` hashes *content*, never names or ``repr``:

* an ``nn.Module``: its class, the bytes of every parameter and buffer, and the plain attributes
  (numbers, strings, tuples of them) of every submodule;
* any other object (a closed-form marginal, a path, a prior, a wrapper class): its class and,
  recursively, its attributes — tensors by content, numbers and strings by value, nested objects
  and modules as above (attributes named ``*cache*``, memoised values, are skipped); a bound
  method: its function's name and its ``__self__``;
* a plain function or lambda (or an object holding one, e.g. a path built from lambdas): its
  code cannot be compared, so it is *not fingerprintable*: :func:`fingerprint` raises
  :class:`Unfingerprintable`, and ``dataset_nll(..., resume=True)`` then asks for ``run_id=``.

The data are hashed separately, batch by batch as they are read (:meth:`Batch.digest
<cnftools.nll.sources.Batch.digest>`).
"""

from __future__ import annotations

import hashlib
import json
import types
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnftools.nll.sources import tensor_digest

__all__ = ["Unfingerprintable", "fingerprint", "settings_key"]

_PLAIN = (bool, int, float, str, bytes, type(None))
_MAX_DEPTH = 8


class Unfingerprintable(TypeError):
    """An object whose content cannot be hashed (a plain function, a lambda, an unknown type)."""


def fingerprint(obj: object) -> str:
    """SHA-256 of an object's content (see the module docstring).

    Raises:
        Unfingerprintable: ``obj`` is or holds a plain function, lambda or an opaque object.

    Example:
        >>> import torch
        >>> a = torch.nn.Linear(2, 2)
        >>> fingerprint(a) == fingerprint(a), fingerprint(a) == fingerprint(torch.nn.Linear(2, 2))
        (True, False)
    """
    h = hashlib.sha256()
    _walk(obj, h, 0, set(), "v")
    return h.hexdigest()


def settings_key(settings: dict[str, Any]) -> str:
    """SHA-256 of a JSON-able settings dict (sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _name(obj: object) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"


def _walk(obj: object, h: Any, depth: int, seen: set[int], where: str) -> None:
    if depth > _MAX_DEPTH:
        raise Unfingerprintable(f"{where}: nested deeper than {_MAX_DEPTH} levels")
    if isinstance(obj, _PLAIN):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
        return
    if isinstance(obj, Tensor):
        h.update(f"tensor:{tensor_digest(obj)};".encode())
        return
    if isinstance(obj, np.ndarray):
        _walk(torch.from_numpy(np.ascontiguousarray(obj)), h, depth, seen, where)
        return
    if isinstance(obj, torch.dtype | torch.device | torch.Size):
        h.update(f"{type(obj).__name__}:{obj};".encode())
        return
    if id(obj) in seen:  # a cycle or a shared object: its content is already hashed
        h.update(b"seen;")
        return
    seen.add(id(obj))
    if isinstance(obj, tuple | list):
        h.update(f"{type(obj).__name__}[{len(obj)}](".encode())
        for i, item in enumerate(obj):
            _walk(item, h, depth + 1, seen, f"{where}[{i}]")
        h.update(b")")
        return
    if isinstance(obj, dict):
        h.update(f"dict[{len(obj)}](".encode())
        for key in sorted(obj, key=repr):
            _walk(key, h, depth + 1, seen, where)
            _walk(obj[key], h, depth + 1, seen, f"{where}[{key!r}]")
        h.update(b")")
        return
    if isinstance(obj, nn.Module):
        _walk_module(obj, h, seen)
        return
    if isinstance(obj, types.MethodType):
        h.update(f"method:{obj.__func__.__qualname__};".encode())
        _walk(obj.__self__, h, depth + 1, seen, f"{where}.__self__")
        return
    if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | types.LambdaType):
        raise Unfingerprintable(
            f"{where} is (or holds) the function {getattr(obj, '__qualname__', obj)!r}, whose "
            "code cannot be fingerprinted"
        )
    attributes = _attributes(obj)
    if attributes is None:
        raise Unfingerprintable(f"{where} is a {_name(obj)} whose content cannot be read")
    h.update(f"object:{_name(obj)}(".encode())
    for key in sorted(attributes):
        h.update(f"{key}=".encode())
        _walk(attributes[key], h, depth + 1, seen, f"{where}.{key}")
    h.update(b")")


def _attributes(obj: object) -> dict[str, Any] | None:
    found: dict[str, Any] = {}
    if hasattr(obj, "__dict__"):
        found.update(vars(obj))
    for klass in type(obj).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                found[slot] = getattr(obj, slot)
    if not found and not hasattr(obj, "__dict__"):
        return None
    # memoised values (``_cache``, ``_cached_x``) are derived from the rest and change on use
    return {k: v for k, v in found.items() if "cache" not in k.lower()}


def _walk_module(module: nn.Module, h: Any, seen: set[int]) -> None:
    h.update(f"module:{_name(module)}(".encode())
    for name, tensor in module.named_parameters(remove_duplicate=False):
        h.update(f"p:{name}:{tensor_digest(tensor)};".encode())
    for name, tensor in module.named_buffers(remove_duplicate=False):
        h.update(f"b:{name}:{tensor_digest(tensor)};".encode())
    for name, sub in module.named_modules():
        h.update(f"m:{name}:{_name(sub)}".encode())
        for key, value in sorted(vars(sub).items()):
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, _PLAIN) or (
                isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)
            ):
                h.update(f"{key}={value!r};".encode())
    h.update(b")")
