"""A griffe extension for the docs build: reads cnftools' reST-flavoured Google docstrings.

cnftools docstrings are Google style but write maths and cross-references the Sphinx way
(``:math:`x```, ``.. math::`` blocks, ``:class:`~cnftools.paths.OTPath```) and title their doctest
section ``Example:``. Before griffe parses a docstring this extension rewrites, for the page only:

- ``.. math::`` blocks to ``$$ ... $$`` and ``:math:`x``` to ``$x$`` (rendered by arithmatex);
- ``:class:``, ``:func:``, ``:meth:``, ``:mod:``, ``:data:``, ``:attr:``, ``:exc:`` roles to code
  spans (``~`` keeps the last dotted name only);
- a line ``Example:`` to ``Examples:``, so griffe renders the doctest as a code block.

The source files are not touched. Used by ``mkdocs.yml`` (plugins → mkdocstrings → extensions).
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|data|attr|exc|obj):`(~?)([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$")
_MATH_BLOCK = re.compile(r"^(\s*)\.\. math::\s*(.*)$")


def _xref(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    target = target.strip()
    if target.startswith("~"):
        tilde, target = "~", target[1:]
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


def _math_blocks(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_BLOCK.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, inline = match.groups()
        body = [inline] if inline else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        while body and not body[0]:
            body.pop(0)
        out.extend([f"{indent}$$", *(f"{indent}{b}" for b in body if b), f"{indent}$$", ""])
    return out


def rewrite(text: str) -> str:
    """Rewrite one docstring (exposed for testing)."""
    lines = [_EXAMPLE.sub(r"\1Examples:", line) for line in text.splitlines()]
    text = "\n".join(_math_blocks(lines))
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return _XREF_ROLE.sub(_xref, text)


class ReSTToMarkdown(Extension):
    """Rewrite each docstring as it is loaded."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
