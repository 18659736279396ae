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
from _dist_worker import ADAPTIVE, SETTINGS, SlowField, make_case, make_mixture, make_mlp
from _nll_call import run_nll

from cnftools import Exact, Hutchinson, SolverConfig
from cnftools.nll import (
    Dequantization,
    Execution,
    Output,
    PerRow,
    Shared,
    dataset_nll,
    summarize,
)

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
    frame = run_nll(field, x, batch_size=4, **FAST, **options)
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
    frame = run_nll(field, x, dequantization=deq, dtype=torch.float64, **FAST)
    assert list(frame.columns) == ["index", "log_prob", "nll", "bpd", "nfe", "status"]
    # exact identity: bpd = nll / (D ln 2) with D = 2
    np.testing.assert_allclose(frame["bpd"], frame["nll"] / (2 * math.log(2)), rtol=1e-15)


# ----------------------------------------------------------------------------------------------
# closed forms
def test_log_prob_matches_mixture_closed_form(dtype):
    field, x = make_mixture(30, dtype)
    frame = run_nll(field, x, batch_size=30, method="rk4", steps=40, progress=False)
    assert (frame["status"] == "ok").all()
    assert frame["log_prob"].dtype == np.float64  # values are stored in float64 whatever the dtype
    # float64: RK4's global error ~C h^4, measured 1.9e-4 nats at h = 1/20, so ~1.2e-5 at h = 1/40;
    # float32: plus rounding of ~1e-7 relative per step over 160 evaluations on values of size ~5
    tol = 1e-4 if dtype == torch.float64 else 1e-3
    np.testing.assert_allclose(frame["log_prob"], _reference(field, x), rtol=0, atol=tol)


def test_hutchinson_mean_is_unbiased_and_meets_target_stderr():
    field, x = make_case(40)
    exact = run_nll(field, x, batch_size=10, **FAST)
    target = 0.01
    frame = run_nll(
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
    again = run_nll(
        field, x, batch_size=10, divergence="hutchinson", n_probes=4, target_stderr=target, **FAST
    )
    pd.testing.assert_frame_equal(frame, again)  # deterministic from the seed


def test_unreachable_target_stderr_stops_at_max_probes():
    """Today's main runs forever here (84 probes a row with a cap of 16 after a few seconds)."""
    field, x = make_case(12)
    with pytest.warns(RuntimeWarning, match="not reached within max_probes=16"):
        frame = run_nll(
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
    first = run_nll(field, x, **options)
    quiet = first["stderr"].to_numpy() == 0
    assert 0 < quiet.sum() < 20
    frame = run_nll(field, x, target_stderr=0.02, max_probes=64, **options)
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

    run_nll(spy, x, batch_size=4, num_threads=1, **FAST)
    assert set(seen) == {1} and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="num_threads"):
        run_nll(field, x, num_threads=0, **FAST)


def test_choose_threads_is_bounded():
    from cnftools.nll.distributed import choose_threads

    assert 1 <= choose_threads(torch.device("cpu")) <= torch.get_num_threads()


@pytest.mark.parametrize("kind", ["numpy", "frame", "npy", "csv", "parquet", "dataset", "loader"])
def test_data_sources_agree(kind, tmp_path):
    field, x = make_case(9)
    expected = run_nll(field, x, batch_size=4, **FAST)
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
    got = run_nll(field, data, columns=columns, batch_size=4, **FAST)
    # same rows in float64: identical up to CSV's 17-digit round trip
    np.testing.assert_allclose(got["log_prob"], expected["log_prob"], rtol=0, atol=1e-12)


def test_dequantized_value_matches_closed_form():
    """K-sample bound with the documented noise: log mean_k p_1(y_k) + D log(1/L)."""
    from cnftools.data import dequantize
    from cnftools.nll.units import unit_seed as _unit_seed

    field, _ = make_case()
    levels, k = 5, 3
    x = torch.randint(0, levels, (6, 2), generator=torch.Generator().manual_seed(2))
    frame = run_nll(
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
        frame = run_nll(_FailOnLargeX(field), x, batch_size=4, **FAST)
    status = frame["status"].tolist()
    assert status[1].startswith("error: non-finite input")
    assert status[9].startswith("error: RuntimeError: boom")
    ok = [i for i in range(12) if i not in (1, 9)]
    assert all(status[i] == "ok" for i in ok)
    assert frame.loc[[1, 9], "log_prob"].isna().all()
    # rk4 rows are batch-independent: the other rows equal a clean run's, up to float64 rounding
    clean = run_nll(field, x[ok], batch_size=4, **FAST)
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
        run_nll(_FailInTheSolve(field), x, batch_size=4, **FAST)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "boom" in str(info.value.__cause__)


@pytest.mark.parametrize(
    ("data", "kwargs", "error", "match"),
    [
        (pd.DataFrame({"a": [1.0], "b": [2.0]}), {"columns": ["a", "c"]}, ValueError, r"\['c'\]"),
        (pd.DataFrame({"a": [1.0], "s": ["x"]}), {}, ValueError, "non-numeric"),
        (torch.zeros(4, 3, dtype=torch.float64), {}, ValueError, "shape"),
        (torch.zeros(4, dtype=torch.float64), {}, ValueError, "event dimension"),
        (
            torch.zeros(4, 2, dtype=torch.float64),
            {"estimator": "exakt"},
            TypeError,
            "estimator must be a divergence spec",
        ),
        (
            torch.zeros(4, 2, dtype=torch.float64),
            {"target_stderr": 0.1},
            ValueError,
            r"Execution\(target_stderr=\.\.\.\) applies to estimator=Hutchinson",
        ),
        ("missing.npy", {}, FileNotFoundError, "missing.npy"),
        ([[1.0, 2.0]], {}, TypeError, "data must be"),
        (
            torch.zeros(4, 2, dtype=torch.float64),
            {"accuracy": 1e-6, "rtol": 1e-8},
            ValueError,
            r"accuracy= chooses .* do not also give \['rtol'\]",
        ),
        (
            torch.zeros(4, 2, dtype=torch.float64),
            {"config": {"method": "rk4"}},
            TypeError,
            r"config must be a cnftools\.SolverConfig",
        ),
    ],
    ids=[
        "missing-column",
        "text-column",
        "wrong-dim",
        "1d",
        "divergence",
        "target",
        "file",
        "list",
        "accuracy-and-rtol",
        "config-dict",
    ],
)
def test_bad_inputs_raise_before_work(data, kwargs, error, match):
    """(The option objects' own errors, raised at construction, are in test_nll_options.py.)"""
    field, _ = make_case()
    flat = {**FAST, **kwargs}
    if "accuracy" in flat or "config" in flat:  # not with FAST's grid
        flat = {k: v for k, v in flat.items() if k not in ("method", "steps")}
    with pytest.raises(error, match=match):
        run_nll(field, data, **flat)


# ----------------------------------------------------------------------------------------------
# out, resume, atomic chunks
def test_out_file_resume_and_overwrite(tmp_path):
    field, x = make_case(10)
    out = tmp_path / "nll.parquet"
    first = run_nll(field, x, batch_size=4, out=out, **FAST)
    assert out.exists() and not (tmp_path / "nll.parquet.chunks").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(out), first, check_like=False)
    with pytest.raises(FileExistsError, match="resume"):
        run_nll(field, x, batch_size=4, out=out, **FAST)
    again = run_nll(field, x, batch_size=4, out=out, resume=True, **FAST)
    assert again.attrs["summary"]["rows_computed"] == 0  # nothing recomputed
    pd.testing.assert_frame_equal(again, first)
    with pytest.raises(ValueError, match="batch_size"):
        run_nll(field, x, batch_size=5, out=out, resume=True, **FAST)
    third = run_nll(field, x, batch_size=5, out=out, overwrite=True, **FAST)
    assert third.attrs["summary"]["rows_computed"] == 10


_KILL_SCRIPT = """
import sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import _dist_worker
from _dist_worker import SlowField
from _nll_call import run_nll

field, x = getattr(_dist_worker, {make!r})()
settings = getattr(_dist_worker, {settings!r})
run_nll(SlowField(field, 0.01), x, out={out!r}, **settings)
"""

_KILL_CASES = {
    # the Hutchinson probes of a unit are seeded from (seed, batch, round): fixed grid, rk4
    "fixed-grid-hutchinson": ("make_case", "SETTINGS"),
    # issue 18 item 3: the adaptive engine with the exact divergence of an MLPField, rows on
    # their own steps; a resumed run must give the uninterrupted run's bits too
    "adaptive-exact-mlp": ("make_mlp", "ADAPTIVE"),
}


@pytest.mark.parametrize("case", sorted(_KILL_CASES))
def test_resume_after_sigkill_gives_identical_rows(tmp_path, case):
    import _dist_worker

    make, settings_name = _KILL_CASES[case]
    field, x = getattr(_dist_worker, make)()
    settings = getattr(_dist_worker, settings_name)
    out = tmp_path / "nll.parquet"
    chunks = tmp_path / "nll.parquet.chunks"
    script = tmp_path / "run.py"
    text = _KILL_SCRIPT.format(tests=str(TESTS), out=str(out), make=make, settings=settings_name)
    script.write_text(textwrap.dedent(text))
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
        resumed = run_nll(SlowField(field, 0.01), x, out=out, resume=True, **settings)
    assert resumed.attrs["summary"]["rows_computed"] == 40 - 7 * done
    plain = run_nll(SlowField(field), x, **settings)
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
    one = run_nll(field, x, **SETTINGS)
    # each unit's probes are seeded by (seed, batch), whichever rank computes it: bit-identical
    pd.testing.assert_frame_equal(two, one, check_exact=True)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "nll.parquet"), one, check_exact=True)
    assert not (tmp_path / "nll.parquet.chunks").exists()


def test_two_gloo_processes_equal_one_with_rows_on_their_own_adaptive_steps(tmp_path):
    """The engine issue's requirement: with an adaptive solver and an autograd divergence, a
    row's log-likelihood under torchrun with 2 ranks (batches of 7) equals one process with one
    batch of 40 to 1e-12 relative (each row on its own steps; only the field's products on
    batches of other sizes round differently)."""
    field, x = make_mlp()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(TESTS / "_dist_worker.py"), str(tmp_path), "adaptive",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    two = pd.read_parquet(tmp_path / "frame.parquet")["log_prob"].to_numpy()
    one = run_nll(field, x, **{**ADAPTIVE, "batch_size": 40})["log_prob"].to_numpy()
    np.testing.assert_allclose(two, one, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------------------------
def test_progress_bar_reports_rows(capsys):
    field, x = make_case(8)
    run_nll(field, x, batch_size=4, **{**FAST, "progress": True})
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
        "extras": (x, {"y": PerRow(y)}),
        "pairs": (torch.utils.data.TensorDataset(x, y), None),
        "loader": (
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4),
            None,
        ),
    }[route]
    frame = run_nll(field, data, extras=extras, batch_size=8, method="rk4", steps=8, progress=False)
    with torch.no_grad():
        expected = cnftools.log_likelihood(
            field, x, extras={"y": y}, config=SolverConfig("rk4", steps=8)
        ).log_prob
    assert (frame["status"] == "ok").all()
    np.testing.assert_allclose(frame["log_prob"], expected.numpy(), rtol=0, atol=1e-12)
    # and a wrong label changes the value: the labels really reach the field
    shifted = run_nll(
        field,
        x,
        extras={"y": PerRow((y + 1) % 3)},
        batch_size=8,
        method="rk4",
        steps=8,
        progress=False,
    )
    assert np.abs(shifted["log_prob"].to_numpy() - expected.numpy()).max() > 1e-6


def test_constant_extras_are_passed_as_is_and_resume_checks_every_extra(tmp_path):
    import cnftools

    field, x, y = _conditional_case()
    out = tmp_path / "nll.parquet"
    kw = dict(batch_size=8, method="rk4", steps=4, progress=False, out=out, keep_chunks=True)
    run_nll(field, x, extras={"y": PerRow(y)}, **kw)
    with pytest.raises(cnftools.nll.ResumeError):
        run_nll(field, x, extras={"y": PerRow(y.flip(0))}, resume=True, **kw)

    def scaled(x, t, scale):
        return scale * x

    with pytest.raises(ValueError, match="per-row"):  # a stream cannot slice a tensor per row
        run_nll(
            field,
            torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4),
            extras={"y": PerRow(y)},
            progress=False,
        )
    frame = run_nll(scaled, x, extras={"scale": 0.5}, batch_size=8, method="rk4", steps=4)
    # v = x/2: log p_1(x) = log N(e^{-1/2} x; 0, I) - d/2 exactly (the divergence is constant)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x * math.exp(-0.5)).sum(1) - 1.0
    np.testing.assert_allclose(frame["log_prob"], expected.numpy(), rtol=0, atol=1e-4)


def test_labels_of_a_dataset_skip_a_field_that_takes_none():
    """torchvision-style (x, label) items with an unconditional field: the labels are not passed
    (they do not enter log p(x)); the values equal those of the bare rows exactly."""
    _, x, y = _conditional_case()

    def unconditional(x, t):
        return -x

    plain = run_nll(unconditional, x, batch_size=8, method="rk4", steps=4, progress=False)
    pairs = run_nll(
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
        run_nll(
            field, torch.utils.data.TensorDataset(x, y), extras={"y": PerRow(y)}, progress=False
        )


# ----------------------------------------------------------------------------------------------
# solver settings: SolverConfig carries them, the keywords method/rtol/atol are sugar
@pytest.mark.parametrize(
    ("keywords", "config"),
    [
        (
            {"method": "rk4", "config": SolverConfig("euler", steps=10)},
            SolverConfig("rk4", steps=10),
        ),
        ({"method": "dopri5", "config": SolverConfig("rk4", steps=3)}, SolverConfig()),
        ({"rtol": 1e-7, "atol": 1e-8}, SolverConfig(rtol=1e-7, atol=1e-8)),
    ],
)
def test_solver_keywords_are_sugar_over_the_config(keywords, config):
    field, x = make_case(6)
    execution = Execution(batch_size=3, progress=False)
    flat = dataset_nll(field, x, execution=execution, **keywords)
    carried = dataset_nll(field, x, execution=execution, config=config)
    # The same configuration is the same computation: equal frames, bit for bit.
    pd.testing.assert_frame_equal(flat, carried)
    assert flat.attrs["run"]["solver"] == carried.attrs["run"]["solver"]


def test_noise_reaches_the_probes_and_is_part_of_the_run(tmp_path):
    """Hutchinson(noise=...) decides the probes (replaces 0.1's solver_options={"noise": ...});
    a run resumes with the same spec and refuses another noise."""
    field, x = make_case(6)
    base = {
        "config": SolverConfig("rk4", steps=10),
        "execution": Execution(batch_size=3, progress=False),
    }
    gaussian = dataset_nll(field, x, estimator=Hutchinson(2, "gaussian"), **base)
    rademacher = dataset_nll(field, x, estimator=Hutchinson(2), **base)
    assert not np.array_equal(rademacher["log_prob"], gaussian["log_prob"])
    out = tmp_path / "nll.parquet"
    first = dataset_nll(field, x, estimator=Hutchinson(2, "gaussian"), output=Output(out), **base)
    pd.testing.assert_frame_equal(first, gaussian)  # the same seed: the same probes
    again = dataset_nll(
        field, x, estimator=Hutchinson(2, "gaussian"), output=Output(out, resume=True), **base
    )
    assert again.attrs["summary"]["rows_computed"] == 0
    with pytest.raises(ValueError, match="noise"):
        dataset_nll(field, x, estimator=Hutchinson(2), output=Output(out, resume=True), **base)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (Exact("loop"), Exact()),
        (Exact(), Exact("loop")),
        (Exact(), Hutchinson(2)),
        (Hutchinson(2), Exact("loop")),
        (Hutchinson(2), Hutchinson(3)),
    ],
    ids=str,
)
def test_resume_with_another_estimator_is_refused(tmp_path, first, second):
    """The estimator is part of the run's identity: a resume with another one is refused (the
    rows computed so far would mix two computations), and the same one resumes."""
    field, x = make_mlp(6)
    base = {
        "config": SolverConfig("rk4", steps=4),
        "execution": Execution(batch_size=3, progress=False),
    }
    out = tmp_path / "nll.parquet"
    frame = dataset_nll(field, x, estimator=first, output=Output(out), **base)
    identity = {k: frame.attrs["run"][k] for k in ("divergence", "n_probes")}
    with pytest.raises(ValueError, match=r"different|differ|another|changed"):
        dataset_nll(field, x, estimator=second, output=Output(out, resume=True), **base)
    again = dataset_nll(field, x, estimator=first, output=Output(out, resume=True), **base)
    assert again.attrs["summary"]["rows_computed"] == 0
    assert {k: again.attrs["run"][k] for k in identity} == identity


# ----------------------------------------------------------------------------------------------
# labels: passed to a field that takes them, dropped for one that does not (issue #20, bug 5)
def _labelled(n: int = 12):
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return x, torch.arange(n) % 3


def _unconditional_mlp():
    torch.manual_seed(0)
    import cnftools

    return cnftools.MLPField(2, (8,), dtype=torch.float64)


def _lambda_field(x, t):
    return -x


@pytest.mark.parametrize(
    ("make_field", "route"),
    [
        (_unconditional_mlp, "pairs"),
        (_unconditional_mlp, "loader"),
        (lambda: _lambda_field, "pairs"),
        (lambda: lambda x, t: -x, "loader"),
    ],
    ids=["mlp-dataset", "mlp-loader", "function-dataset", "lambda-loader"],
)
def test_an_unconditional_field_ignores_the_labels_of_its_data(make_field, route):
    """A field that takes no labels (MLPField.conditional is False; a function without a ``y``
    parameter) on (x, y) data gives the values of the bare rows, bit for bit (the same rows, the
    same batches, the same fixed grid: nothing else differs)."""
    field = make_field()
    x, y = _labelled()
    pairs = torch.utils.data.TensorDataset(x, y)
    data = pairs if route == "pairs" else torch.utils.data.DataLoader(pairs, batch_size=5)
    kw = dict(batch_size=4, method="rk4", steps=4, progress=False)
    labelled = run_nll(field, data, **kw)
    plain = run_nll(field, x, **kw)
    assert (labelled["status"] == "ok").all()
    np.testing.assert_array_equal(labelled["log_prob"], plain["log_prob"])


def _needs_y(x, t, y):
    return -x * (1 + y[:, None])


@pytest.mark.parametrize(
    ("field", "match"),
    [
        ("conditional-mlp", r"conditional field .*no labels.*PerRow"),
        (_needs_y, r"requires the keyword argument\(s\) \['y'\]"),
    ],
    ids=["conditional-mlp", "required-y"],
)
def test_a_conditional_field_without_labels_is_refused_before_any_solve(field, match):
    import cnftools

    if field == "conditional-mlp":
        field = cnftools.MLPField(2, (8,), num_classes=3, dtype=torch.float64)
    x, _ = _labelled()
    with pytest.raises(ValueError, match=match):
        run_nll(field, x, **FAST)


def test_the_conditional_attribute_decides_over_the_signature():
    """MLPField.forward has a ``y=None`` parameter either way; its ``conditional`` attribute says
    whether it takes labels (the rule of cnftools.fields.takes_labels)."""
    import cnftools
    from cnftools.fields import takes_labels

    plain = cnftools.MLPField(2, (8,))
    labelled = cnftools.MLPField(2, (8,), num_classes=3)
    conv = cnftools.ConvField(1, (4,), cond_dim=2)
    assert (plain.conditional, labelled.conditional, conv.conditional) == (False, True, True)
    assert (takes_labels(plain), takes_labels(labelled)) == (False, True)
    assert (takes_labels(lambda x, t: x), takes_labels(lambda x, t, **kw: x)) == (False, True)


# ----------------------------------------------------------------------------------------------
# bad arguments are refused before any solve (issue #20, bug 6; docs/guarantees.md)
class _Counting:
    """The case's field, counting its calls: the trial call is one, a solve makes many."""

    def __init__(self, field, cast=None):
        self.field, self.cast, self.calls = field, cast, 0

    def __call__(self, x, t):
        self.calls += 1
        out = self.field(x, t)
        return out if self.cast is None else out.to(self.cast)


_F64 = torch.float64
_BAD_ARGUMENTS = {
    "prior-string": ({"prior": "normal"}, TypeError, "prior must be None"),
    "prior-float32": (
        {
            "prior": torch.distributions.Independent(
                torch.distributions.Normal(torch.zeros(2), torch.ones(2)), 1
            )
        },
        TypeError,
        "prior samples torch.float32",
    ),
    "prior-shape": (
        {
            "prior": torch.distributions.MultivariateNormal(
                torch.zeros(3, dtype=_F64), torch.eye(3, dtype=_F64)
            )
        },
        ValueError,
        r"event_shape \(2,\)",
    ),
    "prior-batch-shape": (
        {"prior": torch.distributions.Normal(torch.zeros(2, dtype=_F64), 1.0)},
        ValueError,
        r"Independent\(prior, 1\)",
    ),
    "seeded-hutchinson": (
        {"estimator": Hutchinson(2, generator=torch.Generator().manual_seed(0))},
        ValueError,
        r"Hutchinson\(n_probes=\.\.\., noise=\.\.\.\) without generator= or probes=",
    ),
    "field-float32": ({"cast": torch.float32}, TypeError, "returned dtype torch.float32"),
    "field-int": ({"cast": torch.int64}, TypeError, "returned dtype torch.int64"),
    "data-float16": ({"data": torch.float16}, TypeError, "float32 or float64 only"),
    "dtype-float16": ({"dtype": torch.float16}, TypeError, "floating torch.dtype|float32"),
    "dequantized-floats": (
        {"dequantization": Dequantization(levels=256)},
        ValueError,
        r"needs integer data .* data row 0 holds",
    ),
}


@pytest.mark.parametrize(("kwargs", "error", "match"), _BAD_ARGUMENTS.values(), ids=_BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_any_solve(kwargs, error, match):
    """Each of these used to end, after every row's solve and its per-row retries, in
    RowsFailedError. Now it is a TypeError/ValueError before any solve: the field is called at
    most once (the trial call), where a solve calls it dozens of times."""
    field, x = make_case(8)
    kwargs = dict(kwargs)
    counting = _Counting(field, kwargs.pop("cast", None))
    if "data" in kwargs:
        x = x.to(kwargs.pop("data"))
    with pytest.raises(error, match=match):
        run_nll(counting, x, batch_size=4, **{**FAST, **kwargs})
    assert counting.calls <= 1


def test_float16_data_runs_with_an_explicit_dtype():
    """The refusal of half precision names dtype= as the fix, and that fix works."""
    field, x = make_case(6)
    frame = run_nll(field, x.half(), dtype=torch.float32, **{**FAST, "batch_size": 3})
    assert (frame["status"] == "ok").all()


def test_integer_valued_floats_still_dequantize():
    """The dequantization check refuses fractional values only, not integers stored as floats:
    both forms of the same rows give the same frame, bit for bit."""
    field, _ = make_case()
    ints = torch.randint(0, 4, (6, 2), generator=torch.Generator().manual_seed(0))
    kw = dict(dequantization=Dequantization(levels=4), batch_size=3, dtype=torch.float64, **FAST)
    pd.testing.assert_frame_equal(run_nll(field, ints, **kw), run_nll(field, ints.double(), **kw))


# ----------------------------------------------------------------------------------------------
# extras: PerRow and Shared say how a tensor is used (issue #21, items 2 and 3)
def _with_table(x, t, table):
    """A field reading a shared lookup table whole: v = -x * table.sum() / 6."""
    return -x * (table.sum() / 6.0)


def _with_label(x, t, y):
    return -x * (1.0 + y[:, None].to(x.dtype))


def test_label_length_error_names_the_extra_and_both_counts():
    """``extras={"y": y[:-1]}`` used to fail in the field with a shape hint about the data's
    dimension; now the message says extras['y'] has N - 1 rows for N data rows."""
    x, y = _labelled(50)
    for given in (y[:-1], PerRow(y[:-1])):
        with pytest.raises(ValueError, match=r"extras\['y'\] has 49 rows for 50 data rows"):
            run_nll(_with_label, x, extras={"y": given}, batch_size=7, progress=False)


def test_a_tensor_with_as_many_rows_as_the_data_must_say_how_it_is_used():
    """A (3, 2) table with 3 data rows used to be split by rows silently (the field then got a
    (1, 2) or (2, 2) slice); now it is an error naming the extra, and Shared passes it whole."""
    x = torch.randn(3, 2, dtype=torch.float64)
    table = torch.ones(3, 2, dtype=torch.float64)
    kw = dict(batch_size=2, method="rk4", steps=32, progress=False)
    with pytest.raises(ValueError, match=r"extras\['table'\] has 3 rows, as many as the data"):
        run_nll(_with_table, x, extras={"table": table}, **kw)
    frame = run_nll(_with_table, x, extras={"table": Shared(table)}, **kw)
    # the whole table reached every call: v = -x (a slice would give -x/3 or -2x/3), whose
    # log p_1(x) = log N(e x; 0, I) + 2 exactly (divergence -2). RK4's relative error in z_0 is
    # about h^4/120 = 8e-9 at h = 1/32, times |e x|^2 <= ~50 here: below 1e-6 nats.
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(x * math.e).sum(1) + 2.0
    np.testing.assert_allclose(frame["log_prob"], expected.numpy(), rtol=0, atol=1e-6)


def test_per_row_values_from_numpy_in_any_byte_order_are_the_same():
    """A big-endian numpy array of labels is converted to the native order (values kept): the
    frame equals that of the native tensor, bit for bit; an array of strings is refused."""
    x, y = _labelled(9)
    kw = dict(batch_size=4, method="rk4", steps=4, progress=False)
    native = run_nll(_with_label, x, extras={"y": PerRow(y)}, **kw)
    swapped = run_nll(_with_label, x, extras={"y": PerRow(y.numpy().astype(">i8"))}, **kw)
    pd.testing.assert_frame_equal(native, swapped)
    with pytest.raises(TypeError, match="must hold numbers"):
        PerRow(np.array(["a", "b"]))


def test_shared_values_work_with_a_stream_and_per_row_ones_are_refused():
    x = torch.randn(6, 2, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)
    table = torch.ones(6, 2, dtype=torch.float64)
    kw = dict(batch_size=4, method="rk4", steps=4, progress=False)
    streamed = run_nll(_with_table, loader, extras={"table": Shared(table)}, **kw)
    direct = run_nll(_with_table, x, extras={"table": Shared(table)}, **kw)
    pd.testing.assert_frame_equal(streamed, direct)
    with pytest.raises(ValueError, match="stream"):
        run_nll(_with_table, loader, extras={"table": PerRow(table)}, **kw)
    with pytest.raises(ValueError, match=r"extras\['table'\].*Shared"):
        run_nll(_with_table, loader, extras={"table": table}, **kw)


def test_a_changed_shared_array_changes_the_run_identity(tmp_path):
    """Shared numpy arrays are hashed whole, not by their (truncated) repr: a change in the
    middle of a 2,000-element array is seen on resume."""
    import cnftools

    x = torch.randn(4, 2, dtype=torch.float64)
    table = np.ones(2000)
    out = tmp_path / "nll.parquet"
    kw = dict(batch_size=2, method="rk4", steps=2, progress=False, out=out, run_id="fixed")
    run_nll(_with_table, x, extras={"table": Shared(table)}, **kw)
    changed = table.copy()
    changed[1000] = 2.0
    assert repr(changed) == repr(table)  # the old identity could not tell them apart
    with pytest.raises(cnftools.nll.ResumeError):
        run_nll(_with_table, x, extras={"table": Shared(changed)}, resume=True, **kw)


# ----------------------------------------------------------------------------------------------
# data and device errors in one clear line (issue #20, "poor")
_BAD_DATA = {
    "zero-size-event": (torch.zeros(4, 0, dtype=_F64), {}, ValueError, "no values"),
    "dict-items": (
        torch.utils.data.DataLoader([{"x": torch.zeros(2)}] * 4, batch_size=2),
        {},
        TypeError,
        r"batch 0 is a dict",
    ),
    "ragged-dataset": (
        [torch.zeros(2)] * 2 + [torch.zeros(3)] * 2,
        {},
        ValueError,
        r"items 0\.\.3 have rows of different shapes",
    ),
    "ragged-item": (
        torch.utils.data.DataLoader([([[0.0, 1.0], [2.0]], 0)], batch_size=None),
        {},
        ValueError,
        r"item 0 cannot be made a tensor.*ragged",
    ),
    "short-labels-in-a-stream": (
        torch.utils.data.DataLoader(  # a collate that loses a label of every batch
            torch.utils.data.TensorDataset(torch.zeros(6, 2, dtype=_F64), torch.arange(6)),
            batch_size=3,
            collate_fn=lambda items: (
                torch.stack([i[0] for i in items]),
                torch.stack([i[1] for i in items])[:-1],
            ),
        ),
        {},
        ValueError,
        r"rows 0\.\.2 has y of shape \(2,\) for 3 rows of x",
    ),
    "duplicate-columns": (
        pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0]}),
        {"columns": ["a", "b", "a"]},
        ValueError,
        r"columns lists \['a'\] more than once",
    ),
}


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@pytest.mark.parametrize(("data", "kwargs", "error", "match"), _BAD_DATA.values(), ids=_BAD_DATA)
def test_bad_data_gets_one_clear_error(data, kwargs, error, match):
    if isinstance(data, list):
        data = _ListDataset(data)
    with pytest.raises(error, match=match):
        run_nll(lambda x, t: -x, data, **{**FAST, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_names_the_argument():
    field, x = make_case(4)
    with pytest.raises(
        ValueError, match=r"Execution\(device=\.\.\.\) is 'cuda' but CUDA is not available"
    ):
        run_nll(field, x, device="cuda", **FAST)


# ----------------------------------------------------------------------------------------------
# bits/dim of continuous data (issue #21, item 9)
def test_bits_per_dim_of_continuous_data_with_the_users_dimension_count(tmp_path):
    """bpd = nll / (D ln 2) with the D the user gives, computed here from the frame's own nll
    (exact arithmetic on the same float64 numbers, so 1e-15 relative); a resumed, finished run
    reports it as asked this time; refused with dequantization, which has its own bpd."""
    field, x = make_case(6)
    out = tmp_path / "nll.parquet"
    kw = dict(batch_size=3, out=out, **FAST)
    frame = run_nll(field, x, bpd_dims=4, **kw)
    assert list(frame.columns) == ["index", "log_prob", "nll", "bpd", "nfe", "status"]
    np.testing.assert_allclose(frame["bpd"], frame["nll"] / (4 * math.log(2)), rtol=1e-15)
    assert frame.attrs["summary"]["mean_bpd"] == pytest.approx(
        float(frame["nll"].mean()) / (4 * math.log(2)), rel=1e-12
    )
    again = run_nll(field, x, bpd_dims=2, resume=True, **kw)
    np.testing.assert_allclose(again["bpd"], frame["nll"] / (2 * math.log(2)), rtol=1e-15)
    assert "bpd" not in run_nll(field, x, resume=True, **kw).columns
    with pytest.raises(ValueError, match="bpd_dims is for continuous data"):
        run_nll(field, x, bpd_dims=2, dequantization=Dequantization(4), **FAST)
    with pytest.raises(ValueError, match=r"DataOptions\(bpd_dims=\.\.\.\) must be an int >= 1"):
        run_nll(field, x, bpd_dims=0, **FAST)


def test_a_shared_table_is_never_split_when_rows_are_solved_again():
    """With ``accuracy=``, log_likelihood solves rows over the target again and slices every extra
    whose first dimension is the batch: a Shared (3, 2) table with batches of 3 rows reached the
    field as a (1, 2) slice there, silently changing v. Shared values are bound to the field, so
    every call sees the whole table, and the values equal those of the same field with the
    table in a closure, bit for bit (the same operations in the same order)."""
    import cnftools

    scale = torch.tensor([[0.1], [1.0], [4.0]], dtype=torch.float64)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * scale
    table = torch.ones(3, 2, dtype=torch.float64)
    seen = set()

    def field(x, t, table):
        seen.add(tuple(table.shape))
        return -x * (table.sum() / 6.0) + torch.sin(3 * x) * torch.cos(7 * t[:, None])

    config = SolverConfig(accuracy=1e-9)  # rows are solved again here (measured: one of three)
    frame = run_nll(
        field, x, extras={"table": Shared(table)}, batch_size=3, config=config, progress=False
    )
    assert seen == {(3, 2)}
    with torch.no_grad():
        closure = cnftools.log_likelihood(lambda x, t: field(x, t, table), x, config=config)
    np.testing.assert_array_equal(frame["log_prob"].to_numpy(), closure.log_prob.numpy())


@pytest.mark.parametrize("form", ["array", "npy-file"])
def test_big_endian_data_gives_the_frame_of_native_data(form, tmp_path):
    """Big-endian float64 rows (an array, or a .npy file written on such a machine) used to fail
    in torch.from_numpy with "byte order ... not supported"; they are converted to the native
    order (the same values), so the frame equals that of the native rows, bit for bit."""
    field, x = make_case(6)
    swapped = x.numpy().astype(">f8")
    if form == "npy-file":
        np.save(tmp_path / "rows.npy", swapped)
        swapped = tmp_path / "rows.npy"
    kw = dict(batch_size=4, **FAST)
    pd.testing.assert_frame_equal(run_nll(field, swapped, **kw), run_nll(field, x, **kw))


# Resume never mixes two models: the reproducers, through run_nll(resume=True)
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
            run_nll(field, x, out=out, **{**FAST, **kwargs})
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
    return _weighted, {"w": Shared(w)}


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
    a = run_nll(first, x[:4], extras=extras_1, **FAST)
    b = run_nll(second, x[:4], extras=extras_2, **FAST)
    assert not np.allclose(a["log_prob"], b["log_prob"], rtol=0, atol=1e-9)
    _interrupted(first, x, out, 1, batch_size=10, extras=extras_1)
    with pytest.raises(ResumeError, match="other settings, field or prior"):
        run_nll(second, x, batch_size=10, out=out, resume=True, extras=extras_2, **FAST)
    # the same model, built again: it resumes, and its numbers are one run's
    again, extras_3 = _reproducer(change, second=False)
    resumed = run_nll(again, x, batch_size=10, out=out, resume=True, extras=extras_3, **FAST)
    assert resumed.attrs["summary"]["rows_computed"] == 30
    whole = run_nll(first, x, batch_size=10, extras=extras_1, **FAST)
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
        run_nll(Holder(), x, out=tmp_path / "nll.parquet", resume=True, **FAST)
    frame = run_nll(Holder(), x, out=tmp_path / "nll.parquet", resume=True, run_id="r1", **FAST)
    assert len(frame) == 20


def test_the_caller_s_module_keeps_its_train_mode():
    """dataset_nll evaluates a module in eval mode; today's main left the caller's module (not
    copied when already on the run's device and dtype) in eval mode afterwards, so a training
    loop that computes a validation NLL went on with dropout and batch statistics off. Its mode,
    and every submodule's, is restored, also when the run fails."""
    from cnftools import MLPField

    field = MLPField(2, hidden=[8]).double()
    field.train()
    field.net[0].eval()  # a mixed state is restored as it was
    x = torch.randn(10, 2, dtype=torch.float64)
    run_nll(field, x, progress=False)
    assert field.training and not field.net[0].training
    assert all(m.training for m in field.modules() if m is not field.net[0])
    with pytest.raises((TypeError, ValueError), match="prior"):
        run_nll(field, x, progress=False, prior=torch.distributions.Normal(0.0, 1.0))
    assert field.training and not field.net[0].training


def test_a_field_closing_over_per_row_values_is_told_to_use_per_row_extras():
    """A field that closes over a tensor of N per-row values returns N rows for a trial batch of
    one: today's main asked whether the data's dimension was the field's, pointing away from the
    closure; the error names the row counts and PerRow."""
    x = torch.randn(12, 2, dtype=torch.float64)
    scale = torch.linspace(0.5, 2.0, 12, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"12 rows for 1; .*PerRow"):
        run_nll(lambda x, t: -x * scale[:, None], x, progress=False)


def test_labels_of_the_items_under_another_name_are_named():
    """A dataset of (x, y) items and a field whose label argument is called ``label``: today's
    main said the data gives no such argument and suggested extras=, not that the items' labels
    arrive as ``y``."""
    x = torch.randn(6, 2, dtype=torch.float64)
    items = torch.utils.data.TensorDataset(x, torch.arange(6) % 2)
    with pytest.raises(ValueError, match=r"\['label'\]; the data's items carry \['y'\]"):
        run_nll(lambda x, t, label: -x * (1 + label[:, None]), items, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"config": SolverConfig(accuracy=1e-3), "divergence": "hutchinson"}, "Hutchinson"),
        ({"config": SolverConfig(accuracy=1e-12), "dtype": torch.float32}, "below what"),
        ({"rtol": 1e-20, "atol": 1e-20}, "below torch.float64's rounding"),
    ],
    ids=["accuracy with hutchinson", "accuracy below float32", "tolerances below float64"],
)
def test_what_log_likelihood_refuses_is_refused_before_any_row(kwargs, match):
    """Today's main passed these to every row's log_likelihood, which refused each: the run
    ended in RowsFailedError after the per-row retries instead of one ValueError."""
    calls = {"n": 0}

    def field(x, t):
        calls["n"] += 1
        return -x

    x = torch.randn(12, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        run_nll(field, x, batch_size=4, progress=False, **kwargs)
    assert calls["n"] == 0
