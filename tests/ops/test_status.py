"""ops.status: every stage judged from heartbeats and consumer groups; fault drills naming the failing stage.

The drills run a simulator and an ingestor (in this process, or in a child process that gets killed)
that publish heartbeats to the shared Redis under a unique prefix, inject one fault, and wait until
``collect`` + ``evaluate`` name the stage (the wait's bound only stops a hang; how soon a fault is named
follows from the thresholds, checked with a set clock).  ``market status`` itself is run once as a command.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ops.status as status_module
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import heartbeat_key, heartbeat_set_key
from distributor.ingress import Policy
from ingestor.config import IngestSettings
from ingestor.heartbeat import heartbeat_loop
from ingestor.service import Ingestor
from ingestor.session import SessionSettings
from ops.redis_server import RedisServer, free_port, restart
from ops.simulator import Simulator, SimulatorConfig
from ops.status import (
    CONSUMER_LAG_WARN,
    STAGES,
    Level,
    StatusReport,
    collect,
    dead_key,
    evaluate,
    group_rows,
    parse_prefix,
    read_heartbeats,
    render,
)

NOW = 1_800_000_000.0
DETECT_S = 10.0  # a fault must be named within this many seconds
HANG_S = 60.0  # a drill's wait for its fault to be named: only a hang takes this long
FAST = SessionSettings(
    ping_interval=1.0, ping_timeout=1.0, open_timeout=2.0, stall_timeout=3.0, healthy_after=2.0,
    backoff_base=0.05, backoff_cap=0.5,
)


# ================================================================================================ pure: evaluate
def healthy(**changes: Any) -> dict[str, Any]:
    """A heartbeat of a healthy ingestor; ``changes`` are ``"part.key": value`` overrides."""
    doc: dict[str, Any] = {
        "v": 1, "id": "host-1-abc", "host": "host", "pid": 1, "version": "0.1.0", "venue": "binance",
        "url": "wss://stream.binance.com:9443", "redis": "redis://redis:6379/0", "prefix": "md",
        "started_at": NOW - 100, "ts": NOW, "uptime_s": 100.0, "window_s": 60.0, "reconnect_window_s": 300.0,
        "alive": True,
        "connections": {
            "total": 1, "live": 1, "reconnects": 0, "reconnects_recent": 0, "reconnect_reasons": {},
            "stale": [], "stale_count": 0, "stalls": 0,
            "sessions": [{"id": 1, "state": "live", "reason": "subscribed", "last_error": None, "state_for_s": 99.0,
                          "down_for_s": None, "last_frame_age_s": 0.1, "streams": 4, "reconnects": 0, "stale": 0}],
        },
        "ingress": {"length": 10, "capacity": 1000, "fill_ratio": 0.01, "policy": "block", "dropped": 0,
                    "dropped_recent": 0, "backpressure_events": 0, "backpressure_recent": 0},
        "fanout": {"present": True, "subscribers": 1, "dropped": 0, "dropped_recent": 0, "errors": 0,
                   "errors_recent": 0, "disconnected": 0, "disconnected_recent": 0, "waiting_room": False,
                   "max_lag": 3, "capacity": 65536, "slowest": []},
        "writer": {"present": True, "connected": True, "buffered": 0, "capacity": 200000, "fill_ratio": 0.0,
                   "appended": 5000, "errors": 0, "errors_recent": 0, "rejected": 0, "rejected_recent": 0,
                   "spilled": 0, "spill_bytes": 0, "last_flush_us": 400, "last_write_age_s": 0.1},
        "gaps": {"detected": 0, "repaired": 0, "unrepaired": 0, "unrepaired_recent": 0, "ticks_unrepaired": 0,
                 "repairing": 0, "duplicates": 0, "out_of_order": 0},
    }
    for path, value in changes.items():
        node = doc
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p] if not p.isdigit() else node[int(p)]  # type: ignore[index]
        node[leaf] = value
    return doc


def session(**changes: Any) -> dict[str, Any]:
    row = copy.deepcopy(healthy()["connections"]["sessions"][0])
    row.update(changes)
    return row


def judge(*heartbeats: dict[str, Any], groups: list[dict[str, Any]] | None = None) -> StatusReport:
    return evaluate(list(heartbeats), groups or [], NOW)


def test_all_healthy_is_exit_0() -> None:
    report = judge(healthy())
    assert [s.stage for s in report.stages] == list(STAGES)
    assert report.ok and report.exit_code == 0 and report.failing == () and report.level is Level.OK
    text = render(report)
    assert text.splitlines()[0] == "market status: OK"
    assert len(text.splitlines()) == 1 + len(STAGES)
    assert "connection OK: 1/1 binance connection(s) live" in text


def test_no_heartbeat_at_all() -> None:
    report = judge()
    ing = report.stage("ingestor")
    assert ing.level is Level.FAIL and ing.reason == "ingestor FAIL: no ingestor is reporting (no heartbeat in Redis)"
    for stage in ("connection", "ingress", "fanout", "redis"):
        assert report.stage(stage).level is Level.UNKNOWN
    assert report.stage("consumers").level is Level.OK
    assert report.exit_code == 1 and report.failing == ("ingestor",)
    assert report.unknown == ("connection", "ingress", "fanout", "redis")
    assert render(report).splitlines()[0] == "market status: FAIL (ingestor)"


def test_an_expired_heartbeat_is_a_dead_ingestor() -> None:
    report = judge({"id": "host-9-dead", "alive": False, "dead_for_s": 4.0})
    assert report.stage("ingestor").reason == (
        "ingestor FAIL: ingestor host-9-dead stopped reporting (heartbeat expired, 4.0 s ago); none other reporting"
    )
    report = judge(healthy(), {"id": "host-9-dead", "alive": False, "dead_for_s": 30.0})
    assert report.stage("ingestor").level is Level.FAIL
    assert "1 other(s) reporting" in report.stage("ingestor").cause
    assert report.stage("connection").level is Level.OK, "the live one is still judged"
    assert report.failing == ("ingestor",)


@pytest.mark.parametrize(("row", "level", "reason"), [
    (session(state="backing_off", down_for_s=12.0, last_error="connection closed: received 1006"),
     Level.FAIL, "connection FAIL: binance session 1 backing_off for 12 s (connection closed: received 1006)"),
    (session(state="connecting", down_for_s=2.0, last_error="venue unavailable: HTTP 503", reason="reconnect"),
     Level.WARN, "connection WARN: binance session 1 connecting for 2.0 s (venue unavailable: HTTP 503)"),
    (session(state="closed", last_error=None, reason="venue refused the connection with HTTP 403"),
     Level.FAIL, "connection FAIL: binance session 1 closed (venue refused the connection with HTTP 403)"),
    (session(last_frame_age_s=20.0), Level.WARN, "connection WARN: binance session 1 live but no frame for 20 s"),
    (session(state="subscribing", down_for_s=19.0, reason="connected", subscribe_errors=3), Level.FAIL,
     "connection FAIL: binance session 1 subscribing for 19 s (the venue refused 3 subscribe request(s))"),
])
def test_connection(row: dict[str, Any], level: Level, reason: str) -> None:
    report = judge(healthy(**{"connections.sessions": [row], "connections.live": int(row["state"] == "live")}))
    assert report.stage("connection").level is level
    assert report.stage("connection").reason == reason
    assert report.failing == ("connection",)


def test_a_connection_carrying_no_stream_may_be_quiet() -> None:
    report = judge(healthy(**{"connections.sessions": [session(streams=0, last_frame_age_s=600.0)]}))
    assert report.stage("connection").level is Level.OK


def test_connection_storms_stale_streams_and_lost_ids() -> None:
    storm = judge(healthy(**{"connections.reconnects_recent": 14,
                             "connections.reconnect_reasons": {"connection closed": 14}}))
    assert storm.stage("connection").reason == (
        "connection WARN: reconnect storm: 14 reconnects in the last 5 min (mostly connection closed)"
    )
    stale = judge(healthy(**{"connections.stale": ["binance:BTCUSDT:trade"], "connections.stale_count": 1}))
    assert stale.stage("connection").reason == "connection WARN: 1 stream(s) stale, no new seq: binance:BTCUSDT:trade"
    lost = judge(healthy(**{"gaps.unrepaired_recent": 2, "gaps.ticks_unrepaired": 300}))
    assert lost.stage("connection").level is Level.WARN
    assert "2 gap(s) could not be repaired" in lost.stage("connection").cause
    both = judge(healthy(**{
        "connections.sessions": [session(state="backing_off", down_for_s=30.0)], "connections.live": 0,
        "connections.stale": ["binance:BTCUSDT:trade"], "connections.stale_count": 1,
    }))
    assert both.stage("connection").level is Level.FAIL
    assert both.stage("connection").cause.endswith("; also 1 stream(s) stale, no new seq: binance:BTCUSDT:trade")


@pytest.mark.parametrize(("changes", "level", "reason"), [
    ({"ingress.fill_ratio": 0.85, "ingress.length": 850}, Level.WARN, "ingress WARN: queue 85% full (block)"),
    ({"ingress.fill_ratio": 1.0, "ingress.length": 1000}, Level.FAIL,
     "ingress FAIL: queue full (block): venue reads paused"),
    ({"ingress.fill_ratio": 1.0, "ingress.policy": "drop_newest"}, Level.FAIL,
     "ingress FAIL: queue full (drop_newest): dropping ticks"),
    ({"ingress.dropped_recent": 1200, "ingress.policy": "drop_oldest", "ingress.fill_ratio": 0.5}, Level.FAIL,
     "ingress FAIL: 1200 ticks dropped in the last 60 s (drop_oldest; queue 50% full)"),
    ({"ingress.backpressure_recent": 3}, Level.WARN,
     "ingress WARN: queue became full 3 time(s) in the last 60 s (block)"),
])
def test_ingress(changes: dict[str, Any], level: Level, reason: str) -> None:
    report = judge(healthy(**changes))
    assert (report.stage("ingress").level, report.stage("ingress").reason) == (level, reason)


def test_fanout() -> None:
    slow = [{"name": "strategy.on_tick", "policy": "drop_oldest", "lag": 4000, "dropped": 900, "errors": 0}]
    report = judge(healthy(**{"fanout.dropped_recent": 900, "fanout.slowest": slow}))
    assert report.stage("fanout").reason == (
        "fanout WARN: 900 ticks dropped for slow subscribers in the last 60 s "
        "(slowest: strategy.on_tick, drop_oldest, 4000 behind)"
    )
    assert judge(healthy(**{"fanout.disconnected_recent": 1})).stage("fanout").level is Level.FAIL
    assert judge(healthy(**{"fanout.waiting_room": True})).stage("fanout").level is Level.WARN
    assert judge(healthy(**{"fanout.errors_recent": 5})).stage("fanout").level is Level.WARN
    none = judge(healthy(fanout={"present": False, "subscribers": 0, "batch_handlers": 0}))
    assert none.stage("fanout").level is Level.OK


def test_redis() -> None:
    down = judge(healthy(**{"writer.connected": False, "writer.errors_recent": 40, "writer.spilled": 12000,
                            "writer.buffered": 1000}))
    assert down.stage("redis").reason == (
        "redis FAIL: writes failing (40 errors in the last 60 s), 12000 ticks spilled to disk, 1000 buffered; "
        "Redis at redis://redis:6379/0"
    )
    draining = judge(healthy(**{"writer.spilled": 500}))
    assert draining.stage("redis").reason == "redis WARN: draining the spill log: 500 ticks on disk wait for Redis"
    assert judge(healthy(**{"writer.fill_ratio": 0.9})).stage("redis").level is Level.WARN
    assert judge(healthy(**{"writer.errors_recent": 2})).stage("redis").level is Level.WARN
    assert judge(healthy(**{"writer.rejected_recent": 2})).stage("redis").level is Level.FAIL
    assert judge(healthy(**{"writer.last_flush_us": 2_500_000})).stage("redis").reason == (
        "redis WARN: slow writes: last flush took 2.5 s"
    )
    assert judge(healthy(writer={"present": False})).stage("redis").level is Level.UNKNOWN


def writer_now(**changes: Any) -> dict[str, Any]:
    """A healthy heartbeat with the writer fields of this version (OOM state, dead-letter counts)."""
    fields = {"writer.failing": None, "writer.oom": False, "writer.failing_for_s": None,
              "writer.rejected_by_reason": {}, "writer.dead_lettered": 0, "writer.dead_lettered_recent": 0,
              "writer.dead_letter_key": "md:deadletter"}
    return healthy(**{**fields, **{f"writer.{k}": v for k, v in changes.items()}})


def test_redis_out_of_memory_is_fail_while_it_lasts() -> None:
    doc = writer_now(failing="oom", oom=True, failing_for_s=12.0, buffered=20000, spilled=30000,
                     errors_recent=9, rejected_recent=5000, rejected_by_reason={"oom": 5000})
    stage = judge(doc).stage("redis")
    assert stage.reason == (
        "redis FAIL: Redis out of memory: raise maxmemory or lower retention (writes refused for 12 s; "
        "nothing lost: 20000 buffered, 30000 ticks spilled to disk); Redis at redis://redis:6379/0"
    )
    # Judged by the class alone too (a heartbeat that carries no "oom" flag).
    assert judge(writer_now(failing="oom", oom=None)).stage("redis").cause.startswith(
        "Redis out of memory: raise maxmemory or lower retention")
    # Unreachable wins: nothing answers, so nothing can say it is out of memory.
    assert judge(writer_now(connected=False, failing="unreachable")).stage("redis").cause.startswith("writes failing")
    # Lifted: the episode is over, the recent errors are a warning.
    after = judge(writer_now(errors_recent=9, rejected_recent=5000)).stage("redis")
    assert after.reason == (
        "redis WARN: 9 write error(s) in the last 60 s, 5000 tick writes refused and retried, recovered"
    )


def test_a_full_spill_log_is_fail_and_leaves_it_to_the_ingress() -> None:
    reason = "spill log reached its cap of 1048576 bytes"
    doc = writer_now(connected=False, failing="unreachable", buffered=5000, spilled=3400, spill_full=True,
                     spill_full_reason=reason, spill_full_events=1, spill_refused=12)
    stage = judge(doc).stage("redis")
    assert stage.reason == (
        f"redis FAIL: spill log full ({reason}), the ingress decides; 5000 buffered, 3400 ticks spilled to disk; "
        "Redis unreachable; Redis at redis://redis:6379/0"
    )
    # It wins over what keeps Redis from taking the ticks: that is named after it.
    oom = judge(writer_now(failing="oom", oom=True, spill_full=True, spill_full_reason="disk full: No space left"))
    assert oom.stage("redis").cause.startswith("spill log full (disk full: No space left), the ingress decides; ")
    assert "Redis refuses writes (oom)" in oom.stage("redis").cause
    # Room again: the stage goes back to what the writer does.
    assert judge(writer_now(spilled=3400, spill_full=False, spill_full_events=1)).stage("redis").level is Level.WARN


def test_an_ingestor_whose_death_redis_could_not_date_is_still_dead() -> None:
    """Redis out of memory refuses to record when a reader first found the heartbeat expired."""
    report = judge(healthy(), {"id": "host-9-dead", "alive": False, "dead_for_s": None})
    assert report.stage("ingestor").reason == (
        "ingestor FAIL: ingestor host-9-dead stopped reporting (heartbeat expired); 1 other(s) reporting"
    )


def test_other_refusals_name_their_class() -> None:
    stage = judge(writer_now(failing="readonly", failing_for_s=3.0, buffered=500)).stage("redis")
    assert stage.reason == (
        "redis FAIL: Redis refuses writes (readonly) for 3.0 s: retrying, nothing lost: 500 buffered; "
        "Redis at redis://redis:6379/0"
    )


def test_dead_lettered_ticks_are_fail_and_say_where_they_are() -> None:
    stage = judge(writer_now(dead_lettered=40, dead_lettered_recent=40, rejected_recent=40,
                             rejected_by_reason={"wrongtype": 40})).stage("redis")
    assert stage.reason == (
        "redis FAIL: 40 ticks Redis can never store (wrongtype) went to md:deadletter in the last 60 s"
    )
    # An hour later the stream is still there, but the stage no longer fails on it.
    assert judge(writer_now(dead_lettered=40)).stage("redis").level is Level.OK


def test_a_heartbeat_from_before_the_dead_letter_stream_still_fails_on_rejections() -> None:
    stage = judge(healthy(**{"writer.rejected_recent": 7})).stage("redis")
    assert stage.reason == "redis FAIL: 7 ticks rejected by Redis in the last 60 s (not stored)"


def test_consumers() -> None:
    groups = [
        {"stream": "md:binance:BTCUSDT:trade", "group": "demo", "lag": 5000, "lag_exact": True},
        {"stream": "md:binance:ETHUSDT:trade", "group": "demo", "lag": 3, "lag_exact": True},
        {"stream": "md:binance:BTCUSDT:trade", "group": "risk", "lag": 1200, "lag_exact": False},
    ]
    report = judge(healthy(), groups=groups)
    assert report.stage("consumers").reason == (
        "consumers WARN: group demo lags 5000 entries on md:binance:BTCUSDT:trade (1 more behind)"
    )
    assert report.failing == ("consumers",) and report.exit_code == 1
    far = judge(healthy(), groups=[{"stream": "md:b:X:trade", "group": "g", "lag": 200_000, "lag_exact": False}])
    assert far.stage("consumers").reason == "consumers FAIL: group g lags 200000 entries on md:b:X:trade (estimate)"
    fine = judge(healthy(), groups=[groups[1]])
    assert fine.stage("consumers").reason == "consumers OK: 1 group(s) on 1 stream(s), max lag 3"


def test_several_ingestors_name_the_one_failing() -> None:
    bad = healthy(id="host-2-bad", **{"ingress.fill_ratio": 0.9})
    report = judge(healthy(), bad)
    assert report.stage("ingress").reason == "ingress WARN: host-2-bad: queue 90% full (block)"
    assert report.stage("ingestor").reason.startswith("ingestor OK: 2 reporting")


def test_failing_lists_fail_before_warn() -> None:
    report = judge(healthy(**{"ingress.fill_ratio": 0.9, "writer.connected": False}))
    assert report.failing == ("redis", "ingress")
    assert render(report).splitlines()[0] == "market status: FAIL (redis, ingress)"


def test_json_is_one_object() -> None:
    report = judge(healthy(**{"ingress.fill_ratio": 0.85}))
    text = render(report, json=True)
    assert "\n" not in text
    doc = orjson.loads(text)
    assert doc["status"] == "warn" and doc["exit_code"] == 1 and doc["failing"] == ["ingress"]
    assert doc["unknown"] == []
    assert doc["ingestors"] == ["host-1-abc"]
    assert [s["stage"] for s in doc["stages"]] == list(STAGES)
    assert doc["stages"][2] == {"stage": "ingress", "level": "warn", "reason": "ingress WARN: queue 85% full (block)",
                                "cause": "queue 85% full (block)"}


def test_unreadable_heartbeats_never_raise() -> None:
    odd: list[Any] = [
        {"id": "x", "error": "not JSON: unexpected character"}, "text", 3, None,
        {"id": "y", "connections": "?", "ingress": [], "writer": {"present": True, "connected": "no"}},
        {"id": "z", "connections": {"sessions": [None, {"state": 5, "down_for_s": "soon"}]}, "window_s": "x"},
    ]
    report = evaluate(odd, [{"lag": "many"}, "row"], NOW)  # type: ignore[list-item]
    assert [s.stage for s in report.stages] == list(STAGES)
    assert report.exit_code == 1


def test_a_malformed_heartbeat_names_the_field_and_is_judged_all_the_same() -> None:
    report = judge(healthy(**{"writer.connected": "no", "ingress.fill_ratio": 0.85}))
    assert report.stage("ingestor").reason == (
        "ingestor WARN: malformed heartbeat from host-1-abc: writer.connected: expected true or false, found a string"
    )
    assert report.stage("ingress").reason == "ingress WARN: queue 85% full (block)", "the rest is judged"
    assert report.stage("redis").level is Level.OK, "the field at its default: connected"
    two = judge(healthy(**{"writer.connected": "no", "connections.stale": "abc"})).stage("ingestor")
    assert two.cause == ("malformed heartbeat from host-1-abc: connections.stale: expected a list of strings, "
                         "found a string (and 1 more)")
    # A heartbeat of an older version lacks fields: not malformed (healthy() lacks many).
    assert judge(healthy()).stage("ingestor").level is Level.OK
    assert judge(healthy(**{"writer.oom": None})).stage("ingestor").level is Level.OK, "null: as if missing"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
parts = st.sampled_from(["connections", "ingress", "fanout", "writer", "gaps", "sessions", "state", "down_for_s",
                         "fill_ratio", "connected", "present", "slowest", "lag", "alive", "id", "window_s"])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.dictionaries(parts, json_values, max_size=6), max_size=3),
       st.lists(st.dictionaries(st.sampled_from(["stream", "group", "lag", "lag_exact"]), json_values), max_size=3))
def test_evaluate_takes_any_json(heartbeats: list[dict[str, Any]], groups: list[dict[str, Any]]) -> None:
    report = evaluate(heartbeats, groups, NOW)
    assert len(report.stages) == len(STAGES)
    render(report)
    render(report, json=True)


def test_group_rows_use_redis_lag_or_estimate() -> None:
    seven = [{"name": b"demo", "consumers": 1, "pending": 2, "last-delivered-id": b"5-5", "entries-read": 5, "lag": 10}]
    assert group_rows("k", seven, None) == [{
        "stream": "k", "group": "demo", "lag": 10, "lag_exact": True, "pending": 2, "consumers": 1,
        "last_delivered_id": "5-5",
    }]
    # Redis 6.2 has no lag: 0 at the stream's end, else the stream's length (an upper bound).
    six = [{"name": b"old", "consumers": 0, "pending": 0, "last-delivered-id": b"5-5"}]
    stream = {"length": 40, "last-generated-id": b"9-9"}
    assert group_rows("k", six, stream)[0]["lag"] == 40 and group_rows("k", six, stream)[0]["lag_exact"] is False
    assert group_rows("k", six, {"length": 40, "last-generated-id": b"5-5"})[0]["lag"] == 0
    assert group_rows("k", "garbage", None) == []


def test_prefix_is_checked() -> None:
    assert parse_prefix("md") == "md"
    for bad in ("", "a:b", "x" * 65, "md*"):
        with pytest.raises(ConfigError, match="prefix"):
            parse_prefix(bad)


def test_exports() -> None:
    for name in status_module.__all__:
        assert hasattr(status_module, name), name
    assert {"evaluate", "collect", "render", "run_status", "StatusReport", "Level"} <= set(status_module.__all__)


# ================================================================================================ I/O: collect
async def server_time(redis: aioredis.Redis) -> float:
    sec, usec = await redis.time()
    return float(sec) + usec / 1e6


async def test_collect_reads_heartbeats_and_prunes_the_long_dead(aredis: aioredis.Redis, prefix: str) -> None:
    members = heartbeat_set_key(prefix)
    await aredis.set(heartbeat_key(prefix, "live-1-a"), orjson.dumps(healthy(id="live-1-a")), px=5000)
    await aredis.set(heartbeat_key(prefix, "bad-1-b"), b"{not json", px=5000)
    await aredis.sadd(members, "live-1-a", "bad-1-b", "dead-1-c")
    before = await server_time(aredis)
    heartbeats, groups = await collect(aredis, prefix)
    after = await server_time(aredis)
    by_id = {h["id"]: h for h in heartbeats}
    assert by_id["live-1-a"]["alive"] is True and by_id["live-1-a"]["ingress"]["capacity"] == 1000
    assert by_id["bad-1-b"]["error"].startswith("not JSON")
    assert by_id["dead-1-c"]["alive"] is False and by_id["dead-1-c"]["dead_for_s"] == 0.0, "first found dead now"
    assert groups == []
    first_seen = float(await aredis.hget(dead_key(prefix), "dead-1-c"))
    assert before <= first_seen <= after, "the time this read first found it dead, by the server's clock"
    # Still reported dead on the next look, counted from that first time; forgotten once dead for longer
    # than prune_after.
    again = {h["id"]: h for h in await read_heartbeats(aredis, prefix)}
    assert again["dead-1-c"]["alive"] is False
    assert await aredis.hget(dead_key(prefix), "dead-1-c") == repr(first_seen).encode(), "not reset by a later look"
    assert all(h.get("alive") is not False for h in await read_heartbeats(aredis, prefix, prune_after=-1))
    assert not await aredis.sismember(members, "dead-1-c") and not await aredis.hexists(dead_key(prefix), "dead-1-c")


async def test_collect_reads_group_lag_and_skips_other_keys(aredis: aioredis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:trade"
    pipe = aredis.pipeline(transaction=False)
    for i in range(1, 1501):
        pipe.xadd(key, {"d": b"{}"}, id=f"{1000 + i}-{i}")
    await pipe.execute()
    await aredis.xgroup_create(key, "demo", id="0")
    await aredis.xgroup_create(key, "live", id="$")
    await aredis.set(f"{prefix}:not:a:stream", b"x")  # same shape, not a stream: skipped
    await aredis.xadd(f"{prefix}:binance:ETHUSDT:trade", {"d": b"{}"})  # no group: no row
    _, groups = await collect(aredis, prefix)
    assert sorted((g["group"], g["lag"]) for g in groups) == [("demo", 1500), ("live", 0)]
    report = evaluate([], groups, time.time())
    assert report.stage("consumers").reason == f"consumers WARN: group demo lags 1500 entries on {key}"
    assert CONSUMER_LAG_WARN <= 1500


# ================================================================================================ drills
class Running:
    """An ingestor and its heartbeat, in this process, until the block exits."""

    def __init__(self, ingestor: Ingestor, tasks: list[asyncio.Task[None]]) -> None:
        self.ingestor = ingestor
        self.tasks = tasks

    def check(self) -> None:
        for t in self.tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise AssertionError(f"{t.get_name()} ended: {t.exception()!r}")


def service_beats() -> bool:
    """Whether the ingestor publishes its heartbeat itself (then a test starts no second loop)."""
    import ingestor.service

    return hasattr(ingestor.service, "heartbeat_loop")


@contextlib.asynccontextmanager
async def running(settings: IngestSettings, *, writer_redis: aioredis.Redis, heartbeat_redis: aioredis.Redis,
                  prepare: Callable[[Ingestor], None] | None = None) -> AsyncIterator[Running]:
    ing = Ingestor(settings, redis=writer_redis)
    if prepare is not None:
        prepare(ing)
    tasks = [asyncio.create_task(ing.run(), name="ingestor")]
    if not service_beats() or heartbeat_redis is not writer_redis:
        # Fast beats for the drills; and on the Redis given for heartbeats when the writer has its own.
        tasks.append(asyncio.create_task(
            heartbeat_loop(ing, heartbeat_redis, prefix=settings.prefix, interval=0.2, ttl=1.0), name="heartbeat",
        ))
    try:
        yield Running(ing, tasks)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def wait_status(redis: aioredis.Redis, prefix: str, check: Callable[[StatusReport], bool], what: str, *,
                      timeout: float = DETECT_S, run: Running | None = None) -> StatusReport:
    """Read and judge the status until ``check`` holds; fail naming ``what`` (and the last report) after ``timeout``."""
    last: StatusReport | None = None
    try:
        async with asyncio.timeout(timeout):
            while True:
                if run is not None:
                    run.check()
                heartbeats, groups = await collect(redis, prefix)
                last = evaluate(heartbeats, groups, time.time())
                if check(last):
                    return last
                await asyncio.sleep(0.1)  # poll
    except TimeoutError:
        shown = render(last) if last is not None else "(nothing read)"
        pytest.fail(f"{what}: not seen within {timeout} s; last status:\n{shown}")


def all_ok(report: StatusReport) -> bool:
    return report.ok


def ingest_settings(sim: Simulator, prefix: str, **kw: Any) -> IngestSettings:
    return IngestSettings(url=sim.ws_url, rest_url=sim.rest_url, symbols=("BTCUSDT", "ETHUSDT"), channels=("trade",),
                          prefix=prefix, session=FAST, **kw)


async def test_drill_venue_connection_cut(aredis: aioredis.Redis, prefix: str) -> None:
    async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=300.0)) as sim, \
            running(ingest_settings(sim, prefix), writer_redis=aredis, heartbeat_redis=aredis) as run:
        await wait_status(aredis, prefix, all_ok, "a healthy start", timeout=20, run=run)
        sim.refuse(60)
        sim.close_all()
        # How soon is evaluate's (CONNECTION_DOWN_FAIL_S, tested with a set clock): here, only that it is named.
        report = await wait_status(aredis, prefix, lambda r: r.stage("connection").level is Level.FAIL,
                                   "connection FAIL", timeout=HANG_S, run=run)
        reason = report.stage("connection").reason
        assert reason.startswith("connection FAIL: binance session "), reason
        assert "HTTP 503" in reason or "connection closed" in reason, reason
        assert report.failing[0] == "connection" and report.exit_code == 1
        assert report.stage("ingress").level is Level.OK and report.stage("redis").level is Level.OK


async def test_drill_redis_down_for_the_writer(aredis: aioredis.Redis, prefix: str, private_redis: RedisServer,
                                               tmp_path: Path) -> None:
    """The writer's Redis goes down; heartbeats live on another Redis, so status can still read them.

    (With one Redis for both, status cannot read anything while it is down: it exits 2 naming Redis,
    and the ingestor's market_redis_up metric carries the writer's side.)
    """
    writer_redis = aioredis.Redis.from_url(private_redis.url, socket_timeout=1.0, socket_connect_timeout=0.5)
    try:
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=500.0)) as sim:
            settings = ingest_settings(sim, prefix, writer_capacity=100, spill_dir=str(tmp_path / "spill"))
            async with running(settings, writer_redis=writer_redis, heartbeat_redis=aredis) as run:
                await wait_status(aredis, prefix, all_ok, "a healthy start", timeout=20, run=run)
                private_redis.stop()
                report = await wait_status(aredis, prefix, lambda r: r.stage("redis").level is Level.FAIL,
                                           "redis FAIL", timeout=HANG_S, run=run)
                assert report.stage("redis").reason.startswith("redis FAIL: writes failing ("), report.stage("redis")
                report = await wait_status(aredis, prefix, lambda r: "spilled to disk" in r.stage("redis").cause,
                                           "ticks spilled to disk", run=run)
                assert report.stage("connection").level is Level.OK, "the venue side is not blamed"
                await asyncio.to_thread(restart, private_redis)
                await wait_status(aredis, prefix, lambda r: r.stage("redis").level is not Level.FAIL,
                                  "writes recovered", timeout=20, run=run)
    finally:
        await writer_redis.aclose()


async def slow_handler(tick: Any) -> None:
    await asyncio.sleep(0.02)  # slow handler: a subscriber that takes 20 ms per tick


async def test_drill_slow_subscriber_drops(aredis: aioredis.Redis, prefix: str) -> None:
    def prepare(ing: Ingestor) -> None:
        ing.subscribe(slow_handler, ["binance:*:*"], policy="drop_oldest", name="slow", max_lag=32)

    async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=500.0)) as sim, \
            running(ingest_settings(sim, prefix), writer_redis=aredis, heartbeat_redis=aredis,
                    prepare=prepare) as run:
        report = await wait_status(aredis, prefix, lambda r: r.stage("fanout").level in (Level.WARN, Level.FAIL),
                                   "fanout WARN", timeout=20, run=run)
        fanout = report.stage("fanout")
        assert fanout.level is Level.WARN, fanout
        assert fanout.reason.startswith("fanout WARN: "), fanout
        assert "dropped for slow subscribers" in fanout.cause and "slowest: slow, drop_oldest" in fanout.cause
        assert report.stage("ingress").level is Level.OK and report.stage("redis").level is Level.OK


async def test_drill_ingress_overflow(aredis: aioredis.Redis, prefix: str) -> None:
    """A subscriber that blocks the publisher fills a tiny drop_newest ingress queue."""

    def prepare(ing: Ingestor) -> None:
        ing.subscribe(slow_handler, ["binance:*:*"], policy="block", name="blocker", max_lag=16)

    async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=500.0)) as sim:
        settings = ingest_settings(sim, prefix, queue_capacity=64, queue_policy=Policy.DROP_NEWEST, writer_capacity=64)
        async with running(settings, writer_redis=aredis, heartbeat_redis=aredis, prepare=prepare) as run:
            report = await wait_status(aredis, prefix, lambda r: r.stage("ingress").level is Level.FAIL,
                                       "ingress FAIL", timeout=HANG_S, run=run)
            ingress = report.stage("ingress")
            assert ingress.reason.startswith("ingress FAIL: "), ingress
            assert "drop_newest" in ingress.cause
            assert "ticks dropped" in ingress.cause or "queue full" in ingress.cause
            assert "ingress" in report.failing


async def test_drill_consumer_group_lagging(aredis: aioredis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:trade"
    await aredis.xadd(key, {"d": b"{}"}, id="1-1")
    await aredis.xgroup_create(key, "demo", id="0")
    pipe = aredis.pipeline(transaction=False)
    for i in range(2, 5002):
        pipe.xadd(key, {"d": b"{}"}, id=f"1-{i}")
    await pipe.execute()
    report = await wait_status(aredis, prefix, lambda r: r.stage("consumers").level is Level.WARN, "consumers WARN")
    assert report.stage("consumers").reason == f"consumers WARN: group demo lags 5001 entries on {key}"


CHILD = r"""
import asyncio, sys
import redis.asyncio as aioredis
import ingestor.service
from ingestor.config import IngestSettings
from ingestor.heartbeat import heartbeat_loop, heartbeat_state
from ingestor.service import Ingestor
from ingestor.session import SessionSettings

async def main() -> None:
    ws, rest, prefix, url = sys.argv[1:5]
    settings = IngestSettings(url=ws, rest_url=rest, symbols=("BTCUSDT",), prefix=prefix, redis_url=url,
                              session=SessionSettings(backoff_cap=0.5))
    redis = aioredis.Redis.from_url(url)
    ing = Ingestor(settings, redis=redis)
    print(heartbeat_state(ing).identity.id, flush=True)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(ing.run())
        if not hasattr(ingestor.service, "heartbeat_loop"):  # the ingestor does not beat by itself
            tg.create_task(heartbeat_loop(ing, redis, prefix=prefix, interval=0.2, ttl=1.0))

asyncio.run(main())
"""


async def test_drill_ingestor_killed(aredis: aioredis.Redis, prefix: str, redis_url: str) -> None:
    async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=200.0)) as sim:
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, sim.ws_url, sim.rest_url, prefix, redis_url,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            assert child.stdout is not None
            async with asyncio.timeout(20):
                ident = (await child.stdout.readline()).decode().strip()
            assert ident, "the child printed its ingestor id"
            report = await wait_status(aredis, prefix, lambda r: ident in r.ingestors and r.ok, "the child healthy",
                                       timeout=20)
            child.send_signal(signal.SIGKILL)  # no clean stop: its heartbeat key just expires
            await child.wait()
            # While its key lives it is not named dead; the first read after the key expired names it.
            async with asyncio.timeout(HANG_S):
                while True:
                    seen = evaluate(*await collect(aredis, prefix), time.time())
                    if not await aredis.exists(heartbeat_key(prefix, ident)):
                        break
                    assert seen.stage("ingestor").level is Level.OK, render(seen)  # the key outlived that read
                    await asyncio.sleep(0.05)  # poll
            report = evaluate(*await collect(aredis, prefix), time.time())
            assert report.stage("ingestor").level is Level.FAIL, render(report)
            assert report.stage("ingestor").reason.startswith(f"ingestor FAIL: ingestor {ident} stopped reporting")
            assert report.failing[0] == "ingestor" and report.exit_code == 1
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()


# ================================================================================================ the command
async def market_status(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    """Run ``python -m ops.cli status ...`` without blocking this event loop (it serves the drill)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", "status", *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_market_status_command(aredis: aioredis.Redis, prefix: str, redis_url: str) -> None:
    env = {"MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}
    code, out, err = await market_status("--json", env=env)
    assert code == 1, err
    doc = orjson.loads(out)
    assert doc["failing"] == ["ingestor"] and "no ingestor is reporting" in doc["stages"][0]["reason"]
    assert "Traceback" not in err

    async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=200.0)) as sim, \
            running(ingest_settings(sim, prefix), writer_redis=aredis, heartbeat_redis=aredis) as run:
        await wait_status(aredis, prefix, all_ok, "a healthy start", timeout=20, run=run)
        code, out, err = await market_status("--json", env=env)
        assert code == 0, out + err
        doc = orjson.loads(out)
        assert doc["status"] == "ok" and doc["failing"] == [] and len(doc["ingestors"]) == 1

        key = f"{prefix}:binance:SOLUSDT:trade"  # a stream a stuck group has not read
        await aredis.xadd(key, {"d": b"{}"}, id="1-1")
        await aredis.xgroup_create(key, "stuck", id="0")
        pipe = aredis.pipeline(transaction=False)
        for i in range(2, CONSUMER_LAG_WARN + 2):
            pipe.xadd(key, {"d": b"{}"}, id=f"1-{i}")
        await pipe.execute()
        code, out, err = await market_status(env=env)
        assert code == 1, out + err
        lines = out.splitlines()
        assert lines[0] == "market status: WARN (consumers)", out
        assert any(line.startswith("consumers WARN: group stuck lags ") for line in lines), out


async def test_market_status_bad_input_is_exit_2(prefix: str) -> None:
    code, out, err = await market_status(env={"MARKET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
                                              "MARKET_PREFIX": prefix})
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Redis" in err and "Traceback" not in err
    code, _, err = await market_status(env={"MARKET_PREFIX": "bad:prefix"})
    assert code == 2 and "prefix" in err and len(err.strip().splitlines()) == 1
