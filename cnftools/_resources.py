"""What a cnftools call takes from the machine: torch threads, and freed heap memory given back.

**Threads: one policy for every entry point.** ``log_likelihood``, ``sample``,
``sample_with_log_prob``, ``train_cfm``, ``dataset_nll`` and every ``cnftools`` command run their
work under :func:`entry_threads`, which sets torch's thread count for the call and restores the
caller's afterwards. The count is, first match wins:

1. the count of an enclosing :func:`threads` block (``with cnftools.threads(4): ...``), or the
   per-call override where an entry point has one (``dataset_nll(num_threads=)``, ``--threads``);
2. the environment variable :data:`THREADS_ENV` (``CNFTOOLS_THREADS=2``);
3. on the CPU, :func:`choose_threads`: the idle cores of this process's share of the machine (1 on
   a busy machine, where several threads on small tensors wait on each other); off the CPU,
   torch's current count.

A call made inside another (``dataset_nll`` solving its batches with ``log_likelihood``) keeps the
count of the outer one. Every count is checked by :func:`check_threads`: an integer from 1 to the
number of cores this process may use.

**Memory.** :class:`HeapTrimmer` hands the heap's freed pages back to the operating system (glibc's
``malloc_trim``) during long loops, at a bounded share of the run time (see there).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from numbers import Integral
from typing import Any, TypeVar

import torch

__all__ = [
    "THREADS_ENV",
    "HeapTrimmer",
    "check_threads",
    "choose_threads",
    "entry_threads",
    "process_alive",
    "threads",
    "usable_cores",
    "with_thread_policy",
]


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (this process counts; a pid we may not signal
    counts as alive). Used to tell a dead writer's leftovers (locks, temporary files).

    Example:
        >>> process_alive(os.getpid())
        True
    """
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


THREADS_ENV = "CNFTOOLS_THREADS"
"""Environment variable giving the torch thread count of every cnftools call (an integer >= 1)."""

_STATE = threading.local()  # .count: the count of the innermost active policy block, if any

F = TypeVar("F", bound=Callable[..., Any])


def usable_cores() -> int:
    """The number of CPU cores this process may run on (its affinity mask, else ``os.cpu_count``).

    Example:
        >>> usable_cores() >= 1
        True
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def check_threads(name: str, value: object) -> int:
    """Require a thread count from 1 to :func:`usable_cores`; the error names ``name``.

    More threads than cores never speeds torch up, and huge counts crash it (a segmentation fault
    at 100,000) or Arrow, so they are refused before any work.

    Example:
        >>> check_threads("num_threads", 1)
        1
    """
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer number of threads, got {value!r}")
    value = int(value)
    cores = usable_cores()
    if not 1 <= value <= cores:
        raise ValueError(
            f"{name} must be from 1 to {cores} (the CPU cores this process may use, from "
            f"os.sched_getaffinity), got {value}; pass a count in that range or leave it unset "
            "for the automatic choice"
        )
    return value


def choose_threads(device: torch.device | str | None = None) -> int:
    r"""The automatic thread count: the idle cores of this process's share of the machine.

    :math:`\max(1, \min(T, \lfloor (C - \text{load}) / P \rfloor))` with :math:`T` torch's current
    count, :math:`C` the usable cores, load the 1-minute load average and :math:`P` the processes
    of this machine under torchrun (``LOCAL_WORLD_SIZE``). On a busy machine that is 1: several
    threads on small tensors then wait on each other (10-100x slower measured on a loaded 2-core
    machine). Off the CPU the current count is kept.

    Example:
        >>> 1 <= choose_threads("cpu") <= usable_cores()
        True
    """
    current = torch.get_num_threads()
    if device is not None and torch.device(device).type != "cpu":
        return current
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover
        load = 0.0
    local = max(1, _env_int("LOCAL_WORLD_SIZE", 1))
    return max(1, min(current, math.floor((usable_cores() - load) / local)))


def _env_int(name: str, default: int) -> int:
    """An integer environment variable (set by torchrun), or a ``ValueError`` naming it."""
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"the environment variable {name}={text!r} must be an integer (torchrun sets it; "
            "unset it or fix its value)"
        ) from None


def _env_threads() -> int | None:
    text = os.environ.get(THREADS_ENV)
    if text is None or not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(
            f"the environment variable {THREADS_ENV}={text!r} must be an integer number of threads"
        ) from None
    return check_threads(f"the environment variable {THREADS_ENV}", value)


@contextlib.contextmanager
def _set(count: int) -> Iterator[int]:
    previous = torch.get_num_threads()
    outer = getattr(_STATE, "count", None)
    if count != previous:
        torch.set_num_threads(count)
    _STATE.count = count
    try:
        yield count
    finally:
        _STATE.count = outer
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@contextlib.contextmanager
def threads(count: int) -> Iterator[int]:
    """Run the block with ``count`` torch threads for every cnftools call in it (and torch's own
    work), then restore the caller's count.

    Overrides the automatic choice and :data:`THREADS_ENV` for the calls inside the block.

    Args:
        count: from 1 to the cores this process may use.

    Raises:
        TypeError, ValueError: ``count`` is not such an integer.

    Example:
        >>> import torch, cnftools
        >>> before = torch.get_num_threads()
        >>> with cnftools.threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    with _set(check_threads("threads(count)", count)) as value:
        yield value


@contextlib.contextmanager
def entry_threads(
    device: torch.device | str | None = None, count: int | None = None, name: str = "num_threads"
) -> Iterator[int]:
    """The thread policy of one entry point (see the module docstring), restored afterwards.

    Args:
        device: where the call computes (the automatic choice applies to the CPU only).
        count: the entry point's own override (``num_threads=``, ``--threads``), checked as
            ``name``; ``None`` follows the policy.
        name: the override's name in errors.

    Yields:
        The count in force.
    """
    if count is not None:
        with _set(check_threads(name, count)) as value:
            yield value
        return
    active = getattr(_STATE, "count", None)
    if active is not None:  # inside another cnftools call or a threads() block: keep its count
        yield active
        return
    env = _env_threads()
    with _set(env if env is not None else choose_threads(device)) as value:
        yield value


def with_thread_policy(func: F) -> F:
    """Decorate an entry point so that it runs under :func:`entry_threads` (CPU choice)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with entry_threads():
            return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or ``None`` where the C library has none (macOS, musl, Windows)."""
    try:
        func = ctypes.CDLL(None).malloc_trim  # the symbols already loaded, libc among them
    except (OSError, AttributeError, TypeError):  # pragma: no cover - not glibc
        return None
    func.argtypes = [ctypes.c_size_t]
    func.restype = ctypes.c_int
    return func


class HeapTrimmer:
    """Hand freed heap pages back to the operating system during a long loop (glibc only).

    Why: glibc raises its mmap threshold after the first large ``free``, so torch's per-batch
    tensors (about 1 MB and up) then come from the heap, and the small objects a loop keeps (each
    batch's results) end up between them. The heap then grows with the number of batches even
    though almost all of it is free: 1.2 KB per row in a ``dataset_nll`` stream at ``d = 64``
    (docs/benchmarks.md). ``malloc_trim(0)`` releases the free pages, so the resident memory stays
    flat.

    :meth:`__call__` trims at most ``share`` of the wall time: after a trim that took ``s``
    seconds, the next one waits at least ``s / share`` seconds. A no-op where the C library has
    no ``malloc_trim``.

    Args:
        share: the largest fraction of the run time spent trimming.
    """

    def __init__(self, share: float = 0.05) -> None:
        self.trim = _malloc_trim()
        self.share = share
        self.next = 0.0
        self.calls = 0

    def __call__(self) -> None:
        """Trim now unless the last trim was too recent (see the class docstring)."""
        if self.trim is None:
            return
        now = time.perf_counter()
        if now < self.next:
            return
        self.trim(0)
        self.calls += 1
        self.next = now + (time.perf_counter() - now) / self.share
