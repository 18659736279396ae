"""MLPField: shapes, time handling, smoothness guard, config round trip, dtype/device."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ---------------------------------------------------------------------------------------------
# Conditioning: MLPField(num_classes= | cond_dim=) and ConditionEmbedding.
def test_class_conditional_mlp_uses_the_label():
    torch.manual_seed(0)
    v = cnftools.MLPField(2, hidden=(8,), num_classes=3).double()
    x = torch.randn(1, 2, dtype=F64).expand(3, 2)
    out = v(x, 0.5, y=torch.tensor([0, 1, 2]))
    assert out.shape == (3, 2)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    # one int label for every row is the same as a (B,) tensor of it (same float ops: bitwise)
    assert torch.equal(v(x, 0.5, y=1), v(x, 0.5, y=torch.ones(3, dtype=torch.long)))
    assert torch.equal(v(x, 0.5, y=1), v(x, 0.5, y=torch.tensor(1)))


def test_vector_conditional_mlp():
    torch.manual_seed(0)
    v = cnftools.MLPField(3, hidden=(8,), cond_dim=2).double()
    x = torch.randn(4, 3, dtype=F64)
    cond = torch.randn(4, 2, dtype=F64)
    out = v(x, 0.5, y=cond)
    assert out.shape == (4, 3)
    # the condition enters as [x, e(t), y] in the first layer: check against the layer by hand
    first = v.net[0]
    inputs = torch.cat([x, v.time_embedding(torch.full((4,), 0.5, dtype=F64)), cond], dim=1)
    # same ops in the same order: equal up to float64 roundoff of the reassociated matmul, 1e-12
    torch.testing.assert_close(v.net[1:](first(inputs)), out, rtol=1e-12, atol=1e-12)
    # a float32 condition is cast to the field's dtype (like t)
    assert v(x, 0.5, y=cond.float()).dtype == F64
    # one vector for every row
    assert torch.equal(v(x, 0.5, y=cond[0]), v(x, 0.5, y=cond[:1].expand(4, 2)))


@pytest.mark.parametrize("make", ["mlp", "conv"])
def test_conditioning_contract_is_enforced(make):
    if make == "mlp":
        cond = cnftools.MLPField(4, hidden=(8,), num_classes=3)
        plain = cnftools.MLPField(4, hidden=(8,))
        x = torch.randn(2, 4)
    else:
        cond = cnftools.ConvField(1, hidden=(4,), num_classes=3)
        plain = cnftools.ConvField(1, hidden=(4,))
        x = torch.randn(2, 1, 2, 2)
    with pytest.raises(TypeError, match=r"is conditional \(num_classes=3\) and needs y"):
        cond(x, 0.5)
    with pytest.raises(TypeError, match="is unconditional but was given y"):
        plain(x, 0.5, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels in 0..2, got values in \[0, 3\]"):
        cond(x, 0.5, y=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"class label in 0..2, got -1"):
        cond(x, 0.5, y=-1)
    with pytest.raises(TypeError, match="integer class labels"):
        cond(x, 0.5, y=torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="integer class labels"):
        cond(x, 0.5, y=True)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\)"):
        cond(x, 0.5, y=torch.tensor([0, 1, 2]))


def test_condition_embedding_arguments():
    with pytest.raises(ValueError, match="exactly one of num_classes"):
        cnftools.MLPField(2, num_classes=3, cond_dim=2)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        cnftools.MLPField(2, num_classes=0)
    with pytest.raises(TypeError, match="cond_dim must be an int"):
        cnftools.MLPField(2, cond_dim=2.0)
    v = cnftools.MLPField(2, hidden=(4,), cond_dim=3)
    x = torch.randn(5, 2)
    with pytest.raises(TypeError, match=r"floating tensor of shape \(B, 3\)"):
        v(x, 0.5, y=torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, cond_dim\) = \(5, 3\)"):
        v(x, 0.5, y=torch.zeros(4, 3))


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 4, "class_features": 5}, {"cond_dim": 2}, {}], ids=str
)
def test_conditional_config_round_trips_through_checkpoints(tmp_path, kwargs):
    torch.manual_seed(0)
    v = cnftools.MLPField((1, 2, 2), hidden=(8,), **kwargs).double()
    file = tmp_path / "m.pt"
    cnftools.save_checkpoint(file, v, cnftools.OTPath(0.1))
    ckpt = cnftools.load_checkpoint(file)
    assert ckpt.field.config() == v.config()
    x = torch.randn(3, 1, 2, 2, dtype=F64)
    y = {"num_classes": torch.tensor([0, 3, 1]), "cond_dim": torch.randn(3, 2, dtype=F64)}
    extras = {"y": y[next(iter(kwargs))]} if kwargs else {}
    assert torch.equal(ckpt.field(x, 0.4, **extras), v(x, 0.4, **extras))  # bitwise: same ops


def test_config_without_conditioning_entries_builds_an_unconditional_field():
    # configs written before conditioning existed have no num_classes/cond_dim entries
    old = {k: v for k, v in cnftools.MLPField(2, hidden=(4,)).config().items()}
    for key in ("num_classes", "cond_dim", "class_features"):
        old.pop(key)
    assert cnftools.MLPField.from_config(old).condition is None


# ---------------------------------------------------------------------------------------------
# ConvField
@pytest.mark.parametrize("shape", [(3, 1, 8, 8), (2, 3, 5, 7), (1, 2, 1, 1)])
def test_conv_field_shapes_and_dtype(shape, dtype):
    torch.manual_seed(0)
    v = cnftools.ConvField(shape[1], hidden=(4, 6)).to(dtype)
    x = torch.randn(shape, dtype=dtype)
    out = v(x, torch.rand(shape[0], dtype=dtype))
    assert out.shape == shape and out.dtype == dtype


def test_conv_field_time_forms_agree_and_time_matters():
    torch.manual_seed(0)
    v = cnftools.ConvField(1, hidden=(4,)).double()
    x = torch.randn(3, 1, 4, 4, dtype=F64)
    a = v(x, 0.25)
    for t in (torch.tensor(0.25, dtype=F64), torch.full((3,), 0.25, dtype=F64)):
        assert torch.equal(a, v(x, t))  # same time values: bitwise
    assert not torch.equal(a, v(x, 0.75))


@settings(max_examples=10)
@given(
    batch=st.integers(1, 4),
    height=st.integers(1, 5),
    width=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_conv_field_rows_are_independent(batch, height, width, seed):
    # Invariant of every velocity field: row b of v(x, t, y) depends on (x[b], t[b], y[b]) only.
    torch.manual_seed(seed)
    v = cnftools.ConvField(2, hidden=(3, 3), num_classes=3).double()
    x = torch.randn(batch, 2, height, width, dtype=F64)
    t = torch.rand(batch, dtype=F64)
    y = torch.randint(0, 3, (batch,))
    out = v(x, t, y=y)
    rows = torch.cat([v(x[b : b + 1], t[b : b + 1], y=y[b : b + 1]) for b in range(batch)])
    # conv kernels may pick other algorithms per batch size: equal up to float64 roundoff, 1e-12
    torch.testing.assert_close(out, rows, rtol=1e-12, atol=1e-12)


def test_conv_field_padding_keeps_shape_and_local_receptive_field():
    # With one hidden 3x3 layer and a 3x3 output conv, pixel (0, 0) sees only pixels within
    # Chebyshev distance 2: perturbing pixel (4, 4) leaves output (0, 0) unchanged (exactly).
    torch.manual_seed(0)
    v = cnftools.ConvField(1, hidden=(4,)).double()
    x = torch.randn(1, 1, 6, 6, dtype=F64)
    bumped = x.clone()
    bumped[0, 0, 4, 4] += 1.0
    assert torch.equal(v(x, 0.5)[0, 0, 0, 0], v(bumped, 0.5)[0, 0, 0, 0])
    assert not torch.equal(v(x, 0.5)[0, 0, 3, 3], v(bumped, 0.5)[0, 0, 3, 3])


@pytest.mark.parametrize("method", ["exact", "loop"])
def test_conv_field_divergence_matches_jacobian_trace(method):
    torch.manual_seed(0)
    v = cnftools.ConvField(1, hidden=(4, 4), num_classes=2, activation="tanh").double()
    x = torch.randn(2, 1, 4, 4, dtype=F64)
    t = torch.tensor([0.3, 0.8], dtype=F64)
    y = torch.tensor([1, 0])

    def field(z, tt):
        return v(z, tt, y=y)

    div = cnftools.divergence(field, x, t, method=method)
    for b in range(2):
        jac = torch.autograd.functional.jacobian(
            lambda z, b=b: v(z[None], t[b : b + 1], y=y[b : b + 1])[0], x[b]
        )
        trace = jac.reshape(16, 16).diagonal().sum()
        # two autograd routes to the same 16 derivatives: float64 roundoff, 1e-10 absolute
        torch.testing.assert_close(div[b], trace, rtol=0, atol=1e-10)


def test_conv_field_vector_condition_and_config_round_trip():
    torch.manual_seed(0)
    v = cnftools.ConvField(
        2, hidden=(4, 4), kernel_size=5, cond_dim=3, activation="gelu", time_seed=2
    ).double()
    w = cnftools.ConvField.from_config(v.config(), dtype=F64)
    w.load_state_dict(v.state_dict())
    assert w.config() == v.config()
    x = torch.randn(2, 2, 3, 3, dtype=F64)
    cond = torch.randn(2, 3, dtype=F64)
    assert torch.equal(v(x, 0.4, y=cond), w(x, 0.4, y=cond))  # same weights, same ops: bitwise
    assert not torch.equal(v(x, 0.4, y=cond), v(x, 0.4, y=-cond))


def test_conv_field_zero_init_and_gradients():
    v = cnftools.ConvField(1, hidden=(4,), zero_init_output=True)
    assert torch.equal(v(torch.randn(2, 1, 3, 3), 0.5), torch.zeros(2, 1, 3, 3))
    torch.manual_seed(0)
    v = cnftools.ConvField(1, hidden=(4, 4), num_classes=2)
    v(torch.randn(2, 1, 3, 3), torch.rand(2), y=torch.tensor([0, 1])).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in v.parameters())


def test_conv_field_bad_arguments():
    with pytest.raises(ValueError, match="channels must be >= 1"):
        cnftools.ConvField(0)
    with pytest.raises(ValueError, match="at least one hidden layer"):
        cnftools.ConvField(1, hidden=())
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        cnftools.ConvField(1, kernel_size=4)
    with pytest.raises(ValueError, match="not smooth"):
        cnftools.ConvField(1, activation="relu")
    v = cnftools.ConvField(3, hidden=(4,))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) with C = 3"):
        v(torch.randn(2, 1, 4, 4), 0.5)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        v(torch.randn(2, 48), 0.5)
    with pytest.raises(TypeError, match="dtype"):
        v(torch.randn(2, 3, 4, 4, dtype=F64), 0.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        v(torch.randn(2, 3, 4, 4), 1.5)
