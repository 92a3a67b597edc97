"""``ops.bench``'s shape: imports flow one way through its layers (no circle and no long module without a reason:
tests/test_architecture.py, for every package).

Read from the source with :mod:`ast` (imports inside functions count too), so a lazy import cannot hide a
circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ops" / "bench"

#: module -> layer; a module imports only from lower layers
LAYERS = {
    "profiles": 0,
    "book": 0,
    "probe": 0,
    "scrape": 1,
    "processes": 1,
    "hotpath_load": 1,
    "writer": 1,
    "ingest": 1,
    "scale_report": 1,
    "budget": 1,
    "limits": 1,
    "analysis": 2,
    "render": 2,
    "hotpath": 2,
    "parse": 2,
    "scale": 2,
    "plots": 3,
    "harness": 3,
    "depth": 3,
    "stages": 4,
    "report": 5,
}
#: the pure layer: none of these reaches processes, children or Redis through another bench module
PURE = {"book", "profiles", "scrape", "analysis", "render", "plots", "scale_report", "budget"}


def _modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _bench_imports(path: Path) -> set[str]:
    """The ``ops.bench`` modules ``path`` imports, anywhere in it."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("ops.bench."):
                out.add(name.split(".")[2])
    return out & set(_modules())


def test_every_module_has_a_layer() -> None:
    assert set(_modules()) == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_go_down_the_layers(name: str) -> None:
    imported = _bench_imports(_modules()[name])
    upward = sorted(m for m in imported if LAYERS[m] >= LAYERS[name])
    assert not upward, f"ops.bench.{name} (layer {LAYERS[name]}) imports {upward} from its layer or above"
    if name in PURE:
        assert imported <= PURE, f"ops.bench.{name} is pure but imports {sorted(imported - PURE)}"


def test_the_package_imports_none_of_its_modules() -> None:
    assert _bench_imports(PACKAGE / "__init__.py") == set()
