"""Tests of cnftools.schedules: closed forms of theory §8, autograd defaults, the path built on a
schedule, and bad arguments.

Theory sections cited here (pages under ``docs/theory/``):

- §8: ``docs/theory/paths.md#three-paths``
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cnftools
from cnftools.schedules import CallableSchedule, OTSchedule, Schedule, VESchedule, VPSchedule

F64 = torch.float64
GRID = torch.tensor([0.0, 1e-6, 0.1, 0.37, 0.5, 0.9, 1 - 1e-6], dtype=F64)


class Cosine(Schedule):
    """A user schedule: a_t = sin(πt/2), s_t = 0.1 + 0.9 cos(πt/2); derivatives left to autograd."""

    def signal_scale(self, t):
        return torch.sin(0.5 * math.pi * t)

    def noise_scale(self, t):
        return 0.1 + 0.9 * torch.cos(0.5 * math.pi * t)


def _by_hand(name: str, t: float) -> tuple[float, float, float, float]:
    """(a, a', s, s') of the §8 table, written out with math (not the code under test)."""
    if name == "ot":  # sigma_min = 0.2
        return t, 1.0, 1 - 0.8 * t, -0.8
    if name == "ve":  # sigma_min = 0.1, sigma_max = 5
        c = math.log(50.0)
        s = 0.1 * math.exp((1 - t) * c)
        return 1.0, 0.0, s, -c * s
    if name == "vp":  # beta_min = 0.1, beta_max = 20
        u = 1 - t
        big_t, beta = 0.1 * u + 0.5 * 19.9 * u**2, 0.1 + u * 19.9
        a = math.exp(-0.5 * big_t)
        s = math.sqrt(-math.expm1(-big_t))
        return a, 0.5 * beta * a, s, -0.5 * beta * a**2 / s
    a, s = math.sin(0.5 * math.pi * t), 0.1 + 0.9 * math.cos(0.5 * math.pi * t)
    return (
        a,
        0.5 * math.pi * math.cos(0.5 * math.pi * t),
        s,
        -0.45 * math.pi * math.sin(0.5 * math.pi * t),
    )


SCHEDULES = {
    "ot": lambda: OTSchedule(0.2),
    "ve": lambda: VESchedule(0.1, 5.0),
    "vp": lambda: VPSchedule(0.1, 20.0),
    "cosine": Cosine,
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_schedule_matches_the_table_of_theory_8(name):
    """a, a', s, s², s s' and s' against the §8 formulas by hand: 1e-12 relative + 1e-14 absolute
    in float64 (one formula each side; VP's s' divides by s ≥ 1e-3 on this grid)."""
    schedule = SCHEDULES[name]()
    for t in GRID.tolist():
        a, da, s, ds = _by_hand(name, t)
        tt = torch.tensor([t], dtype=F64)
        got = {
            "a": schedule.signal_scale(tt),
            "da": schedule.signal_scale_derivative(tt),
            "s": schedule.noise_scale(tt),
            "s2": schedule.noise_variance(tt),
            "rate": schedule.noise_variance_rate(tt),
            "ds": schedule.noise_scale_derivative(tt),
        }
        want = {"a": a, "da": da, "s": s, "s2": s * s, "rate": s * ds, "ds": ds}
        for key, value in want.items():
            expected = torch.tensor([value], dtype=F64)
            torch.testing.assert_close(got[key], expected, rtol=1e-12, atol=1e-14, msg=key)


@given(name=st.sampled_from(["ot", "ve", "vp"]), t=st.floats(0.0, 1 - 1e-6))
def test_closed_form_derivatives_equal_the_autograd_defaults(name, t):
    """The built-ins' closed-form a', s s' and s' equal the base class's autograd of their own a_t
    and s_t (an independent computation): 1e-12 relative + 1e-12 absolute (roundoff; VP's s' is
    a quotient with s ≥ 1e-3)."""
    schedule = SCHEDULES[name]()
    tt = torch.tensor([t], dtype=F64)
    for method in ("signal_scale_derivative", "noise_variance_rate", "noise_scale_derivative"):
        closed = getattr(schedule, method)(tt)
        autograd = getattr(Schedule, method)(schedule, tt)
        torch.testing.assert_close(closed, autograd, rtol=1e-12, atol=1e-12, msg=method)


def test_schedule_is_elementwise_on_any_shape():
    """Any time shape (*) in, the same shape out, for the closed forms and the autograd ones."""
    t = torch.rand(2, 3, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    for build in SCHEDULES.values():
        schedule = build()
        for method in ("signal_scale_derivative", "noise_variance_rate", "noise_variance"):
            out = getattr(schedule, method)(t)
            assert out.shape == t.shape
            flat = getattr(schedule, method)(t.reshape(-1))
            assert torch.equal(out.reshape(-1), flat)


def test_vp_noise_scale_derivative_is_minus_infinity_at_one():
    """s_t = sqrt(1 - α²) reaches 0 with an infinite slope; s s' stays finite (−β_min/2 · α_0²)."""
    schedule = VPSchedule(0.1, 20.0)
    one = torch.ones(1, dtype=F64)
    assert schedule.noise_scale_derivative(one).item() == -math.inf
    assert schedule.noise_variance_rate(one).item() == pytest.approx(-0.05, rel=1e-15)


def test_path_on_a_schedule_is_the_built_in_path():
    """AffineGaussianPath(schedule=VPSchedule(...)) and VPPath(...) give equal numbers bit for bit
    (one code path), and a user schedule gives a path that satisfies Theorem 3."""
    x1 = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    t = GRID[:5]
    for built_in, schedule in (
        (cnftools.VPPath(0.1, 20.0), VPSchedule(0.1, 20.0)),
        (cnftools.OTPath(0.2), OTSchedule(0.2)),
        (cnftools.VEPath(0.1, 5.0), VESchedule(0.1, 5.0)),
    ):
        path = cnftools.AffineGaussianPath(schedule=schedule)
        for method in ("conditional_velocity", "log_prob", "velocity_from_data"):
            if method == "velocity_from_data":
                got, want = path.velocity_from_data(x1, x, t), built_in.velocity_from_data(x1, x, t)
            else:
                got, want = getattr(path, method)(x, t, x1), getattr(built_in, method)(x, t, x1)
            assert torch.equal(got, want), (built_in, method)
    from cnftools.testing import assert_theorem3

    assert_theorem3(cnftools.AffineGaussianPath(schedule=Cosine()), x1, 0.4, rtol=1e-10)


def test_built_in_paths_keep_their_parameters_and_repr():
    ve = cnftools.VEPath(0.1, 5.0)
    assert (ve.sigma_min, ve.sigma_max, ve.log_ratio) == (0.1, 5.0, math.log(50.0))
    vp = cnftools.VPPath(0.2, 10.0)
    assert (vp.beta_min, vp.beta_max) == (0.2, 10.0)
    assert repr(cnftools.OTPath(0.1)) == "OTPath(sigma_min=0.1)"
    assert repr(ve.schedule) == "VESchedule(sigma_min=0.1, sigma_max=5.0)"
    assert repr(cnftools.AffineGaussianPath(schedule=OTSchedule(0.5))) == (
        "AffineGaussianPath(schedule=OTSchedule(sigma_min=0.5))"
    )
    path = cnftools.AffineGaussianPath(abs, abs)
    assert isinstance(path.schedule, CallableSchedule)
    assert repr(path) == f"AffineGaussianPath(signal_scale={abs!r}, noise_scale={abs!r})"


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: OTSchedule(1.0), ValueError, r"sigma_min must be in \[0, 1\), got 1.0"),
        (lambda: OTSchedule("0.1"), TypeError, "sigma_min must be a real number"),
        # regression: a string that is not a number was a ValueError from float() ("could not
        # convert string to float"), raised before the argument was named
        (lambda: OTSchedule("a"), TypeError, "sigma_min must be a real number, got str"),
        (lambda: cnftools.OTPath("a"), TypeError, "sigma_min must be a real number, got str"),
        (lambda: VESchedule("a"), TypeError, "sigma_min must be a real number, got str"),
        (lambda: VESchedule(0.1, "b"), TypeError, "sigma_max must be a real number, got str"),
        (lambda: cnftools.VPPath(beta_max="x"), TypeError, "beta_max must be a real number"),
        (lambda: VESchedule(0.0, 1.0), ValueError, "sigma_min must be > 0"),
        (lambda: VESchedule(1.0, 1.0), ValueError, "sigma_max must be > sigma_min = 1.0"),
        (lambda: VPSchedule(-1.0), ValueError, "beta_min must be >= 0"),
        (lambda: VPSchedule(0.0, 0.0), ValueError, "beta_max must be >= beta_min = 0.0 and > 0"),
        (lambda: CallableSchedule(abs, 1.0), TypeError, "must be callables"),
        (lambda: Schedule(), TypeError, "abstract"),
        (lambda: cnftools.AffineGaussianPath(), TypeError, "must be callables"),
        (
            lambda: cnftools.AffineGaussianPath(abs, abs, schedule=OTSchedule()),
            TypeError,
            "not both",
        ),
        (
            lambda: cnftools.AffineGaussianPath(schedule=cnftools.OTPath()),
            TypeError,
            "schedule must be a cnftools.schedules.Schedule",
        ),
    ],
)
def test_bad_arguments_raise_with_a_message(build, error, message):
    with pytest.raises(error, match=message):
        build()
