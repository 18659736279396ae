"""A test helper: the option groups of ``cnftools.dataset_nll`` (0.2) from one flat set of names.

Many tests of the dataset driver vary one or two settings around a shared base (``FAST``: rk4,
10 steps, no progress bar). :func:`grouped` builds the real 0.2 arguments from such a flat set:
``Execution`` (``batch_size``, ``device``, ``dtype``, ``num_threads``, ``progress``, ``seed``,
``target_stderr``, ``max_probes``), ``DataOptions`` (``columns``, ``extras``, ``dequantization``,
``bpd_dims``), ``Output`` (``out`` as its path, ``resume``, ``overwrite``, ``keep_chunks``,
``run_id``), the estimator (``divergence="hutchinson"`` with ``n_probes`` and ``noise``:
``Hutchinson(n_probes, noise)``; ``divergence="exact"``: ``Exact()``) and the solver
(``steps=N`` makes ``config=SolverConfig(method, steps=N)``). Every other name (``estimator``,
``config``, ``method``, ``rtol``, ``atol``, ``accuracy``, ``prior``) is passed as it is. Nothing is
defaulted here: a group absent from the flat names is not passed (``None``), so the driver's own
defaults apply. The tests of the option objects themselves (and of their errors) build them
explicitly (tests/test_nll_options.py).
"""

from __future__ import annotations

from typing import Any

from cnftools import Exact, Hutchinson, SolverConfig
from cnftools.nll import DataOptions, Execution, Output, dataset_nll

_EXECUTION = (
    "batch_size",
    "device",
    "dtype",
    "num_threads",
    "progress",
    "seed",
    "target_stderr",
    "max_probes",
)
_DATA = ("columns", "extras", "dequantization", "bpd_dims")
_OUTPUT = ("resume", "overwrite", "keep_chunks", "run_id")


def grouped(**flat: Any) -> dict[str, Any]:
    """The keyword arguments of ``dataset_nll`` (0.2) for the flat settings ``flat``."""
    flat = dict(flat)
    out: dict[str, Any] = {}
    execution = {k: flat.pop(k) for k in _EXECUTION if k in flat}
    if execution:
        out["execution"] = Execution(**execution)
    data = {k: flat.pop(k) for k in _DATA if k in flat}
    if data:
        out["data_options"] = DataOptions(**data)
    output = {k: flat.pop(k) for k in _OUTPUT if k in flat}
    path = flat.pop("out", None)
    if path is not None:
        out["output"] = Output(path, **output)
    elif output:
        raise AssertionError(f"test bug: {sorted(output)} without out=")
    divergence = flat.pop("divergence", None)
    if divergence == "hutchinson":
        n_probes = flat.pop("n_probes", 1)
        out["estimator"] = Hutchinson(n_probes, flat.pop("noise", "rademacher"))
    elif divergence == "exact":
        out["estimator"] = Exact()
    elif divergence is not None:
        raise AssertionError(f"test bug: divergence={divergence!r}")
    if "steps" in flat:
        out["config"] = SolverConfig(flat.pop("method"), steps=flat.pop("steps"))
    unknown = set(flat) - {"estimator", "config", "method", "rtol", "atol", "accuracy", "prior"}
    if unknown:
        raise AssertionError(f"test bug: unknown settings {sorted(unknown)}")
    out.update(flat)
    return out


def run_nll(v: object, data: object, prior: object = None, **flat: Any) -> Any:
    """``dataset_nll(v, data, prior, **grouped(**flat))``."""
    return dataset_nll(v, data, prior, **grouped(**flat))
