r"""Velocity-field models: a plain MLP with a time embedding.

:class:`MLPField` is the standard network for flow matching on vectors (and on any event shape,
by flattening): the time :math:`t` is embedded with sinusoidal (or random Fourier) features,
concatenated to the flattened input, and passed through a multilayer perceptron with a smooth
activation,

.. math::

    v_\theta(x, t) = W_L\,\phi\big(\cdots \phi(W_1 [\mathrm{vec}(x), e(t)] + b_1) \cdots\big) + b_L.

Only smooth activations are offered (SiLU, softplus, tanh, GELU): ReLU makes :math:`v_\theta`
piecewise linear, its Jacobian jumps across kinks, and adaptive ODE solvers (dopri5) shrink their
step at every kink they cross, so likelihood evaluation stalls. ``activation="relu"`` is refused.

Any ``torch.nn.Module`` (or callable) with ``forward(x, t)`` works wherever cnftools takes a field;
this class is a convenient default, not a requirement.

References:
    Lipman et al., Flow Matching for Generative Modeling (2022), arXiv:2210.02747, App. E;
    Tancik et al., Fourier Features Let Networks Learn High Frequency Functions (2020),
    arXiv:2006.10739.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cnftools._checks import as_time, check_int
from cnftools.training.features import Conditioning, TimeEmbedding, TimeFeatures

__all__ = ["ACTIVATIONS", "ConvField", "MLPField"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}
"""The admissible activations: all are smooth (infinitely differentiable)."""

_NON_SMOOTH = ("relu", "leaky_relu", "leakyrelu", "relu6", "hardtanh", "hardswish", "elu", "selu")


def _smooth_activation(activation: str) -> str:
    """The activation's key in :data:`ACTIVATIONS`; a non-smooth one is refused (adaptive solvers
    stall at the kinks of a Jacobian that jumps)."""
    key = str(activation).lower()
    if key in _NON_SMOOTH:
        raise ValueError(
            f"activation={activation!r} is not smooth: the field's Jacobian jumps at its kinks "
            f"and adaptive ODE solvers stall there; use one of {sorted(ACTIVATIONS)}"
        )
    if key not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return key


def _layer_stack(
    widths: Sequence[int], activation: str, layer: Callable[[int, int], nn.Module]
) -> nn.Sequential:
    """``layer(w_0, w_1), act, layer(w_1, w_2), act, ..., layer(w_{n-1}, w_n)``."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(int(w) for w in widths)):
        layers.append(layer(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPField(nn.Module):
    r"""A multilayer-perceptron velocity field :math:`v_\theta(x, t)` with a time embedding.

    The input ``x`` of shape ``(B, *event)`` is flattened to ``(B, dim)``, concatenated with the
    time features :math:`e(t)` (see :class:`TimeEmbedding`), mapped through ``len(hidden)`` hidden
    layers with a smooth activation and a final linear layer back to ``dim``, and reshaped to
    ``x``'s shape.

    Args:
        dim: the flattened event size :math:`d = \prod \text{event}` (an ``int``), or the event
            shape itself (a tuple, e.g. ``(1, 8, 8)``); then inputs must have exactly that event
            shape.
        hidden: widths of the hidden layers (``()`` gives an affine field in ``x``).
        activation: ``"silu"`` (default), ``"softplus"``, ``"tanh"`` or ``"gelu"``. ReLU-like,
            non-smooth activations are refused (adaptive solvers stall on their kinks).
        time: the time embedding (:class:`~cnftools.training.features.TimeFeatures`: kind,
            width, frequencies); default sinusoidal with 13 features.
        zero_init_output: start from :math:`v_\theta \equiv 0` (last layer zeroed).
        num_classes: make the field class-conditional, :math:`v_\theta(x, t, y)` with integer
            labels :math:`y \in \{0, \dots, \text{num\_classes} - 1\}`, embedded in
            ``class_features`` dimensions (an ``nn.Embedding``) and concatenated to the input.
        cond_dim: make the field conditional on a vector :math:`y` of ``cond_dim`` features,
            concatenated to the input. At most one of ``num_classes`` and ``cond_dim``.
        class_features: width of the class embedding.
        device: where to create the parameters.
        dtype: parameter dtype (default: torch's default dtype).

    Shapes:
        ``forward(x, t, y=None)``: ``x`` is ``(B, *event)``; ``t`` is a float, a 0-dim tensor or
        ``(B,)`` (expanded to ``(B,)``, cast to ``x``'s dtype); ``y`` (conditional fields only)
        is an integer ``(B,)`` tensor of labels or a ``(B, cond_dim)`` tensor of ``x``'s dtype.
        Returns ``(B, *event)``.

    Example:
        >>> import torch, cnftools
        >>> _ = torch.manual_seed(0)
        >>> v = cnftools.MLPField(2, hidden=(32, 32))
        >>> v(torch.randn(5, 2), torch.rand(5)).shape
        torch.Size([5, 2])
        >>> v2 = cnftools.MLPField.from_config(v.config())
        >>> _ = v2.load_state_dict(v.state_dict())
        >>> x = torch.randn(3, 2)
        >>> bool(torch.equal(v(x, 0.5), v2(x, 0.5)))
        True
        >>> labelled = cnftools.MLPField(2, hidden=(16,), num_classes=10)
        >>> labelled(x, 0.5, y=torch.tensor([0, 3, 9])).shape
        torch.Size([3, 2])

    References:
        Lipman et al. (2022), arXiv:2210.02747, App. E (MLP fields for 2-D data);
        Dhariwal and Nichol (2021), arXiv:2105.05233 (class-conditional models).
    """

    def __init__(
        self,
        dim: int | Sequence[int],
        hidden: Sequence[int] = (256, 256, 256),
        *,
        activation: str = "silu",
        time: TimeFeatures = TimeFeatures(),
        zero_init_output: bool = False,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        class_features: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.conditioning = Conditioning(num_classes, cond_dim, class_features)
        if isinstance(dim, bool):
            raise TypeError("dim must be an int or a tuple of ints (the event shape), got bool")
        if isinstance(dim, int):
            check_int("dim", dim, low=1)
            self.event_shape: tuple[int, ...] | None = None
            self.dim = dim
        elif isinstance(dim, Sequence) and len(dim) > 0:
            for size in dim:
                check_int("dim (event shape entry)", size, low=1)
            self.event_shape = tuple(int(s) for s in dim)
            self.dim = math.prod(self.event_shape)
        else:
            raise TypeError(f"dim must be an int or a non-empty tuple of ints, got {dim!r}")
        if isinstance(hidden, int) or not isinstance(hidden, Sequence):
            raise TypeError(
                f"hidden must be a sequence of layer widths, e.g. (256, 256), got {hidden!r}"
            )
        for width in hidden:
            check_int("hidden (layer width)", width, low=1)
        key = _smooth_activation(activation)
        self.time_embedding = TimeEmbedding(time)
        self._config: dict[str, Any] = {
            "dim": list(self.event_shape) if self.event_shape is not None else self.dim,
            "hidden": [int(h) for h in hidden],
            "activation": key,
            **time.config(),
            "zero_init_output": bool(zero_init_output),
            **self.conditioning.config(),
        }
        widths = [self.dim + time.features + self.conditioning.features, *hidden, self.dim]
        self.net = _layer_stack(widths, key, nn.Linear)
        if zero_init_output:
            last = self.net[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def conditional(self) -> bool:
        """Whether this field takes labels ``y`` (built with ``num_classes=`` or ``cond_dim=``).
        :func:`cnftools.dataset_nll` reads it to pass a labelled dataset's ``y`` or drop it."""
        return self.conditioning.conditional

    def forward(self, x: Tensor, t: float | Tensor, y: Tensor | None = None) -> Tensor:
        """Evaluate :math:`v_\\theta(x, t[, y])`; ``x`` is ``(B, *event)``, the result has its shape.

        Shapes are checked (cheaply, without a device synchronisation); values are not, except
        class labels (one synchronisation: an out-of-range label raises ``ValueError``).
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(
                f"x must have shape (B, *event), got {tuple(x.shape)}; "
                "add a batch dimension, e.g. x[None]"
            )
        event = tuple(x.shape[1:])
        if self.event_shape is not None and event != self.event_shape:
            raise ValueError(f"x must have event shape {self.event_shape}, got {event}")
        if math.prod(event) != self.dim:
            raise ValueError(
                f"x has event shape {event} ({math.prod(event)} values) "
                f"but this MLPField has dim={self.dim}"
            )
        batch = x.shape[0]
        tt = self._time(t, x)
        flat = x.reshape(batch, self.dim)
        weight = self.net[0].weight
        if weight.dtype != x.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the field's parameters are {weight.dtype}; "
                f"convert one of them, e.g. field.to({x.dtype})"
            )
        parts = [flat, self.time_embedding(tt), *self.conditioning(y, x)]
        return self.net(torch.cat(parts, dim=1)).reshape(x.shape)

    @staticmethod
    def _time(t: float | Tensor, x: Tensor) -> Tensor:
        return as_time(t, x, check_values=False)

    def config(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict (ints, floats, strs, bools, lists).

        Safe to store next to the ``state_dict`` and reload with ``torch.load(weights_only=True)``.
        """
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> MLPField:
        """Build an untrained field from :meth:`config`'s dict; ``overrides`` (e.g. dtype) win.

        The ``time_*`` entries of the dict (the stored form of :class:`TimeFeatures`, the same
        as cnftools 0.1 wrote) become the ``time=`` argument.
        """
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a dict from MLPField.config(), got {type(cfg).__name__}")
        args = dict(cfg)
        args.update(overrides)
        if "dim" not in args:
            raise ValueError("cfg has no 'dim' entry; pass the dict returned by MLPField.config()")
        dim = args.pop("dim")
        if isinstance(dim, list | tuple):
            dim = tuple(dim)
        hidden = tuple(args.pop("hidden", (256, 256, 256)))
        return cls(dim, hidden, time=TimeFeatures.pop_config(args), **args)

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"dim={c['dim']}, hidden={tuple(c['hidden'])}, time_embedding={c['time_embedding']!r}, "
            f"activation={c['activation']!r}{self.conditioning.describe()}"
        )


class ConvField(nn.Module):
    r"""A small convolutional velocity field for images ``(B, C, H, W)``.

    The time features :math:`e(t)` (and, for a conditional field, the class embedding or the
    conditioning vector) are broadcast over the image as extra channels, then ``len(hidden)``
    3×3 convolutions (padding 1) with a smooth activation and a final 3×3 convolution back to
    ``C`` channels:

    .. math::

        v_\theta(x, t) = K_L * \phi\big(\cdots \phi(K_1 * [x, e(t) \mathbf 1_{H\times W}]
        + b_1) \cdots\big) + b_L .

    No normalisation layers (they couple the samples of a batch or the pixels, which makes the
    divergence of one sample depend on the others) and only smooth activations, as for
    :class:`MLPField`.

    Args:
        channels: the image channels :math:`C`.
        hidden: channel widths of the hidden convolutions.
        activation: ``"silu"`` (default), ``"softplus"``, ``"tanh"`` or ``"gelu"``.
        time: the time embedding (:class:`~cnftools.training.features.TimeFeatures`).
        zero_init_output: start from :math:`v_\theta \equiv 0` (last convolution zeroed).
        num_classes: class-conditional with integer labels ``y`` (see :class:`Conditioning`).
        cond_dim: conditional on a ``(B, cond_dim)`` vector ``y``.
        class_features: width of the class embedding.
        device: where to create the parameters.
        dtype: parameter dtype (default: torch's default dtype).

    Shapes:
        ``forward(x, t, y=None)``: ``x`` is ``(B, C, H, W)`` (any ``H, W``); ``t`` a float, a 0-dim
        tensor or ``(B,)``. Returns ``(B, C, H, W)``.

    Example:
        >>> import torch, cnftools
        >>> _ = torch.manual_seed(0)
        >>> v = cnftools.training.models.ConvField(1, hidden=(8, 8), num_classes=10)
        >>> x = torch.randn(2, 1, 8, 8)
        >>> v(x, 0.5, y=torch.tensor([3, 7])).shape
        torch.Size([2, 1, 8, 8])
        >>> v2 = cnftools.training.models.ConvField.from_config(v.config())
        >>> _ = v2.load_state_dict(v.state_dict())
        >>> bool(torch.equal(v(x, 0.5, y=torch.tensor([3, 7])), v2(x, 0.5, y=torch.tensor([3, 7]))))
        True

    References:
        Ho et al., Denoising Diffusion Probabilistic Models (2020), arXiv:2006.11239 (convolutional
        noise predictors); Lipman et al. (2022), arXiv:2210.02747, App. E.
    """

    def __init__(
        self,
        channels: int,
        hidden: Sequence[int] = (32, 32),
        *,
        activation: str = "silu",
        time: TimeFeatures = TimeFeatures(),
        zero_init_output: bool = False,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        class_features: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_int("channels", channels, low=1)
        if isinstance(hidden, int) or not isinstance(hidden, Sequence):
            raise TypeError(
                f"hidden must be a sequence of channel widths, e.g. (32, 32), got {hidden!r}"
            )
        for width in hidden:
            check_int("hidden (channel width)", width, low=1)
        key = _smooth_activation(activation)
        self.conditioning = Conditioning(num_classes, cond_dim, class_features)
        self.channels = channels
        self.time_embedding = TimeEmbedding(time)
        self._config: dict[str, Any] = {
            "channels": int(channels),
            "hidden": [int(h) for h in hidden],
            "activation": key,
            **time.config(),
            "zero_init_output": bool(zero_init_output),
            **self.conditioning.config(),
        }
        widths = [channels + time.features + self.conditioning.features, *hidden, channels]
        self.net = _layer_stack(
            widths, key, lambda n_in, n_out: nn.Conv2d(n_in, n_out, kernel_size=3, padding=1)
        )
        if zero_init_output:
            last = self.net[-1]
            assert isinstance(last, nn.Conv2d)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @property
    def conditional(self) -> bool:
        """Whether this field takes labels ``y`` (built with ``num_classes=`` or ``cond_dim=``).
        :func:`cnftools.dataset_nll` reads it to pass a labelled dataset's ``y`` or drop it."""
        return self.conditioning.conditional

    def forward(self, x: Tensor, t: float | Tensor, y: Tensor | None = None) -> Tensor:
        """Evaluate :math:`v_\\theta(x, t[, y])` on images ``x`` of shape ``(B, C, H, W)``."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(
                f"x must have shape (B, C, H, W) with C = {self.channels}, got {tuple(x.shape)}"
            )
        weight = self.net[0].weight
        if weight.dtype != x.dtype:
            raise TypeError(
                f"x has dtype {x.dtype} but the field's parameters are {weight.dtype}; "
                f"convert one of them, e.g. field.to({x.dtype})"
            )
        height, width = x.shape[2:]
        features = [self.time_embedding(MLPField._time(t, x)), *self.conditioning(y, x)]
        planes = torch.cat(features, dim=1)[:, :, None, None].expand(-1, -1, height, width)
        return self.net(torch.cat([x, planes], dim=1))

    def config(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict (see :meth:`MLPField.config`)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> ConvField:
        """Build an untrained field from :meth:`config`'s dict; ``overrides`` (e.g. dtype) win."""
        if not isinstance(cfg, dict) or "channels" not in cfg:
            raise ValueError("cfg must be the dict returned by ConvField.config()")
        args = dict(cfg)
        args.update(overrides)
        channels = args.pop("channels")
        hidden = tuple(args.pop("hidden", (32, 32)))
        return cls(channels, hidden, time=TimeFeatures.pop_config(args), **args)

    def extra_repr(self) -> str:
        c = self._config
        return (
            f"channels={c['channels']}, hidden={tuple(c['hidden'])}, "
            f"activation={c['activation']!r}{self.conditioning.describe()}"
        )
