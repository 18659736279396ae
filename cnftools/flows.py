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

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.distributions import (
    ComposeTransform,
    Distribution,
    Independent,
    Normal,
    Transform,
    TransformedDistribution,
)

from cnftools._euler_step import ConvergenceError, EulerStep, euler_chain
from cnftools._transforms import (
    AffineCoupling,
    ElementwiseAffine,
    Linear,
    LULinear,
    ModuleTransform,
)

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
