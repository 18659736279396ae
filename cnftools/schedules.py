r"""Noise schedules: the two scalar functions of time behind an affine Gaussian path (theory §8).

An affine Gaussian path has mean :math:`a_t x_1` and standard deviation :math:`s_t`,

.. math::

    x_t = a_t x_1 + s_t x_0, \qquad x_0 \sim \mathcal N(0, I),

so everything it does follows from a *schedule*: the signal scale :math:`a_t`, the noise scale
:math:`s_t` and their time derivatives. (In the notation of Lipman et al. (2024),
:math:`a_t = \alpha_t` and :math:`s_t = \sigma_t`.) A :class:`Schedule` gives them on a tensor of
times of any shape ``(*)``, elementwise; :class:`~cnftools.paths.AffineGaussianPath` turns a
schedule into a path (flow map, conditional field, densities, parametrization conversions).

The derivative of the noise is carried as the *variance rate*
:math:`s_t s_t' = \tfrac12 (s_t^2)'`, not as :math:`s_t'` alone: at VP's :math:`t = 1`,
:math:`s_t' = -\infty` while :math:`s_t s_t'` is finite, and every formula of the paths divides
:math:`s_t s_t'` by :math:`s_t^2`.

Built in: :class:`OTSchedule`, :class:`VESchedule`, :class:`VPSchedule` (closed-form derivatives),
and :class:`CallableSchedule` for two callables of your own (derivatives by forward-mode autograd).
A schedule of your own is a subclass of :class:`Schedule` with ``signal_scale`` and ``noise_scale``;
override the derivatives where a closed form is more accurate.

References:
    Lipman et al., Flow Matching for Generative Modeling (2022), arXiv:2210.02747, §4.1;
    Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.

Theory sections cited here (pages under ``docs/theory/``):

- §8: ``docs/theory/paths.md#three-paths``
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from cnftools._checks import check_real, time_derivative

__all__ = ["CallableSchedule", "OTSchedule", "Schedule", "VESchedule", "VPSchedule"]

ScheduleFunction = Callable[[Tensor], Tensor]


class Schedule(ABC):
    r"""The schedule :math:`(a_t, s_t)` of an affine Gaussian path and its derivatives.

    .. math::

        \mu_t(x_1) = a_t x_1,\qquad \sigma_t = s_t,\qquad
        s_t s_t' = \tfrac12 \frac{d}{dt} s_t^2 .

    A subclass gives :meth:`signal_scale` and :meth:`noise_scale`; the derivatives default to
    forward-mode autograd of those two (:func:`torch.func.jvp`), so they are exact to roundoff for
    any differentiable schedule. Every method maps a time tensor ``t`` of shape ``(*)`` to a tensor
    of the same shape, dtype and device, elementwise.

    Example:
        >>> import torch
        >>> from cnftools.schedules import Schedule
        >>> class Cosine(Schedule):
        ...     def signal_scale(self, t):
        ...         return torch.sin(0.5 * torch.pi * t)
        ...
        ...     def noise_scale(self, t):
        ...         return torch.cos(0.5 * torch.pi * t)
        >>> t = torch.tensor([0.0, 0.5], dtype=torch.float64)
        >>> Cosine().signal_scale_derivative(t)  # (pi / 2) cos(pi t / 2) = pi / 2, pi / 8**0.5
        tensor([1.5708, 1.1107], dtype=torch.float64)

    References:
        Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.
    """

    @abstractmethod
    def signal_scale(self, t: Tensor) -> Tensor:
        r"""The signal scale :math:`a_t`, shape ``(*)`` for ``t`` of shape ``(*)``."""

    @abstractmethod
    def noise_scale(self, t: Tensor) -> Tensor:
        r"""The noise scale :math:`s_t \ge 0`, shape ``(*)``."""

    def noise_variance(self, t: Tensor) -> Tensor:
        r"""The noise variance :math:`s_t^2`, shape ``(*)``."""
        return self.noise_scale(t) ** 2

    def signal_scale_derivative(self, t: Tensor) -> Tensor:
        r"""The derivative :math:`a_t'`, shape ``(*)`` (forward-mode autograd by default)."""
        return time_derivative(self.signal_scale, t)

    def noise_variance_rate(self, t: Tensor) -> Tensor:
        r"""The variance rate :math:`s_t s_t' = \tfrac12 (s_t^2)'`, shape ``(*)``.

        Finite wherever the path's field is, even where :math:`s_t' = \pm\infty` (VP at
        :math:`t = 1`); the paths use this, never :math:`s_t'` alone.
        """
        return time_derivative(lambda s: 0.5 * self.noise_variance(s), t)

    def noise_scale_derivative(self, t: Tensor) -> Tensor:
        r"""The derivative :math:`s_t'`, shape ``(*)`` (forward-mode autograd by default).

        Infinite where :math:`s_t` reaches 0 with an infinite slope (VP at :math:`t = 1`); prefer
        :meth:`noise_variance_rate` in formulas.
        """
        return time_derivative(self.noise_scale, t)


def _check_parameter(
    name: str, value: object, condition: Callable[[float], bool], expected: str
) -> float:
    """``value`` as a float: a ``TypeError`` for a non-number (before the range is looked at), a
    ``ValueError`` naming ``name`` when ``condition`` fails."""
    number = check_real(name, value)
    if not condition(number):
        raise ValueError(f"{name} must be {expected}, got {number}")
    return number


class CallableSchedule(Schedule):
    r"""A schedule from two callables :math:`t \mapsto a_t` and :math:`t \mapsto s_t`.

    Derivatives come from forward-mode autograd, so the callables must be differentiable torch
    functions of ``t`` (elementwise, shape ``(*)`` in and out).

    Args:
        signal_scale: ``a(t)``, the scale of the data in the mean.
        noise_scale: ``s(t) >= 0``, the standard deviation.

    Raises:
        TypeError: either argument is not callable.

    Example:
        >>> import torch
        >>> from cnftools.schedules import CallableSchedule
        >>> schedule = CallableSchedule(lambda t: t**2, lambda t: 1 - 0.99 * t**2)
        >>> t = torch.tensor([0.5], dtype=torch.float64)
        >>> (
        ...     schedule.signal_scale_derivative(t),
        ...     schedule.noise_variance_rate(t),
        ... )  # 1, -0.7525 * 0.99
        (tensor([1.], dtype=torch.float64), tensor([-0.7450], dtype=torch.float64))

    References:
        Lipman et al. (2022), arXiv:2210.02747, §4.1.
    """

    def __init__(self, signal_scale: ScheduleFunction, noise_scale: ScheduleFunction) -> None:
        if not callable(signal_scale) or not callable(noise_scale):
            raise TypeError("signal_scale and noise_scale must be callables of a (B,) time tensor")
        self.signal_scale_function = signal_scale
        self.noise_scale_function = noise_scale

    def signal_scale(self, t: Tensor) -> Tensor:
        r""":math:`a_t`: the first callable at ``t``."""
        return self.signal_scale_function(t)

    def noise_scale(self, t: Tensor) -> Tensor:
        r""":math:`s_t`: the second callable at ``t``."""
        return self.noise_scale_function(t)

    def __repr__(self) -> str:
        return (
            f"CallableSchedule(signal_scale={self.signal_scale_function!r}, "
            f"noise_scale={self.noise_scale_function!r})"
        )


class OTSchedule(Schedule):
    r"""The optimal-transport schedule :math:`a_t = t`, :math:`s_t = 1 - (1 - \sigma_{\min}) t`.

    .. math::

        a_t' = 1,\qquad s_t' = -(1 - \sigma_{\min}),\qquad
        s_t s_t' = -(1 - \sigma_{\min})\,\big(1 - (1 - \sigma_{\min}) t\big).

    Args:
        sigma_min: the standard deviation at :math:`t = 1`, in ``[0, 1)``.

    Raises:
        ValueError: ``sigma_min`` outside ``[0, 1)``.

    Example:
        >>> import torch
        >>> from cnftools.schedules import OTSchedule
        >>> OTSchedule(0.1).noise_scale(torch.tensor([0.0, 0.5, 1.0]))
        tensor([1.0000, 0.5500, 0.1000])

    References:
        Lipman et al. (2022), arXiv:2210.02747, Example II (eq. 20–23).
    """

    def __init__(self, sigma_min: float = 0.0) -> None:
        self.sigma_min = _check_parameter("sigma_min", sigma_min, lambda s: 0 <= s < 1, "in [0, 1)")

    def signal_scale(self, t: Tensor) -> Tensor:
        r""":math:`a_t = t`."""
        return t

    def signal_scale_derivative(self, t: Tensor) -> Tensor:
        r""":math:`a_t' = 1`."""
        return torch.ones_like(t)

    def noise_scale(self, t: Tensor) -> Tensor:
        r""":math:`s_t = 1 - (1 - \sigma_{\min}) t`."""
        return 1 - (1 - self.sigma_min) * t

    def noise_variance_rate(self, t: Tensor) -> Tensor:
        r""":math:`s_t s_t' = -(1 - \sigma_{\min}) s_t`."""
        return -(1 - self.sigma_min) * self.noise_scale(t)

    def noise_scale_derivative(self, t: Tensor) -> Tensor:
        r""":math:`s_t' = -(1 - \sigma_{\min})`."""
        return torch.full_like(t, -(1 - self.sigma_min))

    def __repr__(self) -> str:
        return f"OTSchedule(sigma_min={self.sigma_min})"


class VESchedule(Schedule):
    r"""The variance-exploding schedule :math:`a_t = 1`, :math:`s_t = \sigma_{\min}
    (\sigma_{\max}/\sigma_{\min})^{1-t}`.

    .. math::

        s_t s_t' = -c\, s_t^2,\qquad c = \ln(\sigma_{\max}/\sigma_{\min}).

    Args:
        sigma_min: smallest noise scale (at :math:`t = 1`), > 0.
        sigma_max: largest noise scale (at :math:`t = 0`), > ``sigma_min``.

    Raises:
        ValueError: ``sigma_min <= 0`` or ``sigma_max <= sigma_min``.

    Example:
        >>> import torch
        >>> from cnftools.schedules import VESchedule
        >>> VESchedule(0.01, 50.0).noise_scale(torch.tensor([0.0, 1.0]))
        tensor([5.0000e+01, 1.0000e-02])

    References:
        Song et al. (2021), arXiv:2011.13456; Lipman et al. (2022), Example I.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        self.sigma_min = _check_parameter("sigma_min", sigma_min, lambda s: s > 0, "> 0")
        self.sigma_max = _check_parameter(
            "sigma_max",
            sigma_max,
            lambda s: s > self.sigma_min,
            f"> sigma_min = {self.sigma_min}",
        )
        self.log_ratio = math.log(self.sigma_max / self.sigma_min)

    def signal_scale(self, t: Tensor) -> Tensor:
        r""":math:`a_t = 1`."""
        return torch.ones_like(t)

    def signal_scale_derivative(self, t: Tensor) -> Tensor:
        r""":math:`a_t' = 0`."""
        return torch.zeros_like(t)

    def noise_scale(self, t: Tensor) -> Tensor:
        r""":math:`s_t = \sigma_{\min} e^{(1-t) c}`."""
        return self.sigma_min * torch.exp((1 - t) * self.log_ratio)

    def noise_variance(self, t: Tensor) -> Tensor:
        r""":math:`s_t^2 = \sigma_{\min}^2 e^{2(1-t) c}`."""
        return self.sigma_min**2 * torch.exp(2 * (1 - t) * self.log_ratio)

    def noise_variance_rate(self, t: Tensor) -> Tensor:
        r""":math:`s_t s_t' = -c\, s_t^2`."""
        return -self.log_ratio * self.noise_variance(t)

    def noise_scale_derivative(self, t: Tensor) -> Tensor:
        r""":math:`s_t' = -c\, s_t`."""
        return -self.log_ratio * self.noise_scale(t)

    def __repr__(self) -> str:
        return f"VESchedule(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class VPSchedule(Schedule):
    r"""The variance-preserving schedule :math:`a_t = \alpha_{1-t}`, :math:`s_t = \sqrt{1 -
    \alpha_{1-t}^2}`.

    With :math:`\alpha_s = e^{-T(s)/2}`, :math:`T(s) = \beta_{\min} s + \tfrac12 (\beta_{\max} -
    \beta_{\min}) s^2` and :math:`\beta(s) = \beta_{\min} + s (\beta_{\max} - \beta_{\min})`:

    .. math::

        a_t' = \tfrac12 \beta(1-t)\, a_t,\qquad s_t^2 = -\operatorname{expm1}(-T(1-t)),\qquad
        s_t s_t' = -\tfrac12 \beta(1-t)\, a_t^2 .

    :math:`s_t^2` uses ``expm1`` (no cancellation near :math:`t = 1`) and :math:`s_t s_t'` the
    product form (no :math:`0 \cdot \infty` at :math:`t = 1`, where :math:`s_t = 0`).

    Args:
        beta_min: :math:`\beta_{\min} \ge 0`.
        beta_max: :math:`\beta_{\max} \ge \beta_{\min}`, > 0.

    Raises:
        ValueError: ``beta_min < 0``, or ``beta_max < beta_min`` or ``beta_max <= 0``.

    Example:
        >>> import torch
        >>> from cnftools.schedules import VPSchedule
        >>> VPSchedule(0.1, 20.0).noise_variance_rate(torch.tensor([1.0], dtype=torch.float64))
        tensor([-0.0500], dtype=torch.float64)

    References:
        Song et al. (2021), arXiv:2011.13456; Lipman et al. (2022), Example I.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        self.beta_min = _check_parameter("beta_min", beta_min, lambda b: b >= 0, ">= 0")
        self.beta_max = _check_parameter(
            "beta_max",
            beta_max,
            lambda b: b >= self.beta_min and b > 0,
            f">= beta_min = {self.beta_min} and > 0",
        )

    def _integrated_beta(self, s: Tensor) -> Tensor:
        return self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2

    def _beta(self, s: Tensor) -> Tensor:
        return self.beta_min + s * (self.beta_max - self.beta_min)

    def signal_scale(self, t: Tensor) -> Tensor:
        r""":math:`a_t = e^{-T(1-t)/2}`."""
        return torch.exp(-0.5 * self._integrated_beta(1 - t))

    def signal_scale_derivative(self, t: Tensor) -> Tensor:
        r""":math:`a_t' = \tfrac12 \beta(1-t)\, a_t`."""
        return 0.5 * self._beta(1 - t) * self.signal_scale(t)

    def noise_variance(self, t: Tensor) -> Tensor:
        r""":math:`s_t^2 = -\operatorname{expm1}(-T(1-t))`."""
        return -torch.expm1(-self._integrated_beta(1 - t))

    def noise_scale(self, t: Tensor) -> Tensor:
        r""":math:`s_t = \sqrt{s_t^2}`."""
        return torch.sqrt(self.noise_variance(t))

    def noise_variance_rate(self, t: Tensor) -> Tensor:
        r""":math:`s_t s_t' = -\tfrac12 \beta(1-t)\, e^{-T(1-t)}`."""
        return -0.5 * self._beta(1 - t) * torch.exp(-self._integrated_beta(1 - t))

    def noise_scale_derivative(self, t: Tensor) -> Tensor:
        r""":math:`s_t' = s_t s_t' / s_t` (:math:`-\infty` at :math:`t = 1`)."""
        return self.noise_variance_rate(t) / self.noise_scale(t)

    def __repr__(self) -> str:
        return f"VPSchedule(beta_min={self.beta_min}, beta_max={self.beta_max})"
