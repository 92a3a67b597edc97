"""``market status``'s ``leases`` stage, judged from the ``leases`` sections of heartbeats (pure)."""

from __future__ import annotations

from typing import Any

from ops.status import STAGES, Level, evaluate

NOW = 1_700_000_000.0


def hb(ident: str, owned: dict[int, int] | None = None, *, count: int = 2, failing: str | None = None,
       sharded: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": ident, "alive": True, "venue": "binance", "ts": NOW}
    if sharded:
        doc["leases"] = {
            "count": count, "max_owned": 1, "ttl_s": 3.0,
            "owned": [{"shard": s, "token": t, "symbols": 1} for s, t in (owned or {}).items()],
            "gained": len(owned or {}), "lost": 0, "errors": 1 if failing else 0, "failing": failing,
            "failing_for_s": 4.0 if failing else None,
        }
    return doc


def leases(*heartbeats: dict[str, Any]) -> tuple[Level, str]:
    report = evaluate(list(heartbeats), [], NOW)
    assert [s.stage for s in report.stages] == list(STAGES) and STAGES[-1] == "leases"
    stage = report.stage("leases")
    return stage.level, stage.reason


def test_not_sharded_is_ok() -> None:
    assert leases(hb("a", sharded=False)) == (Level.OK, "leases OK: not sharded (no ingestor reports [shards])")
    assert leases()[0] is Level.OK, "nothing reports: nothing to judge here (the ingestor stage fails)"


def test_every_shard_owned_once_with_a_standby() -> None:
    assert leases(hb("a", {0: 5}), hb("b", {1: 6}), hb("c")) == (
        Level.OK, "leases OK: 2/2 shard(s) owned (a: 0; b: 1), 1 standby"
    )


def test_a_shard_nobody_owns_fails() -> None:
    level, reason = leases(hb("a", {0: 5}), {"id": "b", "alive": False, "dead_for_s": 2.0})
    assert level is Level.FAIL
    assert reason == "leases FAIL: 1 of 2 shard(s) owned by no reporting ingestor (1): their streams are not ingested"


def test_a_shard_claimed_twice_warns_naming_the_tokens() -> None:
    level, reason = leases(hb("old", {0: 5, 1: 3}, count=2), hb("new", {0: 9}))
    assert level is Level.WARN
    assert reason == ("leases WARN: shard 0 claimed by old (token 5) and new (token 9): the older stops at its "
                      "next renewal")


def test_an_unreachable_lease_store_fails_naming_the_ingestor() -> None:
    level, reason = leases(hb("a", {0: 5, 1: 6}, failing="Error 111 connecting to 10.0.0.1:6379. Connection refused."))
    assert level is Level.FAIL
    assert reason.startswith("leases FAIL: a cannot reach its lease store for 4.0 s (Error 111 connecting")
    assert reason.endswith("its shards stop when their leases expire")


def test_ingestors_that_disagree_on_the_count_fail() -> None:
    assert leases(hb("a", {0: 1}, count=2), hb("b", {0: 2}, count=3)) == (
        Level.FAIL, "leases FAIL: ingestors disagree on [shards] count: [2, 3]"
    )


def test_odd_lease_sections_never_raise() -> None:
    odd: list[dict[str, Any]] = [
        {"id": "x", "leases": {"count": "two", "owned": "all"}},
        {"id": "y", "leases": {"count": 2, "owned": [None, {"shard": "0"}, 5], "failing": 3}},
        {"id": "z", "leases": []},
    ]
    report = evaluate(odd, [], NOW)
    assert report.stage("leases").level in (Level.OK, Level.WARN, Level.FAIL, Level.UNKNOWN)


def test_a_standby_without_a_connection_is_not_a_connection_problem() -> None:
    session = {"id": 1, "state": "live", "streams": 2, "last_frame_age_s": 0.1}
    owner = {**hb("a", {0: 5, 1: 6}), "connections": {"total": 1, "live": 1, "sessions": [session]}}
    standby = {**hb("b"), "connections": {"total": 0, "live": 0, "sessions": []}}
    report = evaluate([owner, standby], [], NOW)
    assert report.stage("connection").level is Level.OK, report.stage("connection").reason
    assert report.stage("leases").reason == "leases OK: 2/2 shard(s) owned (a: 0, 1), 1 standby"
    unsharded = {**hb("c", sharded=False), "connections": {"total": 0, "live": 0, "sessions": []}}
    assert evaluate([owner, unsharded], [], NOW).stage("connection").level is Level.WARN, "no connection yet"
