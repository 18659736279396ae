"""Dataset negative log-likelihood: :func:`dataset_nll` and what it is made of.

* :mod:`cnftools.nll.sources` — :func:`read_rows`: tensors, arrays, DataFrames, files, datasets,
  data loaders and streams, read batch by batch; :class:`PerRow` and :class:`Shared`, the two
  kinds of ``extras=`` values;
* :mod:`cnftools.nll.units` — one unit (a batch and a probe round) through the solver;
* :mod:`cnftools.nll.fingerprint` — content fingerprints of the field, prior and settings;
* :mod:`cnftools.nll.store` — the chunk store: atomic files, the lock, resume checks;
* :mod:`cnftools.nll.distributed` — ranks, gather, devices, thread count;
* :mod:`cnftools.nll.frames` — the result frame, :func:`summarize`, the probe-round plan;
* :mod:`cnftools.nll.options` — :class:`DataOptions`, :class:`Output`, :class:`Execution`, the
  option groups of :func:`dataset_nll`;
* :mod:`cnftools.nll.driver` — :func:`dataset_nll`;
* :mod:`cnftools.nll.baselines` — Gaussian and histogram baselines on the dequantized scale.

What a run guarantees (resume, failures) is stated in docs/guarantees.md.
"""

from cnftools.data import Dequantization
from cnftools.nll.baselines import gaussian_baseline_nll, histogram_baseline_nll
from cnftools.nll.driver import dataset_nll
from cnftools.nll.fingerprint import Unfingerprintable, fingerprint
from cnftools.nll.frames import summarize
from cnftools.nll.job import RowsFailedError, RunInterrupted
from cnftools.nll.options import DataOptions, Execution, Output
from cnftools.nll.sources import Batch, PerRow, RowSource, Shared, read_rows
from cnftools.nll.store import ResumeError

__all__ = [
    "Batch",
    "DataOptions",
    "Dequantization",
    "Execution",
    "Output",
    "PerRow",
    "ResumeError",
    "RowSource",
    "RowsFailedError",
    "RunInterrupted",
    "Shared",
    "Unfingerprintable",
    "dataset_nll",
    "fingerprint",
    "gaussian_baseline_nll",
    "histogram_baseline_nll",
    "read_rows",
    "summarize",
]
