"""The chunk store of a dataset-NLL run: ``out``, its chunk directory, the lock, resume checks.

Layout (``out = FILE.parquet``)::

    FILE.parquet.lock                      O_EXCL lock: pid and host of the process writing the run
    FILE.parquet.chunks/
        meta.json                          the run's settings and fingerprints (checked on resume)
        unit-b00000000-r000.parquet        rows of batch 0, probe round 0 (+ their data hash)
        ...
    FILE.parquet                           at the end: one row per input, written atomically

Every file is written to a temporary file in the same folder, ``fsync``-ed and renamed. On resume,
each unit file is checked against the run (its run key, its rows, the hash of its rows' data as
read now); anything that does not match — a missing, unreadable or foreign ``meta.json``, a
truncated or empty unit file, a unit holding other rows, a Parquet file at ``out`` that
cnftools did not write — is refused with a message naming the file and what to do. The contract is
stated in docs/guarantees.md.
"""

from __future__ import annotations

import json
import os
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

__all__ = ["FORMAT", "ChunkStore", "ResumeError", "RunLock", "unit_name", "write_atomic"]

FORMAT = "cnftools.dataset_nll/2"
META_KEY = b"cnftools.dataset_nll"


class ResumeError(ValueError):
    """A run's files cannot be continued safely (the message names the file and what to do)."""


def unit_name(batch: int, round_: int) -> str:
    """File name of unit ``(batch, round)``."""
    return f"unit-b{batch:08d}-r{round_:03d}.parquet"


def write_atomic(frame: pd.DataFrame, meta: Mapping[str, Any], path: Path) -> None:
    """Write ``frame`` with ``meta`` in its schema to ``path``: temp file, fsync, rename."""
    table = pa.Table.from_pandas(frame, preserve_index=False)
    old = table.schema.metadata or {}
    table = table.replace_schema_metadata({**old, META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        pq.write_table(table, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_meta(path: Path) -> dict[str, Any]:
    """The cnftools metadata of a Parquet file; :class:`ResumeError` when unreadable or foreign."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except Exception as error:
        raise ResumeError(
            f"{os.fspath(path)!r} is damaged or not a Parquet file ({type(error).__name__}: "
            f"{error}); delete it (a unit file is then recomputed) or pass overwrite=True"
        ) from error
    raw = metadata.get(META_KEY)
    meta = None if raw is None else json.loads(raw)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ResumeError(
            f"{os.fspath(path)!r} was not written by this version of cnftools.dataset_nll (no "
            f"{FORMAT!r} metadata); move it away or pass overwrite=True"
        )
    return meta


# ----------------------------------------------------------------------------------------------
class RunLock:
    """An ``O_EXCL`` lock file next to ``out`` holding ``pid host``.

    A second process on the same ``out`` gets :class:`FileExistsError`. A lock left by a process
    that no longer runs on this host (a killed run) is stale and taken over with a warning; a lock
    from another host must be deleted by hand once that run is known to be gone.
    """

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(out.name + ".lock")
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()} {socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise FileExistsError(
                        f"another process is writing this run: the lock {os.fspath(self.path)!r} "
                        f"is held by {self._owner()!r}; wait for it to finish, or delete the lock "
                        "file if that process is gone"
                    ) from None
                warnings.warn(
                    f"taking over the stale lock {os.fspath(self.path)!r} of {self._owner()!r} "
                    "(that process no longer runs)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(me)
            self.held = True
            return

    def _owner(self) -> str:
        try:
            return self.path.read_text().strip()
        except OSError:
            return "?"

    def _stale(self) -> bool:
        pid, _, host = self._owner().partition(" ")
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# ----------------------------------------------------------------------------------------------
class ChunkStore:
    """The files of one run (see the module docstring); used on rank 0 only."""

    def __init__(self, out: Path, run: dict[str, Any], run_key: str) -> None:
        if out.suffix.lower() not in (".parquet", ".pq"):
            raise ValueError(f"out must be a .parquet file, got {os.fspath(out)!r}")
        self.out, self.run, self.run_key = out, run, run_key
        self.dir = out.with_name(out.name + ".chunks")
        self.meta_file = self.dir / "meta.json"
        self.created = False  # whether this call made the chunk directory

    # -- opening ---------------------------------------------------------------------------
    def open(self, resume: bool, overwrite: bool) -> dict[str, Any] | None:
        """Prepare the directory; return the final file's metadata when the run is finished."""
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
            meta = read_meta(self.out)
            self._compare(meta, self.out)
            if not (meta.get("failures") and self.dir.exists()):
                return meta
            # a finished run with failed rows kept its units: resume retries those rows
        if self.dir.exists():
            self._check_meta_file()
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.dir.mkdir()
            self.created = True
            tmp = self.dir / f".meta.json.{os.getpid()}.tmp"
            with open(tmp, "w") as handle:
                json.dump({"format": FORMAT, "run_key": self.run_key, "run": self.run}, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.meta_file)
        for stale in self.dir.glob(".*.tmp"):  # temporary files of a killed run
            stale.unlink(missing_ok=True)
        return None

    def _check_meta_file(self) -> None:
        where = os.fspath(self.meta_file)
        if not self.meta_file.exists():
            raise ResumeError(
                f"the chunk directory {os.fspath(self.dir)!r} has no meta.json, so the settings of "
                "its units are unknown; delete the directory or pass overwrite=True"
            )
        try:
            meta = json.loads(self.meta_file.read_text())
        except (OSError, ValueError) as error:
            raise ResumeError(
                f"{where} is unreadable ({error}); delete {os.fspath(self.dir)!r} or pass "
                "overwrite=True"
            ) from error
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ResumeError(
                f"{where} was not written by this version of cnftools.dataset_nll; delete "
                f"{os.fspath(self.dir)!r} or pass overwrite=True"
            )
        self._compare(meta, self.meta_file)

    def _compare(self, meta: Mapping[str, Any], where: Path) -> None:
        if meta.get("run_key") == self.run_key:
            return
        stored = meta.get("run", {})
        differ = sorted(k for k in set(stored) | set(self.run) if stored.get(k) != self.run.get(k))
        detail = ", ".join(f"{k}: {stored.get(k)!r} -> {self.run.get(k)!r}" for k in differ)
        raise ResumeError(
            f"cannot resume: {os.fspath(where)!r} was made with other settings, field or prior "
            f"({detail or 'run key differs'}); use overwrite=True (--overwrite) to start again"
        )

    # -- units -----------------------------------------------------------------------------
    def finished_units(self) -> set[tuple[int, int]]:
        """Units on disk whose rows all succeeded (failed rows are recomputed on resume)."""
        done = set()
        for path in sorted(self.dir.glob("unit-b*-r*.parquet")):
            meta = read_meta(path)
            self._check_unit_meta(meta, path)
            if meta["failures"] == 0:
                done.add((int(meta["batch"]), int(meta["round"])))
        return done

    def _check_unit_meta(self, meta: Mapping[str, Any], path: Path) -> None:
        if meta.get("run_key") != self.run_key:
            raise ResumeError(
                f"the unit file {os.fspath(path)!r} belongs to another run; delete it (it is "
                "recomputed) or pass overwrite=True"
            )
        if path.name != unit_name(int(meta["batch"]), int(meta["round"])):
            raise ResumeError(
                f"the unit file {os.fspath(path)!r} holds unit (batch {meta['batch']}, round "
                f"{meta['round']}); delete it (it is recomputed) or pass overwrite=True"
            )

    def write_unit(self, batch: int, round_: int, digest: str, frame: pd.DataFrame) -> None:
        failures = int((frame["status"] != "ok").sum())
        meta = {
            "format": FORMAT, "run_key": self.run_key, "batch": batch, "round": round_,
            "data": digest, "failures": failures, "rows": len(frame),
        }  # fmt: skip
        write_atomic(frame, meta, self.dir / unit_name(batch, round_))

    def read_unit(self, batch: int, round_: int, digest: str, index: Iterable[int]) -> pd.DataFrame:
        """Read a finished unit, checking its data hash and that it holds exactly ``index``."""
        path = self.dir / unit_name(batch, round_)
        meta = read_meta(path)
        self._check_unit_meta(meta, path)
        if meta["data"] != digest:
            raise ResumeError(
                f"the data of unit (batch {batch}, round {round_}) changed since "
                f"{os.fspath(path)!r} was written (its rows' content hash differs): resume needs "
                "the same data in the same order; pass overwrite=True to start again"
            )
        try:
            frame = pd.read_parquet(path)
        except Exception as error:
            raise ResumeError(
                f"{os.fspath(path)!r} is damaged ({type(error).__name__}: {error}); delete it "
                "(it is recomputed) or pass overwrite=True"
            ) from error
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
        return pd.read_parquet(self.out)

    def discard_if_empty(self) -> None:
        """Remove the chunk directory this call made when no unit in it has a computed row."""
        if not self.dir.exists():
            return
        for path in self.dir.glob("unit-*.parquet"):
            try:
                meta = read_meta(path)
            except ResumeError:
                return
            if meta["failures"] < meta["rows"]:
                return
        shutil.rmtree(self.dir, ignore_errors=True)
