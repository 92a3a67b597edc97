"""Redis at maxmemory (noeviction) and other error replies: the writer never drops a tick it could store later.

The fault is real: a private redis-server whose ``maxmemory`` is set below what it uses, with
``maxmemory-policy noeviction``, so every write is refused with ``OOM`` until the limit is lifted.  The
checks: nothing is acknowledged as stored while it lasts, the metrics, the heartbeat and ``market status``
say so, and once the limit is lifted every seq is stored exactly once, in order, with no hole.  The error
table (:func:`distributor.writer.classify_error`) and the partial-batch bookkeeping
(:func:`distributor.writer.settle`) are pure and tested on their own.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.core import Metric
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

import distributor.writer as writer_module
from consumer_sdk.core.keys import parse_entry_id, stream_key
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import Tick, is_gap_marker
from distributor.control import ControlGate
from distributor.ingress import IngressQueue, Policy
from distributor.writer import (
    REASONS,
    Action,
    ErrorClass,
    Retention,
    Stop,
    StreamWriter,
    WriteRefused,
    classify_error,
    settle,
)
from ingestor.config import IngestSettings
from ingestor.heartbeat import (
    HeartbeatState,
    Identity,
    build_heartbeat,
    heartbeat_key,
    heartbeat_loop,
    heartbeat_set_key,
)
from ingestor.metrics import IngestorCollector
from ingestor.sequencer import Sequencer
from ingestor.service import Ingestor
from ingestor.session import SessionSettings
from ingestor.snapshot import IngestorSnapshot
from ops.redis_server import RedisServer
from ops.simulator import Simulator, SimulatorConfig
from ops.status import Level, collect, dead_key, evaluate

UNIT = 1.0  # seconds; every wait below is a small multiple of it
T0_MS = 1_700_000_000_000
OOM_TEXT = "Redis out of memory: raise maxmemory or lower retention"


def make_tick(seq: int, ms: int, symbol: str = "BTCUSDT") -> Tick:
    """A trade; ``ms`` is the venue event time in milliseconds."""
    t: dict[str, Any] = {
        "v": 1, "venue": "binance", "symbol": symbol, "channel": "trade", "seq": seq,
        "ts_event": ms * 1000 + 123, "ts_recv": ms * 1000 + 4567, "trade_id": seq, "price": "43000.10",
        "qty": "0.00100000", "side": "buy" if seq % 2 else "sell",
    }
    return t  # type: ignore[return-value]


def key_of(prefix: str, t: Tick) -> str:
    return stream_key(t["venue"], t["symbol"], t["channel"], prefix=prefix)


async def stored_seqs(client: aioredis.Redis, key: str) -> list[int]:
    return [parse_entry_id(eid)[1] for eid, _ in await client.xrange(key)]


def reply(text: str) -> Exception:
    """The exception redis-py raises for the error reply ``text`` (its own parser, as on the wire)."""
    exc: Exception = BaseParser.parse_error(text)
    return exc


async def refuse_writes(client: aioredis.Redis) -> None:
    """``maxmemory`` below what the server uses, ``noeviction``: every write is refused with OOM."""
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", max(1, used // 2))


async def lift_limit(client: aioredis.Redis) -> None:
    await client.config_set("maxmemory", 0)


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (state another task moves) until it holds; fail naming ``what`` after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await asyncio.sleep(UNIT / 100)  # poll
    except TimeoutError:
        pytest.fail(f"{what}: not within {timeout} s")


async def wait_until_async(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Poll ``condition`` (a read of Redis) until it holds; fail naming ``what`` after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(UNIT / 20)  # poll
    except TimeoutError:
        pytest.fail(f"{what}: not within {timeout} s")


def private_client(server: RedisServer) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5 * UNIT, socket_connect_timeout=UNIT)


def interleaved(first: int, last: int, symbols: tuple[str, ...]) -> list[Tick]:
    """Trades ``first..last`` of each symbol, interleaved as a feed delivers them."""
    return [make_tick(s, T0_MS + s, sym) for s in range(first, last + 1) for sym in symbols]


class WriterOnly:
    """An ingestor whose only running part is ``writer``, as the heartbeat reads it (its snapshot)."""

    def __init__(self, writer: StreamWriter) -> None:
        self.settings = IngestSettings(url="ws://127.0.0.1:1", redis_url="redis://127.0.0.1:1/0", prefix="oom")
        self.writer = writer
        self.ingress: IngressQueue[Tick] = IngressQueue(100, Policy.BLOCK)
        self.heartbeat = HeartbeatState()

    def snapshot(self) -> IngestorSnapshot:
        s = self.settings
        return IngestorSnapshot(
            venue=s.venue, url=s.url, redis_url=s.redis_url, prefix=s.prefix, channels=tuple(s.channels), sessions=(),
            ingress=self.ingress.stats(), hotpath=None, batch_handlers=0, writer=self.writer.snapshot(),
            sequence=Sequencer().stats(), sequence_by_channel={}, repair=None, control=ControlGate().stats(),
            control_rejected=0, ingest_latency=LatencyHistogram(),
        )


def heartbeat_of_ingestor(writer: StreamWriter) -> WriterOnly:
    """An ingestor whose only running part is ``writer``, as the heartbeat reads it."""
    return WriterOnly(writer)


def heartbeat_of(writer: StreamWriter, now: float, state: HeartbeatState) -> dict[str, Any]:
    """The heartbeat of an ingestor whose only running part is ``writer``."""
    return build_heartbeat(heartbeat_of_ingestor(writer), now, state=state)


def samples(metrics: list[Metric], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for m in metrics for s in m.samples if s.name == name}


def writer_metrics(writer: StreamWriter) -> list[Metric]:
    """What the ingestor's exporter shows for ``writer`` (its collector, on an ingestor holding it)."""
    ing = Ingestor(IngestSettings(url="ws://127.0.0.1:1", prefix="oom"))
    ing.writer = writer
    return list(IngestorCollector(ing).collect())


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[dict[str, Any]]:
    return [
        {"level": r.levelname, **getattr(r, "fields", {})}
        for r in caplog.records if r.name == "market.writer" and r.getMessage() == name
    ]


# -- the error table (pure) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason", "action"),
    [
        # as redis-py raises them: its parser strips the prefix of the replies it has a class for
        (reply("OOM command not allowed when used memory > 'maxmemory'."), "oom", Action.RETRY),
        (reply("READONLY You can't write against a read only replica."), "readonly", Action.RETRY),
        (reply("LOADING Redis is loading the dataset in memory"), "loading", Action.RETRY),
        (reply("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."),
         "busy", Action.RETRY),
        (reply("NOSCRIPT No matching script. Please use EVAL."), "noscript", Action.RETRY),
        (reply("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
         "masterdown", Action.RETRY),
        (reply("CLUSTERDOWN The cluster is down"), "clusterdown", Action.RETRY),
        (reply("TRYAGAIN Multiple keys request during rehashing of slot"), "tryagain", Action.RETRY),
        (reply("MOVED 3999 127.0.0.1:6381"), "moved", Action.RETRY),
        (reply("ASK 3999 127.0.0.1:6381"), "moved", Action.RETRY),
        (reply("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk."),
         "misconf", Action.RETRY),
        (reply("NOREPLICAS Not enough good replicas to write."), "noreplicas", Action.RETRY),
        (reply("NOPERM User market has no permissions to run the 'evalsha' command"), "noperm", Action.RETRY),
        (reply("NOAUTH Authentication required."), "auth", Action.RETRY),
        (reply("WRONGTYPE Operation against a key holding the wrong kind of value"), "wrongtype",
         Action.DEAD_LETTER),
        (reply("ERR The ID specified in XADD is equal or smaller than the target stream top item"), "bad_id",
         Action.DEAD_LETTER),
        (reply("ERR Invalid stream ID specified as stream command argument"), "bad_id", Action.DEAD_LETTER),
        (reply("ERR Error running script (call to f_0123): @user_script:7: something unforeseen"), "other",
         Action.RETRY),
        (RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."), "unreachable",
         Action.RETRY),
        (RedisTimeoutError("Timeout reading from socket"), "unreachable", Action.RETRY),
        (ConnectionResetError(104, "Connection reset by peer"), "unreachable", Action.RETRY),
        (ValueError("not a Redis error at all"), "other", Action.RETRY),
        # as the script returns them (the reply's whole text, prefix and all)
        ("OOM command not allowed when used memory > 'maxmemory'.", "oom", Action.RETRY),
        ("READONLY You can't write against a read only replica.", "readonly", Action.RETRY),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", "wrongtype", Action.DEAD_LETTER),
        ("ERR The ID specified in XADD must be greater than 0-0", "bad_id", Action.DEAD_LETTER),
        ("ERR Invalid stream ID specified as stream command argument", "bad_id", Action.DEAD_LETTER),
        ("ERR something else", "other", Action.RETRY),
        ("", "other", Action.RETRY),
    ],
    ids=lambda v: v if isinstance(v, str) and v else type(v).__name__,
)
def test_error_table(error: BaseException | str, reason: str, action: Action) -> None:
    found = classify_error(error)
    assert (found.reason, found.action) == (reason, action)
    assert found.reason in REASONS


def test_the_classes_redis_py_raises_are_the_ones_matched() -> None:
    """The parser turns these replies into specific exception classes whose text lacks the prefix."""
    oom = reply("OOM command not allowed when used memory > 'maxmemory'.")
    assert type(oom).__name__ == "OutOfMemoryError" and not str(oom).startswith("OOM")
    assert type(reply("LOADING Redis is loading")).__name__ == "BusyLoadingError"
    assert type(reply("READONLY You can't write")).__name__ == "ReadOnlyError"
    assert writer_module.error_text(oom) == "OOM command not allowed when used memory > 'maxmemory'."


def test_only_a_key_of_another_type_dead_letters_the_rest_of_its_stream() -> None:
    assert classify_error("WRONGTYPE Operation against a key").whole_stream
    assert not classify_error("ERR Invalid stream ID specified as stream command argument").whole_stream
    assert {"wrongtype", "bad_id"} == writer_module.DEAD_LETTER_REASONS


# -- what a stopped batch leaves (pure) ------------------------------------------------------------------------------
OOM = classify_error("OOM command not allowed")
WRONGTYPE = classify_error("WRONGTYPE Operation against a key holding the wrong kind of value")
BAD_ID = classify_error("ERR Invalid stream ID specified as stream command argument")


def test_settle_a_stream_stopped_after_its_first_k() -> None:
    keys = ["a", "b", "a", "a", "b", "a", "a"]  # a: positions 0 2 3 5 6; b: 1 4
    plan = settle(keys, {"a": Stop(2, OOM, "OOM ...")})
    assert plan.retry == [3, 5, 6]  # a's first two were settled; the rest, in order; b was settled whole
    assert plan.dead == [] and plan.refused == {"oom": 3}


def test_settle_nothing_stored_keeps_the_whole_stream() -> None:
    keys = ["a", "b"] * 3
    plan = settle(keys, {"a": Stop(0, OOM, "OOM"), "b": Stop(0, OOM, "OOM")})
    assert plan.retry == [0, 1, 2, 3, 4, 5] and plan.refused == {"oom": 6}


def test_settle_a_key_of_another_type_dead_letters_its_stream() -> None:
    keys = ["a", "b", "a", "b", "a"]
    stop = Stop(0, WRONGTYPE, "WRONGTYPE ...")
    plan = settle(keys, {"b": stop})
    assert plan.retry == [] and plan.dead == [(1, "b", stop), (3, "b", stop)]
    assert plan.refused == {"wrongtype": 2}


def test_settle_a_bad_id_dead_letters_that_tick_only() -> None:
    keys = ["a"] * 5
    stop = Stop(2, BAD_ID, "ERR Invalid stream ID")
    plan = settle(keys, {"a": stop})
    assert plan.dead == [(2, "a", stop)] and plan.retry == [3, 4] and plan.refused == {"bad_id": 1}


def test_settle_counts_no_refusal_when_redis_did_not_answer() -> None:
    plan = settle(["a", "a"], {"a": Stop(0, classify_error(RedisConnectionError("reset")), "reset")})
    assert plan.retry == [0, 1] and plan.refused == {}


def test_settle_a_retryable_class_never_dead_letters() -> None:
    keys = ["a"] * 3
    plan = settle(keys, {"a": Stop(1, ErrorClass("other"), "ERR what")})
    assert plan.dead == [] and plan.retry == [1, 2]


# -- the real fault --------------------------------------------------------------------------------------------------
SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")


async def test_oom_refuses_everything_then_each_tick_is_stored_once_in_order(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="market.writer")
    client = private_client(private_redis)
    writer = StreamWriter(client, prefix="oom", max_batch=64)
    before, during, after = interleaved(1, 50, SYMBOLS), interleaved(51, 250, SYMBOLS), interleaved(251, 300, SYMBOLS)
    keys = [key_of("oom", t) for t in before[: len(SYMBOLS)]]
    state = HeartbeatState(Identity(host="h", pid=1, start_id="oom", started_at=time.time()))
    # The ingestor's heartbeat goes to the same Redis, as with one Redis for everything; and an id whose
    # heartbeat expired before the memory ran out, so the status must note its death under OOM.
    beating = HeartbeatState(Identity(host="h", pid=1, start_id="beat", started_at=time.time()))
    await client.sadd(heartbeat_set_key("oom"), "h-2-gone")
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(writer.run())
            beat = tg.create_task(heartbeat_loop(
                heartbeat_of_ingestor(writer), client, prefix="oom", interval=0.1, ttl=1.0,
                state=beating,
            ))
            assert writer.submit(before)
            async with asyncio.timeout(5 * UNIT):
                await writer.drain()

            await refuse_writes(client)
            for i in range(0, len(during), 30):
                assert writer.submit(during[i:i + 30])
            await wait_until(lambda: writer.failing == "oom" and writer.errors >= 2, 5 * UNIT, "OOM seen")

            async def beat_stored_under_oom() -> bool:
                raw = await client.get(heartbeat_key("oom", beating.identity.id))
                return raw is not None and orjson.loads(raw)["writer"]["oom"] is True

            await wait_until_async(beat_stored_under_oom, 5 * UNIT, "a heartbeat stored while Redis is out of memory")
            async with asyncio.timeout(5 * UNIT):
                report = evaluate(*(await collect(client, "oom")), time.time())
            assert report.stage("redis").level is Level.FAIL, report.stage("redis")
            assert report.stage("redis").cause.startswith(OOM_TEXT), report.stage("redis")
            assert report.stage("ingestor").reason == (
                "ingestor FAIL: ingestor h-2-gone stopped reporting (heartbeat expired); 1 other(s) reporting"
            ), "the live one reports; the dead one is named, its time of death not recorded under OOM"
            assert not await client.hexists(dead_key("oom"), "h-2-gone")
            stored = writer.appended
            lengths = [await client.xlen(k) for k in keys]
            errors = writer.errors
            await wait_until(lambda: writer.errors >= errors + 3, 10 * UNIT, "three more refused attempts")
            # Nothing acknowledged as stored while Redis refuses, and nothing reached the streams.
            assert writer.appended == stored == len(before)
            assert [await client.xlen(k) for k in keys] == lengths == [50, 50, 50]
            assert not task.done()

            stats = writer.stats()
            assert stats.connected, "Redis answers: it is reachable, and refusing"
            assert stats.failing == "oom" and stats.failing_for_s > 0
            assert stats.rejected_by_reason.get("oom", 0) >= 64 and stats.dead_lettered == 0
            assert stats.buffered >= len(during) - 64  # all held: in the buffer, or in the batch in flight

            got = samples(writer_metrics(writer), "market_redis_oom")
            assert got == {(): 1.0}
            metrics = writer_metrics(writer)
            assert samples(metrics, "market_writer_retrying") == {(): 1.0}
            assert samples(metrics, "market_redis_up") == {(): 1.0}
            assert samples(metrics, "market_writer_rejected_total")[(("reason", "oom"),)] >= 64

            now = time.time()
            doc = heartbeat_of(writer, now, state)
            assert doc["writer"]["oom"] is True and doc["writer"]["failing"] == "oom"
            assert doc["writer"]["rejected_by_reason"]["oom"] >= 64 and doc["writer"]["rejected_recent"] >= 64
            redis_stage = evaluate([doc], [], now).stage("redis")
            assert redis_stage.level is Level.FAIL and redis_stage.cause.startswith(OOM_TEXT), redis_stage

            await lift_limit(client)
            assert writer.submit(after)
            async with asyncio.timeout(10 * UNIT):
                await writer.drain()
            task.cancel()
            beat.cancel()

        everything = before + during + after
        for key in keys:
            assert await stored_seqs(client, key) == list(range(1, 301)), key
        stats = writer.stats()
        assert stats.appended == len(everything)
        assert stats.duplicates == 0, "no stored tick was sent again: refused calls wrote nothing"
        assert stats.failing == "" and stats.buffered == 0
        assert samples(writer_metrics(writer), "market_redis_oom") == {(): 0.0}
        doc = heartbeat_of(writer, time.time(), state)
        assert doc["writer"]["oom"] is False
        assert evaluate([doc], [], time.time()).stage("redis").level is not Level.FAIL

        refused = events(caplog, "redis_write_refused")
        assert refused[0]["level"] == "ERROR" and refused[0]["reason"] == "oom"
        assert refused[0]["action"] == "raise maxmemory or lower retention"
        assert len([e for e in refused if e["level"] == "ERROR"]) == 1, "one error line per episode"
        recovered = events(caplog, "redis_write_recovered")
        assert len(recovered) == 1 and recovered[0]["reason"] == "oom" and recovered[0]["failed_for_s"] > 0
    finally:
        await client.aclose()


async def test_memory_running_out_mid_stream(private_redis: RedisServer) -> None:
    """Redis reaches its limit while the writer writes: each call runs whole or is refused whole."""
    client = private_client(private_redis)
    symbols = tuple(f"S{i}USDT" for i in range(8))
    writer = StreamWriter(client, prefix="oom", max_batch=2000, retention=Retention(maxlen=0))
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("maxmemory", used + 2_000_000)  # room for a few thousand ticks
    total = 0
    try:
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(writer.run())
            async with asyncio.timeout(30 * UNIT):
                while not writer.failing:
                    assert total < 100_000 * len(symbols), "2 MB never ran out"
                    first = total // len(symbols) + 1
                    assert writer.submit(interleaved(first, first + 99, symbols))
                    total += 100 * len(symbols)
                    await asyncio.sleep(0)
            assert writer.failing == "oom"
            assert 0 < writer.appended < total
            await lift_limit(client)
            async with asyncio.timeout(20 * UNIT):
                await writer.drain()
            task.cancel()
        per_stream = total // len(symbols)
        for sym in symbols:
            assert await stored_seqs(client, f"oom:binance:{sym}:trade") == list(range(1, per_stream + 1))
        assert writer.appended == total and writer.duplicates == 0
    finally:
        await client.aclose()


async def test_oom_met_inside_the_script_keeps_every_stream_whole(
    private_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the shebang (no flags), Redis lets the script start and refuses its first XADD: each
    stream stops before writing and reports the OOM text; the writer keeps them all, in order."""
    body = writer_module.APPEND_SCRIPT.partition("\n")[2]
    assert writer_module.APPEND_SCRIPT.startswith("#!lua\n") and not body.startswith("#!")
    monkeypatch.setattr(writer_module, "APPEND_SCRIPT", body)
    client = private_client(private_redis)
    writer = StreamWriter(client, prefix="oom")
    ticks = interleaved(1, 20, SYMBOLS)
    try:
        await refuse_writes(client)
        await client.config_resetstat()
        with pytest.raises(WriteRefused) as refused:
            await writer.append(ticks)
        stats = await client.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == 1, "the script ran"
        assert stats["cmdstat_xadd"]["rejected_calls"] == len(SYMBOLS), "and stopped each stream at its first XADD"
        assert stats["cmdstat_xadd"]["calls"] == 0
        assert refused.value.error.reason == "oom" and str(refused.value).startswith("OOM ")
        assert refused.value.remaining == ticks and refused.value.added == 0
        assert writer.rejected_by_reason == {"oom": len(ticks)}
        await lift_limit(client)
        assert await writer.append(refused.value.remaining) == (len(ticks), 0)
        for sym in SYMBOLS:
            assert await stored_seqs(client, f"oom:binance:{sym}:trade") == list(range(1, 21))
    finally:
        await client.aclose()


async def test_a_refused_call_with_the_flags_wrote_nothing(private_redis: RedisServer) -> None:
    """With the shebang, Redis refuses the whole call before it runs: append raises with every tick."""
    client = private_client(private_redis)
    writer = StreamWriter(client, prefix="oom")
    ticks = interleaved(1, 20, SYMBOLS)
    try:
        assert await writer.append(ticks[:6]) == (6, 0)
        await refuse_writes(client)
        await client.config_resetstat()
        with pytest.raises(WriteRefused) as refused:
            await writer.append(ticks)
        stats = await client.info("commandstats")
        assert stats["cmdstat_evalsha"]["rejected_calls"] == 1 and stats["cmdstat_evalsha"]["calls"] == 0
        assert "cmdstat_xrevrange" not in stats and "cmdstat_xadd" not in stats, "the script never ran"
        assert refused.value.error.reason == "oom"
        assert refused.value.remaining == ticks and (refused.value.added, refused.value.duplicates) == (0, 0)
        assert writer.batches == 1, "a refused round trip is no flush"
        await lift_limit(client)
        assert await writer.append(refused.value.remaining) == (len(ticks) - 6, 6)
    finally:
        await client.aclose()


# -- the drill: the whole ingestor, a venue at ~10k trades/s, Redis at its limit --------------------------------------
#: how long Redis stays at its limit in the drill (MARKET_OOM_DRILL_S=20 for the full drill)
DRILL_S = float(os.environ.get("MARKET_OOM_DRILL_S", "5"))
#: the simulator's events a second over all kinds: about a third are trades, so ~10k trades/s
DRILL_RATE = float(os.environ.get("MARKET_OOM_DRILL_RATE", "30000"))
FAST = SessionSettings(ping_interval=1.0, ping_timeout=2.0, open_timeout=2.0, backoff_base=0.05, backoff_cap=1.0)


async def venue_last_trade(sim: Simulator, symbol: str) -> int:
    import json
    import urllib.request

    def get() -> Any:
        with urllib.request.urlopen(f"{sim.rest_url}/api/v3/trades?symbol={symbol}&limit=1", timeout=5) as r:
            return json.loads(r.read())

    async with asyncio.timeout(10):
        return int((await asyncio.to_thread(get))[-1]["id"])


def task_stacks() -> str:
    """Where every task of this loop waits (for a failure message)."""
    import io

    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=6, file=out)
    return out.getvalue()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_drill_redis_at_maxmemory_under_load(private_redis: RedisServer, prefix: str, tmp_path: Path) -> None:
    """~10k trades/s; Redis (noeviction) set below what it uses for DRILL_S seconds, then lifted.

    While it lasts the refusal shows in the metrics (market_redis_oom 1, market_redis_up 1) and in
    ``market status`` (redis FAIL, out of memory), and nothing is acknowledged as stored; afterwards
    every venue trade id is in Redis exactly once, in order, with no hole and no gap marker.  One
    private server holds everything, the streams and the heartbeats, as in a deployment with one Redis:
    the heartbeat's writes are flagged to pass the limit, so the status read from that Redis says out of
    memory rather than "ingestor stopped reporting".  Every wait is bounded and names what it waited for.
    """
    symbols = ("BTCUSDT", "ETHUSDT")
    # Generous client timeouts: on a loaded machine a slow reply must not pass for an unreachable Redis.
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=30, socket_connect_timeout=5)
    figures: dict[str, Any] = {}
    phase = "starting"

    async def status() -> Any:
        async with asyncio.timeout(10):
            heartbeats, groups = await collect(client, prefix)
        return evaluate(heartbeats, groups, time.time())

    async with Simulator(SimulatorConfig(symbols=symbols, rate=DRILL_RATE)) as sim:
        settings = IngestSettings(
            url=sim.ws_url, rest_url=sim.rest_url, symbols=symbols, channels=("trade",), prefix=prefix, session=FAST,
            queue_policy=Policy.BLOCK, spill_dir=str(tmp_path / "spill"), writer_capacity=20_000,
        )
        ing = Ingestor(settings, redis=client)
        tasks = [
            asyncio.create_task(ing.run(), name="ingestor"),
            asyncio.create_task(heartbeat_loop(ing, client, prefix=prefix, interval=0.2, ttl=1.0), name="heartbeat"),
        ]

        def check() -> None:
            for t in tasks:
                if t.done():
                    raise AssertionError(f"{t.get_name()} ended: {t.exception() if not t.cancelled() else 'cancelled'}")

        try:
            phase = "the first 5000 ticks stored"
            async with asyncio.timeout(60):
                while ing.writer is None or ing.writer.appended < 5_000:
                    check()
                    await asyncio.sleep(0.05)  # poll
            writer = ing.writer
            trades_before = sum([await venue_last_trade(sim, sym) for sym in symbols])
            phase = "Redis at its limit, the refusal seen"
            async with asyncio.timeout(10):
                await refuse_writes(client)
            began = time.monotonic()
            async with asyncio.timeout(10):
                while writer.failing != "oom":
                    check()
                    await asyncio.sleep(0.05)  # poll
            figures["detected_after_s"] = round(time.monotonic() - began, 2)
            stored_at_refusal = writer.appended
            seen_in_status = seen_in_metrics = False
            peak_held = 0
            phase = "Redis at its limit"
            while time.monotonic() - began < DRILL_S:
                check()
                st = writer.stats()
                peak_held = max(peak_held, st.buffered + st.spilled)
                assert st.failing == "oom" and st.connected, st
                assert writer.appended == stored_at_refusal, "nothing is acknowledged while Redis refuses"
                metrics = list(IngestorCollector(ing).collect())
                oom, up = samples(metrics, "market_redis_oom"), samples(metrics, "market_redis_up")
                if oom == {(): 1.0} and up == {(): 1.0}:
                    seen_in_metrics = True
                report = await status()
                stage = report.stage("redis")
                # Read from the Redis that is out of memory: the ingestor still reports, and says why.
                if (report.stage("ingestor").level is Level.OK and stage.level is Level.FAIL
                        and stage.cause.startswith(OOM_TEXT)):
                    seen_in_status = True
                await asyncio.sleep(0.2)  # poll
            assert seen_in_metrics, "market_redis_oom 1 while Redis refused"
            assert seen_in_status, "market status, read from that Redis: ingestor OK, redis FAIL out of memory"
            held = writer.stats()
            figures.update(held_at_lift=held.buffered + held.spilled, spilled_at_lift=held.spilled,
                           peak_held=peak_held, rejected=dict(held.rejected_by_reason), errors=held.errors)
            phase = "the limit lifted"
            async with asyncio.timeout(10):
                await lift_limit(client)
            lifted = time.monotonic()
            trades_during = sum([await venue_last_trade(sim, sym) for sym in symbols]) - trades_before
            figures["venue_trades_per_s"] = round(trades_during / (lifted - began))

            ids: dict[str, list[int]] = {}
            for sym in symbols:
                key = f"{prefix}:binance:{sym}:trade"
                target = await venue_last_trade(sim, sym)
                phase = f"{key} caught up with the venue's trade {target}"
                async with asyncio.timeout(120):
                    while True:
                        check()
                        top = await client.xrevrange(key, count=1)
                        if top and int(top[0][0].split(b"-")[1]) >= target:
                            break
                        await asyncio.sleep(0.1)  # poll
                    ticks = [orjson.loads(f[b"d"]) for _, f in await client.xrange(key)]
                assert not [t for t in ticks if is_gap_marker(t)], "no hole, marked or not"
                ids[sym] = [t["trade_id"] for t in ticks]
                assert ids[sym] == list(range(ids[sym][0], ids[sym][0] + len(ids[sym]))), \
                    f"{key}: not every trade id exactly once in order"
            figures["drained_after_s"] = round(time.monotonic() - lifted, 2)
            figures["stored"] = {s: len(v) for s, v in ids.items()}
            figures["duplicates"] = writer.duplicates
            phase = "market status no longer failing on redis"
            async with asyncio.timeout(20):
                while (await status()).stage("redis").level is Level.FAIL:
                    check()
                    await asyncio.sleep(0.2)  # poll
        except TimeoutError:
            pytest.fail(f"{phase}: not within its bound\n{task_stacks()}")
        finally:
            for t in tasks:
                t.cancel()
            try:
                async with asyncio.timeout(30):
                    await asyncio.gather(*tasks, return_exceptions=True)
            except TimeoutError:
                pytest.fail(f"the ingestor did not stop within 30 s of its cancellation\n{task_stacks()}")
            finally:
                await client.aclose()
    figures.update(oom_s=DRILL_S, rate=DRILL_RATE)
    print(f"\nOOM drill: {orjson.dumps(figures).decode()}")
    assert figures["held_at_lift"] > 0 and figures["rejected"].get("oom", 0) > 0
