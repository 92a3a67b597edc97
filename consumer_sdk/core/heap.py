"""Python's cyclic garbage collector in a process that answers in microseconds.

A full collection walks every container object the process holds: the modules, classes and functions
imported at start-up, the configuration, the preallocated rings.  Measured on the whole-path bench (the
ingestor and the bench's SDK consumer, 10k ticks/s): full collections of 26-57 ms in each, each one a
stall of the feed in that process.  None of those start-up objects is ever garbage.

:func:`settle_heap` is called once a process is set up (the ingestor when its sessions are made, the
SDK consumer after its first set-up when asked, the simulator once it listens): one collection, then
:func:`gc.freeze` moves every object that survived it out of the collector's generations.  Later
collections walk only what was made since; on the same bench the full ones took 1.2 ms (median).  The
collector stays on: reference cycles made later are still found and freed.
"""

from __future__ import annotations

import gc

__all__ = ["settle_heap"]

_settled = False


def settle_heap() -> bool:
    """Collect once and freeze what survives (:func:`gc.freeze`), the first time it is called in this
    process; True when it did so now, False when it had been done already."""
    global _settled
    if _settled:
        return False
    _settled = True
    gc.collect()
    gc.freeze()
    return True
