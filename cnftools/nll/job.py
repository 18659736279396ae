"""The work of one :func:`~cnftools.dataset_nll` call after its arguments are checked.

:class:`Job` runs probe rounds over the data: each round is one pass over the row source, in which
every unit ``(batch, round)`` is read back from the chunk store (its content hash and rows
checked) or, when missing, dealt round-robin to a rank, computed (:func:`cnftools.nll.units.
compute_unit`) and written; rank 0 gathers the units, plans the next round
(:func:`cnftools.nll.frames.plan_rounds`), merges, reports failures and writes ``out``.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cnftools._progress import reporting, reporting_to
from cnftools._resources import HeapTrimmer
from cnftools.nll import distributed as dist
from cnftools.nll.frames import combine_units, plan_rounds, summarize, with_bpd
from cnftools.nll.sources import Batch, RowSource
from cnftools.nll.store import ChunkStore, ResumeError
from cnftools.nll.units import Settings, compute_unit

__all__ = ["Job", "RowsFailedError", "RunInterrupted"]


class RowsFailedError(RuntimeError):
    """Every row of a :func:`~cnftools.dataset_nll` run failed (the first error is chained)."""


class RunInterrupted(KeyboardInterrupt):
    """A :func:`~cnftools.dataset_nll` run stopped by Ctrl-C (``SIGINT``), after its lock was
    released: still a ``KeyboardInterrupt``, and it says what was kept.

    Attributes:
        kept: rows whose values are in the chunk store (``out``'s ``.chunks/``), which
            ``resume=True`` does not compute again; 0 without ``out``.
        rows: the number of rows, ``None`` for a stream not yet read to the end.
        out: the run's ``out`` file, ``None`` when it had none.
    """

    def __init__(self, kept: int, rows: int | None, out: os.PathLike[str] | None) -> None:
        self.kept, self.rows, self.out = kept, rows, out
        of = "" if rows is None else f" of {rows}"
        if out is None:
            text = "dataset_nll interrupted; nothing was kept (run with out= to make it resumable)"
        else:
            text = (
                f"dataset_nll interrupted; {kept}{of} rows are kept in "
                f"{os.fspath(out)!r}'s chunks: call it again with resume=True to continue"
            )
        super().__init__(text)


class Job:
    """One call of :func:`~cnftools.dataset_nll` after its arguments are checked."""

    def __init__(
        self,
        field: Any,
        rows: RowSource,
        s: Settings,
        run: dict[str, Any],
        rank: int,
        world: int,
        progress: bool | None,
    ) -> None:
        self.field, self.rows, self.s, self.run_meta = field, rows, s, run
        self.rank, self.world = rank, world
        self.show = (progress if progress is not None else sys.stderr.isatty()) and rank == 0
        self.final_meta: dict | None = None
        self.computed = 0
        self.first_error: BaseException | None = None
        self.digests: dict[int, str] = {}
        self.bpd_dims: int | None = None  # bits/dim of continuous data (not part of the identity)
        self.trim_heap = HeapTrimmer()  # keeps a long stream's resident memory flat

    def run(self, store: ChunkStore | None, start_time: float, keep_chunks: bool):
        complete = dist.broadcast(self.final_meta is not None, self.world)
        if complete:
            return self._finished(store, start_time) if self.rank == 0 else None
        hutchinson = self.s.hutchinson
        target = self.run_meta["target_stderr"]
        max_rounds = max(1, self.run_meta["max_probes"] // self.s.n_probes) if target else 1
        units: list[pd.DataFrame] = []
        needed: dict[int, dict[int, np.ndarray]] | None = None  # round -> batch -> row positions
        round_ = 0
        while True:
            units.extend(self._round(store, round_, needed))
            if target is None or round_ + 1 >= max_rounds:
                break
            plan = None
            if self.rank == 0:
                plan = plan_rounds(pd.concat(units, ignore_index=True), target, max_rounds)
            plan = dist.broadcast(plan, self.world)
            if not plan:
                break
            round_ += 1
            by_batch: dict[int, list[int]] = {}
            for index in sorted(plan):
                by_batch.setdefault(index // self.s.batch_size, []).append(
                    index % self.s.batch_size
                )
            needed = {b: np.asarray(p, dtype=np.int64) for b, p in by_batch.items()}
        computed = sum(dist.gather(self.computed, self.rank, self.world))
        if self.rank != 0:
            if self.world > 1:
                torch.distributed.barrier()
            return None
        frame = self._merge(units, hutchinson)
        units.clear()  # the merged frame holds every row now
        self._report_failures(frame)
        result = self._finish(frame, store, start_time, computed, keep_chunks)
        if self.world > 1:
            torch.distributed.barrier()
        return result

    # -- one pass over the data ------------------------------------------------------------
    def _round(self, store, round_: int, needed) -> list[pd.DataFrame]:
        done: set[tuple[int, int]] = set()
        if store is not None and self.rank == 0:
            done = store.finished_units(round_)
        done = dist.broadcast(done, self.world)
        bar = self._bar(round_, needed)
        frames, missing, error = [], 0, None
        try:
            for batch in self.rows.batches(
                self.s.batch_size, lambda b: needed is None or b in needed
            ):
                if needed is not None and batch.index not in needed:
                    continue
                rows = np.arange(batch.size) if needed is None else needed[batch.index]
                unit = (batch.index, round_)
                if round_ == 0 and self.rank == 0:
                    self._digest(batch)  # the final file records every batch's hash
                if unit in done:
                    if self.rank == 0:
                        digest = self._digest(batch)
                        frames.append(store.read_unit(*unit, digest, batch.start + rows))
                    if bar is not None:
                        bar.update(len(rows))
                    continue
                mine = missing % self.world == self.rank
                missing += 1
                if not mine:
                    continue
                digest = self._digest(batch)
                # a long solve's time reached and evaluations go to the bar (nothing without one)
                shown = reporting_to(bar.set_postfix_str) if bar is not None else reporting(False)
                with shown:
                    frame, err = compute_unit(
                        self.field,
                        batch.x,
                        batch.start,
                        rows,
                        batch.index,
                        round_,
                        self.s,
                        batch.extras,
                    )
                if err is not None and self.first_error is None:
                    self.first_error = err
                if store is not None:
                    store.write_unit(*unit, digest, frame)
                frames.append(frame)
                self.computed += len(frame)
                self.trim_heap()
                if bar is not None:
                    bar.update(len(frame) * self.world)
        except Exception as exc:  # every rank must reach the gather below
            if self.world == 1:
                raise
            error = exc
        finally:
            if bar is not None:
                bar.close()
        gathered = dist.gather((frames, error), self.rank, self.world)
        first = next((e for _, e in gathered if e is not None), None) if self.rank == 0 else None
        first = dist.broadcast(first, self.world)
        if first is not None:
            raise first
        return [f for part, _ in gathered for f in part] if self.rank == 0 else []

    def kept_rows(self, store: ChunkStore) -> int:
        """Rows whose first-round units are finished in ``store`` (what a resume will not redo)."""
        try:
            done = store.finished_units()
        except Exception:  # a damaged file: resume will say which; nothing can be promised here
            return 0
        n, size = self.rows.n, self.s.batch_size
        return sum(size if n is None else min(size, n - b * size) for b, r in done if r == 0)

    def _digest(self, batch: Batch) -> str:
        """The batch's content hash; the same batch must hash alike on every pass."""
        digest = batch.digest()
        known = self.digests.setdefault(batch.index, digest)
        if known != digest:
            raise ValueError(
                f"{self.rows.what} yielded other rows for batch {batch.index} on this pass than on "
                "the first: dataset_nll needs a deterministic order (no shuffling)"
            )
        return digest

    def _bar(self, round_: int, needed):
        if not self.show:
            return None
        total = self.rows.n if needed is None else int(sum(len(p) for p in needed.values()))
        desc = "dataset_nll" + (f" round {round_}" if round_ else "")
        return tqdm(
            total=total, unit="row", desc=desc + (f" rank 0/{self.world}" if self.world > 1 else "")
        )

    # -- the end ---------------------------------------------------------------------------
    def _merge(self, units: list[pd.DataFrame], hutchinson: bool) -> pd.DataFrame:
        assert self.rows.n is not None
        frame = combine_units(
            units,
            math.prod(self.rows.event),
            self.s.dequantization,
            hutchinson,
            self.bpd_dims,
        )
        n = self.rows.n
        if len(frame) != n or not np.array_equal(frame["index"].to_numpy(), np.arange(n)):
            raise RuntimeError(f"internal error: merged {len(frame)} rows for {n} inputs")
        return frame

    def _report_failures(self, frame: pd.DataFrame) -> None:
        """Warn with the count and first error; raise when every row failed."""
        failed = frame["status"] != "ok"
        count = int(failed.sum())
        if count == 0:
            return
        first_status = str(frame.loc[failed, "status"].iloc[0])
        if count == len(frame):
            raise RowsFailedError(
                f"dataset_nll: every row failed ({count} rows); first error: {first_status}"
            ) from self.first_error
        warnings.warn(
            f"dataset_nll: {count} of {len(frame)} rows failed (their values are NaN, their "
            f"status says why); first error: {first_status}",
            RuntimeWarning,
            stacklevel=4,
        )

    def _run_attrs(self, frame: pd.DataFrame, start_time: float, computed: int) -> dict[str, Any]:
        """``frame.attrs["run"]``: the settings, timing and probes used."""
        seconds = time.perf_counter() - start_time
        meta = self.run_meta
        run = {
            **{
                k: meta[k]
                for k in ("batch_size", "divergence", "n_probes", "seed", "solver", "dtype")
            },
            "dequantization": meta["dequantization"],
            "target_stderr": meta["target_stderr"],
            "world_size": self.world,
            "seconds": seconds,
            "rows_computed": computed,
            "rows_per_s": computed / seconds if seconds > 0 else math.nan,
        }
        for key in ("noise", "strategy"):  # what the estimator said besides its kind
            if key in meta:
                run[key] = meta[key]
        if "rounds" in frame and meta["n_probes"]:
            run["probes_per_row"] = int(frame["rounds"].max()) * int(meta["n_probes"])
            if meta["max_probes"] is not None:
                run["max_probes"] = meta["max_probes"]
        return run

    def _finish(self, frame, store, start_time, computed, keep_chunks) -> pd.DataFrame:
        meta = self.run_meta
        frame.attrs["run"] = self._run_attrs(frame, start_time, computed)
        frame.attrs["summary"] = summary = summarize(frame)
        if summary.get("target_met") is False:
            warnings.warn(
                f"dataset_nll: target_stderr={meta['target_stderr']} not reached within "
                f"max_probes={meta['max_probes']} probes per row (probe stderr "
                f"{summary['probe_stderr']:.3g}); raise max_probes or the target",
                RuntimeWarning,
                stacklevel=4,
            )
        if store is not None:
            digests = [self.digests[b] for b in sorted(self.digests)]
            store.write_final(frame, digests, keep_chunks)
        return frame

    def _finished(self, store: ChunkStore, start_time: float) -> pd.DataFrame:
        """A finished run: check the data against the stored hashes, return the stored frame."""
        stored = self.final_meta.get("data", []) if self.final_meta else []
        got, rows = [], 0
        for batch in self.rows.batches(self.s.batch_size):
            got.append(batch.digest())
            rows += batch.size
        if got != stored:
            raise ResumeError(
                f"{os.fspath(store.out)!r} holds a finished run on other data (the content hash "
                "of the rows differs); pass overwrite=True to compute it again"
            )
        frame = store.read_final()
        index = frame["index"].to_numpy() if "index" in frame else np.array([], np.int64)
        if len(frame) != rows or not np.array_equal(index, np.arange(rows)):
            raise ResumeError(
                f"{os.fspath(store.out)!r} holds {len(frame)} rows for {rows} data rows (rows "
                "missing, repeated or out of order): it cannot be the finished result of this "
                "run; pass overwrite=True (--overwrite) to compute it again"
            )
        if self.s.dequantization is None:  # bits/dim of continuous data: as asked this time
            frame = with_bpd(frame, self.bpd_dims)
        frame.attrs["run"] = self._run_attrs(frame, start_time, 0)
        frame.attrs["summary"] = summarize(frame)
        return frame
