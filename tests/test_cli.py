"""Tests of the command line: validate's exit status, listing, report writing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cnftools import cli
from cnftools.validation import Check
from cnftools.validation import _framework as framework


def test_validate_theorem3_passes_and_writes_report(tmp_path, capsys):
    code = cli.main(["validate", "--only", "theorem3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Theorem 3" in out and "FAIL" not in out
    report = (tmp_path / "report.md").read_text()
    assert "ALL PASSED" in report and "| §7 | Theorem 3" in report
    assert "torch:" in report and "device: cpu" in report


def test_validate_float32(capsys):
    assert cli.main(["validate", "--only", "theorem3", "--dtype", "float32"]) == 0


def _fake(rows):
    return framework.Experiment("fake", 0.0, "fake experiment", lambda ctx: rows)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ([Check("§0", "ok", "x", 1e-12, 1e-10)], 0),
        ([Check("§0", "bad", "x", 1e-3, 1e-10)], 1),
        ([Check("§0", "nan", "x", float("nan"), 1e-10)], 1),
        ([Check("§0", "control", "x", 1e-1, 1e-3, expect_fail=True)], 0),
        ([Check("§0", "control missed", "x", 1e-9, 1e-3, expect_fail=True)], 1),
    ],
)
def test_exit_status_follows_checks(monkeypatch, capsys, rows, expected):
    monkeypatch.setattr(framework, "discover", lambda: [_fake(rows)])
    monkeypatch.setattr("cnftools.cli.validate.discover", lambda: [_fake(rows)])
    assert cli.main(["validate"]) == expected


def test_crashing_experiment_fails_the_run(monkeypatch, capsys):
    def boom(ctx):
        raise RuntimeError("boom")

    crash = framework.Experiment("crash", 0.0, "crash", boom)
    monkeypatch.setattr("cnftools.cli.validate.discover", lambda: [crash])
    assert cli.main(["validate"]) == 1
    assert "boom" in capsys.readouterr().out


def test_list_and_unknown_experiment(capsys):
    assert cli.main(["validate", "--list"]) == 0
    assert "theorem3" in capsys.readouterr().out
    assert cli.main(["validate", "--only", "no_such_check"]) == 2


def test_console_script_help():
    result = subprocess.run(
        [sys.executable, "-m", "cnftools.cli", "validate", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "--device" in result.stdout and "--full" in result.stdout


def test_every_subpackage_is_installed():
    """pyproject's explicit package list names every subpackage of cnftools (a missing one would
    be absent from a non-editable install)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(root).parts) for p in (root / "cnftools").rglob("__init__.py")
    }
    assert found <= listed, f"not in pyproject's packages: {sorted(found - listed)}"
