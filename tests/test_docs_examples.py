"""Every ```python block of README.md and docs/ runs (each file in one namespace, top to bottom),
and prints what the page says it prints.

A block may be followed by an HTML comment (invisible on the page) stating its output::

    <!-- expect rtol=1e-3 atol=1e-6
    0.123 some text 45
    -->

Each line of the block's output is compared with the expected line, token by token: numbers with
``numpy.isclose(got, expected, rtol, atol)`` (defaults ``rtol=1e-6``, ``atol=0``; a page states
looser ones where its numbers depend on the platform's floating point), other tokens exactly, and a
token ``...`` matches the rest of the line.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(
    r"^```python\n(.*?)^```\n(?:\s*<!-- expect([^\n]*)\n(.*?)-->)?", re.MULTILINE | re.DOTALL
)


def _number(token: str) -> float | None:
    try:
        return float(token.strip(",()[]"))
    except ValueError:
        return None


def check_output(got: str, expected: str, options: str) -> None:
    """Compare printed text with the expected text (see the module docstring)."""
    tol = {"rtol": 1e-6, "atol": 0.0}
    for key, value in re.findall(r"(rtol|atol)=(\S+)", options):
        tol[key] = float(value)
    got_lines = got.strip("\n").splitlines()
    want_lines = expected.strip("\n").splitlines()
    assert len(got_lines) == len(want_lines), f"printed:\n{got}\nexpected:\n{expected}"
    for g_line, w_line in zip(got_lines, want_lines, strict=True):
        g_tokens, w_tokens = g_line.split(), w_line.split()
        for i, w in enumerate(w_tokens):
            if w == "...":
                break
            assert i < len(g_tokens), f"printed {g_line!r}, expected {w_line!r}"
            g = g_tokens[i]
            gn, wn = _number(g), _number(w)
            if gn is not None and wn is not None:
                assert np.isclose(gn, wn, **tol), f"printed {g_line!r}, expected {w_line!r} ({tol})"
            else:
                assert g == w, f"printed {g_line!r}, expected {w_line!r}"
        else:
            assert len(g_tokens) == len(w_tokens), f"printed {g_line!r}, expected {w_line!r}"


@pytest.mark.parametrize(
    ("got", "expected", "options", "ok"),
    [
        ("0.100001 nats\n", "0.1 nats", "", False),
        ("0.100001 nats\n", "0.1 nats", "rtol=1e-4", True),
        ("nan\n", "0.1", "", False),
        ("a b c\n", "a ...", "", True),
        ("1\n2\n", "1", "", False),
    ],
)
def test_output_check(got, expected, options, ok):
    if ok:
        check_output(got, expected, options)
    else:
        with pytest.raises(AssertionError):
            check_output(got, expected, options)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_markdown_python_blocks_run(path, monkeypatch, tmp_path):
    blocks = BLOCK.findall(path.read_text(encoding="utf-8"))
    if not blocks:
        pytest.skip("no python blocks")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "__docs__"}
    for number, (code, options, expected) in enumerate(blocks, 1):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, f"{path.name}:block{number}", "exec"), namespace)
        if expected:
            check_output(printed.getvalue(), expected, options)
