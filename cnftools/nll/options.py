"""The option groups of :func:`cnftools.dataset_nll`: what the rows are, where results go, how the
run is executed. Small frozen dataclasses, each validated on construction (the error names the
field, what was expected and the fix), so a bad option fails before any data is read.

- :class:`DataOptions`: which columns, per-row extras (labels), dequantization, bits per dim.
- :class:`Output`: the ``.parquet`` file, resume / overwrite, kept chunks, the run's identity.
- :class:`Execution`: batch size, device, dtype, threads, progress, seed, Hutchinson probe rounds.

Example:
    >>> from cnftools.nll import Execution, Output
    >>> Execution(batch_size=128, seed=3).batch_size
    128
    >>> Output("nll.parquet", resume=True).resume
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cnftools._checks import check_device, check_int
from cnftools._resources import check_threads
from cnftools.data import Dequantization

__all__ = ["DataOptions", "Execution", "Output"]


@dataclass(frozen=True)
class DataOptions:
    r"""What the rows are, beyond the data itself.

    Args:
        columns: column names, for a DataFrame or a ``.csv``/``.parquet`` file (default: all,
            which must be numeric).
        extras: keyword arguments of a conditional field, ``v(x, t, **extras)``. A tensor or
            array must say how it is used: :class:`~cnftools.nll.PerRow` ``(y)`` gives data row
            ``i`` the value ``y[i]`` (``N`` rows, checked; sliced with every batch and shard,
            part of each batch's content hash), :class:`~cnftools.nll.Shared` ``(table)`` passes
            it whole to every call. A bare tensor or array with a dimension is refused, naming
            the extra. Numbers, strings, 0-dim tensors and other objects are passed as they are.
            A stream (``DataLoader``, ``IterableDataset``) takes ``Shared`` values only; its
            per-row values come as ``(x, y)`` items.
        dequantization: a :class:`~cnftools.Dequantization` for integer data; adds ``bpd``.
        bpd_dims: bits/dim for continuous data: adds a ``bpd`` column
            :math:`= \mathrm{nll} / (D \ln 2)` with :math:`D` = ``bpd_dims`` (e.g. ``C * H * W``
            for images). Not with ``dequantization``, which computes ``bpd`` over the data's own
            dimensions.
    """

    columns: Sequence[str] | None = None
    extras: Mapping[str, Any] | None = field(default=None, compare=False)
    dequantization: Dequantization | None = None
    bpd_dims: int | None = None

    def __post_init__(self) -> None:
        if self.columns is not None and (
            isinstance(self.columns, str)
            or not isinstance(self.columns, Sequence)
            or not all(isinstance(c, str) for c in self.columns)
        ):
            raise TypeError(
                f"DataOptions(columns=...) must be a list of column names, got {self.columns!r}"
            )
        if self.extras is not None and not isinstance(self.extras, Mapping):
            raise TypeError(
                f"DataOptions(extras=...) must be a dict of keyword arguments, got "
                f"{type(self.extras).__name__}"
            )
        if self.dequantization is not None and not isinstance(self.dequantization, Dequantization):
            raise TypeError(
                f"DataOptions(dequantization=...) must be a Dequantization(levels=..., "
                f"samples=...), got {self.dequantization!r}"
            )
        if self.bpd_dims is not None:
            check_int("DataOptions(bpd_dims=...)", self.bpd_dims, low=1)
            if self.dequantization is not None:
                raise ValueError(
                    "DataOptions: bpd_dims is for continuous data; with dequantization= the bpd "
                    "column is already computed over the data's own dimensions: drop bpd_dims"
                )


@dataclass(frozen=True)
class Output:
    """Where the results go, and how a run resumes.

    Args:
        path: a ``.parquet`` file for the result; chunks go to ``path + ".chunks/"`` as they
            finish and ``path + ".lock"`` keeps a second process away.
        resume: continue a run killed or stopped earlier; its field, prior, data and settings
            are checked by content (docs/guarantees.md). When there is none, start one.
            Contradicts ``overwrite``.
        overwrite: discard an existing file and its chunk directory instead of failing.
        keep_chunks: keep the chunk directory after the final file is written.
        run_id: the identity of the field and prior for ``resume``, instead of their content
            fingerprint (:func:`cnftools.nll.fingerprint`): needed when a part of the field
            cannot be read (a generator, a file handle; the error names it). Change it whenever
            the model changes.
    """

    path: str | os.PathLike[str]
    resume: bool = False
    overwrite: bool = False
    keep_chunks: bool = False
    run_id: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str | os.PathLike):
            raise TypeError(
                f"Output(path=...) must be a path to a .parquet file, got "
                f"{type(self.path).__name__}"
            )
        for name in ("resume", "overwrite", "keep_chunks"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"Output({name}=...) must be a bool")
        if self.resume and self.overwrite:
            raise ValueError(
                "Output: resume=True (--resume) and overwrite=True (--overwrite) contradict each "
                "other: resume continues the run at path, overwrite discards it; give one"
            )
        if self.run_id is not None and (not isinstance(self.run_id, str) or not self.run_id):
            raise TypeError(f"Output(run_id=...) must be a non-empty string, got {self.run_id!r}")

    def checked_path(self) -> Path:
        """The file's path, after checking that nothing in the way is a directory or a file
        cnftools did not make (called when the run starts, not at construction)."""
        path = Path(self.path)
        if path.is_dir():
            raise ValueError(
                f"Output path {os.fspath(path)!r} is a directory; give a .parquet file name "
                f"(e.g. {os.fspath(path / 'nll.parquet')!r})"
            )
        chunks = path.with_name(path.name + ".chunks")
        if chunks.exists() and not chunks.is_dir():
            raise ValueError(
                f"{os.fspath(chunks)!r}, where the chunks of the output go, is a file, not a "
                "directory cnftools made; move it away or choose another path"
            )
        lock = path.with_name(path.name + ".lock")
        if lock.is_dir():
            raise ValueError(
                f"{os.fspath(lock)!r}, the lock file of the output, is a directory; move it away "
                "or choose another path"
            )
        return path


@dataclass(frozen=True)
class Execution:
    """How the run is executed. None of these changes an exact run's numbers except ``dtype``
    (and, for Hutchinson, ``batch_size`` and ``seed``, which decide the probes).

    Args:
        batch_size: rows per ODE solve. With an exact divergence a row's value does not depend
            on it (every row is solved on its own steps, docs/guarantees.md), except for a field
            of one time per batch (``as_velocity(..., time="scalar")``); Hutchinson probes are
            drawn per batch, so those values do. Resume and multi-process runs keep it.
        device: where to compute (default: the data's device, else the field's, else CPU; under
            ``torch.distributed``, ``cuda:LOCAL_RANK`` when CUDA is available, else CPU).
        dtype: computation dtype (default: the data's floating dtype; for integer data the
            field's parameter dtype, else torch's default).
        num_threads: torch threads for the run, from 1 to the cores this process may use,
            restored afterwards. Default: cnftools' thread policy (an enclosing
            ``cnftools.threads(n)`` block, else ``CNFTOOLS_THREADS``, else the idle cores of
            this process's share of the machine).
        progress: a tqdm bar (rows, rows/s) on rank 0; default: on when stderr is a terminal.
        seed: seeds every random draw; unit ``(batch, round)`` uses a generator seeded from
            ``(seed, batch, round)``.
        target_stderr: Hutchinson only: add probe rounds (of ``n_probes`` each), only to the
            rows whose probe noise is large, until the probe standard error of the mean NLL is at
            most this (nats); needs ``n_probes >= 2``.
        max_probes: hard cap on the probes per row that ``target_stderr`` may use; a target not
            met within it gives a warning and ``summary["target_met"] = False``.
    """

    batch_size: int = 256
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None
    num_threads: int | None = None
    progress: bool | None = None
    seed: int = 0
    target_stderr: float | None = None
    max_probes: int = 1024

    def __post_init__(self) -> None:
        check_int("Execution(batch_size=...)", self.batch_size, low=1)
        check_int("Execution(seed=...)", self.seed, low=0)
        check_int("Execution(max_probes=...)", self.max_probes, low=1)
        if self.num_threads is not None:
            check_threads("Execution(num_threads=...)", self.num_threads)
        if self.device is not None:
            object.__setattr__(self, "device", check_device("Execution(device=...)", self.device))
        if self.dtype is not None and not (
            isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point
        ):
            raise TypeError(
                f"Execution(dtype=...) must be a floating torch.dtype, got {self.dtype!r}"
            )
        if self.progress is not None and not isinstance(self.progress, bool):
            raise TypeError("Execution(progress=...) must be True, False or None")
        target = self.target_stderr
        if target is not None and (
            isinstance(target, bool)
            or not isinstance(target, int | float)
            or not 0 < target < math.inf
        ):
            raise ValueError(
                f"Execution(target_stderr=...) must be a finite number > 0, got {target!r}"
            )
