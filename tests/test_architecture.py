"""The shape of the code, checked from its source: no import circle anywhere, no long module without a reason.

Imports are read with :mod:`ast` from every module of the four packages, at any depth (a function-level import
closes a circle as surely as a top-level one, only later).  A module over :data:`MAX_LINES` lines carries a
``# size: <why>`` comment in its first lines, saying why it is one piece.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("consumer_sdk", "ingestor", "distributor", "ops")
MAX_LINES = 600
SIZE_NOTE_WITHIN = 40  # lines from the top


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    out: set[str] = set()
    for dep in found:
        while dep and dep not in known:
            dep = dep.rpartition(".")[0]
        if dep and dep != name:
            out.add(dep)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp: list[str] = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_the_circle_finder_finds_circles() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_no_import_circle() -> None:
    known = modules()
    assert len(known) > 60  # the walk found the code
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "consumer_sdk.core.tick" in graph["distributor.writer"]
    assert circles(graph) == []


def test_the_core_imports_nothing_above_it() -> None:
    known = modules()
    for name, path in known.items():
        if name.startswith("consumer_sdk.core"):
            above = {d for d in imported(name, path, known) if not d.startswith("consumer_sdk.core")}
            assert not above, f"{name} imports {sorted(above)}"


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_long_module_says_why_it_is_one_piece(name: str) -> None:
    lines = modules()[name].read_text().splitlines()
    if len(lines) <= MAX_LINES:
        return
    notes = [line for line in lines[:SIZE_NOTE_WITHIN] if line.startswith("# size: ") and len(line) > 20]
    assert notes, f"{name} has {len(lines)} lines (over {MAX_LINES}) and no '# size: <why>' comment at its top"
