"""Tests of cnftools.interop: as_velocity and from_diffusers, against closed-form marginals."""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
from torch import nn

import cnftools
from cnftools import SolverConfig
from cnftools.cases import DATA_CASES
from cnftools.interop import PredictionField, as_velocity, from_diffusers
from cnftools.validation.diffusion import exact_posterior_mean

F64 = torch.float64
CASE = DATA_CASES["gaussian d=3"]


def _draw(shape, seed, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _relative(got, expected):
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1.0))


def _exact_model(path, prediction, tau_of_model_time):
    """A model of CASE's data on ``path`` predicting ``prediction`` from the model's own time."""
    marginal = CASE.marginal(path)

    def model(x, model_time):
        t = 1 - tau_of_model_time(model_time)
        if prediction == "velocity":
            return marginal.velocity(x, t)
        score = marginal.score(x, t)
        if prediction == "score":
            return score
        if prediction == "epsilon":
            return -torch.sqrt(path.noise_variance(t))[:, None] * score
        return exact_posterior_mean(CASE, path, x, t)

    return model, marginal


# --- as_velocity ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["velocity", "epsilon", "data", "score"])
@pytest.mark.parametrize(
    "path", [cnftools.VPPath(0.1, 20.0), cnftools.VEPath(0.1, 5.0), cnftools.OTPath(0.05)], ids=repr
)
@pytest.mark.parametrize("argument_order", ["x,t", "t,x"])
def test_as_velocity_of_exact_models_is_the_marginal_field(prediction, path, argument_order):
    """Exact predictions, model time τ·1000 = 1000(1 − t): the field is u_t, 1e-9 relative."""
    model, marginal = _exact_model(path, prediction, lambda label: label / 1000)
    if argument_order == "t,x":
        model_xt = model
        model = lambda label, x: model_xt(x, label)  # noqa: E731
    v = as_velocity(
        model,
        path,
        prediction=prediction,
        time=lambda t: 1000 * (1 - t),
        argument_order=argument_order,
    )
    x = 1.5 * _draw((12, 3), 0)
    t = torch.linspace(0.05, 0.95, 12, dtype=F64)
    assert _relative(v(x, t), marginal.velocity(x, t)) <= 1e-9


def test_as_velocity_is_a_module_and_reaches_the_model():
    net = nn.Linear(2, 2)
    v = as_velocity(lambda x, t: x, None)  # a plain function is fine too
    assert isinstance(v, nn.Module) and not list(v.parameters())
    field = as_velocity(lambda x, t: net(x), None)
    assert not list(field.parameters())  # a closure hides the module: nothing registered
    wrapper = as_velocity(net, cnftools.OTPath(0.1), prediction="data")
    assert isinstance(wrapper, PredictionField)
    assert [p.data_ptr() for p in wrapper.parameters()] == [p.data_ptr() for p in net.parameters()]
    wrapper = wrapper.to(F64)
    assert net.weight.dtype == F64


class _ConditionalModel(nn.Module):
    def forward(self, x, t, y=None, scale=1.0):
        return scale * (x + y[:, None].to(x.dtype))


def test_extras_reach_the_model():
    v = as_velocity(_ConditionalModel())
    x, y = torch.zeros(3, 2), torch.tensor([0, 1, 2])
    assert torch.equal(v(x, 0.5, y=y, scale=2.0), 2.0 * y[:, None].float().expand(3, 2))


def test_t_max_freezes_the_field_and_keeps_it_finite():
    path = cnftools.VPPath(0.1, 20.0)
    model, _ = _exact_model(path, "epsilon", lambda tau: tau)
    x = _draw((4, 3), 1)
    raw = as_velocity(model, path, prediction="epsilon", time=lambda t: 1 - t)
    with pytest.raises(ValueError, match=r"velocity_from_epsilon is singular at t = \[1.0"):
        raw(x, 1.0)
    clipped = as_velocity(model, path, prediction="epsilon", time=lambda t: 1 - t, t_max=0.999)
    assert torch.equal(clipped(x, 1.0), clipped(x, 0.999))
    assert bool(torch.isfinite(clipped(x, 1.0)).all())
    assert torch.equal(clipped(x, 0.5), raw(x, 0.5))


def test_log_likelihood_of_a_score_model_matches_the_closed_form():
    """A VP score model through as_velocity and log_likelihood: log q(x) within 1e-6 nats
    (dopri5 at 1e-9; the field is frozen on [1 − 1e-6, 1], which costs O(1e-8))."""
    path = cnftools.VPPath(0.1, 20.0)
    model, marginal = _exact_model(path, "score", lambda tau: tau)
    v = as_velocity(model, path, prediction="score", time=lambda t: 1 - t, t_max=1 - 1e-6)
    x = marginal.sample(4, 1.0, torch.Generator().manual_seed(0))
    log_prob = cnftools.log_likelihood(v, x, marginal.prior(), rtol=1e-9, atol=1e-9).log_prob
    assert float((log_prob - marginal.log_prob(x, 1.0)).abs().max()) <= 1e-6


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"model": 3}, TypeError, "model must be callable"),
        ({"prediction": "noise"}, ValueError, "prediction must be one of"),
        ({"prediction": "epsilon"}, TypeError, "needs the path"),
        ({"prediction": "score", "path": "VP"}, TypeError, "AffineGaussianPath"),
        ({"time": 1.0}, TypeError, "time must be None, a callable of t or .scalar."),
        ({"argument_order": "t x"}, ValueError, "argument_order must be one of"),
        ({"t_max": 1.5}, ValueError, r"t_max must lie in \(0, 1\]"),
        ({"t_max": "1"}, TypeError, "t_max must be None or a real number"),
    ],
)
def test_as_velocity_validates_its_arguments(kwargs, error, match):
    arguments = {"model": lambda x, t: x, "path": None} | kwargs
    model, path = arguments.pop("model"), arguments.pop("path")
    with pytest.raises(error, match=match):
        as_velocity(model, path, **arguments)


@pytest.mark.parametrize(
    ("output", "error", "match"),
    [
        (lambda x: (x,), TypeError, "must return a torch.Tensor"),
        (lambda x: x[:, :1], ValueError, r"returned shape \(2, 1\)"),
        (lambda x: x.double(), TypeError, "returned dtype torch.float64"),
    ],
)
def test_bad_model_outputs_are_named(output, error, match):
    v = as_velocity(lambda x, t: output(x), cnftools.OTPath(0.1), prediction="data")
    with pytest.raises(error, match=match):
        v(torch.zeros(2, 3), 0.5)


# --- from_diffusers with a diffusers-like model and config ----------------------------------------


def _scheduler(**changes):
    config = {
        "num_train_timesteps": 1000,
        "beta_schedule": "linear",
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "prediction_type": "epsilon",
        "trained_betas": None,
    } | changes
    return types.SimpleNamespace(config=config)


class _Output:
    def __init__(self, sample):
        self.sample = sample


class _ExactUNet(nn.Module):
    """An exact diffusers-style model of CASE on VP(0.1, 20): timestep label in, ``.sample`` out."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.path = cnftools.VPPath(0.1, 20.0)
        self.marginal = CASE.marginal(self.path)
        self.timesteps = []

    def forward(self, x, timestep, class_labels=None):
        self.timesteps.append(timestep)
        t = 1 - timestep / 999
        a = self.path.signal_scale(t)[:, None]
        s = torch.sqrt(self.path.noise_variance(t))[:, None]
        eps = -s * self.marginal.score(x, t)
        x0 = exact_posterior_mean(CASE, self.path, x, t)
        out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[self.kind]
        return _Output(out)


@pytest.mark.parametrize("kind", ["epsilon", "sample", "v_prediction"])
def test_from_diffusers_of_exact_models_is_the_marginal_field(kind):
    """Each prediction type, read at timestep 999(1 − t) on VP(N β_start, N β_end) = VP(0.1, 20),
    gives the marginal velocity, 1e-9 relative (the v conversion x̂₁ = a x − s v̂ is exact on VP,
    where a² + s² = 1)."""
    unet = _ExactUNet(kind)
    field, path = from_diffusers(unet, _scheduler(prediction_type=kind))
    assert isinstance(path, cnftools.VPPath)
    assert math.isclose(path.beta_min, 0.1, rel_tol=1e-12)
    assert math.isclose(path.beta_max, 20.0, rel_tol=1e-12)
    x = 1.5 * _draw((10, 3), 2)
    t = torch.linspace(0.0, 0.98, 10, dtype=F64)
    assert _relative(field(x, t), unet.marginal.velocity(x, t)) <= 1e-9
    assert torch.allclose(unet.timesteps[-1], 999 * (1 - t), rtol=0, atol=1e-12)


def test_from_diffusers_clips_time_near_the_data_end():
    unet = _ExactUNet("epsilon")
    field, _ = from_diffusers(unet, _scheduler(), eps=1e-5)
    x = _draw((1, 3), 0).expand(3, 3).clone()  # one point at three times
    out = field(x, torch.tensor([1.0, 1 - 1e-5, 0.5], dtype=F64))
    assert bool(torch.isfinite(out).all())
    assert torch.equal(out[0], out[1])
    assert torch.allclose(unet.timesteps[-1][:2], torch.full((2,), 999e-5, dtype=F64))


def test_from_diffusers_passes_class_labels():
    seen = {}

    def unet(x, timestep, class_labels=None):
        seen["labels"] = class_labels
        return torch.zeros_like(x)

    field, _ = from_diffusers(unet, _scheduler())
    labels = torch.tensor([1, 2])
    field(torch.zeros(2, 3), 0.5, class_labels=labels)
    assert seen["labels"] is labels


@pytest.mark.parametrize(
    ("scheduler", "error", "match"),
    [
        (object(), TypeError, r"\.config"),
        (_scheduler(beta_schedule="scaled_linear"), ValueError, "linear betas only"),
        (_scheduler(beta_schedule="squaredcos_cap_v2"), ValueError, "squaredcos_cap_v2"),
        (_scheduler(trained_betas=[0.1, 0.2]), ValueError, "trained_betas"),
        (_scheduler(rescale_betas_zero_snr=True), ValueError, "rescale_betas_zero_snr"),
        (_scheduler(prediction_type="flow"), ValueError, "prediction_type must be one of"),
        (_scheduler(num_train_timesteps=1), ValueError, "num_train_timesteps"),
        (_scheduler(beta_end=math.nan), ValueError, "beta_end must be a finite number"),
    ],
)
def test_from_diffusers_refuses_other_schedules(scheduler, error, match):
    with pytest.raises(error, match=match):
        from_diffusers(lambda x, t: x, scheduler)


def test_from_diffusers_refuses_bad_eps_and_unet():
    with pytest.raises(ValueError, match="eps must be a number in"):
        from_diffusers(lambda x, t: x, _scheduler(), eps=0.0)
    with pytest.raises(TypeError, match="unet must be callable"):
        from_diffusers(None, _scheduler())


# --- a real (tiny, random) diffusers UNet -------------------------------------------------------


def _tiny_unet(**kwargs):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **kwargs,
    ).double()


@pytest.mark.parametrize("scheduler_class", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_tiny_unet_field_is_finite_on_all_of_0_1(scheduler_class, prediction_type):
    diffusers = pytest.importorskip("diffusers")
    unet = _tiny_unet()
    scheduler = getattr(diffusers, scheduler_class)(prediction_type=prediction_type)
    field, path = from_diffusers(unet, scheduler)
    assert math.isclose(path.beta_min, 1000 * scheduler.config.beta_start)
    x = _draw((4, 1, 8, 8), 0)
    t = torch.tensor([0.0, 0.5, 1 - 1e-5, 1.0], dtype=F64)
    with torch.no_grad():
        out = field(x, t)
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
        # the same velocity by hand: timestep 999 (1 − t'), t' = min(t, 1 − 1e-5)
        tc = t.clamp(max=1 - 1e-5)
        pred = unet(x, 999 * (1 - tc)).sample
        tb = tc[:, None, None, None]
        if prediction_type == "epsilon":
            expected = path.velocity_from_epsilon(pred, x, tc)
        else:
            if prediction_type == "v_prediction":
                pred = path.signal_scale(tb) * x - path.noise_scale(tb) * pred
            expected = path.velocity_from_data(pred, x, tc)
    assert _relative(out, expected) <= 1e-12


def test_tiny_unet_refuses_a_cosine_schedule():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    with pytest.raises(ValueError, match="linear betas only"):
        from_diffusers(_tiny_unet(), scheduler)


def test_tiny_class_conditional_unet_log_likelihood():
    """A class-conditional tiny UNet: labels reach it as extras, and the ODE log-likelihood over a
    1×8×8 image is finite and depends on the label (4 rk4 steps: a smoke test, not accuracy).

    Hutchinson's divergence: the exact one's batched VJPs fail inside this UNet (reported)."""
    diffusers = pytest.importorskip("diffusers")
    unet = _tiny_unet(num_class_embeds=3)
    field, _ = from_diffusers(unet, diffusers.DDPMScheduler())
    x = _draw((2, 1, 8, 8), 3)
    gen = torch.Generator().manual_seed(0)
    results = []
    for label in (0, 2):
        labels = torch.full((2,), label)
        conditional = lambda x, t, labels=labels: field(x, t, class_labels=labels)  # noqa: E731
        with torch.no_grad():
            out = conditional(x, torch.full((2,), 0.3, dtype=F64))
        results.append(out)
        log_prob = cnftools.log_likelihood(
            conditional,
            x,
            config=SolverConfig("rk4", steps=4),
            estimator=cnftools.Hutchinson(generator=gen),
        ).log_prob
        assert log_prob.shape == (2,) and bool(torch.isfinite(log_prob).all())
    assert not torch.equal(results[0], results[1])


def test_tiny_unet_exact_divergence_falls_back_to_the_loop():
    """Batched VJPs fail inside a diffusers UNet ("NYI: querying is_contiguous inside of vmap");
    the exact divergence falls back to the loop of d backward passes, loudly (once per field, not
    once per call), and gives the loop's numbers exactly; the likelihood solve with the exact
    divergence then runs to a finite value."""
    diffusers = pytest.importorskip("diffusers")
    field, _ = from_diffusers(_tiny_unet(), diffusers.DDPMScheduler())
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="batched divergence failed"):
        auto = cnftools.divergence(field, x, 0.5)
    loop = cnftools.divergence(field, x, 0.5, cnftools.Exact("loop"))
    torch.testing.assert_close(auto, loop, rtol=0, atol=0)
    with warnings.catch_warnings():  # warned once per field (issue 21): not again per call
        warnings.simplefilter("error", RuntimeWarning)
        with torch.no_grad():
            log_p = cnftools.log_likelihood(field, x, config=SolverConfig("rk4", steps=2)).log_prob
            cnftools.log_likelihood(field, x, config=SolverConfig("rk4", steps=2))
    assert log_p.shape == (2,) and bool(torch.isfinite(log_p).all())
    other, _ = from_diffusers(_tiny_unet(), diffusers.DDPMScheduler())
    with pytest.warns(RuntimeWarning, match="batched divergence failed"):
        cnftools.divergence(other, x, 0.5)  # another field warns once for itself


# --- models that take one scalar time (torchcfm, torchdyn, torchdiffeq style) ------------------


class _ScalarTimeWrapper(nn.Module):
    """torchcfm's ``torch_wrapper`` convention: ``forward(t, x)`` with a 0-dim ``t``, appended to
    every row by ``t.repeat(x.shape[0])``; ``label`` (optional) is a per-row extra."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[int, ...]] = []

    def forward(self, t, x, label=None):
        self.calls.append(tuple(t.shape))
        out = self.net(torch.cat([x, t.repeat(x.shape[0])[:, None]], 1))
        return out if label is None else out * label[:, None]


def _time_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def _batch_time_field(net):
    """The same network called with one time per row: the reference for the scalar route."""
    return lambda x, t, label=None: (
        net(torch.cat([x, t[:, None]], 1)) * (1 if label is None else label[:, None])
    )


def test_scalar_time_model_log_likelihood_equals_the_per_row_field():
    """torchcfm-style wrapper through as_velocity(time="scalar"): the model sees 0-dim times only,
    and log p equals the per-row field's exactly (the same arithmetic on the same numbers, so
    tolerance 0)."""
    net = _time_net()
    model = _ScalarTimeWrapper(net)
    v = as_velocity(model, argument_order="t,x", time="scalar")
    x = _draw((50, 2), 1)
    config = SolverConfig("rk4", steps=8)
    got = cnftools.log_likelihood(v, x, config=config).log_prob
    expected = cnftools.log_likelihood(_batch_time_field(net), x, config=config).log_prob
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert set(model.calls) == {()}


def test_scalar_time_model_is_called_once_per_distinct_time_with_its_rows_and_extras():
    """Rows at different times (a training batch): one call per distinct time, each with that
    time's rows and per-row extras. The output equals the per-row field's to 1e-14 absolute
    (values O(1)): the matrix products run on fewer rows, and BLAS may round those differently
    (1 ulp measured)."""
    net = _time_net()
    model = _ScalarTimeWrapper(net)
    v = as_velocity(model, argument_order="t,x", time="scalar")
    x = _draw((6, 2), 2)
    t = torch.tensor([0.5, 0.1, 0.5, 0.9, 0.1, 0.5], dtype=F64)
    label = torch.arange(1.0, 7.0, dtype=F64)
    got = v(x, t, label=label)
    torch.testing.assert_close(got, _batch_time_field(net)(x, t, label), rtol=0, atol=1e-14)
    assert len(model.calls) == 3


def test_scalar_time_gradient_in_t_is_per_row():
    """With t requiring a gradient each row gets its own time (one call per row), so
    d(sum v)/dt_i is row i's own derivative, equal to the per-row field's to 1e-14 absolute
    (one-row products may round differently in BLAS, see above)."""
    net = _time_net()
    v = as_velocity(_ScalarTimeWrapper(net), argument_order="t,x", time="scalar")
    x = _draw((4, 2), 3)
    t = torch.full((4,), 0.3, dtype=F64, requires_grad=True)
    (got,) = torch.autograd.grad(v(x, t).sum(), t)
    t_ref = t.detach().clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(_batch_time_field(net)(x, t_ref).sum(), t_ref)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    ("argument_order", "match"),
    [
        ("t,x", r'one scalar time.*pass time="scalar"'),
        ("x,t", r'argument_order="t,x".*time="scalar"'),
    ],
)
def test_a_scalar_time_model_given_a_batch_time_gets_a_hint_naming_time_scalar(
    argument_order, match
):
    """The reproducer of issue 21: a (B,) time makes torchcfm's wrapper build B*B rows. The error
    names the model and points at time="scalar" (and at the argument order where that is wrong),
    without the generic field hint on top."""
    model = _ScalarTimeWrapper(_time_net())
    if argument_order == "x,t":
        xt = model
        model = lambda x, t: xt(t, x)  # noqa: E731 - a scalar model that is called as (x, t)
    v = as_velocity(model, argument_order=argument_order)
    with pytest.raises(RuntimeError, match=match) as info:
        cnftools.log_likelihood(v, _draw((20, 2), 4), config=SolverConfig("euler", steps=1))
    assert str(info.value).count("Hint:") == 1


def test_time_scalar_without_argument_order_t_x_gets_a_hint_naming_it():
    """torchcfm's wrapper with time="scalar" but the default argument order: the wrapper gets the
    0-dim time as x. Today's main raised a bare IndexError ("tuple index out of range") from
    inside the wrapper; the error now names the call and argument_order="t,x"."""
    v = as_velocity(_ScalarTimeWrapper(_time_net()), time="scalar")
    with pytest.raises(IndexError, match=r'argument_order="t,x"') as info:
        cnftools.log_likelihood(v, _draw((6, 2), 4), config=SolverConfig("euler", steps=1))
    assert str(info.value).count("Hint:") == 1


def test_the_field_hint_names_as_velocity_time_scalar():
    """A scalar-time model passed as a field directly: the generic hint names the wrapper call."""
    model = _ScalarTimeWrapper(_time_net())
    with pytest.raises(
        RuntimeError, match=r'as_velocity\(model, argument_order="t,x", time="scalar"\)'
    ):
        cnftools.log_likelihood(model, _draw((5, 2), 5), config=SolverConfig("euler", steps=1))


@pytest.mark.parametrize(
    ("time", "error", "match"),
    [
        ("scalars", ValueError, "time must be None, a callable of t or 'scalar'"),
        (3, TypeError, "time must be"),
    ],
)
def test_as_velocity_refuses_an_unknown_time(time, error, match):
    with pytest.raises(error, match=match):
        as_velocity(lambda x, t: x, time=time)


def test_real_torchcfm_wrapper_runs_through_time_scalar():
    """torchcfm's own torch_wrapper (optional dependency): log p equals the per-row field's
    exactly (tolerance 0: the same arithmetic)."""
    utils = pytest.importorskip("torchcfm.utils")
    net = _time_net()
    v = as_velocity(utils.torch_wrapper(net), argument_order="t,x", time="scalar")
    x = _draw((30, 2), 6)
    config = SolverConfig("rk4", steps=4)
    got = cnftools.log_likelihood(v, x, config=config).log_prob
    expected = cnftools.log_likelihood(_batch_time_field(net), x, config=config).log_prob
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_real_flow_matching_model_wrapper_runs_as_a_field():
    """Meta flow_matching's ModelWrapper (optional dependency) is forward(x, t, **extras): with a
    model that takes (B,) times it is a field as it is; with one written for flow_matching's
    ODESolver (a 0-dim t) it runs through time="scalar". Both equal the per-row field exactly."""
    model_wrapper = pytest.importorskip("flow_matching.utils.model_wrapper")
    net = _time_net()

    class Batched(model_wrapper.ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(torch.cat([x, t.reshape(-1, 1).expand(x.shape[0], 1)], 1))

    class Scalar(model_wrapper.ModelWrapper):
        def forward(self, x, t, **extras):
            return self.model(torch.cat([x, t.expand(x.shape[0], 1)], 1))

    x = _draw((30, 2), 7)
    config = SolverConfig("rk4", steps=4)
    expected = cnftools.log_likelihood(_batch_time_field(net), x, config=config).log_prob
    batched = cnftools.log_likelihood(as_velocity(Batched(net)), x, config=config).log_prob
    scalar = as_velocity(Scalar(net), time="scalar")
    torch.testing.assert_close(batched, expected, rtol=0, atol=0)
    got = cnftools.log_likelihood(scalar, x, config=config).log_prob
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_scalar_time_model_is_called_once_per_evaluation_in_a_solve():
    """Rows on their own steps would give every row its own time, and a scalar-time model would
    then be called once per row: its rows share one step instead (shares_time), so each
    evaluation is one call; the result meets the tolerance against the closed form."""
    marginal = cnftools.GaussianMarginal(
        cnftools.OTPath(0.1), torch.zeros(2, dtype=F64), torch.eye(2, dtype=F64)
    )
    calls = {"n": 0, "rows": 0}

    def model(t, x):
        assert t.dim() == 0
        calls["n"] += 1
        calls["rows"] += x.shape[0]
        return marginal.velocity(x, t)

    v = as_velocity(model, argument_order="t,x", time="scalar")
    assert v.shares_time
    x = _draw((16, 2), 5)
    result = cnftools.log_likelihood(v, x, rtol=1e-8, atol=1e-8)
    assert calls["rows"] == 16 * calls["n"] - 14  # one call per evaluation; the 2-row trial aside
    # dopri5 at 1e-8: a global error of a small multiple of the tolerance times |log p| (~5)
    torch.testing.assert_close(result.log_prob, marginal.log_prob(x, 1.0), rtol=0, atol=1e-6)
