"""Tests of cnftools.analysis: dataset_nll frames, closed forms, resume, failures, distributed.

Theory sections cited here (pages under ``docs/theory/``):

- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from _dist_worker import SETTINGS, SlowField, make_case, make_mixture

from cnftools import SolverConfig
from cnftools.nll import Dequantization, dataset_nll, summarize

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# fixed-grid RK4 with 10 steps: rows are independent of their batch (no shared adaptive step); on
# make_case's Gaussian marginal the global error is below 1e-4 nats (measured against the closed
# form; the tests below that compare with closed forms state their own tolerance)
FAST = {"method": "rk4", "steps": 10, "progress": False}


def _reference(field: object, x: torch.Tensor) -> np.ndarray:
    """The closed-form log p_1(x) (theory §9, §10) of the marginal used as the field."""
    return field.log_prob(x.to(torch.float64), 1.0).numpy()


# ----------------------------------------------------------------------------------------------
# frame layout
@pytest.mark.parametrize(
    ("options", "columns"),
    [
        ({}, ["index", "log_prob", "nll", "nfe", "status"]),
        (
            {"divergence": "hutchinson", "n_probes": 2},
            ["index", "log_prob", "nll", "nfe", "stderr", "rounds", "status"],
        ),
    ],
    ids=["exact", "hutchinson"],
)
def test_frame_columns_and_order(options, columns):
    field, x = make_case(10)
    frame = dataset_nll(field, x, batch_size=4, **FAST, **options)
    assert list(frame.columns) == columns
    assert frame["index"].tolist() == list(range(10))
    assert (frame["status"] == "ok").all()
    np.testing.assert_array_equal(frame["nll"].to_numpy(), -frame["log_prob"].to_numpy())
    summary = frame.attrs["summary"]
    assert summary == summarize(frame)
    assert summary["rows"] == 10 and summary["failures"] == 0
    # rk4 with 10 steps: 4 evaluations a step, one solve per batch of 4 rows (3 batches)
    assert summary["total_nfe"] == 3 * 40


def test_dequantized_frame_has_bpd():
    field, _ = make_case()
    x = torch.randint(0, 4, (6, 2), generator=torch.Generator().manual_seed(1))
    deq = Dequantization(levels=4, samples=2)
    frame = dataset_nll(field, x, dequantization=deq, dtype=torch.float64, **FAST)
    assert list(frame.columns) == ["index", "log_prob", "nll", "bpd", "nfe", "status"]
    # exact identity: bpd = nll / (D ln 2) with D = 2
    np.testing.assert_allclose(frame["bpd"], frame["nll"] / (2 * math.log(2)), rtol=1e-15)


# ----------------------------------------------------------------------------------------------
# closed forms
def test_log_prob_matches_mixture_closed_form(dtype):
    field, x = make_mixture(30, dtype)
    frame = dataset_nll(field, x, batch_size=30, method="rk4", steps=40, progress=False)
    assert (frame["status"] == "ok").all()
    assert frame["log_prob"].dtype == np.float64  # values are stored in float64 whatever the dtype
    # float64: RK4's global error ~C h^4, measured 1.9e-4 nats at h = 1/20, so ~1.2e-5 at h = 1/40;
    # float32: plus rounding of ~1e-7 relative per step over 160 evaluations on values of size ~5
    tol = 1e-4 if dtype == torch.float64 else 1e-3
    np.testing.assert_allclose(frame["log_prob"], _reference(field, x), rtol=0, atol=tol)


def test_hutchinson_mean_is_unbiased_and_meets_target_stderr():
    field, x = make_case(40)
    exact = dataset_nll(field, x, batch_size=10, **FAST)
    target = 0.01
    frame = dataset_nll(
        field, x, batch_size=10, divergence="hutchinson", n_probes=4, target_stderr=target, **FAST
    )
    summary = frame.attrs["summary"]
    assert summary["probe_stderr"] <= target
    # extra rounds only where needed: rows with little probe noise keep one round
    assert frame["rounds"].min() == 1 < frame["rounds"].max()
    # unbiased: the difference of means is probe noise only; 5 standard errors (false failure
    # rate ~6e-7 for a Gaussian error)
    diff = abs(summary["mean_nll"] - exact.attrs["summary"]["mean_nll"])
    assert diff <= 5 * summary["probe_stderr"]
    again = dataset_nll(
        field, x, batch_size=10, divergence="hutchinson", n_probes=4, target_stderr=target, **FAST
    )
    pd.testing.assert_frame_equal(frame, again)  # deterministic from the seed


def test_unreachable_target_stderr_stops_at_max_probes():
    """Today's main runs forever here (84 probes a row with a cap of 16 after a few seconds)."""
    field, x = make_case(12)
    with pytest.warns(RuntimeWarning, match="not reached within max_probes=16"):
        frame = dataset_nll(
            field, x, batch_size=6, divergence="hutchinson", n_probes=4, target_stderr=1e-9,
            max_probes=16, **FAST,
        )  # fmt: skip
    summary = frame.attrs["summary"]
    assert frame["rounds"].max() * 4 <= 16
    assert summary["probes_per_row"] == 16 and summary["max_probes"] == 16
    assert summary["target_met"] is False


class _CountRows:
    """The field, counting the rows it is called on during solves."""

    def __init__(self, field):
        self.field, self.rows = field, [0]

    def __call__(self, x, t):
        self.rows[0] += x.shape[0]
        return self.field(x, t)


def test_extra_probe_rounds_go_only_to_rows_that_need_them():
    """R_i proportional to the row's probe sd: rows whose first round has no probe noise (two
    Rademacher probes equal up to sign, in 2-D) keep one round, the others get more."""
    field, x = make_case(20)
    options = {"batch_size": 5, "divergence": "hutchinson", "n_probes": 2, **FAST}
    first = dataset_nll(field, x, **options)
    quiet = first["stderr"].to_numpy() == 0
    assert 0 < quiet.sum() < 20
    frame = dataset_nll(field, x, target_stderr=0.02, max_probes=64, **options)
    rounds = frame["rounds"].to_numpy()
    assert (rounds[quiet] == 1).all() and (rounds[~quiet] > 1).all()
    assert frame.attrs["summary"]["target_met"] is True


def test_num_threads_is_used_and_restored():
    field, x = make_case(4)
    before = torch.get_num_threads()
    seen = []

    def spy(x, t):
        seen.append(torch.get_num_threads())
        return field(x, t)

    dataset_nll(spy, x, batch_size=4, num_threads=1, **FAST)
    assert set(seen) == {1} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        dataset_nll(field, x, num_threads=0, **FAST)


def test_choose_threads_is_bounded():
    from cnftools.nll.distributed import choose_threads

    assert 1 <= choose_threads(torch.device("cpu")) <= torch.get_num_threads()


@pytest.mark.parametrize("kind", ["numpy", "frame", "npy", "csv", "parquet", "dataset", "loader"])
def test_data_sources_agree(kind, tmp_path):
    field, x = make_case(9)
    expected = dataset_nll(field, x, batch_size=4, **FAST)
    array = x.numpy()
    frame_in = pd.DataFrame({"a": array[:, 0], "label": np.arange(9), "b": array[:, 1]})
    columns = None
    if kind == "numpy":
        data = array
    elif kind == "frame":
        data, columns = frame_in, ["a", "b"]
    elif kind == "npy":
        data = tmp_path / "x.npy"
        np.save(data, array)
    elif kind == "csv":
        data, columns = tmp_path / "x.csv", ["a", "b"]
        frame_in.to_csv(data, index=False, float_format="%.17g")
    elif kind == "parquet":
        data, columns = tmp_path / "x.parquet", ["a", "b"]
        frame_in.to_parquet(data)
    elif kind == "dataset":
        data = torch.utils.data.TensorDataset(x, torch.arange(9))
    else:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=5)
    got = dataset_nll(field, data, columns=columns, batch_size=4, **FAST)
    # same rows in float64: identical up to CSV's 17-digit round trip
    np.testing.assert_allclose(got["log_prob"], expected["log_prob"], rtol=0, atol=1e-12)


def test_dequantized_value_matches_closed_form():
    """K-sample bound with the documented noise: log mean_k p_1(y_k) + D log(1/L)."""
    from cnftools.data import dequantize
    from cnftools.nll.units import unit_seed as _unit_seed

    field, _ = make_case()
    levels, k = 5, 3
    x = torch.randint(0, levels, (6, 2), generator=torch.Generator().manual_seed(2))
    frame = dataset_nll(
        field, x, batch_size=6, dequantization=Dequantization(levels, k), dtype=torch.float64,
        seed=7, **FAST,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(_unit_seed(7, 0, 0, 1))
    terms = torch.stack(
        [field.log_prob(dequantize(x, levels, gen, dtype=torch.float64), 1.0) for _ in range(k)]
    )
    expected = torch.logsumexp(terms, 0) - math.log(k) + 2 * math.log(1 / levels)
    # RK4 with 10 steps on the Gaussian marginal, for points y in [0, 1)^2 (the tails of N(m, S)):
    # measured error 3e-5 nats, tolerance with margin
    np.testing.assert_allclose(frame["log_prob"], expected.numpy(), rtol=0, atol=2e-4)


# ----------------------------------------------------------------------------------------------
# failures and bad inputs
class _FailOnLargeX:
    """The mixture field, except that it raises for any batch with a coordinate above 50."""

    def __init__(self, field):
        self.field = field

    def __call__(self, x, t):
        if bool((x.abs() > 50).any()):
            raise RuntimeError("boom: x too large")
        return self.field(x, t)


def test_failed_rows_are_recorded_and_do_not_fail_their_neighbours():
    field, x = make_case(12)
    x = x.clone()
    x[1, 0] = float("nan")  # batch 0: one NaN row, the others must still be computed
    x[9, 1] = 1e3  # batch 2 (rows 8..11) fails as a batch, then is retried row by row
    with pytest.warns(RuntimeWarning, match=r"2 of 12 rows failed.*non-finite input"):
        frame = dataset_nll(_FailOnLargeX(field), x, batch_size=4, **FAST)
    status = frame["status"].tolist()
    assert status[1].startswith("error: non-finite input")
    assert status[9].startswith("error: RuntimeError: boom")
    ok = [i for i in range(12) if i not in (1, 9)]
    assert all(status[i] == "ok" for i in ok)
    assert frame.loc[[1, 9], "log_prob"].isna().all()
    # rk4 rows are batch-independent: the other rows equal a clean run's, up to float64 rounding
    clean = dataset_nll(field, x[ok], batch_size=4, **FAST)
    np.testing.assert_allclose(frame.loc[ok, "log_prob"], clean["log_prob"], rtol=0, atol=1e-12)
    assert frame.attrs["summary"]["failures"] == 2


class _FailInTheSolve:
    """Passes dataset_nll's trial call (t = 0.5) and fails at every other time."""

    def __init__(self, field):
        self.field = field

    def __call__(self, x, t):
        if bool((t != 0.5).any()):
            raise RuntimeError("boom: solver time")
        return self.field(x, t)


def test_every_row_failing_raises_with_the_first_error_chained():
    field, x = make_case(6)
    with pytest.raises(RuntimeError, match="every row failed") as info:
        dataset_nll(_FailInTheSolve(field), x, batch_size=4, **FAST)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "boom" in str(info.value.__cause__)


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        (pd.DataFrame({"a": [1.0], "b": [2.0]}), {"columns": ["a", "c"]}, ValueError, r"\['c'\]"),
        (pd.DataFrame({"a": [1.0], "s": ["x"]}), {}, ValueError, "non-numeric"),
        (torch.zeros(4, 3, dtype=torch.float64), {}, ValueError, "shape"),
        (torch.zeros(4, dtype=torch.float64), {}, ValueError, "event dimension"),
        (torch.zeros(4, 2, dtype=torch.float64), {"divergence": "exakt"}, ValueError, "divergence"),
        (torch.zeros(4, 2, dtype=torch.float64), {"target_stderr": 0.1}, ValueError, "hutchinson"),
        (torch.zeros(4, 2, dtype=torch.float64), {"batch_size": 0}, ValueError, "batch_size"),
        ("missing.npy", {}, FileNotFoundError, "missing.npy"),
        ([[1.0, 2.0]], {}, TypeError, "data must be"),
        (torch.zeros(4, 2, dtype=torch.float64), {"noise": "uniform"}, ValueError, "noise must"),
        (torch.zeros(4, 2, dtype=torch.float64), {"noise": "gaussian"}, ValueError, "hutchinson"),
        (
            torch.zeros(4, 2, dtype=torch.float64),
            {"method": None, "steps": None, "config": SolverConfig(), "step_size": 0.1},
            ValueError,
            "is adaptive",
        ),
        (
            torch.zeros(4, 2, dtype=torch.float64),
            {"config": {"method": "rk4"}},
            TypeError,
            "config must be a SolverConfig",
        ),
    ],
    ids=[
        "missing-column",
        "text-column",
        "wrong-dim",
        "1d",
        "divergence",
        "target",
        "batch",
        "file",
        "list",
        "noise",
        "noise-exact",
        "grid-for-adaptive",
        "config-dict",
    ],
)
def test_bad_inputs_raise_before_work(data, kwargs, error, match):
    field, _ = make_case()
    with pytest.raises(error, match=match):
        dataset_nll(field, data, **{**FAST, **kwargs})


# ----------------------------------------------------------------------------------------------
# out, resume, atomic chunks
def test_out_file_resume_and_overwrite(tmp_path):
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    first = dataset_nll(field, x, batch_size=4, out=out, **FAST)
    assert out.exists() and not (tmp_path / "nll.parquet.chunks").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(out), first, check_like=False)
    with pytest.raises(FileExistsError, match="resume"):
        dataset_nll(field, x, batch_size=4, out=out, **FAST)
    again = dataset_nll(field, x, batch_size=4, out=out, resume=True, **FAST)
    assert again.attrs["summary"]["rows_computed"] == 0  # nothing recomputed
    pd.testing.assert_frame_equal(again, first)
    with pytest.raises(ValueError, match="batch_size"):
        dataset_nll(field, x, batch_size=5, out=out, resume=True, **FAST)
    third = dataset_nll(field, x, batch_size=5, out=out, overwrite=True, **FAST)
    assert third.attrs["summary"]["rows_computed"] == 10


_KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from _dist_worker import SETTINGS, SlowField, make_case
import cnftools

field, x = make_case()
cnftools.dataset_nll(SlowField(field, 0.01), x, out={out!r}, **SETTINGS)
"""


def test_resume_after_sigkill_gives_identical_rows(tmp_path):
    field, x = make_case()
    out = tmp_path / "nll.parquet"
    chunks = tmp_path / "nll.parquet.chunks"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT.format(tests=str(TESTS), out=str(out))))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(script)], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # kill once 2 of the 6 units are on disk
            if len(list(chunks.glob("unit-*.parquet"))) >= 2 or proc.poll() is not None:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {stderr[-2000:]}"
    done = len(list(chunks.glob("unit-*.parquet")))
    assert 2 <= done < 6, f"the kill should land mid-run, {done} units were on disk"
    assert not out.exists()
    # the same field (a wrapper's settings are part of its fingerprint, so it is the same wrapper)
    # the killed run's lock names a process that is gone: taken over, with a warning
    with pytest.warns(RuntimeWarning, match="stale lock"):
        resumed = dataset_nll(SlowField(field, 0.01), x, out=out, resume=True, **SETTINGS)
    assert resumed.attrs["summary"]["rows_computed"] == 40 - 7 * done
    plain = dataset_nll(SlowField(field), x, **SETTINGS)
    assert resumed["index"].tolist() == list(range(40))  # one row per input, no duplicates
    # same inputs, same seeds, same operations: identical numbers, bit for bit
    pd.testing.assert_frame_equal(resumed, plain, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(out), plain, check_exact=True)


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["tensor", "stream"])
def test_two_gloo_processes_equal_one(tmp_path, source):
    field, x = make_case()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(TESTS / "_dist_worker.py"), str(tmp_path), source,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "world.txt").read_text() == "2"
    two = pd.read_parquet(tmp_path / "frame.parquet")
    one = dataset_nll(field, x, **SETTINGS)
    # each unit's probes are seeded by (seed, batch), whichever rank computes it: bit-identical
    pd.testing.assert_frame_equal(two, one, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "nll.parquet"), one, check_exact=True)
    assert not (tmp_path / "nll.parquet.chunks").exists()


# ----------------------------------------------------------------------------------------------
def test_progress_bar_reports_rows(capsys):
    field, x = make_case(8)
    dataset_nll(field, x, batch_size=4, **{**FAST, "progress": True})
    err = capsys.readouterr().err
    assert "8/8" in err and "row/s" in err


# ----------------------------------------------------------------------------------------------
# Conditional fields: extras= reaches the field as v(x, t, **extras), sliced with every batch.
def _conditional_case():
    import cnftools

    torch.manual_seed(0)
    field = cnftools.MLPField(2, (16,), num_classes=3, dtype=torch.float64)
    x = torch.randn(23, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(23) % 3
    return field, x, y


@pytest.mark.parametrize("route", ["extras", "pairs", "loader"])
def test_conditional_field_gets_each_rows_label(route):
    """Every route gives each row its own label: the values equal one log_likelihood call with
    extras on the whole tensor, to rounding (a fixed rk4 grid, so batch composition cannot change
    the steps; 1e-12 nats covers float64 summation order)."""
    import cnftools

    field, x, y = _conditional_case()
    data, extras = {
        "extras": (x, {"y": y}),
        "pairs": (torch.utils.data.TensorDataset(x, y), None),
        "loader": (
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
            None,
        ),
    }[route]
    frame = dataset_nll(
        field, data, extras=extras, batch_size=8, method="rk4", steps=8, progress=False
    )
    with torch.no_grad():
        expected = cnftools.log_likelihood(field, x, extras={"y": y}, method="rk4", steps=8)
    assert (frame["status"] == "ok").all()
    np.testing.assert_allclose(frame["log_prob"], expected.numpy(), rtol=0, atol=1e-12)
    # and a wrong label changes the value: the labels really reach the field
    shifted = dataset_nll(
        field, x, extras={"y": (y + 1) % 3}, batch_size=8, method="rk4", steps=8, progress=False
    )
    assert np.abs(shifted["log_prob"].to_numpy() - expected.numpy()).max() > 1e-6


def test_constant_extras_are_passed_as_is_and_resume_checks_every_extra(tmp_path):
    import cnftools

    field, x, y = _conditional_case()
    out = tmp_path / "nll.parquet"
    kw = dict(batch_size=8, method="rk4", steps=4, progress=False, out=out, keep_chunks=True)
    dataset_nll(field, x, extras={"y": y}, **kw)
    with pytest.raises(cnftools.nll.ResumeError):
        dataset_nll(field, x, extras={"y": y.flip(0)}, resume=True, **kw)

    def scaled(x, t, scale):
        return scale * x

    with pytest.raises(ValueError, match="per-row"):  # a stream cannot slice a tensor per row
        dataset_nll(
            field,
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4),
            extras={"y": y},
            progress=False,
        )
    frame = dataset_nll(scaled, x, extras={"scale": 0.5}, batch_size=8, method="rk4", steps=4)
    # v = x/2: log p_1(x) = log N(e^{-1/2} x; 0, I) - d/2 exactly (the divergence is constant)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x * math.exp(-0.5)).sum(1) - 1.0
    np.testing.assert_allclose(frame["log_prob"], expected.numpy(), rtol=0, atol=1e-4)


def test_labels_of_a_dataset_skip_a_field_that_takes_none():
    """torchvision-style (x, label) items with an unconditional field: the labels are not passed
    (they do not enter log p(x)); the values equal those of the bare rows exactly."""
    _, x, y = _conditional_case()

    def unconditional(x, t):
        return -x

    plain = dataset_nll(unconditional, x, batch_size=8, method="rk4", steps=4, progress=False)
    pairs = dataset_nll(
        unconditional,
        torch.utils.data.TensorDataset(x, y),
        batch_size=8,
        method="rk4",
        steps=4,
        progress=False,
    )
    np.testing.assert_array_equal(pairs["log_prob"], plain["log_prob"])


def test_extras_given_twice_are_refused():
    field, x, y = _conditional_case()
    with pytest.raises(ValueError, match="both"):
        dataset_nll(field, torch.utils.data.TensorDataset(x, y), extras={"y": y}, progress=False)


# ----------------------------------------------------------------------------------------------
# solver settings: SolverConfig carries them, the keywords are sugar, solver_options is deprecated
@pytest.mark.parametrize(
    ("keywords", "config"),
    [
        ({"method": "rk4", "steps": 10}, SolverConfig("rk4", steps=10)),
        ({"steps": 10, "config": SolverConfig("rk4", steps=3)}, SolverConfig("rk4", steps=10)),
        ({"rtol": 1e-7, "atol": 1e-8}, SolverConfig(rtol=1e-7, atol=1e-8)),
    ],
)
def test_solver_keywords_are_sugar_over_the_config(keywords, config):
    field, x = make_case(6)
    flat = dataset_nll(field, x, batch_size=3, progress=False, **keywords)
    carried = dataset_nll(field, x, batch_size=3, progress=False, config=config)
    # The same configuration is the same computation: equal frames, bit for bit.
    pd.testing.assert_frame_equal(flat, carried)
    assert flat.attrs["run"]["solver"] == carried.attrs["run"]["solver"]


def test_solver_options_is_deprecated_and_noise_replaces_it(tmp_path):
    field, x = make_case(6)
    hutchinson = {"divergence": "hutchinson", "n_probes": 2, "batch_size": 3, **FAST}
    new = dataset_nll(field, x, noise="gaussian", **hutchinson)
    with pytest.warns(DeprecationWarning, match=r"config=SolverConfig\(\.\.\.\).*noise="):
        old = dataset_nll(field, x, solver_options={"noise": "gaussian"}, **hutchinson)
    # The same probes (same seed, same distribution): equal frames, bit for bit.
    pd.testing.assert_frame_equal(new, old)
    rademacher = dataset_nll(field, x, **hutchinson)
    assert not np.array_equal(rademacher["log_prob"], new["log_prob"])  # noise= reached the probes
    # A run started with the deprecated form resumes with noise= (the same recorded identity).
    out = tmp_path / "nll.parquet"
    with pytest.warns(DeprecationWarning):
        dataset_nll(field, x, solver_options={"noise": "gaussian"}, out=out, **hutchinson)
    again = dataset_nll(field, x, noise="gaussian", out=out, resume=True, **hutchinson)
    assert again.attrs["summary"]["rows_computed"] == 0
    with pytest.raises(ValueError, match="noise= alone"), pytest.warns(DeprecationWarning):
        dataset_nll(field, x, noise="gaussian", solver_options={"noise": "gaussian"}, **hutchinson)


# ----------------------------------------------------------------------------------------------
# Resume never mixes two models: the reproducers, through dataset_nll(resume=True)
class _Killed(BaseException):
    """Stands for a kill: not an Exception, so dataset_nll does not record it as a row failure."""


def _interrupted(field, x, out, units: int, **kwargs) -> None:
    """Run dataset_nll and stop it (as a kill would) after ``units`` units are on disk."""
    import cnftools.nll.store as store

    original = store.ChunkStore.write_unit
    count = {"n": 0}

    def write_then_stop(self, *args, **kw):
        original(self, *args, **kw)
        count["n"] += 1
        if count["n"] >= units:
            raise _Killed

    store.ChunkStore.write_unit = write_then_stop
    try:
        with pytest.raises(_Killed):
            dataset_nll(field, x, out=out, **{**FAST, **kwargs})
    finally:
        store.ChunkStore.write_unit = original


class _ModelWithState(torch.nn.Module):
    """A field whose numbers depend on a path, a non-buffer tensor, a private float, a list and
    a lambda it holds (none of them parameters or buffers)."""

    def __init__(self, sigma=0.1, tensor=(1.0, 1.0), private=1.0, widths=(1.0,), time=None):
        super().__init__()
        import cnftools

        self.path = cnftools.OTPath(sigma)
        self.frequencies = torch.tensor(tensor, dtype=torch.float64)
        self._scale = private
        self.widths = list(widths)
        self.time = time if time is not None else (lambda t: t)

    def forward(self, x, t):
        s = self.path.noise_scale(t)[:, None] * self.time(t)[:, None]
        return -x * (0.5 + s) * self.frequencies * self._scale * sum(self.widths)


def _scaled_velocity(x, t, scale):
    return -scale * x


def _epsilon_model(x, tau):
    return 0.3 * x


def _score_model(x, tau):
    return -x * (1.0 + tau[:, None])


def _weighted(x, t, w):
    return -x * (1.0 + float(w.sum()))


def _reproducer(change: str, second: bool):
    """The issue's cases: ``(field, extras)`` of the first run or (``second``) of the changed one."""
    import functools

    import cnftools

    if change == "path":
        return _ModelWithState(sigma=0.5 if second else 0.1), None
    if change == "tensor":
        return _ModelWithState(tensor=(1.0, 1.5) if second else (1.0, 1.0)), None
    if change == "private":
        return _ModelWithState(private=1.5 if second else 1.0), None
    if change == "list":
        return _ModelWithState(widths=(1.0, 0.5) if second else (1.0,)), None
    if change == "lambda":
        return _ModelWithState(time=(lambda t: 1 - t) if second else (lambda t: t)), None
    if change == "partial":
        return functools.partial(_scaled_velocity, scale=2.0 if second else 1.0), None
    if change == "as-velocity-path":
        path = cnftools.VPPath(0.1, 19.0 if second else 20.0)
        return cnftools.as_velocity(_epsilon_model, path, prediction="epsilon", t_max=0.99), None
    if change == "as-velocity-time":
        time = (lambda t: 0.5 * (1 - t)) if second else (lambda t: 1 - t)
        field = cnftools.as_velocity(
            _score_model, cnftools.VPPath(), prediction="score", time=time, t_max=0.99
        )
        return field, None
    assert change == "numpy-extras"
    w = np.zeros(1500)
    if second:
        w[1000] = 1e-3  # beyond a truncated repr of the array
    return _weighted, {"w": w}


@pytest.mark.parametrize(
    "change",
    [
        "path", "tensor", "private", "list", "lambda", "partial", "as-velocity-path",
        "as-velocity-time", "numpy-extras",
    ],
)  # fmt: skip
def test_resume_refuses_a_changed_model_the_fingerprint_did_not_see(tmp_path, change):
    """Today's main resumed each of these and returned 30 of 40 rows from the old model."""
    from cnftools.nll import ResumeError

    _, x = make_case(40)
    out = tmp_path / "nll.parquet"
    first, extras_1 = _reproducer(change, second=False)
    second, extras_2 = _reproducer(change, second=True)
    # the change matters: the two models give other numbers
    a = dataset_nll(first, x[:4], extras=extras_1, **FAST)
    b = dataset_nll(second, x[:4], extras=extras_2, **FAST)
    assert not np.allclose(a["log_prob"], b["log_prob"], rtol=0, atol=1e-9)
    _interrupted(first, x, out, 1, batch_size=10, extras=extras_1)
    with pytest.raises(ResumeError, match="other settings, field or prior"):
        dataset_nll(second, x, batch_size=10, out=out, resume=True, extras=extras_2, **FAST)
    # the same model, built again: it resumes, and its numbers are one run's
    again, extras_3 = _reproducer(change, second=False)
    resumed = dataset_nll(again, x, batch_size=10, out=out, resume=True, extras=extras_3, **FAST)
    assert resumed.attrs["summary"]["rows_computed"] == 30
    whole = dataset_nll(first, x, batch_size=10, extras=extras_1, **FAST)
    pd.testing.assert_frame_equal(resumed, whole, check_exact=True)


def test_an_unreadable_field_refuses_resume_and_names_the_part(tmp_path):
    field, x = make_case(20)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.source = (i for i in range(3))  # a generator: its state cannot be read

        def forward(self, x, t):
            return field(x, t)

    with pytest.raises(ValueError, match=r"v\.source is a builtins\.generator.*run_id="):
        dataset_nll(Holder(), x, out=tmp_path / "nll.parquet", resume=True, **FAST)
    frame = dataset_nll(Holder(), x, out=tmp_path / "nll.parquet", resume=True, run_id="r1", **FAST)
    assert len(frame) == 20
