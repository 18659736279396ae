"""Every experiment of ``cnftools validate`` passes in quick mode, in both dtypes.

This is the main job's own acceptance: a failing row (or a crash) here is what a user running
``cnftools validate`` would see. Claims (HELD / NOT HELD) are findings and never fail.
"""

from __future__ import annotations

import pytest
import torch

from cnftools.validation import Context, discover

EXPERIMENTS = discover()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[e.name for e in EXPERIMENTS])
def test_experiment_passes_in_quick_mode(experiment, dtype):
    checks = list(experiment.run(Context(dtype=dtype)))
    assert checks, f"{experiment.name} produced no rows"
    failed = [c for c in checks if not c.passed]
    assert not failed, "\n".join(
        f"{c.section} {c.check} [{c.subject}]: error {c.error:.3e} vs tolerance {c.tolerance:.1e}"
        for c in failed
    )


def test_every_theory_section_has_an_experiment():
    """§1–§12 of THEORY.md each have at least one experiment (sections by their SECTION number)."""
    covered = set()
    for experiment in EXPERIMENTS:
        checks = list(experiment.run(Context()))
        covered.update(int(c.section.strip("§").split("–")[0].split(".")[0]) for c in checks)
    assert covered >= set(range(1, 13)), f"sections without rows: {set(range(1, 13)) - covered}"
