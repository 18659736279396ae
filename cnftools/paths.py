r"""Gaussian conditional probability paths, their flow map and conditional vector field.

A Gaussian conditional path (theory §7) is

.. math::

    p_t(x \mid x_1) = \mathcal N\big(x \mid \mu_t(x_1), \sigma_t(x_1)^2 I\big),
    \qquad \mu_0 = 0,\ \sigma_0 = 1,\quad \mu_1 = x_1,\ \sigma_1 = \sigma_{\min},

with time running from noise (t = 0) to data (t = 1). Its flow map
:math:`\psi_t(x_0) = \sigma_t(x_1) x_0 + \mu_t(x_1)` pushes :math:`\mathcal N(0, I)` to
:math:`p_t(\cdot \mid x_1)`, and Theorem 3 gives the unique field generating it,

.. math::

    u_t(x \mid x_1) = \frac{\sigma_t'(x_1)}{\sigma_t(x_1)}\big(x - \mu_t(x_1)\big) + \mu_t'(x_1).

The ratio :math:`\sigma'/\sigma` is always evaluated as :math:`\tfrac12 (\sigma^2)' / \sigma^2`
(:meth:`GaussianPath.variance_rate` over :meth:`GaussianPath.variance`), which is finite wherever
the field is, including VP's :math:`t \to 1` where :math:`\sigma' \to \infty`.

Shapes: ``x``, ``x0`` and ``x1`` are ``(B, *event)``; ``t`` is a float, a 0-dim tensor or a ``(B,)``
tensor. Every result follows the dtype and device of ``x1``.

References:
    Lipman et al., Flow Matching for Generative Modeling (2022), §4 and Theorem 3.

Theory sections cited here (pages under ``docs/theory/``):

- §7: ``docs/theory/paths.md#gaussian-conditional-paths``
- §8: ``docs/theory/paths.md#three-paths``
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from cnftools._checks import (
    as_time,
    check_batched,
    check_same_shape,
    expand_like,
    time_derivative,
)
from cnftools._conversions import VelocityConversions
from cnftools.schedules import (
    CallableSchedule,
    OTSchedule,
    Schedule,
    ScheduleFunction,
    VESchedule,
    VPSchedule,
)

__all__ = ["AffineGaussianPath", "GaussianPath", "OTPath", "VEPath", "VPPath"]

PathFunction = Callable[[Tensor, Tensor], Tensor]


class GaussianPath:
    r"""A Gaussian conditional path :math:`p_t(x|x_1) = \mathcal N(\mu_t(x_1), \sigma_t(x_1)^2 I)`.

    Define a path of your own from two differentiable callables; their time derivatives come from
    forward-mode autograd (:func:`cnftools._checks.time_derivative`), so Theorem 3 holds for any
    such path. Every method checks what the callables return the same way: a floating tensor of
    ``x1``'s dtype and device, the mean of exactly ``x1``'s shape, the std of ``x1``'s number of
    dimensions broadcasting to ``x1`` (each size 1 or ``x1``'s), finite and ``>= 0``.

    Args:
        mean: ``mean(t, x1) -> (B, *event)``, the mean :math:`\mu_t(x_1)`. It receives ``t`` of
            shape ``(B, 1, ..., 1)`` (broadcastable against ``x1``) and ``x1`` of shape
            ``(B, *event)``.
        std: ``std(t, x1)``, the standard deviation :math:`\sigma_t(x_1) \ge 0`, of any shape that
            broadcasts against ``x1`` (``(B, 1, ..., 1)`` for an isotropic path).

    Example:
        >>> import torch, cnftools
        >>> path = cnftools.GaussianPath(
        ...     mean=lambda t, x1: torch.sin(0.5 * torch.pi * t) * x1,
        ...     std=lambda t, x1: 1 - 0.9 * t,
        ... )
        >>> x1 = torch.randn(4, 3, dtype=torch.float64)
        >>> u = path.conditional_velocity(torch.zeros_like(x1), 0.5, x1)
        >>> u.shape
        torch.Size([4, 3])

    References:
        Lipman et al. (2022), arXiv:2210.02747, §4, Theorem 3.
    """

    def __init__(self, mean: PathFunction, std: PathFunction) -> None:
        if not callable(mean):
            raise TypeError(f"mean must be a callable mean(t, x1), got {type(mean).__name__}")
        if not callable(std):
            raise TypeError(f"std must be a callable std(t, x1), got {type(std).__name__}")
        self._user_mean = mean
        self._user_std = std

    # ------------------------------------------------------------------------------------------
    # Hooks: subclasses override these. ``tb`` is the time reshaped to (B, 1, ..., 1); inputs are
    # already validated. Outputs are validated by the ``_checked`` methods below, not here.
    _MEAN_NAME = "mean(t, x1)"
    _STD_NAME = "std(t, x1)"

    def _mean(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self._user_mean(tb, x1)

    def _std(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self._user_std(tb, x1)

    def _variance(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self._std(tb, x1) ** 2

    def _mean_derivative(self, tb: Tensor, x1: Tensor) -> Tensor:
        return time_derivative(lambda s: self._mean(s, x1), tb)

    def _variance_rate(self, tb: Tensor, x1: Tensor) -> Tensor:
        return time_derivative(lambda s: 0.5 * self._variance(s, x1), tb)

    # ------------------------------------------------------------------------------------------
    def _prepare(self, t: object, x1: object) -> tuple[Tensor, Tensor]:
        x1 = check_batched("x1", x1)
        return expand_like(as_time(t, x1), x1), x1

    def _prepare_with(self, name: str, x: object, t: object, x1: object) -> tuple[Tensor, Tensor]:
        tb, x1 = self._prepare(t, x1)
        x = check_batched(name, x)
        check_same_shape(name, x, "x1", x1)
        return tb, x1

    def _nonzero_variance(self, tb: Tensor, x1: Tensor, what: str) -> Tensor:
        variance = self._variance_checked(tb, x1)
        degenerate = torch.broadcast_to(variance <= 0, x1.shape)
        if bool(degenerate.any()):
            rows = degenerate.reshape(x1.shape[0], -1).any(dim=1)
            times = tb.reshape(-1)[rows]
            raise ValueError(
                f"{what} is undefined where sigma_t(x1) = 0 (the path is a point mass there), "
                f"at t = {times[:5].tolist()}; evaluate at t < 1 or use a path with sigma_min > 0"
            )
        return variance

    # ------------------------------------------------------------------------------------------
    # The one validation routine every public method goes through.
    def _check_output(self, name: str, value: object, x1: Tensor, *, full: bool) -> Tensor:
        """Require a tensor like ``x1`` (dtype, device) of ``x1``'s shape (``full``) or of
        ``x1``'s number of dimensions with every size 1 or ``x1``'s (broadcastable, no silent
        reinterpretation of a ``(B,)`` or ``(B, 1)`` result against ``(B, d)``)."""
        path = type(self).__name__
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{path}: {name} must return a torch.Tensor computed from t (e.g. "
                f"1 - 0.9 * t), got {type(value).__name__}"
            )
        if value.dtype != x1.dtype or value.device != x1.device:
            raise TypeError(
                f"{path}: {name} returned dtype {value.dtype} on {value.device}; it must follow "
                f"x1 ({x1.dtype} on {x1.device}): build it from t and x1"
            )
        shape, target = tuple(value.shape), tuple(x1.shape)
        if full:
            ok = shape == target
            expected = f"exactly x1's shape {target}"
        else:
            ok = len(shape) == len(target) and all(
                a in (1, b) for a, b in zip(shape, target, strict=True)
            )
            expected = (
                f"{len(target)} dimensions, each of size 1 or x1's {target} "
                f"(e.g. {(target[0], *([1] * (len(target) - 1)))} for an isotropic path)"
            )
        if not ok:
            raise ValueError(f"{path}: {name} returned shape {shape}; expected {expected}")
        return value

    def _mean_checked(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self._check_output(self._MEAN_NAME, self._mean(tb, x1), x1, full=True)

    def _std_checked(self, tb: Tensor, x1: Tensor) -> Tensor:
        std = self._check_output(self._STD_NAME, self._std(tb, x1), x1, full=False)
        if not bool(torch.isfinite(std).all()) or bool((std < 0).any()):
            raise ValueError(f"{type(self).__name__}: {self._STD_NAME} must be finite and >= 0")
        return std

    def _variance_checked(self, tb: Tensor, x1: Tensor) -> Tensor:
        """The variance, after the std itself has been checked (finite, >= 0, right shape)."""
        self._std_checked(tb, x1)
        return self._check_output(
            f"the variance of {self._STD_NAME}", self._variance(tb, x1), x1, full=False
        )

    def _mean_derivative_checked(self, tb: Tensor, x1: Tensor) -> Tensor:
        self._mean_checked(tb, x1)  # a broken mean is named as such, not as a jvp failure
        name = f"the time derivative of {self._MEAN_NAME}"
        return self._check_output(name, self._mean_derivative(tb, x1), x1, full=True)

    def _variance_rate_checked(self, tb: Tensor, x1: Tensor) -> Tensor:
        self._std_checked(tb, x1)
        name = f"the variance rate of {self._STD_NAME}"
        return self._check_output(name, self._variance_rate(tb, x1), x1, full=False)

    # ------------------------------------------------------------------------------------------
    def mean(self, t: float | Tensor, x1: Tensor) -> Tensor:
        r"""The mean :math:`\mu_t(x_1)`, shape ``(B, *event)``.

        Args:
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.
            x1: data points, shape ``(B, *event)``.
        """
        tb, x1 = self._prepare(t, x1)
        return self._mean_checked(tb, x1)

    def std(self, t: float | Tensor, x1: Tensor) -> Tensor:
        r"""The standard deviation :math:`\sigma_t(x_1)`, broadcastable to ``x1``.

        Args:
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.
            x1: data points, shape ``(B, *event)``.
        """
        tb, x1 = self._prepare(t, x1)
        return self._std_checked(tb, x1)

    def mean_derivative(self, t: float | Tensor, x1: Tensor) -> Tensor:
        r"""The time derivative :math:`\mu_t'(x_1)`, shape ``(B, *event)``."""
        tb, x1 = self._prepare(t, x1)
        return self._mean_derivative_checked(tb, x1)

    def variance_rate(self, t: float | Tensor, x1: Tensor) -> Tensor:
        r"""Half the time derivative of the variance, :math:`\tfrac12 (\sigma_t^2)' = \sigma_t\sigma_t'`.

        This is the numerically safe form of :math:`\sigma\sigma'`: finite at VP's :math:`t = 1`,
        where :math:`\sigma' = \infty` and :math:`\sigma = 0`. Broadcastable to ``x1``.
        """
        tb, x1 = self._prepare(t, x1)
        return self._variance_rate_checked(tb, x1)

    def flow_map(self, x0: Tensor, t: float | Tensor, x1: Tensor) -> Tensor:
        r"""The conditional flow map :math:`\psi_t(x_0) = \sigma_t(x_1) x_0 + \mu_t(x_1)`.

        Args:
            x0: noise points, shape ``(B, *event)``.
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.
            x1: data points, shape ``(B, *event)``.

        Returns:
            :math:`\psi_t(x_0)`, shape ``(B, *event)``.
        """
        tb, x1 = self._prepare_with("x0", x0, t, x1)
        return self._std_checked(tb, x1) * x0 + self._mean_checked(tb, x1)

    def inverse_flow_map(self, x: Tensor, t: float | Tensor, x1: Tensor) -> Tensor:
        r"""The inverse flow map :math:`\psi_t^{-1}(x) = (x - \mu_t(x_1)) / \sigma_t(x_1)`.

        Raises:
            ValueError: where :math:`\sigma_t(x_1) = 0`, since :math:`\psi_t` is not invertible.
        """
        tb, x1 = self._prepare_with("x", x, t, x1)
        self._nonzero_variance(tb, x1, "inverse_flow_map")
        return (x - self._mean_checked(tb, x1)) / self._std_checked(tb, x1)

    def conditional_velocity(self, x: Tensor, t: float | Tensor, x1: Tensor) -> Tensor:
        r"""The conditional vector field of Theorem 3,

        .. math::

            u_t(x|x_1) = \frac{\tfrac12 (\sigma_t^2)'}{\sigma_t^2}\,(x - \mu_t(x_1)) + \mu_t'(x_1).

        Args:
            x: points, shape ``(B, *event)``.
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.
            x1: data points, shape ``(B, *event)``.

        Returns:
            :math:`u_t(x|x_1)`, shape ``(B, *event)``.

        Raises:
            ValueError: where :math:`\sigma_t(x_1) = 0` (OT with ``sigma_min = 0`` and VP at
                :math:`t = 1`), where the field is singular.
        """
        tb, x1 = self._prepare_with("x", x, t, x1)
        variance = self._nonzero_variance(tb, x1, "conditional_velocity")
        rate = self._variance_rate_checked(tb, x1) / variance
        return rate * (x - self._mean_checked(tb, x1)) + self._mean_derivative_checked(tb, x1)

    def log_prob(self, x: Tensor, t: float | Tensor, x1: Tensor) -> Tensor:
        r"""The log-density :math:`\log p_t(x|x_1)`, summed over the event dimensions.

        .. math::

            \log p_t(x|x_1) = -\tfrac12 \sum_i \frac{(x_i - \mu_{t,i})^2}{\sigma_{t,i}^2}
            - \sum_i \log \sigma_{t,i} - \tfrac{D}{2}\log 2\pi.

        Returns:
            Shape ``(B,)``.
        """
        tb, x1 = self._prepare_with("x", x, t, x1)
        variance = self._nonzero_variance(tb, x1, "log_prob").expand_as(x1)
        residual = x - self._mean_checked(tb, x1)
        per_element = residual**2 / variance + torch.log(variance) + math.log(2 * math.pi)
        return -0.5 * per_element.reshape(x.shape[0], -1).sum(dim=1)

    def sample(
        self, t: float | Tensor, x1: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        r"""Draw :math:`x_t \sim p_t(\cdot|x_1)` as :math:`\psi_t(x_0)`, :math:`x_0 \sim \mathcal N(0, I)`.

        Args:
            t: time in [0, 1]: a float, a 0-dim tensor or shape ``(B,)``.
            x1: data points, shape ``(B, *event)``.
            generator: optional random generator (on ``x1``'s device) for reproducible draws.

        Returns:
            Shape ``(B, *event)``.
        """
        tb, x1 = self._prepare(t, x1)
        x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
        return self._std_checked(tb, x1) * x0 + self._mean_checked(tb, x1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self._user_mean!r}, std={self._user_std!r})"


class AffineGaussianPath(GaussianPath, VelocityConversions):
    r"""A path with :math:`\mu_t(x_1) = a_t x_1` and :math:`\sigma_t = s_t` independent of :math:`x_1`.

    The schedule :math:`(a_t, s_t)` is a :class:`~cnftools.schedules.Schedule`; this class is the
    path built on it: flow map, Theorem 3 field and densities (from :class:`GaussianPath`) and the
    ε / x₁ / score ⇄ velocity conversions (from
    :class:`~cnftools._conversions.VelocityConversions`). OT, VE and VP are of this form (theory
    §8), and the closed-form marginals of :mod:`cnftools.marginals` need exactly this structure.

    Give either two callables of a ``(B,)`` time tensor (derivatives by autograd; sugar for
    ``schedule=CallableSchedule(signal_scale, noise_scale)``) or a ``schedule``.

    Args:
        signal_scale: ``a(t)``, the scale of the data in the mean.
        noise_scale: ``s(t) >= 0``, the standard deviation.
        schedule: a :class:`~cnftools.schedules.Schedule`, instead of the two callables.

    Raises:
        TypeError: neither two callables nor a schedule, or both.

    Example:
        >>> import torch, cnftools
        >>> path = cnftools.AffineGaussianPath(lambda t: t**2, lambda t: 1 - t**2 + 0.01 * t**2)
        >>> t = torch.tensor([0.5], dtype=torch.float64)
        >>> path.signal_scale_derivative(t)
        tensor([1.], dtype=torch.float64)
        >>> from cnftools.schedules import VPSchedule
        >>> cnftools.AffineGaussianPath(schedule=VPSchedule(0.1, 20.0)).schedule
        VPSchedule(beta_min=0.1, beta_max=20.0)

    References:
        Lipman et al. (2022), arXiv:2210.02747, §4.1.
    """

    def __init__(
        self,
        signal_scale: ScheduleFunction | None = None,
        noise_scale: ScheduleFunction | None = None,
        *,
        schedule: Schedule | None = None,
    ) -> None:
        if schedule is None:
            if not callable(signal_scale) or not callable(noise_scale):
                raise TypeError(
                    "signal_scale and noise_scale must be callables of a (B,) time tensor"
                )
            schedule = CallableSchedule(signal_scale, noise_scale)
        elif signal_scale is not None or noise_scale is not None:
            raise TypeError("give either signal_scale and noise_scale or a schedule, not both")
        elif not isinstance(schedule, Schedule):
            raise TypeError(
                "schedule must be a cnftools.schedules.Schedule (e.g. OTSchedule(0.1)), "
                f"got {type(schedule).__name__}"
            )
        self.schedule = schedule

    _MEAN_NAME = "signal_scale(t) * x1"
    _STD_NAME = "noise_scale(t)"

    # The schedule on a (B,) time tensor (or any shape, elementwise); see cnftools.schedules.
    def signal_scale(self, t: Tensor) -> Tensor:
        r""":math:`a_t`, shape ``(B,)`` for ``t`` of shape ``(B,)``."""
        return self.schedule.signal_scale(t)

    def noise_scale(self, t: Tensor) -> Tensor:
        r""":math:`s_t`, shape ``(B,)``."""
        return self.schedule.noise_scale(t)

    def noise_variance(self, t: Tensor) -> Tensor:
        r""":math:`s_t^2`, shape ``(B,)``."""
        return self.schedule.noise_variance(t)

    def signal_scale_derivative(self, t: Tensor) -> Tensor:
        r""":math:`a_t'`, shape ``(B,)`` (any ``t``, expanded or not)."""
        return self.schedule.signal_scale_derivative(t)

    def noise_variance_rate(self, t: Tensor) -> Tensor:
        r""":math:`s_t s_t' = \tfrac12 (s_t^2)'`, shape ``(B,)``."""
        return self.schedule.noise_variance_rate(t)

    # GaussianPath hooks: the path's own schedule methods, so a subclass may override one of them.
    def _mean(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self.signal_scale(tb) * x1

    def _std(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self.noise_scale(tb)

    def _variance(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self.noise_variance(tb)

    def _mean_derivative(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self.signal_scale_derivative(tb) * x1

    def _variance_rate(self, tb: Tensor, x1: Tensor) -> Tensor:
        return self.noise_variance_rate(tb)

    def __repr__(self) -> str:
        schedule = self.schedule
        if isinstance(schedule, CallableSchedule):
            return (
                f"AffineGaussianPath(signal_scale={schedule.signal_scale_function!r}, "
                f"noise_scale={schedule.noise_scale_function!r})"
            )
        return f"AffineGaussianPath(schedule={schedule!r})"


class OTPath(AffineGaussianPath):
    r"""The optimal-transport (conditional OT) path: :math:`a_t = t`, :math:`s_t = 1 - (1 - \sigma_{\min}) t`.

    .. math::

        u_t(x|x_1) = \frac{x_1 - (1 - \sigma_{\min}) x}{1 - (1 - \sigma_{\min}) t}.

    :math:`p_0 = \mathcal N(0, I)` exactly and :math:`p_1(\cdot|x_1) = \mathcal N(x_1, \sigma_{\min}^2 I)`.
    With ``sigma_min = 0`` the field is singular at :math:`t = 1`: methods that divide by
    :math:`s_t` raise a ``ValueError`` there rather than return NaN. The schedule is
    :class:`~cnftools.schedules.OTSchedule`.

    Args:
        sigma_min: the standard deviation at :math:`t = 1`, in ``[0, 1)``.

    Example:
        >>> import torch, cnftools
        >>> path = cnftools.OTPath(sigma_min=0.0)
        >>> x1 = torch.ones(1, 2)
        >>> path.conditional_velocity(torch.zeros(1, 2), 0.5, x1)
        tensor([[2., 2.]])

    References:
        Lipman et al. (2022), arXiv:2210.02747, Example II (eq. 20–23).
    """

    schedule: OTSchedule

    def __init__(self, sigma_min: float = 0.0) -> None:
        super().__init__(schedule=OTSchedule(sigma_min))

    @property
    def sigma_min(self) -> float:
        """The standard deviation at :math:`t = 1`."""
        return self.schedule.sigma_min

    def __repr__(self) -> str:
        return f"OTPath(sigma_min={self.sigma_min})"


class VEPath(AffineGaussianPath):
    r"""The variance-exploding path: :math:`a_t = 1`, :math:`s_t = \sigma_{1-t}` with
    :math:`\sigma_s = \sigma_{\min} (\sigma_{\max}/\sigma_{\min})^s`.

    .. math::

        u_t(x|x_1) = -c\,(x - x_1), \qquad c = \ln(\sigma_{\max}/\sigma_{\min}).

    Note :math:`p_0(\cdot|x_1) = \mathcal N(x_1, \sigma_{\max}^2 I)`, not :math:`\mathcal N(0, I)`,
    and :math:`p_1(\cdot|x_1) = \mathcal N(x_1, \sigma_{\min}^2 I)`. No singularity on [0, 1]. The
    schedule is :class:`~cnftools.schedules.VESchedule`.

    Args:
        sigma_min: smallest noise scale, > 0.
        sigma_max: largest noise scale, > ``sigma_min``.

    Example:
        >>> import torch, cnftools
        >>> path = cnftools.VEPath(sigma_min=0.01, sigma_max=50.0)
        >>> path.std(0.0, torch.zeros(1, 2))
        tensor([[50.]])

    References:
        Song et al. (2021), arXiv:2011.13456; Lipman et al. (2022), Example I.
    """

    schedule: VESchedule

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        super().__init__(schedule=VESchedule(sigma_min, sigma_max))

    @property
    def sigma_min(self) -> float:
        """The smallest noise scale (at :math:`t = 1`)."""
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        """The largest noise scale (at :math:`t = 0`)."""
        return self.schedule.sigma_max

    @property
    def log_ratio(self) -> float:
        r""":math:`c = \ln(\sigma_{\max}/\sigma_{\min})`."""
        return self.schedule.log_ratio

    def __repr__(self) -> str:
        return f"VEPath(sigma_min={self.sigma_min}, sigma_max={self.sigma_max})"


class VPPath(AffineGaussianPath):
    r"""The variance-preserving path: :math:`a_t = \alpha_{1-t}`, :math:`s_t = \sqrt{1 - \alpha_{1-t}^2}`.

    With :math:`\alpha_s = e^{-T(s)/2}`, :math:`T(s) = \beta_{\min} s + \tfrac12 (\beta_{\max} -
    \beta_{\min}) s^2` and :math:`\beta(s) = \beta_{\min} + s (\beta_{\max} - \beta_{\min})`,

    .. math::

        u_t(x|x_1) = \tfrac12 \beta(1-t)\, \alpha \frac{x_1 - \alpha x}{1 - \alpha^2},
        \qquad \alpha = \alpha_{1-t}.

    :math:`1 - \alpha^2` is computed as ``-expm1(-T)`` (no cancellation near :math:`t = 1`), and
    :math:`s s'` as :math:`-\tfrac12 \beta \alpha^2` (no :math:`0 \cdot \infty`). Note
    :math:`s_1 = 0`: the field is singular at :math:`t = 1` (a ``ValueError`` there), and
    :math:`p_0 = \mathcal N(\alpha_1 x_1, (1-\alpha_1^2) I)` is only close to :math:`\mathcal N(0, I)`.
    The schedule is :class:`~cnftools.schedules.VPSchedule`.

    Args:
        beta_min: :math:`\beta_{\min} \ge 0`.
        beta_max: :math:`\beta_{\max} \ge \beta_{\min}`, > 0.

    Example:
        >>> import torch, cnftools
        >>> path = cnftools.VPPath(beta_min=0.1, beta_max=20.0)
        >>> round(float(path.mean(0.0, torch.ones(1, 1))), 5)  # alpha_1 = exp(-T(1)/2)
        0.00657

    References:
        Song et al. (2021), arXiv:2011.13456; Lipman et al. (2022), Example I.
    """

    schedule: VPSchedule

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        super().__init__(schedule=VPSchedule(beta_min, beta_max))

    @property
    def beta_min(self) -> float:
        r""":math:`\beta_{\min}`."""
        return self.schedule.beta_min

    @property
    def beta_max(self) -> float:
        r""":math:`\beta_{\max}`."""
        return self.schedule.beta_max

    def __repr__(self) -> str:
        return f"VPPath(beta_min={self.beta_min}, beta_max={self.beta_max})"
