"""The layering, read from the import statements (``ast``) of every module of the three packages.

``solvers`` <- ``ode_bert`` <- ``stability_analysis``: solvers imports neither of the others nor
transformers, ode_bert never imports stability_analysis (``ode-bert analyze`` comes through an entry
point), no module imports another package's private parts (``solvers`` only through ``import solvers``),
and the module-level imports (not those inside functions or ``if TYPE_CHECKING:``) have no cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("solvers", "ode_bert", "stability_analysis")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted name of the importing module
    target: str  # dotted name of the imported module (relative imports resolved)
    names: tuple[str, ...]  # what ``from target import ...`` takes; () for ``import target``
    module_level: bool  # runs when the importer is imported (not in a function, not TYPE_CHECKING)
    type_checking: bool  # under ``if TYPE_CHECKING:``
    where: str  # path:line

    @property
    def top(self) -> str:
        return package_of(self.target)

    def __str__(self) -> str:
        names = f" import {', '.join(self.names)}" if self.names else ""
        return f"{self.where}: {self.importer} -> {self.target}{names}"


def package_of(module: str) -> str:
    return module.split(".")[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(source: str, module: str, is_package: bool, where: str) -> list[Import]:
    """Every import statement of ``source`` (the code of ``module``), relative ones made absolute."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool, type_checking: bool = False) -> None:
        for child in ast.iter_child_nodes(node):
            at = f"{where}:{getattr(child, 'lineno', 0)}"
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, (), module_level, type_checking, at)
                             for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package
                for _ in range(child.level - 1):
                    base = base.rpartition(".")[0]
                target = (f"{base}.{child.module}" if child.module else base) if child.level else child.module
                names = tuple(alias.name for alias in child.names)
                found.append(Import(module, target, names, module_level, type_checking, at))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False, type_checking)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for statement in child.body:
                    visit(ast.Module(body=[statement], type_ignores=[]), False, True)
                for statement in child.orelse:
                    visit(ast.Module(body=[statement], type_ignores=[]), module_level, type_checking)
            else:
                visit(child, module_level, type_checking)

    visit(ast.parse(source), True)
    return found


def package_modules() -> dict[str, Path]:
    paths = [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]
    return {module_name(path): path for path in paths}


MODULES = package_modules()
IMPORTS = [
    imp
    for name, path in MODULES.items()
    for imp in imports_of(path.read_text(), name, path.name == "__init__.py", str(path.relative_to(REPO)))
]


def private_import(imp: Import) -> bool:
    """An import of another package's private parts: anything of solvers but ``solvers`` itself, any
    dotted path component or imported name starting with ``_`` elsewhere."""
    if imp.top == package_of(imp.importer) or imp.top not in (*PACKAGES, "bench"):
        return False
    if any(name.startswith("_") for name in imp.names):
        return True
    if imp.top == "solvers":
        return imp.target != "solvers"
    return any(part.startswith("_") for part in imp.target.split("."))


def edges(deferred: bool = False) -> dict[str, set[str]]:
    """Module-level imports between modules of the packages (``from pkg import mod`` goes to ``pkg.mod``);
    ``deferred``: also those inside functions (``TYPE_CHECKING`` ones never count)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        if not (imp.module_level or (deferred and not imp.type_checking)):
            continue
        targets = [f"{imp.target}.{name}" for name in imp.names if f"{imp.target}.{name}" in MODULES]
        if len(targets) < len(imp.names) or not imp.names:  # some names are attributes of the module itself
            targets.append(imp.target)
        graph[imp.importer] |= {target for target in targets if target in MODULES and target != imp.importer}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_walk_sees_every_package_and_their_imports() -> None:
    """The checks below are not vacuous: each package has modules, and known imports are found."""
    assert {name.split(".")[0] for name in MODULES} == set(PACKAGES)
    assert any(package_of(imp.importer) == "ode_bert" and imp.top == "solvers" for imp in IMPORTS)
    assert any(package_of(imp.importer) == "stability_analysis" and imp.top == "ode_bert" for imp in IMPORTS)
    assert "solvers._base" in edges()["solvers.implicit"]


def test_solvers_imports_neither_the_packages_above_nor_transformers() -> None:
    above = ("ode_bert", "stability_analysis", "transformers")
    bad = [str(imp) for imp in IMPORTS if package_of(imp.importer) == "solvers" and imp.top in above]
    assert not bad, "\n".join(bad)


def test_ode_bert_never_imports_stability_analysis() -> None:
    bad = [str(imp) for imp in IMPORTS
           if package_of(imp.importer) == "ode_bert" and imp.top == "stability_analysis"]
    assert not bad, "\n".join(bad)


def test_no_private_imports_across_packages() -> None:
    bad = [str(imp) for imp in IMPORTS if private_import(imp)]
    assert not bad, "\n".join(bad)


def test_bench_scripts_and_notebooks_use_public_names_only() -> None:
    found: list[Import] = []
    for path in sorted((REPO / "bench").rglob("*.py")):
        found += imports_of(path.read_text(), module_name(path), path.name == "__init__.py",
                            str(path.relative_to(REPO)))
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
        found += imports_of(code, "notebooks", False, str(path.relative_to(REPO)))
    assert any(imp.top == "solvers" for imp in found)
    bad = [str(imp) for imp in found if private_import(imp)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("deferred", [False, True], ids=["module-level", "with-imports-in-functions"])
def test_imports_have_no_cycle(deferred: bool) -> None:
    """Module-level imports must be acyclic; so must they with the imports inside functions, since a
    cycle broken only by a local import ("convert depends on this module") is still a cycle to a reader."""
    found = cycles(edges(deferred))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert not cycles({"a": {"b"}, "b": set()})


@pytest.mark.parametrize(
    ("source", "module_level"),
    [
        ("import solvers", True),
        ("def f():\n    import solvers", False),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import solvers", False),
        ("try:\n    import solvers\nexcept ImportError:\n    pass", True),
        ("class A:\n    import solvers", True),
    ],
)
def test_module_level_means_run_on_import(source: str, module_level: bool) -> None:
    [imp] = [i for i in imports_of(source, "ode_bert.x", False, "x.py") if i.top == "solvers"]
    assert imp.module_level is module_level


def test_relative_imports_resolve() -> None:
    found = imports_of("from . import a\nfrom .b import c\nfrom ..d import e", "p.q.m", False, "m.py")
    assert [(i.target, i.names) for i in found] == [("p.q", ("a",)), ("p.q.b", ("c",)), ("p.d", ("e",))]
    found = imports_of("from ._base import x", "solvers", True, "solvers/__init__.py")
    assert found[0].target == "solvers._base"


def test_public_names_resolve() -> None:
    import solvers
    import stability_analysis

    for package in (solvers, stability_analysis):
        missing = [name for name in package.__all__ if getattr(package, name, None) is None]
        assert not missing, f"{package.__name__}: {missing}"


def test_analyze_command_adds_its_arguments_without_torch() -> None:
    """``ode-bert --help`` sets up every command; stability_analysis's must not pull in torch."""
    code = ("import argparse, sys\nfrom stability_analysis.cli import analyze_command\n"
            "analyze_command(argparse.ArgumentParser())\n"
            "print(sorted(m for m in ('torch', 'sympy', 'matplotlib', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"
