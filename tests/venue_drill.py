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
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
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


async def venue_last_trade(sim: Simulator | Any, symbol: str) -> int:
    """The newest trade id the venue has made for ``symbol``, as its REST history says (the table above)."""
    query, read = _NEWEST_TRADE[venue_of(sim)]

    def get() -> Any:
        with urllib.request.urlopen(sim.rest_url + query.format(symbol=symbol), timeout=5) as r:
            return json.loads(r.read())

    return read(await asyncio.to_thread(get))


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
