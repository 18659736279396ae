"""A train_cfm run saved by Checkpointing and resumed (cnftools/training/resume.py, draws.py):
bit-identical to the run that was never interrupted, and refused when the settings differ."""

from __future__ import annotations

import pytest
import torch

import cnftools
from cnftools.data import eight_gaussians
from cnftools.training.resume import RUN_KEY

F64 = torch.float64
PATH = cnftools.OTPath(0.1)
DATA = torch.randn(40, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
LABELS = torch.arange(40) % 3
# every option that carries state across steps: epochs of a permutation, minibatch OT, the
# cosine schedule (its state), Adam's moments, clipping
BATCHES = cnftools.Batches(size=8, seed=3, minibatch_ot=True, t_max=0.99)
OPTIMIZATION = cnftools.Optimization(lr=1e-2, lr_schedule="cosine", max_grad_norm=1.0)


class Interrupted(Exception):
    """Stands for a process killed after a step (the checkpoint on disk is what survives)."""


def fresh() -> cnftools.MLPField:
    torch.manual_seed(0)
    return cnftools.MLPField(2, hidden=(8,), num_classes=3).double()


def train(field, steps, checkpoints=None, interrupt_at=None, data=DATA, **options):
    def callback(step, loss, field):
        if step == interrupt_at:
            raise Interrupted

    monitor = cnftools.Monitor(callback=callback, every=1) if interrupt_at else cnftools.Monitor()
    extras = {"y": LABELS} if isinstance(data, torch.Tensor) else None
    return cnftools.train_cfm(
        field,
        PATH,
        data,
        steps=steps,
        batches=options.get("batches", BATCHES),
        optimization=options.get("optimization", OPTIMIZATION),
        monitor=monitor,
        checkpoints=checkpoints,
        extras=extras,
    )


def unlabelled() -> cnftools.MLPField:
    torch.manual_seed(0)
    return cnftools.MLPField(2, hidden=(8,)).double()


def _same_weights(a, b) -> bool:
    first, second = a.state_dict(), b.state_dict()
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("data", ["tensor", "sampler"])
def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, data):
    """Killed after step 8 (saves every 3 steps, so the file holds step 6), then resumed: the
    13-step history (loss, lr) and the weights equal the uninterrupted run's exactly (tolerance
    0: the same operations in the same order from the same state, on CPU in float64). The
    tensor data's epochs (5 batches) and the cosine schedule both cross the interruption."""
    source = DATA if data == "tensor" else eight_gaussians(dtype=F64).sample
    make = fresh if data == "tensor" else unlabelled
    whole = train(make(), 13, data=source)
    run = cnftools.Checkpointing(tmp_path / "run.pt", every=3)
    with pytest.raises(Interrupted):
        train(make(), 13, run, interrupt_at=8, data=source)
    resumed = train(make(), 13, run, data=source)
    assert resumed.resumed_from == 6
    assert resumed.history["step"].tolist() == list(range(1, 14))
    assert resumed.history["loss"].tolist() == whole.history["loss"].tolist()
    assert resumed.history["lr"].tolist() == whole.history["lr"].tolist()
    assert _same_weights(resumed.field, whole.field)
    # the file is an ordinary checkpoint of the finished run
    ckpt = cnftools.load_checkpoint(run.file)
    assert _same_weights(ckpt.field, whole.field) and ckpt.extra[RUN_KEY]["step"] == 13


def test_a_constant_rate_run_may_grow(tmp_path):
    """Without a schedule, a finished 6-step run resumed with steps=10 equals a 10-step run."""
    constant = cnftools.Optimization(lr=1e-2)
    whole = train(fresh(), 10, optimization=constant)
    run = cnftools.Checkpointing(tmp_path / "run.pt", every=100)
    train(fresh(), 6, run, optimization=constant)
    longer = train(fresh(), 10, run, optimization=constant)
    assert longer.resumed_from == 6
    assert longer.history["loss"].tolist() == whole.history["loss"].tolist()
    assert _same_weights(longer.field, whole.field)


def test_a_finished_run_is_returned_as_it_is(tmp_path):
    run = cnftools.Checkpointing(tmp_path / "run.pt")
    first = train(fresh(), 5, run)
    field = fresh()
    again = train(field, 5, run)
    assert again.resumed_from == 5 and len(again.history) == 5
    assert again.history["loss"].tolist() == first.history["loss"].tolist()
    assert _same_weights(field, first.field)  # the stored weights, no step taken


def test_a_run_stopped_by_its_callback_stays_stopped(tmp_path):
    run = cnftools.Checkpointing(tmp_path / "run.pt", every=100)
    stop = cnftools.Monitor(callback=lambda step, loss, field: step == 4, every=1)
    cnftools.train_cfm(
        fresh(), PATH, DATA, steps=10, batches=BATCHES, optimization=OPTIMIZATION, monitor=stop,
        checkpoints=run, extras={"y": LABELS},
    )  # fmt: skip
    again = train(fresh(), 10, run)
    assert again.resumed_from == 4 and len(again.history) == 4


def test_resume_false_starts_afresh(tmp_path):
    run = cnftools.Checkpointing(tmp_path / "run.pt")
    first = train(fresh(), 4, run)
    again = train(fresh(), 4, cnftools.Checkpointing(run.file, resume=False))
    assert again.resumed_from == 0
    assert again.history["loss"].tolist() == first.history["loss"].tolist()  # same seed


@pytest.mark.parametrize(
    ("options", "match"),
    [
        (
            {"batches": cnftools.Batches(size=4, seed=3, minibatch_ot=True, t_max=0.99)},
            r"batches\.size: 8 in the file, 4 now",
        ),
        (
            {"batches": cnftools.Batches(size=8, seed=4, minibatch_ot=True, t_max=0.99)},
            r"batches\.seed: 3 in the file, 4 now",
        ),
        (
            {"optimization": cnftools.Optimization(lr=1e-2, max_grad_norm=1.0)},
            r"optimization\.lr_schedule: 'cosine' in the file, None now",
        ),
        ({"steps": 20}, r"steps: 6 in the file, 20 now"),
        (
            {"data": DATA[:32]},
            r"data: 'a tensor of shape \(40, 2\)' in the file, 'a tensor of shape \(32, 2\)' now",
        ),
    ],
    ids=["size", "seed", "schedule", "steps under a schedule", "data"],
)
def test_other_settings_are_refused_and_nothing_changes(tmp_path, options, match):
    run = cnftools.Checkpointing(tmp_path / "run.pt")
    train(fresh(), 6, run)
    stored = run.file.read_bytes()
    field = fresh()
    before = {k: v.clone() for k, v in field.state_dict().items()}
    steps = options.pop("steps", 6)
    with pytest.raises(ValueError, match=match):
        train(field, steps, run, **options)
    assert all(torch.equal(before[k], v) for k, v in field.state_dict().items())
    assert run.file.read_bytes() == stored


def test_other_field_or_foreign_file_is_refused(tmp_path):
    run = cnftools.Checkpointing(tmp_path / "run.pt")
    train(fresh(), 3, run)
    other = cnftools.MLPField(2, hidden=(16,), num_classes=3).double()
    with pytest.raises(ValueError, match="holds the weights of another field"):
        train(other, 3, run)
    foreign = tmp_path / "foreign.pt"
    cnftools.save_checkpoint(foreign, fresh(), PATH)
    with pytest.raises(ValueError, match="holds no train_cfm run state"):
        train(fresh(), 3, cnftools.Checkpointing(foreign))
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(run.file.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cannot be resumed: .*truncated"):
        train(fresh(), 3, cnftools.Checkpointing(damaged))
