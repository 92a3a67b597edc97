"""Stream entries that are not ticks (written by hand, by another program, or damaged): what kind each is.

The consumer (:mod:`consumer_sdk.consumer`), :func:`~consumer_sdk.replay.read_range` and
:func:`~consumer_sdk.replay.follow` read every entry through :func:`entry_verdict` (pure, no I/O), so
they agree on what is a tick.  Kinds, in :data:`POISON_KINDS`:

- ``no_field``: the entry has no field ``d``;
- ``too_large``: ``d`` is longer than ``max_bytes`` (:data:`MAX_ENTRY_BYTES`, 64 KiB; a tick is a few
  hundred bytes); refused unread, so a huge entry costs its own size once and never a parse (a 10 MB
  JSON array of empty arrays would take hundreds of MB to parse);
- ``not_json``: ``d`` is not JSON (or not UTF-8);
- ``not_a_tick``: JSON, but not a tick of schema version 1 (:func:`~consumer_sdk.core.tick.decode_tick`'s
  checks);
- ``future_id``: the entry's ID lies more than :data:`FUTURE_ID_MS` (a day) ahead of the reader's clock.
  Such an entry is still handed over when it holds a tick (an entry ID is only a place in the stream,
  and the writer keeps IDs increasing, so every entry written after it lies there too), but it is
  counted and reported: time bounds and age-based trimming no longer mean what they say on that stream.

:class:`PoisonLog` counts entries by kind and logs them throttled to one line per kind per second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from consumer_sdk.core.errors import InvalidTick
from consumer_sdk.core.log import log_event
from consumer_sdk.core.tick import Tick, decode_tick

__all__ = [
    "FUTURE_ID_MS",
    "MAX_ENTRY_BYTES",
    "POISON_KINDS",
    "PoisonLog",
    "PoisonedEntry",
    "entry_verdict",
    "first_future",
]

#: the kinds of entries that are not simply ticks, in the order they are checked
POISON_KINDS: Final = ("no_field", "too_large", "not_json", "not_a_tick", "future_id")
#: the longest field ``d`` read as a tick (a tick is a few hundred bytes)
MAX_ENTRY_BYTES: Final = 64 * 1024
#: how far ahead of the reader's clock an entry ID may lie before it is reported
FUTURE_ID_MS: Final = 24 * 3600 * 1000
#: the longest error text kept (an error quotes what it found, which may be long)
_MAX_TEXT: Final = 200


class PoisonedEntry(InvalidTick):
    """An entry that is not a tick; ``kind`` is one of :data:`POISON_KINDS`."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _short(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def entry_verdict(raw: Any, max_bytes: int = MAX_ENTRY_BYTES) -> Tick | PoisonedEntry:
    """The tick in an entry's field ``d`` (``raw``; ``None`` when the entry has none), or what is wrong.

    Costs one length check, then one JSON parse of at most ``max_bytes``; the error text is at most
    200 characters of :func:`~consumer_sdk.core.tick.decode_tick`'s message.
    """
    if raw is None:
        return PoisonedEntry("no field 'd'", "no_field")
    if len(raw) > max_bytes:
        return PoisonedEntry(f"too large: {len(raw)} bytes (at most {max_bytes})", "too_large")
    try:
        return decode_tick(raw)
    except InvalidTick as exc:
        text = str(exc)
        return PoisonedEntry(_short(text), "not_json" if text.startswith("not JSON") else "not_a_tick")


def _id_ms(entry_id: Any) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    ms, _, _seq = text.partition("-")
    return int(ms) if ms.isdigit() else 0


def first_future(ids: Sequence[Any], horizon_ms: int) -> int | None:
    """The index of the first entry ID whose millisecond part is beyond ``horizon_ms``, or ``None``.

    ``ids`` are one stream's entry IDs in increasing order, as a read returns them: when the last is not
    beyond the horizon none is, so the common case costs one ID parse; otherwise a binary search.
    """
    if not ids or _id_ms(ids[-1]) <= horizon_ms:
        return None
    lo, hi = 0, len(ids) - 1  # ids[hi] is beyond
    while lo < hi:
        mid = (lo + hi) // 2
        if _id_ms(ids[mid]) > horizon_ms:
            hi = mid
        else:
            lo = mid + 1
    return lo


class PoisonLog:
    """Counts entries by kind (:attr:`counts`, every kind present) and logs each at most once per ``interval``
    seconds per kind.

    A line names the stream, the entry ID, the kind and the error (event ``invalid_tick``; ``future_id``
    for an entry handed over despite its ID), with ``suppressed`` telling how many of that kind went
    unlogged since the last line; ``context`` fields (the group, say) are added to every line.  ``clock``
    is a monotonic clock in seconds.  Costs a dict update per entry, a log line at most once per interval.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        **context: Any,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._context = context
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = dict.fromkeys(POISON_KINDS, 0)
        self.counts: dict[str, int] = dict.fromkeys(POISON_KINDS, 0)

    def count(self, kind: str) -> None:
        """Count one entry of ``kind`` without logging it (its report went elsewhere)."""
        self.counts[kind] += 1

    def report(self, key: str, entry_id: str, kind: str, error: str) -> None:
        """Count one entry of ``kind`` and log it unless one of that kind was logged within the interval."""
        self.counts[kind] += 1
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._interval:
            self._suppressed[kind] += 1
            return
        self._last[kind] = now
        fields = {**self._context, "key": key, "id": entry_id, "kind": kind, "error": _short(error)}
        if self._suppressed[kind]:
            fields["suppressed"], self._suppressed[kind] = self._suppressed[kind], 0
        log_event(self._logger, logging.WARNING, "future_id" if kind == "future_id" else "invalid_tick", **fields)
