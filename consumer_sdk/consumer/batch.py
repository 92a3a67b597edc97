"""One stream's read, classified: what to hand over, what is a duplicate, a hole or not a tick (pure).

No I/O and no await: :func:`flatten` turns a reply into flat lists, :func:`classify` decides per entry
(updating the stream's :class:`~consumer_sdk.core.sequencing.SeqTracker`), :func:`rollback` undoes what
was not handed over.  The consumer's read loop (:mod:`consumer_sdk.consumer.reader`) does the I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson

from consumer_sdk.core.redis import IdT, field_value, id_tuple, iter_read_reply
from consumer_sdk.core.sequencing import SeqTracker, Verdict, is_contiguous_channel
from consumer_sdk.core.tick import SCHEMA_VERSION
from consumer_sdk.poison import MAX_ENTRY_BYTES, PoisonedEntry, entry_verdict, first_future

__all__ = [
    "DELETED",
    "DELIVER",
    "DUPLICATE",
    "GONE",
    "INVALID",
    "Batch",
    "Flat",
    "KeyState",
    "Odd",
    "classify",
    "flatten",
    "flatten_reply",
    "rollback",
]

# What one entry of a batch turned out to be.
DELIVER: Final = 0
DUPLICATE: Final = 1
INVALID: Final = 2
DELETED: Final = 3
_OK: Final = Verdict.OK
_GAP: Final = Verdict.GAP
_LATE: Final = Verdict.LATE
_DUP: Final = Verdict.DUPLICATE

#: An entry that is not simply the next tick in order: (kind, verdict, what is wrong with an invalid entry).
Odd: TypeAlias = tuple[int, Verdict | None, PoisonedEntry | None]
#: One stream's entries read: (key as returned, entry IDs, values of the field d), see :func:`flatten`.
Flat: TypeAlias = tuple[Any, list[Any], list[Any]]

#: In place of the field value of a pending entry whose content was deleted.
GONE: Final = object()


class KeyState:
    """One stream being read: its tracker, where the read stands, what was reported."""

    __slots__ = ("active", "cursor", "key", "last_id", "literal", "names", "tracker", "trim_reported")

    def __init__(self, key: str, literal: bool) -> None:
        self.key = key
        self.names: tuple[bytes, str] = (key.encode(), key)
        self.literal = literal
        # A channel whose seq skips by design (book_ticker) has no gaps; older means already seen.
        self.tracker = SeqTracker(contiguous=is_contiguous_channel(key.rpartition(":")[2]))
        self.last_id: Any = None  # entry ID of the last accepted tick
        self.cursor: Any = "0"  # "0" / a pending ID while re-reading our own pending entries, then ">"
        self.active = False
        self.trim_reported: set[Any] = set()


@dataclass(slots=True)
class Batch:
    """One stream's entries, classified.

    ``ids`` and ``ticks`` have one item per entry, in order; ``ticks[i]`` is the tick to hand over,
    or ``None`` for an entry that is not to be handed over.  Entries that are not simply the next
    tick in order (a gap, a late or claimed tick, a duplicate, an invalid or a deleted entry) are
    listed in ``odd`` by index; ``future`` lists the entries handed over whose ID lies beyond the
    horizon :func:`classify` was given (see :mod:`consumer_sdk.poison`).
    """

    ids: list[Any]
    ticks: list[Any]
    odd: dict[int, Odd]
    gaps: list[tuple[int, Any, Any, int, int]]  # (index, ID before the hole, ID after, first, last)
    pre_last: int | None  # the tracker's last seq before this batch
    pre_last_id: Any
    deleted: list[IdT]  # pending entries whose content is gone (reported on their own)
    future: list[int]  # ticks handed over despite an entry ID far in the future
    reports: dict[int, tuple[int, int]] | None = None  # index -> hole to report before it
    done: int = 0  # entries dealt with, from the first: what may be acked

    def kind(self, index: int) -> int:
        item = self.odd.get(index)
        return DELIVER if item is None else item[0]

    def verdict(self, index: int) -> Verdict | None:
        item = self.odd.get(index)
        return _OK if item is None else item[1]

    def accepted(self, index: int) -> bool:
        """Whether the tracker took this entry's seq as its last (an ``OK`` or a ``GAP``)."""
        if self.ticks[index] is None:
            return False
        verdict = self.verdict(index)
        return verdict is not None and verdict <= _GAP


def flatten(entries: Iterable[Any], dfield: Any) -> tuple[list[Any], list[Any]]:
    """One stream's entries, as the server sent them, as two lists: the entry IDs and their field ``dfield``.

    An entry is ``[entry_id, [field, value, ...]]`` (a mapping of fields is taken too); a value is
    ``None`` when the entry has no such field and :data:`GONE` when its content was deleted (a
    pending entry, read again after a trim).  The lists hold no container per entry, so Python's
    cyclic garbage collector has little to walk once the reply itself is dropped.
    """
    ids: list[Any] = []
    values: list[Any] = []
    add_id = ids.append
    add_value = values.append
    for eid, fields in entries:
        add_id(eid)
        if type(fields) is list and len(fields) == 2 and fields[0] == dfield:  # what the writer stores
            add_value(fields[1])
        elif not fields:
            add_value(GONE)
        else:
            add_value(field_value(fields, dfield))
    return ids, values


def flatten_reply(reply: Any, dfield: Any) -> list[Flat]:
    """``(key, ids, values)`` for every stream with entries in an XREADGROUP reply (see :func:`flatten`)."""
    return [(key, *flatten(entries, dfield)) for key, entries in iter_read_reply(reply) if entries]


def classify(
    state: KeyState,
    ids: list[Any],
    values: list[Any],
    claimed: bool,
    *,
    max_bytes: int = MAX_ENTRY_BYTES,
    horizon_ms: int | None = None,
) -> Batch:
    """Decode and sequence-check one stream's entries (pure; updates the stream's tracker).

    ``ids`` and ``values`` as :func:`flatten` gives them.  This is the per-entry cost of a read, so
    the common case is checked inline: a tick no longer than ``max_bytes`` that passes
    :func:`~consumer_sdk.core.tick.decode_tick`'s checks and has the next seq in order.  Anything else
    takes the long way through :func:`~consumer_sdk.poison.entry_verdict`, with the same outcome.  An
    entry that is not a tick never reaches the tracker: it moves neither dedupe nor gaps.  Entries whose
    ID lies beyond ``horizon_ms`` (epoch ms; ``None``: no check) are listed in ``Batch.future``; the
    check costs one ID parse per batch (IDs increase within a read).
    """
    tracker = state.tracker
    contiguous = tracker.contiguous
    observe = tracker.observe
    loads = orjson.loads
    version = SCHEMA_VERSION
    last = pre_last = tracker.last
    last_index = -1  # of the last entry accepted as the tracker's last seq
    ticks: list[Any] = []
    add_tick = ticks.append
    odd: dict[int, Odd] = {}
    gaps: list[tuple[int, Any, Any, int, int]] = []
    deleted: list[IdT] = []
    in_order = 0
    for index, raw in enumerate(values):
        try:
            if len(raw) > max_bytes:
                raise ValueError
            tick = loads(raw)
            seq = tick["seq"]
            v = tick["v"]
            if (
                type(seq) is not int
                or seq < 0
                or type(v) is not int
                or v != version
                or type(tick["venue"]) is not str
                or type(tick["symbol"]) is not str
                or type(tick["channel"]) is not str
                or type(tick["ts_event"]) is not int
                or type(tick["ts_recv"]) is not int
            ):
                raise ValueError
        except (ValueError, TypeError, KeyError):  # orjson.JSONDecodeError is a ValueError; len(None) a TypeError
            if raw is GONE:  # listed as pending, but its content was deleted (trimmed)
                odd[index] = (DELETED, None, None)
                deleted.append(id_tuple(ids[index]))
                add_tick(None)
                continue
            checked = entry_verdict(raw, max_bytes)
            if isinstance(checked, PoisonedEntry):
                odd[index] = (INVALID, None, checked)
                add_tick(None)
                continue
            tick = checked
            seq = tick["seq"]
        if last is None or seq == last + 1 or (seq > last and not contiguous):  # SeqTracker.observe's OK
            last = seq
            last_index = index
            in_order += 1
            add_tick(tick)
            continue
        tracker.last = last
        verdict = observe(seq)
        if verdict is _LATE and not contiguous:
            verdict = _DUP
        if verdict is _DUP and not claimed:
            odd[index] = (DUPLICATE, verdict, None)
            add_tick(None)
            continue
        if verdict is _GAP:
            assert last is not None
            before = ids[last_index] if last_index >= 0 else state.last_id
            gaps.append((index, before, ids[index], last + 1, seq - 1))
        if verdict <= _GAP:
            last_index = index
        last = tracker.last
        if verdict is not _OK:
            odd[index] = (DELIVER, verdict, None)
        add_tick(tick)
    tracker.last = last
    tracker.accepted += in_order
    pre_last_id = state.last_id
    if last_index >= 0:
        state.last_id = ids[last_index]
    future: list[int] = []
    if horizon_ms is not None:
        start = first_future(ids, horizon_ms)
        if start is not None:
            future = [i for i in range(start, len(ids)) if ticks[i] is not None]
    return Batch(ids, ticks, odd, gaps, pre_last, pre_last_id, deleted, future)


def rollback(state: KeyState, batch: Batch, index: int) -> None:
    """Forget what the tracker learnt from the entries from ``index`` on: they were not handed over."""
    tracker = state.tracker
    total = len(batch.ids)
    earlier = next((i for i in range(min(index, total) - 1, -1, -1) if batch.accepted(i)), None)
    if any(batch.accepted(i) for i in range(index, total)):
        tracker.last = batch.pre_last if earlier is None else batch.ticks[earlier]["seq"]
    for gap_index, _before, _after, first, last in batch.gaps:
        if gap_index >= index:
            tracker.fill(first, last)
    state.last_id = batch.pre_last_id if earlier is None else batch.ids[earlier]
