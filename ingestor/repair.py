"""Gap repair: fetch missing trade ids over REST and publish them in order, before newer ticks.

When the sequencer reports a jump in a trade or aggTrade stream, the tick that revealed it
and every later tick of that stream are *held* (bounded) while one repair task fetches the
missing ids from the venue's REST API (``historicalTrades`` / ``aggTrades`` with ``fromId``; OKX's
``history-trades`` paged by trade id: the venue's :meth:`~ingestor.venue.Venue.backfill_call`, asked and read by
:meth:`~ingestor.rest.VenueRest.fetch_ticks`).
Then the fetched and the held ticks go into the ingress merged in ``seq`` order, so they reach
Redis in order and nothing newer was stored first.  Whatever could not be fetched (older than
the venue keeps, too large, REST failing or refused, the hold's time up; OKX: older than its history-trades
serves, or ids a row aggregating several trades stands for) is published as an explicit
gap marker (:func:`consumer_sdk.core.tick.make_gap_marker`) where the ids are missing: never silence.

Bounds, since a repair holds its stream's live ticks:

- **time**: the held ticks are released at most ``hold_s`` after the gap was seen, repaired or not.
  The default, 5 s, comes from what a real repair takes: a reconnect's gap on a busy Binance symbol
  is a few seconds of trades (a few thousand ids in a burst), a few 1000-row pages; a page of
  ``historicalTrades`` takes 50-300 ms from a nearby region, so a healthy venue repairs such a gap in
  one or two seconds with room for a retry after a 5xx.  Past that, waiting longer delays every later
  tick of the stream for ids that are more likely lost than late.
- **size**: at most ``max_hold`` held ticks; each REST answer at most ``max_body_mb`` and
  ``rest_timeout_s`` (:class:`~ingestor.rest.VenueRest`).
- **a failing server**: ``breaker_failures`` repairs in a row that got no valid answer open a circuit
  breaker (:class:`CircuitBreaker`): for ``breaker_cooldown_s`` (doubling while it keeps failing)
  new gaps are marked at once, holding nothing; then one repair tries again (half-open).

Fetched rows are checked strictly (:mod:`ingestor.rest`): a page with an invalid row, an id outside
the range asked, or a row that disagrees with a live tick held for the same id (another symbol's
rows) is refused whole and counted by kind (:attr:`GapRepairer.refused`); nothing invalid is stored.

:func:`merge_repair` is the pure part: fetched + held -> the ordered output with markers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from consumer_sdk.core.aio import reraise_if_cancelling
from consumer_sdk.core.backoff import Backoff
from consumer_sdk.core.log import Throttle, get_logger, log_event
from consumer_sdk.core.tick import Tick, make_gap_marker
from distributor.ingress import IngressQueue
from ingestor.binance import BINANCE_SPOT
from ingestor.rest import (
    RestRefused,
    RestRetryable,
    VenueRest,
    check_against,
    check_page,
    rows_to_ticks,
)
from ingestor.sequencer import GapReport, Sequencer
from ingestor.venue import Venue

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "GapRepairer",
    "RepairSettings",
    "RepairStats",
    "merge_repair",
]

log = get_logger("repair")
REPAIRABLE = frozenset({"trade", "agg_trade"})
Ident = tuple[str, str, str]
HOLD_FULL = "too many ticks held during the repair"


@dataclass(frozen=True, slots=True)
class RepairSettings:
    enabled: bool = True
    #: larger holes are marked, not fetched
    max_gap: int = 200_000
    #: newer ticks held per stream while repairing; past this the repair stops and marks what is left
    max_hold: int = 200_000
    page: int = 1000
    #: a repair that holds no live tick (the holes found at start) marks what it has not fetched after this long
    deadline_s: float = 60.0
    #: live ticks are held for a repair at most this long after the gap was seen (see the module's docstring)
    hold_s: float = 5.0
    #: one REST request, connect to the body's last byte; its body at most this many MiB
    rest_timeout_s: float = 2.0
    max_body_mb: float = 4.0
    #: repairs in a row with no valid answer that open the circuit, and how long it stays open at first
    breaker_failures: int = 3
    breaker_cooldown_s: float = 30.0

    def client(self, base_url: str, venue: Venue = BINANCE_SPOT) -> VenueRest:
        """The REST client these settings bound, asking ``venue``'s requests (close it with ``aclose``)."""
        return VenueRest(
            base_url, timeout=self.rest_timeout_s, connect_timeout=min(1.0, self.rest_timeout_s),
            max_body=max(1, int(self.max_body_mb * 2**20)), venue=venue,
        )


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Skips a REST server that keeps failing: pure, owned by the repairer, clock passed in.

    ``failures`` failures in a row open it; open, :meth:`allow` says no (counted in ``skipped``) for
    ``cooldown_s``; then it lets requests through again (half-open) and the next outcome decides: a
    success closes it, a failure opens it again for twice as long (at most ``max_cooldown_s``).
    """

    __slots__ = ("_base", "_cooldown", "_open_until", "consecutive", "failures", "max_cooldown_s", "opened",
                 "skipped", "state")

    def __init__(self, failures: int = 3, cooldown_s: float = 30.0, max_cooldown_s: float | None = None) -> None:
        if failures < 1 or not cooldown_s >= 0:
            raise ValueError("failures must be >= 1 and cooldown_s >= 0")
        self.failures = failures
        self._base = self._cooldown = cooldown_s
        self.max_cooldown_s = 10 * cooldown_s if max_cooldown_s is None else max_cooldown_s
        self.state = BreakerState.CLOSED
        self._open_until = 0.0
        #: failures in a row now; times opened; requests refused while open
        self.consecutive = 0
        self.opened = 0
        self.skipped = 0

    def allow(self, now: float) -> bool:
        """May a request go now?  Open and cooling down: no.  Cooled down: yes (half-open)."""
        if self.state is BreakerState.OPEN:
            if now < self._open_until:
                self.skipped += 1
                return False
            self.state = BreakerState.HALF_OPEN
        return True

    def record(self, ok: bool, now: float) -> BreakerState | None:
        """An outcome; returns the new state when it changed."""
        if ok:
            self.consecutive = 0
            self._cooldown = self._base
            if self.state is BreakerState.CLOSED:
                return None
            self.state = BreakerState.CLOSED
            return self.state
        self.consecutive += 1
        if self.state is BreakerState.HALF_OPEN:
            self._cooldown = min(self.max_cooldown_s, 2 * self._cooldown)
        elif self.state is BreakerState.OPEN or self.consecutive < self.failures:
            return None
        self.state = BreakerState.OPEN
        self._open_until = now + self._cooldown
        self.opened += 1
        return self.state

    def retry_in(self, now: float) -> float:
        """Seconds until an open breaker lets a request through (0 when it does now)."""
        return max(0.0, self._open_until - now) if self.state is BreakerState.OPEN else 0.0

    @property
    def cooldown_s(self) -> float:
        """How long the breaker stays open when it opens next (or stays open now)."""
        return self._cooldown


@dataclass(frozen=True, slots=True)
class RepairStats:
    """What the repairer did since start (a snapshot; see :meth:`GapRepairer.stats`)."""

    gaps_repaired: int
    gaps_unrepaired: int
    ticks_repaired: Mapping[str, int]
    ticks_unrepaired: Mapping[str, int]
    #: streams held for a repair now, and the ticks they hold
    holding: int
    held_ticks: int
    #: repairs stopped because ``max_hold`` ticks were held
    held_overflow: int
    #: repairs stopped by ``hold_s``: what they had not fetched was marked and the held ticks released
    hold_expired: int
    #: REST failures and refused answers by kind (:data:`ingestor.rest.REFUSAL_KINDS`)
    refused: Mapping[str, int]
    #: the circuit breaker: its state, times opened, gaps marked at once because it was open
    breaker: str
    breaker_opened: int
    breaker_skipped: int


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
    """Owns the held ticks of streams under repair and the task that repairs them.

    ``rest`` is anything with :class:`VenueRest`'s ``fetch`` and ``aclose`` that raises
    :class:`~ingestor.rest.RestError`; the repairer owns it and closes it in :meth:`aclose`.
    """

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
        self.settings = s = settings or RepairSettings()
        self.holds: dict[Ident, list[Tick]] = {}
        #: when each hold began (monotonic seconds): its repair ends ``hold_s`` after
        self._held_since: dict[Ident, float] = {}
        self._abort: dict[Ident, asyncio.Event] = {}
        self._jobs: asyncio.Queue[GapReport] = asyncio.Queue()
        self.gaps_repaired = 0
        self.gaps_unrepaired = 0
        self.ticks_repaired: dict[str, int] = {}
        self.ticks_unrepaired: dict[str, int] = {}
        self.held_overflow = 0
        self.hold_expired = 0
        #: REST failures and refused answers by kind
        self.refused: dict[str, int] = {}
        #: one log throttle per kind of refusal (``rest_refused``: at most a line a second per kind)
        self._refusal_logs: dict[str, Throttle] = {}
        self.breaker = CircuitBreaker(s.breaker_failures, s.breaker_cooldown_s)

    async def aclose(self) -> None:
        """Close the REST client (after the repair task ended; idempotent)."""
        if self._rest is not None:
            await self._rest.aclose()

    def stats(self) -> RepairStats:
        """A snapshot of the counters; cost: one pass over the streams held now."""
        b = self.breaker
        return RepairStats(
            gaps_repaired=self.gaps_repaired, gaps_unrepaired=self.gaps_unrepaired,
            ticks_repaired=dict(self.ticks_repaired), ticks_unrepaired=dict(self.ticks_unrepaired),
            holding=len(self.holds), held_ticks=sum(len(h) for h in self.holds.values()),
            held_overflow=self.held_overflow, hold_expired=self.hold_expired, refused=dict(self.refused),
            breaker=b.state.value, breaker_opened=b.opened, breaker_skipped=b.skipped,
        )

    def start(self, tick: Tick, gap: GapReport) -> Tick | None:
        """A tick revealed ``gap``.  None: the tick is held and a repair is queued.  Otherwise a gap
        marker the caller must enqueue before the tick (the gap is not repaired: not repairable, too
        large, repair disabled, or the venue's REST skipped while its circuit breaker is open)."""
        s = self.settings
        size = gap.last - gap.first + 1
        now = time.monotonic()
        repairable = s.enabled and self._rest is not None and gap.channel in REPAIRABLE and size <= s.max_gap
        if repairable and self._allow(now):
            ident = (gap.venue, gap.symbol, gap.channel)
            self.holds[ident] = [tick]
            self._held_since[ident] = now
            self._jobs.put_nowait(gap)
            return None
        if repairable:
            reason = self._skip_reason(now)
        elif gap.channel not in REPAIRABLE:
            reason = "not repairable"
        elif not s.enabled or self._rest is None:
            reason = "repair disabled"
        else:
            reason = f"gap of {size} ids exceeds max_gap"
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

    def _refuse(self, kind: str, error: str, retry_in_s: float | None = None) -> None:
        """Count a REST failure or refused answer by kind and log it (``rest_refused``), at most once a second
        per kind; ``retry_in_s``: when the request is tried again (None: it is not)."""
        self.refused[kind] = self.refused.get(kind, 0) + 1
        throttle = self._refusal_logs.get(kind)
        if throttle is None:
            throttle = self._refusal_logs[kind] = Throttle(log)
        throttle.log(logging.WARNING, "rest_refused", kind=kind, error=error[:200], retry_in_s=retry_in_s)

    def _allow(self, now: float) -> bool:
        """The breaker's word, logged when it lets a trial through after its cool-down."""
        was = self.breaker.state
        allowed = self.breaker.allow(now)
        if allowed and was is BreakerState.OPEN:
            log_event(log, logging.INFO, "rest_circuit_half_open", failures=self.breaker.consecutive)
        return allowed

    def _skip_reason(self, now: float) -> str:
        b = self.breaker
        return (f"REST skipped: circuit open after {b.consecutive} failed repairs in a row, next try in "
                f"{b.retry_in(now):.0f} s")

    def _record(self, ok: bool, reason: str) -> None:
        """A repair's outcome for the breaker, logged when it opens or closes (once per change)."""
        b = self.breaker
        change = b.record(ok, time.monotonic())
        if change is BreakerState.OPEN:
            log_event(log, logging.WARNING, "rest_circuit_open", failures=b.consecutive, cooldown_s=b.cooldown_s,
                      error=reason[:200])
        elif change is BreakerState.CLOSED:
            log_event(log, logging.INFO, "rest_circuit_closed")

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

    async def _fetch(
        self, gap: GapReport, held: list[Tick], abort: asyncio.Event, *, until: float | None = None
    ) -> tuple[list[Tick], str]:
        """Fetch ids from ``gap.first`` up to the newest held tick; stop early on a full hold, at ``until``
        (monotonic seconds; None: ``deadline_s`` from now), on a refused answer, or at once while the
        circuit breaker is open.  Returns the checked ticks fetched and why the rest is missing."""
        assert self._rest is not None
        s = self.settings
        now = time.monotonic()
        if not self._allow(now):
            return [], self._skip_reason(now)
        limit = s.deadline_s if until is None else max(0.0, min(until - now, s.deadline_s))
        end = now + limit
        fetched: list[Tick] = []
        next_id = gap.first
        backoff = Backoff(base=0.2, cap=5.0)
        answered = failed = in_flight = False
        reason = "venue no longer has these ids"
        try:
            async with asyncio.timeout(limit):
                while next_id < held[-1]["seq"]:
                    if abort.is_set():
                        reason = HOLD_FULL
                        break
                    in_flight = True
                    request = asyncio.ensure_future(self._page(gap, next_id))
                    request.add_done_callback(_consume)
                    aborted = asyncio.ensure_future(abort.wait())
                    try:
                        await asyncio.wait([request, aborted], return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        aborted.cancel()
                        request.cancel()
                        await asyncio.wait([request, aborted])  # cancelled, both end at once: none outlives us
                    in_flight = False
                    if request.cancelled() or not request.done():
                        reason = HOLD_FULL
                        break
                    try:
                        ticks = request.result()
                        check_page(ticks, next_id, s.page)
                        check_against(ticks, held)
                    except RestRetryable as exc:
                        delay = exc.retry_after if exc.retry_after is not None else backoff.next_delay()
                        if time.monotonic() + delay >= end:
                            self._refuse(exc.kind, str(exc))
                            failed = True
                            reason = f"REST failing: {exc}"
                            if exc.retry_after is not None:
                                reason += f" (the venue asks to wait {delay:g} s, past the repair's end)"
                            break
                        self._refuse(exc.kind, str(exc), delay)
                        await asyncio.sleep(delay)
                        continue
                    except RestRefused as exc:
                        self._refuse(exc.kind, str(exc))
                        failed = True
                        if exc.kind == "wrong_symbol":
                            fetched = []  # earlier pages came from the same mix-up
                        reason = f"REST refused: {exc}"
                        break
                    answered = True
                    if not ticks:
                        reason = "venue returned no trades for the range"
                        break
                    fetched.extend(ticks)
                    next_id = ticks[-1]["seq"] + 1
        except TimeoutError:
            if in_flight:
                self._refuse("deadline", f"no answer within {limit:g} s")
            failed = True
            if until is not None and limit < s.deadline_s:
                self.hold_expired += 1
                reason = f"repair held the stream for its {s.hold_s:g} s"
            else:
                reason = f"repair exceeded {limit:g} s"
        if answered:
            self._record(True, reason)
        elif failed:
            self._record(False, reason)
        return fetched, reason

    async def _page(self, gap: GapReport, from_id: int) -> list[Tick]:
        """One page of the gap's ids from ``from_id`` on, as ticks: the client's ``fetch_ticks`` (the venue's own
        answer reader), or its ``fetch`` and :func:`~ingestor.rest.rows_to_ticks` for a client with only that."""
        rest = self._rest
        assert rest is not None
        fetch_ticks = getattr(rest, "fetch_ticks", None)
        if fetch_ticks is not None:
            ticks: list[Tick] = await fetch_ticks(gap.channel, gap.symbol, from_id, self.settings.page)
            return ticks
        rows = await rest.fetch(gap.channel, gap.symbol, from_id, self.settings.page)
        return rows_to_ticks(gap.channel, rows, gap.venue, gap.symbol, time.time_ns() // 1000)

    async def _repair(self, gap: GapReport) -> None:
        ident = (gap.venue, gap.symbol, gap.channel)
        held = self.holds[ident]
        abort = self._abort[ident] = asyncio.Event()
        if len(held) >= self.settings.max_hold:
            abort.set()
        started = time.monotonic()
        until = self._held_since.pop(ident, started) + self.settings.hold_s
        try:
            fetched, reason = await self._fetch(gap, held, abort, until=until)
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
            self._held_since.pop(ident, None)
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
        self._held_since.pop(ident, None)
        repaired = sum(1 for t in fetched if gap.first <= t["seq"] < first_held)
        self.ticks_repaired[gap.channel] = self.ticks_repaired.get(gap.channel, 0) + repaired
        if missing:
            self._count_unrepaired(gap.channel, missing)
        else:
            self.gaps_repaired += 1
        self._sequencer.forget_holes(ident, gap.first, expected - 1)
        return repaired, missing


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve what a request ended with, so a failure the repair left behind (it was cut by the hold or
    the hold filled) is never reported as unretrieved."""
    if not task.cancelled():
        task.exception()
