"""The resume contract of dataset_nll (cnftools/nll/store.py, fingerprint.py): a resumed run
returns the numbers of *this* field on *this* data, or refuses with a message naming the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from _dist_worker import make_case, make_mixture

import cnftools
from cnftools.nll import ResumeError, dataset_nll

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
            dataset_nll(field, data, out=out, **{**FAST, **kwargs})
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
    if change == "lambda":
        _interrupted_run(first, data_1, out, 1, **kwargs, run_id="one")
        with pytest.raises(ValueError, match="run_id="):
            dataset_nll(second, data_2, out=out, resume=True, **FAST, **kwargs)
        return
    _interrupted_run(first, data_1, out, 1, **kwargs, **kwargs_1)
    with pytest.raises(ResumeError, match=r"other settings|changed"):
        dataset_nll(second, data_2, out=out, resume=True, **FAST, **kwargs, **kwargs_2)
    # and after a finished run too
    dataset_nll(first, data_1, out=out, overwrite=True, **FAST, **kwargs, **kwargs_1)
    with pytest.raises(ResumeError, match=r"other settings|other data"):
        dataset_nll(second, data_2, out=out, resume=True, **FAST, **kwargs, **kwargs_2)


def test_run_id_lets_a_lambda_resume(tmp_path):
    _, x = make_case(20)
    out = tmp_path / "nll.parquet"
    field = lambda x, t: -x  # noqa: E731
    _interrupted_run(field, x, out, 1, batch_size=5, run_id="shrink-v1")
    resumed = dataset_nll(field, x, batch_size=5, out=out, resume=True, run_id="shrink-v1", **FAST)
    assert resumed.attrs["summary"]["rows_computed"] == 15
    with pytest.raises(ResumeError, match="run_id"):
        dataset_nll(field, x, batch_size=5, out=out, resume=True, run_id="shrink-v2", **FAST)


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
        dataset_nll(field, x, batch_size=15, out=out, resume=True, **FAST)


@pytest.mark.parametrize("content", ["", "{not json", json.dumps({"format": "someone-else"})])
def test_unreadable_or_foreign_meta_json_refuses(tmp_path, content):
    field, x = make_case(20)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 1, batch_size=10)
    (_chunks(out) / "meta.json").write_text(content)
    with pytest.raises(ResumeError, match=r"meta\.json"):
        dataset_nll(field, x, batch_size=10, out=out, resume=True, **FAST)


@pytest.mark.parametrize("damage", ["zero-bytes", "truncated", "other-unit"])
def test_damaged_or_misplaced_unit_file_refuses(tmp_path, damage):
    field, x = make_case(30)
    out = tmp_path / "nll.parquet"
    _interrupted_run(field, x, out, 2, batch_size=10)
    unit0 = _chunks(out) / "unit-b00000000-r000.parquet"
    unit1 = _chunks(out) / "unit-b00000001-r000.parquet"
    if damage == "zero-bytes":
        unit0.write_bytes(b"")
    elif damage == "truncated":
        unit0.write_bytes(unit0.read_bytes()[:-40])
    else:  # unit 0's file holds batch 1's rows
        os.replace(unit1, unit0)
    with pytest.raises(ResumeError, match=r"unit-b00000000-r000\.parquet"):
        dataset_nll(field, x, batch_size=10, out=out, resume=True, **FAST)


def test_a_parquet_file_cnftools_did_not_write_is_refused(tmp_path):
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    pd.DataFrame({"index": range(10), "nll": np.zeros(10), "status": ["ok"] * 10}).to_parquet(out)
    with pytest.raises(ResumeError, match="not written by"):
        dataset_nll(field, x, batch_size=5, out=out, resume=True, **FAST)


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
            dataset_nll(field, x, batch_size=5, out=out, resume=True, **FAST)
        assert not _chunks(out).exists()  # no orphan chunk directory
        assert lock.read_text().startswith(str(holder.pid))  # the holder's lock is untouched
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the lock is stale and taken over, with a warning
    with pytest.warns(RuntimeWarning, match="stale lock"):
        frame = dataset_nll(field, x, batch_size=5, out=out, resume=True, **FAST)
    assert len(frame) == 10 and not (tmp_path / "nll.parquet.lock").exists()


def test_a_failed_run_leaves_no_chunk_directory(tmp_path):
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    with pytest.raises(RuntimeError, match="every row failed"):
        dataset_nll(field, x * np.nan, batch_size=5, out=out, **FAST)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# failed rows are retried on resume
_FLAKY = {"fail": True}


class _Flaky:
    """Fails on rows with x[0] > 10 while ``_FLAKY["fail"]``: a transient failure."""

    def __init__(self, field):
        self.field = field

    def __call__(self, x, t):
        if _FLAKY["fail"] and bool((x[:, 0] > 10).any()):
            raise RuntimeError("transient")
        return self.field(x, t)


def test_failed_rows_are_retried_on_resume(tmp_path):
    field, x = make_case(20)
    x = x.clone()
    x[3, 0] = 20.0
    out = tmp_path / "nll.parquet"
    _FLAKY["fail"] = True
    try:
        with pytest.warns(RuntimeWarning, match="1 of 20 rows failed"):
            first = dataset_nll(_Flaky(field), x, batch_size=5, out=out, **FAST)
    finally:
        _FLAKY["fail"] = False
    assert first.loc[3, "status"].startswith("error: RuntimeError: transient")
    resumed = dataset_nll(_Flaky(field), x, batch_size=5, out=out, resume=True, **FAST)
    assert (resumed["status"] == "ok").all()
    assert resumed.attrs["summary"]["rows_computed"] == 5  # only the unit with the failure
    clean = dataset_nll(_Flaky(field), x, batch_size=5, **FAST)  # the same wrapper, no failure
    pd.testing.assert_series_equal(resumed["log_prob"], clean["log_prob"], check_exact=True)
    assert not _chunks(out).exists()
