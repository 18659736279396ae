"""MLPField: shapes, time handling, smoothness guard, config round trip, dtype/device."""

from __future__ import annotations

import math

import pytest
import torch

import cnftools
from cnftools.models import ACTIVATIONS, TIME_EMBEDDINGS, TimeEmbedding

F64 = torch.float64


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("embedding", TIME_EMBEDDINGS)
def test_shapes_and_dtype(activation, embedding, dtype):
    features = 1 if embedding == "linear" else 9
    v = cnftools.MLPField(
        3, hidden=(16, 16), activation=activation, time_embedding=embedding, time_features=features
    ).to(dtype)
    x = torch.randn(5, 3, dtype=dtype)
    out = v(x, torch.rand(5, dtype=dtype))
    assert out.shape == (5, 3) and out.dtype == dtype


def test_event_shapes_by_flattening():
    torch.manual_seed(0)
    v = cnftools.MLPField(12, hidden=(8,)).double()
    x = torch.randn(4, 3, 4, dtype=F64)
    out = v(x, 0.3)
    assert out.shape == (4, 3, 4)
    # flattening is a pure reshape: the same numbers as on the flat input (bitwise)
    assert torch.equal(out.reshape(4, 12), v(x.reshape(4, 12), 0.3))
    shaped = cnftools.MLPField((3, 4), hidden=(8,)).double()
    assert shaped(x, 0.3).shape == (4, 3, 4)
    with pytest.raises(ValueError, match="event shape"):
        shaped(x.reshape(4, 12), 0.3)


def test_time_forms_agree():
    torch.manual_seed(0)
    v = cnftools.MLPField(2, hidden=(8,)).double()
    x = torch.randn(6, 2, dtype=F64)
    a = v(x, 0.25)
    b = v(x, torch.tensor(0.25, dtype=F64))
    c = v(x, torch.full((6,), 0.25, dtype=F64))
    d = v(x, torch.full((6,), 0.25, dtype=torch.float32))  # 0.25 is exact in float32
    for other in (b, c, d):
        assert torch.equal(a, other)  # same time values -> bitwise equal


def test_time_dependence_and_per_sample_time():
    torch.manual_seed(0)
    v = cnftools.MLPField(2, hidden=(8,)).double()
    x = torch.randn(1, 2, dtype=F64).expand(2, 2)
    out = v(x, torch.tensor([0.1, 0.9], dtype=F64))
    assert not torch.equal(out[0], out[1])
    # each row uses its own time: row 1 equals a lone evaluation at 0.9 (same float ops)
    torch.testing.assert_close(out[1:], v(x[1:], 0.9), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("bad", ["relu", "ReLU", "leaky_relu", "elu"])
def test_non_smooth_activation_refused(bad):
    with pytest.raises(ValueError, match="not smooth"):
        cnftools.MLPField(2, activation=bad)


def test_bad_arguments():
    with pytest.raises(ValueError, match="activation must be one of"):
        cnftools.MLPField(2, activation="sigmoidish")
    with pytest.raises(ValueError, match="time_embedding must be one of"):
        cnftools.MLPField(2, time_embedding="learned")
    with pytest.raises(ValueError, match="dim must be >= 1"):
        cnftools.MLPField(0)
    with pytest.raises(TypeError, match="hidden must be a sequence"):
        cnftools.MLPField(2, hidden=64)
    v = cnftools.MLPField(2, hidden=(4,))
    with pytest.raises(ValueError, match="dim=2"):
        v(torch.randn(3, 5), 0.5)
    with pytest.raises(ValueError, match=r"shape \(B, \*event\)"):
        v(torch.randn(2), 0.5)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(3,\)"):
        v(torch.randn(3, 2), torch.rand(4))
    with pytest.raises(TypeError, match="dtype"):
        v(torch.randn(3, 2, dtype=F64), 0.5)


def test_config_round_trip_and_weights_only(tmp_path):
    torch.manual_seed(0)
    v = cnftools.MLPField(
        (1, 2, 2),
        hidden=(8, 8),
        activation="softplus",
        time_embedding="fourier",
        time_features=7,
        time_seed=3,
    ).double()
    cfg = v.config()
    torch.save({"cfg": cfg, "state": v.state_dict()}, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=True)
    w = cnftools.MLPField.from_config(loaded["cfg"], dtype=F64)
    w.load_state_dict(loaded["state"])
    assert w.config() == cfg
    x = torch.randn(3, 1, 2, 2, dtype=F64)
    assert torch.equal(v(x, 0.4), w(x, 0.4))  # same weights, same ops: bitwise


def test_zero_init_output():
    v = cnftools.MLPField(3, hidden=(8,), zero_init_output=True)
    assert torch.equal(v(torch.randn(2, 3), 0.5), torch.zeros(2, 3))


def test_sinusoidal_embedding_by_hand():
    # K = 2 frequencies: ω = (π, π·ω_max); features [t, sin ω t, cos ω t]
    emb = TimeEmbedding("sinusoidal", 5, max_frequency=4.0).double()
    t = torch.tensor([0.5], dtype=F64)
    expected = [0.5, math.sin(math.pi / 2), math.sin(2 * math.pi), math.cos(math.pi / 2), 1.0]
    # frequencies kept in float64: roundoff of sin/cos only, 1e-15
    torch.testing.assert_close(emb(t)[0], torch.tensor(expected, dtype=F64), rtol=0, atol=1e-15)


def test_gradients_flow_to_all_parameters():
    torch.manual_seed(0)
    v = cnftools.MLPField(2, hidden=(8, 8), activation="tanh")
    v(torch.randn(4, 2), torch.rand(4)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in v.parameters())
