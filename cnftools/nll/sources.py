r"""Row sources for :func:`cnftools.dataset_nll`: every supported kind of data, read batch by batch.

A :class:`RowSource` yields the rows of a dataset as consecutive batches ``(B, *event)`` in a fixed
order, each with a dict of per-row *extras* (the labels of a dataset that yields ``(x, y)`` pairs,
as ``{"y": y}``, and the :class:`PerRow` values of ``dataset_nll(extras=)``; :class:`Shared`
values are passed whole), and never holds more than one batch at a time. Two kinds:

* random access (a tensor, numpy array, DataFrame, ``.npy``/``.csv``/``.parquet`` file, map-style
  ``Dataset``): the number of rows :math:`N` is known and a batch that is not needed is not read;
* streams (a ``DataLoader`` or an ``IterableDataset``): rows are read in the iteration order,
  re-iterated from the start on every pass (so the order must be deterministic for a resume; the
  content hash of every unit is checked, see docs/guarantees.md). A row is identified by its
  *position* in a pass, never by its content: the source first reads the stream once to the end
  and counts its rows (:attr:`RowSource.counted`), and every later pass must yield exactly that
  many rows, starting again from the first. A one-shot iterator (its second pass yields nothing,
  or continues where the first stopped) is refused, whatever its rows hold — 100 identical rows
  cannot be mistaken for a restart. :math:`N` (:attr:`RowSource.n`) is set at the end of the
  first computing pass.

Peak memory of a pass is :math:`O(\text{batch\_size} + \text{the loader's batch})` rows, whatever
:math:`N` (tested by counting live rows in tests/nll/test_sources.py).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import Tensor

__all__ = ["Batch", "PerRow", "RowSource", "Shared", "read_rows", "tensor_digest"]


class PerRow:
    """An extra of :func:`cnftools.dataset_nll` with one value per data row: row ``i`` of the data
    gets ``values[i]``, sliced with every batch (and shard) and part of each batch's content hash.

    ``values`` is a tensor or a numeric numpy array whose first dimension is the number of data
    rows ``N`` (checked before any solve). Labels that a dataset yields as ``(x, y)`` items are
    per row already and need no wrapper.

    Args:
        values: ``(N, ...)`` values, one per data row.

    Example:
        >>> import torch
        >>> PerRow(torch.tensor([0, 1, 1]))
        PerRow(shape=(3,), dtype=torch.int64)
    """

    __slots__ = ("values",)

    def __init__(self, values: object) -> None:
        self.values = _as_row_values(values, "PerRow(...)")

    def __repr__(self) -> str:
        return f"PerRow(shape={tuple(self.values.shape)}, dtype={self.values.dtype})"


class Shared:
    """An extra of :func:`cnftools.dataset_nll` passed whole to every call of the field (a lookup
    table, a class-embedding matrix, a context tensor shared by all rows): never sliced, whatever
    its shape, and part of the run's identity (hashed by content).

    Args:
        value: any value; typically a tensor or numpy array.

    Example:
        >>> import torch
        >>> Shared(torch.zeros(3, 2))
        Shared(shape=(3, 2))
    """

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        if isinstance(value, PerRow | Shared):
            raise TypeError(f"Shared(...) of a {type(value).__name__}: give the value itself")
        self.value = value

    def __repr__(self) -> str:
        shape = getattr(self.value, "shape", None)
        inner = f"shape={tuple(shape)}" if shape is not None else type(self.value).__name__
        return f"Shared({inner})"


def _as_row_values(values: object, what: str) -> Tensor:
    """``values`` as a tensor with at least one dimension, or a clear error.

    Numpy arrays in a non-native byte order are converted to the native one (their values are
    kept); arrays of strings or objects are refused.
    """
    if isinstance(values, PerRow | Shared):
        raise TypeError(f"{what} of a {type(values).__name__}: give the values themselves")
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(_native(values, f"{what} (it must hold numbers)"))
    if not isinstance(values, Tensor):
        raise TypeError(
            f"{what} must be a tensor or numpy array with one value per data row, got "
            f"{type(values).__name__}"
        )
    if values.dim() < 1:
        raise ValueError(
            f"{what} must have a first dimension with one entry per data row, got a 0-dim "
            "tensor; a value shared by every row needs no wrapper (or use Shared(...))"
        )
    return values.detach()


@dataclass
class Batch:
    """One batch of rows: ``x`` of shape ``(B, *event)`` (``None`` when not read), rows
    ``start .. start + size - 1`` of the data, and per-row ``extras`` (first dimension ``B``)."""

    index: int
    start: int
    size: int
    x: Tensor | None
    extras: dict[str, Tensor] = field(default_factory=dict)
    hashed: str | None = field(default=None, repr=False)

    def digest(self) -> str:
        """SHA-256 of the batch's content (dtype, shape and bytes of ``x`` and of every extra)."""
        assert self.x is not None
        if self.hashed is not None:
            return self.hashed
        h = hashlib.sha256()
        h.update(tensor_digest(self.x).encode())
        for key in sorted(self.extras):
            h.update(key.encode())
            h.update(tensor_digest(self.extras[key]).encode())
        self.hashed = h.hexdigest()
        return self.hashed


def tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on the host, contiguous)."""
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _native(array: np.ndarray, what: str) -> np.ndarray:
    """A numeric array in the machine's byte order (values kept), or a ``TypeError`` naming
    ``what`` for strings, objects and other non-numbers."""
    if array.dtype.kind not in "biuf":
        raise TypeError(
            f"{what} is a numpy array of dtype {array.dtype}; expected numbers (bool, integer or "
            "float)"
        )
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return np.ascontiguousarray(array)


def _item_tensor(value: object, what: str, where: str, part: str) -> Tensor:
    """One part of an item (``x`` or ``y``) as a tensor, or an error naming the item."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, Mapping):
        raise TypeError(
            f"{what}: {where} is a dict (keys {sorted(map(str, value))[:5]}); dataset_nll reads "
            "items x or (x, y): yield a tensor or a tuple, e.g. (item['x'], item['y'])"
        )
    if isinstance(value, np.ndarray):
        value = _native(value, f"{what}: {part} of {where}")
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(
            f"{what}: {part} of {where} cannot be made a tensor ({error}); rows must be numeric "
            "and all of one shape (ragged rows are not supported)"
        ) from None


def _split_item(
    value: object, what: str, where: str = "an item"
) -> tuple[Tensor, dict[str, Tensor]]:
    """``x`` or ``(x, y)`` (or ``(x, y, ...)``: the rest is ignored) -> ``(x, {"y": y})``."""
    extras: dict[str, Tensor] = {}
    if isinstance(value, tuple | list):
        if not value:
            raise ValueError(f"{what}: {where} is an empty tuple; expected x or (x, y)")
        if len(value) > 1 and value[1] is not None:
            extras["y"] = _item_tensor(value[1], what, where, "y")
        value = value[0]
    return _item_tensor(value, what, where, "x"), extras


def _check_rows(x: Tensor, what: str) -> Tensor:
    if x.dim() < 2:
        raise ValueError(
            f"{what} must have shape (N, *event) with at least one event dimension, got "
            f"{tuple(x.shape)}; for 1-D data use x[:, None]"
        )
    if x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{what} must hold real numbers, got dtype {x.dtype}")
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(
            f"{what} has rows with no values: event shape {tuple(x.shape[1:])} (a zero-size "
            "dimension); a density needs at least one value per row"
        )
    return x


class RowSource:
    """Rows of a dataset, read batch by batch in a fixed order (see the module docstring).

    Attributes:
        n: the number of rows, or ``None`` for a stream not yet read to the end.
        event: the event shape of a row.
        streaming: whether the rows come from a ``DataLoader``/``IterableDataset``.
    """

    def __init__(
        self,
        event: tuple[int, ...],
        n: int | None,
        get: Callable[[int, int], tuple[Tensor, dict[str, Tensor]]] | None = None,
        stream: Callable[[], Iterator[tuple[Tensor, dict[str, Tensor]]]] | None = None,
        what: str = "data",
    ) -> None:
        self.event, self.n, self._get, self._stream, self.what = event, n, get, stream, what
        self.streaming = stream is not None
        self.counted: int | None = n  # rows of a stream, counted by a first full pass
        self.first_digest: str | None = None
        self.row_extras: dict[str, Tensor] = {}
        self.item_extras = True  # False: the (x, y) items' y is not for the field (dropped)

    def attach_extras(self, row_extras: dict[str, Tensor]) -> None:
        """Per-row extras given beside the data (``dataset_nll(..., extras={k: PerRow(...)})``):
        tensors of first dimension ``N``, sliced into every batch next to the data's own extras."""
        if row_extras and self.n is None:
            raise ValueError(
                f"extras: PerRow values need the number of rows, which a stream ({self.what}) "
                "does not know in advance; let the dataset yield (x, y) items instead"
            )
        for key, value in row_extras.items():
            if value.shape[0] != self.n:
                raise ValueError(
                    f"extras[{key!r}] has {value.shape[0]} rows for {self.n} data rows "
                    f"({self.what}); a PerRow extra needs exactly one entry per data row"
                )
        self.row_extras = dict(row_extras)

    def _with_row_extras(self, batch: Batch) -> Batch:
        if not self.row_extras or batch.x is None:
            return batch
        clash = sorted(set(self.row_extras) & set(batch.extras))
        if clash:
            raise ValueError(
                f"extras {clash} are given both by {self.what}'s (x, y) items and by extras="
            )
        sliced = {k: v[batch.start : batch.start + batch.size] for k, v in self.row_extras.items()}
        return replace(batch, extras={**batch.extras, **sliced})

    def batches(self, batch_size: int, read: Callable[[int], bool] = lambda b: True):
        """Yield :class:`Batch` es of ``batch_size`` rows in order (the last may be shorter).

        ``read(b)`` False skips reading batch ``b`` of a random-access source (its ``x`` is
        ``None``); a stream reads every batch.
        """
        if not self.streaming:
            assert self.n is not None and self._get is not None
            for b, start in enumerate(range(0, self.n, batch_size)):
                stop = min(self.n, start + batch_size)
                if not read(b):
                    yield Batch(b, start, stop - start, None)
                    continue
                x, extras = self._get(start, stop)
                batch = Batch(b, start, stop - start, self._checked(x, start), self._kept(extras))
                yield self._with_row_extras(batch)
            return
        yield from self._rebatch(batch_size)

    def _rebatch(self, batch_size: int) -> Iterator[Batch]:
        assert self._stream is not None
        xs: list[Tensor] = []
        extras: list[dict[str, Tensor]] = []
        held = start = b = 0
        expected = self.n if self.n is not None else self.counted
        for x, extra in self._stream():
            if start == held == 0 and x.shape[0]:
                self._check_restarted(x[:1])
            if expected is not None and start + held + x.shape[0] > expected:
                raise ValueError(
                    f"{self.what} yielded more than {expected} rows on this pass, and {expected} "
                    "on the first: a stream must yield the same rows in the same order on every "
                    "pass"
                )
            self._check_item_rows(x, extra, start + held)
            while x.shape[0]:
                take = min(batch_size - held, x.shape[0])
                xs.append(x[:take])
                extras.append({k: v[:take] for k, v in extra.items()})
                x, extra = x[take:], {k: v[take:] for k, v in extra.items()}
                held += take
                if held == batch_size:
                    yield self._joined(b, start, xs, extras)
                    b, start, held, xs, extras = b + 1, start + held, 0, [], []
        if held:
            yield self._joined(b, start, xs, extras)
            start += held
        if expected is not None and expected != start:
            restarted = (
                " (it did not start again from its first row: a one-shot iterator?)"
                if start < expected
                else ""
            )
            raise ValueError(
                f"{self.what} yielded {start} rows on this pass and {expected} on the first"
                f"{restarted}: dataset_nll reads a stream several times (to count it, a trial "
                "row, the rows, resume, probe rounds); a stream must yield the same rows in the "
                "same order on every pass: pass a re-iterable dataset with a fixed order, or a "
                "tensor"
            )
        self.n = start

    def _check_item_rows(self, x: Tensor, extra: dict[str, Tensor], start: int) -> None:
        """A stream's ``(x, y)`` item must give one ``y`` per row of ``x``."""
        for key, value in extra.items():
            if value.dim() < 1 or value.shape[0] != x.shape[0]:
                raise ValueError(
                    f"{self.what}: the item holding rows {start}..{start + x.shape[0] - 1} has "
                    f"{key} of shape {tuple(value.shape)} for {x.shape[0]} rows of x; each row "
                    f"needs its own {key}"
                )
        if tuple(x.shape[1:]) != self.event:
            self._checked(x, start)

    def _check_restarted(self, row: Tensor) -> None:
        """Every pass must start at the same first row: a one-shot iterator would silently skip."""
        digest = tensor_digest(row)
        if self.first_digest is None:
            self.first_digest = digest
        elif digest != self.first_digest:
            raise ValueError(
                f"{self.what} did not start again from its first row on a new pass (a one-shot "
                "iterator, or a shuffled order?): dataset_nll reads a stream several times (a "
                "trial row, the rows, resume, probe rounds); pass a re-iterable dataset with a "
                "fixed order, or a tensor"
            )

    def _joined(self, b: int, start: int, xs: list[Tensor], extras: list[dict]) -> Batch:
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        keys = set(extras[0])
        if any(set(e) != keys for e in extras):
            raise ValueError(f"{self.what}: some items are (x, y) pairs and some are not")
        joined = {k: torch.cat([e[k] for e in extras]) for k in sorted(keys)}
        return Batch(b, start, x.shape[0], self._checked(x, start), self._kept(joined))

    def _kept(self, extras: dict[str, Tensor]) -> dict[str, Tensor]:
        """The items' own extras, or none when they are not for the field (``item_extras``)."""
        return extras if self.item_extras else {}

    def _checked(self, x: Tensor, start: int) -> Tensor:
        if tuple(x.shape[1:]) != self.event:
            raise ValueError(
                f"{self.what}: rows {start}..{start + x.shape[0] - 1} have event shape "
                f"{tuple(x.shape[1:])}, expected {self.event} (the first row's)"
            )
        return x

    def first(self, count: int) -> Batch:
        """Up to ``count`` first rows and their extras (dtype inference, a trial call of the field)."""
        for batch in self.batches(count):
            assert batch.x is not None
            return batch
        if self.streaming:
            raise ValueError(
                f"{self.what} yielded no rows on its second pass after {self.counted} on the "
                "first: it did not start again from its first row (a one-shot iterator?). "
                "dataset_nll reads a stream several times (to count it, a trial row, the rows, "
                "resume, probe rounds); pass a re-iterable dataset with a fixed order, or a tensor"
            )
        raise ValueError(f"{self.what} has no rows")  # pragma: no cover - checked on creation

    def read_all(self) -> Tensor:
        """Every row as one tensor ``(N, *event)`` (for small data: the CLI's baselines)."""
        parts = [b.x for b in self.batches(4096)]
        return torch.cat(parts)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
def _from_tensor(x: Tensor, what: str) -> RowSource:
    x = _check_rows(x.detach(), what)
    if x.shape[0] < 1:
        raise ValueError(f"{what} has no rows")
    return RowSource(tuple(x.shape[1:]), x.shape[0], lambda a, b: (x[a:b], {}), what=what)


def _from_frame(frame: pd.DataFrame, columns: Sequence[str] | None, what: str) -> RowSource:
    if columns is None:
        other = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if other:
            raise ValueError(
                f"{what} has non-numeric columns {other[:10]}; choose the data columns with "
                "columns=[...]"
            )
        columns = list(frame.columns)
    else:
        if isinstance(columns, str):
            raise TypeError("columns must be a list of column names, not a single string")
        columns = list(columns)
        repeated = sorted({str(c) for c in columns if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"columns lists {repeated} more than once; give each data column once")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise ValueError(
                f"columns {missing} are not in {what}; available columns: "
                f"{list(frame.columns)[:20]}"
            )
        bad = [c for c in columns if not pd.api.types.is_numeric_dtype(frame[c])]
        if bad:
            raise TypeError(f"columns {bad} of {what} are not numeric")
    values = frame[list(columns)].to_numpy()
    return _from_tensor(torch.from_numpy(_native(values, what)), what)


def _from_dataset(dataset: torch.utils.data.Dataset, what: str) -> RowSource:
    n = len(dataset)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"{what} (a Dataset) is empty")

    def get(a: int, b: int) -> tuple[Tensor, dict[str, Tensor]]:
        items = [_split_item(dataset[i], what, f"item {i}") for i in range(a, b)]
        shapes = {tuple(i[0].shape) for i in items}
        if len(shapes) > 1:
            raise ValueError(
                f"{what}: items {a}..{b - 1} have rows of different shapes {sorted(shapes)[:4]}; "
                "every row must have the same event shape (ragged rows are not supported)"
            )
        x = torch.stack([i[0] for i in items])
        keys = set(items[0][1])
        if any(set(i[1]) != keys for i in items):
            raise ValueError(f"{what}: items {a}..{b - 1}: some are (x, y) pairs and some are not")
        try:
            extras = {k: torch.stack([i[1][k] for i in items]) for k in sorted(keys)}
        except RuntimeError as error:
            raise ValueError(
                f"{what}: the labels y of items {a}..{b - 1} differ in shape ({error})"
            ) from None
        return x, extras

    first, _ = get(0, 1)
    return RowSource(tuple(first.shape[1:]), n, get, what=what)


def _from_stream(data: object, what: str) -> RowSource:
    # a DataLoader yields batches unless it was made with batch_size=None and no batch_sampler
    batched = isinstance(data, torch.utils.data.DataLoader) and data.batch_sampler is not None

    def stream() -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        for i, value in enumerate(data):  # type: ignore[attr-defined]
            x, extras = _split_item(value, what, f"{'batch' if batched else 'item'} {i}")
            if not batched:  # items are single rows
                x, extras = x[None], {k: v[None] for k, v in extras.items()}
            yield _check_rows(x, what), extras

    # The first pass reads the stream to the end and counts its rows (holding one item at a
    # time): every later pass is checked against that count, so a one-shot iterator can never
    # pass for a restarted one, whatever its rows hold.
    source: RowSource | None = None
    count = 0
    for x, _ in stream():
        if source is None:
            if not x.shape[0]:
                continue
            source = RowSource(tuple(x.shape[1:]), None, stream=stream, what=what)
            source.first_digest = tensor_digest(x[:1])
        source._checked(x, count)
        count += x.shape[0]
    if source is None:
        raise ValueError(f"{what} (a {type(data).__name__}) yielded no rows")
    source.counted = count
    return source


def _from_path(path: Path, columns: Sequence[str] | None, what: str) -> RowSource:
    if not path.exists():
        raise FileNotFoundError(f"{what} file {os.fspath(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if columns is not None:
            raise ValueError(
                f"columns= applies to a .csv/.parquet file or a DataFrame, not the .npy file "
                f"{os.fspath(path)!r} (its rows are used whole)"
            )
        try:
            array = np.load(path, allow_pickle=False, mmap_mode="r")
        except ValueError as error:
            raise ValueError(
                f"{what} file {os.fspath(path)!r} is not a numeric .npy: {error}"
            ) from None
        if array.dtype.kind not in "biuf" or array.ndim < 2:
            raise ValueError(
                f"{what} file {os.fspath(path)!r} must hold a numeric array (N, *event), got "
                f"dtype {array.dtype} shape {array.shape}"
            )

        def get(a: int, b: int) -> tuple[Tensor, dict[str, Tensor]]:  # memory-mapped reads
            return torch.from_numpy(_native(np.array(array[a:b]), what)), {}  # a writable copy

        return RowSource(tuple(array.shape[1:]), int(array.shape[0]), get, what=what)
    if suffix == ".csv":
        return _from_frame(pd.read_csv(path), columns, what)
    if suffix in (".parquet", ".pq"):
        return _from_frame(pd.read_parquet(path), columns, what)
    raise ValueError(f"{what} file {os.fspath(path)!r}: expected a .npy, .csv or .parquet file")


def read_rows(
    data: object, columns: Sequence[str] | None = None, *, what: str = "data"
) -> RowSource:
    """A :class:`RowSource` over ``data``, checked: the row reader of ``dataset_nll`` and the CLI.

    Args:
        data: a tensor or numpy array ``(N, *event)``, a DataFrame, a path to a ``.npy``
            (memory-mapped), ``.csv`` or ``.parquet`` file, a map-style ``Dataset`` (items ``x``
            or ``(x, y)``), or a ``DataLoader``/``IterableDataset`` (streamed).
        columns: column names, for a DataFrame or a ``.csv``/``.parquet`` file only.
        what: the caller's name for the argument, used in error messages.

    Returns:
        The source.

    Raises:
        TypeError, ValueError, FileNotFoundError: unsupported or empty data, missing or
            non-numeric columns, ``columns`` with data that has none.

    Example:
        >>> import torch
        >>> rows = read_rows(torch.zeros(5, 2))
        >>> rows.n, rows.event, [b.size for b in rows.batches(2)]
        (5, (2,), [2, 2, 1])
    """
    is_table = isinstance(data, pd.DataFrame | str | os.PathLike)
    if columns is not None and not is_table:
        raise ValueError(
            f"columns= applies to a DataFrame or a .csv/.parquet file only, not {what}"
        )
    if isinstance(data, Tensor):
        return _from_tensor(data, what)
    if isinstance(data, np.ndarray):
        return _from_tensor(torch.from_numpy(_native(data, what)), what)
    if isinstance(data, pd.DataFrame):
        return _from_frame(data, columns, what)
    if isinstance(data, str | os.PathLike):
        return _from_path(Path(data), columns, what)
    if isinstance(data, torch.utils.data.DataLoader | torch.utils.data.IterableDataset):
        return _from_stream(data, what)
    if isinstance(data, torch.utils.data.Dataset) and hasattr(data, "__len__"):
        return _from_dataset(data, what)
    raise TypeError(
        f"{what} must be a tensor, a numpy array, a DataFrame, a Dataset, an IterableDataset, a "
        f"DataLoader or a path to a .npy/.csv/.parquet file, got {type(data).__name__}"
    )
