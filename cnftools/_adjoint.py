r"""Gradients of a solve by checkpointed replay: the adjoint on the same Runge–Kutta loop.

``adjoint=True`` runs the forward solve without a graph, keeping only each attempted step's
starting state (a checkpoint of ``(b, n)`` numbers per step), and differentiates it backwards one
step at a time: each accepted step is recomputed from its checkpoint with a graph, and the
vector–Jacobian product of that one step carries the adjoint :math:`a = \partial L/\partial y`
back to the step's start,

.. math::

    a_n = \Big(\frac{\partial \Phi_h(t_n, y_n)}{\partial y_n}\Big)^{\!\top} a_{n+1}, \qquad
    \frac{\partial L}{\partial \theta} \mathrel{+}=
    \Big(\frac{\partial \Phi_h(t_n, y_n)}{\partial \theta}\Big)^{\!\top} a_{n+1},

where :math:`\Phi_h` is the Runge–Kutta step. This is the *discrete* adjoint of the very steps the
forward solve took (diffrax's checkpointed adjoint, rather than torchdiffeq's continuous one), so

- the forward numbers are exactly those of ``adjoint=False`` (same loop, same steps), and
- the gradients equal direct backpropagation through the solver up to rounding,

while memory holds the checkpoints and one step's graph instead of every step's graph.

References:
    Griewank, Walther: Evaluating Derivatives (2nd ed., 2008), ch. 12 (checkpointing);
    Kidger: On Neural Differential Equations (2022), §5.1 (discretise-then-optimise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cnftools._runge_kutta import Dynamics, StepRecord, rk_step
from cnftools._tableaux import TABLEAUX

__all__ = ["solve_with_replay"]


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        run: Callable[[Tensor, StepRecord], Tensor],
        f: Dynamics,
        method: str,
        y0: Tensor,
        *params: Tensor,
    ) -> Tensor:
        record = StepRecord()
        with torch.no_grad():
            states = run(y0.detach(), record)
        ctx.record = record  # type: ignore[attr-defined]
        ctx.f = f  # type: ignore[attr-defined]
        ctx.method = method  # type: ignore[attr-defined]
        ctx.params = params  # type: ignore[attr-defined]
        ctx.shape = y0.shape  # type: ignore[attr-defined]
        return states

    @staticmethod
    @once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_states: Tensor):  # type: ignore[override]
        record: StepRecord = ctx.record  # type: ignore[attr-defined]
        f: Dynamics = ctx.f  # type: ignore[attr-defined]
        params: Sequence[Tensor] = ctx.params  # type: ignore[attr-defined]
        tableau = TABLEAUX[ctx.method]  # type: ignore[attr-defined]
        wanted = [p for p in params if p.requires_grad]
        adjoint = torch.zeros(ctx.shape, dtype=grad_states.dtype, device=grad_states.device)  # type: ignore[attr-defined]
        totals = [torch.zeros_like(p) for p in wanted]
        for rows, t, h, t_end, y, accepted, landed in reversed(record.steps):
            # the output gradient of each row that landed on an output time in this step
            hit = landed >= 0
            injected = grad_states[landed.clamp(min=0), rows] * hit.unsqueeze(1)
            adjoint = adjoint.index_add(0, rows, injected)
            chosen = accepted.nonzero().flatten()
            if chosen.numel() == 0:
                continue
            subset = rows[chosen]
            start = y[chosen].detach().requires_grad_(True)
            with torch.enable_grad():
                k_first = f(t[chosen], start, subset)
                y_out, *_ = rk_step(
                    f, tableau, t[chosen], h[chosen], start, k_first, subset, t_end[chosen]
                )
                grads = torch.autograd.grad(
                    y_out, (start, *wanted), adjoint[subset], allow_unused=True
                )
            adjoint = adjoint.index_copy(0, subset, grads[0])
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    totals[i] = totals[i] + g
        adjoint = adjoint + grad_states[0]
        out: list[Tensor | None] = []
        it = iter(totals)
        for p in params:
            out.append(next(it) if p.requires_grad else None)
        return (None, None, None, adjoint, *out)


def solve_with_replay(
    run: Callable[[Tensor, StepRecord], Tensor],
    f: Dynamics,
    method: str,
    y0: Tensor,
    params: Sequence[Tensor],
) -> Tensor:
    """``run(y0, record)`` without a graph, differentiable in ``y0`` and ``params`` by replay.

    Args:
        run: the forward solve; fills the record of its steps and returns the states
            ``(T, B, n)``.
        f: the dynamics ``run`` integrates (called again, with a graph, on the replay).
        method: the Runge–Kutta method ``run`` uses.
        y0: the initial states ``(B, n)``.
        params: the tensors ``f`` depends on that need gradients.

    Returns:
        The states ``(T, B, n)``; their gradient flows to ``y0`` and ``params``.
    """
    return _Replay.apply(run, f, method, y0, *params)
