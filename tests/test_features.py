"""A field's time features (cnftools/training/features.py): TimeFeatures checks its values when
made and round-trips through the stored config of cnftools 0.1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import cnftools
from cnftools.training.features import TimeEmbedding, TimeFeatures


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"kind": "learned"},
            r"TimeFeatures\.kind must be one of \('sinusoidal', 'fourier', 'linear'\), got 'learned'; e\.g\.",
        ),
        ({"features": 0}, r"TimeFeatures\.features must be an int >= 1, got 0; e\.g\."),
        ({"features": "13"}, r"TimeFeatures\.features must be an int >= 1, got '13'"),
        (
            {"kind": "linear", "features": 3},
            r"must be 1 for the linear embedding, got 3; use TimeFeatures\(\"linear\", 1\)",
        ),
        (
            {"kind": "fourier", "features": 2},
            r"must be >= 3 for a fourier embedding, got 2; e\.g\.",
        ),
        ({"max_frequency": 0.5}, r"TimeFeatures\.max_frequency must be a number >= 1, got 0\.5"),
        ({"kind": "fourier", "scale": 0.0}, r"TimeFeatures\.scale must be a number > 0, got 0\.0"),
        ({"seed": 1.5}, r"TimeFeatures\.seed must be an int, got 1\.5"),
    ],
)
def test_bad_time_features_are_refused_when_made(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TimeFeatures(**kwargs)


def test_settings_a_kind_does_not_read_are_not_checked():
    """As in 0.1 (so that its stored configs load): a Fourier embedding ignores max_frequency, a
    sinusoidal one the scale."""
    assert TimeFeatures("fourier", 7, max_frequency=0.5).kind == "fourier"
    assert TimeFeatures("sinusoidal", 7, scale=-1.0).kind == "sinusoidal"


def test_stored_config_round_trip():
    time = TimeFeatures("fourier", 9, max_frequency=2.0, scale=0.5, seed=4)
    stored = {"hidden": [8], **time.config()}
    assert time.config() == {
        "time_embedding": "fourier",
        "time_features": 9,
        "time_max_frequency": 2.0,
        "time_scale": 0.5,
        "time_seed": 4,
    }
    assert TimeFeatures.pop_config(stored) == time
    assert stored == {"hidden": [8]}  # the time_* entries were taken out
    assert TimeFeatures.pop_config({}) == TimeFeatures()  # missing entries: the defaults


def test_frozen_and_used_by_the_fields():
    time = TimeFeatures(features=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        time.features = 7  # type: ignore[misc]
    field = cnftools.MLPField(2, hidden=(4,), time=time)
    assert field.net[0].in_features == 2 + 5
    assert field.time_embedding(torch.zeros(3)).shape == (3, 5)


def test_time_embedding_takes_only_time_features():
    with pytest.raises(TypeError, match=r"time must be a TimeFeatures, got str"):
        TimeEmbedding("sinusoidal")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"time must be a TimeFeatures, got dict"):
        cnftools.ConvField(1, time={"features": 5})  # type: ignore[arg-type]
