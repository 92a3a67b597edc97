"""settle_heap: one collection, then what survived is frozen, once per process; the collector stays on."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import gc, weakref
    from consumer_sdk.core.heap import settle_heap

    class Node:
        pass

    # garbage in a cycle, made before: collected by the settling collection, not frozen
    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gc.get_freeze_count() == 0
    assert settle_heap() is True
    assert gone() is None, "a cycle that was garbage before settling was frozen instead of freed"
    frozen = gc.get_freeze_count()
    assert frozen > 1000, frozen
    assert settle_heap() is False and gc.get_freeze_count() == frozen  # once per process
    assert gc.isenabled()
    # a cycle made after settling is still found by the collector
    c, d = Node(), Node()
    c.other, d.other = d, c
    later = weakref.ref(c)
    del c, d
    gc.collect()
    assert later() is None
    print("ok", frozen)
    """
)


def test_settle_heap_frees_garbage_then_freezes_once_and_leaves_the_collector_on() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok ")
