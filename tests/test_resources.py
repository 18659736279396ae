"""Tests of cnftools._resources: one thread policy for every entry point, and its bounds."""

from __future__ import annotations

import pytest
import torch

import cnftools
from cnftools._resources import (
    THREADS_ENV,
    HeapTrimmer,
    check_threads,
    entry_threads,
    usable_cores,
)
from cnftools.nll import Execution

F64 = torch.float64
TWO_CORES = pytest.mark.skipif(usable_cores() < 2, reason="needs 2 usable cores")


@pytest.fixture
def two_threads():
    """torch at 2 threads (the caller's count the policy must restore), 1 again afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class _Spy(torch.nn.Module):
    """A field -x that records torch's thread count at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=F64))
        self.seen: list[int] = []

    def forward(self, x, t):
        self.seen.append(torch.get_num_threads())
        return -self.scale * x


def _call(entry: str, spy: _Spy) -> None:
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    config = cnftools.SolverConfig("rk4", steps=2)
    if entry == "log_likelihood":
        cnftools.log_likelihood(spy, x, config=config)
    elif entry == "sample":
        cnftools.sample(spy, x, config=config)
    elif entry == "sample_with_log_prob":
        cnftools.sample_with_log_prob(spy, x, config=config)
    elif entry == "train_cfm":
        cnftools.train_cfm(spy, cnftools.OTPath(0.1), x, steps=2, batches=cnftools.Batches(size=4))
    else:
        execution = Execution(batch_size=4, progress=False)
        cnftools.dataset_nll(spy, x, config=config, execution=execution)


ENTRIES = ["log_likelihood", "sample", "sample_with_log_prob", "train_cfm", "dataset_nll"]


@TWO_CORES
@pytest.mark.parametrize("entry", ENTRIES)
def test_every_entry_point_follows_the_environment_variable_and_restores(
    entry, two_threads, monkeypatch
):
    """CNFTOOLS_THREADS=1 reaches the field of every entry point; the caller's 2 is restored."""
    monkeypatch.setenv(THREADS_ENV, "1")
    spy = _Spy()
    _call(entry, spy)
    assert spy.seen and set(spy.seen) == {1}
    assert torch.get_num_threads() == 2


@TWO_CORES
@pytest.mark.parametrize("entry", ENTRIES)
def test_a_threads_block_overrides_the_environment_variable(entry, two_threads, monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "2")
    spy = _Spy()
    with cnftools.threads(1):
        _call(entry, spy)
        assert torch.get_num_threads() == 1
    assert set(spy.seen) == {1} and torch.get_num_threads() == 2


@TWO_CORES
def test_the_automatic_choice_applies_when_nothing_is_set(two_threads, monkeypatch):
    """Without an override the entry point uses choose_threads (here forced to 1 by a load of
    100 on the machine) and restores the caller's count."""
    monkeypatch.delenv(THREADS_ENV, raising=False)
    monkeypatch.setattr("os.getloadavg", lambda: (100.0, 100.0, 100.0))
    spy = _Spy()
    _call("log_likelihood", spy)
    assert set(spy.seen) == {1} and torch.get_num_threads() == 2


@TWO_CORES
def test_inner_calls_keep_the_outer_count(two_threads, monkeypatch):
    """dataset_nll(execution=Execution(num_threads=1)) solves with log_likelihood: the inner call
    keeps 1 even where the environment says 2."""
    monkeypatch.setenv(THREADS_ENV, "2")
    spy = _Spy()
    x = torch.randn(8, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    cnftools.dataset_nll(
        spy,
        x,
        config=cnftools.SolverConfig("euler", steps=1),
        execution=Execution(batch_size=4, progress=False, num_threads=1),
    )
    assert set(spy.seen) == {1} and torch.get_num_threads() == 2


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "n must be from 1 to"),
        (100_000, ValueError, r"n must be from 1 to \d+ \(the CPU cores"),
        (1.5, TypeError, "n must be an integer"),
        (True, TypeError, "n must be an integer"),
    ],
)
def test_check_threads_bounds_by_the_machine(value, error, match):
    with pytest.raises(error, match=match):
        check_threads("n", value)


def test_a_bad_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ValueError, match=f"{THREADS_ENV}='many' must be an integer"):
        cnftools.log_likelihood(lambda x, t: -x, torch.zeros(2, 2, dtype=F64))
    monkeypatch.setenv(THREADS_ENV, "100000")
    with pytest.raises(ValueError, match=f"the environment variable {THREADS_ENV} must be from 1"):
        cnftools.log_likelihood(lambda x, t: -x, torch.zeros(2, 2, dtype=F64))


def test_dataset_nll_refuses_more_threads_than_cores_before_any_work():
    """Issue 20 item 11: num_threads=100000 died in Arrow; now a ValueError naming the argument,
    and the field is never called."""
    spy = _Spy()
    with pytest.raises(ValueError, match=r"Execution\(num_threads=\.\.\.\) must be from 1 to"):
        cnftools.dataset_nll(
            spy, torch.zeros(4, 2, dtype=F64), execution=Execution(num_threads=100_000)
        )
    assert spy.seen == []


def test_threads_block_restores_after_an_error():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"), cnftools.threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_entry_threads_off_the_cpu_keeps_the_current_count(monkeypatch):
    monkeypatch.delenv(THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    with entry_threads("meta") as count:
        assert count == before == torch.get_num_threads()


@TWO_CORES
@pytest.mark.parametrize(
    ("batch", "dim", "atol"),
    [(64, 2, 0.0), (4096, 8, 1e-12)],
    ids=["small: bit-identical", "large: rounding only"],
)
def test_log_likelihood_does_not_depend_on_the_thread_count(batch, dim, atol):
    """Small tensors (below torch's parallel grain of 32,768 elements per op) run on one thread
    whatever the count: log p is bit-identical for 1 and 2 threads (atol 0). Larger ones may
    split reductions and matrix products by thread, and torch does not promise the same rounding
    then: bit-identical in this case as measured, but 3.6e-15 apart at B = 4096, d = 16 with rk4
    in 4 steps. atol 1e-12 (float64, |log p| ~ 20) admits rounding only, not a real change."""
    torch.manual_seed(0)
    field = cnftools.MLPField(dim, hidden=(64, 64)).double()
    x = torch.randn(batch, dim, dtype=F64, generator=torch.Generator().manual_seed(1))
    results = []
    for count in (1, 2):
        with cnftools.threads(count):
            config = cnftools.SolverConfig("euler", steps=2)
            results.append(cnftools.log_likelihood(field, x, config=config).log_prob)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=atol)


def test_heap_trimmer_limits_its_share_of_the_time():
    """Right after a trim the next call waits (the share bound): two calls in a row trim once."""
    trimmer = HeapTrimmer(share=1e-9)
    trimmer()
    trimmer()
    assert trimmer.calls == (0 if trimmer.trim is None else 1)


def test_a_bad_local_world_size_is_named(monkeypatch):
    """Regression: ``LOCAL_WORLD_SIZE=abc`` gave int()'s bare "invalid literal for int()"; the
    automatic thread count now names the variable (torchrun sets it)."""
    from cnftools._resources import choose_threads

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "abc")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE='abc' must be an integer"):
        choose_threads("cpu")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert choose_threads("cpu") >= 1
