"""Handing one read's entries over: classify, check the holes, call the handler and the hooks in order, ack.

:class:`Delivery` holds what a consumer counts and the hooks it calls; :class:`~consumer_sdk.consumer.reader.Consumer`
gives it each read (or claim) and acks what it returns.  Per entry it costs what
:func:`~consumer_sdk.consumer.batch.classify` costs plus the handler call; per hole in seq, one pipelined
``XRANGE ... COUNT 1`` with one ``XINFO STREAM`` per stream, and one more ``XRANGE ... COUNT 1`` for each
entry in the hole that is not a tick (at most :data:`HOLE_PROBES`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

import redis.exceptions as rexc
from redis.asyncio import Redis

from consumer_sdk.consumer.batch import DELIVER, DUPLICATE, INVALID, Batch, Flat, KeyState, classify, rollback
from consumer_sdk.consumer.trim import hole_verdict
from consumer_sdk.core.errors import TrimmedError
from consumer_sdk.core.handler import Handler
from consumer_sdk.core.log import get_logger, log_event
from consumer_sdk.core.redis import field_value, fmt_id, id_after, id_str, id_tuple, stream_view, xack_many
from consumer_sdk.core.sequencing import Verdict
from consumer_sdk.core.tick import Tick
from consumer_sdk.poison import FUTURE_ID_MS, MAX_ENTRY_BYTES, PoisonedEntry, PoisonLog, entry_verdict

__all__ = ["Acks", "Delivery", "GapHook", "InvalidHook", "TrimmedHook"]

log = get_logger("consumer")

InvalidHook: TypeAlias = Callable[[str, str, Exception], None]
GapHook: TypeAlias = Callable[[str, int, int], None]
TrimmedHook: TypeAlias = Callable[[str, str, str | None], None]
#: per stream key, the entry IDs to acknowledge
Acks: TypeAlias = list[tuple[str, list[Any]]]

_GAP = Verdict.GAP
_LATE = Verdict.LATE
#: entries that are not ticks stepped over, one ``XRANGE`` each, looking for a tick in a hole in seq
HOLE_PROBES = 100


class Delivery:
    """Hands batches to a handler for the group ``group``, calls the hooks, counts (see the attributes).

    Entries that are not ticks (see :mod:`consumer_sdk.poison`; ``d`` longer than ``max_bytes`` is not
    read) are acked, counted by kind in ``poison.counts`` and passed to ``on_invalid``, or logged at
    most once a second per kind when there is none; ticks whose entry ID lies far in the future are
    handed over, counted and logged the same way.  ``dfield`` is the field name as the client returns
    it (``b"d"``, or ``"d"`` with ``decode_responses``).
    """

    def __init__(
        self,
        *,
        group: str,
        on_invalid: InvalidHook | None,
        on_gap: GapHook | None,
        on_trimmed: TrimmedHook | None,
        max_bytes: int = MAX_ENTRY_BYTES,
    ) -> None:
        self.group = group
        self._on_invalid = on_invalid
        self._on_gap = on_gap
        self._on_trimmed = on_trimmed
        self._max_bytes = max_bytes
        self.dfield: Any = b"d"
        self.poison = PoisonLog(log, group=group)
        self.delivered = 0
        self.acked = 0
        self.duplicates = 0
        self.gaps = 0
        self.gap_ticks = 0
        self.late = 0
        self.invalid = 0
        self.trimmed = 0

    async def dispatch(
        self,
        client: Redis,
        streams: Sequence[Flat],
        by_name: Mapping[Any, KeyState],
        handler: Handler,
        is_async: bool,
        collect: list[tuple[str, str, Tick]] | None,
        *,
        claimed: bool = False,
    ) -> Acks:
        """Classify, check and hand over one read's entries; returns what to ack, per stream.

        ``by_name`` finds a stream's state from its key as the reply names it.  When anything raises,
        what was handled before it is acked (best effort) and the error propagates; the tracker forgets
        what was not handed over.
        """
        acks: Acks = []
        horizon = int(time.time() * 1000) + FUTURE_ID_MS  # entry IDs are wall-clock milliseconds
        try:
            for rkey, ids, values in streams:
                state = by_name.get(rkey)
                if state is None or not ids:
                    continue
                batch = classify(state, ids, values, claimed, max_bytes=self._max_bytes, horizon_ms=horizon)
                if batch.gaps:
                    try:
                        await self._check_holes(client, state, batch)
                    except BaseException:
                        rollback(state, batch, 0)
                        raise
                try:
                    await self._deliver(state, batch, handler, is_async)
                finally:
                    acks.append((state.key, ids if batch.done == len(ids) else ids[: batch.done]))
                    for index in batch.future:
                        if index < batch.done:
                            self.poison.report(
                                state.key, id_str(ids[index]), "future_id",
                                f"entry ID more than {FUTURE_ID_MS // 3_600_000} h ahead of this clock",
                            )
                if collect is not None:
                    key = state.key
                    pairs = zip(batch.ids, batch.ticks, strict=True)
                    collect.extend((key, id_str(eid), tick) for eid, tick in pairs if tick is not None)
        except BaseException:
            with contextlib.suppress(rexc.RedisError, OSError):
                await self.ack(client, acks)
            raise
        return acks

    async def ack(self, client: Redis, acks: Acks) -> None:
        """``XACK`` every stream's IDs in one round trip; counts what Redis acknowledged."""
        todo = [(key, ids) for key, ids in acks if ids]
        if todo:
            self.acked += await xack_many(client, self.group, todo)

    def report_trimmed(self, state: KeyState, first_missing: str, available: str | None, marker: Any) -> None:
        """History lost on ``state``'s stream, told once per ``marker``: logged, then ``on_trimmed`` or
        :class:`~consumer_sdk.core.errors.TrimmedError`."""
        if marker in state.trim_reported:
            return
        state.trim_reported.add(marker)
        self.trimmed += 1
        log_event(
            log, logging.WARNING, "trimmed", key=state.key, group=self.group,
            first_missing=first_missing, first_available=available,
        )
        if self._on_trimmed is None:
            raise TrimmedError(state.key, first_missing, available)
        self._on_trimmed(state.key, first_missing, available)

    async def _check_holes(self, client: Redis, state: KeyState, batch: Batch) -> None:
        """Tell real gaps and trimmed history from holes another consumer of the group was given."""
        key = state.key
        async with client.pipeline(transaction=False) as pipe:
            for _index, before, after, _first, _last in batch.gaps:
                pipe.xrange(key, "(" + id_str(before), "(" + id_str(after), count=1)
            pipe.xinfo_stream(key)
            results = await pipe.execute(raise_on_error=False)
        info = results[-1]
        if isinstance(info, Exception) and "no such key" not in str(info).lower():
            raise info
        view = stream_view(None if isinstance(info, Exception) else info)
        reports: dict[int, tuple[int, int]] = {}
        for (index, before, after, first, last), rows in zip(batch.gaps, results, strict=False):
            if isinstance(rows, Exception):
                raise rows
            lo, hi = id_tuple(before), id_tuple(after)
            verdict = hole_verdict(await self._holds_a_tick(client, key, rows, after), lo, hi, view)
            if verdict == "shared":
                state.tracker.fill(first, last)
                continue
            if verdict == "trimmed":
                # told once, as trimmed history (here, or by the claim that found the deleted entry), never also as
                # a venue gap
                if not any(lo < d < hi for d in batch.deleted):
                    self.report_trimmed(state, fmt_id(id_after(id_tuple(before))), id_str(after), ("hole", after))
                continue
            reports[index] = (first, last)
        batch.reports = reports

    async def _holds_a_tick(self, client: Redis, key: str, rows: Any, after: Any) -> bool:
        """Whether a hole in seq holds a tick, ``rows`` being its first entry (``XRANGE ... COUNT 1``).

        Entries in it that are not ticks hide no tick from this consumer: they are stepped over one
        ``XRANGE ... COUNT 1`` each (one entry in memory at a time, however large), at most
        :data:`HOLE_PROBES`; a hole fuller than that of them is taken as holding ticks (not reported).
        """
        for _ in range(HOLE_PROBES):
            if not rows:
                return False
            eid, fields = rows[0]
            if not isinstance(entry_verdict(field_value(fields, self.dfield), self._max_bytes), PoisonedEntry):
                return True
            rows = await client.xrange(key, "(" + id_str(eid), "(" + id_str(after), count=1)
        return True

    async def _deliver(self, state: KeyState, batch: Batch, handler: Handler, is_async: bool) -> None:
        """Hand one stream's batch to the handler in order; ``batch.done`` tells how many to ack.

        Ticks in order between the odd entries go through a tight loop; the odd ones one at a time.
        """
        ticks = batch.ticks
        odd = batch.odd
        total = len(ticks)
        marks = sorted(odd) if odd else []
        marks.append(total)
        index = 0
        skipped = 0  # entries dealt with but not handed over
        try:
            for mark in marks:
                if index < mark:
                    run = ticks if index == 0 and mark == total else ticks[index:mark]
                    if is_async:
                        for tick in run:
                            await handler(tick)  # type: ignore[misc]
                            index += 1
                    else:
                        for tick in run:
                            result = handler(tick)
                            if result is not None and inspect.isawaitable(result):
                                await result
                            index += 1
                if index == total:
                    break
                kind, verdict, error = odd[index]
                if kind == DELIVER:
                    tick = ticks[index]
                    if verdict is _GAP:
                        reports = batch.reports
                        if reports is not None and index in reports:
                            first, last = reports[index]
                            self.gaps += 1
                            self.gap_ticks += last - first + 1
                            if self._on_gap is not None:
                                self._on_gap(state.key, first, last)
                    elif verdict is _LATE:
                        self.late += 1
                    if is_async:
                        await handler(tick)  # type: ignore[misc]
                    else:
                        result = handler(tick)
                        if result is not None and inspect.isawaitable(result):
                            await result
                    if verdict is _LATE:
                        seq = tick["seq"]
                        state.tracker.fill(seq, seq)
                    index += 1
                    continue
                # Not handed over, acked even when reporting it raises.
                eid = batch.ids[index]
                index += 1
                skipped += 1
                if kind == DUPLICATE:
                    self.duplicates += 1
                elif kind == INVALID:
                    assert error is not None
                    self.invalid += 1
                    if self._on_invalid is not None:
                        self.poison.count(error.kind)
                        self._on_invalid(state.key, id_str(eid), error)
                    else:
                        self.poison.report(state.key, id_str(eid), error.kind, str(error))
                else:  # DELETED
                    available = id_str(batch.ids[index]) if index < total else None
                    self.report_trimmed(state, id_str(eid), available, ("pending", eid))
        except BaseException:
            rollback(state, batch, index)
            raise
        finally:
            batch.done = index
            self.delivered += index - skipped
