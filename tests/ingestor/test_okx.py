"""ingestor.okx: the real OKX v5 capture and hand-made frames, checked field by field.

Expectations are derived here from the raw frame (OKX's documented field names), never by calling the parser,
so a parser mistake cannot hide in its own output.  The books checksums are the venue's own numbers.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.sequencing import Verdict
from consumer_sdk.core.tick import BASE_FIELDS, channel_fields, decode_tick, encode_tick
from distributor.ingress import IngressQueue
from ingestor import okx
from ingestor.okx import (
    MAX_REQUEST_BYTES,
    OKX_V5,
    PARSE_REFUSALS,
    OkxV5,
    TextKeepalive,
    classify_error,
    continues,
    history_trades_to_ticks,
    okx_checksum,
    parse_frame,
    parse_message,
)
from ingestor.rest import RestRefused, RestRetryable, check_page
from ingestor.sequencer import GapReport, Sequencer
from ingestor.session import SessionSettings, VenueSession
from ingestor.venue import Heartbeat, MalformedFrame, Reply, RestCall, ServerShutdown, Venue

CAPTURE = Path(__file__).resolve().parents[1] / "fixtures" / "okx-2022-05-13.jsonl"
TS_RECV = 1_652_459_225_000_000
DEPTH_FIELDS = ("update_id", "prev_update_id", "snapshot", "bids", "asks", "checksum")


def load() -> list[tuple[int, str]]:
    """``(ts_recv in µs, raw frame text)`` for every line of the capture."""
    out = []
    for line in CAPTURE.read_text().splitlines():
        rec = orjson.loads(line)
        out.append((int(rec["recv_ts"] * 1e6), rec["frame"]))
    return out


FRAMES = load()


def pushes(channel: str) -> list[tuple[int, str, dict[str, Any]]]:
    """The capture's pushes of one OKX channel: ``(ts_recv, raw, decoded)``."""
    out = []
    for ts, raw in FRAMES:
        obj = orjson.loads(raw)
        if "data" in obj and obj["arg"]["channel"] == channel:
            out.append((ts, raw, obj))
    return out


def signed_crc(text: str) -> int:
    return int(struct.unpack("<i", struct.pack("<I", zlib.crc32(text.encode())))[0])


# -- the capture ---------------------------------------------------------------------------------------------


def test_the_capture_holds_what_its_readme_says_of_books_and_acks() -> None:
    kinds: Counter[str] = Counter()
    instruments: set[str] = set()
    for _, raw in FRAMES:
        obj = orjson.loads(raw)
        if "event" in obj:
            kinds["event:" + obj["event"]] += 1
        else:
            kinds[obj["arg"]["channel"] + ":" + obj.get("action", "push")] += 1
            instruments.add(obj["arg"]["instId"])
            assert len(obj["data"]) == 1  # one entry a push: parse_frame's one tick is all of it
    assert len(FRAMES) == 410
    assert kinds["books:snapshot"] == 3 and kinds["books:update"] == 287
    assert kinds["event:subscribe"] == 18
    assert instruments == {"BTC-USDT", "BTC-USD-220527", "UNI-USD-SWAP"}  # spot, future, swap
    # The README's table says trades 82 and tickers 46; the file holds these frames of each.
    assert (kinds["trades:push"], kinds["tickers:push"]) == (74, 28)


def test_every_trades_frame_parses_to_a_trade_tick_field_by_field() -> None:
    trades = pushes("trades")
    assert trades
    for ts, raw, obj in trades:
        d = obj["data"][0]
        want = {
            "v": 1, "venue": "okx", "symbol": obj["arg"]["instId"], "channel": "trade", "seq": int(d["tradeId"]),
            "ts_event": int(d["ts"]) * 1000, "ts_recv": ts, "trade_id": int(d["tradeId"]), "price": d["px"],
            "qty": d["sz"], "side": d["side"],
        }
        tick = parse_frame(raw, ts)
        assert tick == want, raw
        assert set(tick) == {*BASE_FIELDS, *channel_fields("trade")}  # the shape of Binance's trade tick
        assert decode_tick(encode_tick(tick)) == tick
        assert parse_frame(raw.encode(), ts) == tick


def test_every_tickers_frame_parses_to_a_book_ticker_field_by_field() -> None:
    tickers = pushes("tickers")
    assert tickers
    for ts, raw, obj in tickers:
        d = obj["data"][0]
        ms = int(d["ts"])
        want = {
            "v": 1, "venue": "okx", "symbol": obj["arg"]["instId"], "channel": "book_ticker", "seq": ms,
            "ts_event": ms * 1000, "ts_recv": ts, "bid_px": d["bidPx"], "bid_qty": d["bidSz"],
            "ask_px": d["askPx"], "ask_qty": d["askSz"], "update_id": ms,
        }
        tick = parse_frame(raw, ts)
        assert tick == want, raw
        assert set(tick) == {*BASE_FIELDS, *channel_fields("book_ticker")}


def test_every_books_frame_parses_to_a_depth_tick_field_by_field() -> None:
    books = pushes("books")
    assert len(books) == 290
    for ts, raw, obj in books:
        d = obj["data"][0]
        ms = int(d["ts"])
        want = {
            "v": 1, "venue": "okx", "symbol": obj["arg"]["instId"], "channel": "depth", "seq": ms,
            "ts_event": ms * 1000, "ts_recv": ts, "update_id": ms, "prev_update_id": None,
            "snapshot": obj["action"] == "snapshot", "bids": [level[:2] for level in d["bids"]],
            "asks": [level[:2] for level in d["asks"]], "checksum": d["checksum"],
        }
        assert parse_frame(raw, ts) == want, raw[:200]


def test_the_capture_predates_sequence_ids_so_its_books_continue_by_checksum_only() -> None:
    """OKX added seqId/prevSeqId to ``books`` after May 2022: no message of the capture has them, so continuity
    across it is shown by the venue's checksums (below), and ``continues`` says it cannot tell."""
    for ts, raw, obj in pushes("books"):
        assert "seqId" not in obj["data"][0] and "prevSeqId" not in obj["data"][0]
        tick: Any = parse_frame(raw, ts)
        assert continues(None if tick["snapshot"] else 1, tick) is (True if tick["snapshot"] else None)


def test_the_sequencer_takes_every_tick_of_the_capture_in_order() -> None:
    sequencer = Sequencer()
    verdicts: Counter[Any] = Counter()
    for ts, raw in FRAMES:
        tick = parse_frame(raw, ts)
        if isinstance(tick, dict):
            verdict = sequencer.check(tick)
            verdicts[(tick["channel"], type(verdict) if isinstance(verdict, GapReport) else verdict)] += 1
    assert verdicts == {("trade", Verdict.OK): 74, ("book_ticker", Verdict.OK): 28, ("depth", Verdict.OK): 290}


# -- sequence ids (OKX since late 2022) ---------------------------------------------------------------------

PRICES = st.integers(1, 200).map(lambda n: f"{100 + n / 10:g}")


def test_a_quiet_books_keepalive_carries_nothing_and_continuity_holds_across_it() -> None:
    frame = {"arg": {"channel": "books", "instId": "BTC-USDT"}, "action": "update",
             "data": [{"asks": [], "bids": [], "ts": "1700000000000", "checksum": 0, "prevSeqId": 5, "seqId": 5}]}
    assert parse_frame(orjson.dumps(frame), TS_RECV) is None
    frame["data"][0]["seqId"] = 6  # type: ignore[index]
    tick: Any = parse_frame(orjson.dumps(frame), TS_RECV)
    assert (tick["seq"], tick["update_id"], tick["prev_update_id"], tick["bids"]) == (6, 6, 5, [])


# -- the checksum ------------------------------------------------------------------------------------------


def test_checksum_interleaves_as_the_venue_documents() -> None:
    bids = [["3366.1", "7", "0", "3"], ["3366", "6", "3", "4"]]
    asks = [["3366.8", "9", "10", "3"], ["3368", "8", "3", "4"]]
    assert okx_checksum(bids, asks) == signed_crc("3366.1:7:3366.8:9:3366:6:3368:8")
    assert okx_checksum(bids[:1], asks) == signed_crc("3366.1:7:3366.8:9:3368:8")
    assert okx_checksum(bids, []) == signed_crc("3366.1:7:3366:6")
    assert okx_checksum([], []) == signed_crc("")


@given(
    bids=st.lists(st.tuples(PRICES, st.sampled_from(["1", "0.5", "10"])).map(list), max_size=40),
    asks=st.lists(st.tuples(PRICES, st.sampled_from(["2", "0.25"])).map(list), max_size=40),
)
def test_checksum_covers_the_top_25_only_and_is_signed_32_bit(bids: list[list[str]], asks: list[list[str]]) -> None:
    value = okx_checksum(bids, asks)
    assert -(1 << 31) <= value < (1 << 31)
    full_bids, full_asks = [*bids, *[["1", "1"]] * 25][:25], [*asks, *[["9", "9"]] * 25][:25]
    assert okx_checksum([*full_bids, ["2", "2"]], [*full_asks, ["8", "8"]]) == okx_checksum(full_bids, full_asks)
    parts = []
    for i in range(max(min(len(bids), 25), min(len(asks), 25))):
        parts += bids[i] if i < min(len(bids), 25) else []
        parts += asks[i] if i < min(len(asks), 25) else []
    assert value == signed_crc(":".join(parts))


# -- replies, notices, heartbeat ---------------------------------------------------------------------------


def test_subscribe_acks_of_the_capture_become_replies_naming_the_stream() -> None:
    acks = [(ts, raw) for ts, raw in FRAMES if raw.startswith('{"event"')]
    assert len(acks) == 18
    for ts, raw in acks:
        arg = orjson.loads(raw)["arg"]
        stream = f"{arg['channel']}:{arg['instId']}"
        assert parse_frame(raw, ts) == Reply(None, result={"event": "subscribe", "stream": stream})
        assert OKX_V5.split_stream(stream)[0] == arg["instId"]


@pytest.mark.parametrize(("frame", "want"), [
    ({"id": "7", "event": "subscribe", "arg": {"channel": "books", "instId": "BTC-USDT"}, "connId": "a4d3ae55"},
     Reply(7, result={"event": "subscribe", "stream": "books:BTC-USDT"})),
    ({"id": "8", "event": "unsubscribe", "arg": {"channel": "trades", "instId": "BTC-USDT-SWAP"}, "connId": "x"},
     Reply(8, result={"event": "unsubscribe", "stream": "trades:BTC-USDT-SWAP"})),
    ({"event": "error", "code": "60012", "msg": "Invalid request: {\"op\": \"subscribe\"}", "connId": "a4d3ae55"},
     Reply(None, error={"code": "60012", "msg": "Invalid request: {\"op\": \"subscribe\"}"})),
    ({"id": "9", "event": "error", "code": "60018", "msg": "Wrong URL or channel:books,instId:X doesn't exist"},
     Reply(9, error={"code": "60018", "msg": "Wrong URL or channel:books,instId:X doesn't exist"})),
    ({"event": "notice", "code": "64008", "msg": "The connection will soon be closed for a service upgrade."},
     ServerShutdown(TS_RECV)),
    ({"event": "notice", "code": "64099", "msg": "something else"}, None),
    ({"event": "channel-conn-count", "channel": "orders", "connCount": "2", "connId": "abc"}, None),
])
def test_events_become_replies_and_notices(frame: dict[str, Any], want: object) -> None:
    assert parse_frame(orjson.dumps(frame), TS_RECV) == want


def test_errors_are_classified_by_whether_asking_again_can_help() -> None:
    def reply(code: str) -> Reply:
        return Reply(None, error={"code": code, "msg": "m"})

    assert classify_error(Reply(1, result={"event": "subscribe", "stream": "trades:BTC-USDT"})) is None
    for code in ("60012", "60018", "64002"):
        failure = classify_error(reply(code))
        assert failure is not None and failure.fatal and code in failure.message
    for code, alarm in (("60014", False), ("63999", False), ("69999", True)):
        failure = classify_error(reply(code))
        assert failure is not None and not failure.fatal and failure.alarm is alarm


def test_the_text_pong_is_taken_and_carries_nothing() -> None:
    assert parse_frame("pong", TS_RECV) is None
    assert parse_frame(b"pong", TS_RECV) is None
    assert parse_message("pong", TS_RECV) is None
    with pytest.raises(MalformedFrame) as exc:
        parse_frame("ping", TS_RECV)  # the venue never sends it; it is not JSON
    assert exc.value.kind == "malformed"


def test_text_keepalive_pings_after_a_quiet_spell_and_drops_without_an_answer() -> None:
    k = TextKeepalive(100.0, interval=20.0, timeout=10.0)
    assert (k.due(119.9), k.wait(110.0)) == (None, 10.0)
    k.received(115.0)  # any message resets the spell
    assert k.due(134.9) is None and k.due(135.0) == "ping"
    k.sent(135.0)
    assert (k.due(144.9), k.wait(140.0)) == (None, 5.0)
    assert k.due(145.0) == "drop"
    k.received(144.0)  # the pong (or any message) came in time
    assert k.due(150.0) is None and k.wait(150.0) == 14.0
    with pytest.raises(ValueError, match="30 s"):
        TextKeepalive(0.0, interval=30.0)


def test_the_session_carries_out_the_text_heartbeat_within_the_venues_silence_limit() -> None:
    assert OKX_V5.heartbeat is Heartbeat.TEXT_PING
    VenueSession(
        ws_base=okx.WS_BASE, streams=["trades:BTC-USDT"], ingress=IngressQueue(8), sequencer=Sequencer(),
        ingest_latency=LatencyHistogram(), venue=OKX_V5,
    )
    with pytest.raises(ConfigError, match="30 s"):
        VenueSession(
            ws_base=okx.WS_BASE, streams=["trades:BTC-USDT"], ingress=IngressQueue(8), sequencer=Sequencer(),
            ingest_latency=LatencyHistogram(), venue=OKX_V5, settings=SessionSettings(ping_interval=30.0),
        )


# -- hostile frames ---------------------------------------------------------------------------------------

TRADE = {"instId": "BTC-USDT", "tradeId": "338476307", "px": "30236", "sz": "0.0002", "side": "buy",
         "ts": "1652459224818"}
BBO = {"asks": [["30228.7", "0.5", "0", "2"]], "bids": [["30228.6", "1.25", "0", "3"]], "ts": "1700000000000",
       "seqId": 123456}
LEVELS = {"asks": [["30228.7", "0.5", "0", "2"]], "bids": [["30228.6", "1.25", "0", "3"]], "ts": "1700000000000",
          "checksum": 0}


def push(channel: str, entry: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"arg": {"channel": channel, "instId": "BTC-USDT"}, **extra, "data": [entry]})


HOSTILE = [
    (b"{not json", "malformed"),
    (b"[1, 2]", "malformed"),
    (b'"text"', "malformed"),
    (b"\xff\xfe{}", "invalid_utf8"),
    (b"[" * 2000 + b"]" * 2000, "too_deep"),
    (b'{"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": [{"px": NaN}]}', "bad_number"),
    (b"{}", "malformed"),
    (b'{"event": 5}', "malformed"),
    (b'{"event": "error", "code": 60012}', "malformed"),
    (b'{"event": "subscribe", "arg": "trades"}', "malformed"),
    (b'{"arg": {"channel": "candle1m", "instId": "BTC-USDT"}, "data": [{}]}', "unknown_channel"),
    (b'{"arg": {"channel": "books5", "instId": "BTC-USDT"}, "data": [{}]}', "unknown_channel"),
    (b'{"arg": {"instId": "BTC-USDT"}, "data": [{}]}', "malformed"),
    (b'{"arg": {"channel": "trades", "instId": "BTC USDT"}, "data": [{}]}', "malformed"),
    (b'{"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": []}', "malformed"),
    (b'{"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": {"tradeId": "1"}}', "malformed"),
    (b'{"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": ["x"]}', "malformed"),
    (push("trades", {**TRADE, "tradeId": 338476307}), "malformed"),
    (push("trades", {**TRADE, "tradeId": "-5"}), "bad_value"),
    (push("trades", {**TRADE, "tradeId": "1e9"}), "bad_number"),
    (push("trades", {**TRADE, "tradeId": "9" * 30}), "bad_number"),
    (push("trades", {**TRADE, "tradeId": "abc"}), "malformed"),
    (push("trades", {**TRADE, "ts": "9" * 19}), "bad_number"),
    (push("trades", {**TRADE, "px": "0"}), "bad_value"),
    (push("trades", {**TRADE, "px": "-30236"}), "bad_value"),
    (push("trades", {**TRADE, "px": 30236.5}), "malformed"),
    (push("trades", {**TRADE, "sz": "NaN"}), "bad_number"),
    (push("trades", {**TRADE, "sz": "1e-5"}), "bad_number"),
    (push("trades", {**TRADE, "side": "long"}), "malformed"),
    (push("trades", {**TRADE, "instId": "ETH-USDT"}), "malformed"),
    (push("trades", {k: v for k, v in TRADE.items() if k != "px"}), "malformed"),
    (push("trades", {**TRADE, "count": "3"}), "aggregated"),
    (push("trades", {**TRADE, "count": "0"}), "bad_value"),
    (orjson.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": [TRADE, TRADE]}), "batched"),
    (push("bbo-tbt", {**BBO, "asks": []}), "bad_value"),
    (push("bbo-tbt", {**BBO, "bids": [["30228.6"]]}), "malformed"),
    (push("bbo-tbt", {**BBO, "seqId": "123456"}), "malformed"),
    (push("tickers", {"bidPx": "1", "bidSz": "0", "askPx": "2", "askSz": "1", "ts": "1700000000000"}), "bad_value"),
    (push("books", LEVELS), "malformed"),  # no action
    (push("books", LEVELS, action="partial"), "malformed"),
    (push("books", {**LEVELS, "bids": [["abc", "1", "0", "1"]]}, action="update"), "bad_number"),
    (push("books", {**LEVELS, "bids": [["30228.6", "-1", "0", "1"]]}, action="update"), "bad_value"),
    (push("books", {**LEVELS, "bids": [["30228.6"]]}, action="update"), "malformed"),
    (push("books", {**LEVELS, "bids": [[30228.6, 1]]}, action="update"), "malformed"),
    (push("books", {**LEVELS, "bids": ["30228.6:1"]}, action="update"), "malformed"),
    (push("books", {**LEVELS, "bids": {"30228.6": "1"}}, action="update"), "malformed"),
    (push("books", {**LEVELS, "checksum": 1 << 40}, action="update"), "bad_number"),
    (push("books", {**LEVELS, "checksum": "-914047754"}, action="update"), "malformed"),
    (push("books", {**LEVELS, "seqId": 5, "prevSeqId": -2}, action="update"), "bad_value"),
    (push("books", {**LEVELS, "seqId": 5}, action="update"), "malformed"),
]


@pytest.mark.parametrize(("raw", "kind"), HOSTILE, ids=[f"{i}-{k}" for i, (_, k) in enumerate(HOSTILE)])
def test_hostile_frames_are_refused_with_their_kind(raw: bytes, kind: str) -> None:
    assert kind in PARSE_REFUSALS
    with pytest.raises(MalformedFrame) as exc:
        parse_frame(raw, TS_RECV)
    assert exc.value.kind == kind, str(exc.value)


def test_a_push_of_several_entries_is_refused_whole_and_parse_message_takes_them_all() -> None:
    second = {**TRADE, "tradeId": "338476308"}
    raw = orjson.dumps({"arg": {"channel": "trades", "instId": "BTC-USDT"}, "data": [TRADE, second]})
    ticks = parse_message(raw, TS_RECV)
    assert isinstance(ticks, list) and [t["seq"] for t in ticks] == [338476307, 338476308]
    assert parse_message(push("trades", TRADE), TS_RECV) == [parse_frame(push("trades", TRADE), TS_RECV)]
    assert parse_message(b'{"event": "subscribe", "arg": {"channel": "trades", "instId": "BTC-USDT"}}', 0) == Reply(
        None, result={"event": "subscribe", "stream": "trades:BTC-USDT"})


def test_current_format_bbo_tbt_and_single_trade_counts() -> None:
    tick: Any = parse_frame(push("bbo-tbt", BBO), TS_RECV)
    assert (tick["channel"], tick["seq"], tick["update_id"], tick["bid_px"], tick["bid_qty"], tick["ask_px"],
            tick["ask_qty"], tick["ts_event"]) == (
        "book_ticker", 123456, 123456, "30228.6", "1.25", "30228.7", "0.5", 1_700_000_000_000_000)
    assert set(tick) == {*BASE_FIELDS, *channel_fields("book_ticker")}
    legacy: Any = parse_frame(push("bbo-tbt", {k: v for k, v in BBO.items() if k != "seqId"}), TS_RECV)
    assert legacy["seq"] == legacy["update_id"] == 1_700_000_000_000
    one: Any = parse_frame(push("trades", {**TRADE, "count": "1", "source": "0", "seqId": 77}), TS_RECV)
    assert one == parse_frame(push("trades", TRADE), TS_RECV)
    assert parse_frame(push("trades-all", TRADE), TS_RECV) == one


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(field=st.sampled_from(["tradeId", "px", "sz", "side", "ts", "instId", "count"]), value=JSON)
def test_any_value_in_a_trade_field_parses_or_is_refused(field: str, value: Any) -> None:
    try:
        tick = parse_frame(push("trades", {**TRADE, field: value}), TS_RECV)
    except MalformedFrame as exc:
        assert exc.kind in PARSE_REFUSALS
    else:
        assert isinstance(tick, dict) and decode_tick(encode_tick(tick)) == tick


@given(raw=st.binary(max_size=200) | JSON.map(orjson.dumps) | st.builds(
    lambda ch, entry, action: orjson.dumps({"arg": {"channel": ch, "instId": "BTC-USDT"}, "action": action,
                                            "data": [entry]}),
    st.sampled_from(["trades", "bbo-tbt", "tickers", "books"]), JSON, JSON))
def test_nothing_the_venue_sends_raises_but_a_refusal(raw: bytes) -> None:
    try:
        parse_frame(raw, TS_RECV)
    except MalformedFrame as exc:
        assert exc.kind in PARSE_REFUSALS


# -- the venue: names, messages, REST ------------------------------------------------------------------------


def test_it_has_every_member_of_the_venue_protocol() -> None:
    members = [n for n in vars(Venue) if not n.startswith("_")]
    assert {"name", "ws_path", "heartbeat", "parse_frame", "subscribe_requests", "backfill_call"} <= set(members)
    for name in members:
        assert hasattr(OKX_V5, name), name
    assert (OKX_V5.name, OKX_V5.ws_path) == ("okx", "/ws/v5/public")
    assert OKX_V5.parse_frame is parse_message


@pytest.mark.parametrize(("venue", "symbol", "channel", "stream"), [
    (OKX_V5, "BTC-USDT", "trade", "trades:BTC-USDT"),
    (OKX_V5, "BTC-USDT-SWAP", "book_ticker", "bbo-tbt:BTC-USDT-SWAP"),
    (OkxV5(book_ticker="tickers"), "BTC-USDT", "book_ticker", "tickers:BTC-USDT"),
    (OKX_V5, "BTC-USD-220527", "depth", "books:BTC-USD-220527"),
])
def test_stream_names_round_trip(venue: OkxV5, symbol: str, channel: str, stream: str) -> None:
    assert venue.stream_name(symbol, channel) == stream
    assert venue.split_stream(stream) == (symbol, channel)


def test_streams_not_carried_are_refused() -> None:
    for symbol, channel in (("BTC-USDT", "agg_trade"), ("BTC-USDT", "kline_1m")):
        with pytest.raises(ValueError, match="not"):
            OKX_V5.stream_name(symbol, channel)
    for stream in ("candle1m:BTC-USDT", "trades", "trades:", "trades:BTC USDT", "btcusdt@trade"):
        with pytest.raises(ValueError, match="not a stream"):
            OKX_V5.split_stream(stream)
    with pytest.raises(ValueError, match="not a stream"):
        OKX_V5.subscribe_requests(["trades:BTC-USDT", "candle1m:BTC-USDT"], 1, 10)
    with pytest.raises(ValueError, match="per_request"):
        OKX_V5.subscribe_requests(["trades:BTC-USDT"], 1, 0)
    with pytest.raises(ValueError, match="book_ticker"):
        OkxV5(book_ticker="books5")  # type: ignore[arg-type]


INST = st.from_regex(r"[A-Z0-9]{1,12}-[A-Z0-9]{1,12}(-[A-Z0-9]{1,30})?", fullmatch=True)
STREAMS = st.lists(st.builds(lambda c, i: f"{c}:{i}", st.sampled_from(["trades", "bbo-tbt", "books", "tickers"]),
                             INST), max_size=300)


@given(streams=STREAMS, first_id=st.integers(0, 10**9), per_request=st.integers(1, 300),
       op=st.sampled_from(["subscribe", "unsubscribe"]))
def test_requests_batch_every_stream_in_order_within_the_venue_limits(
    streams: list[str], first_id: int, per_request: int, op: str
) -> None:
    make = OKX_V5.subscribe_requests if op == "subscribe" else OKX_V5.unsubscribe_requests
    requests = make(streams, first_id, per_request)
    assert [r.id for r in requests] == list(range(first_id, first_id + len(requests)))
    assert [s for r in requests for s in r.streams] == streams
    for n, r in enumerate(requests):
        assert 1 <= len(r.streams) <= per_request
        assert len(r.message.encode()) <= MAX_REQUEST_BYTES
        args = [{"channel": s.partition(":")[0], "instId": s.partition(":")[2]} for s in r.streams]
        assert orjson.loads(r.message) == {"id": str(r.id), "op": op, "args": args}
        if n + 1 < len(requests):  # full: the next stream would not have fitted
            nxt = requests[n + 1].streams[0]
            arg = {"channel": nxt.partition(":")[0], "instId": nxt.partition(":")[2]}
            grown = orjson.dumps({"id": str(r.id), "op": op, "args": [*args, arg]})
            assert len(r.streams) == per_request or len(grown) > MAX_REQUEST_BYTES


def test_rest_calls() -> None:
    assert OKX_V5.backfill_call("trade", "BTC-USDT", 338476300, 1000) == RestCall(
        "/api/v5/market/history-trades", {"instId": "BTC-USDT", "type": "1", "after": 338476400, "limit": 100})
    assert OKX_V5.backfill_call("trade", "BTC-USDT", 10, 5) == RestCall(
        "/api/v5/market/history-trades", {"instId": "BTC-USDT", "type": "1", "after": 15, "limit": 5})
    assert OKX_V5.backfill_call("book_ticker", "BTC-USDT", 10, 5) is None
    assert OKX_V5.backfill_call("depth", "BTC-USDT", 10, 5) is None
    assert OKX_V5.snapshot_call("BTC-USDT", 1000) == RestCall("/api/v5/market/books", {"instId": "BTC-USDT", "sz": 400})
    assert OKX_V5.snapshot_call("BTC-USDT", 50).params == {"instId": "BTC-USDT", "sz": 50}


def live_spot_trades() -> list[Any]:
    return [parse_frame(raw, ts) for ts, raw, obj in pushes("trades") if obj["arg"]["instId"] == "BTC-USDT"]


def history_body(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"code": "0", "msg": "", "data": rows}


def test_history_rows_become_the_live_ticks_oldest_first() -> None:
    live = live_spot_trades()
    rows = [obj["data"][0] for _, _, obj in reversed(pushes("trades")) if obj["arg"]["instId"] == "BTC-USDT"]
    from_id = live[10]["seq"]
    ticks = history_trades_to_ticks(history_body(rows), "BTC-USDT", 5, from_id)
    assert ticks == [{**t, "ts_recv": 5} for t in live[10:]]
    check_page(ticks, from_id, len(rows))  # what the repairer asks of a page holds
    assert history_trades_to_ticks(history_body([]), "BTC-USDT", 5, 0) == []


def test_a_history_row_counting_several_trades_is_left_out_so_its_ids_stay_a_hole() -> None:
    older = {**TRADE, "tradeId": "338476305"}
    body = history_body([{**TRADE, "tradeId": "338476309"}, {**TRADE, "tradeId": "338476308", "count": "2"}, older])
    ticks = history_trades_to_ticks(body, "BTC-USDT", 5, 0)
    assert [t["seq"] for t in ticks] == [338476305, 338476309]


@pytest.mark.parametrize(("body", "error", "kind"), [
    ([], RestRefused, "bad_json"),
    ({"code": "0", "data": {}}, RestRefused, "bad_json"),
    ({"code": "0", "data": ["x"]}, RestRefused, "bad_json"),
    ({"code": "50011", "msg": "Rate limit reached", "data": []}, RestRetryable, "http_status"),
    ({"code": "51001", "msg": "Instrument ID does not exist", "data": []}, RestRefused, "http_status"),
    (history_body([{**TRADE, "instId": "ETH-USDT"}]), RestRefused, "wrong_symbol"),
    (history_body([{**TRADE, "px": "0"}]), RestRefused, "bad_row"),
    (history_body([{**TRADE, "count": "0"}]), RestRefused, "bad_row"),
    (history_body([{k: v for k, v in TRADE.items() if k != "ts"}]), RestRefused, "bad_row"),
    (history_body([TRADE, {**TRADE, "tradeId": "338476308"}]), RestRefused, "bad_row"),  # not newest first
    (history_body([TRADE, TRADE]), RestRefused, "bad_row"),
])
def test_history_answers_that_are_not_trades_of_the_instrument_are_refused(
    body: Any, error: type[Exception], kind: str
) -> None:
    with pytest.raises(error) as exc:
        history_trades_to_ticks(body, "BTC-USDT", 5, 0)
    assert type(exc.value) is error and exc.value.kind == kind  # type: ignore[attr-defined]
