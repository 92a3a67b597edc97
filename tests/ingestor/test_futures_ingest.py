"""Binance futures through a running ingestor: COIN-M order books by the futures rule, USD-M ticks, USD-M repair.

The order book tests replay the depth frames of the real COIN-M capture (``dstream``; ``depthUpdate`` with ``U``,
``u`` and ``pu``, the fields USD-M sends too) through an in-memory connection, answer the snapshot requests
(``/dapi/v1/depth``) from the recorded snapshots, and check every stored entry against the test's own model of each
book: plain dicts of Decimal built from the recorded snapshot and the recorded diffs by Binance's futures rule (drop
``u < lastUpdateId``; the first diff applied has ``U <= lastUpdateId <= u``; then each ``pu`` is the previous
``u``), never the ingestor's DepthSync or Book.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from captured_books import (
    FIXTURES,
    QUICK_SESSION,
    Diff,
    Run,
    VenueModel,
    as_sides,
    check_stream,
    last_ids,
    load_diffs,
    load_snapshots,
    reply,
    running,
    stored,
    until,
    wait_stored,
)

from consumer_sdk.core.keys import stream_key
from consumer_sdk.core.tick import decode_tick, is_gap_marker
from ingestor.binance_coinm import BINANCE_COINM
from ingestor.binance_usdm import BINANCE_USDM_MARKET, BINANCE_USDM_PUBLIC
from ingestor.config import IngestSettings
from ingestor.repair import RepairSettings
from ingestor.rest import VenueRest
from ingestor.service import Ingestor

FRAMES = FIXTURES / "binance-coinm-2021-07-22.jsonl"
VENUE = "binance_coinm"
SNAPSHOT_BODIES = load_snapshots(FIXTURES / "binance-coinm-2021-07-22.depth.jsonl", "/dapi/v1/depth")
SYMBOLS = tuple(sorted(SNAPSHOT_BODIES))


def coinm_model(diffs: list[Diff]) -> VenueModel:
    """The COIN-M venue's books, by the futures rule; its snapshot bodies carry ``E``, ``T``, ``symbol``, ``pair``."""
    return VenueModel(SNAPSHOT_BODIES, diffs, futures=True, path="/dapi/v1/depth", extra=lambda symbol: {
        "E": 1626916404580, "T": 1626916404574, "symbol": symbol, "pair": symbol.split("_")[0]})


def coinm_settings(prefix: str) -> IngestSettings:
    return IngestSettings(
        venue=VENUE, url="ws://venue.test:9443", rest_url="http://venue.test", symbols=SYMBOLS,
        channels=("depth",), prefix=prefix, spill_dir="", session=QUICK_SESSION,
    )


async def replay(run: Run, venue: VenueModel, diffs: list[Diff], skip: int | None = None) -> None:
    """Feed every diff to the connection, each handed to the venue model first; the one at ``skip`` is handed
    (the venue applied it) but never delivered."""
    link = await run.live()
    assert link.url == "ws://venue.test:9443/stream"
    if skip is not None:
        await run.feed(link, diffs[:skip], venue)
        venue.hand(diffs[skip])
        diffs = diffs[skip + 1:]
    await run.feed(link, diffs, venue)


# -- COIN-M order books by the futures rule -----------------------------------------------------------------------


@pytest.mark.slow
async def test_the_coinm_capture_is_stored_by_the_futures_rule_and_rebuilds_to_the_venues_book(
    aredis: aioredis.Redis, prefix: str
) -> None:
    diffs = load_diffs(FRAMES)
    venue = coinm_model(diffs)
    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(venue.answer))
    async with running(coinm_settings(prefix), aredis, depth_rest=rest) as run:
        ing = run.ingestor
        assert ing.depth is not None and ing.depth.link == "prev", "diffs stored linked by pu (the futures rule)"
        assert ing.depth_fetcher is not None and ing.depth_fetcher.venue is BINANCE_COINM
        await replay(run, venue, diffs)
        await wait_stored(aredis, prefix, VENUE, last_ids(diffs))
        assert ing.depth.resyncs == {}, "zero resyncs: the capture is continuous"
        for symbol in SYMBOLS:
            live = ing.book(symbol)
            assert live is not None
            assert as_sides(live.levels()) == venue.books[symbol][last_ids(diffs)[symbol]]
    for symbol in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, VENUE, symbol), venue, VENUE, symbol)
        assert reasons[0] == "start" and not [r for r in reasons if r.startswith("resync")], reasons
    assert sorted(venue.requests) == sorted(SYMBOLS), "one snapshot a book"


@pytest.mark.slow
async def test_a_removed_coinm_diff_resyncs_that_book_once(aredis: aioredis.Redis, prefix: str) -> None:
    diffs = load_diffs(FRAMES)
    venue = coinm_model(diffs)
    symbol = "ETHUSD_210924"
    own = [i for i, d in enumerate(diffs) if d.symbol == symbol]
    gone = own[len(own) // 2]
    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(venue.answer))
    async with running(coinm_settings(prefix), aredis, depth_rest=rest) as run:
        ing = run.ingestor
        await replay(run, venue, diffs, skip=gone)
        await wait_stored(aredis, prefix, VENUE, last_ids(diffs))
        assert ing.depth is not None and ing.depth.resyncs == {(symbol, "gap"): 1}
    for other in SYMBOLS:
        reasons = check_stream(await stored(aredis, prefix, VENUE, other), venue, VENUE, other)
        resyncs = [r for r in reasons if r.startswith("resync")]
        assert resyncs == (["resync:gap"] if other == symbol else []), (other, reasons)
    entries = await stored(aredis, prefix, VENUE, symbol)
    assert diffs[gone].last not in {e.seq for e in entries if not e.is_snapshot}, "the missing diff is not stored"
    assert venue.requests.count(symbol) == 2 and len(venue.requests) == len(SYMBOLS) + 1


# -- USD-M ticks and repair ---------------------------------------------------------------------------------------

T0_MS = 1_700_000_000_000


def agg_trade(a: int, symbol: str = "BTCUSDT") -> bytes:
    return orjson.dumps({"stream": f"{symbol.lower()}@aggTrade", "data": {
        "e": "aggTrade", "E": T0_MS + a, "s": symbol, "a": a, "p": f"{60000 + a}.1", "q": "0.002",
        "f": 10 * a, "l": 10 * a + 1, "T": T0_MS + a, "m": a % 2 == 0,
    }})


def agg_row(a: int) -> dict[str, Any]:
    """The ``/fapi/v1/aggTrades`` row of the aggregate trade :func:`agg_trade` sends live."""
    return {"a": a, "p": f"{60000 + a}.1", "q": "0.002", "f": 10 * a, "l": 10 * a + 1, "T": T0_MS + a,
            "m": a % 2 == 0}


def mark_price(second: int, symbol: str = "BTCUSDT") -> bytes:
    return orjson.dumps({"stream": f"{symbol.lower()}@markPrice@1s", "data": {
        "e": "markPriceUpdate", "E": T0_MS + 1000 * second, "s": symbol, "p": "60001.25000000",
        "i": "60000.10000000", "P": "60010.00000000", "r": "0.00010000", "T": T0_MS + 8 * 3600 * 1000,
    }})


def usdm_settings(prefix: str, channels: tuple[str, ...]) -> IngestSettings:
    return IngestSettings(
        venue="binance_usdm", url="ws://venue.test:9443", rest_url="http://venue.test", symbols=("BTCUSDT",),
        channels=channels, prefix=prefix, spill_dir="",
        session=QUICK_SESSION, repair=RepairSettings(hold_s=10.0),
    )


async def stored_ticks(aredis: aioredis.Redis, key: str) -> list[dict[str, Any]]:
    items: Any = await aredis.xrange(key, "-", "+")
    return [dict(decode_tick(fields[b"d"])) for _, fields in items]


async def wait_len(aredis: aioredis.Redis, key: str, n: int) -> None:
    async with asyncio.timeout(20):
        while await aredis.xlen(key) < n:
            await asyncio.sleep(0.01)  # poll Redis


async def test_a_usdm_ingestor_stores_agg_trades_and_mark_prices_under_its_venue(
    aredis: aioredis.Redis, prefix: str
) -> None:
    settings = usdm_settings(prefix, ("agg_trade", "mark_price", "book_ticker"))
    async with running(settings, aredis) as run:
        ing = run.ingestor
        # /market carries aggregate trades and mark prices, /public book tickers: one connection each
        routes = {s.venue: sorted(s.streams) for s in ing.sessions}
        assert routes == {
            BINANCE_USDM_MARKET: ["btcusdt@aggTrade", "btcusdt@markPrice@1s"],
            BINANCE_USDM_PUBLIC: ["btcusdt@bookTicker"],
        }
        links = [await run.connector.link(i) for i in range(2)]
        market = next(link for link in links if link.url.endswith("/market/stream"))
        assert {link.url for link in links} == {"ws://venue.test:9443/market/stream",
                                                "ws://venue.test:9443/public/stream"}
        await until(lambda: all(s.state.value == "live" for s in ing.sessions), "both connections live")
        market.feed([agg_trade(1), agg_trade(2), mark_price(1), agg_trade(3), mark_price(2)])
        trades = stream_key("binance_usdm", "BTCUSDT", "agg_trade", prefix)
        marks = stream_key("binance_usdm", "BTCUSDT", "mark_price", prefix)
        await wait_len(aredis, trades, 3)
        await wait_len(aredis, marks, 2)
    got = await stored_ticks(aredis, trades)
    assert [t["seq"] for t in got] == [1, 2, 3]
    assert {t["venue"] for t in got} == {"binance_usdm"} and got[0]["price"] == "60001.1"
    mp = await stored_ticks(aredis, marks)
    assert [t["seq"] for t in mp] == [T0_MS + 1000, T0_MS + 2000]
    assert mp[0] == {
        "v": 1, "venue": "binance_usdm", "symbol": "BTCUSDT", "channel": "mark_price", "seq": T0_MS + 1000,
        "ts_event": (T0_MS + 1000) * 1000, "ts_recv": mp[0]["ts_recv"], "mark_px": "60001.25000000",
        "index_px": "60000.10000000", "est_settle_px": "60010.00000000", "funding_rate": "0.00010000",
        "next_funding_time": (T0_MS + 8 * 3600 * 1000) * 1000,
    }
    assert not await aredis.exists(stream_key("binance", "BTCUSDT", "agg_trade", prefix))


async def test_a_usdm_agg_trade_gap_is_repaired_over_fapi(aredis: aioredis.Redis, prefix: str) -> None:
    asked: list[httpx.URL] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request.url)
        assert request.url.path == "/fapi/v1/aggTrades"
        start = int(request.url.params["fromId"])
        rows = [agg_row(a) for a in range(start, 7)][: int(request.url.params["limit"])]  # the venue has 1..6
        return reply(200, orjson.dumps(rows))

    rest = VenueRest("http://venue.test", transport=httpx.MockTransport(answer), venue=BINANCE_USDM_MARKET)
    async with running(usdm_settings(prefix, ("agg_trade",)), aredis, repair_rest=rest) as run:
        link = await run.live()
        link.feed([agg_trade(1), agg_trade(2), agg_trade(5), agg_trade(6)])
        key = stream_key("binance_usdm", "BTCUSDT", "agg_trade", prefix)
        await wait_len(aredis, key, 6)
    got = await stored_ticks(aredis, key)
    assert [t["seq"] for t in got] == [1, 2, 3, 4, 5, 6] and not any(is_gap_marker(t) for t in got)  # type: ignore[arg-type]
    assert (got[2]["venue"], got[2]["trade_id"], got[2]["price"]) == ("binance_usdm", 3, "60003.1"), "as fetched"
    assert [(u.path, u.params["symbol"], u.params["fromId"]) for u in asked] == [
        ("/fapi/v1/aggTrades", "BTCUSDT", "3")
    ]


@pytest.mark.parametrize("channel", ["trade", "kline_1s"])
def test_a_usdm_ingestor_refuses_a_channel_usdm_lacks(channel: str) -> None:
    from consumer_sdk.core.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{channel}.*binance_usdm"):
        Ingestor(IngestSettings(venue="binance_usdm", symbols=("BTCUSDT",), channels=(channel,), spill_dir=""))
