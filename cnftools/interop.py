r"""Models trained elsewhere as cnftools velocity fields: noise, data and score predictions, diffusers.

A diffusion model is flow matching on an affine Gaussian path :math:`x = a_t x_1 + s_t \varepsilon`
(docs/guide/diffusion.md): whatever it predicts -- the noise :math:`\hat\varepsilon`, the clean sample
:math:`\hat x_1` or the score :math:`\nabla \log p_t = -\hat\varepsilon / s_t` -- determines the
velocity

.. math::

    u_t(x) = a_t' \hat x_1 + s_t' \hat\varepsilon,

and with it the probability-flow ODE whose likelihood :func:`cnftools.log_likelihood` computes.
:func:`as_velocity` wraps any such model as an ``nn.Module`` field ``v(x, t, **extras)``;
:func:`from_diffusers` does it for a diffusers ``UNet2DModel`` and its DDPM/DDIM scheduler.

Time convention: cnftools' ``t`` runs from 0 (noise) to 1 (data). A model's own time input (a
diffusion time :math:`\tau = 1 - t`, or a timestep label) is given by ``time=``.

References:
    Song et al., Score-Based Generative Modeling through Stochastic Differential Equations (2021),
    arXiv:2011.13456; Ho et al., Denoising Diffusion Probabilistic Models (2020),
    arXiv:2006.11239; Salimans and Ho, Progressive Distillation (2022), arXiv:2202.00512 (the
    ``v`` prediction); Lipman et al., Flow Matching Guide and Code (2024), arXiv:2412.06264.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from cnftools._checks import as_time, check_batched, check_int, check_real
from cnftools.fields import check_output_like, field_name, is_shape_error, select_extras
from cnftools.paths import AffineGaussianPath, VPPath

__all__ = ["PREDICTIONS", "SCALAR_TIME", "PredictionField", "as_velocity", "from_diffusers"]

PREDICTIONS = ("velocity", "epsilon", "data", "score")
"""What a model may predict: the velocity itself, the noise, the clean data or the score."""

_ARGUMENT_ORDERS = ("x,t", "t,x")
SCALAR_TIME = "scalar"
"""``as_velocity(..., time="scalar")``: the model takes one 0-dim time for the whole batch."""
_DIFFUSERS_PREDICTIONS = {"epsilon": "epsilon", "sample": "data", "v_prediction": "data"}


class PredictionField(nn.Module):
    r"""A velocity field :math:`v(x, t)` made from a model that predicts something else.

    Built by :func:`as_velocity`; see there for the arguments. ``forward(x, t, **extras)`` calls
    the model as ``model(x, time(t'), **extras)`` (or ``model(time(t'), x, **extras)``) with
    :math:`t' = \min(t, t_{\max})` and converts its prediction with the path's
    ``velocity_from_*`` method at :math:`t'`. With ``time="scalar"`` the model gets one 0-dim
    time per call instead: once for a batch whose rows share their time, else once per distinct
    time (once per row where ``t`` requires a gradient). A model that is an ``nn.Module`` is
    registered as a submodule, so ``.parameters()``, ``.to()`` and ``.eval()`` reach it.
    """

    def __init__(
        self,
        model: Callable[..., Any],
        path: AffineGaussianPath | None,
        prediction: str,
        time: Callable[[Tensor], Tensor] | str | None,
        argument_order: str,
        t_max: float | None,
    ) -> None:
        super().__init__()
        self.model = model
        self.path = path
        self.prediction = prediction
        self.time = time
        self.argument_order = argument_order
        self.t_max = t_max

    def forward(self, x: Tensor, t: float | Tensor, **extras: Any) -> Tensor:
        """The velocity at ``x`` (shape ``(B, *event)``) and ``t`` (float, 0-dim or ``(B,)``)."""
        x = check_batched("x", x)
        t = as_time(t, x)
        if self.t_max is not None:
            t = torch.clamp(t, max=self.t_max)
        if self.time == SCALAR_TIME:
            out = self._call_scalar_time(x, t, extras)
        else:
            out = self._call(x, t if self.time is None else self.time(t), extras)
        out = _check_prediction(self.model, self.prediction, out, x)
        if self.prediction == "velocity":
            return out
        assert self.path is not None
        convert = getattr(self.path, f"velocity_from_{self.prediction}")
        return convert(out, x, t)

    @property
    def shares_time(self) -> bool:
        """True with ``time="scalar"``: an ODE solve then gives all rows one shared step, so the
        model is called once per evaluation (with per-row steps every row would have its own
        time, and the model would be called once per row)."""
        return self.time == SCALAR_TIME

    def _call(self, x: Tensor, model_time: Tensor, extras: dict[str, Any]) -> Any:
        try:
            if self.argument_order == "x,t":
                return self.model(x, model_time, **extras)
            return self.model(model_time, x, **extras)
        except (RuntimeError, IndexError) as error:
            shape_error = isinstance(error, IndexError) or is_shape_error(error)
            if self.time == SCALAR_TIME and self.argument_order == "x,t" and shape_error:
                raise type(error)(
                    f"model {field_name(self.model)} failed when called as model(x, t) with x of "
                    f"shape {tuple(x.shape)} and one 0-dim time (time='scalar'): {error}\nHint: "
                    "if it is called as model(t, x) (torchdiffeq, torchdyn, torchcfm's "
                    'torch_wrapper) pass argument_order="t,x" to as_velocity'
                ) from error
            if (
                isinstance(error, IndexError)
                or self.time == SCALAR_TIME
                or model_time.dim() == 0
                or not shape_error
            ):
                raise
            order = (
                "if it is called as model(t, x) (torchdiffeq, torchdyn, torchcfm) pass "
                'argument_order="t,x"; '
                if self.argument_order == "x,t"
                else ""
            )
            raise RuntimeError(
                f"model {field_name(self.model)} failed when called as "
                f"{'model(x, time(t))' if self.argument_order == 'x,t' else 'model(time(t), x)'} "
                f"with x of shape "
                f"{tuple(x.shape)} and time(t) of shape {tuple(model_time.shape)} (one time per "
                f"row): {error}\nHint: {order}if the model takes one scalar time for the whole "
                "batch (torchcfm's torch_wrapper does t.repeat(x.shape[0]); torchdyn and "
                'torchdiffeq-style f(t, x) models too), pass time="scalar" to as_velocity'
            ) from error

    def _call_scalar_time(self, x: Tensor, t: Tensor, extras: dict[str, Any]) -> Tensor:
        """The model on one 0-dim time per call: once when every row has the same time (always
        so inside an ODE solve, where ``t`` is one time expanded), else once per distinct time,
        or once per row where ``t`` requires a gradient (each row's own time then gets its own
        derivative)."""
        batch = x.shape[0]
        if batch <= 1 or t.stride(0) == 0:  # one time expanded to the batch: no host sync
            return self._call(x, t[0], extras)
        if t.requires_grad:
            groups = list(torch.arange(batch, device=t.device)[:, None])
        else:
            if bool((t == t[0]).all()):
                return self._call(x, t[0], extras)
            _, inverse = torch.unique(t, return_inverse=True)
            groups = [(inverse == k).nonzero().squeeze(1) for k in range(int(inverse.max()) + 1)]
        outs = []
        for rows in groups:
            part = self._call(x[rows], t[rows[0]], select_extras(extras, batch, rows))
            outs.append(_check_prediction(self.model, self.prediction, part, x[rows]))
        position = torch.cat(groups)
        return torch.cat(outs)[torch.argsort(position)]

    def extra_repr(self) -> str:
        time = ", time='scalar'" if self.time == SCALAR_TIME else ""
        return (
            f"prediction={self.prediction!r}, path={self.path!r}, "
            f"argument_order={self.argument_order!r}{time}, t_max={self.t_max}"
        )


def _check_prediction(model: object, prediction: str, out: object, x: Tensor) -> Tensor:
    return check_output_like(
        out,
        x,
        f"model {field_name(model)}",
        f"its {prediction} prediction must have x's shape",
        f" (its {prediction} prediction); for outputs with a .sample attribute use from_diffusers",
    )


def as_velocity(
    model: Callable[..., Any],
    path: AffineGaussianPath | None = None,
    *,
    prediction: str = "velocity",
    time: Callable[[Tensor], Tensor] | str | None = None,
    argument_order: str = "x,t",
    t_max: float | None = None,
) -> PredictionField:
    r"""Turn a model that predicts the velocity, noise, data or score into a velocity field.

    For a path :math:`x = a_t x_1 + s_t \varepsilon` the prediction is converted by the path's
    :meth:`~cnftools.AffineGaussianPath.velocity_from_epsilon`,
    :meth:`~cnftools.AffineGaussianPath.velocity_from_data` or
    :meth:`~cnftools.AffineGaussianPath.velocity_from_score`, e.g.

    .. math::

        v(x, t) = \frac{a_t'}{a_t}\, x + \frac{a_t' s_t^2 - a_t s_t s_t'}{a_t}\, s_\theta(x, \tau(t))

    for a score model :math:`s_\theta`. The result is an ``nn.Module`` field: pass it to
    :func:`cnftools.log_likelihood`, :func:`cnftools.sample` or :func:`cnftools.divergence`.

    Args:
        model: a callable (an ``nn.Module`` or a function) returning a tensor of ``x``'s shape,
            dtype and device. Keyword arguments of the field call, ``v(x, t, **extras)`` (class
            labels, conditioning), are passed on to it.
        path: the :class:`~cnftools.AffineGaussianPath` the model was trained on; required unless
            ``prediction="velocity"``.
        prediction: ``"velocity"``, ``"epsilon"``, ``"data"`` (the clean sample :math:`\hat x_1`)
            or ``"score"`` (:math:`\nabla \log p_t`).
        time: maps cnftools' time ``t`` (shape ``(B,)``, 0 = noise, 1 = data) to the model's time
            input, e.g. ``lambda t: 1 - t`` for a diffusion time :math:`\tau` or
            ``lambda t: 999 * (1 - t)`` for a DDPM timestep label. ``None`` passes ``t``.
            ``"scalar"``: the model takes one 0-dim time for the whole batch, as torchdiffeq,
            torchdyn and torchcfm models do (torchcfm's ``torch_wrapper`` computes
            ``t.repeat(x.shape[0])``), in cnftools' time convention (0 = noise, the one of
            torchcfm and flow_matching). An ODE solve then gives the batch's rows one shared step
            (``shares_time``), so every row has the same time and the model is called once per
            evaluation (the rows' steps, and so their numbers, then depend on the batch); for a batch of different times (training, or
            :func:`cnftools.divergence` at per-row ``t``) it is called once per distinct time,
            with that time's rows (and their per-row extras), or once per row when ``t``
            requires a gradient. For a scalar model on another time scale, wrap it:
            ``lambda t, x: model(1 - t, x)``.
        argument_order: ``"x,t"`` calls ``model(x, time(t))``; ``"t,x"`` calls
            ``model(time(t), x)`` (torchdiffeq / torchdyn / torchcfm style).
        t_max: if given, the model and the conversion are evaluated at :math:`\min(t, t_{\max})`:
            the field is frozen on :math:`[t_{\max}, 1]`. Needed where a conversion is singular
            at :math:`t = 1` (noise prediction on VP, where :math:`s_1 = 0`); without it such a
            field raises ``ValueError`` at :math:`t = 1`.

    Returns:
        A :class:`PredictionField`, an ``nn.Module`` with ``forward(x, t, **extras)``.

    Raises:
        TypeError: ``model`` or ``time`` is not callable, or ``path`` is not an
            :class:`~cnftools.AffineGaussianPath` where one is needed.
        ValueError: an unknown ``prediction``, ``argument_order`` or ``time`` string, or
            ``t_max`` outside ``(0, 1]``.
        RuntimeError: (when the field is called) a model that fails on a ``(B,)`` time with a
            shape error; the message points at ``argument_order`` and ``time="scalar"``.

    Example:
        >>> import torch, cnftools
        >>> path = cnftools.VPPath(0.1, 20.0)
        >>> score_model = lambda x, tau: -x  # the exact score of N(0, I) data on VP
        >>> v = cnftools.as_velocity(score_model, path, prediction="score", time=lambda t: 1 - t)
        >>> x = torch.randn(4, 2, dtype=torch.float64)
        >>> bool(torch.allclose(v(x, 0.3), torch.zeros_like(x)))  # N(0, I) stays put on VP
        True

        A model that takes one scalar time, called as ``f(t, x)`` (torchdiffeq / torchcfm style):

        >>> f = lambda t, x: -x + t.repeat(x.shape[0])[:, None]
        >>> v = cnftools.as_velocity(f, argument_order="t,x", time="scalar")
        >>> v(torch.zeros(2, 1), torch.tensor([0.25, 0.5]))
        tensor([[0.2500],
                [0.5000]])

    References:
        Song et al. (2021), arXiv:2011.13456, eq. (13); Lipman et al., Flow Matching Guide and
        Code (2024), arXiv:2412.06264.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    if (path is not None or prediction != "velocity") and not isinstance(path, AffineGaussianPath):
        raise TypeError(
            f"prediction={prediction!r} needs the path the model was trained on, an "
            f"AffineGaussianPath (OTPath, VEPath, VPPath or your own), got "
            f"{type(path).__name__}"
        )
    if isinstance(time, str):
        if time != SCALAR_TIME:
            raise ValueError(
                f"time must be None, a callable of t or {SCALAR_TIME!r} (a model that takes one "
                f"scalar time), got {time!r}"
            )
    elif time is not None and not callable(time):
        raise TypeError(
            f"time must be None, a callable of t or {SCALAR_TIME!r}, got {type(time).__name__}"
        )
    if argument_order not in _ARGUMENT_ORDERS:
        raise ValueError(
            f"argument_order must be one of {_ARGUMENT_ORDERS}, got {argument_order!r}"
        )
    if t_max is not None:
        t_max = check_real("t_max", t_max, expected="None or a real number")
        if not 0 < t_max <= 1:
            raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
    return PredictionField(model, path, prediction, time, argument_order, t_max)


class _DiffusersModel(nn.Module):
    """The diffusers model in cnftools time: timestep (N - 1)(1 - t), ``.sample`` unwrapped, and a
    ``v`` prediction turned into the clean sample."""

    def __init__(self, unet: Callable[..., Any], path: VPPath, steps: int, kind: str) -> None:
        super().__init__()
        self.unet = unet
        self.path = path
        self.steps = steps
        self.kind = kind

    def forward(self, x: Tensor, t: Tensor, **extras: Any) -> Tensor:
        timestep = (self.steps - 1) * (1 - t)
        out = self.unet(x, timestep, **extras)
        out = getattr(out, "sample", out)
        if self.kind != "v_prediction" or not isinstance(out, Tensor) or out.shape != x.shape:
            return out
        # diffusers: v = alpha eps - sigma x0 with x = alpha x0 + sigma eps and alpha^2 + sigma^2
        # = 1 (VPPath: a_t^2 + s_t^2 = 1 exactly), so x0 = alpha x - sigma v.
        tb = t.reshape(-1, *([1] * (x.dim() - 1)))
        return self.path.signal_scale(tb) * x - self.path.noise_scale(tb) * out


def _config_value(config: object, key: str, default: object = None) -> object:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def from_diffusers(
    unet: Callable[..., Any], scheduler: object, *, eps: float = 1e-5
) -> tuple[PredictionField, VPPath]:
    r"""A diffusers DDPM model as a cnftools velocity field on the matching VP path.

    A DDPM with :math:`N` steps and linear :math:`\beta_n` from ``beta_start`` to ``beta_end``
    discretises the VP SDE with :math:`\beta_{\min} = N \beta_{\text{start}}`,
    :math:`\beta_{\max} = N \beta_{\text{end}}` (Song et al. 2021, App. B), so the model is read on
    ``VPPath(beta_min, beta_max)``, at the diffusion time :math:`\tau = 1 - t` and the timestep
    label :math:`(N - 1)\tau`, as score_sde does. Its prediction (``scheduler.config.prediction_type``)
    is converted to the velocity of the probability-flow ODE:

    - ``"epsilon"``: :math:`\hat\varepsilon`, by :meth:`~cnftools.AffineGaussianPath.velocity_from_epsilon`;
    - ``"sample"``: :math:`\hat x_1`, by :meth:`~cnftools.AffineGaussianPath.velocity_from_data`;
    - ``"v_prediction"``: :math:`\hat v = \alpha \hat\varepsilon - \sigma \hat x_1` with
      :math:`\alpha = a_t`, :math:`\sigma = s_t`, so :math:`\hat x_1 = a_t x - s_t \hat v`
      (:math:`a_t^2 + s_t^2 = 1` on VP), then as ``"sample"``.

    **The end point.** At :math:`t = 1` (:math:`\tau = 0`), :math:`s_t = 0` and the conversion
    is singular, so the model and the conversion are evaluated at :math:`\min(t, 1 - \varepsilon)`
    (score_sde starts its likelihood ODE at :math:`\tau = \varepsilon = 10^{-5}`): the field is
    finite on all of :math:`[0, 1]` and frozen on :math:`[1 - \varepsilon, 1]`.
    ``cnftools.log_likelihood(field, x, ...)`` is then the exact log-density of the flow of this
    field, which differs from the probability-flow density of the model at :math:`\tau = 0` by the
    flow over that last interval of length :math:`\varepsilon` (:math:`O(\varepsilon)` nats, far
    below the solver error for the default ``eps``). As for any diffusion model, :math:`p_0` of
    the VP path is only close to :math:`\mathcal N(0, I)` (:math:`a_0 = e^{-T(1)/2}`).

    Args:
        unet: a diffusers ``UNet2DModel`` or any model called as ``unet(x, timestep, **extras)``
            that returns a tensor of ``x``'s shape or an object with such a ``.sample``. Cast it
            to the data's dtype and device first (``unet.double()`` for float64 likelihoods).
        scheduler: a ``DDPMScheduler`` or ``DDIMScheduler`` (anything with a ``config`` holding
            ``num_train_timesteps``, ``beta_schedule="linear"``, ``beta_start``, ``beta_end`` and
            ``prediction_type``).
        eps: the clipping :math:`\varepsilon` of the diffusion time, in ``(0, 0.5)``.

    Returns:
        ``(field, path)``: the velocity field (an ``nn.Module``, ``field(x, t, **extras)``;
        extras such as ``class_labels=`` reach the UNet) and the ``VPPath``.

    Raises:
        TypeError: ``unet`` is not callable or ``scheduler`` has no ``config``.
        ValueError: a schedule other than linear betas (``scaled_linear``, ``squaredcos_cap_v2``,
            trained betas, zero-SNR rescaling), an unknown ``prediction_type``, or a bad ``eps``.

    Example:
        >>> import types, torch, cnftools
        >>> config = dict(
        ...     num_train_timesteps=1000,
        ...     beta_schedule="linear",
        ...     beta_start=1e-4,
        ...     beta_end=0.02,
        ...     prediction_type="epsilon",
        ... )
        >>> scheduler = types.SimpleNamespace(config=config)
        >>> eps_model = lambda x, timestep: torch.zeros_like(x)  # a stand-in for a UNet
        >>> field, path = cnftools.interop.from_diffusers(eps_model, scheduler)
        >>> path
        VPPath(beta_min=0.1, beta_max=20.0)
        >>> field(torch.ones(2, 3), 1.0).shape
        torch.Size([2, 3])

    References:
        Song et al. (2021), arXiv:2011.13456, App. B and D.2; Ho et al. (2020), arXiv:2006.11239;
        Salimans and Ho (2022), arXiv:2202.00512, App. D.
    """
    if not callable(unet):
        raise TypeError(f"unet must be callable, got {type(unet).__name__}")
    config = getattr(scheduler, "config", None)
    if config is None:
        raise TypeError(
            "scheduler must be a diffusers scheduler (an object with a .config), got "
            f"{type(scheduler).__name__}"
        )
    schedule = _config_value(config, "beta_schedule")
    if schedule != "linear":
        raise ValueError(
            f"from_diffusers supports linear betas only (the VP SDE of DDPM); the scheduler has "
            f"beta_schedule={schedule!r}, whose continuous-time path is not a VPPath"
        )
    if _config_value(config, "trained_betas") is not None:
        raise ValueError("from_diffusers does not support a scheduler with trained_betas")
    if _config_value(config, "rescale_betas_zero_snr", False):
        raise ValueError("from_diffusers does not support rescale_betas_zero_snr=True")
    steps = _config_value(config, "num_train_timesteps")
    steps = check_int("scheduler num_train_timesteps", steps, low=2)
    start, end = _config_value(config, "beta_start"), _config_value(config, "beta_end")
    for name, value in (("beta_start", start), ("beta_end", end)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"scheduler {name} must be a finite number, got {value!r}")
    kind = _config_value(config, "prediction_type", "epsilon")
    if kind not in _DIFFUSERS_PREDICTIONS:
        raise ValueError(
            f"scheduler prediction_type must be one of {tuple(_DIFFUSERS_PREDICTIONS)}, "
            f"got {kind!r}"
        )
    if isinstance(eps, bool) or not isinstance(eps, Real) or not 0 < eps < 0.5:
        raise ValueError(f"eps must be a number in (0, 0.5), got {eps!r}")
    path = VPPath(beta_min=steps * float(start), beta_max=steps * float(end))
    model = _DiffusersModel(unet, path, steps, str(kind))
    field = as_velocity(
        model, path, prediction=_DIFFUSERS_PREDICTIONS[str(kind)], t_max=1.0 - float(eps)
    )
    return field, path
