"""Content fingerprints of a dataset-NLL run: the field, the prior, the constant extras.

A resumed run must compute the same function of the same data as the run it continues, or refuse.
:func:`fingerprint` hashes everything a call of the field can read, by *content*, never by name
or ``repr``. It walks the object graph (cycles and shared objects included: a second visit of an
object is recorded as a reference to its first) and hashes:

* numbers, strings, bytes, ``None``: their type and exact value (floats by their exact ``repr``);
* a tensor: dtype, shape and every byte; a NumPy array: dtype (byte order included), shape and
  every byte, whatever its size (arrays of objects element by element); NumPy scalars likewise;
* lists, tuples, dicts, sets (in a canonical order), ``functools.partial`` (its function, its
  arguments, its keywords);
* an ``nn.Module``: its class and *every* attribute — parameters and buffers by content, every
  submodule, non-buffer tensors, ``_private`` numbers, lists, paths, functions, hooks — except
  ``training`` (the run puts the field in eval mode) and the state-dict hooks;
* any other object (a path, a closed-form marginal, a prior, a dataclass, a wrapper): its class
  and every attribute of its ``__dict__`` and ``__slots__``; a C object without either: its
  pickle reduction (``__reduce_ex__``); a torch distribution also by its parameters
  (``arg_constraints``), however it was built;
* a function, lambda or closure: its code (bytecode, constants, names — not line numbers), its
  closure cells, defaults and attributes, and the global names its code reads: their values by
  content; a module by name plus those of its attributes the code names; a bound method: its
  function and its ``__self__``;
* *library code* — classes and functions importable by their qualified name from an installed
  distribution (torch, numpy, cnftools itself, ...) or the standard library — by that name: the
  library versions are part of the run's identity instead. A lambda or closure a library made is
  hashed like yours (the library state its code reads: plain data by content, the rest by name).
  A class of your own code (a script, a notebook, a module next to them) is hashed with the code
  of its methods, so editing ``forward`` changes the fingerprint.

Attributes named ``*cache*`` (memoised values, derived from the rest) are skipped; a lock or a
logger an object holds is recorded as such (they order or report the work, they compute nothing).
What cannot be read — a generator, a file handle, an object deeper than
:data:`MAX_DEPTH` levels — makes :func:`fingerprint` raise :class:`Unfingerprintable` naming the
part (``v.model.__closure__[0].handle``), and ``dataset_nll(..., resume=True)`` then asks for
``run_id=``.

The data are hashed separately, batch by batch as they are read (:meth:`Batch.digest
<cnftools.nll.sources.Batch.digest>`).
"""

from __future__ import annotations

import dis
import enum
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import site
import sys
import sysconfig
import threading
import types
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnftools.nll.sources import tensor_digest

__all__ = ["MAX_DEPTH", "Unfingerprintable", "fingerprint", "settings_key"]

MAX_DEPTH = 120
"""Deepest nesting :func:`fingerprint` follows (an object graph deeper than this is refused)."""

_PLAIN = (bool, int, float, complex, str, bytes, type(None))
_PLAIN_KEYS = (bool, int, float, str, bytes, type(None))
# hook dicts that do not change what a module's call computes
_SKIPPED_MODULE_ATTRIBUTES = frozenset(
    {
        "training",
        "_state_dict_hooks",
        "_state_dict_pre_hooks",
        "_load_state_dict_pre_hooks",
        "_load_state_dict_post_hooks",
    }
)
# dicts handle-id -> flag: their keys are process-wide counters, only their number is content
_HOOK_FLAGS = frozenset(
    {"_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"}
)
_LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
_BUILTIN_CALLABLES = (
    types.BuiltinFunctionType,
    types.MethodWrapperType,
    types.WrapperDescriptorType,
    types.MethodDescriptorType,
    types.ClassMethodDescriptorType,
    types.GetSetDescriptorType,
    types.MemberDescriptorType,
    np.ufunc,
)
_HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class defined in Python
# what of a library's module state is read by content (the rest of it is library code)
_LIBRARY_DATA = (*_PLAIN, np.generic, np.ndarray, Tensor, torch.dtype)


class Unfingerprintable(TypeError):
    """An object whose content cannot be read (a generator, a lock, a file handle, ...)."""


def fingerprint(obj: object, *, name: str = "v") -> str:
    """SHA-256 of everything a call of ``obj`` can read (see the module docstring).

    ``name`` is what error messages call ``obj`` (``"v"``: ``v.model.__closure__[0]``).

    Raises:
        Unfingerprintable: some part of ``obj`` cannot be read; the message names it.

    Example:
        >>> import torch
        >>> a = torch.nn.Linear(2, 2)
        >>> fingerprint(a) == fingerprint(a), fingerprint(a) == fingerprint(torch.nn.Linear(2, 2))
        (True, False)
        >>> fingerprint(lambda x, t: -x) == fingerprint(lambda x, t: -2 * x)
        False
    """
    walker = _Walker()
    try:
        walker.walk(obj, name, 0)
    except RecursionError:
        raise Unfingerprintable(
            f"{name}: the object graph is nested too deeply to be read (over {MAX_DEPTH} levels)"
        ) from None
    except Unfingerprintable:
        raise
    except Exception as error:  # an attribute that raises when read, a broken reduction, ...
        raise Unfingerprintable(
            f"{name}: a part of it cannot be read ({type(error).__name__}: {error})"
        ) from error
    return walker.h.hexdigest()


def settings_key(settings: dict[str, Any]) -> str:
    """SHA-256 of a JSON-able settings dict (sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _qualified(obj: object) -> str:
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}"


def _name(obj: object) -> str:
    return _qualified(type(obj))


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # pragma: no cover - virtualenvs without these helpers
        pass
    return tuple(sorted(os.path.realpath(d) + os.sep for d in dirs if d))


@functools.cache
def _distributions() -> frozenset[str]:
    try:
        return frozenset(importlib.metadata.packages_distributions())
    except Exception:  # pragma: no cover - a broken environment: only the paths decide
        return frozenset()


@functools.cache
def _is_library(module: str | None) -> bool:
    """Whether code of ``module`` is library code (identified by name, see the docstring)."""
    if not module or module == "__main__":
        return False
    top = module.partition(".")[0]
    if top == "cnftools" or top in sys.builtin_module_names or top in sys.stdlib_module_names:
        return True
    if top in _distributions():
        return True
    loaded = sys.modules.get(module) or sys.modules.get(top)
    file = getattr(loaded, "__file__", None)
    if file is None:
        return False
    return os.path.realpath(file).startswith(_library_dirs())


_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"})
_ATTRIBUTE_OPS = frozenset(
    {"LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR", "DELETE_ATTR", "IMPORT_FROM", "LOAD_SUPER_ATTR"}
)


def _library_code(obj: Any) -> bool:
    """A class or function of library code *importable by its qualified name*: a lambda, a
    closure or a function made at run time (even by a library, or in a doctest) is not."""
    if not _is_library(getattr(obj, "__module__", None)):
        return False
    target: Any = sys.modules.get(obj.__module__)
    for part in getattr(obj, "__qualname__", "<>").split("."):
        try:
            target = vars(target).get(part) if target is not None else None
        except TypeError:  # no __dict__
            return False
    return target is obj


@functools.lru_cache(maxsize=4096)
def _code_names(code: types.CodeType) -> tuple[frozenset, frozenset, frozenset]:
    """``(globals, attributes, imports)`` a code object (and the code nested in it) names."""
    found: tuple[set[str], set[str], set[str]] = (set(), set(), set())
    for instruction in dis.get_instructions(code):
        if not isinstance(instruction.argval, str):
            continue
        if instruction.opname in _GLOBAL_OPS:
            found[0].add(instruction.argval)
        elif instruction.opname in _ATTRIBUTE_OPS:
            found[1].add(instruction.argval)
        elif instruction.opname == "IMPORT_NAME":
            found[2].add(instruction.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            for mine, nested in zip(found, _code_names(const), strict=True):
                mine |= nested
    return frozenset(found[0]), frozenset(found[1]), frozenset(found[2])


def _lazy_names(kind: type) -> set[str]:
    """Names of lazily computed attributes (torch's ``lazy_property``, ``cached_property``)."""
    lazy = getattr(torch.distributions.utils, "lazy_property", ())
    found = set()
    for klass in kind.__mro__:
        for key, value in vars(klass).items():
            if isinstance(value, functools.cached_property) or (
                lazy and isinstance(value, lazy)  # type: ignore[arg-type]
            ):
                found.add(key)
    return found


class _Walker:
    """One walk of an object graph into one SHA-256."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.memo: dict[int, int] = {}  # id -> order of first visit
        self.keep: list[object] = []  # keeps every memoised object alive: ids are not reused
        self.digests: dict[int, str] = {}  # id of a tensor/array -> its content digest
        self.module_attributes: set[tuple[int, str]] = set()  # (module, name) walked

    # -- output ----------------------------------------------------------------------------
    def put(self, tag: str, payload: str | bytes = b"") -> None:
        data = payload.encode("utf-8", "surrogatepass") if isinstance(payload, str) else payload
        self.h.update(f"{tag}:{len(data)}:".encode())
        self.h.update(data)

    def first_visit(self, obj: object) -> bool:
        """Record ``obj``; ``False`` (after writing a back reference) when it was seen before."""
        key = id(obj)
        if key in self.memo:
            self.put("ref", str(self.memo[key]))
            return False
        self.memo[key] = len(self.memo)
        self.keep.append(obj)
        return True

    def sub_digest(self, obj: object, where: str, depth: int) -> str:
        """The digest of ``obj`` walked on its own (an element of a set: order-free)."""
        sub = _Walker()
        sub.walk(obj, where, depth)
        return sub.h.hexdigest()

    # -- the walk --------------------------------------------------------------------------
    def walk(self, obj: object, where: str, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise Unfingerprintable(f"{where}: nested deeper than {MAX_DEPTH} levels")
        kind = type(obj)
        if kind in _PLAIN:
            self.put(kind.__name__, obj if kind is bytes else repr(obj))  # type: ignore[arg-type]
            return
        if isinstance(obj, enum.Enum):
            self.put("enum", f"{_name(obj)}.{obj.name}")
            self.walk(obj.value, f"{where}.value", depth + 1)
            return
        if isinstance(obj, _PLAIN):  # a subclass of a plain type: its value, then its attributes
            base = next(b for b in _PLAIN if isinstance(obj, b))
            self.put(
                f"{base.__name__}:{_name(obj)}", bytes(obj) if base is bytes else repr(base(obj))
            )
            self.attributes(obj, where, depth)
            return
        if isinstance(obj, np.generic):
            self.put(f"np:{obj.dtype.str}", np.asarray(obj).tobytes())
            if obj.dtype.kind == "O":  # pragma: no cover - object scalars are not created by numpy
                self.walk(obj.item(), where, depth + 1)
            return
        if isinstance(obj, Tensor):
            self.put("tensor", self.tensor_digest(obj, where))
            return
        if isinstance(obj, np.ndarray):
            self.array(obj, where, depth)
            return
        if isinstance(obj, torch.dtype | torch.device | torch.layout | torch.memory_format):
            self.put(kind.__name__, str(obj))
            return
        if isinstance(obj, torch.Size):
            self.put("Size", repr(tuple(obj)))
            return
        if isinstance(obj, np.dtype):
            self.put("np.dtype", repr(obj.descr if obj.fields else obj.str))
            return
        if isinstance(obj, types.ModuleType):
            self.put("module", obj.__name__)
            return
        if isinstance(obj, _BUILTIN_CALLABLES):
            self.builtin(obj, where, depth)
            return
        if isinstance(obj, type):
            self.klass(obj, where, depth)
            return
        if isinstance(obj, tuple):  # immutable: not memoised (a cycle passes a mutable object)
            self.put(f"tuple:{_name(obj)}", str(len(obj)))
            for i, item in enumerate(obj):
                self.walk(item, f"{where}[{i}]", depth + 1)
            if kind is not tuple and hasattr(obj, "__dict__"):
                self.attributes(obj, where, depth)
            return
        if not self.first_visit(obj):
            return
        if isinstance(obj, list):
            self.put(f"list:{_name(obj)}", str(len(obj)))
            for i, item in enumerate(obj):
                self.walk(item, f"{where}[{i}]", depth + 1)
            if kind is not list:
                self.attributes(obj, where, depth)
            return
        if isinstance(obj, dict):
            self.mapping(obj, where, depth)
            if kind is not dict:
                extra = {"default_factory": getattr(obj, "default_factory", None)}
                self.attributes(obj, where, depth, extra)
            return
        if isinstance(obj, set | frozenset):
            digests = sorted(self.sub_digest(item, f"{where}{{…}}", depth + 1) for item in obj)
            self.put(f"set:{_name(obj)}", "".join(digests))
            return
        if isinstance(obj, functools.partial):
            self.put("partial")
            self.walk(obj.func, f"{where}.func", depth + 1)
            self.walk(obj.args, f"{where}.args", depth + 1)
            self.walk(obj.keywords, f"{where}.keywords", depth + 1)
            self.attributes(obj, where, depth)
            return
        if isinstance(obj, types.FunctionType):
            self.function(obj, where, depth)
            return
        if isinstance(obj, types.MethodType):
            self.put("method")
            self.walk(obj.__func__, f"{where}.__func__", depth + 1)
            self.walk(obj.__self__, f"{where}.__self__", depth + 1)
            return
        if isinstance(obj, types.CodeType):
            self.code(obj, where, depth)
            return
        if isinstance(obj, staticmethod | classmethod):
            self.put(kind.__name__)
            self.walk(obj.__func__, f"{where}.__func__", depth + 1)
            return
        if isinstance(obj, property):
            self.put("property")
            for part in ("fget", "fset", "fdel"):
                self.walk(getattr(obj, part), f"{where}.{part}", depth + 1)
            return
        if isinstance(obj, types.CellType):  # pragma: no cover - cells are read via functions
            self.cell(obj, where, depth)
            return
        if isinstance(obj, torch.Generator):
            self.put("generator", str(obj.device))
            self.put("tensor", self.tensor_digest(obj.get_state(), f"{where}.get_state()"))
            return
        if isinstance(obj, logging.Logger):  # where messages go, not what is computed
            self.put("logger", obj.name)
            return
        if isinstance(obj, _LOCK_TYPES):  # synchronises the call, computes nothing
            self.put("lock")
            return
        if isinstance(obj, torch.jit.ScriptModule | torch.jit.ScriptFunction):
            self.script(obj, where, depth)
            return
        self.put(f"object:{_name(obj)}")
        self.klass(kind, where, depth)
        if isinstance(obj, torch.distributions.Distribution):
            self.distribution(obj, where, depth)
        if kind.__flags__ & _HEAPTYPE and self.attributes(obj, where, depth):
            return
        self.reduction(obj, where, depth)  # a C object: its pickle reduction, or refuse

    # -- leaves ----------------------------------------------------------------------------
    def tensor_digest(self, t: Tensor, where: str) -> str:
        known = self.digests.get(id(t))
        if known is not None:
            return known
        try:
            if t.is_sparse or t.layout != torch.strided:
                t = t.to_dense()
            digest = tensor_digest(t)
        except Exception as error:
            raise Unfingerprintable(
                f"{where} is a tensor whose content cannot be read ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''})"
            ) from None
        self.digests[id(t)] = digest
        self.keep.append(t)
        return digest

    def array(self, a: np.ndarray, where: str, depth: int) -> None:
        if a.dtype.hasobject:
            if not self.first_visit(a):
                return
            self.put(f"ndarray-object:{a.dtype.str}", repr(a.shape))
            for i, item in enumerate(a.reshape(-1)):
                self.walk(item, f"{where}.flat[{i}]", depth + 1)
            return
        known = self.digests.get(id(a))
        if known is None:
            h = hashlib.sha256(f"{a.dtype.descr!r}{a.dtype.str}{a.shape}".encode())
            h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
            known = self.digests[id(a)] = h.hexdigest()
            self.keep.append(a)
        self.put("ndarray", known)
        if isinstance(a, np.ma.MaskedArray):  # the mask and fill value are content too
            self.walk(np.ma.getmaskarray(a).view(np.ndarray), f"{where}.mask", depth + 1)
            self.walk(a.fill_value, f"{where}.fill_value", depth + 1)

    # -- containers ------------------------------------------------------------------------
    def mapping(self, d: dict, where: str, depth: int) -> None:
        self.put(f"dict:{_name(d)}", str(len(d)))
        keys: Iterable[Any] = list(d)
        if all(type(k) in _PLAIN_KEYS for k in keys):
            keys = sorted(keys, key=lambda k: (type(k).__name__, repr(k)))
        for key in keys:  # other keys in insertion order (deterministic for the same code)
            self.walk(key, f"{where}[key]", depth + 1)
            self.walk(d[key], f"{where}[{key!r}]", depth + 1)

    def attributes(
        self, obj: object, where: str, depth: int, extra: dict[str, Any] | None = None
    ) -> bool:
        """Walk ``obj``'s ``__dict__`` and ``__slots__``; ``False`` when it has neither."""
        found: dict[str, Any] = dict(extra or {})
        has_dict = hasattr(obj, "__dict__")
        if has_dict:
            found.update(vars(obj))
        for klass in type(obj).__mro__:
            slots = getattr(klass, "__slots__", ())
            for slot in (slots,) if isinstance(slots, str) else slots:
                if slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    found[slot] = getattr(obj, slot)
        if not found and not has_dict:
            return False
        module = isinstance(obj, nn.Module)
        lazy = _lazy_names(type(obj)) if isinstance(obj, torch.distributions.Distribution) else ()
        for key in sorted(found):
            if "cache" in key.lower() or key in lazy:  # memoised values: derived from the rest
                continue
            value = found[key]
            if module and key in _SKIPPED_MODULE_ATTRIBUTES:
                continue
            self.put("attr", key)
            if module and key in _HOOK_FLAGS and isinstance(value, dict):
                self.put("flags", str(len(value)))
            elif module and key.endswith("hooks") and isinstance(value, dict):
                self.walk(list(value.values()), f"{where}.{key}", depth + 1)
            else:
                self.walk(value, f"{where}.{key}", depth + 1)
        return True

    def distribution(self, obj: Any, where: str, depth: int) -> None:
        """A torch distribution's parameters, however it was built (probs or logits, ...)."""
        try:
            names = sorted(obj.arg_constraints)
        except Exception:
            names = []
        for name in names:
            try:
                value = getattr(obj, name)
            except Exception:
                continue
            self.put("param", name)
            self.walk(value, f"{where}.{name}", depth + 1)

    def reduction(self, obj: object, where: str, depth: int) -> None:
        """A C object without attributes: its pickle reduction, or refuse."""
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception:
            reduced = None
        if not isinstance(reduced, tuple) or len(reduced) < 2:
            raise Unfingerprintable(
                f"{where} is a {_name(obj)} whose content cannot be read; pass run_id= (or give "
                "the field a readable form, e.g. plain attributes)"
            )
        self.keep.append(reduced)
        self.put("reduce", str(len(reduced)))
        for i, part in enumerate(reduced[:3]):
            self.walk(part, f"{where}.__reduce__()[{i}]", depth + 1)
        for i, part in enumerate(reduced[3:5]):
            if part is not None:
                self.walk(list(part), f"{where}.__reduce__()[{i + 3}]", depth + 1)

    # -- code ------------------------------------------------------------------------------
    def builtin(self, obj: Any, where: str, depth: int) -> None:
        owner = getattr(obj, "__self__", None)
        qualname = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(type(obj))))
        module = getattr(obj, "__module__", None) or getattr(type(owner), "__module__", None)
        self.put("builtin", f"{module}.{qualname}")
        if owner is not None and not isinstance(owner, types.ModuleType | type):
            self.walk(owner, f"{where}.__self__", depth + 1)  # e.g. a bound method of a tensor

    def klass(self, cls: type, where: str, depth: int) -> None:
        self.put("class", _qualified(cls))
        if _library_code(cls) or not self.first_visit(cls):
            return
        for klass in cls.__mro__:
            if _library_code(klass):
                continue
            self.put("class-body", _qualified(klass))
            for key, value in sorted(vars(klass).items()):
                dunder = key.startswith("__") and key.endswith("__")
                code = callable(value) or isinstance(value, staticmethod | classmethod | property)
                if key.startswith("_abc_") or ("cache" in key.lower() and not code):
                    continue  # memoised values; a method named *cache* is code, walked
                if dunder and not isinstance(
                    value, types.FunctionType | staticmethod | classmethod | property
                ):
                    continue
                self.put("member", key)
                self.walk(value, f"{_qualified(klass)}.{key}", depth + 1)

    def function(self, fn: types.FunctionType, where: str, depth: int) -> None:
        self.put("function", _qualified(fn))
        if _library_code(fn):
            return  # library code: identified by its name (and the library's version)
        # a lambda, a closure, a function of your code (or one a library made at run time)
        self.code(fn.__code__, f"{where}.__code__", depth + 1)
        self.walk(fn.__defaults__, f"{where}.__defaults__", depth + 1)
        self.walk(fn.__kwdefaults__, f"{where}.__kwdefaults__", depth + 1)
        for i, cell in enumerate(fn.__closure__ or ()):
            self.cell(cell, f"{where}.__closure__[{i}]", depth + 1)
        self.walk(dict(vars(fn)), f"{where}.__dict__", depth + 1)
        library = _is_library(fn.__module__)  # its globals are a library's: read as such
        names, attributes, imports = _code_names(fn.__code__)
        namespace = fn.__globals__
        for name in sorted(names):  # a name not in the namespace is a builtin: part of the code
            if name in namespace:
                self.put("global", name)
                self.global_value(
                    namespace[name], attributes, f"{where}.{name}", depth + 1, library
                )
        for name in sorted(imports):  # modules imported inside the function
            module = sys.modules.get(name.partition(".")[0])
            if module is not None:
                self.put("import", name)
                self.global_value(module, attributes, f"{where}.<import {name}>", depth + 1)

    def global_value(
        self, value: object, attributes: frozenset, where: str, depth: int, library: bool = False
    ) -> None:
        """A global read by code: by content (of a ``library`` module: plain data by content,
        the rest by name); a module: its name and the attributes the code names."""
        if not isinstance(value, types.ModuleType):
            if not library or isinstance(value, _LIBRARY_DATA):
                self.walk(value, where, depth)
            else:
                self.put("library", f"{_name(value)}:{_qualified(value)}")
            return
        self.put("module", value.__name__)
        if depth > MAX_DEPTH:
            raise Unfingerprintable(f"{where}: nested deeper than {MAX_DEPTH} levels")
        self.keep.append(value)
        library = _is_library(value.__name__)
        namespace = vars(value)
        for name in sorted(attributes):
            if name not in namespace:
                continue
            self.put("module-attribute", name)
            if (id(value), name) in self.module_attributes:  # walked already
                continue
            self.module_attributes.add((id(value), name))
            attribute = namespace[name]
            if isinstance(attribute, types.ModuleType):
                self.global_value(attribute, attributes, f"{where}.{name}", depth + 1)
            elif not library or isinstance(attribute, _LIBRARY_DATA):
                self.walk(attribute, f"{where}.{name}", depth + 1)
            else:  # library code and library objects: by name
                self.put("library", f"{value.__name__}.{name}:{_name(attribute)}")

    def cell(self, cell: types.CellType, where: str, depth: int) -> None:
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell (a variable not yet assigned)
            self.put("empty-cell")
            return
        self.put("cell")
        self.walk(content, where, depth)

    def code(self, code: types.CodeType, where: str, depth: int) -> None:
        self.put("code", sys.implementation.cache_tag or "")
        self.put("args", repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount)))
        self.put("flags", str(code.co_flags))
        self.put("bytecode", code.co_code)
        self.put("exceptions", getattr(code, "co_exceptiontable", b""))
        self.put("names", repr((code.co_names, code.co_varnames, code.co_freevars)))
        self.put("cellvars", repr(code.co_cellvars))
        self.put("consts", str(len(code.co_consts)))
        for i, const in enumerate(code.co_consts):
            if isinstance(const, types.CodeType):
                self.code(const, f"{where}.co_consts[{i}]", depth + 1)
            else:
                self.walk(const, f"{where}.co_consts[{i}]", depth + 1)

    def script(self, obj: Any, where: str, depth: int) -> None:
        """TorchScript: parameters, buffers and the compiled code of every submodule."""
        self.put(f"script:{getattr(obj, 'original_name', _name(obj))}")
        if isinstance(obj, torch.jit.ScriptFunction):
            self.put("code", obj.code)
            return
        for name, tensor in obj.named_parameters(remove_duplicate=False):
            self.put("p", name)
            self.put("tensor", self.tensor_digest(tensor, f"{where}.{name}"))
        for name, tensor in obj.named_buffers(remove_duplicate=False):
            self.put("b", name)
            self.put("tensor", self.tensor_digest(tensor, f"{where}.{name}"))
        for name, sub in obj.named_modules():
            self.put("m", f"{name}:{getattr(sub, 'original_name', '')}")
            try:
                self.put("code", sub.code)
            except Exception:
                self.put("code", "")
