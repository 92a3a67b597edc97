"""ingestor.heartbeat: the document each ingestor publishes (pure) and the loop that writes it to Redis."""

from __future__ import annotations

import ast
import asyncio
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

import ingestor.heartbeat as hb_module
import ingestor.metrics as metrics_module
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.health import from_doc, to_doc
from consumer_sdk.core.latency import LatencyHistogram
from distributor.control import ControlGate
from distributor.hotpath import HotPathSnapshot, HotPathStats, SubscriberPolicy, SubscriptionStats
from distributor.ingress import IngressQueue, Policy
from distributor.spill import SpillLog
from distributor.writer import StreamWriter, WriterSnapshot, WriterStats
from ingestor.config import IngestSettings
from ingestor.heartbeat import (
    HeartbeatState,
    Identity,
    build_heartbeat,
    heartbeat_document,
    heartbeat_key,
    heartbeat_loop,
    heartbeat_set_key,
    heartbeat_state,
    public_url,
)
from ingestor.lifecycle import Lifecycle, SessionState
from ingestor.metrics import IngestorCollector
from ingestor.repair import RepairStats
from ingestor.sequencer import SequenceStats
from ingestor.service import Ingestor
from ingestor.snapshot import IngestorSnapshot, SessionSnapshot
from ops.redis_server import RedisServer, restart
from ops.status import Level, evaluate

UNIT = 5.0  # seconds: the bound on every wait on Redis below
T0 = 1_800_000_000.0


async def until(condition: Callable[[], Any], timeout: float = UNIT) -> None:
    """Poll ``condition`` (sync or async) until it holds; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            await asyncio.sleep(0.02)  # poll


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.events.append(record.getMessage())


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger("market.heartbeat")
    handler = Records()
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


# -- stand-ins: parts that report snapshots as the real ones do ------------------------------------------------
@dataclass
class FakeSession:
    session_id: int
    lifecycle: Lifecycle
    streams: list[str]
    reconnects: int = 0
    stalls: int = 0
    reconnect_reasons: dict[str, int] = field(default_factory=dict)
    stale: set[str] = field(default_factory=set)
    last_frame_us: int = 0

    def snapshot(self) -> SessionSnapshot:
        life = self.lifecycle
        return SessionSnapshot(
            session_id=self.session_id, state=life.state, reason=life.reason, transitions=life.transitions,
            streams=len(self.streams), last_frame_us=self.last_frame_us, reconnects=self.reconnects,
            reconnect_reasons=dict(self.reconnect_reasons), stalls=self.stalls, stale=tuple(sorted(self.stale)),
            subscribe_errors=0, frames=0, ticks=0, malformed=0, unsupported=0,
        )


@dataclass
class Fixed:
    """A part whose snapshot does not change."""

    value: Any

    def snapshot(self) -> Any:
        return self.value


def fake_session(sid: int, state: SessionState = SessionState.LIVE, *, last_frame: float | None = T0,
                 reconnects: int = 0, reasons: dict[str, int] | None = None, stale: set[str] | None = None) -> Any:
    life = Lifecycle()  # connecting
    if state is SessionState.LIVE:
        life.to(SessionState.SUBSCRIBING, "connected")
        life.to(SessionState.LIVE, "subscribed")
    elif state is not SessionState.CONNECTING:
        life.to(state, "start")
    return FakeSession(
        session_id=sid, lifecycle=life, streams=["btcusdt@trade"], reconnects=reconnects,
        reconnect_reasons=reasons or {}, stale=stale or set(),
        last_frame_us=int(last_frame * 1e6) if last_frame else 0,
    )


class FakeIngestor:
    """What the heartbeat reads of an ingestor: its snapshot, from these parts."""

    def __init__(self, *, settings: IngestSettings, sessions: list[Any], ingress: IngressQueue[Any], writer: Any,
                 hotpath: Any) -> None:
        self.settings = settings
        self.sessions = sessions
        self.ingress = ingress
        self.writer = writer
        self.hotpath = hotpath
        self.heartbeat = HeartbeatState()

    def snapshot(self) -> IngestorSnapshot:
        s = self.settings
        return IngestorSnapshot(
            venue=s.venue, url=s.url, redis_url=s.redis_url, prefix=s.prefix, channels=tuple(s.channels),
            sessions=tuple(x.snapshot() for x in self.sessions), ingress=self.ingress.stats(),
            hotpath=self.hotpath.snapshot() if self.hotpath is not None else None, batch_handlers=0,
            writer=self.writer.snapshot() if self.writer is not None else None,
            sequence=SequenceStats(accepted=0, gaps=3, gap_ticks=0, duplicates=2, out_of_order=1),
            sequence_by_channel={},
            repair=RepairStats(
                gaps_repaired=2, gaps_unrepaired=1, ticks_repaired={}, ticks_unrepaired={"trade": 40}, holding=0,
                held_ticks=0, held_overflow=0, hold_expired=0, refused={}, breaker="closed", breaker_opened=0,
                breaker_skipped=0,
            ),
            control=ControlGate().stats(), control_rejected=0, ingest_latency=LatencyHistogram(),
        )


def fake_ingestor(*, sessions: list[Any] | None = None, capacity: int = 100, policy: Policy = Policy.BLOCK,
                  writer: Any = None, hotpath: Any = None, url: str = "wss://stream.binance.com:9443") -> FakeIngestor:
    return FakeIngestor(
        settings=IngestSettings(url=url, redis_url="redis://app:s3cret@redis:6379/0", prefix="md"),
        sessions=sessions if sessions is not None else [fake_session(1)],
        ingress=IngressQueue(capacity, policy), writer=writer, hotpath=hotpath,
    )


def fake_writer(**kw: Any) -> Fixed:
    stats = {"buffered": 0, "capacity": 1000, "appended": 10, "errors": 0, "retries": 0, "rejected": 0,
             "batches": 1, "spilled": 0, "spill_bytes": 0, "last_flush_us": 200, "connected": True, **kw}
    rest = {"duplicates": 0, "failing": "", "failing_for_s": 0.0, "rejected_by_reason": {}, "dead_lettered": 0,
            "spill_drained": 0}
    return Fixed(WriterSnapshot(WriterStats(**{**rest, **stats}), {}, "md:deadletter", LatencyHistogram()))


def state_at(now: float = T0) -> HeartbeatState:
    return HeartbeatState(Identity(host="h", pid=7, start_id="abc123", started_at=now))


# -- the document ---------------------------------------------------------------------------------------------
def test_document_names_every_stage() -> None:
    ing = fake_ingestor(writer=fake_writer())
    doc = build_heartbeat(ing, T0 + 2, state=state_at())
    assert doc["v"] == 1 and doc["id"] == "h-7-abc123" and doc["venue"] == "binance"
    assert doc["started_at"] == T0 and doc["uptime_s"] == 2.0
    assert set(doc) >= {"connections", "ingress", "fanout", "writer", "gaps", "version", "url", "ts"}
    assert doc["connections"]["total"] == doc["connections"]["live"] == 1
    assert doc["connections"]["sessions"][0]["last_frame_age_s"] == 2.0
    assert doc["ingress"] == {
        "length": 0, "capacity": 100, "fill_ratio": 0.0, "policy": "block", "dropped": 0,
        "backpressure_events": 0, "dropped_recent": 0, "backpressure_recent": 0,
    }
    assert doc["writer"]["present"] and doc["writer"]["connected"] and doc["writer"]["appended"] == 10
    assert doc["fanout"] == {"present": False, "subscribers": 0, "batch_handlers": 0}
    assert doc["gaps"]["detected"] == 3 and doc["gaps"]["unrepaired"] == 1 and doc["gaps"]["ticks_unrepaired"] == 40
    orjson.dumps(doc)  # serializable as is


def test_no_secret_reaches_the_document() -> None:
    ing = fake_ingestor(url="wss://user:hunter2@venue.example:9443/?token=abc")
    text = orjson.dumps(build_heartbeat(ing, T0, state=state_at())).decode()
    assert "hunter2" not in text and "s3cret" not in text and "token" not in text
    assert public_url("redis://app:s3cret@redis:6379/0") == "redis://app:***@redis:6379/0"
    assert public_url("wss://stream.binance.com:9443/stream?x=1#f") == "wss://stream.binance.com:9443/stream"
    assert public_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"


def test_identity_is_host_pid_and_a_start_id() -> None:
    a, b = Identity.new(T0), Identity.new(T0)
    assert a.id == f"{a.host}-{os.getpid()}-{a.start_id}" and a.pid == os.getpid()
    assert a.id != b.id, "two ingestors of one process are told apart"
    assert ":" not in a.id and " " not in a.id
    assert re.fullmatch(r"[A-Za-z0-9_.\-]{1,63}", a.host), a.host


def test_an_ingestor_among_several_venues_names_its_venue() -> None:
    a = Identity.new(T0, venue="binance_usdm")
    assert a.id == f"{a.host}-{os.getpid()}-binance_usdm-{a.start_id}" and a.venue == "binance_usdm"
    assert f"-{os.getpid()}-odd-venue-x-" in Identity.new(T0, venue="odd venue:x").id  # what a key may hold


def test_state_is_kept_per_ingestor() -> None:
    settings = IngestSettings(url="ws://127.0.0.1:1", symbols=("BTCUSDT",))
    one, two = Ingestor(settings), Ingestor(settings)
    assert heartbeat_state(one) is heartbeat_state(one)
    assert heartbeat_state(one).identity.id != heartbeat_state(two).identity.id
    doc = build_heartbeat(one, T0)
    assert doc["id"] == heartbeat_state(one).identity.id
    assert doc["writer"] == {"present": False}, "before run() there is no writer"
    assert doc["fanout"]["present"] is True, "the hot path exists from the start"
    assert doc["connections"]["total"] == 0


def test_a_connection_down_counts_from_when_it_left_live() -> None:
    s = fake_session(1)
    ing = fake_ingestor(sessions=[s])
    st = state_at()
    assert build_heartbeat(ing, T0 + 1, state=st)["connections"]["sessions"][0]["down_for_s"] is None
    s.lifecycle.to(SessionState.BACKING_OFF, "connection closed: 1006")
    doc = build_heartbeat(ing, T0 + 2, state=st)
    row = doc["connections"]["sessions"][0]
    assert (row["state"], row["down_for_s"], row["last_error"]) == ("backing_off", 0.0, "connection closed: 1006")
    # It goes on trying: connecting, refused, backing off again; the time down keeps counting.
    s.lifecycle.to(SessionState.CONNECTING, "reconnect")
    row = build_heartbeat(ing, T0 + 8, state=st)["connections"]["sessions"][0]
    assert (row["state"], row["down_for_s"], row["state_for_s"]) == ("connecting", 6.0, 0.0)
    assert row["reason"] == "reconnect" and row["last_error"] == "connection closed: 1006"
    s.lifecycle.to(SessionState.SUBSCRIBING, "connected")
    s.lifecycle.to(SessionState.LIVE, "subscribed")
    assert build_heartbeat(ing, T0 + 9, state=st)["connections"]["sessions"][0]["down_for_s"] is None


def test_a_connection_never_live_is_down_since_start() -> None:
    s = fake_session(1, SessionState.BACKING_OFF, last_frame=None)
    doc = build_heartbeat(fake_ingestor(sessions=[s]), T0 + 4, state=state_at())
    row = doc["connections"]["sessions"][0]
    assert row["down_for_s"] == 4.0 and row["last_frame_age_s"] is None
    assert doc["connections"]["live"] == 0


def test_a_connection_added_later_is_down_from_when_it_appeared() -> None:
    ing = fake_ingestor()
    st = state_at()
    build_heartbeat(ing, T0 + 100, state=st)
    ing.sessions.append(fake_session(2, SessionState.CONNECTING, last_frame=None))
    row = build_heartbeat(ing, T0 + 101, state=st)["connections"]["sessions"][1]
    assert (row["id"], row["state"], row["down_for_s"]) == (2, "connecting", 0.0)
    ing.sessions.pop()
    assert build_heartbeat(ing, T0 + 102, state=st)["connections"]["total"] == 1
    assert 2 not in st._seen and 2 not in st._down_since, "forgotten once gone"


def test_stale_streams_and_reconnect_reasons_are_summed() -> None:
    ing = fake_ingestor(sessions=[
        fake_session(1, reconnects=3, reasons={"connection closed": 3}, stale={"binance:BTCUSDT:trade"}),
        fake_session(2, reconnects=1, reasons={"connection closed": 1}, stale={"binance:ETHUSDT:kline_1m"}),
    ])
    doc = build_heartbeat(ing, T0, state=state_at())
    c = doc["connections"]
    assert c["reconnects"] == 4 and c["reconnect_reasons"] == {"connection closed": 4}
    assert c["stale"] == ["binance:BTCUSDT:trade", "binance:ETHUSDT:kline_1m"] and c["stale_count"] == 2


def test_recent_counts_cover_the_window_only() -> None:
    ing = fake_ingestor(capacity=2, policy=Policy.DROP_NEWEST)
    st = state_at()
    for i in range(5):
        ing.ingress.offer(i)
    doc = build_heartbeat(ing, T0 + 1, state=st)
    assert doc["ingress"]["dropped"] == 3 and doc["ingress"]["dropped_recent"] == 3
    assert doc["ingress"]["backpressure_recent"] == 1 and doc["ingress"]["fill_ratio"] == 1.0
    for t in range(2, 62):
        doc = build_heartbeat(ing, T0 + t, state=st)
    assert doc["ingress"]["dropped"] == 3 and doc["ingress"]["dropped_recent"] == 0, "older than a minute"
    ing.ingress.offer(9)
    assert build_heartbeat(ing, T0 + 62, state=st)["ingress"]["dropped_recent"] == 1


def test_reconnects_recent_span_five_minutes() -> None:
    s = fake_session(1)
    ing = fake_ingestor(sessions=[s])
    st = state_at()
    for t in range(0, 400, 10):
        s.reconnects = t // 10  # one every ten seconds
        doc = build_heartbeat(ing, T0 + t, state=st)
    assert doc["connections"]["reconnects_recent"] == 30
    assert doc["reconnect_window_s"] == 300.0


def test_writer_failing_and_spilling() -> None:
    w = fake_writer(connected=False, errors=40, spilled=12000, buffered=1000, batches=5)
    st = state_at()
    doc = build_heartbeat(fake_ingestor(writer=w), T0 + 1, state=st)
    assert doc["writer"]["connected"] is False and doc["writer"]["spilled"] == 12000
    assert doc["writer"]["errors_recent"] == 40 and doc["writer"]["fill_ratio"] == 1.0
    assert doc["writer"]["last_write_age_s"] == 0.0
    doc = build_heartbeat(fake_ingestor(writer=w), T0 + 11, state=st)
    assert doc["writer"]["last_write_age_s"] == 10.0, "no batch since"


async def test_a_full_spill_log_shows_in_the_heartbeat_the_metrics_and_the_status(tmp_path: Path) -> None:
    """A real spill log at its cap (Redis never answering: the writer task is not run), memory full: the
    writer's stats, the heartbeat's writer section, the exporter and ``market status`` all say it is full."""
    spill = SpillLog(tmp_path / "spill", max_bytes=8 << 10)
    writer = StreamWriter(aioredis.Redis(host="127.0.0.1", port=1), prefix="hb", capacity=10, spill=spill)
    trade = {"v": 1, "venue": "binance", "symbol": "BTCUSDT", "channel": "trade", "ts_event": 1, "ts_recv": 1,
             "trade_id": 1, "price": "1.0", "qty": "1.0", "side": "buy"}
    seq = 0
    while writer.submit([{**trade, "seq": seq + i} for i in range(1, 11)]):  # type: ignore[misc]
        seq += 10
        assert seq < 10_000, "an 8 KB spill log never filled"
    assert writer.submit([{**trade, "seq": seq + 1}]) is False  # type: ignore[list-item]
    try:
        stats = writer.stats()
        assert stats.spill_full and "cap of 8192 bytes" in stats.spill_full_reason
        assert stats.spill_full_events == 1 and stats.spill_refused == 2 and stats.spilled == seq - 10
        assert (stats.spill_write_failures, stats.spill_corrupt, stats.spill_torn) == (0, 0, 0)

        ing = fake_ingestor(writer=writer)
        doc = build_heartbeat(ing, T0 + 1, state=state_at())
        w = doc["writer"]
        assert w["spill_full"] is True and w["spill_full_reason"] == stats.spill_full_reason
        assert (w["spill_full_events"], w["spill_refused"], w["spill_write_failures"]) == (1, 2, 0)
        assert (w["spill_corrupt"], w["spill_torn"]) == (0, 0)
        stage = evaluate([{**doc, "alive": True}], [], T0 + 1).stage("redis")
        assert stage.level is Level.FAIL
        assert stage.cause.startswith(f"spill log full ({stats.spill_full_reason}), the ingress decides"), stage

        real = Ingestor(IngestSettings(url="ws://127.0.0.1:1", prefix="hb"))
        real.writer = writer
        metrics = {s.name: s.value for m in IngestorCollector(real).collect() for s in m.samples}
        assert metrics["market_spill_full"] == 1
        assert metrics["market_spill_refused_total"] == 2
        assert metrics["market_spill_write_failures_total"] == 0 and metrics["market_spill_corrupt_total"] == 0

        # Room again (the log drained): no longer full, the counts stay.
        while len(spill):
            spill.consume(len(spill.peek(1000)))
        assert not writer.stats().spill_full and writer.stats().spill_full_events == 1
        assert build_heartbeat(ing, T0 + 2, state=state_at())["writer"]["spill_full"] is False
    finally:
        spill.close()


def test_fanout_is_read_from_the_hot_path_when_there_is_one() -> None:
    sub = SubscriptionStats(name="strategy", policy=SubscriberPolicy.DROP_OLDEST, patterns=("binance:*:*",),
                            matched=60, delivered=10, dropped=50, pending=0, errors=0, drop_events=1, lag=900,
                            removed=None, handler_us=12.34, handler_max_us=80.0, busy_us=0, overruns=2)
    stats = HotPathStats(published=60, capacity=1024, streams=1, subscribers=1, delivered=10, dropped=50, errors=0,
                         dropped_by_policy={"drop_oldest": 50}, disconnected=0, removed=0, blocked=0,
                         waiting_room=False, max_lag=900, slowest="strategy")
    hot = Fixed(HotPathSnapshot(stats, (sub,), LatencyHistogram()))
    doc = build_heartbeat(fake_ingestor(hotpath=hot), T0 + 1, state=state_at())
    fan = doc["fanout"]
    assert fan["present"] and fan["subscribers"] == 1 and fan["dropped_recent"] == 50
    assert fan["slowest"] == [{
        "name": "strategy", "policy": "drop_oldest", "execution": "inline", "offloaded": False, "handler_us": 12.3,
        "handler_max_us": 80.0, "busy_us": 0, "overruns": 2, "lag": 900, "dropped": 50, "errors": 0,
    }]


def test_parts_not_built_yet_are_reported_absent() -> None:
    ing = fake_ingestor(writer=None, hotpath=None, sessions=[fake_session(1, SessionState.CONNECTING, last_frame=None)])
    doc = build_heartbeat(ing, T0, state=state_at())
    assert doc["writer"] == {"present": False} and doc["fanout"]["present"] is False
    row = doc["connections"]["sessions"][0]
    assert (row["state"], row["last_frame_age_s"], row["down_for_s"]) == ("connecting", None, 0.0)


def test_the_document_keeps_its_shape_and_reads_back_whole() -> None:
    """Every field, in the order the contract shows; what the heartbeat writes, the status reads back as is."""
    ing = fake_ingestor(writer=fake_writer(), sessions=[fake_session(1), fake_session(2, SessionState.BACKING_OFF)])
    hot = HotPathSnapshot(
        HotPathStats(published=0, capacity=1024, streams=0, subscribers=0, delivered=0, dropped=0, errors=0,
                     dropped_by_policy={}, disconnected=0, removed=0, blocked=0, waiting_room=False, max_lag=0),
        (), LatencyHistogram(),
    )
    ing.hotpath = Fixed(hot)
    doc = build_heartbeat(ing, T0 + 3, state=state_at())
    assert list(doc) == [
        "v", "id", "host", "pid", "version", "venue", "url", "redis", "prefix", "started_at", "ts", "uptime_s",
        "window_s", "reconnect_window_s", "connections", "ingress", "fanout", "writer", "gaps",
    ]
    assert list(doc["connections"]) == [
        "total", "live", "reconnects", "reconnect_reasons", "stale", "stale_count", "stalls", "sessions",
        "reconnects_recent",
    ]
    assert list(doc["connections"]["sessions"][1]) == [
        "id", "state", "reason", "last_error", "state_for_s", "down_for_s", "last_frame_age_s", "streams",
        "reconnects", "subscribe_errors", "stale",
    ]
    assert list(doc["ingress"]) == [
        "length", "capacity", "fill_ratio", "policy", "dropped", "backpressure_events", "dropped_recent",
        "backpressure_recent",
    ]
    assert list(doc["fanout"]) == [
        "present", "subscribers", "batch_handlers", "capacity", "delivered", "dropped", "errors", "disconnected",
        "waiting_room", "max_lag", "offloaded", "threads", "overruns", "slowest", "dropped_recent", "errors_recent",
        "disconnected_recent", "offloaded_recent", "overruns_recent",
    ]
    assert list(doc["writer"]) == [
        "present", "connected", "buffered", "capacity", "fill_ratio", "appended", "errors", "retries", "failing",
        "oom", "failing_for_s", "rejected", "rejected_by_reason", "dead_lettered", "dead_letter_key", "spilled",
        "spill_bytes", "spill_full", "spill_full_reason", "spill_full_events", "spill_refused",
        "spill_write_failures", "spill_corrupt", "spill_torn", "last_flush_us", "last_write_age_s", "errors_recent",
        "rejected_recent", "dead_lettered_recent",
    ]
    assert list(doc["gaps"]) == [
        "detected", "repaired", "unrepaired", "ticks_unrepaired", "repairing", "duplicates", "out_of_order",
        "unrepaired_recent",
    ]
    parsed = from_doc(orjson.loads(orjson.dumps(doc)))
    assert parsed.problems == ()
    assert to_doc(parsed.heartbeat) == doc
    assert parsed.heartbeat == heartbeat_document(ing.snapshot(), T0 + 3, state_at())


def test_a_real_ingestor_reports_through_its_snapshot() -> None:
    """Before ``run()``: the heartbeat, the metrics and the status read one snapshot of a real ingestor."""
    ing = Ingestor(IngestSettings(url="ws://127.0.0.1:1", symbols=("BTCUSDT",), prefix="md"))
    snap = ing.snapshot()
    assert snap.writer is None and snap.repair is None and snap.sessions == () and snap.hotpath is not None
    doc = build_heartbeat(ing, T0 + 1)
    assert from_doc(doc).problems == ()
    names = {s.name for m in IngestorCollector(fake_ingestor(writer=fake_writer())).collect() for s in m.samples}
    assert {"market_redis_up", "market_ingress_len", "market_subscriber_count"} <= names, "a stand-in is enough"


def test_the_heartbeat_neither_imports_the_service_nor_keeps_global_state() -> None:
    """No circle with :mod:`ingestor.service` (not even for type checking); the state lives on the ingestor, and
    the metrics read a snapshot as the heartbeat does."""
    for module in (hb_module, metrics_module):
        tree = ast.parse(Path(module.__file__ or "").read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert "ingestor.service" not in imported and "weakref" not in imported, (module.__name__, imported)


def test_exports() -> None:
    assert set(hb_module.__all__) == {
        "HEARTBEAT_SCHEMA", "MAX_LISTED", "RECENT_WINDOW_S", "RECONNECT_WINDOW_S", "HeartbeatState", "Identity",
        "Reporting", "build_heartbeat", "heartbeat_document", "heartbeat_key", "heartbeat_loop", "heartbeat_set_key",
        "heartbeat_state", "public_url",
    }
    assert heartbeat_key("md", "h-1-a") == "md:_hb:ingestor:h-1-a"
    assert heartbeat_set_key("md") == "md:_hb:ingestors"


# -- the loop, on a real Redis --------------------------------------------------------------------------------
async def test_loop_writes_the_key_with_an_expiry_and_removes_it_on_stop(aredis: aioredis.Redis, prefix: str) -> None:
    ing = fake_ingestor(writer=fake_writer())
    st = state_at()
    key = heartbeat_key(prefix, st.identity.id)
    task = asyncio.create_task(heartbeat_loop(ing, aredis, prefix=prefix, interval=0.05, ttl=2.0, state=st))
    try:
        await until(lambda: aredis.exists(key))
        assert 0 < await aredis.pttl(key) <= 2000
        assert await aredis.smembers(heartbeat_set_key(prefix)) == {st.identity.id.encode()}
        doc = orjson.loads(await aredis.get(key))
        assert doc["id"] == st.identity.id and doc["interval_s"] == 0.05 and doc["ttl_s"] == 2.0
        # the loop's own task and this test's are among the process's tasks it reports
        assert doc["tasks"] == len(asyncio.all_tasks()) and doc["tasks"] >= 2
        first = doc["ts"]
        await until(lambda: _ts(aredis, key, first))  # it keeps beating
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not await aredis.exists(key), "a clean stop removes the key ..."
    assert not await aredis.sismember(heartbeat_set_key(prefix), st.identity.id), "... and the id"


async def _ts(redis: aioredis.Redis, key: str, first: float) -> bool:
    raw = await redis.get(key)
    return raw is not None and orjson.loads(raw)["ts"] > first


async def test_loop_rejects_a_ttl_not_longer_than_the_interval(aredis: aioredis.Redis, prefix: str) -> None:
    with pytest.raises(ConfigError, match="ttl"):
        await heartbeat_loop(fake_ingestor(), aredis, prefix=prefix, interval=1.0, ttl=1.0)
    with pytest.raises(ConfigError, match="interval"):
        await heartbeat_loop(fake_ingestor(), aredis, prefix=prefix, interval=0, ttl=1.0)


async def test_loop_survives_redis_going_away(private_redis: RedisServer, prefix: str, records: Records) -> None:
    client = aioredis.Redis.from_url(private_redis.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    st = state_at()
    key = heartbeat_key(prefix, st.identity.id)
    task = asyncio.create_task(heartbeat_loop(fake_ingestor(), client, prefix=prefix, interval=0.05, ttl=1.0, state=st))
    try:
        await until(lambda: client.exists(key))
        private_redis.stop()
        await until(lambda: "heartbeat_failed" in records.events)
        loop = asyncio.get_running_loop()
        began, beats = loop.time(), st._beats
        await until(lambda: st._beats >= beats + 10)  # ten more beats against a dead Redis: the loop goes on
        span = loop.time() - began  # however long those ten beats took on this machine
        assert not task.done()
        assert records.events.count("heartbeat_failed") <= 2 + int(span), "logged at most once a second"
        await asyncio.to_thread(restart, private_redis)
        await until(lambda: client.exists(key))
        assert "heartbeat_recovered" in records.events
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()
