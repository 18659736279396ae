"""What the fingerprint walk reads by name: library code, and the names a code object reads.

*Library code* is code of an installed distribution (torch, numpy, cnftools itself, ...) or of
the standard library: :mod:`cnftools.nll.fingerprint` identifies it by its qualified name (the
library versions are part of a run's identity instead). These helpers decide what is library
code and what a function's code reads (its globals, the attributes and modules it names).
"""

from __future__ import annotations

import dis
import functools
import importlib.metadata
import os
import site
import sys
import sysconfig
import types
from typing import Any

import torch

__all__ = ["code_names", "is_library", "lazy_names", "library_code", "qualified", "type_name"]

_GLOBAL_OPS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"})
_ATTRIBUTE_OPS = frozenset(
    {"LOAD_ATTR", "LOAD_METHOD", "STORE_ATTR", "DELETE_ATTR", "IMPORT_FROM", "LOAD_SUPER_ATTR"}
)


def qualified(obj: object) -> str:
    """``module.qualname`` of a class or function (``None`` for a part it lacks)."""
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', None)}"


def type_name(obj: object) -> str:
    """The qualified name of ``obj``'s class."""
    return qualified(type(obj))


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
def is_library(module: str | None) -> bool:
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


def library_code(obj: Any) -> bool:
    """A class or function of library code *importable by its qualified name*: a lambda, a
    closure or a function made at run time (even by a library, or in a doctest) is not."""
    if not is_library(getattr(obj, "__module__", None)):
        return False
    target: Any = sys.modules.get(obj.__module__)
    for part in getattr(obj, "__qualname__", "<>").split("."):
        try:
            target = vars(target).get(part) if target is not None else None
        except TypeError:  # no __dict__
            return False
    return target is obj


@functools.lru_cache(maxsize=4096)
def code_names(code: types.CodeType) -> tuple[frozenset, frozenset, frozenset]:
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
            for mine, nested in zip(found, code_names(const), strict=True):
                mine |= nested
    return frozenset(found[0]), frozenset(found[1]), frozenset(found[2])


def lazy_names(kind: type) -> set[str]:
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
