r"""What a field embeds besides :math:`x`: the time features and the optional condition.

- :class:`TimeFeatures`: the settings of a time embedding, a small frozen object validated when
  it is made (``MLPField(..., time=TimeFeatures("fourier", 7, seed=3))``);
- :class:`TimeEmbedding`: the module that computes them, ``(B,) -> (B, features)``;
- :class:`Conditioning`: class labels (an ``nn.Embedding``) or a conditioning vector.

References:
    Tancik et al., Fourier Features Let Networks Learn High Frequency Functions (2020),
    arXiv:2006.10739; Dhariwal and Nichol (2021), arXiv:2105.05233 (class-conditional models).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor, nn

from cnftools._checks import check_int

__all__ = ["TIME_EMBEDDINGS", "Conditioning", "TimeEmbedding", "TimeFeatures"]

TIME_EMBEDDINGS = ("sinusoidal", "fourier", "linear")
"""The admissible kinds of :class:`TimeFeatures`."""

_CONFIG_KEYS = {
    "kind": "time_embedding",
    "features": "time_features",
    "max_frequency": "time_max_frequency",
    "scale": "time_scale",
    "seed": "time_seed",
}
""":class:`TimeFeatures` field -> its key in a field's stored ``config()`` (the format written by
cnftools 0.1, kept so that its checkpoints load)."""


@dataclass(frozen=True)
class TimeFeatures:
    r"""The time embedding :math:`e(t)` of a field (see :class:`TimeEmbedding`).

    Validated when made: a bad value raises a ``ValueError`` naming the field, what it expects
    and how to fix it.

    Attributes:
        kind: ``"sinusoidal"`` (default, deterministic), ``"fourier"`` (random frequencies drawn
            from ``seed``) or ``"linear"`` (:math:`e(t) = [t]`).
        features: output width (``>= 3`` for sinusoidal and Fourier features, 1 for linear).
        max_frequency: largest sinusoidal frequency factor :math:`\omega_{\max}` (``>= 1``; read
            by ``"sinusoidal"`` only). Faster time features make :math:`v_\theta` vary faster in
            :math:`t` and cost adaptive solvers steps: a trained 3×32 field on 2-D data needed 68
            dopri5 evaluations (rtol = atol = 1e-5) with the default 8, 98 with 16 and 290 with
            100, at equal fit.
        scale: standard deviation of the Fourier frequencies in cycles per unit time (``> 0``;
            read by ``"fourier"`` only).
        seed: seed of the Fourier frequencies.

    Example:
        >>> TimeFeatures("fourier", 7, seed=3).features
        7
        >>> TimeFeatures("linear", 3)
        Traceback (most recent call last):
        ...
        ValueError: TimeFeatures.features must be 1 for the linear embedding, got 3; use TimeFeatures("linear", 1)
    """

    kind: str = "sinusoidal"
    features: int = 13
    max_frequency: float = 8.0
    scale: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in TIME_EMBEDDINGS:
            raise ValueError(
                f"TimeFeatures.kind must be one of {TIME_EMBEDDINGS}, got {self.kind!r}; "
                'e.g. TimeFeatures("sinusoidal")'
            )
        features = self.features
        if isinstance(features, bool) or not isinstance(features, Integral) or features < 1:
            raise ValueError(
                f"TimeFeatures.features must be an int >= 1, got {features!r}; e.g. "
                "TimeFeatures(features=13)"
            )
        if self.kind == "linear" and self.features != 1:
            raise ValueError(
                f"TimeFeatures.features must be 1 for the linear embedding, got {self.features}; "
                'use TimeFeatures("linear", 1)'
            )
        if self.kind != "linear" and self.features < 3:
            raise ValueError(
                f"TimeFeatures.features must be >= 3 for a {self.kind} embedding, got "
                f"{self.features}; e.g. TimeFeatures({self.kind!r}, 13)"
            )
        number = isinstance(self.max_frequency, Real) and not isinstance(self.max_frequency, bool)
        if self.kind == "sinusoidal" and not (number and self.max_frequency >= 1):
            raise ValueError(
                f"TimeFeatures.max_frequency must be a number >= 1, got {self.max_frequency!r}; "
                "the default is 8.0"
            )
        number = isinstance(self.scale, Real) and not isinstance(self.scale, bool)
        if self.kind == "fourier" and not (number and self.scale > 0):
            raise ValueError(
                f"TimeFeatures.scale must be a number > 0, got {self.scale!r}; the default is 1.0"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise ValueError(f"TimeFeatures.seed must be an int, got {self.seed!r}; e.g. seed=0")

    def config(self) -> dict[str, Any]:
        """The ``time_*`` entries of a field's stored ``config()`` (plain values)."""
        return {
            "time_embedding": self.kind,
            "time_features": int(self.features),
            "time_max_frequency": float(self.max_frequency),
            "time_scale": float(self.scale),
            "time_seed": int(self.seed),
        }

    @classmethod
    def pop_config(cls, args: dict[str, Any]) -> TimeFeatures:
        """Take the ``time_*`` entries of a stored ``config()`` out of ``args`` (missing ones keep
        their defaults) and build the settings from them."""
        stored = {name: args.pop(key) for name, key in _CONFIG_KEYS.items() if key in args}
        return cls(**stored)


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

    Odd widths use all features; an even width leaves one zero pad.

    Args:
        settings: the kind, width and frequencies (:class:`TimeFeatures`).
    """

    def __init__(self, settings: TimeFeatures = TimeFeatures()) -> None:
        super().__init__()
        if not isinstance(settings, TimeFeatures):
            raise TypeError(
                f"time must be a TimeFeatures, got {type(settings).__name__}; e.g. "
                'TimeFeatures("sinusoidal", 13)'
            )
        self.settings = settings
        self.kind = settings.kind
        self.features = settings.features
        n_freq = (settings.features - 1) // 2
        if settings.kind == "sinusoidal":
            exponents = torch.arange(n_freq, dtype=torch.float64) / max(n_freq - 1, 1)
            freqs = math.pi * float(settings.max_frequency) ** exponents
        elif settings.kind == "fourier":
            gen = torch.Generator().manual_seed(int(settings.seed))
            freqs = torch.randn(n_freq, generator=gen, dtype=torch.float64)
            freqs = 2 * math.pi * float(settings.scale) * freqs
        else:
            freqs = torch.zeros(0, dtype=torch.float64)
        # Kept in float64 and cast on use (cached per device/dtype), not a buffer: the features are
        # a fixed function of the settings, exact in every dtype.
        self.frequencies = freqs
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._pad = settings.features - 1 - 2 * n_freq

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


class Conditioning(nn.Module):
    r"""The optional conditioning input of a field: class labels or a feature vector.

    * ``num_classes=K``: ``y`` is an integer tensor ``(B,)`` of labels in ``[0, K)``, embedded by an
      ``nn.Embedding(K, class_features)``;
    * ``cond_dim=C``: ``y`` is a ``(B, C)`` tensor of ``x``'s dtype, used as is;
    * neither: the field is unconditional and ``y`` must be ``None``.

    ``forward(y, x)`` returns the list of feature tensors to concatenate (empty when
    unconditional), each ``(B, features)``.

    Args:
        num_classes: number of classes, or ``None``.
        cond_dim: width of the conditioning vector, or ``None``.
        class_features: width of the class embedding.
    """

    def __init__(
        self, num_classes: int | None = None, cond_dim: int | None = None, class_features: int = 16
    ) -> None:
        super().__init__()
        if num_classes is not None and cond_dim is not None:
            raise ValueError("give at most one of num_classes and cond_dim")
        if num_classes is not None:
            check_int("num_classes", num_classes, low=1)
        if cond_dim is not None:
            check_int("cond_dim", cond_dim, low=1)
        check_int("class_features", class_features, low=1)
        self.num_classes = num_classes
        self.cond_dim = cond_dim
        self.class_features = class_features
        self.embedding = (
            nn.Embedding(num_classes, class_features) if num_classes is not None else None
        )
        self.features = (
            class_features if num_classes is not None else (cond_dim if cond_dim is not None else 0)
        )

    def config(self) -> dict[str, Any]:
        """The arguments as plain values (for a field's ``config()``)."""
        return {
            "num_classes": self.num_classes,
            "cond_dim": self.cond_dim,
            "class_features": self.class_features,
        }

    @property
    def conditional(self) -> bool:
        """Whether the field takes a condition ``y`` (``num_classes`` or ``cond_dim`` given)."""
        return self.num_classes is not None or self.cond_dim is not None

    def describe(self) -> str:
        if self.num_classes is not None:
            return f", num_classes={self.num_classes}"
        return f", cond_dim={self.cond_dim}" if self.cond_dim is not None else ""

    def forward(self, y: Tensor | None, x: Tensor) -> list[Tensor]:
        batch = x.shape[0]
        if self.num_classes is None and self.cond_dim is None:
            if y is not None:
                raise ValueError(
                    "this field is unconditional but got y; build it with num_classes= or cond_dim="
                )
            return []
        if y is None:
            what = (
                f"num_classes={self.num_classes}"
                if self.num_classes
                else f"cond_dim={self.cond_dim}"
            )
            raise ValueError(f"this field is conditional ({what}): pass y=, e.g. v(x, t, y=labels)")
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
        if self.embedding is not None:
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise TypeError(f"y must hold integer class labels, got dtype {y.dtype}")
            if y.shape != (batch,):
                raise ValueError(f"y must have shape (B,) = ({batch},), got {tuple(y.shape)}")
            low, high = (int(v) for v in torch.stack(torch.aminmax(y)).tolist())
            if low < 0 or high >= self.num_classes:
                raise ValueError(
                    f"class labels y must lie in [0, {self.num_classes}), got values in "
                    f"[{low}, {high}]"
                )
            return [self.embedding(y).to(x.dtype)]
        if y.shape != (batch, self.cond_dim):
            raise ValueError(
                f"y must have shape (B, cond_dim) = ({batch}, {self.cond_dim}), got {tuple(y.shape)}"
            )
        if y.dtype != x.dtype:
            raise TypeError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
        return [y]
