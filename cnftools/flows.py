r"""Discrete normalizing flows on :mod:`torch.distributions`, and the Euler-step link to CNFs.

Change of variables (theory §1): for an invertible :math:`x = f(z)` with :math:`z \sim \pi`,

.. math::

    \log p(x) = \log \pi(z) - \log\left|\det \frac{\partial f}{\partial z}\right|,
    \qquad z = f^{-1}(x).

A flow (§2) composes :math:`x = f_K \circ \dots \circ f_1(z_0)`, so
:math:`\log p(x) = \log \pi_0(z_0) - \sum_i \log|\det \partial f_i / \partial z_{i-1}|`, and
training minimises :math:`L(D) = -\tfrac1{|D|}\sum_{x \in D} \log p(x)`.

cnftools does not build a parallel framework: every map here is a
:class:`torch.distributions.Transform` (``event_dim = 1``, ``bijective = True``, domain and codomain
``constraints.independent(constraints.real, 1)``) with an exact ``log_abs_det_jacobian``, so it
works unchanged inside :class:`~torch.distributions.TransformedDistribution` and
:class:`~torch.distributions.ComposeTransform`. Each is also a :class:`torch.nn.Module`: its tensors
are ``nn.Parameter`` (learnable; freeze with ``requires_grad_(False)``), a network argument is a
sub-module, and ``parameters()``, ``.to()`` and ``state_dict()`` work as usual.

:class:`EulerStep` is one explicit Euler step :math:`z \mapsto z + \Delta t\, v(z, t)` of a CNF
(§3); a chain of ``N`` of them (:func:`euler_chain`) is a discrete flow whose log-density converges
to the continuous log-likelihood at first order in :math:`1/N`.

Shapes: inputs are ``(..., d)`` (any batch shape, usually ``(B, d)``); ``log_abs_det_jacobian``
returns the batch shape, ``(B,)``. Everything follows the dtype and device of the parameters; an
input of another dtype or device is refused.

References:
    Dinh, Sohl-Dickstein, Bengio: Density estimation using Real NVP (2017), arXiv:1605.08803;
    Kingma, Dhariwal: Glow (2018), arXiv:1807.03039 (LU-parametrised linear maps);
    Papamakarios et al.: Normalizing Flows for Probabilistic Modeling and Inference (2021),
    arXiv:1912.02762; Chen et al.: Neural ODEs (2018), arXiv:1806.07366.

Theory sections cited here (pages under ``docs/theory/``):

- §1: ``docs/theory/change-of-variables.md#change-of-variables``
- §2: ``docs/theory/change-of-variables.md#normalizing-flows``
- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import (
    ComposeTransform,
    Distribution,
    Independent,
    Normal,
    Transform,
    TransformedDistribution,
    constraints,
)

from cnftools._checks import check_finite, check_floating, check_int, check_real
from cnftools.divergences import jacobian
from cnftools.fields import call_checked

__all__ = [
    "AffineCoupling",
    "ConvergenceError",
    "ElementwiseAffine",
    "EulerStep",
    "Flow",
    "LULinear",
    "Linear",
    "ModuleTransform",
    "euler_chain",
    "standard_normal",
]

_REAL_VECTOR = constraints.independent(constraints.real, 1)


class ConvergenceError(RuntimeError):
    """An iterative inverse (:meth:`EulerStep.inv`) did not reach its tolerance."""


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


class EulerStep(ModuleTransform):
    r"""One explicit Euler step of a CNF, :math:`z \mapsto z + \Delta t\, v(z, t)`, as a transform.

    Its log-determinant is exact:
    :math:`\log|\det(I + \Delta t\, \partial v/\partial z)|` by :func:`torch.linalg.slogdet` of the
    autograd Jacobian (``d`` vector-Jacobian products; batched with ``is_grads_batched`` by
    default, or a plain loop with ``jacobian="loop"`` for fields whose operations have no batching
    rule). The per-sample Jacobian assumes row ``b`` of ``v(x, t)`` depends only on ``x[b]`` (no
    batch normalisation). The field is called as ``v(x, t)`` with ``x`` ``(B, d)`` and ``t`` a
    ``(B,)`` tensor, cnftools' convention. A field whose output has no autograd path from ``x``
    (a constant, a detached tensor, numpy) is refused with a ``ValueError``, as
    :func:`cnftools.divergences.divergence` refuses it: its Jacobian is not known, and reporting
    :math:`\log|\det| = 0` would be a wrong number.

    Invertibility: the step is a bijection when :math:`|\Delta t|\,\mathrm{Lip}(v(\cdot, t)) < 1`
    (then :math:`z \mapsto y - \Delta t\,v(z, t)` is a contraction). This is not checked globally;
    ``log_abs_det_jacobian`` raises if :math:`\det(I + \Delta t J) \le 0` at some input (the step
    folds space there), and the inverse raises :class:`ConvergenceError` if the fixed-point
    iteration :math:`z_{k+1} = y - \Delta t\, v(z_k, t)` does not reach
    :math:`\max_i |z_{k+1} - z_k|_i \le \text{tol}\,(1 + \max_i |z_{k+1}|_i)` within ``max_iter``
    iterations. When autograd is on, the converged point gets one Newton correction with
    :math:`(I + \Delta t J)^{-1}`, so gradients of the inverse with respect to ``y`` and to the
    field's parameters are the exact implicit-function ones (first order).

    Args:
        v: the velocity field ``v(x, t)`` (an ``nn.Module`` becomes a sub-module).
        t: the time of the step, a float in ``[0, 1]``.
        dt: the step :math:`\Delta t` (finite; negative steps backwards).
        jacobian: ``"batched"`` or ``"loop"``.
        inverse_tol: tolerance of the fixed-point inverse (default ``64 eps`` of the dtype).
        max_iter: iteration cap of the fixed-point inverse.

    Example:
        >>> import torch
        >>> from cnftools.flows import EulerStep
        >>> A = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=torch.float64)
        >>> step = EulerStep(lambda x, t: x @ A.T, t=0.0, dt=0.1)
        >>> z = torch.randn(4, 2, dtype=torch.float64)
        >>> step.log_abs_det_jacobian(z, step(z))  # log det(I + 0.1 A) = log 1.01
        tensor([0.0100, 0.0100, 0.0100, 0.0100], dtype=torch.float64)
        >>> bool(torch.allclose(step.inv(step(z)), z, atol=1e-12))
        True

    References:
        theory §3; Chen et al. (2018), arXiv:1806.07366; Behrmann et al., Invertible Residual
        Networks (2019), arXiv:1811.00995 (fixed-point inverse of a residual map).
    """

    def __init__(
        self,
        v: Callable[[Tensor, Tensor], Tensor],
        t: float,
        dt: float,
        *,
        jacobian: str = "batched",
        inverse_tol: float | None = None,
        max_iter: int = 500,
    ) -> None:
        if not callable(v):
            raise TypeError(
                f"v must be a velocity field, a callable v(x, t); got {type(v).__name__}"
            )
        t = _real("t", t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        dt = _real("dt", dt)
        if jacobian not in ("batched", "loop"):
            raise ValueError(f'jacobian must be "batched" or "loop", got {jacobian!r}')
        if inverse_tol is not None and not (_real("inverse_tol", inverse_tol) > 0):
            raise ValueError(f"inverse_tol must be > 0, got {inverse_tol}")
        max_iter = check_int("max_iter", max_iter, low=1)
        super().__init__(dim=-1)  # any d: the field decides
        self.v = v
        self.t = t
        self.dt = dt
        self.jacobian = jacobian
        self.inverse_tol = inverse_tol
        self.max_iter = max_iter

    def extra_repr(self) -> str:
        return f"t={self.t:g}, dt={self.dt:g}"

    def _reference(self) -> Tensor | None:
        return None  # the field decides what it accepts

    def _events(self, name: str, x: object) -> tuple[Tensor, torch.Size]:
        x = check_floating(name, x)
        if x.dim() < 1 or x.shape[-1] == 0:
            raise ValueError(f"{name} must have shape (..., d) with d >= 1, got {tuple(x.shape)}")
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] > 0:
            check_finite(name, flat)
        return flat, x.shape[:-1]

    def _field(self, z: Tensor) -> Tensor:
        t = torch.full((z.shape[0],), self.t, dtype=z.dtype, device=z.device)
        return call_checked(self.v, z, t)

    def _call(self, x: Tensor) -> Tensor:
        flat, _ = self._events("x", x)
        return (flat + self.dt * self._field(flat)).reshape(x.shape)

    def jacobian_matrix(self, z: Tensor, *, create_graph: bool = False) -> Tensor:
        r"""The field's Jacobian :math:`\partial v / \partial z` at ``z`` ``(B, d)``: ``(B, d, d)``.

        By :func:`cnftools.divergences.jacobian`; a field with no autograd path from ``z``
        (constant, detached, numpy) is refused, since it would report :math:`\log|\det| = 0`.
        """
        t = torch.full((z.shape[0],), self.t, dtype=z.dtype, device=z.device)
        try:
            return jacobian(
                self.v, z, t, create_graph=create_graph, batched=self.jacobian == "batched"
            )
        except RuntimeError as error:
            if self.jacobian != "batched" or "batch" not in str(error).lower():
                raise
            raise RuntimeError(
                'EulerStep(jacobian="batched") failed to batch the backward pass of v; '
                f'use jacobian="loop". Original error: {error}'
            ) from error

    def _step_matrix(self, z: Tensor, create_graph: bool) -> Tensor:
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        return eye + self.dt * self.jacobian_matrix(z, create_graph=create_graph)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor | None) -> Tensor:
        flat, batch = self._events("x", x)
        sign, logabsdet = torch.linalg.slogdet(self._step_matrix(flat, torch.is_grad_enabled()))
        if not bool((sign > 0).all()):
            bad = (sign <= 0).nonzero().flatten()[:10].tolist()
            raise ValueError(
                f"EulerStep(t={self.t:g}, dt={self.dt:g}) is not invertible at batch rows {bad}: "
                "det(I + dt J) <= 0 there; use a smaller dt (invertible when |dt| Lip(v) < 1)"
            )
        return logabsdet.reshape(batch)

    def _inverse(self, y: Tensor) -> Tensor:
        flat, _ = self._events("y", y)
        tol = self.inverse_tol or 64 * torch.finfo(flat.dtype).eps
        with torch.no_grad():
            target = flat.detach()
            z = target - self.dt * self._field(target)
            for _ in range(self.max_iter):
                z_next = target - self.dt * self._field(z)
                change = (z_next - z).abs().amax(dim=-1)
                z = z_next
                if not bool(torch.isfinite(z).all()):
                    break
                if bool((change <= tol * (1 + z.abs().amax(dim=-1))).all()):
                    break
            else:
                raise ConvergenceError(
                    f"EulerStep(t={self.t:g}, dt={self.dt:g}) inverse: the fixed-point iteration "
                    f"did not converge in {self.max_iter} iterations (max change "
                    f"{float(change.max()):.3g}, tol {tol:.3g}); it converges when "
                    "|dt| Lip(v) < 1 — use a smaller dt or raise max_iter"
                )
            if not bool(torch.isfinite(z).all()):
                raise ConvergenceError(
                    f"EulerStep(t={self.t:g}, dt={self.dt:g}) inverse diverged (non-finite "
                    "iterates); the step is not a contraction: |dt| Lip(v) >= 1"
                )
        if torch.is_grad_enabled():
            # One Newton step from the converged z (value change ~ tol) carries the exact implicit
            # gradients: dz = (I + dt J)^{-1} (dy - dt dv/dθ dθ).
            residual = z + self.dt * self._field(z) - flat
            step = self._step_matrix(z, create_graph=False).detach()
            z = z - torch.linalg.solve(step, residual.unsqueeze(-1)).squeeze(-1)
        return z.reshape(y.shape)


def _real(name: str, value: object) -> float:
    """A Python real or a 0-d real tensor, as a finite float (:func:`check_real`)."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    return check_real(name, value)


def euler_chain(
    v: Callable[[Tensor, Tensor], Tensor], n_steps: int, **kwargs: object
) -> list[EulerStep]:
    r"""``N`` Euler steps of :math:`dz/dt = v(z, t)` over :math:`[0, 1]`: :math:`t_i = i/N`, :math:`\Delta t = 1/N`.

    Composed, they map :math:`z_0 \sim p_0` to :math:`x = z_N`, and (theory §2–3)

    .. math::

        \log p_N(x) = \log p_0(z_0) - \sum_{i=0}^{N-1} \log\left|\det\big(I + \Delta t\,
        \partial_z v(z_i, t_i)\big)\right| \xrightarrow[N \to \infty]{}
        \log p_0(z_0) - \int_0^1 \operatorname{div} v(z_t, t)\,dt,

    with error :math:`O(1/N)` at a fixed ``x``. Keyword arguments go to :class:`EulerStep`.

    Example:
        >>> import torch
        >>> from cnftools.flows import Flow, euler_chain
        >>> flow = Flow(2, euler_chain(lambda x, t: -0.5 * x, 4))
        >>> flow = flow.to(torch.float64)
        >>> flow.log_prob(torch.zeros(1, 2, dtype=torch.float64))  # z0 = 0, det = (1 - 1/8)^(2·4)
        tensor([-0.7696], dtype=torch.float64)

    References:
        theory §3; Chen et al. (2018), arXiv:1806.07366.
    """
    n_steps = check_int("n_steps", n_steps, low=1)
    return [EulerStep(v, i / n_steps, 1.0 / n_steps, **kwargs) for i in range(n_steps)]  # type: ignore[arg-type]


def standard_normal(
    dim: int, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> Distribution:
    r"""The base :math:`\mathcal N(0, I_d)` with ``event_shape = (d,)``."""
    loc = torch.zeros(dim, dtype=dtype or torch.get_default_dtype(), device=device)
    return Independent(Normal(loc, torch.ones_like(loc)), 1)


class Flow(nn.Module):
    r"""A normalizing flow :math:`x = f_K \circ \dots \circ f_1(z_0)`, :math:`z_0 \sim \pi_0`.

    A thin :class:`~torch.nn.Module` over :class:`~torch.distributions.TransformedDistribution`:
    it holds the learnable transforms (so ``parameters()``, ``.to()`` and ``state_dict()`` see
    them) and builds the distribution on demand. theory §2:

    .. math::

        \log p(x) = \log \pi_0(z_0) - \sum_{i=1}^K \log|\det \partial f_i / \partial z_{i-1}|,
        \qquad L(D) = -\frac1{|D|} \sum_{x \in D} \log p(x).

    Args:
        base: the base distribution :math:`\pi_0` (``event_shape = (d,)``), or an int ``d`` for
            :math:`\mathcal N(0, I_d)` stored as buffers (so it follows ``.to(...)``).
        transforms: :class:`~torch.distributions.Transform` objects, applied first to last.

    Example:
        >>> import torch
        >>> from cnftools.flows import ElementwiseAffine, Flow
        >>> flow = Flow(2, [ElementwiseAffine(torch.zeros(2), torch.zeros(2))])
        >>> x = flow.sample(5)
        >>> flow.log_prob(x).shape, flow.nll_loss(x).shape
        (torch.Size([5]), torch.Size([]))

    References:
        theory §2; Papamakarios et al. (2021), arXiv:1912.02762.
    """

    def __init__(self, base: Distribution | int, transforms: Sequence[Transform]) -> None:
        super().__init__()
        if isinstance(base, int) and not isinstance(base, bool):
            if base < 1:
                raise ValueError(f"base dimension must be >= 1, got {base}")
            self.register_buffer("base_loc", torch.zeros(base))
            self.register_buffer("base_scale", torch.ones(base))
            self._base: Distribution | None = None
        elif isinstance(base, Distribution):
            if len(base.event_shape) != 1:
                raise ValueError(
                    f"base must have event_shape (d,), got {tuple(base.event_shape)}; wrap a "
                    "per-coordinate distribution in torch.distributions.Independent(..., 1)"
                )
            self._base = base
        else:
            raise TypeError(f"base must be a Distribution or an int, got {type(base).__name__}")
        transforms = list(transforms)
        for i, transform in enumerate(transforms):
            if not isinstance(transform, Transform):
                raise TypeError(
                    f"transforms[{i}] must be a torch.distributions.Transform, "
                    f"got {type(transform).__name__}"
                )
        self.transforms = transforms
        self.layers = nn.ModuleList([f for f in transforms if isinstance(f, nn.Module)])

    @property
    def base(self) -> Distribution:
        """The base distribution :math:`\\pi_0`."""
        if self._base is not None:
            return self._base
        return Independent(Normal(self.base_loc, self.base_scale), 1)

    @property
    def transform(self) -> ComposeTransform:
        """All transforms composed (a :class:`~torch.distributions.ComposeTransform`)."""
        return ComposeTransform(self.transforms)

    @property
    def distribution(self) -> TransformedDistribution:
        """The flow as a :class:`~torch.distributions.TransformedDistribution`."""
        return TransformedDistribution(self.base, self.transforms)

    def log_prob(self, x: Tensor) -> Tensor:
        """:math:`\\log p(x)` for ``x`` of shape ``(B, d)``: ``(B,)``."""
        return self.distribution.log_prob(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def sample(self, n: int) -> Tensor:
        """``n`` samples ``(n, d)`` without gradients."""
        return self.distribution.sample((n,))

    def rsample(self, n: int) -> Tensor:
        """``n`` reparametrised samples ``(n, d)`` (differentiable in the parameters)."""
        return self.distribution.rsample((n,))

    def nll_loss(self, x: Tensor) -> Tensor:
        r"""The NLL :math:`L(D) = -\tfrac1{|D|}\sum_{x\in D}\log p(x)` over the batch ``x`` (B, d)."""
        return -self.log_prob(x).mean()
