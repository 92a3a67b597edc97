"""Order-book drills with real processes: ``python -m ops.cli ingest`` children on ``trade,depth`` against the
simulator (in process), the real Redis under the test's prefix, under a venue reconnect, a kill -9 and a
restart, two ingestors at once, and a dropped diff with a stale snapshot.

Each drill checks the whole stored ``depth`` stream of every symbol with
:class:`consumer_sdk.book_stream.Rebuilder`: a break is allowed only where a ``start`` or ``resync:*`` snapshot
comes before the next diff is applied (the ingestor never stores a diff over a break, so none is expected at
all), and counts the snapshots by reason.  At the end the simulator's trades are stopped (``/control/rate``,
so no ``bookTicker`` moves the touch) and, once a batch has flushed, its REST book (``lastUpdateId`` L, the
``u`` of its last batch) is compared with the SDK's :func:`consumer_sdk.book_reader.book_at` at ``seq:L``:
the same update id, the same levels.

Each drill prints the entries stored, the resyncs by reason (from the stored snapshots, and from the
ingestor's ``market_book_resync`` counter) and the time from the fault to the next stored snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk.book_reader import book_at
from consumer_sdk.book_stream import BookBreak, BookEntry, Rebuilder, decode_all
from ops.bench.processes import Child, free_port, http_get, spawn
from ops.bench.scrape import parse_metrics
from ops.simulator import Simulator, SimulatorConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
#: every drill's venue: three symbols, trades at a modest rate, books of 200 levels a side (each REST snapshot of
#: the ingestor's limit 1000 is the whole book)
SIM = SimulatorConfig(symbols=SYMBOLS, rate=300.0, depth=True, depth_levels=200)
WAIT_S = 60.0

_TOML = """\
[session]
ping_interval = 1.0
ping_timeout = 2.0
backoff_cap = 1.0
[retention]
maxlen = 0
[depth]
snapshot_every_s = 5.0
"""


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float = WAIT_S, what: str = "") -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(0.1)  # poll
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f} s: {what}") from None


async def control(sim: Simulator, action: str, **params: Any) -> dict[str, Any]:
    """GET the simulator's control endpoint; the state it answers."""
    query = f"?{urlencode(params)}" if params else ""
    body: dict[str, Any] = orjson.loads(await http_get(sim.port, f"/control/{action}{query}"))
    return body


@dataclass
class Ingest:
    """One ``market ingest`` child and its metrics port."""

    child: Child
    metrics_port: int

    async def resyncs(self) -> Counter[tuple[str, str]]:
        """``market_book_resync`` by (symbol, reason)."""
        scrape = parse_metrics((await http_get(self.metrics_port, "/metrics")).decode())
        out: Counter[tuple[str, str]] = Counter()
        for (name, labels), value in scrape.values.items():
            if name == "market_book_resync_total":
                lab = dict(labels)
                out[(lab["symbol"], lab["reason"])] += int(value)
        return out

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.child.proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(self.child.proc.wait(), 15)
        self.child.log_file.close()


async def start_ingest(sim: Simulator, redis_url: str, prefix: str, tmp: Path, name: str) -> Ingest:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(_TOML)
    port = free_port()
    env = {**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}
    child = await spawn(name, [
        "ingest", "--url", sim.ws_url, "--symbols", ",".join(SYMBOLS), "--channels", "trade,depth",
        "--metrics-port", str(port), "--spill-dir", str(tmp / f"{name}-spill"), "--config", str(cfg),
    ], env, tmp)
    return Ingest(child, port)


@contextlib.asynccontextmanager
async def ingesting(children: list[Ingest]) -> AsyncIterator[list[Ingest]]:
    """Stops (SIGTERM, bounded) whatever child is still running at the end; its log is shown on a failure."""
    try:
        yield children
    except BaseException:
        for ing in children:
            print(f"--- {ing.child.name} log tail:\n" + "\n".join(ing.child.log_path.read_text().splitlines()[-15:]))
        raise
    finally:
        for ing in children:
            await ing.child.stop()


def depth_key(prefix: str, symbol: str) -> str:
    return f"{prefix}:binance:{symbol}:depth"


async def read_stream(redis: aioredis.Redis, key: str) -> list[BookEntry]:
    out: list[BookEntry] = []
    start = "-"
    while True:
        page: Any = await redis.xrange(key, start, "+", count=5000)
        out += decode_all((eid, fields[b"d"]) for eid, fields in page)
        if len(page) < 5000:
            return out
        start = "(" + page[-1][0].decode()


@dataclass
class StreamCheck:
    """One stored stream rebuilt entry by entry."""

    entries: int = 0
    diffs: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    #: breaks, each with the reason of the snapshot that ended it
    breaks: list[tuple[BookBreak, str]] = field(default_factory=list)
    snapshots: list[BookEntry] = field(default_factory=list)


def check_stream(key: str, entries: Sequence[BookEntry]) -> StreamCheck:
    """Feed every entry to a :class:`Rebuilder`; a break must end at a ``start`` or ``resync:*`` snapshot before
    the next diff is applied (a diff skipped meanwhile is a diff lost: also refused)."""
    assert entries, f"{key} is empty"
    assert entries[0].kind == "snapshot" and entries[0].reason == "start", f"{key} does not begin with a start"
    out = StreamCheck(entries=len(entries))
    rebuilder = Rebuilder()
    open_break: BookBreak | None = None
    for entry in entries:
        try:
            rebuilder.feed(entry)
        except BookBreak as exc:
            assert exc.kind == "gap", f"{key}: {exc}"
            open_break = exc
            continue
        if entry.kind == "snapshot":
            assert entry.reason is not None
            out.reasons[entry.reason] += 1
            out.snapshots.append(entry)
            if open_break is not None:
                assert entry.reason == "start" or entry.reason.startswith("resync:"), (
                    f"{key}: the break at seq {open_break.seq} ends at a {entry.reason} snapshot")
                out.breaks.append((open_break, entry.reason))
                open_break = None
        else:
            assert open_break is None, f"{key}: diff seq {entry.seq} skipped after the break {open_break}"
            out.diffs += 1
    assert open_break is None, f"{key}: the stream ends in a break: {open_break}"
    return out


async def check_all(redis: aioredis.Redis, prefix: str) -> dict[str, StreamCheck]:
    return {s: check_stream(depth_key(prefix, s), await read_stream(redis, depth_key(prefix, s))) for s in SYMBOLS}


async def top_seq(redis: aioredis.Redis, key: str) -> int:
    top: Any = await redis.xrevrange(key, "+", "-", count=1)
    return int(top[0][0].split(b"-")[1]) if top else 0


async def snapshot_after(redis: aioredis.Redis, prefix: str, symbols: Sequence[str], since_us: int,
                         reasons: Sequence[str]) -> None:
    """Wait until each symbol's stream holds a snapshot of one of ``reasons`` received after ``since_us``."""
    async def stored() -> bool:
        for symbol in symbols:
            entries = await read_stream(redis, depth_key(prefix, symbol))
            if not any(e.kind == "snapshot" and e.ts_recv > since_us and e.reason in reasons for e in entries):
                return False
        return True

    await wait_for(stored, what=f"a {'/'.join(reasons)} snapshot of {', '.join(symbols)}")


async def flowing(redis: aioredis.Redis, prefix: str, entries: int = 30) -> None:
    """Every symbol's depth stream holds its start snapshot and ``entries`` entries."""
    async def grown() -> bool:
        for symbol in SYMBOLS:
            if await redis.xlen(depth_key(prefix, symbol)) < entries:
                return False
        return True

    await wait_for(grown, what=f"{entries} depth entries of each symbol")


async def more_entries(redis: aioredis.Redis, prefix: str, n: int = 20) -> None:
    """Wait until every symbol's depth stream has ``n`` entries more than now."""
    lengths = {s: await redis.xlen(depth_key(prefix, s)) for s in SYMBOLS}

    async def grown() -> bool:
        for symbol in SYMBOLS:
            if await redis.xlen(depth_key(prefix, symbol)) < lengths[symbol] + n:
                return False
        return True

    await wait_for(grown, what=f"{n} more depth entries of each symbol")


def fault_to_snapshot(checks: dict[str, StreamCheck], since_us: int) -> dict[str, float]:
    """Per symbol, seconds from the fault to the first snapshot received after it."""
    out = {}
    for symbol, check in checks.items():
        after = [e.ts_recv for e in check.snapshots if e.ts_recv > since_us]
        if after:
            out[symbol] = round((min(after) - since_us) / 1e6, 3)
    return out


def _levels(levels: Any) -> list[tuple[Decimal, Decimal]]:
    return [(Decimal(p), Decimal(q)) for p, q in levels]


async def compare_with_venue(sim: Simulator, redis: aioredis.Redis, prefix: str) -> dict[str, int]:
    """Stop the venue's trades, let a batch flush (no touch move is left pending), then for each symbol compare
    its REST book at ``lastUpdateId`` L with the SDK's book at ``seq:L``.  The ids compared, by symbol."""
    await control(sim, "clear")  # no fault left armed, no REST weight spent
    before = (await control(sim, "rate", value=0))["depth"]

    async def flushed() -> bool:
        state = (await control(sim, "state"))["depth"]
        return all(state[s]["last_update_id"] > before[s]["last_update_id"] for s in SYMBOLS)

    await wait_for(flushed, what="a batch of every book after the trades stopped")
    out = {}
    for symbol in SYMBOLS:
        venue = orjson.loads(await http_get(sim.port, f"/api/v3/depth?symbol={symbol}&limit=1000"))
        last = int(venue["lastUpdateId"])
        key = depth_key(prefix, symbol)

        async def reached(key: str = key, last: int = last) -> bool:
            return await top_seq(redis, key) >= last

        await wait_for(reached, what=f"{key} reaching the venue's update id {last}")
        at = await book_at(redis, key, f"seq:{last}")
        assert at.seq == last, f"{symbol}: the stream holds no entry at the venue's update id {last} (got {at.seq})"
        bids, asks = at.book.levels()
        assert _levels(bids) == _levels(venue["bids"]), f"{symbol}: bids differ at {last}"
        assert _levels(asks) == _levels(venue["asks"]), f"{symbol}: asks differ at {last}"
        assert len(bids) == len(venue["bids"]) > 0 and len(asks) == len(venue["asks"]) > 0
        out[symbol] = last
    return out


def report(drill: str, checks: dict[str, StreamCheck], resyncs: Counter[tuple[str, str]],
           fault_us: int, compared: dict[str, int]) -> None:
    entries = {s: c.entries for s, c in checks.items()}
    reasons = {s: dict(c.reasons) for s, c in checks.items()}
    counted: Counter[str] = Counter()
    for (_, reason), n in resyncs.items():
        counted[reason] += n
    breaks = sum(len(c.breaks) for c in checks.values())
    print(f"\n{drill}: entries stored {entries} ({sum(entries.values())}); snapshots by reason {reasons}; "
          f"ingestor resyncs by reason {dict(counted)}; breaks {breaks}; fault -> next stored snapshot (s) "
          f"{fault_to_snapshot(checks, fault_us)}; SDK book == venue book at update ids {compared}")


# ---------------------------------------------------------------- the drills


async def test_a_venue_reconnect_resyncs_every_book(redis_url: str, aredis: aioredis.Redis, prefix: str,
                                                    tmp_path: Path) -> None:
    async with Simulator(SIM) as sim, ingesting([await start_ingest(sim, redis_url, prefix, tmp_path, "one")]) as (
        ing,
    ):
        await flowing(aredis, prefix)
        fault_us = time.time_ns() // 1000
        await control(sim, "close_all")
        await snapshot_after(aredis, prefix, SYMBOLS, fault_us, ("resync:reconnect",))
        await more_entries(aredis, prefix)
        compared = await compare_with_venue(sim, aredis, prefix)
        resyncs = await ing.resyncs()
        checks = await check_all(aredis, prefix)
    for symbol in SYMBOLS:
        assert resyncs[(symbol, "reconnect")] >= 1, resyncs
        assert checks[symbol].reasons["resync:reconnect"] >= 1
        assert checks[symbol].breaks == []
    report("reconnect", checks, resyncs, fault_us, compared)


async def test_kill_9_and_a_restart_continue_every_book(redis_url: str, aredis: aioredis.Redis, prefix: str,
                                                        tmp_path: Path) -> None:
    async with Simulator(SIM) as sim:
        first = await start_ingest(sim, redis_url, prefix, tmp_path, "one")
        async with ingesting([first]):
            await flowing(aredis, prefix)
            await first.kill()
        fault_us = time.time_ns() // 1000
        tops = {s: await top_seq(aredis, depth_key(prefix, s)) for s in SYMBOLS}

        async def moved_on() -> bool:  # the venue's books go on while no ingestor runs: 10 batches at least
            state = (await control(sim, "state"))["depth"]
            return all(state[s]["last_update_id"] > tops[s] + 100 for s in SYMBOLS)

        await wait_for(moved_on, what="the venue's books moving on")
        restart_us = time.time_ns() // 1000
        async with ingesting([await start_ingest(sim, redis_url, prefix, tmp_path, "two")]) as (second,):
            await snapshot_after(aredis, prefix, SYMBOLS, fault_us, ("start",))
            await more_entries(aredis, prefix)
            compared = await compare_with_venue(sim, aredis, prefix)
            resyncs = await second.resyncs()
            checks = await check_all(aredis, prefix)
    for symbol in SYMBOLS:
        assert checks[symbol].reasons["start"] == 2, checks[symbol].reasons
        assert checks[symbol].breaks == []
    report("kill -9 and restart", checks, resyncs, fault_us, compared)
    print(f"  restart -> its start snapshot (s) {fault_to_snapshot(checks, restart_us)}")


async def test_two_ingestors_on_the_same_books(redis_url: str, aredis: aioredis.Redis, prefix: str,
                                               tmp_path: Path) -> None:
    async with Simulator(SIM) as sim:
        pair = [await start_ingest(sim, redis_url, prefix, tmp_path, name) for name in ("one", "two")]
        async with ingesting(pair):
            await flowing(aredis, prefix)
            fault_us = time.time_ns() // 1000
            await control(sim, "close_all")  # both resync at once, each storing what the other has not
            await snapshot_after(aredis, prefix, SYMBOLS, fault_us, ("resync:reconnect",))
            await pair[0].kill()  # the other carries on alone
            killed_us = time.time_ns() // 1000
            tops = {s: await top_seq(aredis, depth_key(prefix, s)) for s in SYMBOLS}

            async def carried_on() -> bool:
                seqs = {s: await top_seq(aredis, depth_key(prefix, s)) for s in SYMBOLS}
                return all(seqs[s] > tops[s] for s in SYMBOLS)

            await wait_for(carried_on, what="the second ingestor storing on alone")
            compared = await compare_with_venue(sim, aredis, prefix)
            resyncs = await pair[1].resyncs()
            checks = await check_all(aredis, prefix)
    for symbol in SYMBOLS:
        assert resyncs[(symbol, "reconnect")] >= 1, resyncs
        assert checks[symbol].breaks == []
        assert not [e for e in checks[symbol].snapshots if e.ts_recv > killed_us and e.reason == "start"]
    report("two ingestors", checks, resyncs, fault_us, compared)


async def test_a_dropped_diff_and_a_stale_snapshot_resync_only_their_books(
    redis_url: str, aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """BTCUSDT loses a diff and its first snapshot after is 3 batches old; ETHUSDT loses a diff; BNBUSDT
    is left alone."""
    async with Simulator(SIM) as sim, ingesting([await start_ingest(sim, redis_url, prefix, tmp_path, "one")]) as (
        ing,
    ):
        await flowing(aredis, prefix)
        fault_us = time.time_ns() // 1000
        await control(sim, "depth_faults", schedule="stale:3@BTCUSDT,drop@BTCUSDT,drop@ETHUSDT")
        await snapshot_after(aredis, prefix, ("BTCUSDT", "ETHUSDT"), fault_us, ("resync:gap",))

        async def counted() -> bool:
            resyncs = await ing.resyncs()
            return resyncs[("BTCUSDT", "stale_snapshot")] >= 1 and resyncs[("ETHUSDT", "gap")] >= 1

        await wait_for(counted, what="the gap and the stale snapshot counted")
        await more_entries(aredis, prefix)
        state = (await control(sim, "state"))["depth"]
        compared = await compare_with_venue(sim, aredis, prefix)
        resyncs = await ing.resyncs()
        checks = await check_all(aredis, prefix)
    assert state["BTCUSDT"]["dropped"] == state["ETHUSDT"]["dropped"] == 1 and state["BTCUSDT"]["stale_served"] == 1
    assert resyncs[("BTCUSDT", "gap")] == resyncs[("ETHUSDT", "gap")] == 1, resyncs
    assert not [r for (s, r) in resyncs if s == "BNBUSDT"], resyncs
    assert checks["BNBUSDT"].reasons.keys() <= {"start", "periodic"}, checks["BNBUSDT"].reasons
    for symbol in SYMBOLS:
        assert checks[symbol].breaks == []
    report("dropped diff and stale snapshot", checks, resyncs, fault_us, compared)
