r"""The Euler step of a CNF as a transform: :class:`EulerStep`, :func:`euler_chain`.

One explicit Euler step :math:`z \mapsto z + \Delta t\, v(z, t)` of :math:`dz/dt = v(z, t)` (theory
§3) is an invertible map when :math:`|\Delta t|\,\mathrm{Lip}(v) < 1`, with the exact
log-determinant :math:`\log|\det(I + \Delta t\, \partial v/\partial z)|`; a chain of ``N`` of them
is a discrete flow whose log-density converges to the continuous log-likelihood at first order in
:math:`1/N`. Users import these from :mod:`cnftools.flows`, which re-exports them.

References:
    Chen et al.: Neural ODEs (2018), arXiv:1806.07366; Behrmann et al., Invertible Residual
    Networks (2019), arXiv:1811.00995 (fixed-point inverse of a residual map).

Theory sections cited here (pages under ``docs/theory/``):

- §2: ``docs/theory/change-of-variables.md#normalizing-flows``
- §3: ``docs/theory/change-of-variables.md#continuous-normalizing-flows``
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cnftools._checks import check_finite, check_floating, check_int, check_real
from cnftools._transforms import ModuleTransform
from cnftools.divergences import jacobian
from cnftools.fields import call_checked, check_callable

__all__ = ["ConvergenceError", "EulerStep", "euler_chain"]


class ConvergenceError(RuntimeError):
    """An iterative inverse (:meth:`EulerStep.inv`) did not reach its tolerance."""


class EulerStep(ModuleTransform):
    r"""One explicit Euler step of a CNF, :math:`z \mapsto z + \Delta t\, v(z, t)`, as a transform.

    Its log-determinant is exact:
    :math:`\log|\det(I + \Delta t\, \partial v/\partial z)|` by :func:`torch.linalg.slogdet` of the
    autograd Jacobian (``d`` vector-Jacobian products; batched with ``is_grads_batched`` by
    default, or a plain loop with ``batched=False`` for fields whose operations have no batching
    rule). A log-determinant needs the whole Jacobian, not its trace, so the divergence specs of
    :mod:`cnftools.estimators` do not apply here; ``batched`` is the option of
    :func:`cnftools.divergences.jacobian`. The per-sample Jacobian assumes row ``b`` of ``v(x, t)`` depends only on ``x[b]`` (no
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
        batched: one batched backward pass for the Jacobian (``True``) or ``d`` passes.
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
        batched: bool = True,
        inverse_tol: float | None = None,
        max_iter: int = 500,
    ) -> None:
        check_callable(v)
        t = _real("t", t)
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        dt = _real("dt", dt)
        if not isinstance(batched, bool):
            raise TypeError(f"batched must be True or False, got {batched!r}")
        if inverse_tol is not None and not (_real("inverse_tol", inverse_tol) > 0):
            raise ValueError(f"inverse_tol must be > 0, got {inverse_tol}")
        max_iter = check_int("max_iter", max_iter, low=1)
        super().__init__(dim=-1)  # any d: the field decides
        self.v = v
        self.t = t
        self.dt = dt
        self.batched = batched
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
            return jacobian(self.v, z, t, create_graph=create_graph, batched=self.batched)
        except RuntimeError as error:
            if not self.batched or "batch" not in str(error).lower():
                raise
            raise RuntimeError(
                "EulerStep(batched=True) failed to batch the backward pass of v; "
                f"use batched=False. Original error: {error}"
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
    v: Callable[[Tensor, Tensor], Tensor], steps: int, **kwargs: object
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
    steps = check_int("steps", steps, low=1)
    return [EulerStep(v, i / steps, 1.0 / steps, **kwargs) for i in range(steps)]  # type: ignore[arg-type]
