r"""Parametrization conversions of an affine Gaussian path: noise, data and score predictions to
velocities and back (theory §13, docs/guide/diffusion.md).

On a path :math:`x_t = a_t x_1 + s_t \varepsilon`, a model that predicts the noise
:math:`\hat\varepsilon`, the clean data :math:`\hat x_1` or the score :math:`\nabla\log p_t` is a
velocity field, and a velocity determines each of them. Every conversion here is linear in
``(value, x)`` with coefficients from the schedule
(:math:`a_t, a_t', s_t^2, s_t s_t'` and :math:`D_t = a_t' s_t^2 - a_t s_t s_t'`); the six formulas
are the table :data:`CONVERSIONS`, one line each.

:class:`VelocityConversions` is the mixin that gives
:class:`~cnftools.paths.AffineGaussianPath` its six public conversion methods. It needs from its
host the schedule methods ``signal_scale``, ``signal_scale_derivative``, ``noise_scale``,
``noise_variance`` and ``noise_variance_rate`` on a ``(B,)`` time tensor (those of
:class:`cnftools.schedules.Schedule`). Where a conversion is singular it raises a ``ValueError``
naming the path, the method and the times, and never returns NaN or inf.

Shapes: ``value`` and ``x`` are ``(B, *event)``; ``t`` is a float, a 0-dim tensor or ``(B,)``.

References:
    Song et al. (2021), arXiv:2011.13456, eq. (13);
    Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.

Theory sections cited here (pages under ``docs/theory/``):

- §13: ``docs/theory/diffusion.md#diffusion-velocity``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from cnftools._checks import (
    as_time,
    check_batched,
    check_finite,
    check_floating,
    check_same_shape,
    expand_like,
)

__all__ = ["CONVERSIONS", "Conversion", "VelocityConversions"]

Coefficients = dict[str, Tensor]


def _guard(singular: Tensor, value: Tensor) -> Tensor:
    """``value`` with 1 where the conversion is singular (those rows raise; no 0/0 on the way)."""
    return torch.where(singular, torch.ones_like(value), value)


class Conversion(NamedTuple):
    """One conversion: the input's name, where it is singular (why, and the mask), the formula."""

    value_name: str
    why: str
    singular: Callable[[Coefficients], Tensor]
    formula: Callable[[Coefficients, Tensor, Tensor, Tensor], Tensor]


# k: the schedule at t, shaped (B, 1, ..., 1): a, da = a', s2 = s^2, rate = s s', det = D, s.
# formula(k, singular, value, x) -> the output, (B, *event).
CONVERSIONS: dict[str, Conversion] = {
    "velocity_from_epsilon": Conversion(
        "eps",
        "a_t = 0 or s_t = 0",
        lambda k: (k["a"] == 0) | (k["s2"] == 0),
        lambda k, m, eps, x: (
            (k["da"] / _guard(m, k["a"])) * x
            - (k["det"] / (_guard(m, k["a"]) * _guard(m, k["s"]))) * eps
        ),
    ),
    "velocity_from_data": Conversion(
        "x1_hat",
        "s_t = 0",
        lambda k: k["s2"] == 0,
        lambda k, m, x1, x: k["da"] * x1 + (k["rate"] / _guard(m, k["s2"])) * (x - k["a"] * x1),
    ),
    "velocity_from_score": Conversion(
        "score",
        "a_t = 0",
        lambda k: k["a"] == 0,
        lambda k, m, g, x: (k["da"] / _guard(m, k["a"])) * x + (k["det"] / _guard(m, k["a"])) * g,
    ),
    "data_from_velocity": Conversion(
        "v",
        "a_t' s_t = a_t s_t'",
        lambda k: k["det"] == 0,
        lambda k, m, v, x: (k["s2"] * v - k["rate"] * x) / _guard(m, k["det"]),
    ),
    "epsilon_from_velocity": Conversion(
        "v",
        "s_t = 0 or a_t' s_t = a_t s_t'",
        lambda k: (k["det"] == 0) | (k["s2"] == 0),
        lambda k, m, v, x: k["s"] * (k["da"] * x - k["a"] * v) / _guard(m, k["det"]),
    ),
    "score_from_velocity": Conversion(
        "v",
        "a_t' s_t = a_t s_t'",
        lambda k: k["det"] == 0,
        lambda k, m, v, x: (k["a"] * v - k["da"] * x) / _guard(m, k["det"]),
    ),
}
"""The six conversions by method name: each output is ``formula(k, singular, value, x)``."""


class VelocityConversions:
    r"""Noise, data and score predictions to velocities and back, for an affine Gaussian path.

    A mixin: the host class supplies the schedule methods (``signal_scale``,
    ``signal_scale_derivative``, ``noise_scale``, ``noise_variance``, ``noise_variance_rate``, as
    on :class:`cnftools.schedules.Schedule`); :class:`~cnftools.paths.AffineGaussianPath` is the
    host. With :math:`D_t = a_t' s_t^2 - a_t s_t s_t'`:

    .. math::

        u = \frac{a_t'}{a_t} x - \frac{D_t}{a_t s_t}\hat\varepsilon
          = a_t' \hat x_1 + \frac{s_t s_t'}{s_t^2}(x - a_t \hat x_1)
          = \frac{a_t'}{a_t} x + \frac{D_t}{a_t}\nabla\log p_t .

    References:
        Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.
    """

    signal_scale: Callable[[Tensor], Tensor]
    signal_scale_derivative: Callable[[Tensor], Tensor]
    noise_scale: Callable[[Tensor], Tensor]
    noise_variance: Callable[[Tensor], Tensor]
    noise_variance_rate: Callable[[Tensor], Tensor]

    def _convert(self, method: str, value: object, x: object, t: object) -> Tensor:
        """Check ``(value, x, t)``, evaluate ``CONVERSIONS[method]``, refuse singular rows."""
        rule = CONVERSIONS[method]
        x = check_batched("x", x)
        value = check_floating(rule.value_name, value)
        check_same_shape(rule.value_name, value, "x", x)
        t = as_time(t, x)
        k = self._coefficients(t, x, with_scale="epsilon" in method)
        singular = rule.singular(k)
        out = rule.formula(k, singular, value, x)
        return self._checked(method, out, singular, rule, (value, x), t)

    def _coefficients(self, t: Tensor, x: Tensor, *, with_scale: bool) -> Coefficients:
        """The schedule at ``t`` (``(B,)``), each shaped ``(B, 1, ..., 1)`` like ``x``."""
        s2 = self.noise_variance(t)
        k = {
            "a": self.signal_scale(t),
            "da": self.signal_scale_derivative(t),
            "s2": s2,
            "rate": self.noise_variance_rate(t),
        }
        # D = a' s^2 - a s s' = s (a' s - a s'): zero where the velocity forgets the noise/data split.
        k["det"] = k["da"] * s2 - k["a"] * k["rate"]
        if with_scale:
            k["s"] = self.noise_scale(t)
        return {name: expand_like(v, x) for name, v in k.items()}

    def _checked(
        self,
        method: str,
        out: Tensor,
        singular: Tensor,
        rule: Conversion,
        inputs: tuple[Tensor, Tensor],
        t: Tensor,
    ) -> Tensor:
        """Raise a ``ValueError`` naming ``t`` and the path where the conversion is singular or
        non-finite; otherwise return ``out``. One host synchronisation."""
        rows_singular = singular.reshape(singular.shape[0], -1).any(dim=1)
        rows_bad = ~torch.isfinite(out.detach()).reshape(out.shape[0], -1).all(dim=1)
        n_singular, n_bad = (int(v) for v in torch.stack([rows_singular.sum(), rows_bad.sum()]))
        if n_singular == 0 and n_bad == 0:
            return out
        if n_singular:
            times = t.detach()[rows_singular][:5].tolist()
            raise ValueError(
                f"{self!r}.{method} is singular at t = {times} ({rule.why}); evaluate it on times "
                "where it is defined (e.g. clip t away from the end point)"
            )
        for name, tensor in zip((rule.value_name, "x"), inputs, strict=True):
            check_finite(name, tensor)
        times = t.detach()[rows_bad][:5].tolist()
        raise ValueError(
            f"{self!r}.{method} overflowed to a non-finite value at t = {times}; the conversion "
            "divides by a schedule that is nearly zero there (use float64 or stay further from it)"
        )

    def velocity_from_epsilon(self, eps: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The velocity of a noise prediction :math:`\hat\varepsilon` at :math:`x = a_t \hat x_1 + s_t \hat\varepsilon`.

        .. math::

            u = a_t' \hat x_1 + s_t' \hat\varepsilon
              = \frac{a_t'}{a_t}\, x - \frac{a_t' s_t^2 - a_t s_t s_t'}{a_t s_t}\, \hat\varepsilon .

        With the exact :math:`\hat\varepsilon = E[\varepsilon \mid x_t = x]` this is the marginal
        field :math:`u_t(x)`.

        Args:
            eps: the predicted noise :math:`\hat\varepsilon`, shape ``(B, *event)``.
            x: the points, shape ``(B, *event)``.
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.

        Returns:
            The velocity, shape ``(B, *event)``.

        Raises:
            ValueError: at times where :math:`a_t = 0` or :math:`s_t = 0` (e.g. OT at
                :math:`t = 0`, VP at :math:`t = 1`), naming those times, or on bad input.

        Example:
            >>> import torch, cnftools
            >>> path = cnftools.OTPath(0.0)
            >>> x1, eps = torch.ones(1, 2), torch.zeros(1, 2)
            >>> x = path.flow_map(eps, 0.5, x1)  # a_t x1 + s_t eps
            >>> path.velocity_from_epsilon(eps, x, 0.5)  # = x1 - eps on OT
            tensor([[1., 1.]])

        References:
            Song et al. (2021), arXiv:2011.13456; Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.
        """
        return self._convert("velocity_from_epsilon", eps, x, t)

    def velocity_from_data(self, x1_hat: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The velocity of a clean-data prediction :math:`\hat x_1 = E[x_1 \mid x_t = x]`.

        .. math::

            u = a_t' \hat x_1 + \frac{s_t s_t'}{s_t^2}\,(x - a_t \hat x_1) .

        Args:
            x1_hat: the predicted data :math:`\hat x_1`, shape ``(B, *event)``.
            x: the points, shape ``(B, *event)``.
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.

        Returns:
            The velocity, shape ``(B, *event)``.

        Raises:
            ValueError: at times where :math:`s_t = 0` (OT with ``sigma_min = 0`` and VP at
                :math:`t = 1`), naming those times, or on bad input.

        Example:
            >>> import torch, cnftools
            >>> path = cnftools.OTPath(0.0)
            >>> path.velocity_from_data(
            ...     torch.ones(1, 2), torch.zeros(1, 2), 0.5
            ... )  # (x1 - x)/(1 - t)
            tensor([[2., 2.]])

        References:
            Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.
        """
        return self._convert("velocity_from_data", x1_hat, x, t)

    def velocity_from_score(self, score: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The velocity of a score :math:`\nabla \log p_t(x) = -\hat\varepsilon / s_t`.

        .. math::

            u = \frac{a_t'}{a_t}\, x + \frac{a_t' s_t^2 - a_t s_t s_t'}{a_t}\, \nabla \log p_t(x),

        the probability-flow ODE of Song et al. (2021) in cnftools time: on VP
        :math:`u = \tfrac12 \beta(1-t)\,(x + \nabla\log p_t)`, on VE
        :math:`u = -s_t s_t' \nabla\log p_t`.

        Args:
            score: the predicted score, shape ``(B, *event)``.
            x: the points, shape ``(B, *event)``.
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.

        Returns:
            The velocity, shape ``(B, *event)``.

        Raises:
            ValueError: at times where :math:`a_t = 0` (OT at :math:`t = 0`), naming them, or on
                bad input.

        Example:
            >>> import torch, cnftools
            >>> path = cnftools.VEPath(0.1, 5.0)
            >>> x = torch.ones(1, 2)
            >>> path.velocity_from_score(-x, x, 1.0)  # -s s' score with s s' = -ln(50) * 0.1**2
            tensor([[-0.0391, -0.0391]])

        References:
            Song et al. (2021), arXiv:2011.13456, eq. (13).
        """
        return self._convert("velocity_from_score", score, x, t)

    def data_from_velocity(self, v: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The clean-data prediction of a velocity, inverse of :meth:`velocity_from_data`.

        .. math::

            \hat x_1 = \frac{s_t^2\, u - s_t s_t'\, x}{a_t' s_t^2 - a_t s_t s_t'} .

        Args:
            v: the velocity, shape ``(B, *event)``.
            x: the points, shape ``(B, *event)``.
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.

        Returns:
            :math:`\hat x_1`, shape ``(B, *event)``.

        Raises:
            ValueError: at times where :math:`a_t' s_t^2 = a_t s_t s_t'` (the velocity does not
                determine :math:`\hat x_1`; e.g. OT with ``sigma_min = 0`` at :math:`t = 1`),
                naming them, or on bad input.

        Example:
            >>> import torch, cnftools
            >>> path = cnftools.OTPath(0.0)
            >>> path.data_from_velocity(torch.full((1, 2), 2.0), torch.zeros(1, 2), 0.5)
            tensor([[1., 1.]])

        References:
            Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.
        """
        return self._convert("data_from_velocity", v, x, t)

    def epsilon_from_velocity(self, v: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The noise prediction of a velocity, inverse of :meth:`velocity_from_epsilon`.

        .. math::

            \hat\varepsilon = \frac{x - a_t \hat x_1}{s_t}
            = s_t\, \frac{a_t' x - a_t u}{a_t' s_t^2 - a_t s_t s_t'} .

        Args:
            v: the velocity, shape ``(B, *event)``.
            x: the points, shape ``(B, *event)``.
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.

        Returns:
            :math:`\hat\varepsilon`, shape ``(B, *event)``.

        Raises:
            ValueError: at times where :math:`s_t = 0` or :math:`a_t' s_t = a_t s_t'`, naming them,
                or on bad input.

        Example:
            >>> import torch, cnftools
            >>> path = cnftools.OTPath(0.0)
            >>> path.epsilon_from_velocity(torch.full((1, 2), 2.0), torch.zeros(1, 2), 0.5)
            tensor([[-1., -1.]])

        References:
            Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.
        """
        return self._convert("epsilon_from_velocity", v, x, t)

    def score_from_velocity(self, v: Tensor, x: Tensor, t: float | Tensor) -> Tensor:
        r"""The score of a velocity, inverse of :meth:`velocity_from_score`.

        .. math::

            \nabla \log p_t(x) = -\frac{\hat\varepsilon}{s_t}
            = \frac{a_t u - a_t' x}{a_t' s_t^2 - a_t s_t s_t'} .

        Args:
            v: the velocity, shape ``(B, *event)``.
            x: the points, shape ``(B, *event)``.
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.

        Returns:
            The score, shape ``(B, *event)``.

        Raises:
            ValueError: at times where :math:`a_t' s_t^2 = a_t s_t s_t'`, naming them, or on bad
                input.

        Example:
            >>> import torch, cnftools
            >>> path = cnftools.OTPath(0.0)
            >>> path.score_from_velocity(torch.full((1, 2), 2.0), torch.zeros(1, 2), 0.5)
            tensor([[2., 2.]])

        References:
            Song et al. (2021), arXiv:2011.13456, eq. (13).
        """
        return self._convert("score_from_velocity", v, x, t)
