"""User errors on the command line: one line on stderr, exit status 2, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnftools.cli import UsageError, check_device, main
from cnftools.data import eight_gaussians

SOLVER = ["--method", "rk4", "--step-size", "0.25", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_errors")
    data = folder / "x.npy"
    rows = eight_gaussians(dtype=torch.float64).sample(16, torch.Generator().manual_seed(0))
    np.save(data, rows.numpy())
    ckpt = folder / "model.pt"
    code = main(
        ["train", "--data", str(data), "--out", str(ckpt), "--hidden", "4", "--steps", "2",
         "--batch-size", "8", "--dtype", "float64", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    return ckpt, data


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "Warning" not in line]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("device", ["garbage", "cuda:7" if torch.cuda.is_available() else "cuda"])
def test_nll_bad_device(trained, capsys, device):
    ckpt, data = trained
    assert (
        main(["nll", "--model", str(ckpt), "--data", str(data), "--device", device, *SOLVER]) == 2
    )
    _one_line_error(capsys, "--device")


def test_check_device_names_the_flag():
    with pytest.raises(UsageError, match="--where 'nonsense'"):
        check_device("nonsense", "--where")


@pytest.mark.parametrize("content", [b"", b"garbage, not a checkpoint", b"PK\x03\x04truncated"])
def test_nll_garbage_model_file(trained, tmp_path, capsys, content):
    _, data = trained
    model = tmp_path / "model.pt"
    model.write_bytes(content)
    assert main(["nll", "--model", str(model), "--data", str(data), *SOLVER]) == 2
    _one_line_error(capsys, "--model", "model.pt")


def test_nll_missing_model_file(trained, tmp_path, capsys):
    _, data = trained
    assert main(["nll", "--model", str(tmp_path / "no.pt"), "--data", str(data), *SOLVER]) == 2
    _one_line_error(capsys, "no such file")


def test_nll_unwritable_out(trained, tmp_path, capsys):
    ckpt, data = trained
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    out = blocker / "nll.parquet"  # its folder is a file: cannot be written, even by root
    assert main(["nll", "--model", str(ckpt), "--data", str(data), "--out", str(out), *SOLVER]) == 2
    _one_line_error(capsys, "--out", "not writable")


def test_train_checks_out_before_training(trained, tmp_path, capsys, monkeypatch):
    import cnftools.training

    _, data = trained

    def never(*args, **kwargs):
        raise AssertionError("training started before --out was checked")

    monkeypatch.setattr(cnftools.cli.train, "train_cfm", never)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["train", "--data", str(data), "--out", str(blocker / "m.pt"), "--steps", "1"])
    assert code == 2
    _one_line_error(capsys, "--out")


def test_nll_columns_with_npy_refuses(trained, capsys):
    ckpt, data = trained
    code = main(["nll", "--model", str(ckpt), "--data", str(data), "--columns", "a,b", *SOLVER])
    assert code == 2
    _one_line_error(capsys, "columns", ".npy")


def test_nll_json_is_valid_json_with_null_for_nan(trained, tmp_path, capsys):
    ckpt, data = trained
    one = tmp_path / "one.npy"
    np.save(one, np.load(data)[:1])  # one row: its sampling stderr is NaN
    assert main(["nll", "--model", str(ckpt), "--data", str(one), "--json", *SOLVER]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert summary["rows"] == 1 and summary["nll_stderr"] is None


def test_nll_threads_flag(trained, capsys):
    ckpt, data = trained
    before = torch.get_num_threads()
    assert main(["nll", "--model", str(ckpt), "--data", str(data), "--threads", "1", *SOLVER]) == 0
    assert torch.get_num_threads() == before  # restored after the call
    assert main(["nll", "--model", str(ckpt), "--data", str(data), "--threads", "0", *SOLVER]) == 2
    _one_line_error(capsys, "--threads")


@pytest.mark.parametrize("command", ["nll", "train", "validate"])
def test_threads_beyond_the_machine_are_a_usage_error(trained, tmp_path, capsys, command):
    """Issue 20 item 11: --threads 100000 crashed nll with a segmentation fault; every command
    now refuses more threads than usable cores before any work, naming the flag."""
    ckpt, data = trained
    args = {
        "nll": ["nll", "--model", str(ckpt), "--data", str(data), *SOLVER],
        "train": ["train", "--data", str(data), "--out", str(tmp_path / "m.pt"), "--steps", "1"],
        "validate": ["validate", "--only", "theorem3"],
    }[command]
    assert main([*args, "--threads", "100000"]) == 2
    _one_line_error(capsys, "--threads", "from 1 to")
