"""Tests of ``cnftools train`` and ``cnftools nll`` (cnftools/cli/train.py, cnftools/cli/nll.py), run in-process."""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import cnftools
from cnftools.cli import build_parser, main
from cnftools.data import eight_gaussians
from cnftools.nll import DataOptions, Execution, PerRow

SOLVER = ["--method", "rk4", "--steps", "4"]  # 4 steps: plumbing, not accuracy


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-D checkpoint trained on a .npy file, and that file."""
    folder = tmp_path_factory.mktemp("cli")
    data = folder / "x.npy"
    np.save(
        data,
        eight_gaussians(dtype=torch.float64).sample(64, torch.Generator().manual_seed(0)).numpy(),
    )
    ckpt = folder / "model.pt"
    code = main(
        ["train", "--data", str(data), "--out", str(ckpt), "--hidden", "8,8", "--steps", "5",
         "--batch-size", "32", "--dtype", "float64", "--no-progress"]
    )  # fmt: skip
    assert code == 0 and ckpt.exists()
    return ckpt, data


def test_train_then_nll_round_trip(trained, tmp_path, capsys):
    ckpt, data = trained
    out = tmp_path / "nll.parquet"
    args = ["nll", "--model", str(ckpt), "--data", str(data), "--out", str(out), "--batch-size", "16",
            *SOLVER, "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "mean NLL" in capsys.readouterr().out
    frame = pd.read_parquet(out)
    assert frame["index"].tolist() == list(range(64)) and (frame["status"] == "ok").all()
    # the same computation through the library: identical numbers (same float64 operations)
    field = cnftools.load_checkpoint(ckpt).field
    direct = cnftools.dataset_nll(
        field,
        torch.from_numpy(np.load(data)),
        config=cnftools.SolverConfig("rk4", steps=4),
        execution=Execution(batch_size=16, progress=False),
    )
    np.testing.assert_array_equal(frame["log_prob"].to_numpy(), direct["log_prob"].to_numpy())
    assert main(args) == 2  # out exists: refuses without --resume
    assert "resume" in capsys.readouterr().err
    assert main([*args, "--resume", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows_computed"] == 0 and summary["rows"] == 64


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--columns", "a,zz"], "zz"),
        (["--dataset", "digits"], "shape"),
    ],
    ids=["missing-column", "wrong-dimension"],
)
def test_nll_bad_inputs_exit_2_with_a_message(trained, tmp_path, capsys, extra, message):
    pytest.importorskip("sklearn") if "digits" in extra else None
    ckpt, data = trained
    csv = tmp_path / "x.csv"
    pd.DataFrame(np.load(data), columns=["a", "b"]).to_csv(csv, index=False)
    source = [] if "--dataset" in extra else ["--data", str(csv)]
    code = main(["nll", "--model", str(ckpt), *source, *extra, *SOLVER, "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err


def test_nll_reports_nan_rows_without_crashing(trained, tmp_path, capsys):
    ckpt, data = trained
    rows = np.load(data)
    rows[3, 1] = np.nan
    bad = tmp_path / "nan.npy"
    np.save(bad, rows)
    out = tmp_path / "nan.parquet"
    with pytest.warns(RuntimeWarning, match="1 of"):  # some rows failed: said, not hidden
        code = main(
            [
                "nll",
                "--model",
                str(ckpt),
                "--data",
                str(bad),
                "--out",
                str(out),
                *SOLVER,
                "--no-progress",
            ]
        )
    assert code == 1  # finished, with failures
    frame = pd.read_parquet(out)
    assert frame.loc[3, "status"].startswith("error: non-finite input")
    assert (frame["status"] != "ok").sum() == 1
    assert "failures 1" in capsys.readouterr().out


def test_digits_train_nll_with_baselines(tmp_path, capsys):
    pytest.importorskip("sklearn")
    ckpt = tmp_path / "digits.pt"
    assert (
        main(
            [
                "train",
                "--dataset",
                "digits",
                "--out",
                str(ckpt),
                "--hidden",
                "16",
                "--steps",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    capsys.readouterr()
    code = main(["nll", "--model", str(ckpt), "--dataset", "digits", "--split", "test", "--baselines", "--json",
                 "--method", "euler", "--steps", "2", "--no-progress"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 359 and summary["failures"] == 0
    base = summary["baselines"]
    assert base["uniform_bpd"] == pytest.approx(math.log2(17), abs=1e-12)  # exact formula
    # any fitted histogram beats the uniform model on digits (many pixels are always 0)
    assert base["histogram_bpd"] < base["uniform_bpd"]
    assert math.isfinite(summary["mean_bpd"])


def test_digits_conditional_train_and_nll_use_each_rows_label(tmp_path, capsys):
    """`train --conditional` makes a class-conditional field; `nll` feeds each test row its own
    label: the CLI's mean NLL equals dataset_nll with the labels (same fixed grid, 1e-9 nats),
    and differs from the one with shifted labels."""
    pytest.importorskip("sklearn")
    from cnftools.cli.common import digits_split, digits_split_labels

    ckpt = tmp_path / "cond.pt"
    train = ["train", "--dataset", "digits", "--conditional", "--out", str(ckpt), "--hidden", "16",
             "--steps", "20", "--no-progress"]  # fmt: skip
    assert main(train) == 0
    capsys.readouterr()
    solver = ["--method", "rk4", "--steps", "2"]
    code = main(["nll", "--model", str(ckpt), "--dataset", "digits", "--split", "test", "--json",
                 *solver, "--no-progress", "--threads", "1"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    field = cnftools.load_checkpoint(ckpt).field
    assert field.config()["num_classes"] == 10
    x, y = digits_split("test"), digits_split_labels("test")
    assert y.shape == (359,) and set(y.tolist()) == set(range(10))
    deq = cnftools.Dequantization(17)
    kw = dict(
        config=cnftools.SolverConfig("rk4", steps=2),
        execution=Execution(progress=False, num_threads=1),
    )
    own = cnftools.dataset_nll(
        field, x, data_options=DataOptions(extras={"y": PerRow(y)}, dequantization=deq), **kw
    )
    shifted = PerRow((y + 1) % 10)
    other = cnftools.dataset_nll(
        field, x, data_options=DataOptions(extras={"y": shifted}, dequantization=deq), **kw
    )
    assert summary["mean_nll"] == pytest.approx(float(own["nll"].mean()), abs=1e-9)
    assert abs(float(other["nll"].mean()) - summary["mean_nll"]) > 1e-6
    # a conditional model needs the labelled dataset
    code = main(["nll", "--model", str(ckpt), "--dataset", "two_moons", *solver, "--no-progress"])
    assert code == 2 and "conditional" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "nll"])
def test_help_documents_every_option(command, capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[command]
    for action in p._actions:
        assert action.help, f"{command} option {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for action in p._actions:
        for flag in action.option_strings:
            assert flag in text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--path", "ot", "--sigma-max", "3"], "--sigma-max applies to --path ve only"),
        (["--path", "vp", "--sigma-min", "0.5"], "do not apply to --path vp"),
        (["--centered"], "--centered applies only with a dequantization"),
    ],
)
def test_train_refuses_flags_that_do_not_apply(tmp_path, capsys, flags, message):
    from cnftools import cli

    code = cli.main(
        [
            "train",
            "--dataset",
            "eight_gaussians",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "m.pt"),
            *flags,
        ]
    )
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.pt").exists()


def test_ctrl_c_before_the_run_begins_does_not_claim_kept_rows(
    trained, tmp_path, capsys, monkeypatch
):
    """Today's main, interrupted while loading the checkpoint, said that rows were "kept in
    r.parquet.chunks/" (no such folder existed) and to continue with --resume."""
    import cnftools.cli.nll as cli_nll

    ckpt, data = trained
    out = tmp_path / "r.parquet"
    args = ["nll", "--model", str(ckpt), "--data", str(data), "--out", str(out), *SOLVER,
            "--no-progress"]  # fmt: skip

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_nll, "load_checkpoint", interrupted)
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "nothing was kept" in err and "chunks" not in err, err
    assert shlex.split(err.strip().splitlines()[1]) == ["cnftools", *args]
    assert not (tmp_path / "r.parquet.chunks").exists()


def test_ctrl_c_releases_the_lock_says_what_was_kept_and_how_to_continue(trained, tmp_path):
    """Issue 21 item 5: SIGINT to a running `cnftools nll` (a subprocess) exits 130 with two lines
    (no traceback) naming the rows kept and the exact command to continue; the lock is gone, and
    that command finishes the run without a stale-lock warning."""
    ckpt, data = trained
    rows = tmp_path / "rows.npy"
    np.save(rows, np.tile(np.load(data), (20, 1)))  # enough 10-row units to interrupt midway
    out = tmp_path / "r.parquet"
    args = ["nll", "--model", str(ckpt), "--data", str(rows), "--out", str(out),
            "--batch-size", "10", *SOLVER, "--threads", "1", "--no-progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "cnftools"]
    proc = subprocess.Popen([*cmd, *args], stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    chunks = tmp_path / "r.parquet.chunks"
    deadline = time.monotonic() + 120
    while not list(chunks.glob("unit-*.parquet")) and proc.poll() is None:
        assert time.monotonic() < deadline, "no unit written in 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2, err
    kept = re.search(r"interrupted; (\d+) of (\d+) rows kept in .*r\.parquet\.chunks/", err)
    assert kept is not None, err
    n_rows = int(kept.group(2))
    assert n_rows == np.load(rows).shape[0] and 10 <= int(kept.group(1)) < n_rows, err
    assert not (tmp_path / "r.parquet.lock").exists()
    again = shlex.split(err.strip().splitlines()[1])
    assert again == ["cnftools", *args, "--resume"]
    done = subprocess.run([*cmd, *again[1:]], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "stale lock" not in done.stderr
    assert len(pd.read_parquet(out)) == n_rows


# ----------------------------------------------------------------------------------------------
# solver flags (0.2): --method --rtol --atol --steps --accuracy; --step-size and --solver-steps gone
def test_steps_flag_gives_the_fixed_grid_of_the_library(trained, tmp_path, capsys):
    """`--method rk4 --steps 3` is SolverConfig("rk4", steps=3): the library's numbers, bit for
    bit (the same float64 operations), and the grid is recorded in the run."""
    ckpt, data = trained
    out = tmp_path / "nll.parquet"
    args = ["nll", "--model", str(ckpt), "--data", str(data), "--out", str(out),
            "--method", "rk4", "--steps", "3", "--batch-size", "16", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    frame = pd.read_parquet(out)
    field = cnftools.load_checkpoint(ckpt).field
    direct = cnftools.dataset_nll(
        field,
        torch.from_numpy(np.load(data)),
        config=cnftools.SolverConfig("rk4", steps=3),
        execution=Execution(batch_size=16, progress=False),
    )
    np.testing.assert_array_equal(frame["log_prob"].to_numpy(), direct["log_prob"].to_numpy())


def test_accuracy_flag_asks_for_nats(trained, tmp_path, capsys):
    """`--accuracy 1e-4` is SolverConfig(accuracy=1e-4): the library's run, the same numbers."""
    ckpt, data = trained
    rows = tmp_path / "few.npy"
    np.save(rows, np.load(data)[:8])
    args = ["nll", "--model", str(ckpt), "--data", str(rows), "--accuracy", "1e-4", "--json",
            "--batch-size", "8", "--no-progress"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    field = cnftools.load_checkpoint(ckpt).field
    direct = cnftools.dataset_nll(
        field,
        torch.from_numpy(np.load(rows)),
        accuracy=1e-4,
        execution=Execution(batch_size=8, progress=False),
    )
    assert summary["rows"] == 8 and summary["failures"] == 0
    # the same computation: equal to the printed precision of the JSON summary (float64 repr)
    assert summary["mean_nll"] == pytest.approx(float(direct["nll"].mean()), rel=1e-12)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "rk4"], "--method rk4 is a fixed-grid method: give its number of steps"),
        (["--method", "euler"], "--method euler is a fixed-grid method"),
        (["--steps", "8"], "--steps applies to fixed-grid methods"),
        (["--accuracy", "1e-4", "--method", "rk4", "--steps", "4"], "drop --method, --steps"),
        (["--accuracy", "1e-4", "--rtol", "1e-3"], "drop --rtol"),
    ],
    ids=[
        "rk4-without-steps",
        "euler-without-steps",
        "steps-for-adaptive",
        "accuracy-grid",
        "accuracy-rtol",
    ],
)
def test_solver_flags_that_do_not_fit_are_a_one_line_usage_error(
    trained, tmp_path, capsys, flags, message
):
    ckpt, data = trained
    out = tmp_path / "nll.parquet"
    code = main(["nll", "--model", str(ckpt), "--data", str(data), "--out", str(out), *flags,
                 "--no-progress"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "flags", [["--step-size", "0.25"], ["--solver-steps", "4"]], ids=["step-size", "solver-steps"]
)
def test_the_0_1_grid_flags_are_gone(trained, capsys, flags):
    ckpt, data = trained
    with pytest.raises(SystemExit) as info:
        main(["nll", "--model", str(ckpt), "--data", str(data), "--method", "rk4", *flags])
    assert info.value.code == 2  # argparse's usage error
    assert f"unrecognized arguments: {flags[0]}" in capsys.readouterr().err
