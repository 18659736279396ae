"""The CFM and FM losses (theory §6) and Theorem 2, exactly and statistically.

Theory sections cited here (pages under ``docs/theory/``):

- §6: ``docs/theory/flow-matching.md#flow-matching-objectives``
- §8: ``docs/theory/paths.md#three-paths``
- §9: ``docs/theory/marginals.md#gaussian-data``
"""

from __future__ import annotations

import math

import pytest
import torch

import cnftools
from cnftools.cases import PATH_CASES
from cnftools.training.objectives import empirical_posterior, sample_time, theorem2_terms
from cnftools.validation.theorem2 import (
    empirical_problem,
    gradient_z_scores,
    pointwise_errors,
    small_field,
    z_threshold,
)

F64 = torch.float64


def zero_field(x, t):
    return torch.zeros_like(x)


def identity_field(x, t):
    return x


# ---------------------------------------------------------------------------------------------
# Hand computations on fixed inputs.
# OT(sigma_min=0): x = (1 - t) x0 + t x1, target x1 - x0.
#   sample 1: x0 = (1, 0), x1 = (2, 2), t = 0.5 -> x = (1.5, 1), target = (1, 2)
#   sample 2: x0 = (0, 1), x1 = (0, 0), t = 0   -> x = (0, 1),   target = (0, -1)
# v = 0:  ‖target‖² = 5 and 1, mean 3.
# v = x:  residuals (0.5, -1) and (0, 2): 1.25 and 4, mean 2.625.
X0 = [[1.0, 0.0], [0.0, 1.0]]
X1 = [[2.0, 2.0], [0.0, 0.0]]
T = [0.5, 0.0]


@pytest.mark.parametrize(("field", "expected"), [(zero_field, 3.0), (identity_field, 2.625)])
def test_cfm_loss_ot_by_hand(field, expected, dtype):
    x0, x1, t = (torch.tensor(a, dtype=dtype) for a in (X0, X1, T))
    loss = cnftools.cfm_loss(field, cnftools.OTPath(0.0), x1, t, x0)
    assert loss.shape == ()
    assert loss.dtype == dtype
    # a handful of exact binary fractions: exact in both dtypes up to one rounding (eps32 ≈ 1.2e-7)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=dtype), rtol=1e-6, atol=0)


def test_cfm_loss_reductions_by_hand():
    x0, x1, t = (torch.tensor(a, dtype=F64) for a in (X0, X1, T))
    path = cnftools.OTPath(0.0)
    per = cnftools.cfm_loss(zero_field, path, x1, t, x0, reduction="none")
    # per-sample squared norms 5 and 1 (see the hand computation above); exact binary fractions
    assert per.tolist() == [5.0, 1.0]
    assert float(cnftools.cfm_loss(zero_field, path, x1, t, x0, reduction="sum")) == 6.0


def test_cfm_loss_ve_by_hand():
    # VE(sigma_min=1, sigma_max=e): c = 1, s_t = e^{1-t}; x = x1 + s_t x0, u = -(x - x1) = -s_t x0.
    # t = 0.5: s = e^{0.5}; v = 0 -> ‖s x0‖² = e ‖x0‖², x0 = (1, 2): 5e.
    path = cnftools.VEPath(1.0, math.e)
    x0 = torch.tensor([[1.0, 2.0]], dtype=F64)
    x1 = torch.tensor([[3.0, -1.0]], dtype=F64)
    loss = cnftools.cfm_loss(zero_field, path, x1, 0.5, x0)
    # roundoff of exp and a few products: 1e-14 relative
    assert math.isclose(float(loss), 5 * math.e, rel_tol=1e-14)


def test_cfm_loss_vp_by_hand():
    # VP with beta constant (beta_min = beta_max = 2): T(s) = 2 s, alpha = e^{-(1-t)}.
    # u = ½ β α (x1 - α x)/(1 - α²) with x = α x1 + sqrt(1 - α²) x0 (theory §8), v = 0.
    t, x0v, x1v = 0.25, [0.5, -1.0], [2.0, 1.0]
    alpha = math.exp(-(1 - t))
    s = math.sqrt(1 - alpha**2)
    x = [alpha * b + s * a for a, b in zip(x0v, x1v, strict=True)]
    u = [0.5 * 2 * alpha * (b - alpha * xi) / (1 - alpha**2) for xi, b in zip(x, x1v, strict=True)]
    expected = sum(ui**2 for ui in u)
    loss = cnftools.cfm_loss(
        zero_field,
        cnftools.VPPath(2.0, 2.0),
        torch.tensor([x1v], dtype=F64),
        t,
        torch.tensor([x0v], dtype=F64),
    )
    # a few elementary operations in float64: 1e-13 relative
    assert math.isclose(float(loss), expected, rel_tol=1e-13)


def test_cfm_loss_sums_over_event_dims():
    # event shape (2, 3): per-sample loss is the sum over all 6 entries, then the batch mean.
    # OT(0), t = 0: x = x0, target = x1 - x0; v = 0 with x0 = 0, x1 = 1 -> 6 per sample.
    x1 = torch.ones(4, 2, 3, dtype=F64)
    loss = cnftools.cfm_loss(zero_field, cnftools.OTPath(0.0), x1, 0.0, torch.zeros_like(x1))
    assert float(loss) == 6.0  # exact


def test_fm_loss_by_hand_gaussian_marginal():
    # OT(sigma), q = N(m, S), t = 0: a = 0, a' = 1, s = 1, s s' = -(1 - sigma), Σ_0 = I
    # -> u_0(x) = m - (1 - sigma) x (theory §9). v = 0: loss = mean ‖m - 0.9 x‖².
    m = torch.tensor([1.0, -2.0], dtype=F64)
    cov = torch.tensor([[2.0, 0.3], [0.3, 1.0]], dtype=F64)
    marginal = cnftools.GaussianMarginal(cnftools.OTPath(0.1), m, cov)
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    # rows: ‖(1, -2)‖² = 5; ‖(1 - 0.9, -2 - 0.9)‖² = 0.01 + 8.41 = 8.42; mean 6.71
    loss = cnftools.fm_loss(zero_field, marginal, x, 0.0)
    assert loss.shape == ()
    # roundoff of the closed form (eigh-based): 1e-12 relative
    assert math.isclose(float(loss), 6.71, rel_tol=1e-12)


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_min", [0.0, 0.1, 0.5])
def test_ot_closed_form_target_equals_conditional_velocity(sigma_min):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(64, 3, generator=gen, dtype=F64)
    x1 = torch.randn(64, 3, generator=gen, dtype=F64)
    t = 0.999 * torch.rand(64, generator=gen, dtype=F64)
    path = cnftools.OTPath(sigma_min)
    fast = cnftools.cfm_loss(zero_field, path, x1, t, x0, reduction="none")
    u = path.conditional_velocity(path.flow_map(x0, t, x1), t, x1)
    # x1 - (1-σ)x0 vs (x1 - (1-σ)ψ)/s_t: roundoff amplified by 1/s_t ≤ 1e3 -> 1e-11 relative
    torch.testing.assert_close(fast, (u**2).sum(dim=1), rtol=1e-11, atol=0)


@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_cfm_loss_every_path(name, dtype):
    path = PATH_CASES[name].build()
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(0)
    v = cnftools.MLPField(2, hidden=(8,)).to(dtype)
    x1 = torch.randn(16, 2, generator=gen, dtype=dtype)
    x0 = torch.randn(16, 2, generator=gen, dtype=dtype)
    t = 0.95 * torch.rand(16, generator=gen, dtype=dtype)
    loss = cnftools.cfm_loss(v, path, x1, t, x0)
    assert loss.shape == () and loss.dtype == dtype and loss.requires_grad
    x = path.flow_map(x0, t, x1)
    expected = ((v(x, t) - path.conditional_velocity(x, t, x1)) ** 2).sum(dim=1).mean()
    # same operations up to the OT closed form; float32 1/s_t amplification ≤ 20 -> 1e-5
    tol = 1e-12 if dtype == F64 else 1e-5
    torch.testing.assert_close(loss, expected, rtol=tol, atol=0)


def test_cfm_loss_draws_follow_generator_and_dtype(dtype):
    x1 = torch.randn(32, 2, dtype=dtype)
    path = cnftools.OTPath(0.1)
    a = cnftools.cfm_loss(zero_field, path, x1, generator=torch.Generator().manual_seed(5))
    b = cnftools.cfm_loss(zero_field, path, x1, generator=torch.Generator().manual_seed(5))
    c = cnftools.cfm_loss(zero_field, path, x1, generator=torch.Generator().manual_seed(6))
    assert a.dtype == dtype
    assert torch.equal(a, b)  # same seed, same draws: bitwise equal
    assert not torch.equal(a, c)


def test_sample_time_range():
    t = sample_time(10_000, torch.zeros(1, dtype=F64), torch.Generator().manual_seed(0), t_max=0.9)
    assert float(t.min()) >= 0.0 and float(t.max()) < 0.9
    with pytest.raises(ValueError, match="t_min < t_max"):
        sample_time(3, torch.zeros(1), t_min=0.5, t_max=0.5)


def test_cfm_loss_t_max_keyword():
    # with t_max = 0.5 every draw satisfies t < 0.5: recover them through reduction="none" on OT(0)
    # with v = 0, x0 = 0: x = t x1, target = x1, loss = ‖x1‖² regardless of t — so instead check
    # a field that returns t: residual (t - 1) per coordinate.
    x1 = torch.ones(1000, 1, dtype=F64)
    per = cnftools.cfm_loss(
        lambda x, t: t[:, None].expand_as(x),
        cnftools.OTPath(0.0),
        x1,
        x0=torch.zeros_like(x1),
        generator=torch.Generator().manual_seed(0),
        t_max=0.5,
        reduction="none",
    )
    t = 1 - per.sqrt()
    assert float(t.max()) < 0.5


# ---------------------------------------------------------------------------------------------
def test_errors_are_clear():
    path = cnftools.OTPath(0.1)
    x1 = torch.randn(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"x1 must have shape \(B, \*event\)"):
        cnftools.cfm_loss(zero_field, path, torch.randn(4, dtype=F64))
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        cnftools.cfm_loss(zero_field, path, x1, x0=torch.randn(4, 3, dtype=F64))
    with pytest.raises(ValueError, match="returned shape"):
        cnftools.cfm_loss(lambda x, t: x[:, :1], path, x1)
    with pytest.raises(ValueError, match="dim=3"):
        cnftools.cfm_loss(cnftools.MLPField(3, hidden=(4,)).double(), path, x1)
    with pytest.raises(ValueError, match="non-finite"):
        cnftools.cfm_loss(lambda x, t: torch.full_like(x, math.nan), path, x1)
    with pytest.raises(ValueError, match=r"t must lie in \[0.0, 1.0\]"):
        cnftools.cfm_loss(zero_field, path, x1, 1.5)
    with pytest.raises(ValueError, match="sigma_t"):
        cnftools.cfm_loss(zero_field, cnftools.VPPath(), x1, 1.0)
    with pytest.raises(ValueError, match="reduction"):
        cnftools.cfm_loss(zero_field, path, x1, reduction="max")
    with pytest.raises(TypeError, match="GaussianPath"):
        cnftools.cfm_loss(zero_field, "ot", x1)
    with pytest.raises(TypeError, match="velocity"):
        cnftools.fm_loss(zero_field, object(), x1, 0.5)
    marginal = cnftools.MixtureMarginal(path, torch.randn(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="returned shape"):
        cnftools.fm_loss(lambda x, t: x.sum(dim=1), marginal, x1, 0.5)


def test_ot_sigma0_at_t1_is_finite():
    # the closed form x1 - x0 is finite at t = 1 even though conditional_velocity is singular there
    x1 = torch.ones(2, 2, dtype=F64)
    loss = cnftools.cfm_loss(zero_field, cnftools.OTPath(0.0), x1, 1.0, torch.zeros_like(x1))
    assert float(loss) == 2.0  # ‖x1 - 0‖² = 2, exact


# ---------------------------------------------------------------------------------------------
# Theorem 2 (a): pointwise identity, exact in values and gradients.
@pytest.mark.parametrize("name", sorted(PATH_CASES))
def test_theorem2_pointwise(name, dtype):
    gen = torch.Generator().manual_seed(3)
    data, weights = empirical_problem(6, 2, gen, dtype, torch.device("cpu"))
    field = small_field(2, dtype, torch.device("cpu"))
    case = PATH_CASES[name]
    path = case.build()
    x = 2 * torch.randn(20, 2, generator=gen, dtype=dtype)
    t = 0.05 + 0.85 * torch.rand(20, generator=gen, dtype=dtype)
    u = None
    if case.affine:
        u = cnftools.MixtureMarginal(path, data, None, weights).velocity(x, t)
        log_w, u_i = empirical_posterior(path, x, t, data, weights)
        mixed = (log_w.exp().unsqueeze(-1) * u_i).sum(dim=1)
        # two implementations of u_t: roundoff, 1e-10 (float64) / 1e-4 (float32) relative
        tol = 1e-10 if dtype == F64 else 1e-4
        assert float((mixed - u).abs().max() / u.abs().max()) <= tol
    errors = pointwise_errors(path, field, x, t, data, weights, u)
    # exact identity: float64 roundoff ~1e-14 -> 1e-10; float32 eps 1.2e-7 × conditioning -> 1e-4
    tol = 1e-10 if dtype == F64 else 1e-4
    assert errors["value"] <= tol
    assert errors["gradient"] <= tol


def test_theorem2_pointwise_negative_control():
    gen = torch.Generator().manual_seed(3)
    data, weights = empirical_problem(6, 2, gen, F64, torch.device("cpu"))
    field = small_field(2, F64, torch.device("cpu"))
    path = cnftools.OTPath(0.1)
    x = 2 * torch.randn(20, 2, generator=gen, dtype=F64)
    t = 0.05 + 0.85 * torch.rand(20, generator=gen, dtype=F64)
    _, u_i = empirical_posterior(path, x, t, data, weights)
    errors = pointwise_errors(path, field, x, t, data, weights, u_i.mean(dim=1))
    # a wrong marginal field breaks the identity far above roundoff
    assert errors["value"] > 1e-3


def test_theorem2_terms_by_hand():
    # one data point: w = 1, u = u_1, variance term 0 and cfm = fm exactly.
    data = torch.tensor([[1.0, 2.0]], dtype=F64)
    x = torch.tensor([[0.5, 0.5]], dtype=F64)
    terms = theorem2_terms(zero_field, cnftools.OTPath(0.0), x, 0.5, data)
    # OT(0), t = 0.5: u = (x1 - x)/(1 - t) = (1, 3) -> ‖u‖² = 10
    assert math.isclose(float(terms["cfm"]), 10.0, rel_tol=1e-15)
    assert math.isclose(float(terms["fm"]), 10.0, rel_tol=1e-15)
    assert float(terms["variance"]) == 0.0


# Theorem 2 (b): over many batches the mean gradients agree within their sampling error.
def test_theorem2_statistical():
    gen = torch.Generator().manual_seed(4)
    data, weights = empirical_problem(5, 2, gen, F64, torch.device("cpu"))
    field = small_field(2, F64, torch.device("cpu"))
    path = cnftools.OTPath(0.1)
    z = gradient_z_scores(path, field, data, weights, n_batches=100, batch_size=32, generator=gen)
    # family-wise false-alarm rate 1e-3 (Bonferroni over all components); seeds are fixed, so
    # the outcome is deterministic — the rate says how unlucky a seed would have to be.
    threshold = z_threshold(z.numel(), 1e-3)
    assert float(z.abs().max()) <= threshold
    # negative control: FM against the marginal field of shifted data is detected
    z_bad = gradient_z_scores(
        path, field, data, weights, n_batches=100, batch_size=32, generator=gen, fm_data=data + 0.5
    )
    assert float(z_bad.abs().max()) > threshold


def test_sample_time_never_returns_t_max_even_after_rounding(monkeypatch):
    """In float32, t_min + (t_max - t_min)·u with u = 1 - 2^-24 rounds to t_max exactly; the draw
    must stay in the half-open interval so a singular end (VP, OT with sigma_min = 0) is never hit."""
    from cnftools.training.objectives import sample_time

    monkeypatch.setattr(
        torch, "rand", lambda n, **kw: torch.full((n,), 1 - 2**-24, dtype=kw["dtype"])
    )
    t = sample_time(3, torch.zeros(1), t_min=0.5, t_max=1.0)
    assert bool((t < 1.0).all()) and t.dtype == torch.float32


@pytest.mark.parametrize("batch", [0, -1, 2.5, True])
def test_sample_time_rejects_a_bad_batch(batch):
    from cnftools.training.objectives import sample_time

    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        sample_time(batch, torch.zeros(1))


# ---------------------------------------------------------------------------------------------
# extras: conditional fields v(x, t, **extras)
def shift_field(x, t, y, scale=1.0):
    """A conditional field with a known output: scale * y (per row), broadcast over the event."""
    return scale * y.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1))).expand_as(x)


def test_cfm_loss_passes_extras_by_hand(dtype):
    # OT(0): targets (1, 2) and (0, -1) (see the hand computation above). v = scale * y:
    # y = (1, 0), scale 2 -> outputs (2, 2), (0, 0); residuals (1, 0), (0, 1): per-row 1 and 1.
    x0, x1, t = (torch.tensor(a, dtype=dtype) for a in (X0, X1, T))
    extras = {"y": torch.tensor([1, 0]), "scale": 2.0}
    per = cnftools.cfm_loss(
        shift_field, cnftools.OTPath(0.0), x1, t, x0, reduction="none", extras=extras
    )
    assert per.tolist() == [1.0, 1.0]  # exact binary fractions in both dtypes


def test_cfm_loss_row_b_gets_label_b():
    # A spy field records what it was called with: the extras arrive unchanged, row-aligned.
    seen = {}

    def spy(x, t, y):
        seen["y"] = y
        return torch.zeros_like(x)

    x1 = torch.randn(5, 3, dtype=F64)
    labels = torch.arange(5)
    cnftools.cfm_loss(spy, cnftools.OTPath(0.1), x1, extras={"y": labels})
    assert seen["y"] is labels


def test_fm_loss_passes_extras_by_hand():
    class Zero:
        def velocity(self, x, t):
            return torch.zeros_like(x)

    x = torch.zeros(2, 3, dtype=F64)
    # v = y per row: ‖(1,1,1)‖² = 3 and ‖(2,2,2)‖² = 12, mean 7.5 (exact)
    loss = cnftools.fm_loss(shift_field, Zero(), x, 0.5, extras={"y": torch.tensor([1, 2])})
    assert float(loss) == 7.5


def test_conditional_mlp_field_in_cfm_loss_trains_on_labels():
    torch.manual_seed(0)
    v = cnftools.MLPField(2, hidden=(8,), num_classes=2).double()
    x1 = torch.randn(4, 2, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    loss = cnftools.cfm_loss(
        v, cnftools.OTPath(0.1), x1, generator=gen, extras={"y": torch.tensor([0, 1, 0, 1])}
    )
    loss.backward()
    assert v.conditioning.embedding.weight.grad.abs().sum() > 0  # the label embedding is trained
    with pytest.raises(ValueError, match="pass y="):
        cnftools.cfm_loss(v, cnftools.OTPath(0.1), x1)


def test_extras_errors_are_clear():
    path = cnftools.OTPath(0.1)
    x1 = torch.randn(4, 2, dtype=F64)
    with pytest.raises(TypeError, match="extras must be a dict"):
        cnftools.cfm_loss(zero_field, path, x1, extras=[1, 2])
    with pytest.raises(ValueError, match="must not contain 'x' or 't'"):
        cnftools.cfm_loss(zero_field, path, x1, extras={"t": 0.5})
    with pytest.raises(TypeError, match="extras must be a dict"):
        cnftools.fm_loss(zero_field, cnftools.MixtureMarginal(path, x1), x1, 0.5, extras=3)
    with pytest.raises(TypeError, match="callable"):
        cnftools.cfm_loss("not a field", path, x1)
