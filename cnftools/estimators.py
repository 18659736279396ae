r"""How a divergence is taken: one small frozen spec, accepted alike by every entry point.

The divergence of a velocity field (theory §11) is the trace of its Jacobian,
:math:`\nabla\cdot v = \operatorname{tr}\,\partial v/\partial x`. cnftools takes it three ways,
each a spec object:

- :class:`Exact`: the trace by autograd, :math:`d` vector-Jacobian products issued by a
  ``strategy`` (``"auto"``: by a rule of sizes; or forced ``"batched"``, ``"loop"``,
  ``"forward"``). Exact to rounding.
- :class:`Hutchinson`: the unbiased estimate
  :math:`\frac1K\sum_k \varepsilon_k^\top (\partial v/\partial x)\,\varepsilon_k` from
  :math:`K` probes with :math:`\mathbb E[\varepsilon\varepsilon^\top] = I`, held fixed for a whole
  ODE solve. Approximate: its standard error is reported (:func:`standard_error`).
- :class:`ClosedForm`: the field's own ``divergence(x, t)`` (e.g. the marginal fields of
  :mod:`cnftools.marginals`); an error for a field that has none.

``estimator=None`` (the default everywhere) means: the field's closed form when it offers one,
otherwise :class:`Exact`. An explicit spec does exactly what it says.

:func:`cnftools.divergence`, :func:`cnftools.velocity_and_divergence`,
:func:`cnftools.log_likelihood`, :func:`cnftools.sample_with_log_prob`,
:func:`cnftools.dataset_nll` and the continuity checks take the same ``estimator=``.
(:class:`cnftools.flows.EulerStep` needs the whole Jacobian for its log-determinant, not a trace:
it takes ``batched=``, as :func:`cnftools.divergences.jacobian` does.)

References:
    Hutchinson, A stochastic estimator of the trace of the influence matrix (1989);
    Grathwohl et al., FFJORD (2019), arXiv:1810.01367, §3.

Theory sections cited here (pages under ``docs/theory/``):

- §11: ``docs/theory/divergence-and-continuity.md#divergence``
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import Tensor

from cnftools._checks import check_finite, check_floating, check_int

__all__ = [
    "EXACT_STRATEGIES",
    "NOISES",
    "ClosedForm",
    "Estimator",
    "Exact",
    "Hutchinson",
    "check_estimator",
    "standard_error",
]

EXACT_STRATEGIES = ("auto", "batched", "loop", "forward")
"""How :class:`Exact` issues its :math:`d` products: ``"auto"`` by a rule of sizes
(:func:`cnftools.divergences.choose_strategy`), or forced."""

NOISES = ("rademacher", "gaussian")
"""Hutchinson probe distributions: entries :math:`\\pm 1`, or standard normal."""


@dataclass(frozen=True)
class Exact:
    r"""The exact divergence :math:`\operatorname{tr}\,\partial v/\partial x` by autograd.

    Args:
        strategy: how the :math:`d` vector-Jacobian products are issued: ``"auto"`` (by the
            batch and event sizes and the device type, never by timings, so the numbers never
            depend on the machine's load), ``"batched"`` (basis vectors in chunks through one
            backward pass), ``"loop"`` (one backward pass per basis vector: the plain
            reference) or ``"forward"`` (forward-mode products; for fields and devices where it
            wins). All agree to rounding.

    Example:
        >>> Exact()
        Exact(strategy='auto')
        >>> Exact("loop").strategy
        'loop'
    """

    strategy: str = "auto"

    def __post_init__(self) -> None:
        if self.strategy not in EXACT_STRATEGIES:
            raise ValueError(
                f"Exact(strategy=...) must be one of {EXACT_STRATEGIES}, got {self.strategy!r}"
            )


@dataclass(frozen=True)
class Hutchinson:
    r"""Hutchinson's unbiased estimate of the divergence from :math:`K` fixed probes.

    .. math::

        \nabla\cdot v \approx \frac1K \sum_{k=1}^K
        \varepsilon_k^\top \frac{\partial v}{\partial x}\,\varepsilon_k,
        \qquad \mathbb E[\varepsilon\varepsilon^\top] = I .

    Approximate: each row's value carries Monte Carlo noise of standard error
    :math:`s_K/\sqrt K` (reported for :math:`K \ge 2`). The probes are drawn once per call (per
    ODE solve) and held fixed, so a solve integrates a smooth field.

    Args:
        n_probes: :math:`K`, the number of probes drawn (ignored when ``probes`` is given).
        noise: ``"rademacher"`` (entries :math:`\pm 1`, the lower variance) or ``"gaussian"``.
        probes: your own probes, ``(K, B, *event)`` (or ``(B, *event)`` for one), in the data's
            dtype and on its device.
        generator: the random generator the probes are drawn from (on the data's device); the
            global generator when ``None``.

    Example:
        >>> import torch
        >>> spec = Hutchinson(n_probes=4, generator=torch.Generator().manual_seed(0))
        >>> spec.draw(torch.zeros(3, 2)).shape
        torch.Size([4, 3, 2])
    """

    n_probes: int = 1
    noise: str = "rademacher"
    probes: Tensor | None = field(default=None, compare=False)
    generator: torch.Generator | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        check_int("Hutchinson(n_probes=...)", self.n_probes, low=1)
        if self.noise not in NOISES:
            raise ValueError(f"Hutchinson(noise=...) must be one of {NOISES}, got {self.noise!r}")
        if self.probes is not None:
            check_finite(
                "Hutchinson(probes=...)", check_floating("Hutchinson(probes=...)", self.probes)
            )
            if self.n_probes != 1:
                raise ValueError("Hutchinson: give n_probes or probes, not both")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(
                f"Hutchinson(generator=...) must be a torch.Generator, got "
                f"{type(self.generator).__name__}"
            )

    def draw(self, like: Tensor) -> Tensor:
        """The probes ``(K, B, *event)`` for points ``like`` of shape ``(B, *event)``: the given
        ``probes`` (checked against ``like``), or ``n_probes`` fresh draws."""
        if self.probes is not None:
            probes = self.probes
            if probes.shape == like.shape:
                probes = probes.unsqueeze(0)  # one probe given as (B, *event)
            if probes.dim() != like.dim() + 1 or probes.shape[1:] != like.shape:
                raise ValueError(
                    f"Hutchinson(probes=...) must have shape (K, B, *event) = "
                    f"(K, {', '.join(map(str, like.shape))}) with K >= 1, got "
                    f"{tuple(self.probes.shape)}"
                )
            if probes.shape[0] < 1:
                raise ValueError("Hutchinson(probes=...) must hold at least one probe (K >= 1)")
            if probes.dtype != like.dtype or probes.device != like.device:
                raise TypeError(
                    f"Hutchinson(probes=...) must share the data's dtype and device "
                    f"({like.dtype}, {like.device}), got {probes.dtype} on {probes.device}"
                )
            return probes.detach()
        shape = (self.n_probes, *like.shape)
        if self.generator is not None and self.generator.device.type != like.device.type:
            raise ValueError(
                f"Hutchinson(generator=...) is on {self.generator.device} but the data is on "
                f"{like.device}: create the generator there, torch.Generator(device=...)"
            )
        options = {"generator": self.generator, "device": like.device}
        if self.noise == "gaussian":
            return torch.randn(shape, dtype=like.dtype, **options)
        bits = torch.randint(0, 2, shape, **options)
        return bits.to(like.dtype).mul_(2).sub_(1)


@dataclass(frozen=True)
class ClosedForm:
    """The field's own closed-form divergence ``v.divergence(x, t)`` (found by
    :func:`cnftools.fields.closed_form_divergence`): an error for a field that has none.

    Example:
        >>> ClosedForm()
        ClosedForm()
    """


Estimator = Union[Exact, Hutchinson, ClosedForm]  # noqa: UP007 (a runtime alias)
"""Any divergence spec."""


def check_estimator(value: object, name: str = "estimator") -> Estimator | None:
    """``value`` if it is a divergence spec (or ``None``: the default rule), else a ``TypeError``
    that names the argument and the three specs.

    Example:
        >>> check_estimator(Exact("loop"))
        Exact(strategy='loop')
    """
    if value is None or isinstance(value, (Exact, Hutchinson, ClosedForm)):
        return value
    hint = ""
    if value in (Exact, Hutchinson, ClosedForm):
        hint = f" (the class itself: write {name}=cnftools.{value.__name__}())"
    if isinstance(value, str):
        spelled = {"exact": "Exact()", "hutchinson": "Hutchinson()", "loop": 'Exact("loop")'}
        spelled["closed_form"] = "ClosedForm()"
        if value in spelled:
            hint = f" (cnftools 0.2: write {name}=cnftools.{spelled[value]})"
    raise TypeError(
        f"{name} must be a divergence spec, cnftools.Exact(...), cnftools.Hutchinson(...) or "
        f"cnftools.ClosedForm(), or None (the field's closed form if it has one, else exact); "
        f"got {value!r:.60}{hint}"
    )


def standard_error(columns: Tensor) -> Tensor | None:
    r"""The standard error :math:`s_K/\sqrt K` of the mean over probe columns ``(B, K)``, per row
    ``(B,)``; ``None`` for fewer than two columns (one probe has no spread to measure). The one
    place cnftools computes it.

    Example:
        >>> standard_error(torch.tensor([[1.0, 3.0]]))
        tensor([1.])
    """
    if columns.shape[1] < 2:
        return None
    return columns.std(dim=1, correction=1) / math.sqrt(columns.shape[1])
