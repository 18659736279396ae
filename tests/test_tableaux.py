"""Tests of cnftools._tableaux: the Butcher tableaux satisfy their order conditions.

The conditions are the classical ones (Hairer, Nørsett, Wanner, Solving ODEs I, §II.2), written
here independently of the tables: for a method of order p the weights b satisfy, for every rooted
tree of at most p vertices up to order 4, the tree's condition, and the quadrature conditions
sum_i b_i c_i^(k-1) = 1/k for every k <= p; the rows sum to their nodes. The coefficients are
rationals rounded to float64 (the 13-stage pair as 16-17 digit decimals), so the conditions hold
to rounding: 1e-13 absolute (sums of up to 14 terms of size up to ~17).
"""

from __future__ import annotations

import numpy as np
import pytest

from cnftools._tableaux import ADAPTIVE, FIXED_GRID, TABLEAUX, Tableau

TOL = 1e-13

# the embedded (b_hat = b - error_weights) solution's order
EMBEDDED_ORDER = {"dopri5": 4, "dopri8": 7, "bosh3": 2, "adaptive_heun": 1, "fehlberg2": 1}


def _matrices(table: Tableau) -> tuple[np.ndarray, np.ndarray]:
    s = table.stages
    a = np.zeros((s, s))
    for i, row in enumerate(table.rows):
        a[i + 1, : len(row)] = row
    c = np.concatenate([[0.0], np.array(table.nodes)])
    return a, c


def _conditions(b: np.ndarray, a: np.ndarray, c: np.ndarray, order: int) -> list[tuple[str, float]]:
    """(name, residual) of the order conditions of trees with at most min(order, 4) vertices,
    and the quadrature conditions up to ``order``."""
    out = [
        (f"sum b c^{k - 1} = 1/{k}", float(b @ c ** (k - 1) - 1 / k)) for k in range(1, order + 1)
    ]
    if order >= 3:
        out.append(("sum b a c = 1/6", float(b @ a @ c - 1 / 6)))
    if order >= 4:
        out.append(("sum b c a c = 1/8", float((b * c) @ a @ c - 1 / 8)))
        out.append(("sum b a c^2 = 1/12", float(b @ a @ c**2 - 1 / 12)))
        out.append(("sum b a a c = 1/24", float(b @ a @ a @ c - 1 / 24)))
    return out


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_rows_sum_to_their_nodes(name: str) -> None:
    a, c = _matrices(TABLEAUX[name])
    assert np.abs(a.sum(axis=1) - c).max() <= TOL


@pytest.mark.parametrize("name", sorted(TABLEAUX))
def test_propagated_solution_has_its_order(name: str) -> None:
    table = TABLEAUX[name]
    a, c = _matrices(table)
    residuals = _conditions(np.array(table.weights), a, c, table.order)
    assert all(abs(r) <= TOL for _, r in residuals), residuals


@pytest.mark.parametrize("name", sorted(ADAPTIVE))
def test_embedded_solution_has_its_order(name: str) -> None:
    table = TABLEAUX[name]
    assert table.error_weights is not None
    a, c = _matrices(table)
    b_hat = np.array(table.weights) - np.array(table.error_weights)
    residuals = _conditions(b_hat, a, c, EMBEDDED_ORDER[name])
    assert all(abs(r) <= TOL for _, r in residuals), residuals
    # and the pair is a pair: the embedded solution is not of the full order
    higher = _conditions(b_hat, a, c, EMBEDDED_ORDER[name] + 1)
    assert any(abs(r) > 1e-6 for _, r in higher), higher


@pytest.mark.parametrize(
    ("name", "fsal"),
    [("dopri5", True), ("dopri8", True), ("bosh3", True), ("adaptive_heun", False), ("rk4", False)],
)
def test_first_same_as_last_is_detected(name: str, fsal: bool) -> None:
    assert TABLEAUX[name].first_same_as_last is fsal


def test_the_two_families_partition_the_methods() -> None:
    assert set(ADAPTIVE) | set(FIXED_GRID) == set(TABLEAUX)
    assert not set(ADAPTIVE) & set(FIXED_GRID)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rows": ((0.5,), (0.1,))}, "lower triangular"),
        ({"weights": (0.5, 0.5)}, "weights"),
        ({"error_weights": (0.1, -0.1)}, "error_weights"),
    ],
)
def test_malformed_tableau_is_refused(kwargs: dict, match: str) -> None:
    base = {
        "name": "test",
        "nodes": (0.5, 1.0),
        "rows": ((0.5,), (0.0, 1.0)),
        "weights": (0.0, 1.0, 0.0),
        "error_weights": (0.1, -0.1, 0.0),
        "order": 2,
    }
    with pytest.raises(ValueError, match=match):
        Tableau(**{**base, **kwargs})
