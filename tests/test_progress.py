"""Tests of cnftools._progress: long solves show the time reached and the evaluations so far."""

from __future__ import annotations

import pytest
import torch

import cnftools
import cnftools._progress as progress_module
from cnftools._progress import SolveProgress, reporting_to


@pytest.fixture
def immediate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Report from the first step on, every step (the real delay is 3 s, then once a second)."""
    original = SolveProgress.__init__

    def init(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        original(self, *args, **{**kwargs, "delay": 0.0, "interval": 0.0})

    monkeypatch.setattr(SolveProgress, "__init__", init)


def _field_and_data():
    torch.manual_seed(0)
    field = cnftools.MLPField(2, hidden=[16]).double()
    return field, torch.randn(5, 2, dtype=torch.float64)


@pytest.mark.usefixtures("immediate")
def test_progress_true_reports_time_and_evaluations_on_stderr(capsys) -> None:
    field, x = _field_and_data()
    result = cnftools.log_likelihood(field, x, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines and all(line.startswith("log_likelihood: t = ") for line in lines)
    # the evaluations climb to the solve's count, the time from 1 towards 0
    counts = [int(line.split(", ")[1].split()[0]) for line in lines]
    assert counts == sorted(counts) and counts[-1] <= result.nfe.total


@pytest.mark.usefixtures("immediate")
@pytest.mark.parametrize("progress", [False, None])
def test_no_report_when_off_or_not_a_terminal(capsys, progress) -> None:
    field, x = _field_and_data()  # pytest's stderr is not a terminal: None means off
    cnftools.log_likelihood(field, x, progress=progress)
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("immediate")
def test_sample_with_log_prob_reports_too(capsys) -> None:
    field, x = _field_and_data()
    cnftools.sample_with_log_prob(field, x, progress=True)
    assert "sample_with_log_prob: t = " in capsys.readouterr().err


@pytest.mark.usefixtures("immediate")
def test_sample_reports_too(capsys) -> None:
    """New in 0.2: ``sample`` takes ``progress=`` like the likelihood functions (its own name,
    the time climbing from 0 towards 1, evaluations up to the solve's count)."""
    field, x = _field_and_data()
    result = cnftools.sample(field, x, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert lines and all(line.startswith("sample: t = ") for line in lines)
    counts = [int(line.split(", ")[1].split()[0]) for line in lines]
    assert counts == sorted(counts) and counts[-1] <= result.nfe.total


@pytest.mark.usefixtures("immediate")
@pytest.mark.parametrize("progress", [False, None])
def test_sample_reports_nothing_when_off(capsys, progress) -> None:
    field, x = _field_and_data()
    cnftools.sample(field, x, progress=progress)
    assert capsys.readouterr().err == ""


@pytest.mark.usefixtures("immediate")
def test_an_installed_sink_receives_the_reports(capsys) -> None:
    """How the dataset-NLL bar shows a unit's solve: the solves inside report to the sink."""
    field, x = _field_and_data()
    seen: list[str] = []
    with reporting_to(seen.append):
        cnftools.log_likelihood(field, x)
    assert seen and capsys.readouterr().err == ""


def test_a_short_solve_prints_nothing_by_default(capsys) -> None:
    assert progress_module.DELAY >= 1.0  # the first report only after a few seconds
    field, x = _field_and_data()
    cnftools.log_likelihood(field, x, progress=True)
    assert capsys.readouterr().err == ""


def test_progress_must_be_a_bool_or_none() -> None:
    field, x = _field_and_data()
    with pytest.raises(TypeError, match="progress must be"):
        cnftools.log_likelihood(field, x, progress="yes")


@pytest.mark.parametrize("entry", ["sample", "sample_with_log_prob"])
def test_progress_must_be_a_bool_or_none_everywhere(entry: str) -> None:
    field, x = _field_and_data()
    with pytest.raises(TypeError, match="progress must be"):
        getattr(cnftools, entry)(field, x, progress=1)
