"""train_cfm's option objects (cnftools/training/options.py): each checks its values when made,
naming the field, what it expects and the fix; they are frozen."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

import cnftools
from cnftools.training.options import Batches, Checkpointing, Monitor, Optimization


def test_defaults_are_the_documented_ones():
    assert Batches() == Batches(size=256, t_min=0.0, t_max=1.0, minibatch_ot=False, seed=0)
    assert Optimization() == Optimization(None, None, None, None)
    assert Optimization.DEFAULT_LR == 1e-3
    assert Monitor() == Monitor(progress=False, callback=None, every=100)
    assert Checkpointing("run.pt") == Checkpointing("run.pt", every=1000, resume=True)


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: Batches(size=0),
            ValueError,
            r"Batches\.size must be an int >= 1, got 0; .*e\.g\.",
        ),
        (lambda: Batches(size=2.5), ValueError, r"Batches\.size must be an int >= 1, got 2\.5"),
        (lambda: Batches(size=True), ValueError, r"Batches\.size must be an int >= 1, got True"),
        (
            lambda: Batches(t_max=1.5),
            ValueError,
            r"0 <= t_min < t_max <= 1, got t_min=0\.0, t_max=1\.5; e\.g\.",
        ),
        (lambda: Batches(t_min=0.5, t_max=0.5), ValueError, r"t_min < t_max"),
        (lambda: Batches(t_min=-0.1), ValueError, r"0 <= t_min"),
        (lambda: Batches(t_max=math.nan), ValueError, r"Batches\.t_max must be finite, got nan"),
        (lambda: Batches(t_max="1"), TypeError, r"Batches\.t_max must be a real number, got str"),
        (
            lambda: Batches(minibatch_ot=1),
            TypeError,
            r"Batches\.minibatch_ot must be True or False, got 1",
        ),
        (
            lambda: Batches(seed=1.0),
            TypeError,
            r"Batches\.seed must be an int, got 1\.0; e\.g\. Batches\(seed=0\)",
        ),
        (
            lambda: Optimization(lr=0.0),
            ValueError,
            r"Optimization\.lr must be > 0, got 0\.0; e\.g\.",
        ),
        (lambda: Optimization(lr=-1e-3), ValueError, r"Optimization\.lr must be > 0"),
        (lambda: Optimization(lr=math.inf), ValueError, r"Optimization\.lr must be finite"),
        (
            lambda: Optimization(optimizer=lambda p: torch.optim.SGD(p, lr=0.1), lr=1e-2),
            ValueError,
            r"Optimization\.lr=0\.01 applies to the default Adam only.*set it there and leave lr out",
        ),
        (
            lambda: Optimization(optimizer="adam"),
            TypeError,
            r"Optimization\.optimizer must be None \(Adam\), an Optimizer or a factory",
        ),
        (
            lambda: Optimization(lr_schedule="step"),
            ValueError,
            r"Optimization\.lr_schedule must be one of \(None, 'cosine'\), got 'step'",
        ),
        (
            lambda: Optimization(max_grad_norm=0),
            ValueError,
            r"Optimization\.max_grad_norm must be > 0 or None, got 0; e\.g\.",
        ),
        (
            lambda: Optimization(max_grad_norm=math.nan),
            ValueError,
            r"Optimization\.max_grad_norm must be finite",
        ),
        (
            lambda: Monitor(every=0),
            ValueError,
            r"Monitor\.every must be an int >= 1, got 0; e\.g\. Monitor\(every=100\)",
        ),
        (lambda: Monitor(progress="yes"), TypeError, r"Monitor\.progress must be True or False"),
        (
            lambda: Monitor(callback=3),
            TypeError,
            r"Monitor\.callback must be callable or None, got int",
        ),
        (
            lambda: Checkpointing(3),
            TypeError,
            r"Checkpointing\.file must be a str or a path, got int",
        ),
        (
            lambda: Checkpointing("a.pt", every=0),
            ValueError,
            r"Checkpointing\.every must be an int >= 1",
        ),
        (
            lambda: Checkpointing("a.pt", resume=None),
            TypeError,
            r"Checkpointing\.resume must be True or False",
        ),
    ],
)
def test_bad_values_are_refused_when_made(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("option", [Batches(), Optimization(), Monitor(), Checkpointing("a.pt")])
def test_options_are_frozen(option):
    name = dataclasses.fields(option)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(option, name, getattr(option, name))
    assert dataclasses.replace(option) == option  # a changed copy is made with replace


def test_optimization_builds_adam_or_yours():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt, scheduler = Optimization().build(params, steps=10)
    assert isinstance(opt, torch.optim.Adam) and opt.param_groups[0]["lr"] == 1e-3
    assert scheduler is None
    opt, scheduler = Optimization(lr=0.5, lr_schedule="cosine").build(params, steps=10)
    assert opt.param_groups[0]["lr"] == 0.5 and scheduler is not None
    sgd = torch.optim.SGD(params, lr=0.1)
    assert Optimization(optimizer=sgd).build(params, steps=1)[0] is sgd
    with pytest.raises(
        TypeError, match=r"optimizer\(params\) must return a torch\.optim\.Optimizer"
    ):
        Optimization(optimizer=lambda p: "not one").build(params, steps=1)


def test_checkpointing_checks_its_folder(tmp_path):
    Checkpointing(tmp_path / "run.pt").check_writable()
    with pytest.raises(ValueError, match="is a folder; give a file name"):
        Checkpointing(tmp_path).check_writable()
    with pytest.raises(ValueError, match="does not exist; create it first"):
        Checkpointing(tmp_path / "missing" / "run.pt").check_writable()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="is not writable"):
            Checkpointing(locked / "run.pt").check_writable()


def test_the_package_exports_them():
    assert cnftools.Batches is Batches and cnftools.Optimization is Optimization
    assert cnftools.Monitor is Monitor and cnftools.Checkpointing is Checkpointing
