"""No import cycles: libm2n and services each import one way, from the bottom up.

The graph is static (``ast``): every ``import``/``from ... import`` in a module, including those
inside functions (a lazy import still ties the two modules' designs together) and
``importlib.import_module("literal")``, but not those under ``if TYPE_CHECKING:`` (never run).
``from X import Y`` is an edge to ``X.Y`` when that is a module, else to ``X``; relative imports
are resolved against the importing module's package. The C extensions that ``pyproject.toml``
builds (``[[tool.setuptools.ext-modules]]``, e.g. ``libm2n._fast``) count as modules that import
nothing, whether built or not. Importing ``a.b.c`` also runs the ``__init__`` of ``a`` and
``a.b``; that implicit parent edge is not counted, so a submodule of ``a`` may import a sibling
without closing a cycle through ``a``. Generated ``proto/`` trees are skipped.

Each cycle is reported as a chain (``a -> b -> a``) with the line of every import in it: one
shortest cycle through each import edge that lies on any cycle.
"""

from __future__ import annotations

import ast
import tomllib
from collections import deque
from itertools import pairwise
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("libm2n", "services")
SKIP_DIRS = {"proto", "__pycache__"}


def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{module name: file}`` for every ``.py`` under ``root/package`` (``__init__`` = package)."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """Every import a module can run (TYPE_CHECKING blocks aside): ``(line, base, names)``."""

    def __init__(self, name: str, is_package: bool) -> None:
        self.package = name if is_package else name.rpartition(".")[0]
        self.found: list[tuple[int, str, tuple[str, ...]]] = []  # (line, base, imported names)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((node.lineno, alias.name, ()))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            pkg = self.package.split(".")
            pkg = pkg[:len(pkg) - (node.level - 1)] if node.level > 1 else pkg
            base = ".".join([*pkg, node.module] if node.module else pkg)
        else:
            base = node.module or ""
        self.found.append((node.lineno, base, tuple(a.name for a in node.names)))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (name == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and not node.args[0].value.startswith(".")):
            self.found.append((node.lineno, node.args[0].value, ()))
        self.generic_visit(node)


def extension_modules(root: Path) -> set[str]:
    """The C extension modules ``pyproject.toml`` builds (``libm2n._fast``, ...)."""
    pyproject = root / "pyproject.toml"
    if not pyproject.exists():
        return set()
    setuptools = tomllib.loads(pyproject.read_text()).get("tool", {}).get("setuptools", {})
    return {ext["name"] for ext in setuptools.get("ext-modules", [])}


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` among the modules of ``packages`` under ``root``."""
    files: dict[str, Path] = {}
    for package in packages:
        files.update(module_files(root, package))
    graph: dict[str, dict[str, int]] = {
        ext: {} for ext in extension_modules(root) if ext.split(".")[0] in packages}
    known = set(files) | set(graph)
    for name, path in files.items():
        visitor = _Imports(name, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        edges: dict[str, int] = {}
        for line, base, names in visitor.found:
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            if len(targets) < len(names) or not names:  # some names are attributes of ``base``
                targets.append(base)
            for target in targets:
                if target in known and target != name:
                    edges.setdefault(target, line)
        graph[name] = edges
    return graph


def _components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    comp.append(member)
                    if member == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One shortest cycle through every import edge that lies on a cycle, as module chains.

    Each chain starts and ends at the same module (``[a, b, a]``), rotated to start at its
    smallest name; duplicates are dropped.
    """
    cycles: set[tuple[str, ...]] = set()
    for comp in _components(graph):
        members = set(comp)
        for src in comp:
            for dst in sorted(graph[src]):
                if dst not in members:
                    continue
                prev: dict[str, str | None] = {dst: None}  # BFS dst -> src inside the component
                queue = deque([dst])
                while queue and src not in prev:
                    node = queue.popleft()
                    for nxt in sorted(graph[node]):
                        if nxt in members and nxt not in prev:
                            prev[nxt] = node
                            queue.append(nxt)
                path = [src]
                while path[-1] != dst:
                    path.append(prev[path[-1]])
                ring = [src, *reversed(path[1:])]  # src -> dst -> ... -> (back to src)
                i = ring.index(min(ring))
                cycles.add(tuple(ring[i:] + ring[:i]))
    return [[*c, c[0]] for c in sorted(cycles)]


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    hops = "\n".join(f"    {a} imports {b} (line {graph[a][b]})" for a, b in pairwise(cycle))
    return " -> ".join(cycle) + "\n" + hops


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str) -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert any(m == package or m.startswith(package + ".") for m in graph), f"no {package}"
    cycles = [c for c in find_cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, (f"{len(cycles)} import cycle(s) in {package}:\n"
                        + "\n".join(describe(c, graph) for c in cycles))


def test_the_graph_sees_lazy_relative_and_submodule_imports_but_not_type_checking(
        tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "proto").mkdir()
    files = {
        "__init__.py": "from pkg.a import A\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import b\n"
                "A = 1\n",
        "b.py": "def f():\n    from . import c\n",                    # lazy, relative, submodule
        "c.py": "from .sub import d\nfrom pkg.sub.d import D\n",
        "sub/__init__.py": "",
        "sub/d.py": "import importlib\nD = importlib.import_module('pkg.b')\n"
                    "from pkg import _ext\n",                    # a C extension, not ``pkg``
        "proto/gen.py": "import pkg.proto.gen\nfrom pkg import b\n",  # skipped
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    (tmp_path / "pyproject.toml").write_text(
        '[[tool.setuptools.ext-modules]]\nname = "pkg._ext"\nsources = ["pkg/_ext.c"]\n')
    graph = import_graph(tmp_path, ("pkg",))
    assert graph == {
        "pkg": {"pkg.a": 1}, "pkg.a": {}, "pkg.b": {"pkg.c": 2}, "pkg._ext": {},
        "pkg.c": {"pkg.sub.d": 1}, "pkg.sub": {}, "pkg.sub.d": {"pkg.b": 2, "pkg._ext": 3},
    }
    assert find_cycles(graph) == [["pkg.b", "pkg.c", "pkg.sub.d", "pkg.b"]]
    graph["pkg.a"]["pkg"] = 1  # a second cycle, through the package __init__
    assert find_cycles(graph) == [["pkg", "pkg.a", "pkg"], ["pkg.b", "pkg.c", "pkg.sub.d", "pkg.b"]]
