r"""Butcher tableaux of the explicit Runge–Kutta methods cnftools integrates with, with sources.

A method is the data of its tableau,

.. math::

    k_i = f\Big(t + c_i h,\; y + h \sum_{j<i} a_{ij} k_j\Big), \qquad
    y_{\text{new}} = y + h \sum_i b_i k_i, \qquad
    e = h \sum_i (b_i - \hat b_i) k_i,

where :math:`e` (adaptive methods only) is the difference to the embedded lower-order solution
:math:`\hat b`. The coefficients below are the published ones (rationals written out where they
are short; the 13-stage Prince–Dormand pair as the decimal doubles of its rationals). Their
order conditions are checked by ``tests/test_tableaux.py``; the solvers built on them are checked
against torchdiffeq's solvers of the same names by ``cnftools validate`` (section ``ode``).

References:
    Dormand, Prince: A family of embedded Runge–Kutta formulae, J. Comput. Appl. Math. 6 (1980)
    19–26 (``dopri5``); Prince, Dormand: High order embedded Runge–Kutta formulae, J. Comput.
    Appl. Math. 7 (1981) 67–75, RK8(7)13M (``dopri8``); Bogacki, Shampine: A 3(2) pair of
    Runge–Kutta formulas, Appl. Math. Lett. 2 (1989) 321–325 (``bosh3``); Fehlberg: Low-order
    classical Runge–Kutta formulas with stepsize control, NASA TR R-315 (1969), RKF1(2)
    (``fehlberg2``); Kutta (1901), the 3/8 rule (``rk4``); Hairer, Nørsett, Wanner: Solving
    Ordinary Differential Equations I (2nd ed.), §II.1 (Euler, midpoint, Heun) and §II.4.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ADAPTIVE", "FIXED_GRID", "TABLEAUX", "Tableau"]


@dataclass(frozen=True)
class Tableau:
    r"""The Butcher tableau of an explicit Runge–Kutta method (embedded pair when adaptive).

    Attributes:
        name: the method's name in :class:`cnftools.SolverConfig`.
        nodes: :math:`c_2, \dots, c_s` (``s - 1`` values; :math:`c_1 = 0`).
        rows: :math:`a_{ij}`: row ``i`` (stage ``i + 2``) has ``i + 1`` coefficients.
        weights: :math:`b_1, \dots, b_s` of the propagated solution.
        error_weights: :math:`b_i - \hat b_i`, or ``None`` for a fixed-grid method.
        order: the order ``p`` of the propagated solution (the step-size exponent is ``1/p``).

    Example:
        >>> TABLEAUX["dopri5"].stages, TABLEAUX["dopri5"].first_same_as_last
        (7, True)
    """

    name: str
    nodes: tuple[float, ...]
    rows: tuple[tuple[float, ...], ...]
    weights: tuple[float, ...]
    error_weights: tuple[float, ...] | None
    order: int

    def __post_init__(self) -> None:
        stages = len(self.nodes) + 1
        if len(self.rows) != stages - 1 or any(
            len(row) != i + 1 for i, row in enumerate(self.rows)
        ):
            raise ValueError("rows must be lower triangular: row i has i + 1 coefficients")
        if len(self.weights) != stages:
            raise ValueError(f"weights need {stages} values")
        if self.error_weights is not None and len(self.error_weights) != stages:
            raise ValueError(f"error_weights need {stages} values")

    @property
    def stages(self) -> int:
        """Number of stages ``s``."""
        return len(self.nodes) + 1

    @property
    def is_adaptive(self) -> bool:
        """True for an embedded pair (an error estimate per step)."""
        return self.error_weights is not None

    @property
    def first_same_as_last(self) -> bool:
        """True when the last stage is :math:`f(t + h, y_{\\text{new}})` (FSAL): an accepted
        step's last stage is the next step's first, one evaluation saved per step."""
        return (
            bool(self.nodes)
            and self.nodes[-1] == 1.0
            and self.weights[-1] == 0.0
            and tuple(self.rows[-1]) == tuple(self.weights[:-1])
        )


def _pair(lower: tuple[float, ...], higher: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(b - b_hat for b, b_hat in zip(higher, lower, strict=True))


_DOPRI5_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DOPRI5_B_HAT = (
    5179 / 57600,
    0.0,
    7571 / 16695,
    393 / 640,
    -92097 / 339200,
    187 / 2100,
    1 / 40,
)

_DOPRI8_NODES = (
    1 / 18,
    1 / 12,
    1 / 8,
    5 / 16,
    3 / 8,
    59 / 400,
    93 / 200,
    0.5648654513822595,  # 5490023248 / 9719169821
    13 / 20,
    0.9246562776405044,  # 1201146811 / 1299019798
    1.0,
    1.0,
    1.0,
)
_DOPRI8_B = (
    0.041747491141530244,
    0.0,
    0.0,
    0.0,
    0.0,
    -0.05545232861123931,
    0.2393128072011801,
    0.703510669403443,
    -0.7597596138144609,
    0.6605630309222863,
    0.15818748251012332,
    -0.2381095387528628,
    0.25,
    0.0,
)
_DOPRI8_ERROR = (
    0.012194277465176744,
    0.0,
    0.0,
    0.0,
    0.0,
    0.7731539478765578,
    -0.07192809284993823,
    -1.763834521196444,
    1.787182038027448,
    -0.7829855527544889,
    0.07877188662899604,
    -0.28255398319730723,
    0.25,
    0.0,
)
_DOPRI8_ROWS = (
    (1 / 18,),
    (1 / 48, 1 / 16),
    (1 / 32, 0.0, 3 / 32),
    (5 / 16, 0.0, -75 / 64, 75 / 64),
    (3 / 80, 0.0, 0.0, 3 / 16, 3 / 20),
    (
        0.04791013711111111,
        0.0,
        0.0,
        0.11224871277777777,
        -0.02550567377777778,
        0.012846823888888888,
    ),
    (
        0.01691798978729228,
        0.0,
        0.0,
        0.3878482784860432,
        0.03597736985150033,
        0.19697021421566607,
        -0.17271385234050185,
    ),
    (
        0.0690957533591923,
        0.0,
        0.0,
        -0.6342479767288541,
        -0.16119757522460407,
        0.13865030945882525,
        0.9409286140357562,
        0.21163632648194397,
    ),
    (
        0.1835569968390454,
        0.0,
        0.0,
        -2.4687680843155926,
        -0.29128688781630047,
        -0.026473020233117376,
        2.8478387641928005,
        0.2813873314698498,
        0.12374489986331466,
    ),
    (
        -1.2154248173958881,
        0.0,
        0.0,
        16.672608665945774,
        0.915741828416818,
        -6.056605804357471,
        -16.00357359415618,
        14.849303086297663,
        -13.371575735289849,
        5.134182648179638,
    ),
    (
        0.25886091643826425,
        0.0,
        0.0,
        -4.774485785489205,
        -0.4350930137770325,
        -3.0494833320722416,
        5.5779200399360995,
        6.15583158986104,
        -5.062104586736939,
        2.193926173180679,
        0.13462799865933495,
    ),
    (
        0.8224275996265075,
        0.0,
        0.0,
        -11.658673257277664,
        -0.7576221166909362,
        0.7139735881595816,
        12.075774986890057,
        -2.127659113920403,
        1.9901662070489554,
        -0.23428647154404028,
        0.17589857770794226,
        0.0,
    ),
    _DOPRI8_B[:-1],
)

_TABLES = (
    Tableau("euler", (), (), (1.0,), None, 1),
    Tableau("midpoint", (0.5,), ((0.5,),), (0.0, 1.0), None, 2),
    Tableau("heun2", (1.0,), ((1.0,),), (0.5, 0.5), None, 2),
    Tableau("heun3", (1 / 3, 2 / 3), ((1 / 3,), (0.0, 2 / 3)), (0.25, 0.0, 0.75), None, 3),
    Tableau(
        "rk4",
        (1 / 3, 2 / 3, 1.0),
        ((1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)),
        (1 / 8, 3 / 8, 3 / 8, 1 / 8),
        None,
        4,
    ),
    Tableau(
        "dopri5",
        (1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
        (
            (1 / 5,),
            (3 / 40, 9 / 40),
            (44 / 45, -56 / 15, 32 / 9),
            (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
            (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
            _DOPRI5_B[:-1],
        ),
        _DOPRI5_B,
        _pair(_DOPRI5_B_HAT, _DOPRI5_B),
        5,
    ),
    Tableau("dopri8", _DOPRI8_NODES, _DOPRI8_ROWS, _DOPRI8_B, _DOPRI8_ERROR, 8),
    Tableau(
        "bosh3",
        (1 / 2, 3 / 4, 1.0),
        ((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
        (2 / 9, 1 / 3, 4 / 9, 0.0),
        _pair((7 / 24, 1 / 4, 1 / 3, 1 / 8), (2 / 9, 1 / 3, 4 / 9, 0.0)),
        3,
    ),
    # Heun's method with Euler embedded: b = (1/2, 1/2), b_hat = (1, 0).
    Tableau("adaptive_heun", (1.0,), ((1.0,),), (0.5, 0.5), (-0.5, 0.5), 2),
    # Fehlberg's RKF1(2): the second-order solution propagated, as torchdiffeq's ``fehlberg2``.
    Tableau(
        "fehlberg2",
        (1 / 2, 1.0),
        ((1 / 2,), (1 / 256, 255 / 256)),
        (1 / 512, 255 / 256, 1 / 512),
        _pair((1 / 256, 255 / 256, 0.0), (1 / 512, 255 / 256, 1 / 512)),
        2,
    ),
)

TABLEAUX: dict[str, Tableau] = {table.name: table for table in _TABLES}
"""Every method by name."""

FIXED_GRID: dict[str, int] = {t.name: t.order for t in _TABLES if not t.is_adaptive}
"""Fixed-grid methods and their orders."""

ADAPTIVE: dict[str, int] = {t.name: t.order for t in _TABLES if t.is_adaptive}
"""Adaptive (embedded) methods and their orders."""
