"""Every public module declares ``__all__``, and every name in it exists; the SDK stays free of the ingestor."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys

import pytest

PACKAGES = ("consumer_sdk", "ingestor", "distributor", "ops")


def modules() -> list[str]:
    out = []
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        out.append(package)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{package}."):
            if not info.name.rsplit(".", 1)[-1].startswith("_") and info.name != "ops.cli":
                out.append(info.name)
    return out


@pytest.mark.parametrize("name", modules())
def test_all_is_declared_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not define: {missing}"


def test_ops_package_exports_nothing_and_imports_nothing() -> None:
    """``ops`` is a namespace of tools: importing it pulls in none of them (nor the ingestor)."""
    code = "import sys, ops; print(ops.__all__, sorted(m for m in sys.modules if m.startswith(('ops.', 'ingestor'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[] []"


def test_consumer_sdk_does_not_import_the_ingestor() -> None:
    code = (
        "import sys, consumer_sdk, consumer_sdk.consumer, consumer_sdk.replay; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ingestor', 'distributor', 'ops', 'websockets')]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "", f"consumer_sdk pulls in {out.stdout.strip()}"


def test_consumer_sdk_exports_the_order_book_reader() -> None:
    """The book reader is public at the top of the SDK, and importing the SDK does not load it until used."""
    import consumer_sdk
    from consumer_sdk import book_reader

    names = ("MAX_DEPTH_ENTRY_BYTES", "BookAt", "BookUpdate", "LiveBook", "NoBook", "book_at", "follow_books")
    assert set(names) <= set(consumer_sdk.__all__)
    assert all(getattr(consumer_sdk, n) is getattr(book_reader, n) for n in names)
    code = "import sys, consumer_sdk; print('consumer_sdk.book_reader' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "False"
