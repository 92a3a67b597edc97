"""consumer_sdk.core.health: the heartbeat document, written by to_doc and read back by from_doc, whatever it holds."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import consumer_sdk.core.health as health_module
from consumer_sdk.core.health import (
    SCHEMA,
    Connections,
    Fanout,
    Gaps,
    Heartbeat,
    Ingress,
    Problem,
    Session,
    Subscriber,
    Writer,
    from_doc,
    to_doc,
)


def full() -> Heartbeat:
    """A heartbeat with a value other than its default in every field."""
    return Heartbeat(
        v=SCHEMA, id="h-7-abc123", host="h", pid=7, version="0.1.0", venue="binance",
        url="wss://stream.binance.com:9443", redis="redis://app:***@redis:6379/0", prefix="md",
        started_at=1_800_000_000.0, ts=1_800_000_100.5, uptime_s=100.5, window_s=60.0, reconnect_window_s=300.0,
        connections=Connections(
            total=2, live=1, reconnects=5, reconnects_recent=3, reconnect_reasons={"connection closed": 4, "stall": 1},
            stale=("binance:BTCUSDT:trade",), stale_count=1, stalls=1,
            sessions=(
                Session(id=1, state="live", reason="subscribed", last_error=None, state_for_s=99.0, down_for_s=None,
                        last_frame_age_s=0.1, streams=4, reconnects=0, subscribe_errors=0, stale=0),
                Session(id=2, state="backing_off", reason="connection closed: 1006",
                        last_error="connection closed: 1006", state_for_s=2.0, down_for_s=12.5, last_frame_age_s=None,
                        streams=2, reconnects=5, subscribe_errors=1, stale=1),
            ),
        ),
        ingress=Ingress(length=850, capacity=1000, fill_ratio=0.85, policy="block", dropped=3, backpressure_events=2,
                        dropped_recent=1, backpressure_recent=1),
        fanout=Fanout(
            present=True, subscribers=1, batch_handlers=1, capacity=65536, delivered=10, dropped=50, errors=1,
            disconnected=1, waiting_room=True, max_lag=900, offloaded=1, threads=1, overruns=4,
            slowest=(Subscriber(name="strategy", policy="drop_oldest", execution="thread", offloaded=True,
                                handler_us=12.3, handler_max_us=80.0, busy_us=5, overruns=4, lag=900, dropped=50,
                                errors=1),),
            dropped_recent=50, errors_recent=1, disconnected_recent=1, offloaded_recent=1, overruns_recent=2,
        ),
        writer=Writer(
            present=True, connected=False, buffered=500, capacity=1000, fill_ratio=0.5, appended=10, errors=4,
            retries=3, failing="oom", oom=True, failing_for_s=12.0, rejected=40, rejected_by_reason={"oom": 40},
            dead_lettered=2, dead_letter_key="md:deadletter", spilled=300, spill_bytes=4096, spill_full=True,
            spill_full_reason="disk full", spill_full_events=1, spill_refused=2, spill_write_failures=1,
            spill_corrupt=1, spill_torn=1, last_flush_us=200, last_write_age_s=3.5, errors_recent=4,
            rejected_recent=40, dead_lettered_recent=2,
        ),
        gaps=Gaps(detected=3, repaired=2, unrepaired=1, ticks_unrepaired=40, repairing=1, duplicates=2,
                  out_of_order=1, unrepaired_recent=1),
        interval_s=1.0, ttl_s=5.0, tasks=17,
    )


# -- the round trip ---------------------------------------------------------------------------------------------
def test_every_field_reads_back_as_written() -> None:
    hb = full()
    doc = orjson.loads(orjson.dumps(to_doc(hb)))
    parsed = from_doc(doc)
    assert parsed.problems == () and parsed.malformed == ()
    assert parsed.heartbeat == hb
    assert to_doc(parsed.heartbeat) == doc


def test_parts_that_are_not_there_are_written_short_and_read_back() -> None:
    hb = Heartbeat(fanout=Fanout(present=False, batch_handlers=2), writer=Writer(present=False))
    doc = to_doc(hb)
    assert doc["fanout"] == {"present": False, "subscribers": 0, "batch_handlers": 2}
    assert doc["writer"] == {"present": False}
    assert not {"interval_s", "ttl_s", "tasks"} & set(doc), "written only by the loop that publishes"
    parsed = from_doc(doc)
    assert parsed.heartbeat == hb
    assert not [p for p in parsed.problems if p.path.startswith(("fanout", "writer"))], parsed.problems


def test_exports() -> None:
    assert set(health_module.__all__) == {
        "MAX_LISTED", "SCHEMA", "Connections", "Fanout", "Gaps", "Heartbeat", "Ingress", "Parsed", "Problem",
        "Session", "Subscriber", "Writer", "from_doc", "to_doc",
    }


# -- hostile documents -----------------------------------------------------------------------------------------
def test_not_an_object_is_one_problem() -> None:
    for value in ("text", 3, None, [1, 2], True):
        parsed = from_doc(value)
        assert parsed.heartbeat == Heartbeat(v=None)
        assert len(parsed.problems) == 1 and parsed.problems[0].path == ""
        assert str(parsed.problems[0]).startswith("the document: expected an object, found ")


def test_wrong_types_are_named_field_by_field_and_defaulted() -> None:
    doc = to_doc(full())
    doc["writer"]["connected"] = "no"
    doc["writer"]["buffered"] = "5"
    doc["writer"]["rejected_by_reason"] = {"oom": "many", "readonly": 3}
    doc["connections"]["sessions"] = [None, {**doc["connections"]["sessions"][1], "state": 5, "down_for_s": "soon"}]
    doc["connections"]["stale"] = ["binance:BTCUSDT:trade", 7]
    doc["window_s"] = "x"
    doc["tasks"] = 1.5
    doc["ingress"]["capacity"] = True  # a boolean is no integer
    parsed = from_doc(doc)
    assert [str(p) for p in parsed.problems] == [
        "window_s: expected a number, found a string",
        "connections.stale[1]: expected a string, found an integer",
        "connections.sessions[0]: expected an object, found null",
        "connections.sessions[1].state: expected a string, found an integer",
        "connections.sessions[1].down_for_s: expected a number, found a string",
        "ingress.capacity: expected an integer, found a boolean",
        "writer.connected: expected true or false, found a string",
        "writer.buffered: expected an integer, found a string",
        "writer.rejected_by_reason.oom: expected an integer, found a string",
        "tasks: expected an integer, found a number",
    ]
    assert parsed.malformed == parsed.problems
    hb = parsed.heartbeat
    assert hb.window_s is None and hb.ingress.capacity == 0 and hb.tasks is None
    assert (hb.writer.connected, hb.writer.buffered) == (True, 0), "each at its default"
    assert hb.writer.rejected_by_reason == {"oom": 0, "readonly": 3}, "the key is kept: readers name it"
    assert hb.connections.stale == ("binance:BTCUSDT:trade",)
    (session,) = hb.connections.sessions
    assert (session.state, session.down_for_s, session.reason) == ("unknown", None, "connection closed: 1006")
    assert hb.writer.appended == 10 and hb.gaps == full().gaps, "the rest is read as written"


def test_a_section_of_the_wrong_shape_is_one_problem() -> None:
    parsed = from_doc({**to_doc(full()), "ingress": [], "gaps": "none"})
    assert [str(p) for p in parsed.problems] == [
        "ingress: expected an object, found a list", "gaps: expected an object, found a string",
    ]
    assert parsed.heartbeat.ingress == Ingress() and parsed.heartbeat.gaps == Gaps()


def test_a_document_of_an_older_version_misses_fields_without_being_malformed() -> None:
    doc: dict[str, Any] = {"v": 1, "id": "h-1-a", "writer": {"present": True, "rejected_recent": 7},
                           "fanout": {"present": True, "slowest": [{"name": "s", "lag": 3}]}}
    parsed = from_doc(doc)
    assert parsed.malformed == () and parsed.problems and all(p.missing for p in parsed.problems)
    assert Problem("writer.dead_lettered", "an integer", "nothing", missing=True) in parsed.problems
    hb = parsed.heartbeat
    assert hb.writer.dead_lettered is None, "told apart from 0: before the dead-letter stream"
    assert hb.writer.rejected_recent == 7 and hb.writer.connected is True
    assert hb.fanout.slowest == (Subscriber(name="s", lag=3),) and hb.fanout.slowest[0].handler_us is None
    assert hb.connections == Connections(), "a missing section: its defaults"
    # A null where a value is expected counts as missing, like an absent field.
    assert from_doc({**to_doc(full()), "pid": None}).malformed == ()


def test_a_number_too_large_is_a_problem_not_an_error() -> None:
    parsed = from_doc({**to_doc(full()), "uptime_s": 10**400})
    assert parsed.heartbeat.uptime_s is None
    assert [str(p) for p in parsed.problems] == ["uptime_s: expected a number, found an integer too large for a number"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
keys = st.sampled_from([
    "v", "id", "venue", "window_s", "uptime_s", "connections", "ingress", "fanout", "writer", "gaps", "sessions",
    "state", "down_for_s", "present", "slowest", "stale", "reconnect_reasons", "rejected_by_reason", "connected",
    "handler_us", "dead_lettered", "fill_ratio",
])
documents = st.recursive(
    st.dictionaries(keys, json_values, max_size=6),
    lambda children: st.dictionaries(keys, children | json_values | st.lists(children, max_size=2), max_size=6),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # a busy CI machine is slow, not wrong
@given(documents)
def test_any_document_reads_to_a_heartbeat_that_reads_back_the_same(doc: dict[str, Any]) -> None:
    parsed = from_doc(doc)
    assert all(isinstance(p.path, str) and p.expected and p.found for p in parsed.problems)
    again = from_doc(orjson.loads(orjson.dumps(to_doc(parsed.heartbeat))))
    assert again.heartbeat == parsed.heartbeat, "what was read is written and read back the same"
    assert again.malformed == ()
