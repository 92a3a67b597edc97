"""``distributor.hotpath``'s shape: imports flow one way through its modules, none imports the package itself
(no circle and no long module without a reason: tests/test_architecture.py, for every package).

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
