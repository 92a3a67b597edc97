"""What the drills against the simulated venue share: waiting on a condition, the venue's newest trade id as its
REST history says, and the check that a trade stream holds every id once, in order, up to it.

The venue is the simulator's own (its ``config.venue``), and so is where its REST history is read:

================= ================================= ===============================================
venue             newest trade from                 id field
================= ================================= ===============================================
``binance``       ``/api/v3/trades`` (``trade``)    ``id``
``binance_usdm``  ``/fapi/v1/aggTrades``            ``a`` (aggregate trade id: the ``agg_trade`` seq)
``binance_coinm`` ``/dapi/v1/aggTrades``            ``a``
``okx``           ``/api/v5/market/history-trades`` ``tradeId`` (the ``trade`` seq)
================= ================================= ===============================================

The steps and checks every venue's connection drill runs the same way (a close storm ridden out, a stall noticed,
rotations, bad frames, ``market ingest`` through a black-holed link and what its log says) are here too, so that
each venue's drill is the same drill; and what the Redis fault drills share: an ingestor running for a block, the
Binance spot streams caught up with the venue, and a stream's coverage (ids stored, ids inside gap markers, holes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from consumer_sdk.core.tick import is_gap_marker
from ingestor.config import IngestSettings
from ingestor.lifecycle import SessionState
from ingestor.service import Ingestor
from ingestor.session import SessionSettings
from ops.simulator import Simulator


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str = "the condition") -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``timeout`` seconds (a hang bound)."""
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(0.05)  # poll
    except TimeoutError:
        pytest.fail(f"{what}: not within {timeout} s")


#: venue -> (REST path and query of its newest trade, with ``{symbol}``; how to read the id from the answer)
_NEWEST_TRADE: Final[dict[str, tuple[str, Callable[[Any], int]]]] = {
    "binance": ("/api/v3/trades?symbol={symbol}&limit=1", lambda body: int(body[-1]["id"])),
    "binance_usdm": ("/fapi/v1/aggTrades?symbol={symbol}&limit=1", lambda body: int(body[-1]["a"])),
    "binance_coinm": ("/dapi/v1/aggTrades?symbol={symbol}&limit=1", lambda body: int(body[-1]["a"])),
    "okx": (
        "/api/v5/market/history-trades?instId={symbol}&type=1&limit=1",
        lambda body: int(body["data"][0]["tradeId"]),
    ),
}


def venue_of(sim: Any) -> str:
    """The venue ``sim`` stands in for (``binance``: Binance spot)."""
    return str(getattr(sim.config, "venue", "binance"))


async def _rest_get(sim: Simulator | Any, path_and_query: str) -> Any:
    def get() -> Any:
        with urllib.request.urlopen(sim.rest_url + path_and_query, timeout=5) as r:
            return json.loads(r.read())

    return await asyncio.to_thread(get)


async def venue_last_trade(sim: Simulator | Any, symbol: str) -> int:
    """The newest trade id the venue has made for ``symbol``, as its REST history says (the table above)."""
    query, read = _NEWEST_TRADE[venue_of(sim)]
    return read(await _rest_get(sim, query.format(symbol=symbol)))


async def spot_last_agg_trade(sim: Simulator | Any, symbol: str) -> int:
    """The newest aggregate trade id Binance spot has made for ``symbol`` (``/api/v3/aggTrades``, ``a``)."""
    return int((await _rest_get(sim, f"/api/v3/aggTrades?symbol={symbol}&limit=1"))[-1]["a"])


async def spot_caught_up(redis: Any, sim: Simulator | Any, prefix: str, timeout: float,
                         symbol: str = "BTCUSDT") -> dict[str, int]:
    """Wait until both of ``symbol``'s Binance spot streams (``trade``, ``agg_trade``) reach what the venue had
    made when this was called; those ids, by channel."""
    targets = {"trade": await venue_last_trade(sim, symbol), "agg_trade": await spot_last_agg_trade(sim, symbol)}

    async def reached() -> bool:
        for channel, target in targets.items():
            try:
                top = await redis.xrevrange(f"{prefix}:binance:{symbol}:{channel}", count=1)
            except (RedisConnectionError, OSError):  # the first use of a pooled connection after a Redis restart
                return False
            if not top or int(top[0][0].split(b"-")[1]) < target:
                return False
        return True

    await wait_for(reached, timeout, f"the streams reach the venue's newest ids {targets}")
    return targets


async def stream_coverage(redis: Any, key: str, upto: int, *, entry_ids_are_seqs: bool = False,
                   ) -> tuple[int, set[int], set[int], list[tuple[int, int]]]:
    """``(first, stored, marked, holes)`` of a stream from its first entry up to id ``upto``: its first id, the
    ids stored as ticks, the ids inside gap markers, and the id ranges in neither.  Fails on an id stored twice
    or out of order, and with ``entry_ids_are_seqs`` on a tick whose entry ID does not end in its seq."""
    covered: list[tuple[int, int]] = []
    stored: set[int] = set()
    marked: set[int] = set()
    start = "-"
    while True:
        page = await redis.xrange(key, start, "+", count=50_000)
        for entry_id, fields in page:
            tick = orjson.loads(fields[b"d"])
            if is_gap_marker(tick):
                covered.append((tick["gap_first"], tick["gap_last"]))
                marked.update(range(tick["gap_first"], min(tick["gap_last"], upto) + 1))
            else:
                if entry_ids_are_seqs:
                    assert int(entry_id.split(b"-")[1]) == tick["seq"], (entry_id, tick)
                covered.append((tick["seq"], tick["seq"]))
                if tick["seq"] <= upto:
                    stored.add(tick["seq"])
        if len(page) < 50_000:
            break
        start = "(" + page[-1][0].decode()
    assert covered, f"{key} is empty"
    holes: list[tuple[int, int]] = []
    expected = covered[0][0]
    for lo, hi in covered:
        assert lo >= expected, f"{key}: {lo}..{hi} stored again or out of order (next expected {expected})"
        if lo > expected:
            holes.append((expected, lo - 1))
        expected = hi + 1
    if expected <= upto:
        holes.append((expected, upto))
    return covered[0][0], stored, marked, holes


async def stored_seqs(redis: Any, key: str) -> list[int]:
    """The ``seq`` of every tick in ``key``, in stream order; a gap marker fails the test."""
    ids = []
    for _, fields in await redis.xrange(key):
        tick = orjson.loads(fields[b"d"])
        assert not is_gap_marker(tick), f"gap marker in {key}: {tick}"
        ids.append(tick["seq"])
    return ids


async def complete(redis: Any, key: str, sim: Simulator | Any, symbol: str, timeout: float = 30) -> list[int]:
    """Wait until ``key`` reaches the venue's newest trade (as its REST history says); return its ids, checked to
    be each id once, in order, with no hole and no gap marker."""
    target = await venue_last_trade(sim, symbol)

    async def caught_up() -> bool:
        try:
            top = await redis.xrevrange(key, count=1)
        except (RedisConnectionError, OSError):  # the first use of a pooled connection after a Redis restart
            return False
        return bool(top) and int(top[0][0].split(b"-")[1]) >= target

    await wait_for(caught_up, timeout, f"{key} reaches venue id {target}")
    ids = await stored_seqs(redis, key)
    assert ids == list(range(ids[0], ids[0] + len(ids))), f"{key}: not every id exactly once in order"
    return ids


#: a session that notices a dead link within seconds and comes back quickly (the drills' default)
FAST = SessionSettings(
    ping_interval=1.0, ping_timeout=1.0, open_timeout=2.0, stall_timeout=3.0, healthy_after=2.0,
    backoff_base=0.05, backoff_cap=1.0,
)


class Running:
    """An ingestor started by :func:`run_ingestor` and the task running it."""

    def __init__(self, ingestor: Ingestor, task: asyncio.Task[None]) -> None:
        self.ingestor = ingestor
        self.task = task


@contextlib.asynccontextmanager
async def ingestor_running(ing: Ingestor) -> AsyncIterator[None]:
    """``ing`` runs for the block; then it is cancelled and must end by that cancellation."""
    task = asyncio.create_task(ing.run())
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.fixture(name="run_ingestor")
async def run_ingestor_fixture(aredis: aioredis.Redis) -> AsyncIterator[Any]:
    """Starts ingestors on the test's loop (``await run_ingestor(settings)``); each is stopped, bounded, at the end."""
    running: list[Running] = []

    async def start(s: IngestSettings) -> Ingestor:
        ing = Ingestor(s, redis=aredis)
        running.append(Running(ing, asyncio.create_task(ing.run())))
        await asyncio.wait_for(ing.started.wait(), 10)
        return ing

    yield start
    for r in running:
        r.task.cancel()
        # A stop is bounded (the flush at exit has its own timeouts): one that is not names where each task waits.
        done, _ = await asyncio.wait([r.task], timeout=60)
        if not done:  # pragma: no cover - a stop that hangs is a defect; its stacks say where
            raise AssertionError(f"the ingestor did not stop within 60 s of its cancellation:\n{_task_stacks()}")
        try:
            await r.task
        except asyncio.CancelledError:
            pass
        else:  # pragma: no cover - the ingestor never returns on its own
            raise AssertionError("ingestor returned")


def _task_stacks() -> str:
    import io

    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=out)
    return out.getvalue()


async def until_live(ing: Ingestor, timeout: float = 15.0) -> None:
    """Wait until every session of ``ing`` is live."""
    async def live() -> bool:
        return bool(ing.sessions) and all(s.state is SessionState.LIVE for s in ing.sessions)

    await wait_for(live, timeout, "every session live")


class StateLog(logging.Handler):
    """Collects the sessions' state transitions (the JSON log's fields) with a monotonic stamp."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[float, dict[str, Any]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            self.records.append((time.monotonic(), {"event": record.getMessage(), **fields}))


@pytest.fixture(name="state_log")
def state_log_fixture() -> Any:
    handler = StateLog()
    logger = logging.getLogger("market")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


# -- the connection drills' steps -----------------------------------------------------------------------------------


async def ride_out_close_storm(ing: Ingestor) -> None:
    """Live, then 15 reconnects after the venue's closes (every 4 s: about a minute), then live again."""
    await until_live(ing)

    async def fifteen_closes() -> bool:  # the simulator closes every connection every 4 s: about a minute
        return ing.stats().reconnects >= 15

    await wait_for(fifteen_closes, 180, "15 reconnects after the venue's closes")
    await until_live(ing)


def assert_close_storm_ridden(state_log: StateLog, ing: Ingestor, counts: dict[str, int]) -> None:
    """Each close backed off, never longer than the cap; the streams kept filling throughout."""
    delays = [f["delay_s"] for _, f in state_log.records if f.get("state") == "backing_off"]
    assert len(delays) >= 15, delays
    assert max(delays) <= FAST.backoff_cap
    assert ing.stats().reconnects >= 15
    assert all(n > 1000 for n in counts.values()), counts


async def stall_noticed_while_silent(ing: Ingestor, sim: Any, state_log: StateLog) -> None:
    """The venue keeps the socket and goes silent for an hour: the session drops the link by itself (our ping's
    timeout or the no-frame watchdog) while the venue is still silent; then the venue speaks again and the
    session is live."""
    await until_live(ing)
    mark = len(state_log.records)
    sim.stall(3600.0)  # ends only when cleared below: nothing but the session's own checks can end the link

    async def detected() -> bool:
        return any(f.get("state") == "backing_off" for _, f in state_log.records[mark:])

    await wait_for(detected, 60, "stall detected")
    assert sim.stalled, "noticed while the venue was still silent"
    after = [f for _, f in state_log.records[mark:]]
    down = next(f for f in after if f.get("state") == "backing_off")
    by_watchdog = any(f["event"] == "connection_stalled" for f in after[: after.index(down)])
    by_ping = "ping" in str(down.get("reason", "")).lower()
    # Our ping (every 1 s, 1 s to answer) or the no-frame watchdog (3 s): nothing else ends a silent link.
    assert by_watchdog or by_ping, down
    sim.clear_faults()
    await until_live(ing, 20)


async def rotations(ing: Ingestor, n: int, what: str) -> None:
    """Live, then wait until the sessions rotated ``n`` times in all."""
    await until_live(ing)

    async def rotated() -> bool:
        return sum(s.rotations for s in ing.sessions) >= n

    await wait_for(rotated, 20, what)


async def bad_frames_seen(ing: Ingestor, sim: Any, timeout: float) -> None:
    """Live, then the venue sends malformed, duplicate and out-of-order frames until the ingestor counted some
    of each kind, then clean ones again."""
    await until_live(ing)
    sim.set_fault_rates(malformed=0.02, duplicate=0.05, out_of_order=0.05)

    async def faults_seen() -> bool:
        st = ing.stats()
        return st.malformed >= 5 and ing.sequencer.stats().duplicates >= 5

    await wait_for(faults_seen, timeout, "malformed and duplicate frames seen")
    sim.clear_faults()


def log_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of ``market ingest``'s log."""
    return [orjson.loads(x) for x in path.read_bytes().splitlines() if x.startswith(b"{")]


def log_ts(x: dict[str, Any]) -> float:
    """A log line's ``ts`` as a wall clock time."""
    return time.mktime(time.strptime(x["ts"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone + float(x["ts"][19:-1])


class BlackHoleLog:
    """What ``market ingest``'s log says of a black-holed link cut at ``wall_cut`` and restored at
    ``wall_restored``, checked: no error, the cut noticed by our ping or the no-frame watchdog, and what was
    made behind it backfilled whole."""

    def __init__(self, path: Path, wall_cut: float, wall_restored: float) -> None:
        lines = log_lines(path)
        assert not [x for x in lines if x["level"] in ("error", "critical") or "exception" in x], lines[-5:]
        down = [x for x in lines
                if x["event"] == "session_state" and x["state"] == "backing_off" and log_ts(x) >= wall_cut]
        assert down, "the cut was never noticed"
        #: seconds from the cut until the session backed off
        self.detection = log_ts(down[0]) - wall_cut
        # Noticed by our ping (2 s interval, 3 s to answer) or the no-frame watchdog (6 s), whichever is first:
        # nothing else ends a black-holed link (the venue's close never arrives).
        watchdog = [x for x in lines if x["event"] == "connection_stalled" and log_ts(x) >= wall_cut]
        assert ("ping" in str(down[0].get("reason", "")).lower()
                or (watchdog and log_ts(watchdog[0]) <= log_ts(down[0]))), down[0]
        relive = [x for x in lines
                  if x["event"] == "session_state" and x["state"] == "live" and log_ts(x) >= wall_restored]
        #: seconds from the restore until the session was live again
        self.reconnect = log_ts(relive[0]) - wall_restored if relive else float("nan")
        self.repaired = [x for x in lines if x["event"] in ("gap_repaired", "gap_partly_repaired")]
        assert self.repaired and all(x["event"] == "gap_repaired" for x in self.repaired), self.repaired
        #: trades fetched over REST by the repairs
        self.fetched = sum(x["fetched"] for x in self.repaired)

    def summary(self, cut_s: float, healed_s: float, run_s: float) -> str:
        """One line for the drill's output: how long the link was cut, how soon it was noticed, live again and
        complete again, and what the repairs fetched."""
        return (
            f"black-hole {cut_s:.0f} s: detected after {self.detection:.1f} s; "
            f"live again {self.reconnect:.1f} s after the link returned; "
            f"complete {healed_s:.1f} s after it returned; "
            f"{self.fetched} trades backfilled over REST in {len(self.repaired)} repairs; {run_s:.0f} s run"
        )


#: ``market ingest``'s session in the black-hole drills: our ping every 2 s (3 s to answer), the no-frame
#: watchdog at 6 s
BLACK_HOLE_CONFIG = (
    "[session]\nping_interval = 2.0\nping_timeout = 3.0\nstall_timeout = 6.0\nopen_timeout = 3.0\n"
    "backoff_cap = 5.0\n"
)


@contextlib.asynccontextmanager
async def market_ingest(args: list[str], redis_url: str, prefix: str,
                        log_path: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``market ingest`` with ``args`` as its own process, on ``redis_url`` under ``prefix``, its log in
    ``log_path``; terminated after the block (and waited for, 15 s at most)."""
    env = {**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}
    with open(log_path, "wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "ingest", *args,
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )
        try:
            yield proc
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


async def black_hole_until_noticed(proxy: Any, sim: Any, symbol: str, log_path: Path, behind: int) -> None:
    """Black-hole the link through ``proxy`` until the ingestor noticed the cut (its log at ``log_path`` says it
    backs off) and the venue made ``behind`` more trades of ``symbol`` that it could not send."""
    at_cut = await venue_last_trade(sim, symbol)
    proxy.blackhole()

    async def noticed_and_traded_on() -> bool:
        noticed = any(x["event"] == "session_state" and x["state"] == "backing_off" for x in log_lines(log_path))
        return noticed and await venue_last_trade(sim, symbol) >= at_cut + behind

    await wait_for(noticed_and_traded_on, 120, f"the cut noticed and {behind} trades made behind it")
