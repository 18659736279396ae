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

import hashlib
import json
from typing import Any

from cnftools.nll._walk import MAX_DEPTH, Unfingerprintable, Walker

__all__ = ["MAX_DEPTH", "Unfingerprintable", "fingerprint", "settings_key"]


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
    walker = Walker()
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
