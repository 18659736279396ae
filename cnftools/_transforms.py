r"""The discrete transforms of :mod:`cnftools.flows`: invertible maps with exact log-determinants.

Change of variables (theory §1): for an invertible :math:`x = f(z)`,
:math:`\log p(x) = \log \pi(z) - \log|\det \partial f / \partial z|`. Each map here is a
:class:`torch.distributions.Transform` that is also a :class:`torch.nn.Module`
(:class:`ModuleTransform`): :class:`Linear`, :class:`LULinear`, :class:`ElementwiseAffine` and
:class:`AffineCoupling`. Users import them from :mod:`cnftools.flows`, which re-exports them; the
module docstring there describes the conventions (shapes, dtypes, parameters).

References:
    Dinh, Sohl-Dickstein, Bengio: Density estimation using Real NVP (2017), arXiv:1605.08803;
    Kingma, Dhariwal: Glow (2018), arXiv:1807.03039 (LU-parametrised linear maps);
    Papamakarios et al.: Normalizing Flows for Probabilistic Modeling and Inference (2021),
    arXiv:1912.02762.

Theory sections cited here (pages under ``docs/theory/``):

- §1: ``docs/theory/change-of-variables.md#change-of-variables``
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from cnftools._checks import check_finite, check_floating, check_int, check_real

__all__ = ["AffineCoupling", "ElementwiseAffine", "LULinear", "Linear", "ModuleTransform"]

_REAL_VECTOR = constraints.independent(constraints.real, 1)


class ModuleTransform(Transform, nn.Module):
    """Base class: a :class:`~torch.distributions.Transform` that is also an :class:`~torch.nn.Module`.

    ``Transform`` defines ``__eq__`` (identity), which would make instances unhashable and break
    ``nn.Module.parameters()``; hashing is restored to identity here, consistent with ``__eq__``.
    ``Transform.__call__`` comes first in the MRO, so ``f(x)`` is the forward map (no module
    hooks); ``forward`` is the same map. Caching is off (``cache_size = 0``): parameters change
    during training, so a cached ``(x, y)`` pair could go stale.
    """

    domain = _REAL_VECTOR
    codomain = _REAL_VECTOR
    bijective = True
    __hash__ = object.__hash__

    def __init__(self, dim: int) -> None:
        super().__init__(cache_size=0)  # Transform.__init__, which then runs nn.Module.__init__
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return self._call(x)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def __repr__(self) -> str:
        return nn.Module.__repr__(self)

    def _reference(self) -> Tensor | None:
        """A tensor whose dtype and device inputs must match (``None``: anything goes)."""
        return next(iter(self.parameters()), None)

    def _events(self, name: str, x: object) -> tuple[Tensor, torch.Size]:
        """Validate ``x`` of shape ``(..., d)``; return it as ``(B, d)`` and the batch shape."""
        x = check_floating(name, x)
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{name} must have shape (..., {self.dim}) for {type(self).__name__} of dimension "
                f"{self.dim}, got shape {tuple(x.shape)}"
            )
        ref = self._reference()
        if ref is not None and (x.dtype != ref.dtype or x.device != ref.device):
            raise TypeError(
                f"{name} has dtype {x.dtype} on {x.device} but {type(self).__name__}'s parameters "
                f"have dtype {ref.dtype} on {ref.device}; convert one with .to(...)"
            )
        flat = x.reshape(-1, self.dim)
        if flat.shape[0] > 0:
            check_finite(name, flat)
        return flat, x.shape[:-1]


def _parameter(name: str, value: object, shape: tuple[int, ...] | None = None) -> nn.Parameter:
    value = check_floating(name, value)
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(value.shape)}")
    check_finite(name, value.reshape(1, -1))
    if isinstance(value, nn.Parameter):
        return value
    return nn.Parameter(value.detach().clone())


def _same_kind(name: str, value: Tensor, ref: Tensor) -> None:
    if value.dtype != ref.dtype or value.device != ref.device:
        raise TypeError(
            f"{name} must have the dtype and device of the other parameters ({ref.dtype} on "
            f"{ref.device}), got {value.dtype} on {value.device}"
        )


def _constant_per_row(value: Tensor, batch_shape: torch.Size, like: Tensor) -> Tensor:
    """A scalar log-det repeated over the batch (differentiable, not an expanded view)."""
    return value * like.new_ones(batch_shape)


class Linear(ModuleTransform):
    r"""An invertible affine map :math:`x = W z + b`, with :math:`\log|\det J| = \log|\det W|`.

    Args:
        weight: ``(d, d)`` invertible matrix :math:`W` (refused when singular or numerically
            singular: condition number above :math:`1/(d\,\varepsilon)`).
        bias: ``(d,)`` shift :math:`b` (default zeros).

    Both become ``nn.Parameter``. During training a dense :math:`W` can drift towards
    singularity; :class:`LULinear` keeps :math:`\det W \ne 0` by construction. The inverse is a
    linear solve; :math:`\log|\det W|` comes from :func:`torch.linalg.slogdet`. For Gaussian
    :math:`z \sim \mathcal N(0, I)`, :math:`x \sim \mathcal N(b, W W^\top)`.

    Example:
        >>> import torch
        >>> from torch.distributions import TransformedDistribution
        >>> from cnftools.flows import Linear, standard_normal
        >>> f = Linear(torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=torch.float64))
        >>> dist = TransformedDistribution(standard_normal(2, dtype=torch.float64), [f])
        >>> f.log_abs_det_jacobian(torch.zeros(3, 2, dtype=torch.float64), None)
        tensor([0., 0., 0.], dtype=torch.float64, grad_fn=<MulBackward0>)
        >>> dist.log_prob(torch.zeros(1, 2, dtype=torch.float64)).shape
        torch.Size([1])

    References:
        theory §1; Papamakarios et al. (2021), arXiv:1912.02762, §3.1.
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        weight = check_floating("weight", weight)
        if weight.dim() != 2 or weight.shape[0] != weight.shape[1] or weight.shape[0] == 0:
            raise ValueError(f"weight must be a square (d, d) matrix, got {tuple(weight.shape)}")
        dim = weight.shape[0]
        weight_p = _parameter("weight", weight)
        with torch.no_grad():
            singular_values = torch.linalg.svdvals(weight_p)
        smax, smin = float(singular_values.max()), float(singular_values.min())
        if not smin > dim * torch.finfo(weight.dtype).eps * smax:
            raise ValueError(
                f"weight is singular or numerically singular (singular values in [{smin:.3g}, "
                f"{smax:.3g}]); Linear needs an invertible matrix"
            )
        if bias is None:
            bias = torch.zeros(dim, dtype=weight.dtype, device=weight.device)
        bias_p = _parameter("bias", bias, (dim,))
        _same_kind("bias", bias_p, weight_p)
        super().__init__(dim)
        self.weight = weight_p
        self.bias = bias_p

    def _call(self, x: Tensor) -> Tensor:
        flat, batch = self._events("x", x)
        return (flat @ self.weight.mT + self.bias).reshape(*batch, self.dim)

    def _inverse(self, y: Tensor) -> Tensor:
        flat, batch = self._events("y", y)
        z = torch.linalg.solve(self.weight, (flat - self.bias).mT).mT
        return z.reshape(*batch, self.dim)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor | None) -> Tensor:
        flat, batch = self._events("x", x)
        return _constant_per_row(torch.linalg.slogdet(self.weight).logabsdet, batch, flat)


class LULinear(ModuleTransform):
    r"""A learnable linear map :math:`x = P L U z + b` that stays invertible (Glow's LU form).

    :math:`P` is a fixed permutation, :math:`L` unit lower triangular, :math:`U` upper triangular
    with diagonal :math:`\operatorname{sign}_i e^{s_i}`; so :math:`\log|\det J| = \sum_i s_i` and
    the inverse is two triangular solves. Parameters: the strict lower part of ``lower``, the strict
    upper part of ``upper``, ``log_diag`` :math:`s` and ``bias`` :math:`b`; ``permutation`` and
    ``diag_sign`` are buffers. Initialised from the LU factors of a random rotation (so the map mixes
    coordinates from the start, :math:`\log|\det| = 0`).

    Args:
        dim: the dimension ``d``.
        generator: random generator for the initial rotation.
        dtype: parameter dtype (default: torch's default dtype).
        device: parameter device.

    Example:
        >>> import torch
        >>> from cnftools.flows import LULinear
        >>> f = LULinear(3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> x = torch.randn(5, 3, dtype=torch.float64)
        >>> bool(torch.allclose(f.inv(f(x)), x))
        True
        >>> with torch.no_grad():
        ...     float(f.log_abs_det_jacobian(x, f(x)).abs().max()) < 1e-12
        True

    References:
        Kingma & Dhariwal, Glow (2018), arXiv:1807.03039, §3.2.
    """

    def __init__(
        self,
        dim: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        dim = check_int("dim", dim, low=1)
        dtype = dtype or torch.get_default_dtype()
        # Draw where the generator lives, then place the parameters where they were asked for.
        draw_device = generator.device if generator is not None else device
        gauss = torch.randn(dim, dim, generator=generator, dtype=dtype, device=draw_device)
        if device is not None:
            gauss = gauss.to(device)
        rotation = torch.linalg.qr(gauss).Q
        perm, lower, upper = torch.linalg.lu(rotation)
        diag = upper.diagonal()
        super().__init__(dim)
        self.lower = nn.Parameter(lower.tril(-1))
        self.upper = nn.Parameter(upper.triu(1))
        self.log_diag = nn.Parameter(diag.abs().log())
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype, device=rotation.device))
        self.register_buffer("permutation", perm)
        self.register_buffer("diag_sign", diag.sign())

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.dim, dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower.tril(-1) + eye
        upper = self.upper.triu(1) + torch.diag(self.diag_sign * self.log_diag.exp())
        return lower, upper

    @property
    def weight(self) -> Tensor:
        """The matrix :math:`W = P L U`, shape ``(d, d)``."""
        lower, upper = self._factors()
        return self.permutation @ lower @ upper

    def _call(self, x: Tensor) -> Tensor:
        flat, batch = self._events("x", x)
        return (flat @ self.weight.mT + self.bias).reshape(*batch, self.dim)

    def _inverse(self, y: Tensor) -> Tensor:
        flat, batch = self._events("y", y)
        lower, upper = self._factors()
        rhs = ((flat - self.bias) @ self.permutation).mT  # P^T (y - b), as columns
        w = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        z = torch.linalg.solve_triangular(upper, w, upper=True)
        return z.mT.reshape(*batch, self.dim)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor | None) -> Tensor:
        flat, batch = self._events("x", x)
        return _constant_per_row(self.log_diag.sum(), batch, flat)


class ElementwiseAffine(ModuleTransform):
    r"""The elementwise map :math:`x = \mu + e^{s} \odot z`, :math:`\log|\det J| = \sum_i s_i`.

    A learnable version of ``torch.distributions.AffineTransform(loc, scale, event_dim=1)`` with a
    log-parametrised (always positive) scale. For :math:`z \sim \mathcal N(m, \sigma^2)` this is
    theory §1's special case :math:`x \sim \mathcal N(e^{s} m + \mu, (e^{s}\sigma)^2)`.

    Args:
        loc: ``(d,)`` shift :math:`\mu`.
        log_scale: ``(d,)`` log-scale :math:`s`.

    Example:
        >>> import torch
        >>> from cnftools.flows import ElementwiseAffine
        >>> f = ElementwiseAffine(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 2.0]).log())
        >>> f(torch.tensor([[2.0, 3.0]]))
        tensor([[3., 6.]], grad_fn=<ViewBackward0>)

    References:
        theory §1; Dinh et al. (2017), arXiv:1605.08803.
    """

    def __init__(self, loc: Tensor, log_scale: Tensor) -> None:
        loc = check_floating("loc", loc)
        if loc.dim() != 1 or loc.shape[0] == 0:
            raise ValueError(f"loc must have shape (d,), got {tuple(loc.shape)}")
        loc_p = _parameter("loc", loc)
        log_scale_p = _parameter("log_scale", log_scale, tuple(loc.shape))
        _same_kind("log_scale", log_scale_p, loc_p)
        super().__init__(loc.shape[0])
        self.loc = loc_p
        self.log_scale = log_scale_p

    def _call(self, x: Tensor) -> Tensor:
        flat, batch = self._events("x", x)
        return (self.loc + self.log_scale.exp() * flat).reshape(*batch, self.dim)

    def _inverse(self, y: Tensor) -> Tensor:
        flat, batch = self._events("y", y)
        return ((flat - self.loc) * torch.exp(-self.log_scale)).reshape(*batch, self.dim)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor | None) -> Tensor:
        flat, batch = self._events("x", x)
        return _constant_per_row(self.log_scale.sum(), batch, flat)


class AffineCoupling(ModuleTransform):
    r"""A RealNVP affine coupling: the masked coordinates condition an affine map of the others.

    With a binary mask :math:`m` (1 = kept and fed to the network, 0 = transformed),

    .. math::

        x = z \odot e^{s} + t, \quad (\tilde s, t) = \mathrm{net}(m \odot z),\quad
        s = (1 - m) \odot c \tanh(\tilde s / c), \quad t \leftarrow (1 - m) \odot t,

    so :math:`m \odot x = m \odot z` and :math:`\log|\det J| = \sum_i s_i` (the Jacobian is
    triangular up to a permutation). The log-scale is bounded smoothly, :math:`|s_i| < c`
    (``log_scale_bound``), which keeps :math:`e^{\pm s}` within :math:`e^{\pm c}`: an untrained
    or diverging network cannot overflow the forward or inverse map. Near 0, :math:`s \approx
    \tilde s`.

    Args:
        mask: ``(d,)`` tensor of 0 and 1 (bool, int or float) with at least one of each.
        net: callable (usually an ``nn.Module``) mapping ``(B, d)`` to either a pair
            ``(log_scale, shift)`` of ``(B, d)`` tensors or one ``(B, 2d)`` tensor
            ``[log_scale, shift]``. Only the entries at ``mask == 0`` are used.
        log_scale_bound: :math:`c > 0`.

    Example:
        >>> import torch
        >>> from cnftools.flows import AffineCoupling
        >>> net = torch.nn.Sequential(
        ...     torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)
        ... )
        >>> f = AffineCoupling(torch.tensor([1, 0]), net)
        >>> z = torch.randn(8, 2)
        >>> bool(torch.equal(f(z)[:, 0], z[:, 0]))
        True
        >>> f.log_abs_det_jacobian(z, f(z)).shape
        torch.Size([8])

    References:
        Dinh, Sohl-Dickstein, Bengio: Real NVP (2017), arXiv:1605.08803, §3.2–3.3.
    """

    def __init__(
        self,
        mask: Tensor,
        net: Callable[[Tensor], Tensor | tuple[Tensor, Tensor]],
        *,
        log_scale_bound: float = 3.0,
    ) -> None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor of 0/1 values, got {type(mask).__name__}")
        if mask.dim() != 1 or mask.shape[0] < 2:
            raise ValueError(f"mask must have shape (d,) with d >= 2, got {tuple(mask.shape)}")
        if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must contain only 0 and 1 (1 = kept, 0 = transformed)")
        if bool((mask == 1).all()) or bool((mask == 0).all()):
            raise ValueError("mask must contain at least one 0 and at least one 1")
        if not callable(net):
            raise TypeError(f"net must be callable (e.g. an nn.Module), got {type(net).__name__}")
        log_scale_bound = check_real("log_scale_bound", log_scale_bound)
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound must be finite and > 0, got {log_scale_bound}")
        super().__init__(mask.shape[0])
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())
        self.net = net
        self.log_scale_bound = float(log_scale_bound)

    def extra_repr(self) -> str:
        return f"mask={self.mask.int().tolist()}, log_scale_bound={self.log_scale_bound:g}"

    def _reference(self) -> Tensor | None:
        return None  # the network decides what it accepts

    def _scale_shift(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net(kept)
        if isinstance(out, tuple | list) and len(out) == 2:
            raw, shift = out
        elif isinstance(out, Tensor) and out.shape == (kept.shape[0], 2 * self.dim):
            raw, shift = out.chunk(2, dim=-1)
        else:
            got = [tuple(o.shape) for o in out] if isinstance(out, tuple | list) else out
            got = tuple(out.shape) if isinstance(out, Tensor) else got
            raise ValueError(
                f"net must return (log_scale, shift) of shape (B, d) = {(kept.shape[0], self.dim)} "
                f"or one tensor of shape (B, 2d), got {got}"
            )
        for name, value in (("log_scale", raw), ("shift", shift)):
            if not isinstance(value, Tensor) or value.shape != kept.shape:
                shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"net's {name} must have shape {tuple(kept.shape)}, got {shape}")
            check_finite(f"net output ({name})", value)
        free = (~self.mask).to(kept.dtype)
        c = self.log_scale_bound
        return free * c * torch.tanh(raw / c), free * shift

    def _call(self, x: Tensor) -> Tensor:
        flat, batch = self._events("x", x)
        log_scale, shift = self._scale_shift(flat * self.mask.to(flat.dtype))
        return (flat * log_scale.exp() + shift).reshape(*batch, self.dim)

    def _inverse(self, y: Tensor) -> Tensor:
        flat, batch = self._events("y", y)
        log_scale, shift = self._scale_shift(flat * self.mask.to(flat.dtype))
        return ((flat - shift) * torch.exp(-log_scale)).reshape(*batch, self.dim)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor | None) -> Tensor:
        flat, batch = self._events("x", x)
        log_scale, _ = self._scale_shift(flat * self.mask.to(flat.dtype))
        return log_scale.sum(-1).reshape(batch)
