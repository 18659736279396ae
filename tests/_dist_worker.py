"""Helpers for the dataset-NLL tests, and a worker script for the multi-process (gloo) test.

As a script (under ``python -m torch.distributed.run --nproc-per-node N``)::

    python -m torch.distributed.run --nproc-per-node 2 tests/_dist_worker.py OUT_DIR

(optionally followed by ``stream``: the rows as an IterableDataset) initialises a gloo process
group, runs :func:`cnftools.dataset_nll` on :func:`make_case`'s data
with :data:`SETTINGS` (flat names, grouped by :func:`_nll_call.grouped`) and
``Output(OUT_DIR/nll.parquet)`` (chunks written by both ranks), and rank 0
also saves the returned frame to ``OUT_DIR/frame.parquet`` (other ranks check that they got
``None``).

Theory sections cited here (pages under ``docs/theory/``):

- §9: ``docs/theory/marginals.md#gaussian-data``
- §10: ``docs/theory/marginals.md#mixtures-and-empirical-data``
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

# fixed-grid RK4: every row's result is independent of the batch it is in, and cheap
SETTINGS: dict[str, Any] = {
    "batch_size": 7,
    "method": "rk4",
    "steps": 10,
    "divergence": "hutchinson",
    "n_probes": 2,
    "seed": 3,
    "progress": False,
}


class SlowField:
    """A field that sleeps ``seconds`` per evaluation (to interrupt a run mid-way)."""

    def __init__(self, field: Any, seconds: float = 0.0) -> None:
        self.field, self.seconds = field, seconds

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.seconds:
            import time

            time.sleep(self.seconds)
        return self.field(x, t)


def make_case(n: int = 40, dtype: torch.dtype = torch.float64) -> tuple[Any, torch.Tensor]:
    """A cheap closed-form field (a Gaussian's marginal under OT, theory §9) and ``n`` rows of it."""
    import cnftools

    mean = torch.tensor([0.5, -0.3], dtype=torch.float64)
    cov = torch.tensor([[0.5, 0.1], [0.1, 0.3]], dtype=torch.float64)
    marginal = cnftools.GaussianMarginal(cnftools.OTPath(0.0), mean, cov)
    x = marginal.sample(n, 1.0, torch.Generator().manual_seed(0)).to(dtype)
    return marginal, x


def make_mixture(n: int = 30, dtype: torch.dtype = torch.float64) -> tuple[Any, torch.Tensor]:
    """A 3-component mixture's marginal under OT (theory §10) and ``n`` rows of its data."""
    import cnftools

    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.0]], dtype=torch.float64)
    covs = torch.tensor(
        [[[0.3, 0.1], [0.1, 0.2]], [[0.2, 0.0], [0.0, 0.4]], [[0.5, -0.2], [-0.2, 0.3]]],
        dtype=torch.float64,
    )
    marginal = cnftools.MixtureMarginal(cnftools.OTPath(0.0), means, covs)
    x = marginal.sample(n, 1.0, torch.Generator().manual_seed(0)).to(dtype)
    return marginal, x


class Stream(torch.utils.data.IterableDataset):
    """The rows of a tensor as an IterableDataset (read lazily, same order on every pass)."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __iter__(self):
        yield from self.x


# adaptive dopri5 with the exact (autograd) divergence of an MLPField: every row on its own steps,
# so a row's value does not depend on the shard or batch it is solved in (to rounding)
ADAPTIVE: dict[str, Any] = {"batch_size": 7, "rtol": 1e-8, "atol": 1e-8, "progress": False}


def make_mlp(n: int = 40) -> tuple[Any, torch.Tensor]:
    """A seeded MLPField and ``n`` rows (the adaptive engine case)."""
    import cnftools

    torch.manual_seed(0)
    field = cnftools.MLPField(2, hidden=[16, 16]).double()
    return field, torch.randn(n, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def main(out_dir: str, source: str = "tensor") -> None:
    import torch.distributed as dist
    from _nll_call import run_nll

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        adaptive = source == "adaptive"
        field, x = make_mlp() if adaptive else make_case()
        data = Stream(x) if source == "stream" else x
        settings = ADAPTIVE if adaptive else SETTINGS
        frame = run_nll(field, data, out=Path(out_dir) / "nll.parquet", **settings)
        rank = dist.get_rank()
        if rank == 0:
            assert frame is not None
            frame.to_parquet(Path(out_dir) / "frame.parquet")
            (Path(out_dir) / "world.txt").write_text(str(frame.attrs["run"]["world_size"]))
        else:
            assert frame is None, "ranks other than 0 must return None"
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
