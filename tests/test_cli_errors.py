"""User errors on the command line: one line on stderr, exit status 2, never a traceback."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cnftools.cli import UsageError, check_device, main
from cnftools.data import eight_gaussians

SOLVER = ["--method", "rk4", "--steps", "4", "--no-progress"]


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


@pytest.mark.parametrize("flag", ["--centered", "--no-centered"])
def test_nll_centered_without_dequantization_is_refused(trained, capsys, flag):
    """The float data here get no dequantization, so --centered would be ignored silently."""
    ckpt, data = trained
    code = main(["nll", "--model", str(ckpt), "--data", str(data), flag, *SOLVER])
    assert code == 2
    _one_line_error(capsys, flag, "no dequantization")


def test_nll_bits_per_dim_of_continuous_data(trained, capsys):
    """--bpd-dims D reports mean bits/dim = mean NLL / (D ln 2) for float data; the printed
    numbers are rounded to 5 and 4 decimals, so they agree to 1e-4."""
    ckpt, data = trained
    code = main(["nll", "--model", str(ckpt), "--data", str(data), "--bpd-dims", "2", *SOLVER])
    assert code == 0
    out = capsys.readouterr().out
    nll = float(out.split("mean NLL ")[1].split()[0])
    bpd = float(out.split("mean bits/dim ")[1].split()[0])
    assert bpd == pytest.approx(nll / (2 * np.log(2)), abs=1e-4)
    assert "(continuous density)" in out


# --- issue 20: errors before work, damaged files, a full disk ------------------------------------
@pytest.mark.parametrize(
    ("hidden", "needles"),
    [
        ("abc", ["--hidden 'abc'", "positive integers"]),
        ("8,0", ["--hidden '8,0'", "positive integers"]),
        ("1000000,1000000", ["--hidden 1000000,1000000", "parameters", "GiB"]),
    ],
)
def test_train_hidden_is_checked_before_anything_is_built(
    trained, tmp_path, capsys, monkeypatch, hidden, needles
):
    """Today's main: a ValueError text for 'abc'; a 4 TB allocation attempted for 10**6 widths."""
    import cnftools.cli.train as train

    _, data = trained
    built = train.MLPField

    def only_on_meta(*args, **kwargs):
        if kwargs.get("device") != "meta":
            raise AssertionError("a model was built before --hidden was checked")
        return built(*args, **kwargs)

    monkeypatch.setattr(train, "MLPField", only_on_meta)
    out = tmp_path / "m.pt"
    code = main(
        ["train", "--data", str(data), "--out", str(out), "--hidden", hidden, "--steps", "1"]
    )
    assert code == 2
    _one_line_error(capsys, *needles)
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--out", "{out}", "--resume", "--overwrite"], ["--resume", "--overwrite", "contradict"]),
        (["--resume"], ["--resume needs --out"]),
        (["--overwrite"], ["--overwrite needs --out"]),
    ],
    ids=["resume-and-overwrite", "resume-without-out", "overwrite-without-out"],
)
def test_nll_flags_that_cannot_apply_are_refused(trained, tmp_path, capsys, flags, needles):
    """Today's main ignored --resume with --overwrite (and both without --out) silently."""
    ckpt, data = trained
    out = tmp_path / "nll.parquet"
    flags = [f.format(out=out) for f in flags]
    code = main(["nll", "--model", str(ckpt), "--data", str(data), *flags, *SOLVER])
    assert code == 2
    _one_line_error(capsys, *needles)
    assert not out.exists()


def test_nll_out_naming_a_directory_is_not_a_resume_hint(trained, tmp_path, capsys):
    ckpt, data = trained
    folder = tmp_path / "results.parquet"
    folder.mkdir()
    code = main(["nll", "--model", str(ckpt), "--data", str(data), "--out", str(folder), *SOLVER])
    assert code == 2
    line = _one_line_error(capsys, "is a directory")
    assert "resume" not in line


def test_nll_refuses_a_checkpoint_with_a_flipped_byte(trained, tmp_path, capsys):
    """Today's main ran on it (its weights changed by a flipped byte)."""
    import zipfile

    ckpt, data = trained
    raw = bytearray(ckpt.read_bytes())
    with zipfile.ZipFile(ckpt) as archive:  # a byte inside the first tensor's data
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    header = 30 + len(info.filename.encode()) + len(info.extra)  # local file header
    raw[info.header_offset + header + info.compress_size // 2] ^= 0x10
    model = tmp_path / "model.pt"
    model.write_bytes(bytes(raw))
    assert main(["nll", "--model", str(model), "--data", str(data), *SOLVER]) == 2
    _one_line_error(capsys, "--model", "damaged")


def test_train_on_a_full_disk_keeps_the_model_and_says_where(
    trained, tmp_path, capsys, monkeypatch
):
    import errno

    import cnftools
    import cnftools.cli.train as train

    _, data = trained
    out = tmp_path / "m.pt"
    real = train.save_checkpoint

    def full_disk(file, *args, **kwargs):
        if str(file) == str(out):
            raise OSError(errno.ENOSPC, f"could not write the checkpoint {str(out)!r}: No space")
        return real(file, *args, **kwargs)

    monkeypatch.setattr(train, "save_checkpoint", full_disk)
    monkeypatch.setattr(train.tempfile, "gettempdir", lambda: str(tmp_path))
    code = main(["train", "--data", str(data), "--out", str(out), "--hidden", "4", "--steps", "1",
                 "--no-progress"])  # fmt: skip
    assert code == 1
    line = _one_line_error(capsys, "m.pt", "No space", "saved to")
    saved = tmp_path / line.split("saved to '")[1].split("'")[0]
    assert cnftools.load_checkpoint(saved).field.config()["hidden"] == [4]


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


@pytest.mark.parametrize("value", ["abc", "100000"])
def test_a_bad_cnftools_threads_is_one_line_in_validate(capsys, monkeypatch, value):
    """Today's main: `CNFTOOLS_THREADS=abc cnftools validate` printed a traceback (exit 1) where
    `cnftools nll` and `train` print one line and exit 2."""
    monkeypatch.setenv("CNFTOOLS_THREADS", value)
    assert main(["validate", "--list"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "CNFTOOLS_THREADS" in err


@pytest.mark.parametrize(
    ("flags", "needles"),
    [
        (["--t-max", "1.5"], ["--batch-size/--t-max/--seed", "Batches.t_max", "t_max=1.5"]),
        (["--batch-size", "0"], ["--batch-size/--t-max/--seed", "Batches.size", "got 0"]),
        (["--lr", "0"], ["--lr", "Optimization.lr must be > 0"]),
        (["--time-embedding", "learned"], ["--time-embedding", "TimeFeatures.kind", "'learned'"]),
    ],
    ids=["t-max", "batch-size", "lr", "time-embedding"],
)
def test_train_option_flags_are_checked_before_training(
    trained, tmp_path, capsys, monkeypatch, flags, needles
):
    """Regression: 0.1 found a bad --t-max only at training step 1 (after building the model);
    now the option objects refuse it, the flag named, before train_cfm is called."""
    import cnftools.cli.train

    _, data = trained

    def never(*args, **kwargs):
        raise AssertionError("training started before the flags were checked")

    monkeypatch.setattr(cnftools.cli.train, "train_cfm", never)
    out = tmp_path / "m.pt"
    assert main(["train", "--data", str(data), "--out", str(out), "--no-progress", *flags]) == 2
    _one_line_error(capsys, *needles)


def test_train_flag_defaults_are_the_option_objects():
    """The defaults of cnftools train come from Batches, Optimization, TimeFeatures and MLPField
    (no restated numbers)."""
    import argparse
    import inspect

    import cnftools
    import cnftools.cli.train

    parser = argparse.ArgumentParser()
    cnftools.cli.train.add_arguments(parser)
    args = parser.parse_args(["--out", "m.pt", "--dataset", "two_moons"])
    field = inspect.signature(cnftools.MLPField).parameters
    assert args.batch_size == cnftools.Batches().size
    assert args.t_max == cnftools.Batches().t_max
    assert args.minibatch_ot == cnftools.Batches().minibatch_ot
    assert args.lr == cnftools.Optimization.DEFAULT_LR
    assert args.time_embedding == cnftools.TimeFeatures().kind
    assert args.activation == field["activation"].default
    assert tuple(int(w) for w in args.hidden.split(",")) == field["hidden"].default
