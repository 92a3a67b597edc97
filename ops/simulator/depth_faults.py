"""The depth books' faults in text form, as the simulator's settings, ``market simulate --depth-faults`` and the
control endpoint (``/control/depth_faults?schedule=...``) take them: pure code.

A schedule is a comma-separated list of items, each armed once:

- ``drop`` (``drop@SYMBOL``): every book's (that symbol's) next diff is applied and takes its update ids but is
  not sent, so the next one starts past ``previous u + 1``, on ``@depth@100ms`` and on ``@depth`` alike;
- ``stale`` (``stale:N``, ``stale@SYMBOL``, ``stale:N@SYMBOL``): the next REST snapshot of every book (that
  symbol's) is the book as it was N batches ago (default 1), with that older ``lastUpdateId``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

from .book import DepthBooks
from .errors import SimulatorConfigError

__all__ = ["DepthFault", "apply_depth_faults", "parse_depth_faults"]

_ITEM: Final = re.compile(r"^(?P<kind>drop|stale)(?::(?P<batches>[0-9]{1,6}))?(?:@(?P<symbol>[A-Za-z0-9_-]{2,40}))?$")


@dataclass(frozen=True, slots=True)
class DepthFault:
    """One armed fault: ``kind``, the symbol (None: every symbol) and, for ``stale``, how many batches back."""

    kind: Literal["drop", "stale"]
    symbol: str | None = None
    batches: int = 1

    def __str__(self) -> str:
        text = self.kind if self.kind == "drop" or self.batches == 1 else f"stale:{self.batches}"
        return text if self.symbol is None else f"{text}@{self.symbol}"


def parse_depth_faults(text: str) -> tuple[DepthFault, ...]:
    """``drop@BTCUSDT,stale:3`` -> the faults; an empty text is none.  :class:`SimulatorConfigError` on a bad item."""
    faults: list[DepthFault] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        m = _ITEM.match(item)
        if m is None:
            raise SimulatorConfigError(
                f"bad depth fault {item!r}: expected drop, drop@SYMBOL, stale, stale:N or stale:N@SYMBOL"
            )
        if m["kind"] == "drop" and m["batches"] is not None:
            raise SimulatorConfigError(f"bad depth fault {item!r}: drop takes no batch count")
        batches = int(m["batches"] or 1)
        if batches < 1:
            raise SimulatorConfigError(f"bad depth fault {item!r}: a stale snapshot is at least 1 batch back")
        symbol = m["symbol"].upper() if m["symbol"] else None
        faults.append(DepthFault("drop" if m["kind"] == "drop" else "stale", symbol, batches))
    return tuple(faults)


def apply_depth_faults(books: DepthBooks, faults: Iterable[DepthFault]) -> None:
    """Arm ``faults`` on ``books``; :class:`SimulatorConfigError` (and nothing armed) for a symbol they lack."""
    faults = tuple(faults)
    for fault in faults:
        if fault.symbol is not None and fault.symbol not in books.symbols:
            raise SimulatorConfigError(f"depth fault {fault}: no book of {fault.symbol}")
    for fault in faults:
        if fault.kind == "drop":
            books.drop_next_diff(fault.symbol)
        else:
            books.stale_next_snapshot(fault.symbol, fault.batches)
