"""The chunk store of a dataset-NLL run: ``out``, its chunk directory, the lock, resume checks.

Layout (``out = FILE.parquet``)::

    FILE.parquet.lock                      the lock: flock-ed while a process writes the run
    FILE.parquet.chunks/
        meta.json                          the run's settings and fingerprints (checked on resume)
        unit-b00000000-r000.parquet        rows of batch 0, probe round 0 (+ their data hash)
        ...
    FILE.parquet                           at the end: one row per input, written atomically

Every file is written to a temporary file in the same folder, ``fsync``-ed and renamed, and
carries a SHA-256 **checksum** of its content and its **row count**, both verified whenever it is
read: a Parquet file's checksum (in its cnftools metadata) covers every decoded value, the column
names and types, the pandas metadata and the rest of the cnftools metadata; ``meta.json``'s covers
its JSON. Parquet pages also carry CRC32 page checksums (verified by Arrow on read).

On resume, each unit file is checked against the run (its checksum and row count, its run key, its
rows, the hash of its rows' data as read now). A *damaged* unit file (unreadable, truncated,
checksum mismatch) is **computed again, with a warning**; a unit file that is intact but does not
belong here (another run's, another unit's rows, malformed metadata), a damaged or foreign
``meta.json`` or final file, and a Parquet file at ``out`` that cnftools did not write are
**refused** with a message naming the file and what to do. The contract is stated in
docs/guarantees.md.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cnftools._resources import process_alive

__all__ = [
    "FORMAT",
    "ChunkStore",
    "DamagedFileError",
    "ResumeError",
    "RunLock",
    "read_checked",
    "unit_name",
    "write_atomic",
]

FORMAT = "cnftools.dataset_nll/3"
META_KEY = b"cnftools.dataset_nll"
_PANDAS_KEY = b"pandas"


class ResumeError(ValueError):
    """A run's files cannot be continued safely (the message names the file and what to do)."""


class DamagedFileError(ResumeError):
    """A file cnftools wrote fails its checksum or row count, or cannot be read at all."""


def unit_name(batch: int, round_: int) -> str:
    """File name of unit ``(batch, round)``."""
    return f"unit-b{batch:08d}-r{round_:03d}.parquet"


# ----------------------------------------------------------------------------------------------
# checksums
def _put(h: Any, data: bytes) -> None:
    h.update(f"{len(data)}:".encode())
    h.update(data)


def table_checksum(table: pa.Table, meta: Mapping[str, Any]) -> str:
    """SHA-256 of a table's decoded content and its metadata (``meta`` without ``checksum``).

    Covers the row count, every column's name, Arrow type, null mask and values (strings by their
    UTF-8 bytes), the pandas metadata (which restores dtypes) and the cnftools metadata.
    """
    h = hashlib.sha256()
    _put(h, json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode())
    _put(h, (table.schema.metadata or {}).get(_PANDAS_KEY, b""))
    _put(h, str(table.num_rows).encode())
    for field, column in zip(table.schema, table.columns, strict=True):
        _put(h, f"{field.name}:{field.type}".encode())
        _put(h, np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool).tobytes())
        values = column.to_numpy(zero_copy_only=False)
        if values.dtype == object:
            for value in values:
                _put(h, value.encode("utf-8", "surrogatepass") if isinstance(value, str) else
                     repr(value).encode())  # fmt: skip
        else:
            _put(h, values.dtype.str.encode())
            _put(h, np.ascontiguousarray(values).tobytes())
    return h.hexdigest()


def json_checksum(body: Mapping[str, Any]) -> str:
    """SHA-256 of a JSON document without its ``checksum`` key (sorted keys)."""
    text = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _fsync_directory(directory: Path) -> None:
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # pragma: no cover - Windows: the rename is as durable as it gets
        return
    try:
        handle = os.open(directory, os.O_RDONLY | flags)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(handle)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(handle)


def _temporary(path: Path) -> Path:
    """The temporary name of ``path`` while it is written: ``.NAME.PID.tmp`` in its folder."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def leftover_temporaries(path: Path) -> list[Path]:
    """Temporary files of ``path`` (``.NAME.PID.tmp``) left by writers that are gone.

    Only names of exactly that form whose ``PID`` is not a running process on this host (the
    caller holds the run's lock, so no writer on another host can be at work either).
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp")
    found = []
    for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.fullmatch(candidate.name)
        if match and not process_alive(int(match.group(1))):
            found.append(candidate)
    return found

    return True


def write_atomic(frame: pd.DataFrame, meta: Mapping[str, Any], path: Path) -> None:
    """Write ``frame`` with ``meta`` (plus its row count and checksum) to ``path``: a temporary
    file in the same folder, fsync, rename; the temporary file is removed if the write fails."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    old = {k: v for k, v in (table.schema.metadata or {}).items() if k != META_KEY}
    table = table.replace_schema_metadata(old)
    meta = {**meta, "rows": table.num_rows}
    meta["checksum"] = table_checksum(table, meta)
    table = table.replace_schema_metadata({**old, META_KEY: json.dumps(meta).encode()})
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle, write_page_checksum=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_directory(path.parent)


def _damaged(path: Path, why: str) -> DamagedFileError:
    return DamagedFileError(f"{os.fspath(path)!r} is damaged ({why})")


def read_checked(path: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a Parquet file cnftools wrote: ``(frame, cnftools metadata)``, checksum and row count
    verified.

    Raises:
        DamagedFileError: unreadable, truncated, or its checksum or row count does not match.
        ResumeError: a Parquet file without this version's cnftools metadata (not ours).
    """
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except Exception as error:
        text = str(error).splitlines()[0][:200] if str(error) else ""
        raise _damaged(path, f"unreadable: {type(error).__name__}: {text}") from error
    raw = (table.schema.metadata or {}).get(META_KEY)
    try:
        meta = None if raw is None else json.loads(raw)
    except (ValueError, RecursionError):
        raise _damaged(path, "its cnftools metadata is not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ResumeError(
            f"{os.fspath(path)!r} was not written by this version of cnftools.dataset_nll (no "
            f"{FORMAT!r} metadata); move it away or pass overwrite=True"
        )
    try:
        checksum = table_checksum(table, meta)
    except Exception as error:  # a damaged schema (a column name that is not UTF-8, ...)
        text = str(error).splitlines()[0][:200] if str(error) else ""
        raise _damaged(path, f"unreadable: {type(error).__name__}: {text}") from error
    if not isinstance(meta.get("checksum"), str) or meta["checksum"] != checksum:
        raise _damaged(path, "its content does not match its checksum")
    if meta.get("rows") != table.num_rows:
        raise _damaged(
            path, f"it holds {table.num_rows} rows, its metadata says {meta.get('rows')}"
        )
    try:
        frame = table.to_pandas()
    except Exception as error:  # pragma: no cover - a checksummed table converts
        raise _damaged(path, f"{type(error).__name__}: {error}") from error
    return frame, meta


# ----------------------------------------------------------------------------------------------
class RunLock:
    """The lock of a run: ``FILE.parquet.lock``, held with an exclusive ``flock`` while the run
    writes, holding ``pid host`` for the messages.

    The kernel releases a ``flock`` when its process ends, however it ends, so a lock file left by
    a killed run is taken over (with a warning) atomically: there is no check-then-delete window
    in which two processes could both take it. Taking the lock is: open (create) the file, take
    the ``flock`` without blocking, then check that the path still names the file locked (a
    holder deletes it while still holding the lock when it releases). An empty lock file (a
    process killed while taking it) is taken over like any other. Two safety checks stay: a lock
    file naming a live process on this host (a cnftools older than the ``flock`` lock, or a
    reused pid) or a process on another host (where ``flock`` may not reach, e.g. some network
    file systems) is never taken over automatically.

    Platforms: ``fcntl.flock`` on POSIX (Linux, macOS; on Linux NFS it is emulated with NFS
    byte-range locks); ``msvcrt.locking`` on Windows.
    """

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(out.name + ".lock")
        self.held = False
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(1000):  # retried only when the lock file is replaced under us
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
                existed = False
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:
                    continue  # released between the two opens
                existed = True
            try:
                if not _try_lock(fd, self.path):
                    raise FileExistsError(self._held_message(_read_owner(fd)))
                if not _same_file(fd, self.path):
                    os.close(fd)
                    continue  # released (and deleted) by its holder while we opened it
                owner = _read_owner(fd)
                if existed:
                    self._check_takeover(owner)
                os.ftruncate(fd, 0)
                os.write(fd, me.encode())
                os.fsync(fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            self._fd, self.held = fd, True
            return
        raise FileExistsError(  # pragma: no cover - a thousand replacements in a row
            f"could not take the lock {os.fspath(self.path)!r}: it keeps being replaced"
        )

    def _held_message(self, owner: str) -> str:
        holder = f"{owner!r}" if owner else "a process that is just taking it"
        return (
            f"another process is writing this run: the lock {os.fspath(self.path)!r} is held by "
            f"{holder}; wait for it to finish"
        )

    def _check_takeover(self, owner: str) -> None:
        """We hold the flock of a lock file someone left: refuse or warn (see the class)."""
        where = os.fspath(self.path)
        if not owner:
            warnings.warn(
                f"taking over the stale lock {where!r}: the file is empty (its process was "
                "killed while taking it)",
                RuntimeWarning,
                stacklevel=4,
            )
            return
        pid, _, host = owner.partition(" ")
        if not pid.isdigit() or " " in host or not host.isprintable():  # not a cnftools lock
            raise FileExistsError(
                f"the lock {where!r} holds {owner!r}, not the 'PID HOST' a cnftools run writes: "
                "cnftools cannot tell whether the run that made it still writes; delete the lock "
                "file by hand once no run writes this out"
            )
        if host != socket.gethostname():
            raise FileExistsError(
                f"the lock {where!r} is held by {owner!r}, a process on another host; cnftools "
                "cannot see whether it still runs: delete the lock file by hand once it is gone"
            )
        if pid.isdigit() and int(pid) != os.getpid() and process_alive(int(pid)):
            raise FileExistsError(
                self._held_message(owner) + " (or delete the lock file if that process is not "
                "a cnftools run)"
            )
        warnings.warn(
            f"taking over the stale lock {where!r} of {owner!r} (that process no longer runs)",
            RuntimeWarning,
            stacklevel=4,
        )

    def release(self) -> None:
        if not self.held or self._fd is None:
            return
        fd, self._fd, self.held = self._fd, None, False
        try:
            if os.name != "nt" and _same_file(fd, self.path):
                self.path.unlink(missing_ok=True)  # while still locked: see acquire
        finally:
            os.close(fd)
        if os.name == "nt":  # pragma: no cover - an open file cannot be deleted there
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)


def _try_lock(fd: int, path: Path) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; ``False`` when another holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        import msvcrt

        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as error:  # e.g. ENOLCK: a file system without locks
        raise OSError(
            error.errno,
            f"cannot lock {os.fspath(path)!r}: its file system refuses flock "
            f"({error.strerror}); write out= to a local disk",
        ) from error
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)


def _read_owner(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except (OSError, AttributeError):  # pragma: no cover - no pread (Windows)
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode("utf-8", "replace").strip()


# ----------------------------------------------------------------------------------------------
_UNIT_KEYS = {"run_key": str, "batch": int, "round": int, "data": str, "failures": int}


class ChunkStore:
    """The files of one run (see the module docstring); used on rank 0 only."""

    def __init__(self, out: Path, run: dict[str, Any], run_key: str) -> None:
        if out.suffix.lower() not in (".parquet", ".pq"):
            raise ValueError(f"out must be a .parquet file, got {os.fspath(out)!r}")
        self.out, self.run, self.run_key = out, run, run_key
        self.dir = out.with_name(out.name + ".chunks")
        self.meta_file = self.dir / "meta.json"
        self.created = False  # whether this call made the chunk directory
        self._final: pd.DataFrame | None = None  # the verified final frame, once read
        self._verified: dict[tuple[int, int], tuple[pd.DataFrame, dict[str, Any]]] = {}

    # -- opening ---------------------------------------------------------------------------
    def open(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        """Prepare the directory; return the final file's metadata when the run is finished."""
        if self.out.is_dir():
            raise ValueError(f"out {os.fspath(self.out)!r} is a directory; give a .parquet file")
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(
                f"{os.fspath(self.dir)!r}, where the chunks of out go, is a file; move it away"
            )
        for leftover in leftover_temporaries(self.out):  # a final write that failed or was killed
            leftover.unlink(missing_ok=True)
        exists = self.out.exists() or self.dir.exists()
        if exists and overwrite:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.out.unlink(missing_ok=True)
        elif exists and not resume:
            raise FileExistsError(
                f"{os.fspath(self.out)!r} or its chunk directory already exists; pass resume=True "
                "(--resume) to continue that run, or overwrite=True (--overwrite) to start again"
            )
        if resume and self.out.exists():
            try:
                frame, meta = read_checked(self.out)
            except DamagedFileError as error:
                raise DamagedFileError(
                    f"{error}: the finished result of this run cannot be trusted; pass "
                    "overwrite=True (--overwrite) to compute it again"
                ) from error.__cause__
            self._compare(meta, self.out)
            if not (meta.get("failures") and self.dir.exists()):
                self._final = frame
                return meta
            # a finished run with failed rows kept its units: resume retries those rows
        if self.dir.exists():
            self._check_meta_file()
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir()
            self.created = True
            body = {"format": FORMAT, "run_key": self.run_key, "run": self.run}
            body["checksum"] = json_checksum(body)
            tmp = _temporary(self.meta_file)
            with open(tmp, "w") as handle:
                json.dump(body, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.meta_file)
            _fsync_directory(self.dir)
        for stale in self.dir.glob(".*.tmp"):  # temporary files of a killed run (we hold the lock)
            stale.unlink(missing_ok=True)
        return None

    def _check_meta_file(self) -> None:
        where = os.fspath(self.meta_file)
        advice = f"delete {os.fspath(self.dir)!r} or pass overwrite=True"
        if not self.meta_file.exists():
            raise ResumeError(
                f"the chunk directory {os.fspath(self.dir)!r} has no meta.json, so the settings of "
                "its units are unknown; delete the directory or pass overwrite=True"
            )
        try:
            meta = json.loads(self.meta_file.read_bytes())
        except (OSError, ValueError, RecursionError) as error:
            raise ResumeError(
                f"{where} is unreadable ({type(error).__name__}: {str(error)[:200]}); {advice}"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ResumeError(
                f"{where} was not written by this version of cnftools.dataset_nll; {advice}"
            )
        if meta.get("checksum") != json_checksum(meta):
            raise DamagedFileError(
                f"{where} is damaged (its content does not match its checksum), so the settings "
                f"of the units next to it are unknown; {advice}"
            )
        if not isinstance(meta.get("run"), dict) or not isinstance(meta.get("run_key"), str):
            raise ResumeError(f"{where} has malformed metadata (no 'run' or 'run_key'); {advice}")
        self._compare(meta, self.meta_file)

    def _compare(self, meta: Mapping[str, Any], where: Path) -> None:
        if meta.get("run_key") == self.run_key:
            return
        stored = meta.get("run", {})
        stored = stored if isinstance(stored, dict) else {}
        differ = sorted(k for k in set(stored) | set(self.run) if stored.get(k) != self.run.get(k))
        detail = ", ".join(f"{k}: {stored.get(k)!r} -> {self.run.get(k)!r}" for k in differ)
        raise ResumeError(
            f"cannot resume: {os.fspath(where)!r} was made with other settings, field or prior "
            f"({detail[:2000] or 'run key differs'}); use overwrite=True (--overwrite) to start "
            "again"
        )

    # -- units -----------------------------------------------------------------------------
    def finished_units(self, round_: int | None = None) -> set[tuple[int, int]]:
        """Units on disk (of ``round_``, or all) whose rows all succeeded, each file verified.

        Failed rows are recomputed on resume; a damaged unit file is too, with a warning.
        """
        done = set()
        self._verified = {}
        pattern = "unit-b*-r*.parquet" if round_ is None else f"unit-b*-r{round_:03d}.parquet"
        for path in sorted(self.dir.glob(pattern)):
            try:
                frame, meta = read_checked(path)
            except ResumeError as error:  # damaged, or its cnftools metadata is gone
                warnings.warn(
                    f"{error}; its unit is computed again",
                    RuntimeWarning,
                    stacklevel=2,
                )
                continue
            self._check_unit_meta(meta, path)
            if meta["failures"] == 0:
                unit = (meta["batch"], meta["round"])
                done.add(unit)
                self._verified[unit] = (frame, meta)
        return done

    def _check_unit_meta(self, meta: Mapping[str, Any], path: Path) -> None:
        for key, kind in _UNIT_KEYS.items():
            value = meta.get(key)
            if (
                not isinstance(value, kind)
                or isinstance(value, bool)
                or (
                    kind is int and value < 0  # type: ignore[operator]
                )
            ):
                raise ResumeError(
                    f"the unit file {os.fspath(path)!r} has malformed metadata ({key!r} is "
                    f"{value!r}); delete it (it is recomputed) or pass overwrite=True"
                )
        if meta["run_key"] != self.run_key:
            raise ResumeError(
                f"the unit file {os.fspath(path)!r} belongs to another run; delete it (it is "
                "recomputed) or pass overwrite=True"
            )
        if path.name != unit_name(meta["batch"], meta["round"]):
            raise ResumeError(
                f"the unit file {os.fspath(path)!r} holds unit (batch {meta['batch']}, round "
                f"{meta['round']}); delete it (it is recomputed) or pass overwrite=True"
            )

    def write_unit(self, batch: int, round_: int, digest: str, frame: pd.DataFrame) -> None:
        failures = int((frame["status"] != "ok").sum())
        meta = {
            "format": FORMAT, "run_key": self.run_key, "batch": batch, "round": round_,
            "data": digest, "failures": failures,
        }  # fmt: skip
        write_atomic(frame, meta, self.dir / unit_name(batch, round_))

    def read_unit(self, batch: int, round_: int, digest: str, index: Iterable[int]) -> pd.DataFrame:
        """A finished unit (verified by :meth:`finished_units`), checking its data hash and that
        it holds exactly the rows ``index``."""
        path = self.dir / unit_name(batch, round_)
        verified = self._verified.pop((batch, round_), None)
        if verified is None:
            verified = read_checked(path)
            self._check_unit_meta(verified[1], path)
        frame, meta = verified
        if meta["data"] != digest:
            raise ResumeError(
                f"the data of unit (batch {batch}, round {round_}) changed since "
                f"{os.fspath(path)!r} was written (its rows' content hash differs): resume needs "
                "the same data in the same order; pass overwrite=True to start again"
            )
        expected = np.fromiter(index, dtype=np.int64)
        got = frame["index"].to_numpy() if "index" in frame else np.array([], np.int64)
        if not np.array_equal(got, expected):
            raise ResumeError(
                f"{os.fspath(path)!r} holds rows {got[:5].tolist()}... but unit (batch {batch}, "
                f"round {round_}) is rows {expected[:5].tolist()}...; delete it (it is "
                "recomputed) or pass overwrite=True"
            )
        return frame

    def write_final(self, frame: pd.DataFrame, digests: list[str], keep_chunks: bool) -> None:
        """Write ``out``; remove the chunks unless kept or some rows failed (resume retries them)."""
        failures = int((frame["status"] != "ok").sum())
        meta = {
            "format": FORMAT, "run_key": self.run_key, "run": self.run, "data": digests,
            "failures": failures,
        }  # fmt: skip
        write_atomic(frame, meta, self.out)
        if not keep_chunks and failures == 0:
            shutil.rmtree(self.dir, ignore_errors=True)

    def read_final(self) -> pd.DataFrame:
        """The finished run's frame (checksum and row count verified)."""
        if self._final is not None:
            return self._final
        frame, _ = read_checked(self.out)
        return frame

    def discard_if_empty(self) -> None:
        """Remove the chunk directory this call made when no unit in it has a computed row."""
        if not self.dir.exists():
            return
        for path in self.dir.glob("unit-*.parquet"):
            try:
                _, meta = read_checked(path)
            except ResumeError:
                return
            if meta.get("failures") != meta.get("rows"):
                return
        shutil.rmtree(self.dir, ignore_errors=True)
