"""cnftools: continuous normalizing flows and flow matching with exact, checkable likelihoods.

Conventions (fixed for the whole package): time runs from ``t = 0`` (noise, ``N(0, I)``) to ``t = 1``
(data). A velocity field is any callable ``v(x, t)``; cnftools always calls it with ``x`` of shape
``(B, *event)`` and ``t`` of shape ``(B,)`` on ``x``'s device and dtype (see :mod:`cnftools.fields`).
"""

from cnftools.paths import AffineGaussianPath, GaussianPath, OTPath, VEPath, VPPath

__version__ = "0.1.0"

__all__ = [
    "AffineGaussianPath",
    "GaussianPath",
    "OTPath",
    "VEPath",
    "VPPath",
    "__version__",
]
