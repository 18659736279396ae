"""The one place figures get matplotlib: a headless backend, chosen before pyplot is imported.

matplotlib is a dependency, but importing it costs about half a second, and figures are drawn only
when ``cnftools validate --out DIR`` asks for them; every experiment's figure function starts with
``plt = pyplot()`` after checking that a figure path was requested.
"""

from __future__ import annotations

from types import ModuleType

__all__ = ["pyplot"]


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` with the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
