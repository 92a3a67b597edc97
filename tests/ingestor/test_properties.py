"""Properties of the pure ingest path on hostile input: the Binance parser, the ingest pipeline, the sequencer.

- The parser (:func:`ingestor.binance.parse_frame`) on arbitrary bytes, arbitrary JSON-like text (huge
  numbers, NaN and Infinity, invalid surrogates, deep nesting) and mutations of real captured frames:
  nothing but :class:`~ingestor.venue.MalformedFrame` ever escapes, and every tick it returns is valid
  (:func:`tick_problems`: the contract's fields and types, decimal strings, ids and times within int64, a
  channel and a symbol that make a well-formed stream key).
- The pipeline (:class:`ingestor.pipeline.IngestPipeline`) on a generated venue's contiguous trade ids
  delivered in any order, with duplicates, drops, garbage frames and held streams: no event but the
  expected ones, the accepted ticks of each stream strictly increase, every id between the first and the
  last accepted is accepted once or inside a reported hole, and the duplicates and late ticks are counted.
- The sequencer (:class:`ingestor.sequencer.Sequencer` and its :class:`SeqTracker`), a stateful test
  against a plain model: verdicts, holes (at most ``MAX_HOLES``, oldest forgotten), seeds, fills, counters.
- :func:`consumer_sdk.decode_tick`, the consumer's check of a stored entry, on arbitrary bytes.

Every test is derandomized and uses no example database, so CI runs the same examples every time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from consumer_sdk import InvalidTick, SeqTracker, Verdict, decode_tick, encode_tick
from consumer_sdk.core.keys import StreamName, parse_key, stream_key
from consumer_sdk.core.tick import BASE_FIELDS, channel_fields, is_valid_channel
from ingestor.binance import BINANCE_SPOT, MalformedFrame, Reply, ServerShutdown, parse_frame
from ingestor.pipeline import BadFrame, GapFound, IngestPipeline, LoopError
from ingestor.sequencer import GapReport, Sequencer

#: reproducible and database-free; sized so the whole file runs in well under a minute on a busy machine
PROPS: Final = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=300,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FIXTURES: Final = Path(__file__).resolve().parents[1] / "fixtures"
TS: Final = 1_700_000_000_000_000
INT64_MAX: Final = 2**63 - 1

# -- what a valid tick is -------------------------------------------------------------------------------------

#: a decimal string as a venue sends it: digits, an optional fraction, an optional exponent; no sign, no
#: NaN or Infinity, no spaces, bounded in length
DECIMAL_RE: Final = re.compile(r"[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")
DECIMAL_MAX_LEN: Final = 64
SYMBOL_RE: Final = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

_INT_FIELDS: Final = frozenset({
    "v", "seq", "ts_event", "ts_recv", "trade_id", "first_trade_id", "last_trade_id", "update_id",
    "open_time", "close_time", "trades",
})
_DECIMAL_FIELDS: Final = frozenset({
    "price", "qty", "bid_px", "bid_qty", "ask_px", "ask_qty", "open", "high", "low", "close", "volume",
    "quote_volume",
})


def tick_problems(tick: Any) -> list[str]:
    """What makes ``tick`` not a tick the writer may store (empty: it is valid).

    From the contract and README "Ticks and streams": exactly the base fields and its channel's fields;
    ints (never bools) within int64 and not negative; prices and quantities decimal strings (never a
    float, NaN or Infinity); ``side`` buy or sell; ``closed`` a bool; ``seq`` the venue's id where the
    channel has one; a channel and a symbol that make a stream key that parses back; and it survives
    :func:`encode_tick` and :func:`decode_tick` unchanged.
    """
    if type(tick) is not dict:
        return [f"not a dict: {type(tick).__name__}"]
    out: list[str] = []
    channel = tick.get("channel")
    if type(channel) is not str or not is_valid_channel(channel):
        return [f"bad channel {channel!r}"]
    want = {*BASE_FIELDS, *channel_fields(channel)}
    if set(tick) != want:
        out.append(f"fields {sorted(set(tick) ^ want)} missing or extra")
    for name, value in tick.items():
        if name in _INT_FIELDS and (type(value) is not int or not 0 <= value <= INT64_MAX):
            out.append(f"{name}={value!r}: not an int in 0..2^63-1")
        elif name in _DECIMAL_FIELDS and (
            type(value) is not str or len(value) > DECIMAL_MAX_LEN or not DECIMAL_RE.fullmatch(value)
        ):
            out.append(f"{name}={value!r}: not a decimal string")
    if tick.get("v") != 1 or tick.get("venue") != "binance":
        out.append(f"v={tick.get('v')!r} venue={tick.get('venue')!r}")
    symbol = tick.get("symbol")
    if type(symbol) is not str or not SYMBOL_RE.fullmatch(symbol):
        out.append(f"bad symbol {symbol!r}")
    elif parse_key(stream_key("binance", symbol, channel)) != StreamName("binance", symbol, channel):
        out.append(f"stream key of {symbol!r} {channel!r} does not parse back")
    if channel in ("trade", "agg_trade"):
        if tick.get("side") not in ("buy", "sell"):
            out.append(f"side={tick.get('side')!r}")
        if tick.get("seq") != tick.get("trade_id"):
            out.append("seq is not the trade id")
    elif channel == "book_ticker":
        if tick.get("seq") != tick.get("update_id"):
            out.append("seq is not the update id")
    elif type(tick.get("closed")) is not bool:
        out.append(f"closed={tick.get('closed')!r}")
    if not out:
        try:
            if decode_tick(encode_tick(tick)) != tick:  # type: ignore[arg-type]
                out.append("does not survive encode/decode")
        except (InvalidTick, TypeError) as exc:
            out.append(f"cannot be stored: {exc}")
    return out


def assert_parses_safely(raw: str | bytes) -> None:
    """The parser's contract on any input: a valid tick, a reply, a shutdown notice, None, or MalformedFrame."""
    try:
        out = parse_frame(raw, TS)
    except MalformedFrame:
        return
    if out is None or isinstance(out, Reply):
        return
    if isinstance(out, ServerShutdown):
        assert type(out.event_time_us) is int and 0 <= out.event_time_us <= INT64_MAX
        return
    assert tick_problems(out) == [], (raw[:300], out)


# -- samples: real captured frames and one trade as Binance documents it -------------------------------------


def _samples() -> list[dict[str, Any]]:
    """The first frame of each event type carried in each capture (spot bookTicker has no ``e``), and a trade."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for name in ("binance-spot-2021-10-12.jsonl", "binance-coinm-2021-07-22.jsonl"):
        for line in (FIXTURES / name).read_text().splitlines():
            frame = orjson.loads(orjson.loads(line)["frame"])
            kind = str(frame["data"].get("e", "bookTicker"))
            if kind != "depthUpdate":
                seen.setdefault((name, kind), frame)
    trade = {
        "stream": "btcusdt@trade",
        "data": {"e": "trade", "E": 1672515782136, "s": "BTCUSDT", "t": 12345, "p": "0.00100000",
                 "q": "100.00000000", "b": 88, "a": 50, "T": 1672515782136, "m": True, "M": True},
    }
    return [*seen.values(), trade]


SAMPLES: Final = _samples()


def test_samples_cover_every_carried_event_and_are_valid_ticks() -> None:
    """The mutation tests start from valid ticks of every carried kind: a check of the predicate itself."""
    channels = set()
    for frame in SAMPLES:
        tick = parse_frame(orjson.dumps(frame), TS)
        assert tick_problems(tick) == []
        assert isinstance(tick, dict)
        channels.add(tick["channel"][:5])
    assert channels == {"trade", "agg_t", "book_", "kline"}
    assert len(SAMPLES) == 7  # spot: aggTrade, kline, bookTicker; COIN-M: the same three; a trade


@pytest.mark.parametrize("name", ["binance-spot-2021-10-12.jsonl", "binance-coinm-2021-07-22.jsonl"])
def test_every_captured_frame_is_a_valid_tick_or_not_carried(name: str) -> None:
    for line in (FIXTURES / name).read_text().splitlines():
        raw = orjson.loads(line)["frame"]
        out = parse_frame(raw, TS)
        assert out is None or tick_problems(out) == [], raw


# -- the parser on arbitrary bytes and JSON-like text -------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """JSON text put in as it is (a number no JSON library writes: NaN, 1e999, 5000 digits ...)."""

    text: str


def dump(value: Any) -> str:
    """JSON text of ``value``; :class:`Raw` as it is, ints of any size, strings with lone surrogates escaped."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)  # NaN and Infinity as such; ensure_ascii: a lone surrogate becomes "\ud800"


#: number tokens that break a naive parser
ODD_NUMBERS: Final = [
    "NaN", "-NaN", "Infinity", "-Infinity", "inf", "1e999", "-1e999", "1e-999", "-0", "0.0", "-1", "01", "1.",
    ".5", "1e5", "0x10", "1_000", str(2**63 - 1), str(2**63), str(2**64 - 1), str(2**64), str(-(2**63) - 1),
    "9" * 400, "1" + "0" * 5000, "0." + "0" * 5000 + "1",
]
#: strings that look like decimals to a careless reader, or are none
ODD_STRINGS: Final = [
    "", " 1", "1 ", "NaN", "nan", "Infinity", "-Infinity", "inf", "-1", "-0.5", "+1", "1e999", "1e-999", "0x1A",
    "1_000", "١٢٣", "1,5", "1.2.3", "\ud800", "\x00", "9" * 100, "0." + "0" * 100 + "1", "trade", "kline_1m",
    "bookTicker", "btc:usdt", "BTC USDT", "BTC*", "../../etc", "kline_1x",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 10**300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([Raw(t) for t in ODD_NUMBERS]),
    st.text(max_size=20),
    st.sampled_from(ODD_STRINGS),
    st.from_regex(r"\A[0-9]{1,30}(\.[0-9]{0,30})?([eE][-+]?[0-9]{1,4})?\Z"),
)
#: the keys the parser reads, so random objects hit its branches
KEYS: Final = ["e", "E", "s", "t", "T", "p", "q", "m", "a", "f", "l", "u", "b", "B", "A", "k", "i", "o", "h", "c",
               "v", "n", "x", "id", "result", "error", "data", "stream"]
EVENTS: Final = ["trade", "aggTrade", "bookTicker", "kline", "serverShutdown", "depthUpdate"]
FRAME_KEYS: Final = [k for k in KEYS if k != "e"]
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=5)), inner, max_size=8),
        st.fixed_dictionaries({"e": st.sampled_from(EVENTS)}, optional=dict.fromkeys(FRAME_KEYS, inner)),
        st.fixed_dictionaries({"data": st.fixed_dictionaries({"e": st.sampled_from(EVENTS)},
                                                             optional=dict.fromkeys(FRAME_KEYS, inner))}),
    ),
    max_leaves=30,
)


#: values of the kinds a frame's fields hold, at and past their edges
plausible = st.one_of(
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 2**53, 2**63 // 1000, 2**63 // 1000 + 1, 2**63 - 1, 2**63, 2**64 - 1]),
    st.booleans(),
    st.from_regex(r"\A[0-9]{1,26}(\.[0-9]{0,26})?([eE][-+]?[0-9]{1,4})?\Z"),
    st.sampled_from(["BTCUSDT", "BTCUSD_PERP", "btcusdt", "1m", "1M", "1s", "3d", "kline_1m"]),
)


def encodings(text: str) -> st.SearchStrategy[str | bytes]:
    """The text as a ``str``, as UTF-8 bytes, and with lone surrogates written raw (invalid UTF-8)."""
    return st.sampled_from([text, text.encode("utf-8", "surrogatepass")])


@PROPS
@given(raw=st.binary(max_size=300))
@example(raw=b"\xff\xfe")
@example(raw=b"[" * 5000)
@example(raw=b'{"e":"trade","t":' + b"9" * 100_000 + b"}")
def test_parser_on_arbitrary_bytes(raw: bytes) -> None:
    assert_parses_safely(raw)


@PROPS
@given(raw=json_values.map(dump).flatmap(encodings))
@example(raw='{"e":"trade","s":"\ud800"}')
@example(raw=b'{"e":"trade","s":"\xed\xa0\x80"}')
@example(raw='{"a":' * 100_000 + "1" + "}" * 100_000)
def test_parser_on_arbitrary_json(raw: str | bytes) -> None:
    assert_parses_safely(raw)


# -- the parser on mutations of valid frames --------------------------------------------------------------------


@dataclass(frozen=True)
class Drop:
    """Remove the key ``path[-1]`` from the object at ``path[:-1]``."""

    path: tuple[str, ...]


@dataclass(frozen=True)
class Put:
    """Set ``path[-1]`` of the object at ``path[:-1]`` to ``value``."""

    path: tuple[str, ...]
    value: Any


def _paths(frame: dict[str, Any]) -> list[tuple[str, ...]]:
    """The fields to mutate: the event's values first (hypothesis favours the first), its name and the
    wrapper last."""
    data = frame["data"]
    out: list[tuple[str, ...]] = [("data", k) for k in data if k != "e"]
    if isinstance(data.get("k"), dict):
        out += [("data", "k", k) for k in data["k"]]
    return [*out, ("data", "e"), *((k,) for k in frame)]


def apply(frame: dict[str, Any], mutation: Drop | Put) -> None:
    *where, key = mutation.path
    target: Any = frame
    for k in where:
        target = target.get(k) if isinstance(target, dict) else None
    if not isinstance(target, dict):
        return
    if isinstance(mutation, Drop):
        target.pop(key, None)
    else:
        target[key] = mutation.value


@st.composite
def mutated_frames(draw: st.DrawFn) -> str | bytes:
    frame = orjson.loads(orjson.dumps(draw(st.sampled_from(SAMPLES))))  # a deep copy
    paths = _paths(frame)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        kind = draw(st.integers(0, 3))
        if kind == 0:
            apply(frame, Drop(path))
        else:  # a value of the kind the field holds, near its edges, half of the time
            apply(frame, Put(path, draw(json_values if kind == 1 else plausible)))
    return draw(encodings(dump(frame)))


#: each refused by the parser (or turned into a valid tick) before the fixes this file holds them to
FOUND: Final = [
    # a time in ms whose µs overflow 64 bits: the tick could not be encoded (TypeError in the writer)
    '{"data":{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"1","q":"1","T":18446744073709551615,"m":true}}',
    # ids past int64: not a Redis entry id the writer can use, nor an int other tools read
    '{"data":{"e":"trade","E":1,"s":"BTCUSDT","t":18446744073709551615,"p":"1","q":"1","T":1,"m":true}}',
    # a price that is no decimal: NaN, a sign, empty, 100 digits
    '{"data":{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"NaN","q":"1","T":1,"m":true}}',
    '{"data":{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"-1","q":"1","T":1,"m":true}}',
    '{"data":{"e":"aggTrade","E":1,"s":"BTCUSDT","a":1,"p":"1","q":"","f":1,"l":1,"T":1,"m":true}}',
    '{"data":{"u":1,"s":"BTCUSDT","b":"' + "9" * 100 + '","B":"1","a":"1","A":"1"}}',
    # a symbol that makes another stream key (md:binance:BTC:USDT:trade) or none at all
    '{"data":{"e":"trade","E":1,"s":"BTC:USDT","t":1,"p":"1","q":"1","T":1,"m":true}}',
    '{"data":{"u":1,"s":"","b":"1","B":"1","a":"1","A":"1"}}',
    # a kline interval Binance does not have: a channel no stream key, config or consumer knows
    '{"data":{"e":"kline","E":1,"s":"BTCUSDT","k":{"t":1,"T":2,"i":"x:y","o":"1","h":"1","l":"1","c":"1",'
    '"v":"1","q":"1","n":1,"x":false}}}',
]


@PROPS
@given(raw=mutated_frames())
@example(raw=FOUND[0])
@example(raw=FOUND[1])
@example(raw=FOUND[2])
@example(raw=FOUND[3])
@example(raw=FOUND[4])
@example(raw=FOUND[5])
@example(raw=FOUND[6])
@example(raw=FOUND[7])
@example(raw=FOUND[8])
def test_parser_on_mutated_real_frames(raw: str | bytes) -> None:
    assert_parses_safely(raw)


@pytest.mark.parametrize("raw", FOUND)
def test_found_frames_are_refused(raw: str) -> None:
    with pytest.raises(MalformedFrame):
        parse_frame(raw, TS)


# -- the pipeline on a generated venue delivered in any order ----------------------------------------------------


def trade_frame(symbol: str, tid: int) -> bytes:
    return orjson.dumps({
        "stream": f"{symbol.lower()}@trade",
        "data": {"e": "trade", "E": 1_700_000_000_000 + tid % 10**6, "s": symbol, "t": tid, "p": "1.5",
                 "q": "0.25", "T": 1_700_000_000_000 + tid % 10**6, "m": tid % 2 == 0},
    })


def book_frame(symbol: str, u: int) -> bytes:
    return orjson.dumps({
        "stream": f"{symbol.lower()}@bookTicker",
        "data": {"u": u, "s": symbol, "b": "1.0", "B": "2.0", "a": "1.1", "A": "3.0"},
    })


SYMBOLS: Final = ("BTCUSDT", "ETHUSDT")
STREAMS: Final = [(s, c) for s in SYMBOLS for c in ("trade", "book_ticker")]


@dataclass(frozen=True)
class Delivery:
    """What a venue made (contiguous ids per stream from ``first``) and what reached us, read by read."""

    first: dict[tuple[str, str], int]
    made: dict[tuple[str, str], int]
    seeds: dict[tuple[str, str], int]
    #: per read: (stream, id) of a tick frame, or raw garbage bytes
    reads: list[list[tuple[tuple[str, str], int] | bytes]]
    #: the streams held (as by a repair) from each read on
    holding: list[frozenset[tuple[str, str]]]


@st.composite
def deliveries(draw: st.DrawFn) -> Delivery:
    first: dict[tuple[str, str], int] = {}
    made: dict[tuple[str, str], int] = {}
    seeds: dict[tuple[str, str], int] = {}
    items: list[tuple[tuple[str, str], int] | bytes] = []
    for stream in draw(st.lists(st.sampled_from(STREAMS), min_size=1, max_size=4, unique=True)):
        start = draw(st.sampled_from([0, 1, 1000, 2**62]))
        # fewer ids than SeqTracker.MAX_HOLES: no hole is forgotten, so every late tick is counted LATE
        n = draw(st.integers(1, 40))
        first[stream], made[stream] = start, n
        ids = list(range(start, start + n))
        if stream[1] == "book_ticker":  # update ids skip by design
            ids = [start + 3 * i for i in range(n)]
        if draw(st.booleans()):
            seeds[stream] = max(0, draw(st.sampled_from(ids)) - draw(st.integers(0, 2)))
        # any order, any number of times each: reorders, duplicates, drops
        items += [(stream, ids[i]) for i in draw(st.lists(st.integers(0, n - 1), max_size=3 * n))]
    garbage = st.one_of(st.binary(max_size=20), st.just(b'{"e":"trade","t":-1}'),
                        st.just(b'{"result":null,"id":7}'), st.just(b'{"e":"depthUpdate"}'))
    items += draw(st.lists(garbage, max_size=5))
    order = draw(st.permutations(range(len(items))))
    ordered = [items[i] for i in order]
    cuts = sorted(draw(st.lists(st.integers(0, len(ordered)), max_size=6)))
    reads = [ordered[a:b] for a, b in pairwise([0, *cuts, len(ordered)])]
    holding = [frozenset(draw(st.sets(st.sampled_from(sorted(first)), max_size=2))) if draw(st.booleans())
               else frozenset() for _ in reads]
    return Delivery(first, made, seeds, reads, holding)


def encode(item: tuple[tuple[str, str], int] | bytes) -> bytes:
    if isinstance(item, bytes):
        return item
    (symbol, channel), n = item
    return trade_frame(symbol, n) if channel == "trade" else book_frame(symbol, n)


@PROPS
@given(delivery=deliveries())
def test_pipeline_on_any_delivery_order(delivery: Delivery) -> None:
    sequencer = Sequencer()
    for (symbol, channel), last in delivery.seeds.items():
        sequencer.seed("binance", symbol, channel, last)
    holding: set[tuple[str, str, str]] = set()  # the repairer's live set: changed between reads
    pipeline = IngestPipeline(BINANCE_SPOT, sequencer, holding)
    # per stream, each accepted tick's seq and how it came out: stored, held, or behind a reported gap
    accepted: dict[tuple[str, str], list[tuple[int, str]]] = {s: [] for s in delivery.first}
    gaps: dict[tuple[str, str], list[GapReport]] = {s: [] for s in delivery.first}
    bad = replies = 0
    for n, (read, held_now) in enumerate(zip(delivery.reads, delivery.holding, strict=True)):
        holding.clear()
        holding.update(("binance", *s) for s in held_now)
        frames = [encode(item) for item in read]
        ts = TS + n
        start = 0
        while True:  # as the session does: act on each event, then go on after it
            out = pipeline.process(ts, frames, start)
            for how, ticks in (("stored", out.ticks), ("held", out.held)):
                for t in ticks:
                    assert tick_problems(t) == []
                    assert t["ts_recv"] == ts
                    stream = (t["symbol"], t["channel"])
                    assert (stream in held_now) == (how == "held")
                    accepted[stream].append((t["seq"], how))
            event = out.event
            assert not isinstance(event, LoopError | ServerShutdown), event
            if event is None:
                assert out.resume == len(frames)
                break
            assert out.resume > start
            start = out.resume
            if isinstance(event, GapFound):
                assert tick_problems(event.tick) == []
                stream = (event.tick["symbol"], event.tick["channel"])
                assert stream not in held_now and stream[1] == "trade"
                gaps[stream].append(event.gap)
                accepted[stream].append((event.tick["seq"], "gap"))  # stored behind its gap marker
            elif isinstance(event, BadFrame):
                bad += 1
            elif isinstance(event, Reply):
                replies += 1

    # The model: per stream, a tick is accepted when its id is above every id accepted (or seeded) before;
    # one not accepted is late when it lies in a hole a jump left (below the last for book tickers).
    delivered: dict[tuple[str, str], list[int]] = {s: [] for s in delivery.first}
    for read in delivery.reads:
        for item in read:
            if not isinstance(item, bytes):
                delivered[item[0]].append(item[1])
    dups = late = jumps = 0
    for stream, ids in delivered.items():
        seed = delivery.seeds.get(stream)
        contiguous = stream[1] == "trade"
        top = seed
        want: list[int] = []
        for i in ids:
            if top is None or i > top:
                want.append(i)
                top = i
            elif (i < top) if not contiguous else (i not in want and i > (seed if seed is not None else want[0])):
                late += 1
            else:
                dups += 1
        got = accepted[stream]
        assert [seq for seq, _ in got] == want
        assert all(a < b for (a, _), (b, _) in pairwise(got))
        assert set(want) <= set(ids)  # only ids the venue made, each once
        if not contiguous:
            assert not gaps[stream]
            continue
        # A stored tick follows the one before it; a jump is reported as the hole between them, unless the
        # stream was held (the repairer marks holes among held ticks as it releases them).
        prev = seed
        reported = iter(gaps[stream])
        for seq, how in got:
            jumps += prev is not None and seq > prev + 1
            if how == "stored" and prev is not None:
                assert seq == prev + 1
            elif how == "gap":
                assert prev is not None and seq > prev + 1
                assert next(reported) == GapReport("binance", *stream, prev + 1, seq - 1)
            prev = seq
        assert next(reported, None) is None
        if got:
            # So every id the venue made, from the first accepted (or the one after the seed) to the last, is
            # accepted once, inside a reported hole, or inside a hole among held ticks (the repairer's to mark).
            low = got[0][0] if seed is None else seed + 1
            in_gaps = [n for g in gaps[stream] for n in range(g.first, g.last + 1)]
            among_held = [n for (a, _), (b, how) in pairwise([(low - 1, ""), *got]) if how == "held"
                          for n in range(a + 1, b)]
            assert sorted([*want, *in_gaps, *among_held]) == list(range(low, got[-1][0] + 1))
    frames_total = sum(len(r) for r in delivery.reads)
    garbage = frames_total - sum(len(v) for v in delivered.values())
    stats = pipeline.stats()
    seq_stats = sequencer.stats()
    assert stats.frames == frames_total
    assert stats.ticks == seq_stats.accepted == sum(len(v) for v in accepted.values())
    assert (seq_stats.duplicates, seq_stats.out_of_order) == (dups, late)
    assert stats.rejected == dups + late
    assert stats.malformed == bad
    assert stats.malformed + stats.unsupported + replies == garbage
    assert seq_stats.gaps == jumps


# -- the sequencer against a model -------------------------------------------------------------------------------

IDENTS: Final = [("binance", "BTCUSDT", "trade"), ("binance", "BTCUSDT", "agg_trade"),
                 ("binance", "ETHUSDT", "book_ticker"), ("binance", "ETHUSDT", "kline_1m")]


class ModelStream:
    """One stream as the docs describe it, written plainly: holes as a list, the oldest forgotten past
    ``MAX_HOLES``; a late tick is one inside a remembered hole."""

    def __init__(self, contiguous: bool, last: int | None = None) -> None:
        self.contiguous = contiguous
        self.last = last
        self.holes: list[tuple[int, int]] = []
        self.counts = {"accepted": 0, "gaps": 0, "gap_ticks": 0, "duplicates": 0, "late": 0}

    def _remember(self, holes: list[tuple[int, int]]) -> None:
        self.holes = holes[-SeqTracker.MAX_HOLES:]

    def observe(self, seq: int) -> Verdict:
        if self.last is None or seq > self.last:
            jump = self.last is not None and seq > self.last + 1
            if jump and self.contiguous:
                assert self.last is not None
                self._remember([*self.holes, (self.last + 1, seq - 1)])
                self.counts["gaps"] += 1
                self.counts["gap_ticks"] += seq - self.last - 1
            self.last = seq
            self.counts["accepted"] += 1
            return Verdict.GAP if jump and self.contiguous else Verdict.OK
        if any(lo <= seq <= hi for lo, hi in self.holes) or (not self.contiguous and seq < self.last):
            self.counts["late"] += 1
            return Verdict.LATE
        self.counts["duplicates"] += 1
        return Verdict.DUPLICATE

    def fill(self, first: int, last: int) -> None:
        kept: list[tuple[int, int]] = []
        for lo, hi in self.holes:
            kept += [r for r in ((lo, min(hi, first - 1)), (max(lo, last + 1), hi)) if r[0] <= r[1]]
        self._remember(kept)


class SequencerMachine(RuleBasedStateMachine):
    """Any interleaving of check, seed, forget_holes and release on a few streams agrees with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.sequencer = Sequencer()
        self.model: dict[tuple[str, str, str], ModelStream] = {}

    def _model(self, ident: tuple[str, str, str]) -> ModelStream:
        if ident not in self.model:
            self.model[ident] = ModelStream(ident[2] in ("trade", "agg_trade"))
        return self.model[ident]

    def _near(self, ident: tuple[str, str, str], offset: int) -> int:
        last = self.model[ident].last if ident in self.model else None
        return max(0, (last or 0) + offset)

    @initialize(starts=st.lists(st.sampled_from(IDENTS), max_size=2, unique=True))
    def start(self, starts: list[tuple[str, str, str]]) -> None:
        for ident in starts:
            self.sequencer.seed(*ident, 100)
            self.model[ident] = ModelStream(ident[2] in ("trade", "agg_trade"), 100)

    @rule(ident=st.sampled_from(IDENTS), offset=st.one_of(st.integers(-8, 8), st.sampled_from([-(2**62), 2**62])))
    def check(self, ident: tuple[str, str, str], offset: int) -> None:
        seq = self._near(ident, offset)
        model = self._model(ident)
        before = model.last
        want = model.observe(seq)
        tick: Any = {"venue": ident[0], "symbol": ident[1], "channel": ident[2], "seq": seq}
        got = self.sequencer.check(tick)
        if want is Verdict.GAP:
            assert before is not None
            assert got == GapReport(*ident, before + 1, seq - 1)
        else:
            assert got is want

    @rule(ident=st.sampled_from(IDENTS), offset=st.integers(-5, 5))
    def seed(self, ident: tuple[str, str, str], offset: int) -> None:
        last = self._near(ident, offset)
        self.sequencer.seed(*ident, last)
        model = self.model.get(ident)
        if model is None:
            self.model[ident] = ModelStream(ident[2] in ("trade", "agg_trade"), last)
        elif model.last is None or last > model.last:  # never backwards
            model.last = last

    @precondition(lambda self: any(m.holes for m in self.model.values()))
    @rule(data=st.data())
    def forget_holes(self, data: st.DataObject) -> None:
        ident = data.draw(st.sampled_from(sorted(i for i, m in self.model.items() if m.holes)))
        lo, hi = data.draw(st.sampled_from(self.model[ident].holes))
        first = data.draw(st.integers(lo - 1, hi))
        last = data.draw(st.integers(first, hi + 1))
        self.sequencer.forget_holes(ident, first, last)
        self.model[ident].fill(first, last)

    @rule(ident=st.sampled_from(IDENTS))
    def release(self, ident: tuple[str, str, str]) -> None:
        self.sequencer.release(*ident)
        self.model.pop(ident, None)  # its counters go with it, as the sequencer's do

    @invariant()
    def agrees_with_the_model(self) -> None:
        trackers = dict(self.sequencer.trackers())
        assert set(trackers) == set(self.model)
        for ident, model in self.model.items():
            tracker = trackers[ident]
            assert tracker.last == model.last == self.sequencer.last_seq(*ident)
            assert tracker.holes() == model.holes
            assert len(tracker.holes()) <= SeqTracker.MAX_HOLES
            assert all(lo <= hi and (model.last is None or hi < model.last) for lo, hi in tracker.holes())
            counts = {k: getattr(tracker, k) for k in model.counts}
            assert counts == model.counts
        stats = self.sequencer.stats()
        total = {k: sum(m.counts[k] for m in self.model.values()) for k in ModelStream(True).counts}
        assert (stats.accepted, stats.gaps, stats.gap_ticks, stats.duplicates, stats.out_of_order) == (
            total["accepted"], total["gaps"], total["gap_ticks"], total["duplicates"], total["late"])


SequencerMachine.TestCase.settings = settings(PROPS, max_examples=150, stateful_step_count=60)
test_sequencer_against_a_model = SequencerMachine.TestCase


class ManyHolesMachine(RuleBasedStateMachine):
    """One contiguous tracker driven past ``MAX_HOLES`` holes: the oldest are forgotten, late ones become duplicates."""

    def __init__(self) -> None:
        super().__init__()
        self.tracker = SeqTracker()
        self.model = ModelStream(contiguous=True)

    @rule(step=st.integers(1, 4))
    def forward(self, step: int) -> None:
        seq = (self.model.last if self.model.last is not None else -1) + step
        assert self.tracker.observe(seq) is self.model.observe(seq)

    @rule(back=st.integers(0, 300))
    def backward(self, back: int) -> None:
        seq = max(0, (self.model.last or 0) - back)
        assert self.tracker.observe(seq) is self.model.observe(seq)

    @precondition(lambda self: bool(self.model.holes))
    @rule(data=st.data())
    def fill(self, data: st.DataObject) -> None:
        lo, hi = data.draw(st.sampled_from(self.model.holes))
        first = data.draw(st.integers(lo, hi))
        last = data.draw(st.integers(first, hi))
        self.tracker.fill(first, last)
        self.model.fill(first, last)

    @invariant()
    def agrees(self) -> None:
        assert self.tracker.last == self.model.last
        assert self.tracker.holes() == self.model.holes
        assert {k: getattr(self.tracker, k) for k in self.model.counts} == self.model.counts


ManyHolesMachine.TestCase.settings = settings(PROPS, max_examples=60, stateful_step_count=200)
test_seq_tracker_past_max_holes = ManyHolesMachine.TestCase


# -- the consumer's check of a stored entry -----------------------------------------------------------------------


@st.composite
def mutated_ticks(draw: st.DrawFn) -> str | bytes:
    """A stored entry's ``d`` as a careless writer or a hand-made ``XADD`` could leave it."""
    tick = dict(draw(st.sampled_from(SAMPLE_TICKS)))
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(sorted(tick) or ["v"]))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            tick.pop(name, None)
        else:
            tick[name] = draw(json_values if kind == 1 else plausible)
    return draw(encodings(dump(tick)))


SAMPLE_TICKS: Final = [parse_frame(orjson.dumps(frame), TS) for frame in SAMPLES]


@PROPS
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(dump).flatmap(encodings), mutated_ticks()))
def test_decode_tick_refuses_with_invalid_tick_only(raw: str | bytes) -> None:
    try:
        tick = decode_tick(raw)
    except InvalidTick:
        return
    assert type(tick["seq"]) is int and tick["seq"] >= 0
    assert all(type(tick[f]) is str for f in ("venue", "symbol", "channel"))
    assert all(type(tick[f]) is int for f in ("ts_event", "ts_recv"))
