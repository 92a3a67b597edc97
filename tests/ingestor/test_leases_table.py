"""Shards and leases: the pure split and lease table, and the Redis scripts against the shared Redis."""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence

import pytest
import redis.asyncio as aioredis

from consumer_sdk.core.errors import ConfigError
from ingestor.leases import (
    Gained,
    LeaseSettings,
    LeaseStore,
    LeaseTable,
    Lost,
    fence_key,
    keep_leases,
    lease_key,
    lease_round,
    leases_doc,
    shard_of,
    shard_streams,
)

TTL = 3.0


def table(count: int = 2, max_owned: int = 0) -> LeaseTable:
    return LeaseTable(LeaseSettings(count=count, max_owned=max_owned, ttl_s=TTL))


# ------------------------------------------------------------------------------------------ the split
def test_shard_of_is_crc32_of_the_symbol() -> None:
    assert shard_of("BTCUSDT", 2) == zlib.crc32(b"BTCUSDT") % 2
    assert {shard_of("BTCUSDT", 1), shard_of("ETHUSDT", 1)} == {0}
    assert [shard_of(s, 7) for s in ("A", "B", "C")] == [zlib.crc32(s.encode()) % 7 for s in ("A", "B", "C")]
    with pytest.raises(ValueError):
        shard_of("BTCUSDT", 0)


def test_shard_streams_splits_every_symbol_once() -> None:
    symbols = [f"S{i}USDT" for i in range(50)]
    split = shard_streams(symbols, 4)
    assert sorted(split) == [0, 1, 2, 3]
    assert sorted(s for part in split.values() for s in part) == sorted(symbols)
    assert all(shard_of(s, 4) == i for i, part in split.items() for s in part)
    assert all(split.values()), "50 symbols over 4 shards: none empty"
    # BTCUSDT and ETHUSDT, the symbols of the integration tests, fall in different shards of two.
    assert shard_of("BTCUSDT", 2) != shard_of("ETHUSDT", 2)


def test_settings_are_checked() -> None:
    assert not LeaseSettings().enabled
    s = LeaseSettings(count=4, max_owned=1, ttl_s=3.0)
    assert s.enabled and s.limit == 1 and s.renew_every_s == 1.0
    assert LeaseSettings(count=4).limit == 4, "max_owned 0: all of them"
    assert LeaseSettings(count=2, max_owned=5).limit == 2
    for bad in ({"count": -1}, {"count": 5000}, {"max_owned": -1}, {"ttl_s": 0.1}, {"ttl_s": 1e6}):
        with pytest.raises(ConfigError):
            LeaseSettings(**bad)


# ------------------------------------------------------------------------------------------ the table
def test_a_fresh_table_wants_every_shard_up_to_its_limit() -> None:
    assert table(3).wanted() == ([0, 1, 2], 3)
    assert table(3, max_owned=1).wanted() == ([0, 1, 2], 1)
    t = table(3, max_owned=1)
    assert t.acquired([(1, 7)], sent_at=10.0) == [Gained(1, 7)]
    assert t.wanted() == ([], 0), "at its limit: takes nothing more"
    assert t.tokens() == {1: 7}


def test_a_lease_is_valid_for_ttl_after_its_request_was_sent() -> None:
    t = table(2)
    t.acquired([(0, 1)], sent_at=100.0)
    assert t.expire(100.0 + TTL - 0.001) == []
    assert t.renewed({0: True}, sent_at=102.0) == []
    assert t.held[0].valid_until == 102.0 + TTL
    assert t.expire(104.9) == []
    assert t.expire(105.0) == [Lost(0, 1, "expired")], "not renewed in time: lost, a peer may hold it"
    assert t.held == {} and t.lost == 1
    assert t.wanted() == ([0, 1], 2), "tried again as any free shard"


def test_a_late_answer_never_shortens_validity() -> None:
    t = table(1)
    t.acquired([(0, 1)], sent_at=100.0)
    t.renewed({0: True}, sent_at=102.0)
    t.renewed({0: True}, sent_at=101.0)  # an older request answered later
    assert t.held[0].valid_until == 102.0 + TTL


def test_a_lease_whose_value_changed_is_lost_as_taken() -> None:
    t = table(2)
    t.acquired([(0, 1), (1, 2)], sent_at=0.0)
    assert t.renewed({0: True, 1: False}, sent_at=1.0) == [Lost(1, 2, "taken")]
    assert t.tokens() == {0: 1}
    assert t.renewed({1: True}, sent_at=1.0) == [], "an answer for a lease no longer held is ignored"


def test_acquired_ignores_shards_out_of_range_or_held() -> None:
    t = table(2)
    assert t.acquired([(0, 1), (0, 2), (5, 3)], sent_at=0.0) == [Gained(0, 1)]
    assert t.gained == 1


def test_failures_are_counted_with_since_when() -> None:
    t = table(1)
    t.failed("Connection refused", 10.0)
    t.failed("Connection refused", 12.0)
    st = t.stats(13.0)
    assert st.errors == 2 and st.failing == "Connection refused" and st.failing_for_s == 3.0
    t.succeeded()
    assert t.stats(14.0).failing == "" and t.stats(14.0).failing_for_s == 0.0


def test_release_all_is_not_counted_as_lost() -> None:
    t = table(2)
    t.acquired([(0, 4), (1, 5)], sent_at=0.0)
    assert t.release_all() == [Lost(0, 4, "released"), Lost(1, 5, "released")]
    assert t.lost == 0 and t.held == {}


def test_leases_doc() -> None:
    t = table(2, max_owned=1)
    t.acquired([(1, 9)], sent_at=0.0)
    t.failed("x" * 500, 0.0)
    doc = leases_doc(t.stats(2.0), {1: ("ETHUSDT",)})
    assert doc == {
        "count": 2, "max_owned": 1, "ttl_s": TTL, "owned": [{"shard": 1, "token": 9, "symbols": 1}], "gained": 1,
        "lost": 0, "errors": 1, "failing": "x" * 200, "failing_for_s": 2.0,
    }


# ------------------------------------------------------------------------------------------ Redis
async def test_the_scripts_take_renew_and_release_with_fencing_tokens(aredis: aioredis.Redis, prefix: str) -> None:
    a, b = LeaseStore(aredis, prefix, "a-1-x"), LeaseStore(aredis, prefix, "b-2-y")
    got_a = await a.acquire([0, 1, 2], 2, TTL)
    assert [s for s, _ in got_a] == [0, 1]
    got_b = await b.acquire([0, 1, 2], 2, TTL)
    assert [s for s, _ in got_b] == [2], "only the free one"
    tokens = [t for _, t in got_a + got_b]
    assert tokens == sorted(tokens) and len(set(tokens)) == 3, "each lease taken gets a larger token"
    assert await aredis.get(fence_key(prefix)) == str(tokens[-1]).encode()
    assert await a.read(3) == {0: (tokens[0], "a-1-x"), 1: (tokens[1], "a-1-x"), 2: (tokens[2], "b-2-y")}
    pttl = await aredis.pttl(lease_key(prefix, 0))
    assert 0 < pttl <= TTL * 1000
    held_a = dict(got_a)
    assert await a.renew(held_a, 30.0) == {0: True, 1: True}
    assert await aredis.pttl(lease_key(prefix, 0)) > TTL * 1000, "extended"
    # b cannot renew or release a's leases, nor a lease of its own with an old token.
    assert await b.renew(held_a, TTL) == {0: False, 1: False}
    assert await b.release(held_a) == 0
    assert await b.renew({2: tokens[2] - 1}, TTL) == {2: False}
    # A lease taken by someone else after it expired: the old owner's renewal is refused.
    await aredis.delete(lease_key(prefix, 1))
    got_b2 = await b.acquire([1], 1, TTL)
    assert got_b2[0][0] == 1 and got_b2[0][1] > tokens[-1]
    assert await a.renew(held_a, TTL) == {0: True, 1: False}
    assert await a.release(held_a) == 1
    assert (await a.read(3))[0] is None


async def test_lease_round_and_a_standby_taking_over(aredis: aioredis.Redis, prefix: str) -> None:
    settings = LeaseSettings(count=2, max_owned=2, ttl_s=0.6)
    owner, standby = LeaseTable(settings), LeaseTable(settings)
    s_owner, s_standby = LeaseStore(aredis, prefix, "owner-1-a"), LeaseStore(aredis, prefix, "standby-2-b")
    clock = [100.0]

    def now() -> float:
        return clock[0]

    gained, lost = await lease_round(owner, s_owner, clock=now)
    assert [g.shard for g in gained] == [0, 1] and lost == []
    assert await lease_round(standby, s_standby, clock=now) == ([], []), "a standby holds nothing"
    # The owner stops renewing; once Redis dropped its leases the standby takes both.
    for shard in (0, 1):
        await aredis.delete(lease_key(prefix, shard))
    gained, _ = await lease_round(standby, s_standby, clock=now)
    assert [g.shard for g in gained] == [0, 1]
    # The owner's next round, still within its own validity: the compare finds another value.
    clock[0] += 0.1
    gained, lost = await lease_round(owner, s_owner, clock=now)
    assert gained == [] and {x.reason for x in lost} == {"taken"} and owner.held == {}
    # And a round long after (a process frozen past its ttl) finds its leases expired before asking.
    await lease_round(owner, s_owner, clock=now)
    clock[0] += 10
    stale = LeaseTable(settings)
    stale.acquired([(0, 1)], sent_at=90.0)
    _, lost = await lease_round(stale, s_owner, clock=now)
    assert lost == [Lost(0, 1, "expired")]


async def test_keep_leases_reports_changes_and_releases_at_stop(aredis: aioredis.Redis, prefix: str) -> None:
    settings = LeaseSettings(count=2, max_owned=1, ttl_s=0.6)
    t = LeaseTable(settings)
    store = LeaseStore(aredis, prefix, "k-1-a")
    seen: list[tuple[Sequence[Gained], Sequence[Lost]]] = []
    first = asyncio.Event()

    async def on_change(gained: Sequence[Gained], lost: Sequence[Lost]) -> None:
        seen.append((gained, lost))
        first.set()

    task = asyncio.create_task(keep_leases(t, store, on_change))
    async with asyncio.timeout(5):
        await first.wait()
    assert [g.shard for g in seen[0][0]] == [0]
    # Taken from under it (as after an expiry): the keeper says lost, then takes a free shard again.
    await aredis.set(lease_key(prefix, 0), "999 intruder", px=60_000)
    async with asyncio.timeout(5):
        while not any(lost for _, lost in seen):
            await asyncio.sleep(0.05)  # poll: the keeper's own period
    assert seen[-1][1][0].reason in ("taken", "expired")
    async with asyncio.timeout(5):
        while not t.held:
            await asyncio.sleep(0.05)  # poll
    assert list(t.held) == [1]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await aredis.get(lease_key(prefix, 1)) is None, "released at a clean stop"
    assert await aredis.get(lease_key(prefix, 0)) == b"999 intruder", "never someone else's"


async def test_keep_leases_counts_an_unreachable_store_and_lets_leases_expire(aredis: aioredis.Redis,
                                                                             prefix: str) -> None:
    settings = LeaseSettings(count=1, ttl_s=0.6)
    t = LeaseTable(settings)
    t.acquired([(0, 1)], sent_at=asyncio.get_running_loop().time())
    dead = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.1)
    lost_seen = asyncio.Event()

    async def on_change(gained: Sequence[Gained], lost: Sequence[Lost]) -> None:
        if lost:
            lost_seen.set()

    task = asyncio.create_task(keep_leases(t, LeaseStore(dead, prefix, "k-1-a"), on_change))
    try:
        async with asyncio.timeout(5):
            await lost_seen.wait()
        assert t.errors >= 1 and t.failing, "counted, with why"
        assert t.held == {}
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await dead.aclose()


def test_abandon_gives_a_lease_up_to_expire_in_redis() -> None:
    t = table(2)
    t.acquired([(0, 4)], sent_at=0.0)
    assert t.abandon(1) is None
    assert t.abandon(0) == Lost(0, 4, "abandoned")
    assert t.held == {} and t.lost == 1
    assert t.wanted() == ([0, 1], 2), "taken again when free"
