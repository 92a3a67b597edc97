"""Real order-book captures (tests/fixtures, see its README): per symbol, the REST snapshot recorded during the
capture and the venue's depth diffs in arrival order, with Binance's rules for which diffs follow the snapshot.
And the Redis fixtures the SDK's tests share: ``rc``, a client of the Redis at ``MARKET_REDIS_URL``, and ``pfx``,
a key prefix whose keys are deleted after the test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
REDIS_URL = os.environ.get("MARKET_REDIS_URL", "redis://127.0.0.1:6379/0")


@dataclass(frozen=True)
class DepthCapture:
    """One symbol's snapshot (``lastUpdateId``, bids, asks) and its ``depthUpdate`` payloads in arrival order."""

    symbol: str
    futures: bool
    last_update_id: int
    bids: list[list[str]]
    asks: list[list[str]]
    #: every depthUpdate ``data`` of the symbol, with ``recv_us`` (the recorder's receive time) added
    diffs: list[dict[str, Any]]

    def continuous(self) -> list[dict[str, Any]]:
        """The diffs to apply after the snapshot, by the venue's documented rules, each checked to follow.

        Spot: drop ``u <= lastUpdateId``; the first kept has ``U <= lastUpdateId + 1 <= u``, each later one
        ``U == previous u + 1``.  Futures: drop ``u < lastUpdateId``; the first kept has ``U <= lastUpdateId <= u``,
        each later one ``pu == previous u``.  A diff that does not follow fails the test, naming it.
        """
        last = self.last_update_id
        floor = last if self.futures else last + 1
        kept = [d for d in self.diffs if d["u"] >= floor]
        prev: int | None = None
        for d in kept:
            if prev is None:
                if self.futures:
                    assert d["U"] <= last <= d["u"], (self.symbol, last, d["U"], d["u"])
                else:
                    assert d["U"] <= last + 1 <= d["u"], (self.symbol, last, d["U"], d["u"])
            elif self.futures:
                assert d["pu"] == prev, (self.symbol, "pu", d["pu"], "previous u", prev)
            else:
                assert d["U"] == prev + 1, (self.symbol, "U", d["U"], "previous u", prev)
            prev = d["u"]
        return kept


def load_depth_captures(base: str, futures: bool) -> list[DepthCapture]:
    books: dict[str, tuple[int, list[list[str]], list[list[str]]]] = {}
    for line in (FIXTURES / f"{base}.depth.jsonl").read_bytes().splitlines():
        row = orjson.loads(line)
        symbol = row["url"].split("symbol=")[1].split("&")[0]
        body = orjson.loads(row["body"])
        books[symbol] = (body["lastUpdateId"], body["bids"], body["asks"])
    diffs: dict[str, list[dict[str, Any]]] = {s: [] for s in books}
    for line in (FIXTURES / f"{base}.jsonl").read_bytes().splitlines():
        row = orjson.loads(line)
        data = orjson.loads(row["frame"]).get("data")
        if isinstance(data, dict) and data.get("e") == "depthUpdate" and data["s"] in diffs:
            data["recv_us"] = round(row["recv_ts"] * 1_000_000)
            diffs[data["s"]].append(data)
    return [DepthCapture(s, futures, *books[s], diffs[s]) for s in books]


@pytest.fixture(
    scope="session",
    params=[("binance-spot-2021-10-12", False), ("binance-coinm-2021-07-22", True)],
    ids=["spot", "coinm"],
)
def depth_captures(request: pytest.FixtureRequest) -> list[DepthCapture]:
    """Every symbol of one capture (spot: 4 symbols; COIN-M futures: 10)."""
    base, futures = request.param
    return load_depth_captures(base, futures)


@pytest.fixture
async def rc() -> AsyncIterator[aioredis.Redis]:
    """A client of the Redis at ``MARKET_REDIS_URL``; the test fails when none answers."""
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (rexc.RedisError, OSError):
        pytest.fail(f"no Redis answers at {REDIS_URL}")
    yield client
    await client.aclose()


@pytest.fixture
async def pfx(rc: aioredis.Redis) -> AsyncIterator[str]:
    """A unique key prefix; its keys, and those of its copy (``<prefix>copy``), are deleted after the test."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    yield prefix
    keys = [k async for k in rc.scan_iter(match=f"{prefix}:*", count=1000)]
    keys += [k async for k in rc.scan_iter(match=f"{prefix}copy:*", count=1000)]
    if keys:
        await rc.delete(*keys)
