"""train_cfm with conditioning: per-row extras follow their rows, minibatch OT keeps the pairs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cnftools
import cnftools.training.loop as training

F64 = torch.float64


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def record_batches(monkeypatch) -> list[tuple[torch.Tensor, dict]]:
    """Spy on the loss train_cfm calls: record each step's (x1, x0, extras), then run it."""
    seen: list[tuple[torch.Tensor, torch.Tensor, dict]] = []
    real = training.cfm_loss

    def spy(v, path, x1, t, x0, generator, **kwargs):
        seen.append((x1.clone(), x0.clone(), dict(kwargs["extras"])))
        return real(v, path, x1, t, x0, generator, **kwargs)

    monkeypatch.setattr(training, "cfm_loss", spy)
    return seen


def labelled_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row i is (i, -i): its label i can be read back from x1 exactly."""
    index = torch.arange(n, dtype=F64)
    return torch.stack([index, -index], dim=1), torch.arange(n)


@settings(max_examples=10)
@given(
    n=st.integers(2, 12),
    batch_fraction=st.floats(0.1, 1.0),
    seed=st.integers(0, 1000),
    minibatch_ot=st.booleans(),
)
def test_labels_follow_their_rows(n, batch_fraction, seed, minibatch_ot):
    # Invariant: at every step, extras["y"][b] is the label of x1[b] (also after minibatch OT,
    # which re-orders x0 only), and every row appears once per epoch.
    batch = max(1, int(n * batch_fraction))
    data, labels = labelled_rows(n)
    seen: list = []
    real = training.cfm_loss

    def spy(v, path, x1, t, x0, generator, **kwargs):
        seen.append((x1.clone(), x0.clone(), dict(kwargs["extras"])))
        return real(v, path, x1, t, x0, generator, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "cfm_loss", spy)
        torch.manual_seed(seed)
        field = cnftools.MLPField(2, hidden=(4,), num_classes=n).double()
        steps = 2 * (n // batch)
        cnftools.train_cfm(
            field,
            cnftools.OTPath(0.1),
            data,
            extras={"y": labels},
            steps=steps,
            batches=cnftools.Batches(size=batch, seed=seed, minibatch_ot=minibatch_ot),
        )
    assert len(seen) == steps
    for x1, _, extras in seen:
        assert torch.equal(extras["y"], x1[:, 0].long())  # row b's label is row b's index
    epoch = torch.cat([extras["y"] for _, _, extras in seen[: n // batch]])
    assert epoch.unique().numel() == epoch.numel()  # without replacement within an epoch


def test_minibatch_ot_pairs_within_each_label(monkeypatch):
    # x0 is re-ordered only among rows of the same label (pairing across labels would give each
    # class the noise nearest to it, and x0 | y would not be N(0, I) any more).
    seen = record_batches(monkeypatch)
    data, _ = labelled_rows(12)
    labels = torch.arange(12) % 2
    field = cnftools.MLPField(2, hidden=(4,), num_classes=2).double()
    cnftools.train_cfm(
        field,
        cnftools.OTPath(0.1),
        data,
        extras={"y": labels},
        steps=3,
        batches=cnftools.Batches(size=12, minibatch_ot=True),
    )
    for x1, x0, extras in seen:
        assert torch.equal(extras["y"], x1[:, 0].long() % 2)  # pairs (x1, label) kept
        for label in (0, 1):
            rows = (extras["y"] == label).nonzero().flatten()
            # within the group, x0 is an optimal assignment for x1 (a fixed point of pairing)
            assert torch.equal(cnftools.minibatch_ot_pairing(x0[rows], x1[rows]), x0[rows])


def test_minibatch_ot_with_labels_learns_each_class():
    # Negative control, measured: pairing across classes (plain minibatch_ot_pairing) gives class
    # means -3.31 and 3.32 for -4 and 4 here (each class gets the noise nearest to it), outside
    # the 0.5 margin below; pairing within classes removes the bias.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (1500,), generator=gen)
    data = (4.0 * labels - 4.0)[:, None] + 0.3 * torch.randn(1500, 1, generator=gen)
    field = cnftools.MLPField(1, hidden=(32, 32), num_classes=3)
    cnftools.train_cfm(
        field,
        cnftools.OTPath(0.01),
        data,
        extras={"y": labels},
        steps=300,
        batches=cnftools.Batches(size=128, minibatch_ot=True),
        optimization=cnftools.Optimization(lr=5e-3),
    )
    noise = torch.randn(400, 1, generator=gen)
    for label in range(3):
        with torch.no_grad():
            x1 = cnftools.sample(
                lambda x, t, label=label: field(x, t, y=torch.full((x.shape[0],), label)),
                noise,
                config=cnftools.SolverConfig("rk4", steps=20),
            ).x
        # standard error of a 400-sample mean of a 0.3-wide class: 0.015; the rest is training
        assert abs(float(x1.mean()) - (4.0 * label - 4.0)) < 0.5


def test_extras_dtypes_and_shared_values(monkeypatch):
    seen = record_batches(monkeypatch)
    data = torch.randn(6, 2, dtype=torch.float32)
    vectors = torch.randn(6, 3, dtype=torch.float32)
    shared = torch.randn(4)  # first dimension is not N = 6: passed as is, every step

    def field_fn(x, t, y, table):
        return torch.zeros_like(x) + 0 * y.sum() + 0 * table.sum()

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros((), dtype=F64))

        def forward(self, x, t, y, table):
            return self.w * x + field_fn(x, t, y, table)

    cnftools.train_cfm(
        Field(),
        cnftools.OTPath(0.1),
        data,
        extras={"y": vectors, "table": shared},
        steps=2,
        batches=cnftools.Batches(size=3),
    )
    for x1, _, extras in seen:
        assert x1.dtype == F64  # the field's dtype
        assert extras["y"].dtype == F64 and extras["y"].shape == (3, 3)  # per-row: cast, sliced
        assert extras["table"] is shared  # anything else: as is


def test_sampler_returning_extras(monkeypatch):
    seen = record_batches(monkeypatch)

    def sampler(n, generator):
        y = torch.randint(0, 2, (n,), generator=generator)
        x = torch.randn(n, 2, generator=generator) + 4.0 * y[:, None]
        return x, {"y": y}

    field = cnftools.MLPField(2, hidden=(8,), num_classes=2)
    cnftools.train_cfm(
        field, cnftools.OTPath(0.1), sampler, steps=3, batches=cnftools.Batches(size=16)
    )
    assert len(seen) == 3
    for _, _, extras in seen:
        assert extras["y"].shape == (16,) and extras["y"].dtype == torch.long


def test_class_conditional_training_learns_each_class():
    # Two classes at -3 and +3 in 1-D: a conditional field trained with the labels transports
    # noise to the right class. Sample means are compared with a wide margin (0.6): with 400
    # samples their standard error is about 0.05, the remaining error is training error.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (2000,), generator=gen)
    data = (6.0 * labels - 3.0)[:, None] + 0.5 * torch.randn(2000, 1, generator=gen)
    field = cnftools.MLPField(1, hidden=(32, 32), num_classes=2)
    cnftools.train_cfm(
        field,
        cnftools.OTPath(0.01),
        data,
        extras={"y": labels},
        steps=400,
        batches=cnftools.Batches(size=128),
    )
    noise = torch.randn(400, 1, generator=gen)
    for label, mean in ((0, -3.0), (1, 3.0)):
        with torch.no_grad():
            x1 = cnftools.sample(
                lambda x, t, label=label: field(x, t, y=torch.full((x.shape[0],), label)),
                noise,
                config=cnftools.SolverConfig("rk4", steps=20),
            ).x
        assert abs(float(x1.mean()) - mean) < 0.6


FOUR = cnftools.Batches(size=4)


def test_conditional_training_errors():
    field = cnftools.MLPField(2, hidden=(4,), num_classes=3)
    data = torch.randn(10, 2)
    with pytest.raises(ValueError, match="extras= goes with tensor data"):
        cnftools.train_cfm(
            field,
            cnftools.OTPath(0.1),
            lambda n, g: torch.randn(n, 2, generator=g),
            extras={"y": torch.zeros(10, dtype=torch.long)},
            steps=1,
            batches=FOUR,
        )
    with pytest.raises(TypeError, match="extras must be a dict"):
        cnftools.train_cfm(field, cnftools.OTPath(0.1), data, extras=[1], steps=1, batches=FOUR)
    with pytest.raises(ValueError, match="pass y="):  # a conditional field trained without labels
        cnftools.train_cfm(field, cnftools.OTPath(0.1), data, steps=1, batches=FOUR)
    with pytest.raises(TypeError, match=r"pair \(x1, extras dict\)"):
        cnftools.train_cfm(
            field,
            cnftools.OTPath(0.1),
            lambda n, g: (torch.randn(n, 2), torch.zeros(n)),
            steps=1,
            batches=FOUR,
        )
    with pytest.raises(ValueError, match=r"returned 3 rows, expected batches\.size=4"):
        cnftools.train_cfm(
            field,
            cnftools.OTPath(0.1),
            lambda n, g: torch.randn(3, 2),
            steps=1,
            batches=FOUR,
        )
    with pytest.raises(ValueError, match="continuous condition"):
        cnftools.train_cfm(
            cnftools.MLPField(2, hidden=(4,), cond_dim=1),
            cnftools.OTPath(0.1),
            data,
            extras={"y": torch.randn(10, 1)},
            steps=1,
            batches=cnftools.Batches(size=4, minibatch_ot=True),
        )
    # labels of the wrong length are not per-row (first dimension is not N): the field refuses
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(4,\)"):
        cnftools.train_cfm(
            field,
            cnftools.OTPath(0.1),
            data,
            extras={"y": torch.zeros(9, dtype=torch.long)},
            steps=1,
            batches=FOUR,
        )
