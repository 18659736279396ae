"""The walk behind :func:`cnftools.nll.fingerprint`: one object graph into one SHA-256.

:meth:`Walker.walk` dispatches on the kind of an object through two ordered tables of small
per-kind methods: :data:`_VALUES` (values and names, not memoised) and :data:`_SHARED` (objects
recorded on their first visit, a second visit written as a reference to it); an object of no
listed kind is read by its class and attributes (:meth:`Walker.instance`). Every method writes
tagged records (:meth:`Walker.put`) into the one hash, so the order of the tables and of the
records is the fingerprint's format: a run resumed by another version compares these digests.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import logging
import sys
import threading
import types
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cnftools.nll._library import (
    code_names,
    is_library,
    lazy_names,
    library_code,
    qualified,
    type_name,
)
from cnftools.nll.sources import tensor_digest

__all__ = ["MAX_DEPTH", "Unfingerprintable", "Walker"]

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


# its public home (where it was defined before the walk moved here): tracebacks and pickles name it
Unfingerprintable.__module__ = "cnftools.nll.fingerprint"


class Walker:
    """One walk of an object graph into one SHA-256 (:attr:`h`)."""

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
        sub = Walker()
        sub.walk(obj, where, depth)
        return sub.h.hexdigest()

    # -- the walk: a dispatch on the kind of the object ----------------------------------------
    def walk(self, obj: object, where: str, depth: int) -> None:
        """Write ``obj`` (called ``where`` in messages, ``depth`` levels below the root)."""
        if depth > MAX_DEPTH:
            raise Unfingerprintable(f"{where}: nested deeper than {MAX_DEPTH} levels")
        kind = type(obj)
        if kind in _PLAIN:
            self.put(kind.__name__, obj if kind is bytes else repr(obj))  # type: ignore[arg-type]
            return
        for kinds, handler in _VALUES:
            if isinstance(obj, kinds):
                handler(self, obj, where, depth)
                return
        if not self.first_visit(obj):
            return
        for kinds, handler in _SHARED:
            if isinstance(obj, kinds):
                handler(self, obj, where, depth)
                return
        self.instance(obj, where, depth)

    # -- values and names (not memoised) ---------------------------------------------------
    def enum_member(self, obj: enum.Enum, where: str, depth: int) -> None:
        self.put("enum", f"{type_name(obj)}.{obj.name}")
        self.walk(obj.value, f"{where}.value", depth + 1)

    def plain_subclass(self, obj: Any, where: str, depth: int) -> None:
        """A subclass of a plain type: its value, then its attributes."""
        base = next(b for b in _PLAIN if isinstance(obj, b))
        self.put(
            f"{base.__name__}:{type_name(obj)}", bytes(obj) if base is bytes else repr(base(obj))
        )
        self.attributes(obj, where, depth)

    def numpy_scalar(self, obj: np.generic, where: str, depth: int) -> None:
        self.put(f"np:{obj.dtype.str}", np.asarray(obj).tobytes())
        if obj.dtype.kind == "O":  # pragma: no cover - object scalars are not created by numpy
            self.walk(obj.item(), where, depth + 1)

    def tensor(self, obj: Tensor, where: str, depth: int) -> None:
        self.put("tensor", self.tensor_digest(obj, where))

    def torch_constant(self, obj: Any, where: str, depth: int) -> None:
        """A dtype, device, layout or memory format: its name."""
        self.put(type(obj).__name__, str(obj))

    def size(self, obj: torch.Size, where: str, depth: int) -> None:
        self.put("Size", repr(tuple(obj)))

    def numpy_dtype(self, obj: np.dtype, where: str, depth: int) -> None:
        self.put("np.dtype", repr(obj.descr if obj.fields else obj.str))

    def module_name(self, obj: types.ModuleType, where: str, depth: int) -> None:
        self.put("module", obj.__name__)

    def tuple_items(self, obj: tuple, where: str, depth: int) -> None:
        """Immutable: not memoised (a cycle passes through a mutable object)."""
        self.put(f"tuple:{type_name(obj)}", str(len(obj)))
        for i, item in enumerate(obj):
            self.walk(item, f"{where}[{i}]", depth + 1)
        if type(obj) is not tuple and hasattr(obj, "__dict__"):
            self.attributes(obj, where, depth)

    # -- objects recorded on their first visit ---------------------------------------------
    def list_items(self, obj: list, where: str, depth: int) -> None:
        self.put(f"list:{type_name(obj)}", str(len(obj)))
        for i, item in enumerate(obj):
            self.walk(item, f"{where}[{i}]", depth + 1)
        if type(obj) is not list:
            self.attributes(obj, where, depth)

    def dict_items(self, obj: dict, where: str, depth: int) -> None:
        self.mapping(obj, where, depth)
        if type(obj) is not dict:
            extra = {"default_factory": getattr(obj, "default_factory", None)}
            self.attributes(obj, where, depth, extra)

    def set_items(self, obj: set | frozenset, where: str, depth: int) -> None:
        digests = sorted(self.sub_digest(item, f"{where}{{…}}", depth + 1) for item in obj)
        self.put(f"set:{type_name(obj)}", "".join(digests))

    def partial(self, obj: functools.partial, where: str, depth: int) -> None:
        self.put("partial")
        self.walk(obj.func, f"{where}.func", depth + 1)
        self.walk(obj.args, f"{where}.args", depth + 1)
        self.walk(obj.keywords, f"{where}.keywords", depth + 1)
        self.attributes(obj, where, depth)

    def method(self, obj: types.MethodType, where: str, depth: int) -> None:
        self.put("method")
        self.walk(obj.__func__, f"{where}.__func__", depth + 1)
        self.walk(obj.__self__, f"{where}.__self__", depth + 1)

    def method_wrapper(self, obj: staticmethod | classmethod, where: str, depth: int) -> None:
        self.put(type(obj).__name__)
        self.walk(obj.__func__, f"{where}.__func__", depth + 1)

    def accessors(self, obj: property, where: str, depth: int) -> None:
        self.put("property")
        for part in ("fget", "fset", "fdel"):
            self.walk(getattr(obj, part), f"{where}.{part}", depth + 1)

    def generator(self, obj: torch.Generator, where: str, depth: int) -> None:
        self.put("generator", str(obj.device))
        self.put("tensor", self.tensor_digest(obj.get_state(), f"{where}.get_state()"))

    def logger(self, obj: logging.Logger, where: str, depth: int) -> None:
        """Where messages go, not what is computed."""
        self.put("logger", obj.name)

    def lock(self, obj: object, where: str, depth: int) -> None:
        """Synchronises the call, computes nothing."""
        self.put("lock")

    def instance(self, obj: object, where: str, depth: int) -> None:
        """Any other object: its class, then its attributes (a C object: its reduction)."""
        kind = type(obj)
        self.put(f"object:{type_name(obj)}")
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
        self.put(f"dict:{type_name(d)}", str(len(d)))
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
        lazy = lazy_names(type(obj)) if isinstance(obj, torch.distributions.Distribution) else ()
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
                f"{where} is a {type_name(obj)} whose content cannot be read; pass run_id= (or "
                "give the field a readable form, e.g. plain attributes)"
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
        self.put("class", qualified(cls))
        if library_code(cls) or not self.first_visit(cls):
            return
        for klass in cls.__mro__:
            if library_code(klass):
                continue
            self.put("class-body", qualified(klass))
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
                self.walk(value, f"{qualified(klass)}.{key}", depth + 1)

    def function(self, fn: types.FunctionType, where: str, depth: int) -> None:
        self.put("function", qualified(fn))
        if library_code(fn):
            return  # library code: identified by its name (and the library's version)
        # a lambda, a closure, a function of your code (or one a library made at run time)
        self.code(fn.__code__, f"{where}.__code__", depth + 1)
        self.walk(fn.__defaults__, f"{where}.__defaults__", depth + 1)
        self.walk(fn.__kwdefaults__, f"{where}.__kwdefaults__", depth + 1)
        for i, cell in enumerate(fn.__closure__ or ()):
            self.cell(cell, f"{where}.__closure__[{i}]", depth + 1)
        self.walk(dict(vars(fn)), f"{where}.__dict__", depth + 1)
        library = is_library(fn.__module__)  # its globals are a library's: read as such
        names, attributes, imports = code_names(fn.__code__)
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
                self.put("library", f"{type_name(value)}:{qualified(value)}")
            return
        self.put("module", value.__name__)
        if depth > MAX_DEPTH:
            raise Unfingerprintable(f"{where}: nested deeper than {MAX_DEPTH} levels")
        self.keep.append(value)
        library = is_library(value.__name__)
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
                self.put("library", f"{value.__name__}.{name}:{type_name(attribute)}")

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
        self.put(f"script:{getattr(obj, 'original_name', type_name(obj))}")
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


_Handler = Callable[[Walker, Any, str, int], None]

# The dispatch, in order: the first kind an object is an instance of decides. Values and names
# are written as they are; the others are memoised (a second visit: a reference to the first).
_VALUES: tuple[tuple[Any, _Handler], ...] = (
    (enum.Enum, Walker.enum_member),
    (_PLAIN, Walker.plain_subclass),  # a subclass of a plain type (the plain types are above)
    (np.generic, Walker.numpy_scalar),
    (Tensor, Walker.tensor),
    (np.ndarray, Walker.array),  # an array of objects is memoised by array()
    (torch.dtype | torch.device | torch.layout | torch.memory_format, Walker.torch_constant),
    (torch.Size, Walker.size),
    (np.dtype, Walker.numpy_dtype),
    (types.ModuleType, Walker.module_name),
    (_BUILTIN_CALLABLES, Walker.builtin),
    (type, Walker.klass),  # memoised by klass() (library classes by name only)
    (tuple, Walker.tuple_items),
)
_SHARED: tuple[tuple[Any, _Handler], ...] = (
    (list, Walker.list_items),
    (dict, Walker.dict_items),
    (set | frozenset, Walker.set_items),
    (functools.partial, Walker.partial),
    (types.FunctionType, Walker.function),
    (types.MethodType, Walker.method),
    (types.CodeType, Walker.code),
    (staticmethod | classmethod, Walker.method_wrapper),
    (property, Walker.accessors),
    (types.CellType, Walker.cell),
    (torch.Generator, Walker.generator),
    (logging.Logger, Walker.logger),
    (_LOCK_TYPES, Walker.lock),
    (torch.jit.ScriptModule | torch.jit.ScriptFunction, Walker.script),
)
