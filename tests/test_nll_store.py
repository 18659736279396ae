"""The resume contract of dataset_nll (cnftools/nll/store.py, fingerprint.py): a resumed run
returns the numbers of *this* field on *this* data, or refuses with a message naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from _dist_worker import make_case, make_mixture
from _nll_call import run_nll

import cnftools
from cnftools.nll import Output, ResumeError

FAST = {"method": "rk4", "steps": 10, "progress": False}


class _Killed(BaseException):
    """Stands for a kill: not an Exception, so dataset_nll does not record it as a row failure."""


def _interrupted_run(field, data, out, units: int, **kwargs) -> None:
    """Run dataset_nll on ``data`` and stop it (as a kill would) after ``units`` units."""
    import cnftools.nll.store as store

    original = store.ChunkStore.write_unit
    count = {"n": 0}

    def write_then_maybe_stop(self, *args, **kw):
        original(self, *args, **kw)
        count["n"] += 1
        if count["n"] >= units:
            raise _Killed

    store.ChunkStore.write_unit = write_then_maybe_stop
    try:
        with pytest.raises(_Killed):
            run_nll(field, data, out=out, **{**FAST, **kwargs})
    finally:
        store.ChunkStore.write_unit = original


# ----------------------------------------------------------------------------------------------
# fingerprints by content
@pytest.mark.parametrize(
    "change",
    ["module-weights", "marginal-tensor", "bound-method", "prior", "middle-row", "lambda"],
)
def test_resume_refuses_another_field_prior_or_data(tmp_path, change):
    """Today's main resumes each of these and returns the first run's numbers."""
    field, x = make_mixture(30)
    out = tmp_path / "nll.parquet"
    kwargs: dict = {"batch_size": 10}
    if change == "module-weights":
        torch.manual_seed(0)
        first, second = cnftools.MLPField(2, (4,), dtype=torch.float64), None
        second = cnftools.MLPField(2, (4,), dtype=torch.float64)
        assert not torch.equal(next(first.parameters()), next(second.parameters()))
        data_1 = data_2 = x
    elif change == "marginal-tensor":
        first = field
        second = cnftools.MixtureMarginal(field.path, field.means * 1.01, field.covs)
        data_1 = data_2 = x
    elif change == "bound-method":
        first = field.velocity
        second = cnftools.MixtureMarginal(field.path, field.means * 1.01, field.covs).velocity
        data_1 = data_2 = x
    elif change == "prior":
        first = second = field
        data_1 = data_2 = x
        kwargs_1 = {
            "prior": torch.distributions.MultivariateNormal(
                torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
            )
        }
        kwargs_2 = {
            "prior": torch.distributions.MultivariateNormal(
                torch.zeros(2, dtype=torch.float64), 2 * torch.eye(2, dtype=torch.float64)
            )
        }
    elif change == "middle-row":
        first = second = field
        data_1, data_2 = x, x.clone()
        data_2[5, 0] += 1e-9  # a row inside the first, finished unit
    else:
        first, second = (lambda x, t: -x), (lambda x, t: -3 * x)
        data_1 = data_2 = x
    if change != "prior":
        kwargs_1 = kwargs_2 = {}
    if change == "lambda":  # a lambda is fingerprinted by its code: the other one is refused
        _interrupted_run(first, data_1, out, 1, **kwargs)
        with pytest.raises(ResumeError, match="other settings"):
            run_nll(second, data_2, out=out, resume=True, **FAST, **kwargs)
        resumed = run_nll(first, data_1, out=out, resume=True, **FAST, **kwargs)
        assert resumed.attrs["summary"]["rows_computed"] == 20  # the same lambda continues
        return
    _interrupted_run(first, data_1, out, 1, **kwargs, **kwargs_1)
    with pytest.raises(ResumeError, match=r"other settings|changed"):
        run_nll(second, data_2, out=out, resume=True, **FAST, **kwargs, **kwargs_2)
    # and after a finished run too
    run_nll(first, data_1, out=out, overwrite=True, **FAST, **kwargs, **kwargs_1)
    with pytest.raises(ResumeError, match=r"other settings|other data"):
        run_nll(second, data_2, out=out, resume=True, **FAST, **kwargs, **kwargs_2)


def test_run_id_lets_a_lambda_resume(tmp_path):
    _, x = make_case(20)
    out = tmp_path / "nll.parquet"
    field = lambda x, t: -x  # noqa: E731
    _interrupted_run(field, x, out, 1, batch_size=5, run_id="shrink-v1")
    resumed = run_nll(field, x, batch_size=5, out=out, resume=True, run_id="shrink-v1", **FAST)
    assert resumed.attrs["summary"]["rows_computed"] == 15
    with pytest.raises(ResumeError, match="run_id"):
        run_nll(field, x, batch_size=5, out=out, resume=True, run_id="shrink-v2", **FAST)


# ----------------------------------------------------------------------------------------------
# damaged or foreign files
def _chunks(out):
    return out.with_name(out.name + ".chunks")


def test_missing_meta_json_refuses_instead_of_double_counting(tmp_path):
    """Today: delete meta.json, resume with batch size 15 after 10 -> rows 25..39 counted twice."""
    field, x = make_case(40)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 3, batch_size=10)
    (_chunks(out) / "meta.json").unlink()
    with pytest.raises(ResumeError, match=r"meta\.json"):
        run_nll(field, x, batch_size=15, out=out, resume=True, **FAST)


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"format": "someone-else"})])
def test_unreadable_or_foreign_meta_json_refuses(tmp_path, content):
    field, x = make_case(20)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 1, batch_size=10)
    (_chunks(out) / "meta.json").write_text(content)
    with pytest.raises(ResumeError, match=r"meta\.json"):
        run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)


@pytest.mark.parametrize("damage", ["zero-bytes", "truncated"])
def test_a_damaged_unit_file_is_computed_again_with_a_warning(tmp_path, damage):
    field, x = make_case(30)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 2, batch_size=10)
    unit0 = _chunks(out) / "unit-b00000000-r000.parquet"
    if damage == "zero-bytes":
        unit0.write_bytes(b"")
    else:
        unit0.write_bytes(unit0.read_bytes()[:-40])
    with pytest.warns(
        RuntimeWarning, match=r"unit-b00000000-r000\.parquet.*damaged.*computed again"
    ):
        resumed = run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
    assert resumed.attrs["summary"]["rows_computed"] == 20  # unit 0 again, and unit 2
    clean = run_nll(field, x, batch_size=10, **FAST)
    pd.testing.assert_frame_equal(resumed, clean, check_exact=True)


def test_a_misplaced_unit_file_refuses(tmp_path):
    field, x = make_case(30)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 2, batch_size=10)
    unit0 = _chunks(out) / "unit-b00000000-r000.parquet"
    unit1 = _chunks(out) / "unit-b00000001-r000.parquet"
    os.replace(unit1, unit0)  # unit 0's file holds batch 1's rows (intact: it is not damage)
    with pytest.raises(ResumeError, match=r"unit-b00000000-r000\.parquet"):
        run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)


def test_a_parquet_file_cnftools_did_not_write_is_refused(tmp_path):
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    pd.DataFrame({"index": range(10), "nll": np.zeros(10), "status": ["ok"] * 10}).to_parquet(out)
    with pytest.raises(ResumeError, match="not written by"):
        run_nll(field, x, batch_size=5, out=out, resume=True, **FAST)


# ----------------------------------------------------------------------------------------------
# the lock
def test_a_second_process_on_the_same_out_gets_a_clear_error(tmp_path):
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        lock = tmp_path / "nll.parquet.lock"
        lock.write_text(f"{holder.pid} {socket.gethostname()}")  # a live process holds it
        with pytest.raises(FileExistsError, match=r"another process.*nll.parquet.lock"):
            run_nll(field, x, batch_size=5, out=out, resume=True, **FAST)
        assert not _chunks(out).exists()  # no orphan chunk directory
        assert lock.read_text().startswith(str(holder.pid))  # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the lock is stale and taken over, with a warning
    with pytest.warns(RuntimeWarning, match="stale lock"):
        frame = run_nll(field, x, batch_size=5, out=out, resume=True, **FAST)
    assert len(frame) == 10 and not (tmp_path / "nll.parquet.lock").exists()


def test_a_failed_run_leaves_no_chunk_directory(tmp_path):
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    with pytest.raises(RuntimeError, match="every row failed"):
        run_nll(field, x * np.nan, batch_size=5, out=out, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# failed rows are retried on resume
class _FlakyDevice:
    """A transient failure outside the field (an out-of-memory error, a flaky device): the solve
    raises for rows with x[0] > 10 while installed."""

    def __init__(self, monkeypatch):
        import cnftools.nll.units as units

        original = units._solve

        def solve(v, y, s, generator, extras):
            if bool((y[:, 0] > 10).any()):
                raise RuntimeError("transient")
            return original(v, y, s, generator, extras)

        monkeypatch.setattr(units, "_solve", solve)


def test_failed_rows_are_retried_on_resume(tmp_path):
    field, x = make_case(20)
    x = x.clone()
    x[3, 0] = 20.0
    out = tmp_path / "nll.parquet"
    with pytest.MonkeyPatch.context() as patch:
        _FlakyDevice(patch)
        with pytest.warns(RuntimeWarning, match="1 of 20 rows failed"):
            first = run_nll(field, x, batch_size=5, out=out, **FAST)
    assert first.loc[3, "status"].startswith("error: RuntimeError: transient")
    resumed = run_nll(field, x, batch_size=5, out=out, resume=True, **FAST)
    assert (resumed["status"] == "ok").all()
    assert resumed.attrs["summary"]["rows_computed"] == 5  # only the unit with the failure
    clean = run_nll(field, x, batch_size=5, **FAST)
    pd.testing.assert_series_equal(resumed["log_prob"], clean["log_prob"], check_exact=True)
    assert not _chunks(out).exists()


# ----------------------------------------------------------------------------------------------
# checksums and row counts: every file cnftools writes proves it is intact
def _flip(path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0x01
    path.write_bytes(bytes(data))


def _positions(size: int, count: int) -> list[int]:
    """``count`` byte positions spread over a file of ``size`` bytes (first and last included)."""
    return sorted({round(i * (size - 1) / (count - 1)) for i in range(count)})


def test_a_flipped_byte_in_a_unit_file_is_never_used(tmp_path):
    """Today's main turned a row's -3.44 into -225650.9 with one flipped byte of a unit file.
    Wherever the byte is, the resumed result equals a clean run's, bit for bit: a damaged unit is
    computed again (with a warning), or the run is refused."""
    import shutil

    field, x = make_case(20)
    clean = run_nll(field, x, batch_size=10, **FAST)
    pristine = tmp_path / "pristine"
    _interrupted_run(field, x, pristine / "nll.parquet", 1, batch_size=10)
    unit = "unit-b00000000-r000.parquet"
    size = (_chunks(pristine / "nll.parquet") / unit).stat().st_size
    outcomes = {"recomputed": 0, "refused": 0, "harmless": 0}
    for i, position in enumerate(_positions(size, 60)):
        out = tmp_path / f"run{i}" / "nll.parquet"
        shutil.copytree(_chunks(pristine / "nll.parquet"), _chunks(out))
        _flip(_chunks(out) / unit, position)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                resumed = run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
            except ResumeError as error:
                assert unit in str(error)
                outcomes["refused"] += 1
                continue
        pd.testing.assert_frame_equal(resumed, clean, check_exact=True)
        damaged = [w for w in caught if "computed again" in str(w.message)]
        outcomes["recomputed" if damaged else "harmless"] += 1
        if damaged:
            assert resumed.attrs["summary"]["rows_computed"] == 20
    # most bytes matter (data, page headers, the metadata); the others (statistics, unused copies
    # of the schema) change nothing that is read, and the result is the same
    assert outcomes["recomputed"] + outcomes["refused"] >= 30, outcomes


def test_a_flipped_byte_in_meta_json_is_refused(tmp_path):
    field, x = make_case(20)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 1, batch_size=10)
    meta = _chunks(out) / "meta.json"
    original = meta.read_bytes()
    for position in _positions(len(original), 40):
        meta.write_bytes(original)
        _flip(meta, position)
        with pytest.raises(ResumeError, match=r"meta\.json"):
            run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
    meta.write_bytes(original)
    assert len(run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)) == 20


def test_a_flipped_byte_in_the_final_file_is_refused_or_harmless(tmp_path):
    field, x = make_case(20)
    out = tmp_path / "nll.parquet"
    finished = run_nll(field, x, batch_size=10, out=out, **FAST)
    original = out.read_bytes()
    refused = 0
    for position in _positions(len(original), 60):
        out.write_bytes(original)
        _flip(out, position)
        try:
            again = run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
        except ResumeError as error:
            assert "nll.parquet" in str(error) and "overwrite" in str(error)
            refused += 1
            continue
        pd.testing.assert_frame_equal(again, finished, check_exact=True)
    assert refused >= 30


def _non_utf8_name_positions(path) -> list[int]:
    """Positions of the first byte of every stored copy of the column name ``nfe`` in a file."""
    data = path.read_bytes()
    return [i for i in range(len(data)) if data.startswith(b"nfe", i)]


def test_a_column_name_damaged_to_invalid_utf8_is_a_damaged_file(tmp_path):
    """A byte of a column name flipped to one that is not UTF-8 raised a raw UnicodeDecodeError
    from the checksum's reading of the schema: a unit file is computed again, the final file is
    refused, both naming the file."""
    import shutil

    field, x = make_case(20)
    clean = run_nll(field, x, batch_size=10, **FAST)
    pristine = tmp_path / "pristine"
    _interrupted_run(field, x, pristine / "nll.parquet", 1, batch_size=10)
    unit = "unit-b00000000-r000.parquet"
    positions = _non_utf8_name_positions(_chunks(pristine / "nll.parquet") / unit)
    assert positions
    for i, position in enumerate(positions):
        out = tmp_path / f"run{i}" / "nll.parquet"
        shutil.copytree(_chunks(pristine / "nll.parquet"), _chunks(out))
        path = _chunks(out) / unit
        data = bytearray(path.read_bytes())
        data[position] ^= 0xFF
        path.write_bytes(bytes(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            resumed = run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
        pd.testing.assert_frame_equal(resumed, clean, check_exact=True)
    out = tmp_path / "final" / "nll.parquet"
    run_nll(field, x, batch_size=10, out=out, **FAST)
    original = out.read_bytes()
    refused = 0
    for position in _non_utf8_name_positions(out):
        data = bytearray(original)
        data[position] ^= 0xFF
        out.write_bytes(bytes(data))
        try:
            again = run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
        except ResumeError as error:
            assert "nll.parquet" in str(error)
            refused += 1
            continue
        pd.testing.assert_frame_equal(again, clean, check_exact=True)
    assert refused >= 1


@pytest.mark.parametrize("checksum", ["kept", "recomputed"])
def test_a_final_file_with_rows_removed_never_resumes_to_fewer_rows(tmp_path, checksum):
    """Today's main resumed a final file with 10 of 40 rows removed (metadata intact) to 30 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cnftools.nll.store import META_KEY, write_atomic

    field, x = make_case(40)
    out = tmp_path / "nll.parquet"
    run_nll(field, x, batch_size=10, out=out, **FAST)
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[META_KEY])
    if checksum == "kept":  # the rows cut, the metadata (with its checksum) left as it was
        pq.write_table(table.slice(0, 30).replace_schema_metadata(table.schema.metadata), out)
        match = "damaged"
    else:  # a consistent file of 30 rows: its data hashes say 40
        frame = table.slice(0, 30).to_pandas()
        write_atomic(frame, {k: v for k, v in meta.items() if k not in ("rows", "checksum")}, out)
        match = "30 rows for 40 data rows"
    with pytest.raises(ResumeError, match=match):
        run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
    _ = pa  # the Arrow table API above


def test_unit_metadata_that_is_crafted_gives_one_clear_answer(tmp_path):
    """Today's main: a KeyError for a missing key, a RecursionError for deep nesting."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cnftools.nll.store import FORMAT, META_KEY, write_atomic

    field, x = make_case(20)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 1, batch_size=10)
    unit = _chunks(out) / "unit-b00000000-r000.parquet"
    table = pq.read_table(unit)
    meta = json.loads(table.schema.metadata[META_KEY])
    frame = table.to_pandas()
    # intact (checksummed) but missing a key: refused, naming the file
    crafted = {k: v for k, v in meta.items() if k not in ("batch", "rows", "checksum")}
    write_atomic(frame, crafted, unit)
    with pytest.raises(ResumeError, match=r"unit-b00000000-r000\.parquet.*malformed.*'batch'"):
        run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
    # nested 100,000 levels deep (no valid checksum): damaged, so computed again
    deep = ("[" * 100_000 + "]" * 100_000).encode()
    pq.write_table(pa.Table.from_pandas(frame).replace_schema_metadata({META_KEY: deep}), unit)
    with pytest.warns(RuntimeWarning, match="computed again"):
        resumed = run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)
    assert len(resumed) == 20
    _ = FORMAT


def test_deeply_nested_meta_json_is_refused_clearly(tmp_path):
    field, x = make_case(20)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 1, batch_size=10)
    (_chunks(out) / "meta.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ResumeError, match=r"meta\.json is unreadable"):
        run_nll(field, x, batch_size=10, out=out, resume=True, **FAST)


# ----------------------------------------------------------------------------------------------
# out= that cannot be a run's file, flags that need out
def test_out_naming_a_directory_or_a_chunks_file_is_a_clear_error(tmp_path):
    field, x = make_case(10)
    folder = tmp_path / "results.parquet"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        run_nll(field, x, out=folder, **FAST)
    with pytest.raises(ValueError, match="is a directory"):
        run_nll(field, x, out=folder, resume=True, **FAST)
    out = tmp_path / "nll.parquet"
    _chunks(out).write_text("not a directory")
    with pytest.raises(ValueError, match=r"nll\.parquet\.chunks.*is a file"):
        run_nll(field, x, out=out, **FAST)
    assert _chunks(out).read_text() == "not a directory"  # left alone


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        # 0.1's resume=True / overwrite=True without out=: no Output without its path now
        ({"resume": True}, TypeError, "path"),
        ({"overwrite": True}, TypeError, "path"),
        ({"path": "x.parquet", "resume": True, "overwrite": True}, ValueError, "contradict"),
    ],
)
def test_flags_that_cannot_apply_are_refused(tmp_path, kwargs, error, match):
    if "path" in kwargs:
        kwargs = {**kwargs, "path": tmp_path / kwargs["path"]}
    with pytest.raises(error, match=match):
        Output(**kwargs)
    assert not list(tmp_path.iterdir())  # refused before anything was written


# ----------------------------------------------------------------------------------------------
# leftovers: temporary files of writers that are gone
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temporary_files_of_dead_writers_are_cleaned_and_others_kept(tmp_path):
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    dead = tmp_path / f".nll.parquet.{_dead_pid()}.tmp"
    dead.write_bytes(b"half a parquet file")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".nll.parquet.{holder.pid}.tmp"
        live.write_bytes(b"being written")
        foreign = tmp_path / ".nll.parquet.backup.tmp"
        foreign.write_bytes(b"not ours")
        run_nll(field, x, batch_size=5, out=out, **FAST)
        assert not dead.exists()
        assert live.exists() and foreign.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_failed_final_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    import pyarrow.parquet as pq

    import cnftools.nll.store as store

    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    original = pq.write_table

    def full_disk(table, where, **kwargs):
        if os.path.basename(str(getattr(where, "name", where))).startswith(".nll.parquet."):
            original(table, where, **kwargs)  # a partial file on disk ...
            raise OSError(errno.ENOSPC, "No space left on device")  # ... then the disk is full
        return original(table, where, **kwargs)

    monkeypatch.setattr(store.pq, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run_nll(field, x, batch_size=5, out=out, **FAST)
    assert [p.name for p in tmp_path.glob(".*.tmp")] == []
    monkeypatch.setattr(store.pq, "write_table", original)
    resumed = run_nll(field, x, batch_size=5, out=out, resume=True, **FAST)
    assert resumed.attrs["summary"]["rows_computed"] == 0  # the units were kept


# ----------------------------------------------------------------------------------------------
# the lock: atomic takeover
def test_an_empty_lock_file_is_taken_over(tmp_path):
    """Today's main: "held by ''" for ever."""
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    (tmp_path / "nll.parquet.lock").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="stale lock.*empty"):
        frame = run_nll(field, x, batch_size=5, out=out, **FAST)
    assert len(frame) == 10 and not (tmp_path / "nll.parquet.lock").exists()


@pytest.mark.parametrize("content", [b"\x00\xff garbage\n", b"\xff\xfe\xfd", b"pid host extra"])
def test_a_lock_file_of_unreadable_content_is_refused_as_such(tmp_path, content):
    """Today's main called the writer of a garbage lock file "a process on another host"."""
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    (tmp_path / "nll.parquet.lock").write_bytes(content)
    with pytest.raises(FileExistsError, match="not the 'PID HOST' a cnftools run writes") as info:
        run_nll(field, x, batch_size=5, out=out, **FAST)
    assert "another host" not in str(info.value)


_HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from cnftools.nll.store import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def test_a_killed_holder_s_lock_is_taken_over(tmp_path):
    import signal

    out = tmp_path / "nll.parquet"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        from cnftools.nll.store import RunLock

        with pytest.raises(FileExistsError, match=rf"held by '{holder.pid} "):
            RunLock(out).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(out)
    with pytest.warns(RuntimeWarning, match=rf"stale lock.*'{holder.pid} "):
        lock.acquire()
    lock.release()
    assert not (tmp_path / "nll.parquet.lock").exists()


def _race_worker(out: str, marker: str, start, results, rounds: int) -> None:
    """Take the lock of ``out`` at the same moment as the others, ``rounds`` times; record
    whether another process was inside at the same time (``marker`` exists)."""
    import random
    import time
    import warnings as _warnings
    from pathlib import Path

    from cnftools.nll.store import RunLock

    kill = os.kill

    def slow_kill(pid, sig):  # a process is descheduled while it checks whether a pid lives
        time.sleep(random.uniform(0, 0.004))
        return kill(pid, sig)

    os.kill = slow_kill
    for r in range(rounds):
        start.wait()
        lock = RunLock(Path(out))
        try:
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                lock.acquire()
        except FileExistsError:
            results.put((r, "refused"))
        else:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                results.put((r, "overlap"))
            else:
                os.close(fd)
                time.sleep(0.005)
                os.unlink(marker)
                results.put((r, "held"))
            finally:
                lock.release()
        start.wait()  # every process is done with this round


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks its racers")
@pytest.mark.parametrize("stale", ["dead-pid", "empty"])
def test_racing_processes_never_hold_a_stale_lock_together(tmp_path, stale):
    """Today's main: a process scheduled between another's staleness check and its unlink deleted
    a fresh lock, and both held it. Eight processes race for a stale lock, 60 times."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    out = tmp_path / "nll.parquet"
    lock_file = tmp_path / "nll.parquet.lock"
    content = b"" if stale == "empty" else f"{_dead_pid()} {__import__('socket').gethostname()}"
    processes, rounds = 8, 60
    start = context.Barrier(processes + 1)
    results = context.Queue()
    workers = [
        context.Process(
            target=_race_worker,
            args=(str(out), str(tmp_path / "inside"), start, results, rounds),
        )
        for _ in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        for _ in range(rounds):
            lock_file.write_bytes(content if isinstance(content, bytes) else content.encode())
            start.wait(timeout=60)  # go
            start.wait(timeout=60)  # done
    finally:
        for worker in workers:
            worker.join(timeout=60)
    outcomes = [results.get(timeout=10) for _ in range(processes * rounds)]
    overlaps = [r for r, what in outcomes if what == "overlap"]
    assert not overlaps, f"two holders at once in rounds {sorted(set(overlaps))}"
    for r in range(rounds):  # the stale lock was taken in every round
        assert any(what == "held" for rr, what in outcomes if rr == r), r


def test_racing_threads_never_hold_the_lock_together(tmp_path):
    import threading

    from cnftools.nll.store import RunLock

    out = tmp_path / "nll.parquet"
    inside, overlaps, held = [0], [], []
    guard = threading.Lock()

    def worker(barrier):
        barrier.wait()
        lock = RunLock(out)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lock.acquire()
        except FileExistsError:
            return
        with guard:
            inside[0] += 1
            if inside[0] > 1:
                overlaps.append(1)
        held.append(1)
        with guard:
            inside[0] -= 1
        lock.release()

    for _ in range(30):
        (tmp_path / "nll.parquet.lock").write_text(f"{_DEAD} {__import__('socket').gethostname()}")
        barrier = threading.Barrier(8)
        threads = [threading.Thread(target=worker, args=(barrier,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not overlaps and held


_DEAD = _dead_pid()
