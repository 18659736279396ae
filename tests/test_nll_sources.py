"""Row sources (cnftools/nll/sources.py): every kind of data, streams read lazily, resume over a
stream, (x, y) pairs."""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch
from _dist_worker import make_case
from _nll_call import run_nll

from cnftools.nll import ResumeError, read_rows

FAST = {"method": "rk4", "steps": 4, "progress": False}


class _LazyRows(torch.utils.data.IterableDataset):
    """``n`` rows of dimension ``d``, each made when asked for; counts how many are alive.

    Row ``i`` is a deterministic function of ``i`` (so every pass yields the same rows).
    """

    def __init__(self, n: int, d: int, shift: float = 0.0, labels: bool = False):
        self.n, self.d, self.shift, self.labels = n, d, shift, labels
        self.alive = 0
        self.peak = 0

    def _gone(self) -> None:
        self.alive -= 1

    def __iter__(self):
        for i in range(self.n):
            gen = torch.Generator().manual_seed(i)
            row = torch.randn(self.d, generator=gen, dtype=torch.float64) * 0.5 + self.shift
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            weakref.finalize(row, self._gone)
            yield (row, torch.tensor(i % 3)) if self.labels else row


class _Shrink(torch.nn.Module):
    """v(x, t) = -0.5 x: depends on x, so the divergence is defined; cheap at any dimension."""

    def forward(self, x, t):
        return -0.5 * x


class _Counted:
    """A DataLoader collate_fn that stacks rows and counts the loader batches alive."""

    def __init__(self):
        self.alive = self.peak = 0

    def _gone(self) -> None:
        self.alive -= 1

    def __call__(self, rows):
        batch = torch.stack(rows)
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(batch, self._gone)
        return batch


@pytest.mark.parametrize("kind", ["iterable", "loader"])
def test_a_stream_is_never_held_whole(kind):
    """Memory does not grow with N: 2,000 rows of 512 float64 (8 MB) stream through batches of 16.

    The bound: an IterableDataset's rows alive <= batch_size + 1 (the batch being built and the
    row just read); a DataLoader's batches of 8 alive <= batch_size / 8 + 2 (today's main reads a
    DataLoader whole: 250 batches alive). The frame holds one small row of numbers per data row.
    """
    d, batch = 512, 16
    stream = _LazyRows(2000, d)
    collate = _Counted()
    data = (
        stream if kind == "iterable" else torch.utils.data.DataLoader(stream, 8, collate_fn=collate)
    )
    frame = run_nll(
        _Shrink(), data, batch_size=batch, method="euler", steps=1, divergence="hutchinson",
        progress=False,
    )  # fmt: skip
    assert len(frame) == 2000 and (frame["status"] == "ok").all()
    if kind == "iterable":
        assert stream.peak <= batch + 1, stream.peak
    else:
        assert collate.peak <= batch // 8 + 2, collate.peak


def test_stream_equals_tensor():
    field, x = make_case(11)

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from x

    loader = torch.utils.data.DataLoader(Rows(), batch_size=3)
    expected = run_nll(field, x, batch_size=4, **FAST)
    for data in (Rows(), loader):
        got = run_nll(field, data, batch_size=4, **FAST)
        np.testing.assert_array_equal(got["log_prob"], expected["log_prob"])  # same float64 ops


def test_pairs_keep_y_as_batch_sliced_extras():
    x = torch.arange(10.0, dtype=torch.float64).reshape(5, 2)
    y = torch.tensor([0, 1, 2, 0, 1])
    for data in (
        torch.utils.data.TensorDataset(x, y),
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2),
    ):
        batches = list(read_rows(data).batches(3))
        assert [b.size for b in batches] == [3, 2]
        torch.testing.assert_close(batches[1].x, x[3:], rtol=0, atol=0)
        torch.testing.assert_close(batches[1].extras["y"], y[3:], rtol=0, atol=0)
    # the labels are part of the batch's content hash
    other = list(read_rows(torch.utils.data.TensorDataset(x, y.flip(0))).batches(3))
    plain = list(read_rows(x).batches(3))
    assert batches[0].digest() != other[0].digest() != plain[0].digest()


def test_resume_over_a_stream_and_refusal_when_it_changed(tmp_path):
    import cnftools.nll.store as store

    field, _ = make_case()
    out = tmp_path / "nll.parquet"
    original = store.ChunkStore.write_unit
    count = {"n": 0}

    class Killed(BaseException):
        pass

    def write_then_stop(self, *args, **kwargs):
        original(self, *args, **kwargs)
        count["n"] += 1
        if count["n"] == 2:
            raise Killed

    store.ChunkStore.write_unit = write_then_stop
    try:
        with pytest.raises(Killed):
            run_nll(field, _LazyRows(23, 2), batch_size=5, out=out, **FAST)
    finally:
        store.ChunkStore.write_unit = original
    with pytest.raises(ResumeError, match=r"data of unit \(batch 0"):
        run_nll(field, _LazyRows(23, 2, shift=1.0), batch_size=5, out=out, resume=True, **FAST)
    resumed = run_nll(field, _LazyRows(23, 2), batch_size=5, out=out, resume=True, **FAST)
    assert resumed.attrs["summary"]["rows_computed"] == 13
    plain = run_nll(field, _LazyRows(23, 2), batch_size=5, **FAST)
    np.testing.assert_array_equal(resumed["log_prob"], plain["log_prob"])


def test_a_stream_with_another_order_on_each_pass_is_refused():
    """Probe rounds re-read the stream: a shuffled one cannot give each row its own rounds."""
    field, x = make_case(12)

    class Shuffled(torch.utils.data.IterableDataset):
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            rest = 1 + torch.randperm(11, generator=torch.Generator().manual_seed(self.passes))
            yield from x[torch.cat([torch.tensor([0]), rest])]  # row 0 first, the rest shuffled

    with pytest.raises(ValueError, match="deterministic order"):
        run_nll(
            field, Shuffled(), batch_size=4, divergence="hutchinson", n_probes=2,
            target_stderr=1e-6, max_probes=8, **FAST,
        )  # fmt: skip


def test_a_one_shot_stream_is_refused():
    """A stream that does not restart would silently lose its first rows to the trial reads."""
    field, x = make_case(12)

    class OneShot(torch.utils.data.IterableDataset):
        def __init__(self):
            self.rows = iter(x)

        def __iter__(self):
            return self.rows

    with pytest.raises(ValueError, match="did not start again from its first row"):
        run_nll(field, OneShot(), batch_size=4, **FAST)


@pytest.mark.parametrize(
    ("data", "columns", "match"),
    [
        ("x.npy", ["a"], "not the .npy"),
        (torch.zeros(3, 2), ["a"], "columns= applies"),
        (torch.zeros(0, 2), None, "no rows"),
        (iter([torch.zeros(2)]), None, "data must be"),
    ],
)
def test_read_rows_refuses(tmp_path, data, columns, match):
    if data == "x.npy":
        data = tmp_path / "x.npy"
        np.save(data, np.zeros((3, 2)))
    with pytest.raises((ValueError, TypeError), match=match):
        read_rows(data, columns)


def test_npy_is_memory_mapped_and_read_by_batch(tmp_path):
    path = tmp_path / "x.npy"
    array = np.arange(20.0).reshape(10, 2)
    np.save(path, array)
    rows = read_rows(path)
    assert rows.n == 10 and not rows.streaming
    np.testing.assert_array_equal(rows.read_all().numpy(), array)


@pytest.mark.parametrize(
    "make",
    [
        lambda ds: torch.utils.data.DataLoader(ds, batch_size=3),
        lambda ds: torch.utils.data.DataLoader(ds, batch_size=None),
        lambda ds: torch.utils.data.DataLoader(
            ds, batch_sampler=torch.utils.data.BatchSampler(range(10), 4, drop_last=False)
        ),
    ],
    ids=["batch_size", "no-batching", "batch_sampler"],
)
def test_every_kind_of_data_loader_yields_the_rows(make):
    x = torch.arange(20.0).reshape(10, 2)
    rows = read_rows(make(torch.utils.data.TensorDataset(x)))
    assert rows.event == (2,) and [b.size for b in rows.batches(4)] == [4, 4, 2]
    torch.testing.assert_close(rows.read_all(), x, rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["iterable", "loader"])
def test_a_one_shot_stream_of_identical_rows_is_refused_not_shortened(wrap):
    """Today's main: 100 identical rows in, 83 out, no error (the trial reads were taken for a
    restart because the rows looked alike). Rows are identified by position: refused."""
    x = torch.ones(100, 2, dtype=torch.float64)

    class OneShot(torch.utils.data.IterableDataset):
        def __init__(self):
            self.rows = iter(x)

        def __iter__(self):
            return self.rows

    data = OneShot() if wrap == "iterable" else torch.utils.data.DataLoader(OneShot(), 8)
    with pytest.raises(ValueError, match="did not start again from its first row"):
        run_nll(_Shrink(), data, batch_size=16, **FAST)


def test_a_restartable_stream_of_identical_rows_gives_every_row():
    x = torch.ones(100, 2, dtype=torch.float64)

    class Rows(torch.utils.data.IterableDataset):
        def __iter__(self):
            yield from x

    frame = run_nll(_Shrink(), Rows(), batch_size=16, **FAST)
    assert frame["index"].tolist() == list(range(100))
    assert frame["log_prob"].nunique() == 1


def test_a_stream_that_grows_between_passes_is_refused():
    class Growing(torch.utils.data.IterableDataset):
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            yield from torch.ones(10 + self.passes, 2, dtype=torch.float64)

    with pytest.raises(ValueError, match="more than 11 rows on this pass"):
        run_nll(_Shrink(), Growing(), batch_size=4, **FAST)
