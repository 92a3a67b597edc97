"""``distributor.hotpath``'s shape: imports flow one way through its modules, none imports the package itself,
and no module grows past ~600 lines unsaid.

Read from the source with :mod:`ast` (imports under ``TYPE_CHECKING`` and inside functions count too), so
neither a lazy import nor a typing-only one can hide a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "distributor" / "hotpath"
NAME = "distributor.hotpath"

#: module -> layer; a module imports only from lower layers
LAYERS = {
    "policy": 0,
    "stats": 1,
    "subscription": 2,
    "ring": 3,
    "serving": 4,
    "fanout": 5,
}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _imports(path: Path) -> set[str]:
    """What ``path`` imports of the package, anywhere in it: module names, or ``""`` for the package itself."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == NAME:
                out.add("")
            elif name.startswith(NAME + "."):
                out.add(name.split(".")[2])
    return out


def test_every_module_has_a_layer() -> None:
    assert set(_modules()) == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_go_down_the_layers(name: str) -> None:
    imported = _imports(_modules()[name])
    assert "" not in imported, f"{NAME}.{name} imports the package {NAME} itself (a circle through __init__)"
    upward = sorted(m for m in imported if LAYERS[m] >= LAYERS[name])
    assert not upward, f"{NAME}.{name} (layer {LAYERS[name]}) imports {upward} from its layer or above"


def test_no_circle() -> None:
    graph = {name: _imports(path) - {""} for name, path in _modules().items()}
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, "import circle: " + " -> ".join((*trail, name))
        if name in done:
            return
        for dep in sorted(graph[name]):
            visit(dep, (*trail, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


@pytest.mark.parametrize("path", sorted(PACKAGE.glob("*.py")), ids=lambda p: p.stem)
def test_long_modules_say_why(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_LINES or text.startswith("# size:"), f"{path.name}: {lines} lines and no '# size:'"
