"""consumer_sdk.consumer: pure decisions, then group reads against the real Redis.

Every integration test writes under its own key prefix and deletes it afterwards; the restart test
runs a private redis-server on a free port.  Waits are on conditions with bounded timeouts.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import gc
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions as rexc

import consumer_sdk
from consumer_sdk import (
    ConfigError,
    Consumer,
    ConsumerStats,
    InvalidTick,
    MarketError,
    SeqTracker,
    Tick,
    TransientError,
    TrimmedError,
    decode_tick,
    encode_tick,
    follow,
)
from consumer_sdk.consumer import group_behind_trim, hole_verdict, lag_estimate
from consumer_sdk.consumer.batch import (
    DELETED,
    DELIVER,
    DUPLICATE,
    GONE,
    INVALID,
    KeyState,
    flatten,
    flatten_reply,
    rollback,
)
from consumer_sdk.consumer.batch import classify as classify_batch
from consumer_sdk.consumer.fetch import CollectorPause
from consumer_sdk.consumer.reader import _is_async
from consumer_sdk.core.redis import (
    ErrorKind,
    StreamView,
    blocking_client,
    classify,
    effective_socket_timeout,
    field_name,
    field_value,
    id_after,
    id_before,
    id_str,
    iter_read_reply,
    pack_xack,
    raw_stream_client,
    translate,
    xack_many,
)
from consumer_sdk.core.sequencing import Verdict
from ops.redis_server import RedisServer, find_redis_server, restart, start_redis

REDIS_URL = os.environ.get("MARKET_REDIS_URL", "redis://127.0.0.1:6379/0")
BASE_MS = 1_700_000_000_000
UNIT = 1.0  # seconds; every wait below is a multiple of it


# ---------------------------------------------------------------- helpers


def make_tick(seq: int, ms: int | None = None, symbol: str = "BTCUSDT", channel: str = "trade") -> Tick:
    ms = BASE_MS + seq if ms is None else ms
    tick: dict[str, Any] = {
        "v": 1,
        "venue": "binance",
        "symbol": symbol,
        "channel": channel,
        "seq": seq,
        "ts_event": ms * 1000,
        "ts_recv": ms * 1000 + 7,
        "trade_id": seq,
        "price": "37000.10",
        "qty": "0.002",
        "side": "buy",
    }
    return tick  # type: ignore[return-value]


async def add(client: aioredis.Redis, key: str, seqs: Any, ms: Callable[[int], int] | None = None) -> list[str]:
    _prefix, _venue, symbol, channel = key.split(":")
    ids = []
    async with client.pipeline(transaction=False) as pipe:
        for seq in seqs:
            at = BASE_MS + seq if ms is None else ms(seq)
            ids.append(f"{at}-{seq}")
            pipe.xadd(key, {"d": encode_tick(make_tick(seq, at, symbol, channel))}, id=ids[-1])
        await pipe.execute()
    return ids


class Collector:
    """A handler that records seqs and lets a test wait for a count."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.seqs: list[int] = []
        self.keys: list[str] = []
        self.fail_at = fail_at
        self._changed = asyncio.Event()

    def __call__(self, tick: Tick) -> None:
        if tick["seq"] == self.fail_at:
            self.fail_at = None
            raise RuntimeError(f"handler failed on {tick['seq']}")
        self.seqs.append(tick["seq"])
        self.keys.append(tick["symbol"])
        self._changed.set()

    async def wait_for(self, n: int, timeout: float = 5 * UNIT) -> None:
        async with asyncio.timeout(timeout):
            while len(self.seqs) < n:
                self._changed.clear()
                await self._changed.wait()


async def until(cond: Callable[[], bool], timeout: float = 5 * UNIT) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)  # poll


@contextlib.asynccontextmanager
async def running(consumer: Consumer, handler: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run(handler))
    try:
        yield task
    except BaseException:
        if task.done() and task.exception() is not None:
            raise task.exception() from None  # type: ignore[misc]
        raise
    finally:
        consumer.stop()
        async with asyncio.timeout(5 * UNIT):
            await task


def consumer_for(prefix: str, patterns: list[str], **kw: Any) -> Consumer:
    settings: dict[str, Any] = {
        "redis_url": REDIS_URL,
        "group": "g",
        "consumer": "c1",
        "prefix": prefix,
        "block_ms": 100,
        "start_id": "0",
        "rescan_s": 0.2,
        "claim_idle_ms": None,
    }
    settings.update(kw)
    return Consumer(patterns=patterns, **settings)


class PrivateRedis:
    """A redis-server of the test's own on a free port, without persistence."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = find_redis_server()  # a supported server: the system's, or the bundled one on a machine without it
        assert exe, "no supported redis-server found (ops/dev.sh installs one)"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5 * UNIT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.02)  # poll

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=5 * UNIT)
            self.proc = None


@pytest.fixture
def private_server() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------- exports and settings


def test_public_names_are_exported() -> None:
    for name in (
        "Consumer", "ConsumerStats", "Handler", "Bound", "parse_bound", "resolve_bound",
        "read_range", "follow", "republish",
    ):
        assert name in consumer_sdk.__all__
        assert hasattr(consumer_sdk, name)
    assert sorted(consumer_sdk.__all__) == sorted(set(consumer_sdk.__all__))


#: consumer_sdk.consumer's modules -> layer; a module imports only from lower layers (pure ones: only pure ones)
CONSUMER_LAYERS = {"batch": 0, "trim": 0, "fetch": 1, "groups": 1, "claims": 2, "delivery": 2, "reader": 3}
CONSUMER_PURE = {"batch", "trim"}
CONSUMER_PACKAGE = Path(consumer_sdk.__file__).parent / "consumer"


def _consumer_imports(path: Path) -> set[str]:
    """The ``consumer_sdk.consumer`` modules ``path`` imports, anywhere in it (read with :mod:`ast`)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        out.update(n.split(".")[2] for n in names if n.startswith("consumer_sdk.consumer."))
    return out & set(CONSUMER_LAYERS)


def test_the_consumer_package_is_layered_without_a_circle_or_an_unexplained_long_module() -> None:
    modules = {p.stem: p for p in CONSUMER_PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert set(modules) == set(CONSUMER_LAYERS)
    for name, path in modules.items():
        imported = _consumer_imports(path)
        upward = sorted(m for m in imported if CONSUMER_LAYERS[m] >= CONSUMER_LAYERS[name])
        assert not upward, f"consumer_sdk.consumer.{name} imports {upward} from its layer or above"
        if name in CONSUMER_PURE:
            assert imported <= CONSUMER_PURE, name
            text = path.read_text(encoding="utf-8")
            assert "import asyncio" not in text and "redis.asyncio" not in text, f"{name} is pure: no I/O"
        text = path.read_text(encoding="utf-8")
        assert text.count("\n") <= 600 or text.startswith("# size:"), f"{name}: over 600 lines and no '# size:'"
    # the package re-exports today's public names, all defined below it
    import consumer_sdk.consumer as package

    assert set(package.__all__) == {
        "Consumer", "ConsumerStats", "GapHook", "InvalidHook", "TrimmedHook", "group_behind_trim", "hole_verdict",
        "lag_estimate",
    }
    assert _consumer_imports(CONSUMER_PACKAGE / "__init__.py") <= {"reader", "trim"}


@pytest.mark.parametrize(
    "kw",
    [
        {"patterns": []},
        {"patterns": "binance:*:trade"},
        {"patterns": ["binance:BTCUSDT"]},
        {"patterns": ["xx:binance:BTCUSDT:trade"]},
        {"group": ""},
        {"count": 0},
        {"block_ms": 0},
        {"rescan_s": 0},
        {"claim_idle_ms": 0},
    ],
)
def test_bad_settings_are_config_errors(kw: dict[str, Any]) -> None:
    settings: dict[str, Any] = {"redis_url": REDIS_URL, "patterns": ["binance:*:trade"], "group": "g"}
    settings.update(kw)
    with pytest.raises(ConfigError):
        Consumer(**settings)


def test_client_source_is_one_of_url_or_client() -> None:
    with pytest.raises(ConfigError):
        Consumer(patterns=["binance:*:trade"], group="g")
    client = aioredis.Redis.from_url(REDIS_URL)
    with pytest.raises(ConfigError):
        Consumer(redis_url=REDIS_URL, redis=client, patterns=["binance:*:trade"], group="g")


def test_full_keys_and_patterns_name_the_same_streams() -> None:
    c = Consumer(redis_url=REDIS_URL, patterns=["md:binance:BTCUSDT:trade", "binance:btcusdt:trade"], group="g")
    assert c._groups.literal_keys() == ["md:binance:BTCUSDT:trade"]
    assert c.consumer == f"{socket.gethostname()}-{os.getpid()}"


def test_handler_kind_is_decided_once() -> None:
    async def coro(_t: Tick) -> None:
        return None

    class AsyncCall:
        async def __call__(self, _t: Tick) -> None:
            return None

    def plain(_t: Tick) -> None:
        return None

    assert _is_async(coro)
    assert _is_async(AsyncCall())
    assert not _is_async(plain)
    assert not _is_async(Collector())


# ---------------------------------------------------------------- pure pieces


def view(first: tuple[int, int] | None = (1, 1), last: tuple[int, int] | None = (100, 100), length: int = 100,
         max_deleted: tuple[int, int] | None = None, added: int | None = 100) -> StreamView:
    return StreamView(first, last, length, max_deleted, added)


def test_hole_verdicts() -> None:
    before, after = (5, 5), (9, 9)
    assert hole_verdict(True, before, after, view()) == "shared"
    assert hole_verdict(False, before, after, view()) == "gap"  # a venue gap: nothing was stored
    assert hole_verdict(False, before, after, view(max_deleted=(7, 7))) == "trimmed"  # XDEL inside
    assert hole_verdict(False, before, after, view(max_deleted=(3, 3))) == "gap"  # XDEL elsewhere
    assert hole_verdict(False, before, after, view(first=(9, 9))) == "trimmed"  # trimming passed `before`
    assert hole_verdict(False, before, after, view(first=None, length=0)) == "trimmed"
    assert hole_verdict(False, before, after, view(first=(5, 5))) == "gap"


def test_group_behind_trim() -> None:
    pos = (10, 10)
    assert not group_behind_trim(pos, 0, view(last=(10, 10)))  # nothing added since
    assert not group_behind_trim(pos, 90, view(first=(1, 1)))  # everything after it still held
    assert group_behind_trim(pos, 90, view(first=(51, 51), length=50))  # 90 unread, 50 held
    assert not group_behind_trim(pos, 50, view(first=(51, 51), length=50, added=60))  # trimmed what it read
    assert group_behind_trim(pos, None, view(first=(51, 51), length=50, added=None))  # Redis < 7: seq jump
    assert not group_behind_trim(pos, None, view(first=(11, 11), length=90, added=None))
    assert group_behind_trim(pos, 0, view(first=None, length=0))  # emptied after the position
    assert group_behind_trim(pos, 5, view(max_deleted=(12, 12)))  # an unread entry deleted
    assert not group_behind_trim(pos, 5, view(max_deleted=(8, 8)))
    # a group made at 0 on a stream that starts at a venue id far from 1 and never lost an entry: nothing skipped,
    # whether or not Redis gives a lag for it
    venue_first = (1_796_541_406_533, 7_618_199)
    fresh = view(first=venue_first, last=(1_796_541_406_999, 7_618_299), length=101, added=101)
    assert not group_behind_trim((0, 0), None, fresh)
    assert not group_behind_trim((0, 0), 101, fresh)
    assert group_behind_trim((0, 0), None, view(first=venue_first, length=101, added=150))  # 49 trimmed unread


def test_lag_estimate() -> None:
    assert lag_estimate({"lag": 7}, None) == 7
    stream = {"last-generated-id": b"10-10", "length": 4}
    assert lag_estimate({"lag": None, "last-delivered-id": b"10-10"}, stream) == 0
    assert lag_estimate({"lag": None, "last-delivered-id": b"3-3"}, stream) == 4
    assert lag_estimate({"last-delivered-id": b"3-3"}, None) == 0


def test_id_neighbours() -> None:
    assert id_after((5, 3)) == (5, 4)
    assert id_after((5, 2**64 - 1)) == (6, 0)
    assert id_before((5, 3)) == (5, 2)
    assert id_before((5, 0)) == (4, 2**64 - 1)
    assert id_before((0, 0)) == (0, 0)


def test_read_reply_shapes_are_flattened() -> None:
    entries = [(b"1-1", {b"d": b"x"}), (b"1-2", {b"d": b"y"})]
    shapes = [
        [[b"k", entries]],  # RESP2
        {b"k": entries},  # unified
        {b"k": [entries]},  # RESP3 legacy
    ]
    for shape in shapes:
        assert [(k, list(e)) for k, e in iter_read_reply(shape)] == [(b"k", entries)]
    assert list(iter_read_reply(None)) == []
    assert list(iter_read_reply({})) == []
    assert list(iter_read_reply({b"k": []})) == [(b"k", [])]


def test_error_classification_and_translation() -> None:
    assert classify(rexc.ConnectionError("x")) is ErrorKind.TRANSIENT
    assert classify(rexc.TimeoutError("x")) is ErrorKind.TRANSIENT
    assert classify(rexc.BusyLoadingError("x")) is ErrorKind.TRANSIENT
    assert classify(ConnectionRefusedError()) is ErrorKind.TRANSIENT
    assert classify(rexc.ResponseError("NOGROUP No such key")) is ErrorKind.NOGROUP
    assert classify(rexc.ResponseError("UNBLOCKED the stream key no longer exists")) is ErrorKind.NOGROUP
    assert classify(rexc.ResponseError("WRONGTYPE Operation against a key")) is ErrorKind.FATAL
    assert classify(rexc.AuthenticationError("bad")) is ErrorKind.FATAL
    assert isinstance(translate(rexc.ConnectionError("x")), TransientError)
    assert isinstance(translate(rexc.ResponseError("WRONGTYPE x")), ConfigError)
    assert type(translate(rexc.ResponseError("ERR other"))) is MarketError


async def test_blocking_client_outlasts_the_block() -> None:
    made, owned = blocking_client(REDIS_URL, 7000)
    assert owned and (effective_socket_timeout(made) or 0) > 7.0
    await made.aclose()

    short = aioredis.Redis.from_url(REDIS_URL)  # redis-py's default 5 s
    assert effective_socket_timeout(short) == 5.0
    dedicated, owned = blocking_client(short, 7000)
    assert owned and dedicated is not short and (effective_socket_timeout(dedicated) or 0) > 7.0
    assert dedicated.connection_pool.connection_kwargs["port"] == short.connection_pool.connection_kwargs["port"]
    await dedicated.aclose()

    long = aioredis.Redis.from_url(REDIS_URL, socket_timeout=None)
    same, owned = blocking_client(long, 7000)
    assert same is long and not owned
    await short.aclose()
    await long.aclose()


def _entries(*seqs: int | str) -> list[list[Any]]:
    """Entries as XREADGROUP sends them: ``[id, [field, value, ...]]``, ``[id, None]`` once deleted."""
    out: list[list[Any]] = []
    for i, s in enumerate(seqs):
        if isinstance(s, int):
            out.append([f"{BASE_MS + s}-{s}".encode(), [b"d", encode_tick(make_tick(s))]])
        elif s == "deleted":
            out.append([f"{BASE_MS}-{900 + i}".encode(), None])
        else:
            out.append([f"{BASE_MS}-{900 + i}".encode(), [b"d", s.encode()]])
    return out


def _classified(state: KeyState, entries: list[list[Any]], claimed: bool) -> Any:
    return classify_batch(state, *flatten(entries, b"d"), claimed)


def _kinds(batch: Any) -> list[int]:
    return [batch.kind(i) for i in range(len(batch.ids))]


def test_classify_dedupes_and_finds_holes() -> None:
    state = KeyState("md:binance:BTCUSDT:trade", True)
    batch = _classified(state, _entries(1, 2, 3, 6, 7, "junk", "deleted"), False)
    assert _kinds(batch) == [DELIVER] * 5 + [INVALID, DELETED]
    assert [batch.verdict(i) for i in range(5)] == [Verdict.OK, Verdict.OK, Verdict.OK, Verdict.GAP, Verdict.OK]
    assert [t["seq"] for t in batch.ticks[:5]] == [1, 2, 3, 6, 7] and batch.ticks[5:] == [None, None]
    assert [(g[0], g[3], g[4]) for g in batch.gaps] == [(3, 4, 5)]
    assert batch.gaps[0][1] == f"{BASE_MS + 3}-3".encode()
    assert batch.deleted == [(BASE_MS, 906)]
    assert state.tracker.last == 7 and state.last_id == f"{BASE_MS + 7}-7".encode()

    again = _classified(state, _entries(6, 7, 8), False)
    assert _kinds(again) == [DUPLICATE, DUPLICATE, DELIVER]
    late = _classified(state, _entries(5), False)
    assert late.kind(0) == DELIVER and late.verdict(0) is Verdict.LATE
    # Claimed entries were given to another consumer: never dropped as duplicates.
    claimed = _classified(state, _entries(2), True)
    assert claimed.kind(0) == DELIVER and claimed.ticks[0]["seq"] == 2


def test_classify_takes_any_entry_shape_and_rejects_what_decode_tick_rejects() -> None:
    def without(tick: Tick, name: str) -> bytes:
        return encode_tick({k: v for k, v in tick.items() if k != name})  # type: ignore[arg-type]

    def with_(tick: Tick, name: str, value: Any) -> bytes:
        changed: dict[str, Any] = dict(tick)
        changed[name] = value
        return encode_tick(changed)  # type: ignore[arg-type]

    entries: list[list[Any]] = [
        [b"1-1", [b"x", b"1", b"d", encode_tick(make_tick(1))]],  # more fields than the writer stores
        [b"1-2", {b"d": encode_tick(make_tick(2))}],  # a mapping, as redis-py builds it
        [b"1-3", [b"x", b"1"]],  # no field d
        [b"1-4", [b"d", b"[1, 2]"]],
        [b"1-5", [b"d", b"{not json"]],
        [b"1-6", [b"d", with_(make_tick(6), "v", True)]],
        [b"1-7", [b"d", with_(make_tick(7), "seq", -1)]],
        [b"1-8", [b"d", with_(make_tick(8), "ts_recv", "8")]],
        [b"1-9", [b"d", without(make_tick(9), "venue")]],
        [b"1-10", [b"d", encode_tick(make_tick(3)).decode()]],  # str, as with decode_responses
    ]
    state = KeyState("md:binance:BTCUSDT:trade", True)
    batch = _classified(state, entries, False)
    assert _kinds(batch) == [DELIVER, DELIVER] + [INVALID] * 7 + [DELIVER]
    assert [t["seq"] for t in batch.ticks if t is not None] == [1, 2, 3]
    assert str(batch.odd[2][2]) == "no field 'd'"
    for i in range(3, 9):
        with pytest.raises(InvalidTick) as caught:
            decode_tick(entries[i][1][1])
        assert str(batch.odd[i][2]) == str(caught.value)


def test_non_contiguous_channels_have_no_gaps_and_older_is_duplicate() -> None:
    state = KeyState("md:binance:BTCUSDT:book_ticker", True)
    batch = _classified(state, _entries(10, 15, 40), False)
    assert not batch.gaps and not batch.odd and all(batch.verdict(i) is Verdict.OK for i in range(3))
    again = _classified(state, _entries(15, 40, 41), False)
    assert _kinds(again) == [DUPLICATE, DUPLICATE, DELIVER]


def test_rollback_forgets_what_was_not_handed_over() -> None:
    state = KeyState("md:binance:BTCUSDT:trade", True)
    _classified(state, _entries(1, 2), False)
    before = (state.tracker.last, state.tracker.holes(), state.last_id)
    batch = _classified(state, _entries(3, 4, 8, 9), False)
    assert state.tracker.holes() == [(5, 7)]
    rollback(state, batch, 2)  # 3 and 4 were handed over, 8 raised
    assert state.tracker.last == 4 and state.tracker.holes() == []
    assert state.last_id == f"{BASE_MS + 4}-4".encode()
    rollback(state, batch, 0)
    assert (state.tracker.last, state.tracker.holes(), state.last_id) == before
    redo = _classified(state, _entries(3, 4, 8, 9), False)
    assert _kinds(redo) == [DELIVER] * 4


def test_rollback_past_entries_that_were_not_accepted() -> None:
    state = KeyState("md:binance:BTCUSDT:trade", True)
    _classified(state, _entries(1, 2, 3), False)
    batch = _classified(state, _entries(2, 4, "junk", 7, 3), False)  # duplicate, in order, invalid, gap, duplicate
    assert _kinds(batch) == [DUPLICATE, DELIVER, INVALID, DELIVER, DUPLICATE]
    assert state.tracker.last == 7 and state.tracker.holes() == [(5, 6)]
    rollback(state, batch, 2)  # the invalid entry's hook raised: 7 was never handed over
    assert state.tracker.last == 4 and state.tracker.holes() == []
    assert state.last_id == f"{BASE_MS + 4}-4".encode()
    rollback(state, batch, 4)  # nothing accepted from there on: nothing to forget
    assert state.tracker.last == 4


def test_field_value_reads_entries_as_sent_or_as_mappings() -> None:
    assert field_value([b"d", b"x"], b"d") == b"x"
    assert field_value([b"a", b"1", b"d", b"x", b"d", b"y"], b"d") == b"y"  # the last one, as in a dict
    assert field_value([b"a", b"1"], b"d") is None
    assert field_value([b"a"], b"a") is None  # a name without a value
    assert field_value({"d": "x"}, "d") == "x"
    assert field_value(None, b"d") is None and field_value([], b"d") is None


def test_seq_tracker_is_the_shared_one() -> None:
    assert isinstance(KeyState("md:a:B:trade", True).tracker, SeqTracker)


def test_flatten_keeps_ids_and_the_field_d_only() -> None:
    tick = encode_tick(make_tick(1))
    entries: list[list[Any]] = [
        [b"1-1", [b"d", tick]],
        [b"1-2", None],  # a pending entry whose content was deleted
        [b"1-3", [b"x", b"1", b"d", b"y"]],
        [b"1-4", [b"x", b"1"]],
        [b"1-5", {b"d": b"z"}],
    ]
    ids, values = flatten(entries, b"d")
    assert ids == [b"1-1", b"1-2", b"1-3", b"1-4", b"1-5"]
    assert values == [tick, GONE, b"y", None, b"z"]
    resp2 = [[b"k1", entries[:1]], [b"k2", []]]
    resp3 = {b"k1": entries[:1], b"k2": []}
    for reply in (resp2, resp3):
        assert flatten_reply(reply, b"d") == [(b"k1", [b"1-1"], [tick])]  # streams with nothing are left out
    assert flatten_reply(None, b"d") == []


def test_collector_pause_nests_and_leaves_a_disabled_collector_alone() -> None:
    pause = CollectorPause()
    was = gc.isenabled()
    try:
        gc.enable()
        with pause():
            assert not gc.isenabled()
            with pause():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the outer reader is still in
        assert gc.isenabled()
        with pytest.raises(RuntimeError), pause():
            raise RuntimeError("read failed")
        assert gc.isenabled()
        gc.disable()  # the application's choice
        with pause():
            pass
        assert not gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


def test_pack_xack_is_the_resp_of_the_command_with_or_without_hiredis() -> None:
    ids: list[bytes | str] = [b"1-1", "1700000000000-12"]
    expected = (
        b"*5\r\n$4\r\nXACK\r\n$3\r\nk:1\r\n$1\r\ng\r\n$3\r\n1-1\r\n$16\r\n1700000000000-12\r\n"
    )
    assert pack_xack(b"k:1", b"g", ids, use_hiredis=False) == expected
    assert pack_xack(b"k:1", b"g", ids) == expected


# ---------------------------------------------------------------- reading from Redis


async def test_xack_many_acks_several_streams_and_reports_errors_after_reading_every_reply(
    rc: aioredis.Redis, pfx: str
) -> None:
    k1, k2, other = f"{pfx}:binance:A:trade", f"{pfx}:binance:B:trade", f"{pfx}:not-a-stream"
    ids1, ids2 = await add(rc, k1, [1, 2, 3]), await add(rc, k2, [1, 2])
    for key in (k1, k2):
        await rc.xgroup_create(key, "g", id="0")
    await rc.xreadgroup("g", "c", {k1: ">", k2: ">"})
    assert await xack_many(rc, "g", [(k1, [i.encode() for i in ids1[:2]]), (k2, ids2 + ids2)]) == 4
    assert (await rc.xpending(k1, "g"))["pending"] == 1 and (await rc.xpending(k2, "g"))["pending"] == 0
    await rc.set(other, "x")
    with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):
        await xack_many(rc, "g", [(other, ["1-1"]), (k1, [ids1[2]])])
    assert (await rc.xpending(k1, "g"))["pending"] == 0  # the XACK after the error still ran
    assert await rc.ping()  # and the connection is still in step


@pytest.mark.parametrize("options", [{}, {"protocol": 2}, {"decode_responses": True}])
async def test_raw_stream_client_leaves_entries_as_sent(pfx: str, options: dict[str, Any]) -> None:
    client = aioredis.Redis.from_url(REDIS_URL, **options)
    raw = raw_stream_client(client)
    key = f"{pfx}:binance:BTCUSDT:trade"
    try:
        ids = await add(client, key, [1, 2])
        await client.xgroup_create(key, "g", id="0")
        reply = await raw.xreadgroup("g", "c", {key: ">"})
        await client.xtrim(key, maxlen=0)
        again = await raw.xreadgroup("g", "c", {key: "0"})
        claimed = await raw.xautoclaim(key, "g", "c2", 0, "0-0")
        dfield = field_name(client)
        assert [(id_str(k), ids_, values) for k, ids_, values in flatten_reply(reply, dfield)] == [
            (key, [i if options.get("decode_responses") else i.encode() for i in ids], [
                encode_tick(make_tick(s)).decode() if options.get("decode_responses") else encode_tick(make_tick(s))
                for s in (1, 2)
            ])
        ]
        assert [values for _k, _ids, values in flatten_reply(again, dfield)] == [[GONE, GONE]]
        assert claimed[1] == [] and [id_str(i) for i in claimed[2]] == ids  # trimmed: dropped from the PEL
        assert isinstance(await client.xreadgroup("g", "c", {key: "0"}), list | dict)  # the client is untouched
    finally:
        await client.delete(key)
        await client.aclose()


async def test_reads_in_order_and_acks_everything(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 251))
    collector = Collector()
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"], count=100)
    async with running(consumer, collector):
        await collector.wait_for(250)
        await add(rc, key, range(251, 261))
        await collector.wait_for(260)
        await until(lambda: consumer.stats().acked == 260)
    assert collector.seqs == list(range(1, 261))
    pending = await rc.xpending(key, "g")
    assert pending["pending"] == 0
    stats = consumer.stats()
    assert isinstance(stats, ConsumerStats)
    assert (stats.delivered, stats.acked, stats.duplicates, stats.gaps, stats.keys) == (260, 260, 0, 0, 1)
    assert (await consumer.lag()) == {key: 0}


async def test_start_at_dollar_skips_history_and_async_handlers_work(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 11))
    seen: list[int] = []
    done = asyncio.Event()

    async def handler(tick: Tick) -> None:
        await asyncio.sleep(0)
        seen.append(tick["seq"])
        if tick["seq"] == 15:
            done.set()

    consumer = consumer_for(pfx, [key], start_id="$")  # a full key works as a pattern
    async with running(consumer, handler):
        await until(lambda: consumer.stats().keys == 1 and consumer._groups.states[key].cursor == ">")
        await add(rc, key, range(11, 16))
        async with asyncio.timeout(5 * UNIT):
            await done.wait()
    assert seen == [11, 12, 13, 14, 15]


async def test_decode_responses_client_works(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 6))
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True, socket_timeout=None)
    collector = Collector()
    consumer = consumer_for(pfx, ["binance:*:trade"], redis_url=None, redis=client)
    async with running(consumer, collector):
        await collector.wait_for(5)
        await until(lambda: consumer.stats().acked == 5)
    assert collector.seqs == [1, 2, 3, 4, 5]
    await client.aclose()


async def test_restarted_consumer_finishes_its_pending_entries_once(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 21))
    await rc.xgroup_create(key, "g", id="0")
    # "c1" is given 1..10 and dies before acking them.
    await rc.xreadgroup("g", "c1", {key: ">"}, count=10)
    assert (await rc.xpending(key, "g"))["pending"] == 10

    collector = Collector()
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"], consumer="c1")
    async with running(consumer, collector):
        await collector.wait_for(20)
        await until(lambda: consumer.stats().acked == 20)
    assert collector.seqs == list(range(1, 21))
    assert (await rc.xpending(key, "g"))["pending"] == 0


async def test_handler_error_leaves_the_rest_pending_and_rerun_resumes(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 11))
    collector = Collector(fail_at=6)
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"])
    with pytest.raises(RuntimeError, match="failed on 6"):
        async with asyncio.timeout(5 * UNIT):
            await consumer.run(collector)
    assert collector.seqs == [1, 2, 3, 4, 5]
    pending = await rc.xpending_range(key, "g", "-", "+", 100)
    assert [p["message_id"] for p in pending] == [f"{BASE_MS + s}-{s}".encode() for s in range(6, 11)]

    async with running(consumer, collector):
        await collector.wait_for(10)
        await until(lambda: consumer.stats().acked == 10)
    assert collector.seqs == list(range(1, 11))  # 1..5 not handed twice; 6 handed once it succeeded
    assert consumer.stats().duplicates == 0


@pytest.fixture
def durable_server() -> Iterator[RedisServer]:
    """A private redis-server with AOF on, which the test stops and starts again with its data."""
    with start_redis(appendonly=True) as server:
        yield server


async def test_acks_lost_to_a_redis_stop_mid_batch_are_redelivered_and_deduped(durable_server: RedisServer) -> None:
    """Redis stops while the handler is half way through a batch: the batch's ack fails for real, the
    consumer retries until Redis is back, re-reads its pending entries and acks them without handing
    any tick to the handler twice."""
    client = aioredis.Redis.from_url(durable_server.url)
    key = "t:binance:BTCUSDT:trade"
    await add(client, key, range(1, 11))
    await client.aclose()
    seen: list[int] = []
    halfway, go_on = asyncio.Event(), asyncio.Event()

    async def handler(tick: Tick) -> None:
        seen.append(tick["seq"])
        if tick["seq"] == 5:
            halfway.set()
            await go_on.wait()

    consumer = Consumer(
        redis_url=durable_server.url, patterns=["binance:BTCUSDT:trade"], group="g", consumer="c1", prefix="t",
        block_ms=100, start_id="0", claim_idle_ms=None,
    )
    async with running(consumer, handler):
        async with asyncio.timeout(5 * UNIT):
            await halfway.wait()
        await asyncio.to_thread(durable_server.stop)
        go_on.set()  # 6..10 are handled, then the ack of 1..10 meets a stopped server
        await until(lambda: consumer.stats().reconnects >= 1)
        assert consumer.stats().acked == 0
        await asyncio.to_thread(restart, durable_server, appendonly=True)
        await until(lambda: consumer.stats().acked == 10)
    assert seen == list(range(1, 11))  # each once, in order
    stats = consumer.stats()
    assert stats.duplicates == 10 and stats.delivered == 10 and stats.reconnects >= 1
    client = aioredis.Redis.from_url(durable_server.url)
    try:
        assert (await client.xpending(key, "g"))["pending"] == 0
    finally:
        await client.aclose()


async def test_duplicate_seq_in_the_stream_is_not_handed_again(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 6))
    collector = Collector()
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"])
    async with running(consumer, collector):
        await collector.wait_for(5)
        # A re-publish of 4..5 under later IDs, then new ticks.
        await add(rc, key, [4, 5], ms=lambda s: BASE_MS + 1000 + s)
        await add(rc, key, [6, 7], ms=lambda s: BASE_MS + 2000 + s)
        await collector.wait_for(7)
        await until(lambda: consumer.stats().acked == 9)
    assert collector.seqs == [1, 2, 3, 4, 5, 6, 7]
    assert consumer.stats().duplicates == 2


async def test_idle_entries_of_a_dead_consumer_are_claimed(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 11))
    await rc.xgroup_create(key, "g", id="0")
    await rc.xreadgroup("g", "dead", {key: ">"}, count=10)
    collector = Collector()
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"], consumer="live", claim_idle_ms=300)
    async with running(consumer, collector):
        await add(rc, key, range(11, 21))
        await collector.wait_for(20)
        await until(lambda: consumer.stats().acked == 20)
    assert sorted(collector.seqs) == list(range(1, 21)) and len(collector.seqs) == 20
    assert collector.seqs[:10] == list(range(11, 21))  # live ticks did not wait for the claim
    stats = consumer.stats()
    assert stats.claimed == 10 and stats.gaps == 0
    assert (await rc.xpending(key, "g"))["pending"] == 0


async def test_invalid_entries_are_counted_reported_and_acked(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, [1])
    await rc.xadd(key, {"d": b"not json"}, id=f"{BASE_MS + 1}-100")
    await rc.xadd(key, {"other": b"1"}, id=f"{BASE_MS + 1}-101")
    await rc.xadd(key, {"d": b'{"v": 99, "seq": 3}'}, id=f"{BASE_MS + 1}-102")
    await add(rc, key, [2], ms=lambda s: BASE_MS + 5)
    bad: list[tuple[str, str, str, bool, str]] = []
    collector = Collector()
    consumer = consumer_for(
        pfx, ["binance:BTCUSDT:trade"],
        on_invalid=lambda k, i, e: bad.append(
            (k, i, type(e).__name__, isinstance(e, InvalidTick), getattr(e, "kind", ""))
        ),
    )
    async with running(consumer, collector):
        await collector.wait_for(2)
        await until(lambda: consumer.stats().acked == 5)
    assert collector.seqs == [1, 2]
    assert [b[1] for b in bad] == [f"{BASE_MS + 1}-{n}" for n in (100, 101, 102)]
    # an InvalidTick that tells its kind
    assert {b[0] for b in bad} == {key} and {b[2:4] for b in bad} == {("PoisonedEntry", True)}
    assert [b[4] for b in bad] == ["not_json", "no_field", "not_a_tick"]
    assert consumer.stats().invalid == 3
    assert consumer.stats().poisoned == {
        "no_field": 1, "too_large": 0, "not_json": 1, "not_a_tick": 1, "future_id": 0
    }
    assert (await rc.xpending(key, "g"))["pending"] == 0


async def test_gaps_are_reported_once(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, [1, 2, 3, 7, 8, 20])
    gaps: list[tuple[str, int, int]] = []
    order: list[str] = []
    collector = Collector()

    def handler(tick: Tick) -> None:
        order.append(f"tick {tick['seq']}")
        collector(tick)

    def on_gap(k: str, first: int, last: int) -> None:
        order.append(f"gap {first}-{last}")
        gaps.append((k, first, last))

    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"], on_gap=on_gap)
    async with running(consumer, handler):
        await collector.wait_for(6)
    assert gaps == [(key, 4, 6), (key, 9, 19)]
    assert order.index("gap 4-6") == order.index("tick 7") - 1
    stats = consumer.stats()
    assert (stats.gaps, stats.gap_ticks) == (2, 14)


async def test_holes_given_to_another_group_member_are_not_gaps(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    gaps: list[tuple[str, int, int]] = []
    collector = Collector()
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"], on_gap=lambda *g: gaps.append(g))
    await add(rc, key, range(1, 11))
    async with running(consumer, collector):
        await collector.wait_for(10)
    # Another member of the group takes 11..20, then 21..30 arrive for us.
    await add(rc, key, range(11, 21))
    got = await rc.xreadgroup("g", "other", {key: ">"}, count=100)
    await rc.xack(key, "g", *[eid for eid, _ in got[0][1]])
    await add(rc, key, range(21, 31))
    async with running(consumer, collector):
        await collector.wait_for(20)
    assert collector.seqs == list(range(1, 11)) + list(range(21, 31))
    assert gaps == [] and consumer.stats().gaps == 0


async def test_glob_picks_up_a_stream_created_after_start(rc: aioredis.Redis, pfx: str) -> None:
    old = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, old, range(1, 4))
    collector = Collector()
    consumer = consumer_for(pfx, ["binance:*:trade"], start_id="$", rescan_s=0.1)
    async with running(consumer, collector):
        await until(lambda: consumer.stats().keys == 1)
        new = f"{pfx}:binance:ETHUSDT:trade"
        await rc.xadd(f"{pfx}:binance:ETHUSDT:book_ticker", {"d": b"{}"})  # not matched
        await add(rc, new, range(1, 6))  # written before the consumer finds the stream: still new
        await collector.wait_for(5)
        await until(lambda: consumer.stats().keys == 2)
    assert collector.seqs == [1, 2, 3, 4, 5] and set(collector.keys) == {"ETHUSDT"}
    assert sorted(consumer.keys) == sorted([old, new])


async def test_nogroup_after_group_or_stream_deleted(rc: aioredis.Redis, pfx: str) -> None:
    literal = f"{pfx}:binance:BTCUSDT:trade"
    globbed = f"{pfx}:binance:ETHUSDT:trade"
    await add(rc, literal, range(1, 4))
    await add(rc, globbed, range(1, 4))
    collector = Collector()
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade", "binance:ETH*:trade"], rescan_s=0.1)
    async with running(consumer, collector):
        await collector.wait_for(6)
        await rc.xgroup_destroy(literal, "g")  # wakes the blocked read with NOGROUP
        await add(rc, literal, range(4, 6))
        await collector.wait_for(8)
        await rc.delete(globbed)  # wakes the blocked read with UNBLOCKED
        await until(lambda: consumer.stats().nogroup_recoveries >= 1)
        await add(rc, globbed, range(4, 7))  # the writer starts the stream again
        await collector.wait_for(11)
    by_symbol = sorted(zip(collector.keys, collector.seqs, strict=True))
    assert [s for k, s in by_symbol if k == "BTCUSDT"] == [1, 2, 3, 4, 5]
    assert [s for k, s in by_symbol if k == "ETHUSDT"] == [1, 2, 3, 4, 5, 6]
    assert consumer.stats().nogroup_recoveries >= 1
    assert consumer.stats().reconnects == 0


async def test_survives_a_redis_restart_and_dedupes_a_replay(private_server: PrivateRedis) -> None:
    client = aioredis.Redis.from_url(private_server.url)
    key = "md:binance:BTCUSDT:trade"
    await add(client, key, range(1, 6))
    collector = Collector()
    consumer = Consumer(
        redis_url=private_server.url, patterns=["binance:BTCUSDT:trade"], group="g", consumer="c1",
        block_ms=100, start_id="0", claim_idle_ms=None,
    )
    async with running(consumer, collector):
        await collector.wait_for(5)
        private_server.stop()
        await until(lambda: consumer.stats().reconnects >= 1)
        private_server.start()  # empty: no persistence
        await until(lambda: consumer.stats().nogroup_recoveries >= 1)
        await client.aclose()
        client = aioredis.Redis.from_url(private_server.url)
        # The ingestor re-publishes from its log, overlapping what was already read.
        await add(client, key, range(4, 11))
        await collector.wait_for(10)
        # 1..5 may or may not have been acked before the stop; 4..10 all are, after it.
        await until(lambda: consumer.stats().acked >= 7 and consumer.stats().duplicates == 2)
    assert collector.seqs == list(range(1, 11))
    stats = consumer.stats()
    assert stats.duplicates == 2 and stats.reconnects >= 1 and stats.nogroup_recoveries >= 1
    assert (await client.xpending(key, "g"))["pending"] == 0
    await client.aclose()


async def blocked_for(rc: aioredis.Redis, name: str) -> int:
    """Seconds the longest-blocked connection named ``name`` has been waiting on the server (-1: none blocked)."""
    clients: Any = await rc.client_list()
    waits = [int(c["idle"]) for c in clients if c.get("name") == name and "b" in c.get("flags", "")]
    return max(waits, default=-1)


async def test_blocking_longer_than_the_socket_timeout(rc: aioredis.Redis, pfx: str) -> None:
    """A client given with a socket timeout (0.5 s) shorter than the block (an hour) is read through its own
    pool: the blocking reads outlast the timeout on the server, nothing reconnects, and ticks still arrive."""
    key = f"{pfx}:binance:BTCUSDT:trade"
    block_ms = 3_600_000
    for_consumer = aioredis.Redis.from_url(REDIS_URL, socket_timeout=0.5, client_name=f"{pfx}-consumer")
    for_follow = aioredis.Redis.from_url(REDIS_URL, socket_timeout=0.5, client_name=f"{pfx}-follow")
    by_url, by_client = Collector(), Collector()
    c_url = consumer_for(pfx, [key], group="g1", block_ms=block_ms, start_id="$",
                         redis_url=f"{REDIS_URL}?client_name={pfx}-url")
    c_client = consumer_for(pfx, [key], group="g2", block_ms=block_ms, start_id="$", redis_url=None,
                            redis=for_consumer)
    followed: list[int] = []

    async def tail() -> None:
        async for _key, _id, tick in follow(for_follow, [key], block_ms=block_ms):
            followed.append(tick["seq"])
            if tick["seq"] == 2:
                return

    async with running(c_url, by_url), running(c_client, by_client):
        tail_task = asyncio.create_task(tail())
        names = [f"{pfx}-url", f"{pfx}-consumer", f"{pfx}-follow"]
        async with asyncio.timeout(10 * UNIT):
            # the server's own count, in whole seconds: 1 is at least twice the 0.5 s socket timeout
            while min([await blocked_for(rc, name) for name in names]) < 1:
                await asyncio.sleep(0.05)  # poll
        await add(rc, key, [1, 2])
        await by_url.wait_for(2)
        await by_client.wait_for(2)
        async with asyncio.timeout(5 * UNIT):
            await tail_task
    assert by_url.seqs == by_client.seqs == followed == [1, 2]
    assert c_url.stats().reconnects == 0 and c_client.stats().reconnects == 0
    await for_consumer.aclose()
    await for_follow.aclose()


async def test_group_behind_trimmed_history(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 101))
    await rc.xgroup_create(key, "g", id="0")
    got = await rc.xreadgroup("g", "c1", {key: ">"}, count=10)
    await rc.xack(key, "g", *[eid for eid, _ in got[0][1]])
    await rc.xtrim(key, maxlen=50, approximate=False)  # 1..50 gone; the group had read 1..10

    collector = Collector()
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"])
    with pytest.raises(TrimmedError) as err:
        async with asyncio.timeout(5 * UNIT):
            await consumer.run(collector)
    assert err.value.key == key
    assert err.value.first_missing == f"{BASE_MS + 10}-11"
    assert err.value.first_available == f"{BASE_MS + 51}-51"
    assert collector.seqs == []

    async with running(consumer, collector):  # reported once: the same consumer goes on
        await collector.wait_for(50)
    assert collector.seqs == list(range(51, 101))
    assert consumer.stats().trimmed == 1

    trims: list[tuple[str, str, str | None]] = []
    await rc.xgroup_setid(key, "g", f"{BASE_MS + 10}-10")
    hooked = consumer_for(pfx, ["binance:BTCUSDT:trade"], on_trimmed=lambda *t: trims.append(t))
    other = Collector()
    async with running(hooked, other):
        await other.wait_for(50)
    assert trims == [(key, f"{BASE_MS + 10}-11", f"{BASE_MS + 51}-51")]


async def test_trimmed_while_running_and_deleted_pending(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    trims: list[tuple[str, str, str | None]] = []
    gaps: list[tuple[str, int, int]] = []
    collector = Collector()
    consumer = consumer_for(
        pfx, ["binance:BTCUSDT:trade"], on_trimmed=lambda *t: trims.append(t), on_gap=lambda *g: gaps.append(g)
    )
    await add(rc, key, range(1, 6))
    async with running(consumer, collector):
        await collector.wait_for(5)
        async with rc.pipeline(transaction=True) as tx:  # the writer outruns us and trims
            for s in range(6, 101):
                tx.xadd(key, {"d": encode_tick(make_tick(s))}, id=f"{BASE_MS + s}-{s}")
            tx.xtrim(key, maxlen=10, approximate=False)
            await tx.execute()
        await collector.wait_for(15)
    assert collector.seqs == list(range(1, 6)) + list(range(91, 101))
    assert trims == [(key, f"{BASE_MS + 5}-6", f"{BASE_MS + 91}-91")]
    assert gaps == []  # told once, as trimmed, not also as a venue gap

    # An entry given to a consumer and deleted before it was processed.
    await add(rc, key, range(101, 106))
    await rc.xreadgroup("g", "c1", {key: ">"}, count=10)
    await rc.xdel(key, f"{BASE_MS + 103}-103")
    async with running(consumer, collector):
        await collector.wait_for(19)
        await until(lambda: consumer.stats().acked == 20)
    assert collector.seqs[-4:] == [101, 102, 104, 105]
    assert trims[1:] == [(key, f"{BASE_MS + 103}-103", f"{BASE_MS + 104}-104")]  # reported once
    assert gaps == []  # a deleted entry is trimmed history, not a venue gap
    assert consumer.stats().trimmed == 2
    assert (await rc.xpending(key, "g"))["pending"] == 0


async def test_lag_counts_what_the_group_has_not_read(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 11))
    collector = Collector()
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"])
    async with running(consumer, collector):
        await collector.wait_for(10)
    await add(rc, key, range(11, 18))
    assert await consumer.lag() == {key: 7}


async def test_batches_ack_when_the_next_one_is_asked_for(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    await add(rc, key, range(1, 26))
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"], count=10)
    seen: list[tuple[str, str, int]] = []
    pending_while_held: list[int] = []
    async with asyncio.timeout(5 * UNIT):
        async for batch in consumer.batches():
            seen.extend((k, i, t["seq"]) for k, i, t in batch)
            pending_while_held.append((await rc.xpending(key, "g"))["pending"])
            if len(seen) == 25:
                consumer.stop()
    assert [s for _k, _i, s in seen] == list(range(1, 26))
    assert seen[0][:2] == (key, f"{BASE_MS + 1}-1")
    assert pending_while_held == [10, 10, 5]
    assert (await rc.xpending(key, "g"))["pending"] == 5  # the last batch was not acked


async def test_stop_interrupts_a_long_block_and_run_refuses_reentry(pfx: str) -> None:
    """The read blocks for an hour: run() returning at all after stop() means the block was interrupted."""
    consumer = consumer_for(pfx, [f"{pfx}:binance:BTCUSDT:trade"], block_ms=3_600_000)
    task = asyncio.create_task(consumer.run(Collector()))
    await until(lambda: consumer._read_task is not None)
    with pytest.raises(RuntimeError, match="already running"):
        await consumer.run(Collector())
    consumer.stop()
    async with asyncio.timeout(5 * UNIT):
        await task
    assert task.done() and task.exception() is None
    consumer.stop()  # before run(): it returns at once
    async with asyncio.timeout(1 * UNIT):
        await consumer.run(Collector())


async def test_stop_cancels_a_read_again_when_a_cancellation_was_lost() -> None:
    # Python 3.11's asyncio.wait_for, inside redis-py's send, can drop a cancellation; stop() insists.
    started = asyncio.Event()

    async def loses_one_cancellation() -> None:
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await asyncio.Event().wait()

    consumer = consumer_for("unused", ["binance:BTCUSDT:trade"])
    read = asyncio.create_task(loses_one_cancellation())
    await started.wait()  # it is inside the first wait, where one cancellation gets lost
    consumer._read_task = read
    consumer.stop()
    async with asyncio.timeout(1 * UNIT):
        with contextlib.suppress(asyncio.CancelledError):
            await read
    assert read.cancelled()


async def test_cancelling_run_leaves_the_consumer_reusable(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"], block_ms=5000)
    task = asyncio.create_task(consumer.run(Collector()))
    await until(lambda: consumer._read_task is not None)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await add(rc, key, [1])
    collector = Collector()
    async with running(consumer, collector):
        await collector.wait_for(1)


async def test_wrong_key_type_is_a_config_error(rc: aioredis.Redis, pfx: str) -> None:
    await rc.set(f"{pfx}:binance:BTCUSDT:trade", b"not a stream")
    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"])
    with pytest.raises(ConfigError):
        async with asyncio.timeout(5 * UNIT):
            await consumer.run(Collector())


async def test_a_backlog_of_twenty_thousand_is_read_handled_and_acked(rc: aioredis.Redis, pfx: str) -> None:
    """Every entry of a large backlog once, all acked.  How fast is `market bench reader`'s question."""
    key = f"{pfx}:binance:BTCUSDT:trade"
    n = 20_000
    for base in range(0, n, 5000):
        await add(rc, key, range(base + 1, base + 5001))
    done = asyncio.Event()
    count = 0

    def handler(_tick: Tick) -> None:
        nonlocal count
        count += 1
        if count == n:
            done.set()

    consumer = consumer_for(pfx, ["binance:BTCUSDT:trade"])
    async with running(consumer, handler):
        async with asyncio.timeout(30 * UNIT):
            await done.wait()
        await until(lambda: consumer.stats().acked == n)
    stats = consumer.stats()
    assert (stats.delivered, stats.acked, stats.duplicates, stats.gaps) == (n, n, 0, 0)
    assert (await rc.xpending(key, "g"))["pending"] == 0


async def test_start_id_may_be_a_time_or_a_seq(rc: aioredis.Redis, pfx: str) -> None:
    btc, eth = f"{pfx}:binance:BTCUSDT:trade", f"{pfx}:binance:ETHUSDT:trade"
    await add(rc, btc, range(1, 11))
    await add(rc, eth, range(1, 11))
    by_time, by_seq = Collector(), Collector()
    c_time = consumer_for(pfx, ["binance:*:trade"], group="gt", start_id="2023-11-14T22:13:20.007Z")
    c_seq = consumer_for(pfx, ["binance:BTCUSDT:trade"], group="gs", start_id="seq:4")
    async with running(c_time, by_time), running(c_seq, by_seq):
        await by_time.wait_for(8)
        await by_seq.wait_for(7)
    assert sorted(by_time.seqs) == [7, 7, 8, 8, 9, 9, 10, 10]
    assert by_seq.seqs == [4, 5, 6, 7, 8, 9, 10]
    with pytest.raises(ConfigError):
        consumer_for(pfx, ["binance:*:trade"], start_id="yesterday")

    await rc.xtrim(btc, maxlen=3, approximate=False)
    trims: list[tuple[str, str, str | None]] = []
    late = Collector()
    c_late = consumer_for(
        pfx, ["binance:BTCUSDT:trade"], group="gl", start_id="seq:2", on_trimmed=lambda *t: trims.append(t)
    )
    async with running(c_late, late):
        await late.wait_for(3)
    assert late.seqs == [8, 9, 10]
    assert trims == [(btc, "seq:2", f"{BASE_MS + 8}-8")]


async def test_two_members_of_a_group_share_a_stream_without_false_gaps(rc: aioredis.Redis, pfx: str) -> None:
    key = f"{pfx}:binance:BTCUSDT:trade"
    gaps: list[tuple[str, int, int]] = []
    first, second = Collector(), Collector()
    c1 = consumer_for(pfx, ["binance:BTCUSDT:trade"], consumer="c1", count=5, on_gap=lambda *g: gaps.append(g))
    c2 = consumer_for(pfx, ["binance:BTCUSDT:trade"], consumer="c2", count=5, on_gap=lambda *g: gaps.append(g))
    await rc.xgroup_create(key, "g", id="0", mkstream=True)
    async with running(c1, first), running(c2, second):
        await until(lambda: c1._read_task is not None and c2._read_task is not None)
        for base in range(0, 200, 20):
            await add(rc, key, range(base + 1, base + 21))
            await until(lambda b=base: len(first.seqs) + len(second.seqs) == b + 20)  # type: ignore[misc]
    assert sorted(first.seqs + second.seqs) == list(range(1, 201))
    assert first.seqs and second.seqs  # both were given a share
    assert gaps == [] and c1.stats().gaps == c2.stats().gaps == 0


async def test_starting_while_redis_is_down_waits_for_it(private_server: PrivateRedis) -> None:
    private_server.stop()
    collector = Collector()
    consumer = Consumer(
        redis_url=private_server.url, patterns=["binance:BTCUSDT:trade"], group="g", consumer="c1",
        block_ms=100, start_id="seq:1", claim_idle_ms=None,
    )
    async with running(consumer, collector):
        await until(lambda: consumer.stats().reconnects >= 2)
        private_server.start()
        client = aioredis.Redis.from_url(private_server.url)
        await until(lambda: consumer.stats().keys == 1)
        await add(client, "md:binance:BTCUSDT:trade", range(1, 4))
        await collector.wait_for(3)
        await client.aclose()
    assert collector.seqs == [1, 2, 3]
