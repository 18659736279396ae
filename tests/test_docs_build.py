"""The documentation site builds with ``mkdocs build --strict`` (skipped without the docs extra).

Strict mode turns every warning into a failure: a nav entry or a link to a missing page, an
unresolved cross-reference, a docstring mkdocstrings cannot render. Install the tools with
``pip install -e ".[docs]"``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if not os.environ.get("CI"):  # in CI the docs extra is installed: a missing tool is a failure
        pytest.importorskip("mkdocs")
        pytest.importorskip("mkdocstrings")
        pytest.importorskip("mkdocstrings_handlers.python")
        pytest.importorskip("pymdownx")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-6000:]}"
    assert (site / "index.html").exists()
    assert (site / "api" / "testing" / "index.html").exists()


def test_griffe_extension_rewrites_rest_markup() -> None:
    """The docs' griffe extension turns reST roles and math into Markdown (no mkdocs needed)."""
    pytest.importorskip("griffe")
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        from griffe_rst import rewrite
    finally:
        sys.path.pop(0)
    text = (
        "A :class:`~cnftools.paths.OTPath` and :func:`cnftools.log_likelihood`, "
        ":math:`a_t x_1`.\n\n"
        ".. math::\n\n    u = v\n\nExample:\n    >>> 1\n    1"
    )
    out = rewrite(text)
    assert "`OTPath`" in out and "`cnftools.log_likelihood`" in out
    assert "$a_t x_1$" in out
    assert "$$\nu = v\n$$" in out
    assert "Examples:\n    >>> 1" in out
