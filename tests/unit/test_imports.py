"""The modules of ``src/detprune`` import each other in one direction only.

Every ``import`` / ``from ... import`` statement counts, wherever it is: at the top,
inside a function, under ``if TYPE_CHECKING:`` (a deferred import hides a loop, it does
not remove it); so does a ``"detprune.module:name"`` string, the lazy reference a
registry entry may give (:func:`detprune.pruning.base.resolve`). The modules are parsed
with :mod:`ast`, nothing is imported, so this runs without torch.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "detprune"
REFERENCE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*):[A-Za-z_]\w*$")


def module_files(src: Path = SRC, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (``pkg`` for
    ``pkg/__init__.py``)."""
    out = {}
    for f in sorted((src / package).rglob("*.py")):
        parts = list(f.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The package module ``name`` is, or is inside (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``module`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            ref = REFERENCE.match(node.value)
            names = [ref.group(1)] if ref else []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from a import b` imports a.b when it is a module, else a name of a
            names = [f"{stem}.{a.name}" for a in node.names] + [stem]
            names = [n for n in names if _resolve(n, modules)]
            if names and any(n in modules for n in names[:-1]):
                names = [n for n in names[:-1] if n in modules]
            else:
                names = names[-1:]
        else:
            continue
        for n in names:
            target = _resolve(n, modules)
            if target and target != module:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each
    sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def a_loop(graph: dict[str, set[str]], comp: list[str]) -> list[str]:
    """One concrete import loop inside a strongly connected component."""
    members = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if w not in prev:
                prev[w] = v
                queue.append(w)
    return comp


def test_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    msg = "\n".join(
        f"{len(c)} modules import each other: {' -> '.join(a_loop(graph, c))} (all: {c})"
        for c in found
    )
    assert not found, "import cycles among src/detprune modules:\n" + msg


def test_graph_sees_deferred_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b\n")
    (pkg / "a.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pkg.sub.b import X\n"
        "def f():\n    import pkg.c\n"
    )
    (pkg / "sub" / "b.py").write_text("from ..a import f\nX = 1\n")
    (pkg / "c.py").write_text("import os\nfrom . import d\nLAZY = 'pkg.e:f'\n")
    (pkg / "e.py").write_text("f = 'not a reference'\n")
    (pkg / "d.py").write_text("from .sub import b as bee\nfrom .sub.b import X\n")
    modules = module_files(tmp_path, "pkg")
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    assert graph["pkg.a"] == {"pkg.sub.b", "pkg.c"}
    assert graph["pkg.sub.b"] == {"pkg.a"}
    assert graph["pkg.sub"] == {"pkg.sub.b"}
    assert graph["pkg.c"] == {"pkg.d", "pkg.e"}
    assert graph["pkg.d"] == {"pkg.sub.b"}
    assert cycles(graph) == [["pkg.a", "pkg.c", "pkg.d", "pkg.sub.b"]]
    comp = cycles(graph)[0]
    assert a_loop(graph, comp) in (
        ["pkg.a", "pkg.sub.b", "pkg.a"],
        ["pkg.a", "pkg.c", "pkg.d", "pkg.sub.b", "pkg.a"],
    )
