"""cnftools: continuous normalizing flows and flow matching with exact, checkable likelihoods.

Conventions (fixed for the whole package): time runs from ``t = 0`` (noise, ``N(0, I)``) to ``t = 1``
(data). A velocity field is any callable ``v(x, t)``; cnftools always calls it with ``x`` of shape
``(B, *event)`` and ``t`` of shape ``(B,)`` on ``x``'s device and dtype (see :mod:`cnftools.fields`).
"""

from cnftools import flows, interop
from cnftools._ode import SolverConfig, SolverError
from cnftools._resources import threads
from cnftools._version import VERSION
from cnftools.continuity import continuity_relative_residual, continuity_residual
from cnftools.data import Dequantization
from cnftools.divergences import DivergenceResult, divergence, velocity_and_divergence
from cnftools.estimators import ClosedForm, Exact, Hutchinson
from cnftools.interop import as_velocity
from cnftools.likelihood import (
    LikelihoodResult,
    SampleResult,
    log_likelihood,
    sample,
    sample_with_log_prob,
)
from cnftools.marginals import GaussianMarginal, MixtureMarginal
from cnftools.nll import dataset_nll, summarize
from cnftools.paths import AffineGaussianPath, GaussianPath, OTPath, VEPath, VPPath
from cnftools.training import load_checkpoint, minibatch_ot_pairing, save_checkpoint, train_cfm
from cnftools.training.features import TimeFeatures
from cnftools.training.models import ConvField, MLPField
from cnftools.training.objectives import cfm_loss, fm_loss
from cnftools.training.options import Batches, Checkpointing, Monitor, Optimization

__version__ = VERSION


__all__ = [
    "AffineGaussianPath",
    "Batches",
    "Checkpointing",
    "ClosedForm",
    "ConvField",
    "Dequantization",
    "DivergenceResult",
    "Exact",
    "GaussianMarginal",
    "GaussianPath",
    "Hutchinson",
    "LikelihoodResult",
    "MLPField",
    "MixtureMarginal",
    "Monitor",
    "OTPath",
    "Optimization",
    "SampleResult",
    "SolverConfig",
    "SolverError",
    "TimeFeatures",
    "VEPath",
    "VPPath",
    "__version__",
    "as_velocity",
    "cfm_loss",
    "continuity_relative_residual",
    "continuity_residual",
    "dataset_nll",
    "divergence",
    "flows",
    "fm_loss",
    "interop",
    "load_checkpoint",
    "log_likelihood",
    "minibatch_ot_pairing",
    "sample",
    "sample_with_log_prob",
    "save_checkpoint",
    "summarize",
    "threads",
    "train_cfm",
    "velocity_and_divergence",
]
