r"""Velocity-field models: an MLP and a small convolutional network, each with a time embedding
and an optional conditioning input (a class label or a vector).

:class:`MLPField` is the standard network for flow matching on vectors (and on any event shape,
by flattening): the time :math:`t` is embedded with sinusoidal (or random Fourier) features,
concatenated to the flattened input, and passed through a multilayer perceptron with a smooth
activation,

.. math::

    v_\theta(x, t) = W_L\,\phi\big(\cdots \phi(W_1 [\mathrm{vec}(x), e(t)] + b_1) \cdots\big) + b_L.

Only smooth activations are offered (SiLU, softplus, tanh, GELU): ReLU makes :math:`v_\theta`
piecewise linear, its Jacobian jumps across kinks, and adaptive ODE solvers (dopri5) shrink their
step at every kink they cross, so likelihood evaluation stalls. ``activation="relu"`` is refused.

:class:`ConvField` is the image counterpart for ``(B, C, H, W)`` inputs: 3×3 convolutions with
padding that keeps the shape, SiLU, and the time features added to every hidden layer as a
per-channel bias,

.. math::

    h_0 = x, \qquad h_{l} = \phi\big(K_l * h_{l-1} + A_l\, c + b_l\big), \qquad
    v_\theta(x, t) = K_{L+1} * h_L + b_{L+1},

where :math:`c = [e(t), e_y(y)]` holds the time features and, for a conditional field, the
features of the condition :math:`y` (see :class:`ConditionEmbedding`).

Both accept a conditioning input ``forward(x, t, y=None)`` when built with ``num_classes=`` (``y``
holds integer class labels, embedded by a learned table) or ``cond_dim=`` (``y`` holds vectors,
used as they are); cnftools passes it through ``extras={"y": labels}`` (docs/guide/conditional.md).
A conditional field called without ``y``, or an unconditional one given ``y``, raises.

Any ``torch.nn.Module`` (or callable) with ``forward(x, t)`` works wherever cnftools takes a field;
these classes are convenient defaults, not a requirement.

References:
    Lipman et al., Flow Matching for Generative Modeling (2022), arXiv:2210.02747, App. E;
    Tancik et al., Fourier Features Let Networks Learn High Frequency Functions (2020),
    arXiv:2006.10739.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor, nn

from cnftools._checks import as_time

__all__ = [
    "ACTIVATIONS",
    "TIME_EMBEDDINGS",
    "ConditionEmbedding",
    "ConvField",
    "MLPField",
    "TimeEmbedding",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
}
"""The admissible activations: all are smooth (infinitely differentiable)."""

TIME_EMBEDDINGS = ("sinusoidal", "fourier", "linear")
"""The admissible time embeddings of :class:`TimeEmbedding`."""

_NON_SMOOTH = ("relu", "leaky_relu", "leakyrelu", "relu6", "hardtanh", "hardswish", "elu", "selu")


class TimeEmbedding(nn.Module):
    r"""Features of the time :math:`t`, shape ``(B,) -> (B, features)``.

    * ``"sinusoidal"`` (deterministic): :math:`e(t) = [t, \sin(\omega_k t), \cos(\omega_k t)]_{k<K}`
      with geometric frequencies :math:`\omega_k = \pi\,\omega_{\max}^{k/(K-1)}`,
      :math:`K = \lfloor (\text{features} - 1)/2 \rfloor`, so the slowest feature varies once over
      :math:`[0, 1]` and the fastest :math:`\omega_{\max}/2` times.
    * ``"fourier"`` (random, Tancik et al. 2020): the same form with :math:`\omega_k \sim
      \mathcal N(0, (2\pi\,\text{scale})^2)` drawn once from ``seed`` (reproduced from the
      config, so they need not travel in the ``state_dict``).
    * ``"linear"``: :math:`e(t) = [t]` (``features`` must be 1).

    Args:
        kind: one of :data:`TIME_EMBEDDINGS`.
        features: output width (odd widths use all features; an even width leaves one zero pad).
        max_frequency: :math:`\omega_{\max}` for ``"sinusoidal"``.
        scale: standard deviation of the frequencies (in cycles per unit time) for ``"fourier"``.
        seed: seed for the ``"fourier"`` frequencies.
    """

    def __init__(
        self,
        kind: str = "sinusoidal",
        features: int = 13,
        *,
        max_frequency: float = 8.0,
        scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in TIME_EMBEDDINGS:
            raise ValueError(f"time_embedding must be one of {TIME_EMBEDDINGS}, got {kind!r}")
        _check_int("time_features", features, 1)
        if kind == "linear" and features != 1:
            raise ValueError(f"time_features must be 1 for the linear embedding, got {features}")
        if kind != "linear" and features < 3:
            raise ValueError(f"time_features must be >= 3 for a {kind} embedding, got {features}")
        self.kind = kind
        self.features = features
        n_freq = (features - 1) // 2
        if kind == "sinusoidal":
            if not (isinstance(max_frequency, Real) and max_frequency >= 1):
                raise ValueError(f"time_max_frequency must be a number >= 1, got {max_frequency}")
            exponents = torch.arange(n_freq, dtype=torch.float64) / max(n_freq - 1, 1)
            freqs = math.pi * float(max_frequency) ** exponents
        elif kind == "fourier":
            if not (isinstance(scale, Real) and scale > 0):
                raise ValueError(f"time_scale must be a number > 0, got {scale}")
            gen = torch.Generator().manual_seed(int(seed))
            freqs = (
                2 * math.pi * float(scale) * torch.randn(n_freq, generator=gen, dtype=torch.float64)
            )
        else:
            freqs = torch.zeros(0, dtype=torch.float64)
        # Kept in float64 and cast on use (cached per device/dtype), not a buffer: the features are
        # a fixed function of the constructor arguments, exact in every dtype.
        self.frequencies = freqs
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._pad = features - 1 - 2 * n_freq

    def forward(self, t: Tensor) -> Tensor:
        """Embed ``t`` of shape ``(B,)``; returns ``(B, features)`` in ``t``'s dtype."""
        t = t.reshape(-1, 1)
        parts = [t]
        if self.frequencies.numel():
            key = (t.device, t.dtype)
            if key not in self._cache:
                self._cache[key] = self.frequencies.to(device=t.device, dtype=t.dtype)
            angle = t * self._cache[key]
            parts += [torch.sin(angle), torch.cos(angle)]
        if self._pad:
            parts.append(torch.zeros(t.shape[0], self._pad, dtype=t.dtype, device=t.device))
        return torch.cat(parts, dim=1)


class ConditionEmbedding(nn.Module):
    r"""Features of a conditioning input :math:`y`, shape ``(B, out_features)``.

    * ``num_classes=K``: :math:`y` holds integer labels in :math:`\{0, \dots, K-1\}`, shape ``(B,)``
      (or one label for every row: an ``int`` or a 0-dim integer tensor); the features are rows of
      a learned table, :math:`e_y(y) = E_{y} \in \mathbb R^{\text{features}}`.
    * ``cond_dim=m``: :math:`y` holds real vectors, shape ``(B, m)`` (or one vector ``(m,)`` for
      every row), used as they are (cast to the input's dtype): :math:`e_y(y) = y`.

    Labels are checked (integer dtype, range, shape, device) before the table is read: an
    out-of-range label is a clear error here, not an index error on the device.

    Args:
        num_classes: number of classes (exclusive with ``cond_dim``).
        cond_dim: length of the conditioning vector (exclusive with ``num_classes``).
        features: width of the learned class embedding (ignored for vectors).

    Example:
        >>> import torch
        >>> emb = ConditionEmbedding(num_classes=10, features=4)
        >>> emb(torch.tensor([3, 7]), torch.zeros(2, 5)).shape
        torch.Size([2, 4])
        >>> emb(3, torch.zeros(2, 5)).shape  # one label for every row
        torch.Size([2, 4])
    """

    def __init__(
        self, num_classes: int | None = None, cond_dim: int | None = None, features: int = 16
    ) -> None:
        super().__init__()
        if (num_classes is None) == (cond_dim is None):
            raise ValueError(
                "pass exactly one of num_classes= (integer labels) or cond_dim= (vectors), "
                f"got num_classes={num_classes!r}, cond_dim={cond_dim!r}"
            )
        self.num_classes = num_classes
        self.cond_dim = cond_dim
        self.table: nn.Embedding | None = None
        if num_classes is not None:
            _check_int("num_classes", num_classes, 1)
            _check_int("class_features", features, 1)
            self.table = nn.Embedding(num_classes, features)
            self.out_features = features
        else:
            self.out_features = _check_int("cond_dim", cond_dim, 1)

    def describe(self) -> str:
        """``"num_classes=K"`` or ``"cond_dim=m"``, for error messages."""
        if self.num_classes is not None:
            return f"num_classes={self.num_classes}"
        return f"cond_dim={self.cond_dim}"

    def forward(self, y: object, x: Tensor) -> Tensor:
        """Features of ``y`` for the batch ``x`` (``(B, *event)``); returns ``(B, out_features)``."""
        batch = x.shape[0]
        if self.table is not None:
            labels = self._labels(y, batch, x.device)
            return self.table(labels)
        return self._vectors(y, batch, x)

    def _labels(self, y: object, batch: int, device: torch.device) -> Tensor:
        assert self.num_classes is not None
        k = self.num_classes
        if isinstance(y, bool) or not isinstance(y, int | Tensor):
            raise TypeError(
                f"y must hold integer class labels (a (B,) integer tensor or an int), "
                f"got {type(y).__name__}"
            )
        if isinstance(y, int):
            if not 0 <= y < k:
                raise ValueError(f"y must be a class label in 0..{k - 1}, got {y}")
            return torch.full((batch,), y, dtype=torch.long, device=device)
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(
                f"y must hold integer class labels (num_classes={k}), got dtype {y.dtype}; "
                "a vector condition needs a field built with cond_dim="
            )
        if y.dim() == 0:
            y = y.reshape(1).expand(batch)
        elif y.shape != (batch,):
            raise ValueError(
                f"y must have shape (B,) = ({batch},) (one label per row) or be one label, "
                f"got shape {tuple(y.shape)}"
            )
        if y.device != device:
            raise ValueError(f"y is on {y.device} but x is on {device}")
        low, high = (int(v) for v in torch.stack(torch.aminmax(y)).tolist())
        if low < 0 or high >= k:
            raise ValueError(
                f"y must hold class labels in 0..{k - 1}, got values in [{low}, {high}]"
            )
        return y.long()

    def _vectors(self, y: object, batch: int, x: Tensor) -> Tensor:
        m = self.cond_dim
        if not isinstance(y, Tensor) or not y.is_floating_point():
            got = y.dtype if isinstance(y, Tensor) else type(y).__name__
            raise TypeError(
                f"y must be a floating tensor of shape (B, {m}) (cond_dim={m}), got {got}"
            )
        if y.shape == (m,):
            y = y.expand(batch, m)
        elif y.shape != (batch, m):
            raise ValueError(
                f"y must have shape (B, cond_dim) = ({batch}, {m}) or ({m},), got {tuple(y.shape)}"
            )
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        return y.to(x.dtype)


class MLPField(nn.Module):
    r"""A multilayer-perceptron velocity field :math:`v_\theta(x, t)` with a time embedding.

    The input ``x`` of shape ``(B, *event)`` is flattened to ``(B, dim)``, concatenated with the
    time features :math:`e(t)` (see :class:`TimeEmbedding`) and, for a conditional field, the
    condition's features :math:`e_y(y)` (see :class:`ConditionEmbedding`), mapped through
    ``len(hidden)`` hidden layers with a smooth activation and a final linear layer back to
    ``dim``, and reshaped to ``x``'s shape:
    :math:`v_\theta(x, t, y) = \mathrm{MLP}([\mathrm{vec}(x), e(t), e_y(y)])`.

    Args:
        dim: the flattened event size :math:`d = \prod \text{event}` (an ``int``), or the event
            shape itself (a tuple, e.g. ``(1, 8, 8)``); then inputs must have exactly that event
            shape.
        hidden: widths of the hidden layers (``()`` gives an affine field in ``x``).
        time_embedding: ``"sinusoidal"`` (default), ``"fourier"`` or ``"linear"``.
        activation: ``"silu"`` (default), ``"softplus"``, ``"tanh"`` or ``"gelu"``. ReLU-like,
            non-smooth activations are refused (adaptive solvers stall on their kinks).
        time_features: width of the time embedding.
        time_max_frequency: largest sinusoidal frequency factor :math:`\omega_{\max}`. Faster
            time features make :math:`v_\theta` vary faster in :math:`t` and cost adaptive solvers
            steps: a trained 3×32 field on 2-D data needed 68 dopri5 evaluations
            (rtol = atol = 1e-5) with the default 8, 98 with 16 and 290 with 100, at equal fit.
        time_scale: frequency scale of the random Fourier embedding.
        time_seed: seed of the random Fourier frequencies.
        zero_init_output: start from :math:`v_\theta \equiv 0` (last layer zeroed).
        num_classes: make the field class-conditional: ``forward(x, t, y)`` with integer labels
            ``y`` in ``0..num_classes-1`` (exclusive with ``cond_dim``).
        cond_dim: make the field vector-conditional: ``forward(x, t, y)`` with ``y`` of shape
            ``(B, cond_dim)``.
        class_features: width of the learned class embedding (with ``num_classes``).
        device: where to create the parameters.
        dtype: parameter dtype (default: torch's default dtype).

    Shapes:
        ``forward(x, t, y=None)``: ``x`` is ``(B, *event)``; ``t`` is a float, a 0-dim tensor or
        ``(B,)`` in :math:`[0, 1]` (expanded to ``(B,)``, cast to ``x``'s dtype); ``y`` as in
        :class:`ConditionEmbedding`, required exactly when the field is conditional. Returns
        ``(B, *event)``.

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
        >>> c = cnftools.MLPField(2, hidden=(32,), num_classes=3)
        >>> c(x, 0.5, y=torch.tensor([0, 2, 1])).shape
        torch.Size([3, 2])

    References:
        Lipman et al. (2022), arXiv:2210.02747, App. E (MLP fields for 2-D data).
    """

    def __init__(
        self,
        dim: int | Sequence[int],
        hidden: Sequence[int] = (256, 256, 256),
        *,
        time_embedding: str = "sinusoidal",
        activation: str = "silu",
        time_features: int = 13,
        time_max_frequency: float = 8.0,
        time_scale: float = 1.0,
        time_seed: int = 0,
        zero_init_output: bool = False,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        class_features: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool):
            raise TypeError("dim must be an int or a tuple of ints (the event shape), got bool")
        if isinstance(dim, int):
            _check_int("dim", dim, 1)
            self.event_shape: tuple[int, ...] | None = None
            self.dim = dim
        elif isinstance(dim, Sequence) and len(dim) > 0:
            for size in dim:
                _check_int("dim (event shape entry)", size, 1)
            self.event_shape = tuple(int(s) for s in dim)
            self.dim = math.prod(self.event_shape)
        else:
            raise TypeError(f"dim must be an int or a non-empty tuple of ints, got {dim!r}")
        widths_hidden = _check_widths(hidden)
        key = _check_activation(activation)
        self._config: dict[str, Any] = {
            "dim": list(self.event_shape) if self.event_shape is not None else self.dim,
            "hidden": widths_hidden,
            "time_embedding": time_embedding,
            "activation": key,
            "time_features": int(time_features),
            "time_max_frequency": float(time_max_frequency),
            "time_scale": float(time_scale),
            "time_seed": int(time_seed),
            "zero_init_output": bool(zero_init_output),
            "num_classes": num_classes,
            "cond_dim": cond_dim,
            "class_features": int(class_features),
        }
        self.time_embedding = TimeEmbedding(
            time_embedding,
            time_features,
            max_frequency=time_max_frequency,
            scale=time_scale,
            seed=time_seed,
        )
        self.condition = _condition(num_classes, cond_dim, class_features)
        cond_width = 0 if self.condition is None else self.condition.out_features
        widths = [self.dim + time_features + cond_width, *widths_hidden, self.dim]
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[key]())
        self.net = nn.Sequential(*layers)
        if zero_init_output:
            last = self.net[-1]
            assert isinstance(last, nn.Linear)
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: Tensor, t: float | Tensor, y: object = None) -> Tensor:
        """Evaluate :math:`v_\\theta(x, t)` (or :math:`v_\\theta(x, t, y)`); ``x`` is ``(B, *event)``.

        Shapes, dtypes and the time range are checked; the values of ``x`` are not.
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
        _check_dtype(x, self.net[0].weight)
        features = _features(self, x, t, y)
        inputs = torch.cat([x.reshape(x.shape[0], self.dim), features], dim=1)
        return self.net(inputs).reshape(x.shape)

    def config(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict (ints, floats, strs, bools, None, lists).

        Safe to store next to the ``state_dict`` and reload with ``torch.load(weights_only=True)``.
        """
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> MLPField:
        """Build an untrained field from :meth:`config`'s dict; ``overrides`` (e.g. dtype) win.

        A dict without the conditioning entries (written before they existed) builds an
        unconditional field.
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
        return cls(dim, hidden, **args)

    def extra_repr(self) -> str:
        c = self._config
        text = (
            f"dim={c['dim']}, hidden={tuple(c['hidden'])}, time_embedding={c['time_embedding']!r}, "
            f"activation={c['activation']!r}"
        )
        return text if self.condition is None else f"{text}, {self.condition.describe()}"


class ConvField(nn.Module):
    r"""A small convolutional velocity field for images, ``(B, C, H, W) -> (B, C, H, W)``.

    .. math::

        h_0 = x, \qquad h_l = \phi\big(K_l * h_{l-1} + A_l\, c + b_l\big)\ (l = 1..L), \qquad
        v_\theta(x, t) = K_{L+1} * h_L + b_{L+1},

    with :math:`k \times k` convolutions :math:`K_l` (zero padding :math:`\lfloor k/2 \rfloor`, so
    every layer keeps :math:`H \times W`), a smooth activation :math:`\phi`, and
    :math:`c = [e(t), e_y(y)]` the time features (:class:`TimeEmbedding`) and, for a conditional
    field, the condition's features (:class:`ConditionEmbedding`), added to every hidden layer as a
    per-channel bias through a linear map :math:`A_l`. Any :math:`H, W` work (the weights do not
    depend on them). Device and dtype follow the parameters; inputs must match them.

    The receptive field is :math:`(L+1)(k-1) + 1` pixels wide (9 for the default three 3×3 hidden
    layers): enough for 8×8 digits; larger images want a U-Net (any ``nn.Module`` works).

    Args:
        channels: :math:`C`, the image channels (input and output).
        hidden: channels of the hidden layers, at least one (default ``(64, 64, 64)``).
        kernel_size: odd :math:`k` (default 3).
        time_embedding: as for :class:`MLPField`.
        activation: ``"silu"`` (default), ``"softplus"``, ``"tanh"`` or ``"gelu"``.
        time_features: width of the time embedding.
        time_max_frequency: largest sinusoidal frequency factor.
        time_scale: frequency scale of the random Fourier embedding.
        time_seed: seed of the random Fourier frequencies.
        zero_init_output: start from :math:`v_\theta \equiv 0` (last convolution zeroed).
        num_classes: class-conditional: ``forward(x, t, y)`` with integer labels ``y``.
        cond_dim: vector-conditional: ``forward(x, t, y)`` with ``y`` of shape ``(B, cond_dim)``.
        class_features: width of the learned class embedding.
        device: where to create the parameters.
        dtype: parameter dtype.

    Shapes:
        ``forward(x, t, y=None)``: ``x`` is ``(B, C, H, W)``; ``t`` a float, 0-dim or ``(B,)``;
        ``y`` as in :class:`ConditionEmbedding`. Returns ``(B, C, H, W)``.

    Example:
        >>> import torch, cnftools
        >>> _ = torch.manual_seed(0)
        >>> v = cnftools.ConvField(1, hidden=(8, 8), num_classes=10)
        >>> x = torch.randn(4, 1, 8, 8)
        >>> v(x, 0.5, y=torch.tensor([0, 1, 2, 3])).shape
        torch.Size([4, 1, 8, 8])
        >>> w = cnftools.ConvField.from_config(v.config())
        >>> _ = w.load_state_dict(v.state_dict())
        >>> bool(torch.equal(w(x, 0.5, y=3), v(x, 0.5, y=3)))
        True

    References:
        Ho et al., Denoising Diffusion Probabilistic Models (2020), arXiv:2006.11239 (time features
        added per channel, as in its U-Net); Lipman et al. (2022), arXiv:2210.02747.
    """

    def __init__(
        self,
        channels: int,
        hidden: Sequence[int] = (64, 64, 64),
        *,
        kernel_size: int = 3,
        time_embedding: str = "sinusoidal",
        activation: str = "silu",
        time_features: int = 13,
        time_max_frequency: float = 8.0,
        time_scale: float = 1.0,
        time_seed: int = 0,
        zero_init_output: bool = False,
        num_classes: int | None = None,
        cond_dim: int | None = None,
        class_features: int = 16,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_int("channels", channels, 1)
        widths = _check_widths(hidden)
        if not widths:
            raise ValueError("hidden must list at least one hidden layer's channels, e.g. (64,)")
        _check_int("kernel_size", kernel_size, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the padding keeps H, W), got {kernel_size}")
        key = _check_activation(activation)
        self.channels = channels
        self._config: dict[str, Any] = {
            "channels": channels,
            "hidden": widths,
            "kernel_size": kernel_size,
            "time_embedding": time_embedding,
            "activation": key,
            "time_features": int(time_features),
            "time_max_frequency": float(time_max_frequency),
            "time_scale": float(time_scale),
            "time_seed": int(time_seed),
            "zero_init_output": bool(zero_init_output),
            "num_classes": num_classes,
            "cond_dim": cond_dim,
            "class_features": int(class_features),
        }
        self.time_embedding = TimeEmbedding(
            time_embedding,
            time_features,
            max_frequency=time_max_frequency,
            scale=time_scale,
            seed=time_seed,
        )
        self.condition = _condition(num_classes, cond_dim, class_features)
        cond_width = time_features + (0 if self.condition is None else self.condition.out_features)
        pad = kernel_size // 2
        ins = [channels, *widths[:-1]]
        self.convs = nn.ModuleList(
            nn.Conv2d(n_in, n_out, kernel_size, padding=pad)
            for n_in, n_out in zip(ins, widths, strict=True)
        )
        self.conditioners = nn.ModuleList(nn.Linear(cond_width, n) for n in widths)
        self.activation = ACTIVATIONS[key]()
        self.output = nn.Conv2d(widths[-1], channels, kernel_size, padding=pad)
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def forward(self, x: Tensor, t: float | Tensor, y: object = None) -> Tensor:
        """Evaluate :math:`v_\\theta(x, t)` (or :math:`v_\\theta(x, t, y)`) on ``(B, C, H, W)``."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[0] == 0:
            raise ValueError(
                f"x must have shape (B, C, H, W) with C = {self.channels} and B >= 1, "
                f"got {tuple(x.shape)}"
            )
        _check_dtype(x, self.output.weight)
        features = _features(self, x, t, y)
        h = x
        for conv, conditioner in zip(self.convs, self.conditioners, strict=True):
            h = self.activation(conv(h) + conditioner(features)[:, :, None, None])
        return self.output(h)

    def config(self) -> dict[str, Any]:
        """The constructor arguments as a plain dict (safe for ``torch.load(weights_only=True)``)."""
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self._config.items()}

    @classmethod
    def from_config(cls, cfg: dict[str, Any], **overrides: Any) -> ConvField:
        """Build an untrained field from :meth:`config`'s dict; ``overrides`` (e.g. dtype) win."""
        if not isinstance(cfg, dict):
            raise TypeError(f"cfg must be a dict from ConvField.config(), got {type(cfg).__name__}")
        args = dict(cfg)
        args.update(overrides)
        if "channels" not in args:
            raise ValueError("cfg has no 'channels' entry; pass the dict from ConvField.config()")
        channels = args.pop("channels")
        hidden = tuple(args.pop("hidden", (64, 64, 64)))
        return cls(channels, hidden, **args)

    def extra_repr(self) -> str:
        c = self._config
        text = (
            f"channels={c['channels']}, hidden={tuple(c['hidden'])}, "
            f"kernel_size={c['kernel_size']}, activation={c['activation']!r}"
        )
        return text if self.condition is None else f"{text}, {self.condition.describe()}"


# ----------------------------------------------------------------------------------------------
def _features(field: MLPField | ConvField, x: Tensor, t: object, y: object) -> Tensor:
    """``[e(t), e_y(y)]`` of shape ``(B, F)``, with the conditioning contract enforced."""
    name = type(field).__name__
    condition = field.condition
    if condition is None and y is not None:
        raise TypeError(
            f"this {name} is unconditional but was given y; build it with num_classes= or "
            "cond_dim= to condition on y (or do not pass y / extras)"
        )
    if condition is not None and y is None:
        raise TypeError(
            f"this {name} is conditional ({condition.describe()}) and needs y: call "
            "v(x, t, y=labels), or pass extras={'y': labels} to cnftools"
        )
    parts = [field.time_embedding(as_time(t, x))]
    if condition is not None:
        parts.append(condition(y, x).to(x.dtype))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _condition(
    num_classes: int | None, cond_dim: int | None, class_features: int
) -> ConditionEmbedding | None:
    if num_classes is None and cond_dim is None:
        return None
    return ConditionEmbedding(num_classes, cond_dim, class_features)


def _check_widths(hidden: object) -> list[int]:
    if isinstance(hidden, int) or not isinstance(hidden, Sequence):
        raise TypeError(
            f"hidden must be a sequence of layer widths, e.g. (256, 256), got {hidden!r}"
        )
    for width in hidden:
        _check_int("hidden (layer width)", width, 1)
    return [int(h) for h in hidden]


def _check_activation(activation: str) -> str:
    key = str(activation).lower()
    if key in _NON_SMOOTH:
        raise ValueError(
            f"activation={activation!r} is not smooth: the field's Jacobian jumps at its kinks "
            f"and adaptive ODE solvers stall there; use one of {sorted(ACTIVATIONS)}"
        )
    if key not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return key


def _check_dtype(x: Tensor, weight: Tensor) -> None:
    if weight.dtype != x.dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but the field's parameters are {weight.dtype}; "
            f"convert one of them, e.g. field.to({x.dtype})"
        )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value
