"""Check rows, the run context, discovery of experiments, the printed table and the report."""

from __future__ import annotations

import importlib
import math
import pkgutil
import platform
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy
import scipy
import torch
import torchdiffeq

import cnftools

__all__ = [
    "SECTION_PAGES",
    "Check",
    "Context",
    "Experiment",
    "Run",
    "discover",
    "run_experiments",
    "section_numbers",
    "write_report",
]


SECTION_PAGES: dict[int, str] = {
    1: "docs/theory/change-of-variables.md#change-of-variables",
    2: "docs/theory/change-of-variables.md#normalizing-flows",
    3: "docs/theory/change-of-variables.md#continuous-normalizing-flows",
    4: "docs/theory/divergence-and-continuity.md#continuity-equation",
    5: "docs/theory/marginals.md#theorem-1",
    6: "docs/theory/flow-matching.md#flow-matching-objectives",
    7: "docs/theory/paths.md#gaussian-conditional-paths",
    8: "docs/theory/paths.md#three-paths",
    9: "docs/theory/marginals.md#gaussian-data",
    10: "docs/theory/marginals.md#mixtures-and-empirical-data",
    11: "docs/theory/divergence-and-continuity.md#divergence",
    12: "docs/theory/bits-per-dim.md#bits-per-dimension",
    13: "docs/theory/diffusion.md#diffusion-as-flow-matching",
}
"""Where each theory section's formulas live in the repository (the report's legend)."""


@dataclass(frozen=True)
class Check:
    """One row of the report: a measured error against a stated tolerance.

    Attributes:
        section: the the theory pages (docs/theory/) section, e.g. ``"§7"``.
        check: what is compared, e.g. ``"Theorem 3: dψ/dt = u_t(ψ_t)"``.
        subject: the case: path, data, parameters.
        error: the measured error (max over the grid unless the check says otherwise).
        tolerance: the bound the error must meet.
        why: one phrase on why that tolerance is right.
        expect_fail: a negative control: the row passes when ``error > tolerance`` (the verifier
            detects a deliberately wrong input).
        claim: an empirical claim (e.g. "OT needs fewer steps than VP"), not a correctness check:
            shown as HELD / NOT HELD / TIE and never failing the run, since a claim about one
            target and one setting may honestly not hold.
        tie_within: for a claim row, the relative band around the tolerance inside which the two
            sides cannot be told apart (``|error - tolerance| <= tie_within * tolerance``): the
            row then reads TIE rather than HELD or NOT HELD.
    """

    section: str
    check: str
    subject: str
    error: float
    tolerance: float
    why: str = ""
    expect_fail: bool = False
    claim: bool = False
    tie_within: float = 0.0

    @property
    def tie(self) -> bool:
        """For a claim row: the measurement cannot tell the two sides apart."""
        return (
            self.claim
            and math.isfinite(self.error)
            and abs(self.error - self.tolerance) <= self.tie_within * abs(self.tolerance)
        )

    @property
    def held(self) -> bool:
        """For a claim row: whether the claim held (error ≤ tolerance, and not a tie)."""
        return math.isfinite(self.error) and self.error <= self.tolerance and not self.tie

    @property
    def verdict(self) -> str:
        if self.claim:
            return "TIE" if self.tie else ("HELD" if self.held else "NOT HELD")
        return "PASS" if self.passed else "FAIL"

    @property
    def passed(self) -> bool:
        """Whether the row counts as passed (a claim row always does: it is a finding)."""
        if self.claim:
            return True
        if not math.isfinite(self.error):
            return False
        return self.error > self.tolerance if self.expect_fail else self.error <= self.tolerance


@dataclass
class Context:
    """What every experiment gets: where and in what precision to run, and how much to do."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float64
    full: bool = False
    seed: int = 0
    out: Path | None = None
    figures: list[Path] = field(default_factory=list)

    def generator(self, offset: int = 0) -> torch.Generator:
        """A generator on the context's device, seeded with ``seed + offset``."""
        return torch.Generator(device=self.device).manual_seed(self.seed + offset)

    def tolerance(self, float64: float, float32: float) -> float:
        """Pick the tolerance that matches the context's dtype."""
        return float64 if self.dtype == torch.float64 else float32

    def figure_path(self, name: str) -> Path | None:
        """Where to write a figure (``None`` when no output folder was given)."""
        if self.out is None:
            return None
        path = self.out / name
        self.figures.append(path)
        return path


def section_numbers(section: str) -> set[int]:
    """The theory sections a row's ``section`` names: ``"§9–10"`` → ``{9, 10}``, ``"§3"`` → ``{3}``."""
    text = section.strip().lstrip("§")
    if "–" in text:
        low, high = (int(part.strip().lstrip("§").split(".")[0]) for part in text.split("–", 1))
        return set(range(low, high + 1))
    return {int(text.split(".")[0])}


@dataclass(frozen=True)
class Experiment:
    """One experiment module: its ordering key, title, the sections its rows check, and ``run``."""

    name: str
    section: float
    title: str
    run: Callable[[Context], Iterable[Check]]
    sections: tuple[int, ...] = ()

    @property
    def heading(self) -> str:
        """The sections and the title, e.g. ``"§5, §9, §10 Theorem 1: ..."``."""
        return f"{', '.join(f'§{n}' for n in self.sections)} {self.title}"


def discover() -> list[Experiment]:
    """Import every experiment module of this package, ordered by theory section."""
    package = importlib.import_module("cnftools.validation")
    experiments = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module: ModuleType = importlib.import_module(f"cnftools.validation.{info.name}")
        sections = tuple(getattr(module, "SECTIONS", (int(module.SECTION),)))
        experiments.append(
            Experiment(info.name, float(module.SECTION), str(module.TITLE), module.run, sections)
        )
    return sorted(experiments, key=lambda e: (e.section, e.name))


def run_experiments(
    ctx: Context,
    experiments: list[Experiment],
    echo: Callable[[str], None] | None = print,
) -> tuple[list[tuple[Experiment, list[Check], float]], list[tuple[Experiment, str]]]:
    """Run experiments; a crash is recorded as an error (and fails the run), not raised."""
    results: list[tuple[Experiment, list[Check], float]] = []
    errors: list[tuple[Experiment, str]] = []
    for experiment in experiments:
        start = time.perf_counter()
        try:
            checks = list(experiment.run(ctx))
        except Exception:
            errors.append((experiment, traceback.format_exc()))
            if echo:
                echo(f"[error] {experiment.name}: {traceback.format_exc().splitlines()[-1]}")
            continue
        elapsed = time.perf_counter() - start
        results.append((experiment, checks, elapsed))
        if echo:
            echo(format_table(checks, title=f"{experiment.heading} ({elapsed:.1f} s)"))
    return results, errors


def format_table(checks: list[Check], title: str = "") -> str:
    """A fixed-width text table, one row per check."""
    header = ("section", "check", "subject", "error", "tolerance", "pass")
    rows = [
        (
            c.section,
            c.check,
            c.subject,
            f"{c.error:.2e}",
            ("> " if c.expect_fail else "") + f"{c.tolerance:.2g}",
            c.verdict,
        )
        for c in checks
    ]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [f"== {title}"] if title else []
    out.append(line.format(*header))
    out.extend(line.format(*r) for r in rows)
    return "\n".join(out) + "\n"


def environment(ctx: Context) -> dict[str, str]:
    """Device, dtype and versions, recorded at the top of the report."""
    device = str(ctx.device)
    if ctx.device.type == "cuda":
        device += f" ({torch.cuda.get_device_name(ctx.device)})"
    return {
        "device": device,
        "dtype": str(ctx.dtype).replace("torch.", ""),
        "mode": "full" if ctx.full else "quick",
        "seed": str(ctx.seed),
        "cnftools": cnftools.__version__,
        "torch": torch.__version__,
        "torchdiffeq": getattr(torchdiffeq, "__version__", "unknown"),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}",
    }


@dataclass
class Run:
    """One pass of the experiments in one dtype."""

    ctx: Context
    results: list[tuple[Experiment, list[Check], float]]
    errors: list[tuple[Experiment, str]]
    elapsed: float

    @property
    def n_checks(self) -> int:
        return sum(not c.claim for _, cs, _ in self.results for c in cs)

    @property
    def n_failed(self) -> int:
        return sum(not c.passed for _, cs, _ in self.results for c in cs)

    @property
    def claims(self) -> list[Check]:
        return [c for _, cs, _ in self.results for c in cs if c.claim]

    def claims_summary(self) -> str:
        """One phrase on the claim rows, worded so that a claim that did not hold reads as a
        finding, not a failure (empty when the run has no claims)."""
        claims = self.claims
        if not claims:
            return ""
        held = sum(c.held for c in claims)
        ties = sum(c.tie for c in claims)
        parts = [f"{held} held", f"{len(claims) - held - ties} did not"]
        if ties:
            parts.append(f"{ties} tied")
        return f"empirical claims (findings, never failures): {', '.join(parts)}"


def write_report(path: Path, runs: list[Run]) -> None:
    """Write one Markdown report: environment, then per dtype one table per experiment; figures."""
    first = runs[0].ctx
    env = environment(first)
    env["dtype"] = ", ".join(str(r.ctx.dtype).replace("torch.", "") for r in runs)
    total = sum(r.elapsed for r in runs)
    failed = sum(r.n_failed + len(r.errors) for r in runs)
    lines = ["# cnftools validation report", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [f"- time taken: {total:.1f} s", ""]
    verdict = "ALL PASSED" if failed == 0 else "FAILURES"
    summary = "; ".join(
        f"{str(r.ctx.dtype).replace('torch.', '')}: {r.n_checks - r.n_failed} of {r.n_checks} "
        f"checks passed, {len(r.errors)} experiment(s) crashed"
        + (f"; {r.claims_summary()}" if r.claims else "")
        for r in runs
    )
    lines += [
        f"**{verdict}** — {summary}.",
        "",
        "A row passes when error ≤ tolerance; rows marked `> tol` are negative controls that pass",
        "when the verifier *detects* a deliberately wrong input (error > tolerance). Rows marked",
        "HELD / NOT HELD / TIE are empirical claims (a ratio that is < 1 when the claim holds, TIE",
        "when the two sides agree within the row's stated resolution): findings about one target",
        "and one setting, reported as measured and never failing the run.",
        "",
    ]
    for run in runs:
        dtype = str(run.ctx.dtype).replace("torch.", "")
        lines += [f"## {dtype} ({run.elapsed:.1f} s)", ""]
        for experiment, checks, seconds in run.results:
            lines += [
                f"### {experiment.heading} — {dtype}",
                "",
                f"`{experiment.name}`, {seconds:.1f} s",
                "",
            ]
            lines += [
                "| section | check | subject | error | tolerance | verdict | why this tolerance |"
            ]
            lines += ["|---|---|---|---|---|---|---|"]
            for c in checks:
                tol = ("> " if c.expect_fail else "") + f"{c.tolerance:.2g}"
                verdict_cell = c.verdict if c.passed else "**FAIL**"
                lines.append(
                    f"| {c.section} | {c.check} | {c.subject} | {c.error:.2e} | {tol} | "
                    f"{verdict_cell} | {c.why} |"
                )
            lines.append("")
        for experiment, text in run.errors:
            lines += [
                f"### {experiment.name}: crashed ({dtype})",
                "",
                "```",
                text.rstrip(),
                "```",
                "",
            ]
    cited = sorted(
        set().union(
            *(section_numbers(c.section) for r in runs for _, cs, _ in r.results for c in cs)
        )
    )
    lines += ["## Theory sections", "", "| section | formulas in the repository |", "|---|---|"]
    lines += [f"| §{n} | `{SECTION_PAGES[n]}` |" for n in cited if n in SECTION_PAGES]
    lines.append("")
    figures = [p for r in runs for p in r.ctx.figures if p.exists()]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{p.stem}]({p.name})" for p in figures]
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
