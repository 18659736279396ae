"""docs/architecture.md stays true: layers, imports, "where does X go", sizes.

The layer table of docs/architecture.md is the declaration: every module of cnftools (and of
``validation/``, installed as ``cnftools.validation``) has a row; every import between units goes
to a strictly lower layer; each row's "imports" column is exactly the set of units the module
imports (read with :mod:`ast`, nothing is imported). A package (``nll/``, ``training/``, ...) is one
unit: its files may import each other. The "where a new thing goes" table names files that exist
and the names it starts from are defined (or imported) there. Modules over 600 lines and function
bodies over 80 lines (docstring excluded) fail unless on :data:`SIZE_ALLOWED`, whose entries fail
once they are no longer too big, so that list only shrinks.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
SOURCES = {"cnftools": ROOT / "cnftools", "cnftools.validation": ROOT / "validation"}
PACKAGES = {"cli", "nll", "testing", "training", "validation"}
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80

# Too big today. Each entry says why; an entry that is no longer too big fails the test below.
SIZE_ALLOWED: dict[str, str] = {}


# --- reading the sources -------------------------------------------------------------------------


def _files() -> Iterator[tuple[str, Path]]:
    """(dotted module name, file) for every Python file of the installed package."""
    for package, folder in SOURCES.items():
        for file in sorted(folder.rglob("*.py")):
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join([package, *parts]), file


def _unit(module: str) -> str:
    """The layer-table unit of a dotted name: ``cnftools``, ``paths``, ``nll/``, ``__main__``."""
    parts = module.split(".")
    assert parts[0] == "cnftools", module
    if len(parts) == 1:
        return "cnftools"
    return f"{parts[1]}/" if parts[1] in PACKAGES else parts[1]


@functools.cache
def _module_names() -> frozenset[str]:
    return frozenset(module for module, _ in _files())


def _is_module(dotted: str) -> bool:
    """Whether a dotted ``cnftools...`` name is a module or package (not an attribute)."""
    return dotted in _module_names()


def _imports(module: str, file: Path) -> set[str]:
    """Every ``cnftools`` module imported anywhere in ``file`` (lazy imports included)."""
    modules: set[str] = set()
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules.update(a.name for a in node.names if a.name.split(".")[0] == "cnftools")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "cnftools":
                continue
            submodules = {f"{target}.{a.name}" for a in node.names} & _module_names()
            # ``from cnftools import divergences`` imports the submodule, not the package root.
            if len(submodules) < len(node.names):
                modules.add(target)
            modules.update(submodules)
    return modules


def _private_imports(file: Path) -> list[str]:
    """``from cnftools.x import _name`` lines: another module's underscore names."""
    found = []
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cnftools"):
            found += [
                f"from {node.module} import {a.name}"
                for a in node.names
                if a.name.startswith("_") and not _is_module(f"{node.module}.{a.name}")
            ]
    return found


def _graph() -> dict[str, set[str]]:
    """unit -> the other units it imports."""
    graph: dict[str, set[str]] = {}
    for module, file in _files():
        unit = _unit(module)
        graph.setdefault(unit, set()).update(_unit(m) for m in _imports(module, file))
        graph[unit].discard(unit)
    return graph


# --- reading the page ----------------------------------------------------------------------------


def _section(title: str) -> str:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def _rows(section: str) -> list[list[str]]:
    """The body rows of the first table of a section, as lists of cells."""
    lines = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def _code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _layer_table() -> dict[str, tuple[int, set[str]]]:
    """unit -> (layer, the units its row says it imports)."""
    table: dict[str, tuple[int, set[str]]] = {}
    for layer, module, _what, imports in _rows(_section("Layers")):
        (unit,) = _code(module)
        assert unit not in table, f"{unit} has two rows in the layer table"
        table[unit] = (int(layer), set(_code(imports)))
    return table


# --- the tests -----------------------------------------------------------------------------------


def test_layer_table_lists_every_module_and_nothing_else():
    table, graph = _layer_table(), _graph()
    assert set(graph) - set(table) == set(), "add a row to the layer table of docs/architecture.md"
    assert set(table) - set(graph) == set(), "the layer table names modules that do not exist"


def _not_downward(graph: dict[str, set[str]], table: dict[str, tuple[int, set[str]]]) -> list[str]:
    return [
        f"{unit} (layer {table[unit][0]}) imports {dep} (layer {table[dep][0]})"
        for unit, deps in sorted(graph.items())
        for dep in sorted(deps)
        if table[dep][0] >= table[unit][0]
    ]


def test_no_import_goes_up_or_sideways():
    """Every import between units goes to a strictly lower layer of the table."""
    assert _not_downward(_graph(), _layer_table()) == []


def test_imports_column_is_the_real_imports():
    table = _layer_table()
    wrong = {
        unit: {"missing from the row": deps - table[unit][1], "not imported": table[unit][1] - deps}
        for unit, deps in _graph().items()
        if deps != table[unit][1]
    }
    assert wrong == {}


def test_no_module_imports_another_modules_private_names():
    found = {str(f.relative_to(ROOT)): _private_imports(f) for _, f in _files()}
    assert {k: v for k, v in found.items() if v} == {}


def test_the_checker_finds_an_upward_import(tmp_path):
    """Negative control: an upward edge and a private import, in a file the parser reads."""
    file = tmp_path / "probe.py"
    file.write_text("from cnftools import likelihood\nfrom cnftools.paths import _check\n")
    assert _imports("cnftools.fields", file) == {"cnftools.likelihood", "cnftools.paths"}
    assert _private_imports(file) == ["from cnftools.paths import _check"]
    # A small table and graph of its own, so the control does not depend on the real layer
    # table being complete (that is test_layer_table_lists_every_module_and_nothing_else's job).
    table = {
        "_checks": (0, set()),
        "fields": (1, {"_checks"}),
        "paths": (2, {"fields"}),
        "divergences": (2, {"fields"}),
        "likelihood": (4, {"divergences"}),
    }
    graph = {unit: set(imports) for unit, (_, imports) in table.items()}
    assert _not_downward(graph, table) == []  # every edge of the table goes down
    graph["fields"] |= {"likelihood", "_checks"}  # one edge up, one down
    graph["paths"] |= {"divergences"}  # sideways: both on one layer
    assert _not_downward(graph, table) == [
        "fields (layer 1) imports likelihood (layer 4)",
        "paths (layer 2) imports divergences (layer 2)",
    ]


def _defined_names(file: Path) -> set[str]:
    """Top-level names a file binds: classes, functions, assignments and imports."""
    names: set[str] = set()
    for node in ast.parse(file.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


WHERE_ROWS = _rows(_section("Where a new thing goes"))


@pytest.mark.parametrize("row", WHERE_ROWS, ids=[row[0] for row in WHERE_ROWS])
def test_where_table_names_real_places(row):
    """Every path the row names exists; the name it starts from is bound in one of its files."""
    _thing, goes_in, starts_from, _then = row
    paths = [ROOT / p for p in _code(goes_in) if "/" in p]
    for path in paths:
        assert path.exists(), f"{path.relative_to(ROOT)} does not exist"
    for name in _code(starts_from):
        files = [p for p in paths if p.suffix == ".py"]
        assert files, f"{name}: the row names no file to find it in"
        assert any(name in _defined_names(f) for f in files), f"{name} is not in {goes_in}"


def test_where_table_covers_the_kinds_the_issue_names():
    things = " | ".join(row[0] for row in WHERE_ROWS)
    for kind in ("schedule", "path", "divergence", "field adapter", "dataset", "validation"):
        assert kind in things
    assert "CLI command" in things


# --- sizes ---------------------------------------------------------------------------------------


def _function_lengths(file: Path) -> Iterator[tuple[str, int]]:
    """(qualified name, body lines without the docstring) of every function in ``file``."""

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, int]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                body = child.body
                if ast.get_docstring(child, clean=False) is not None:
                    body = body[1:]
                if body:
                    end = body[-1].end_lineno or body[-1].lineno
                    yield f"{prefix}{child.name}", end - body[0].lineno + 1
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")

    yield from visit(ast.parse(file.read_text(encoding="utf-8")), "")


def _too_big() -> dict[str, str]:
    found: dict[str, str] = {}
    for _, file in _files():
        name = str(file.relative_to(ROOT))
        lines = len(file.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES:
            found[name] = f"{lines} lines"
        for function, length in _function_lengths(file):
            if length > MAX_FUNCTION_LINES:
                found[f"{name}::{function}"] = f"a body of {length} lines"
    return found


def test_modules_and_functions_stay_small():
    """No module over 600 lines, no function body over 80, unless allowed with a reason."""
    too_big = _too_big()
    new = {k: v for k, v in too_big.items() if k not in SIZE_ALLOWED}
    assert new == {}, "split these (or, if another engineer owns them, allow them with a reason)"
    stale = sorted(set(SIZE_ALLOWED) - set(too_big))
    assert stale == [], "these are small now: take them off SIZE_ALLOWED"


def test_size_checker_measures_bodies_without_docstrings(tmp_path):
    """Negative control: 81 statements count, a docstring does not, nested functions are named."""
    body = "".join(f"    x{i} = {i}\n" for i in range(81))
    file = tmp_path / "probe.py"
    file.write_text(
        f'class A:\n    def f(self):\n        """Doc.\n\n        More.\n        """\n'
        f"{body.replace('    ', '        ')}"
        f"def g():\n{body[: -len('    x80 = 80') - 1]}"
    )
    assert dict(_function_lengths(file)) == {"A.f": 81, "g": 80}


# --- public signatures ---------------------------------------------------------------------------

MAX_PUBLIC_PARAMETERS = 12
"""Issue 19: no public function takes more than about 12 parameters (options travel in small
config objects: SolverConfig, the divergence specs, dataset_nll's option groups)."""


def _public_callables() -> Iterator[tuple[str, object]]:
    """(qualified name, object) of every function and class a module's ``__all__`` exports
    (private modules included: their ``__all__`` is what the rest of the package calls)."""
    import importlib
    import inspect

    for module_name, _file in _files():
        if module_name.endswith("__main__"):
            continue
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", []):
            value = getattr(module, name)
            if inspect.isfunction(value) or inspect.isclass(value):
                yield f"{module_name}.{name}", value


def _parameter_count(value: object) -> int:
    import inspect

    try:
        return len(inspect.signature(value).parameters)
    except (TypeError, ValueError):  # builtins and classes without a readable signature
        return 0


def test_public_functions_take_few_parameters():
    """Every public function and class constructor takes at most MAX_PUBLIC_PARAMETERS."""
    wide = {
        name: _parameter_count(value)
        for name, value in _public_callables()
        if _parameter_count(value) > MAX_PUBLIC_PARAMETERS
    }
    assert wide == {}, "group these options into a config object"


def test_parameter_counter_sees_a_wide_function():
    """Negative control: a function of 13 parameters is counted as 13."""
    namespace: dict = {}
    exec("def wide(" + ", ".join(f"a{i}" for i in range(13)) + "): pass", namespace)
    assert _parameter_count(namespace["wide"]) == 13
