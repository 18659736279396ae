"""Every experiment of ``cnftools validate`` passes in quick mode, in both dtypes.

This is the main job's own acceptance: a failing row (or a crash) here is what a user running
``cnftools validate`` would see. Claims (HELD / NOT HELD) are findings and never fail.
"""

from __future__ import annotations

import pytest
import torch

from cnftools.validation._framework import Context, discover, section_numbers

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

    covered = set().union(*(section_numbers(c.section) for c in checks))
    assert covered == set(experiment.sections), (
        f"{experiment.name} declares SECTIONS = {experiment.sections} but its rows check "
        f"{sorted(covered)}"
    )


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=[e.name for e in EXPERIMENTS])
def test_experiment_passes_in_full_mode(experiment):
    """``cnftools validate --full`` (float64): the branches only the full set runs. Regression: in
    0.2's migration, theorem1's full-only closed-form row still passed ``divergence=`` and the
    experiment crashed under ``--full`` while every quick-mode test passed."""
    checks = list(experiment.run(Context(dtype=torch.float64, full=True)))
    assert checks, f"{experiment.name} produced no rows"
    failed = [c for c in checks if not c.passed]
    assert not failed, "\n".join(f"{c.section} {c.check} [{c.subject}]" for c in failed)


def test_every_theory_section_has_an_experiment():
    """§1–§12 of the theory each have an experiment (the declared SECTIONS; the parametrized test
    above checks that each experiment's rows cover exactly the sections it declares)."""
    covered = set().union(*(e.sections for e in EXPERIMENTS))
    assert covered >= set(range(1, 13)), f"sections without rows: {set(range(1, 13)) - covered}"


@pytest.mark.parametrize(
    ("text", "expected"), [("§3", {3}), ("§9–10", {9, 10}), ("§1–3", {1, 2, 3}), ("§8.5", {8})]
)
def test_section_numbers_reads_ranges(text, expected):
    assert section_numbers(text) == expected


def test_claim_rows_read_tie_held_and_not_held():
    from cnftools.validation import Check

    tie = Check("§8", "claim", "s", 1.0, 1.0, claim=True, tie_within=1e-3)
    held = Check("§8", "claim", "s", 0.5, 1.0, claim=True, tie_within=1e-3)
    not_held = Check("§8", "claim", "s", 2.0, 1.0, claim=True, tie_within=1e-3)
    assert [tie.verdict, held.verdict, not_held.verdict] == ["TIE", "HELD", "NOT HELD"]
    assert tie.passed and held.passed and not_held.passed  # claims never fail a run


def test_every_theory_page_in_the_legend_exists():
    """The report's legend points at pages and anchors that ship with the repository."""
    from pathlib import Path

    from cnftools.validation._framework import SECTION_PAGES

    root = Path(__file__).resolve().parents[1]
    assert set(SECTION_PAGES) == set(range(1, 14))
    for page in SECTION_PAGES.values():
        file, anchor = page.split("#")
        assert "{#" + anchor + "}" in (root / file).read_text(encoding="utf-8"), page
