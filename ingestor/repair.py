"""Gap repair: fetch missing trade ids over REST and publish them in order, before newer ticks.

When the sequencer reports a jump in a trade or aggTrade stream, the tick that revealed it
and every later tick of that stream are *held* (bounded) while one repair task fetches the
missing ids from the venue's REST API (``historicalTrades`` / ``aggTrades`` with ``fromId``).
Then the fetched and the held ticks go into the ingress merged in ``seq`` order, so they reach
Redis in order and nothing newer was stored first.  Whatever could not be fetched (older than
the venue keeps, too large, REST failing past the deadline) is published as an explicit gap
marker (:func:`consumer_sdk.tick.make_gap_marker`) where the ids are missing: never silence.

:func:`merge_repair` is the pure part: fetched + held -> the ordered output with markers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consumer_sdk._aio import reraise_if_cancelling
from consumer_sdk._log import get_logger, log_event
from consumer_sdk.tick import Tick, make_gap_marker
from distributor.ingress import IngressQueue
from ingestor.backoff import Backoff
from ingestor.rest import RestError, VenueRest, agg_trades_to_ticks, trades_to_ticks
from ingestor.sequencer import GapReport, Sequencer

__all__ = ["GapRepairer", "RepairSettings", "merge_repair"]

log = get_logger("repair")
REPAIRABLE = frozenset({"trade", "agg_trade"})
Ident = tuple[str, str, str]


@dataclass(frozen=True, slots=True)
class RepairSettings:
    enabled: bool = True
    #: larger holes are marked, not fetched
    max_gap: int = 200_000
    #: newer ticks held per stream while repairing; past this the repair stops and marks what is left
    max_hold: int = 200_000
    page: int = 1000
    #: a repair that takes longer than this marks what it has not fetched
    deadline_s: float = 60.0


def merge_repair(first: int, fetched: Sequence[Tick], held: Sequence[Tick], reason: str) -> list[Tick]:
    """``fetched`` (ids from ``first`` on) and ``held`` (accepted live ticks, increasing seq) -> output.

    The output covers ``first .. held[-1].seq`` in increasing ``seq``; each run of ids found in
    neither is replaced by one gap marker placed where the ids are missing.
    """
    if not held:
        return []
    last = held[-1]["seq"]
    by_seq: dict[int, Tick] = {t["seq"]: t for t in fetched if first <= t["seq"] <= last}
    for t in held:
        by_seq[t["seq"]] = t
    out: list[Tick] = []
    expected = first
    for seq in sorted(by_seq):
        t = by_seq[seq]
        if seq > expected:
            out.append(make_gap_marker(
                t["venue"], t["symbol"], t["channel"], expected, seq - 1, t["ts_event"], t["ts_recv"], reason
            ))
        out.append(t)
        expected = seq + 1
    return out


class GapRepairer:
    """Owns the held ticks of streams under repair and the task that repairs them."""

    def __init__(
        self,
        rest: VenueRest | None,
        ingress: IngressQueue[Tick],
        sequencer: Sequencer,
        settings: RepairSettings | None = None,
    ) -> None:
        self._rest = rest
        self._ingress = ingress
        self._sequencer = sequencer
        self.settings = settings or RepairSettings()
        self.holds: dict[Ident, list[Tick]] = {}
        self._abort: dict[Ident, asyncio.Event] = {}
        self._jobs: asyncio.Queue[GapReport] = asyncio.Queue()
        self.gaps_repaired = 0
        self.gaps_unrepaired = 0
        self.ticks_repaired: dict[str, int] = {}
        self.ticks_unrepaired: dict[str, int] = {}
        self.held_overflow = 0

    def start(self, tick: Tick, gap: GapReport) -> Tick | None:
        """A tick revealed ``gap``.  None: the tick is held and a repair is queued.  Otherwise a gap
        marker the caller must enqueue before the tick (the gap cannot be repaired)."""
        s = self.settings
        size = gap.last - gap.first + 1
        if s.enabled and self._rest is not None and gap.channel in REPAIRABLE and size <= s.max_gap:
            self.holds[(gap.venue, gap.symbol, gap.channel)] = [tick]
            self._jobs.put_nowait(gap)
            return None
        reason = "not repairable" if gap.channel not in REPAIRABLE else (
            "repair disabled" if not s.enabled or self._rest is None else f"gap of {size} ids exceeds max_gap"
        )
        self._count_unrepaired(gap.channel, size)
        log_event(
            log, logging.WARNING, "gap_marked", stream=f"{gap.symbol}:{gap.channel}", first=gap.first,
            last=gap.last, reason=reason,
        )
        marker: Any = make_gap_marker(
            gap.venue, gap.symbol, gap.channel, gap.first, gap.last, tick["ts_event"], tick["ts_recv"], reason
        )
        return marker  # type: ignore[no-any-return]

    def hold(self, ident: Ident, tick: Tick) -> bool:
        """Hold ``tick`` if its stream is under repair (then True)."""
        held = self.holds.get(ident)
        if held is None:
            return False
        held.append(tick)
        if len(held) >= self.settings.max_hold:
            self.held_overflow += 1
            abort = self._abort.get(ident)
            if abort is not None:
                abort.set()  # the repair stops fetching and releases what it has now
        return True

    def _count_unrepaired(self, channel: str, n: int) -> None:
        self.gaps_unrepaired += 1
        self.ticks_unrepaired[channel] = self.ticks_unrepaired.get(channel, 0) + n

    async def run(self) -> None:
        """The repair task: one gap at a time, forever; a failing repair never stops it."""
        while True:
            gap = await self._jobs.get()
            try:
                await self._repair(gap)
            except Exception:
                reraise_if_cancelling()
                log.exception("repair_failed")
                await self._release(gap, [], f"repair failed: {gap}")

    async def _fetch(self, gap: GapReport, held: list[Tick], abort: asyncio.Event) -> tuple[list[Tick], str]:
        """Fetch ids from ``gap.first`` up to the newest held tick; stop early on a full hold or the deadline."""
        assert self._rest is not None
        s = self.settings
        convert = trades_to_ticks if gap.channel == "trade" else agg_trades_to_ticks
        fetched: list[Tick] = []
        next_id = gap.first
        backoff = Backoff(base=0.2, cap=5.0)
        try:
            async with asyncio.timeout(s.deadline_s):
                while next_id < held[-1]["seq"]:
                    if abort.is_set():
                        return fetched, "too many ticks held during the repair"
                    request = asyncio.ensure_future(self._rest.fetch(gap.channel, gap.symbol, next_id, s.page))
                    aborted = asyncio.ensure_future(abort.wait())
                    try:
                        await asyncio.wait([request, aborted], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        aborted.cancel()
                        if not request.done():
                            request.cancel()
                    if not request.done() or request.cancelled():
                        return fetched, "too many ticks held during the repair"
                    try:
                        rows = request.result()
                        ticks = convert(rows, gap.venue, gap.symbol, time.time_ns() // 1000) if rows else []
                    except RestError as exc:
                        if not exc.retryable:
                            return fetched, f"REST refused: {exc}"
                        delay = exc.retry_after if exc.retry_after is not None else backoff.next_delay()
                        log_event(log, logging.WARNING, "repair_retry", error=str(exc)[:200], delay_s=delay)
                        await asyncio.sleep(delay)
                        continue
                    except (KeyError, TypeError, ValueError) as exc:
                        return fetched, f"malformed REST rows: {exc!r}"
                    if not ticks:
                        return fetched, "venue returned no trades for the range"
                    fetched.extend(ticks)
                    newest = ticks[-1]["seq"]
                    if newest < next_id:
                        return fetched, "venue returned older ids than asked"
                    next_id = newest + 1
        except TimeoutError:
            return fetched, f"repair exceeded {s.deadline_s:.0f} s"
        return fetched, "venue no longer has these ids"

    async def _repair(self, gap: GapReport) -> None:
        ident = (gap.venue, gap.symbol, gap.channel)
        held = self.holds[ident]
        abort = self._abort[ident] = asyncio.Event()
        if len(held) >= self.settings.max_hold:
            abort.set()
        started = time.monotonic()
        try:
            fetched, reason = await self._fetch(gap, held, abort)
        finally:
            del self._abort[ident]
        repaired, missing = await self._release(gap, fetched, reason)
        level, event = (logging.INFO, "gap_repaired") if not missing else (logging.WARNING, "gap_partly_repaired")
        log_event(
            log, level, event,
            stream=f"{gap.symbol}:{gap.channel}", first=gap.first, last=gap.last, fetched=repaired,
            missing=missing, held=len(held), ms=int((time.monotonic() - started) * 1000),
            **({"reason": reason} if missing else {}),
        )

    async def _release(self, gap: GapReport, fetched: list[Tick], reason: str) -> tuple[int, int]:
        """Put fetched and held ticks into the ingress in seq order, markers where ids are missing.

        The hold stays in place until its list is drained, so ticks arriving meanwhile queue behind it
        and nothing overtakes; a hole among those late arrivals is marked too.
        """
        ident = (gap.venue, gap.symbol, gap.channel)
        held = self.holds.get(ident)
        if not held:
            self.holds.pop(ident, None)
            return 0, 0
        out = merge_repair(gap.first, fetched, held, reason)
        merged = len(held)  # held[:merged] are in `out`; later arrivals follow below
        first_held = held[0]["seq"]
        ingress = self._ingress
        missing = 0
        for t in out:
            if "gap_first" in t:
                missing += t["gap_last"] - t["gap_first"] + 1  # type: ignore[typeddict-item]
            if not ingress.offer(t):
                await ingress.put(t)
        i = merged
        expected = held[merged - 1]["seq"] + 1
        while i < len(held):
            t = held[i]
            i += 1
            if t["seq"] > expected:
                marker: Any = make_gap_marker(
                    t["venue"], t["symbol"], t["channel"], expected, t["seq"] - 1, t["ts_event"], t["ts_recv"],
                    "ids missing among ticks held for a repair",
                )
                missing += t["seq"] - expected
                if not ingress.offer(marker):
                    await ingress.put(marker)
            if not ingress.offer(t):
                await ingress.put(t)
            expected = t["seq"] + 1
        del self.holds[ident]
        repaired = sum(1 for t in fetched if gap.first <= t["seq"] < first_held)
        self.ticks_repaired[gap.channel] = self.ticks_repaired.get(gap.channel, 0) + repaired
        if missing:
            self._count_unrepaired(gap.channel, missing)
        else:
            self.gaps_repaired += 1
        self._sequencer.forget_holes(ident, gap.first, expected - 1)
        return repaired, missing
