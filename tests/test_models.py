"""MLPField: shapes, time handling, smoothness guard, config round trip, dtype/device."""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path

import pytest
import torch

import cnftools
from cnftools.training.features import TIME_EMBEDDINGS, TimeEmbedding
from cnftools.training.models import ACTIVATIONS

F64 = torch.float64


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("embedding", TIME_EMBEDDINGS)
def test_shapes_and_dtype(activation, embedding, dtype):
    features = 1 if embedding == "linear" else 9
    time = cnftools.TimeFeatures(embedding, features)
    v = cnftools.MLPField(3, hidden=(16, 16), activation=activation, time=time).to(dtype)
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
    with pytest.raises(ValueError, match=r"TimeFeatures\.kind must be one of"):
        cnftools.MLPField(2, time=cnftools.TimeFeatures("learned"))
    with pytest.raises(TypeError, match="time must be a TimeFeatures"):
        cnftools.MLPField(2, time="fourier")
    with pytest.raises(ValueError, match="dim must be an int >= 1"):
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
        time=cnftools.TimeFeatures("fourier", 7, seed=3),
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
    emb = TimeEmbedding(cnftools.TimeFeatures("sinusoidal", 5, max_frequency=4.0)).double()
    t = torch.tensor([0.5], dtype=F64)
    expected = [0.5, math.sin(math.pi / 2), math.sin(2 * math.pi), math.cos(math.pi / 2), 1.0]
    # frequencies kept in float64: roundoff of sin/cos only, 1e-15
    torch.testing.assert_close(emb(t)[0], torch.tensor(expected, dtype=F64), rtol=0, atol=1e-15)


def test_gradients_flow_to_all_parameters():
    torch.manual_seed(0)
    v = cnftools.MLPField(2, hidden=(8, 8), activation="tanh")
    v(torch.randn(4, 2), torch.rand(4)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in v.parameters())


# --- conditioning and ConvField ------------------------------------------------------------------


def test_class_conditional_mlp_depends_on_the_label_and_round_trips(tmp_path):
    torch.manual_seed(0)
    v = cnftools.MLPField(3, hidden=(16,), num_classes=4, class_features=5).double()
    x = torch.randn(4, 3, dtype=F64)
    y = torch.tensor([0, 1, 2, 3])
    out = v(x, 0.3, y=y)
    assert out.shape == (4, 3)
    # the same point with another label gives another velocity
    assert not torch.equal(out, v(x, 0.3, y=torch.tensor([1, 1, 2, 3])))
    assert torch.equal(out[1:], v(x, 0.3, y=torch.tensor([1, 1, 2, 3]))[1:])
    cnftools.save_checkpoint(tmp_path / "c.pt", v)
    loaded = cnftools.load_checkpoint(tmp_path / "c.pt").field
    assert loaded.config() == v.config()
    assert torch.equal(loaded(x, 0.3, y=y), out)  # bitwise: same weights, same ops


def test_vector_conditional_mlp():
    torch.manual_seed(0)
    v = cnftools.MLPField(2, hidden=(8,), cond_dim=3).double()
    x, y = torch.randn(5, 2, dtype=F64), torch.randn(5, 3, dtype=F64)
    assert v(x, 0.5, y=y).shape == (5, 2)
    assert not torch.equal(v(x, 0.5, y=y), v(x, 0.5, y=2 * y))


def test_unconditional_config_and_state_dict_are_unchanged():
    """Old checkpoints still load: an unconditional field has no new parameters."""
    v = cnftools.MLPField(2, hidden=(8,))
    assert set(v.state_dict()) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    old_config = {k: w for k, w in v.config().items() if k not in ("num_classes", "cond_dim")}
    old_config.pop("class_features")
    assert cnftools.MLPField.from_config(old_config).config() == v.config()


@pytest.mark.parametrize(
    ("kwargs", "y", "error", "match"),
    [
        ({}, torch.tensor([0, 1]), ValueError, "unconditional but got y"),
        ({"num_classes": 3}, None, ValueError, "pass y="),
        ({"num_classes": 3}, torch.tensor([0, 3]), ValueError, r"lie in \[0, 3\)"),
        ({"num_classes": 3}, torch.tensor([-1, 0]), ValueError, r"lie in \[0, 3\)"),
        ({"num_classes": 3}, torch.tensor([0.0, 1.0]), TypeError, "integer class labels"),
        ({"num_classes": 3}, torch.tensor([0, 1, 2]), ValueError, r"shape \(B,\)"),
        ({"cond_dim": 2}, torch.zeros(2, 3), ValueError, r"\(B, cond_dim\)"),
        ({"cond_dim": 2}, torch.zeros(2, 2, dtype=F64), TypeError, "x's dtype"),
    ],
)
def test_bad_conditioning_is_named(kwargs, y, error, match):
    v = cnftools.MLPField(2, hidden=(4,), **kwargs)
    with pytest.raises(error, match=match):
        v(torch.zeros(2, 2), 0.5, y=y)


def test_conditioning_arguments_are_checked():
    with pytest.raises(ValueError, match="at most one of num_classes and cond_dim"):
        cnftools.MLPField(2, num_classes=3, cond_dim=2)
    with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
        cnftools.MLPField(2, num_classes=0)


def test_conv_field_shapes_and_translation_equivariance_in_the_interior():
    """3×3 convolutions with padding: shifting an image shifts the velocity away from the border."""
    from cnftools.training.models import ConvField

    torch.manual_seed(0)
    v = ConvField(2, hidden=(8, 8)).double()
    x = torch.randn(3, 2, 12, 12, dtype=F64)
    out = v(x, torch.rand(3, dtype=F64))
    assert out.shape == x.shape and out.dtype == F64
    t = 0.4
    shifted = v(torch.roll(x, 1, dims=3), t)
    # 3 layers of 3×3: output column j sees input columns j−3..j+3; for j in 4..7 neither the
    # wrapped column 0 nor the zero padding beyond either border is in view
    expected = torch.roll(v(x, t), 1, dims=3)
    assert torch.allclose(shifted[..., 4:8], expected[..., 4:8], rtol=0, atol=1e-12)
    assert not torch.allclose(shifted[..., :1], expected[..., :1], rtol=0, atol=1e-12)


def test_conv_field_exact_divergence_matches_the_jacobian_trace():
    """cnftools.divergence of a conditional ConvField = trace of its full Jacobian, 1e-10 (float64
    autograd on both sides); labels reach it through a closure."""
    from cnftools.training.models import ConvField

    torch.manual_seed(0)
    v = ConvField(1, hidden=(4,), num_classes=3).double()
    x = torch.randn(2, 1, 4, 4, dtype=F64)
    y = torch.tensor([0, 2])
    field = lambda z, t: v(z, t, y=y)  # noqa: E731
    div = cnftools.divergence(field, x, 0.5)
    traces = []
    for i in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda z, i=i: v(z[None], 0.5, y=y[i : i + 1])[0], x[i]
        )
        traces.append(jac.reshape(16, 16).diagonal().sum())
    assert torch.allclose(div, torch.stack(traces), rtol=1e-10, atol=1e-10)


def test_conv_field_checkpoint_round_trip(tmp_path):
    """A ConvField checkpoint loads into a field built from its stored config (field=)."""
    from cnftools.training.models import ConvField

    torch.manual_seed(0)
    v = ConvField(1, hidden=(4, 4), num_classes=10).double()
    cnftools.save_checkpoint(tmp_path / "conv.pt", v)
    stored = torch.load(tmp_path / "conv.pt", weights_only=True)
    rebuilt = ConvField.from_config(stored["model"]["config"], dtype=F64)
    loaded = cnftools.load_checkpoint(tmp_path / "conv.pt", field=rebuilt).field
    x, y = torch.randn(2, 1, 8, 8, dtype=F64), torch.tensor([1, 9])
    assert torch.equal(loaded(x, 0.2, y=y), v(x, 0.2, y=y))


def test_conv_field_refuses_bad_input():
    from cnftools.training.models import ConvField

    v = ConvField(1, hidden=(4,))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) with C = 1"):
        v(torch.zeros(2, 3, 4, 4), 0.5)
    with pytest.raises(TypeError, match=r"parameters are torch\.float32"):
        v(torch.zeros(2, 1, 4, 4, dtype=F64), 0.5)
    with pytest.raises(ValueError, match="smooth"):
        ConvField(1, activation="relu")


# --- grouped time options (issue 19) and cnftools 0.1's checkpoints ------------------------------
DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "train_reference_0_1.json").read_text())


def _digest(module: torch.nn.Module) -> str:
    """SHA-256 of every state_dict entry's name and bytes (as tests/data/make_train_reference.py)."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _reference_fields() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    fourier = cnftools.TimeFeatures("fourier", 7, scale=2.0, seed=3)
    mlp = cnftools.MLPField(
        2, (8,), time=fourier, num_classes=3, class_features=4, activation="tanh", dtype=F64
    )
    torch.manual_seed(0)
    slow = cnftools.TimeFeatures(features=5, max_frequency=4.0)
    conv = cnftools.ConvField(1, (4,), time=slow, cond_dim=2, dtype=F64)
    return {"mlp": mlp, "conv": conv}


@pytest.mark.parametrize("name", ["mlp", "conv"])
def test_time_features_build_the_fields_of_the_flat_arguments(name):
    """time=TimeFeatures(...) gives 0.1's flat time_* arguments' field: the same stored config
    (so checkpoints keep their format) and bit-identical weights from the same seed (numbers
    written by 0.1's own code, tests/data/make_train_reference.py)."""
    field = _reference_fields()[name]
    assert field.config() == REFERENCE[name]["config"]
    assert _digest(field) == REFERENCE[name]["weights"]


def test_a_checkpoint_written_by_0_1_loads():
    """tests/data/mlpfield_written_by_0_1.pt was saved by cnftools 0.1 (format version 2): it
    loads, rebuilt from its stored flat config, with its weights bit for bit."""
    ckpt = cnftools.load_checkpoint(DATA / "mlpfield_written_by_0_1.pt")
    assert ckpt.field.config() == REFERENCE["mlp"]["config"]
    assert _digest(ckpt.field) == REFERENCE["mlp"]["weights"]
    assert ckpt.field.time_embedding.settings == cnftools.TimeFeatures(
        "fourier", 7, scale=2.0, seed=3
    )
    x = torch.randn(3, 2, dtype=F64)
    y = torch.tensor([0, 1, 2])
    assert torch.equal(ckpt.field(x, 0.3, y=y), _reference_fields()["mlp"](x, 0.3, y=y))


@pytest.mark.parametrize("cls", [cnftools.MLPField, cnftools.ConvField])
def test_fields_take_at_most_twelve_parameters_and_no_flat_time_options(cls):
    parameters = inspect.signature(cls).parameters
    assert len(parameters) <= 12
    assert not [name for name in parameters if name.startswith("time_")]
    with pytest.raises(TypeError, match="time_features"):
        cls(2, time_features=5)
