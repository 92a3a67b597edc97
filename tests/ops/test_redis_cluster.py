"""ops.redis_cluster: a real Redis Cluster on free ports, formed, failed over, restarted, stopped.

The pure parts (slot ranges, ``CLUSTER NODES``/``CLUSTER INFO`` as real servers sent them) are checked alone; the
cluster itself is checked through redis-py's own cluster client, the way the project's code will meet it: keys on
every master, a stream written and read, a master SIGKILLed under a writing client, the replica promoted, a
stale client sent on by ``MOVED``, and no node left running at exit.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ClusterDownError, ResponseError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError

from ops.redis_cluster import (
    CLUSTER_SLOTS,
    ClusterNode,
    LocalCluster,
    NodeView,
    parse_cluster_info,
    parse_cluster_nodes,
    slot_owners,
    slot_ranges,
    start_cluster,
)
from ops.redis_server import redis_answers

pytestmark = pytest.mark.redis

HANG_S = 120.0  # a wait's bound: only a hang takes this long

# CLUSTER NODES from Redis 7.0.15, on a 3x1 cluster whose master 371cc08d was SIGKILLed and failed over to d6043ade
AFTER_FAILOVER = (
    "6616416af42245bc46c1cd19c155f28d2d139f8d 127.0.0.1:57107@37069 slave e2969638b9f494b12b49211dcba43fd01727dc30 0 "
    "1796562495842 1 connected\n"
    "8c49de2b88f5134ee09dbb674283c3a17f93ee6b 127.0.0.1:46235@56615 master - 0 1796562496045 3 connected 10922-16383\n"
    "29cb79d46d142f0d578536a4e467ae3dd9c53075 127.0.0.1:60435@41799 slave 8c49de2b88f5134ee09dbb674283c3a17f93ee6b 0 "
    "1796562496045 3 connected\n"
    "d6043ade3e19f3c8b46f4bf2a969c3fbe4c5a6b4 127.0.0.1:59579@58335 master - 0 1796562496149 7 connected 5461-10921\n"
    "371cc08de1e73962fc38a5d5a1da68d3220c8489 127.0.0.1:59273@49259 master,fail - 1796562493823 1796562493318 2 "
    "disconnected\n"
    "e2969638b9f494b12b49211dcba43fd01727dc30 127.0.0.1:34491@47605 myself,master - 0 1796562496000 1 connected "
    "0-5460\n"
)
# the same server, slot 100 being migrated from 9b618ab5 (this node) to 0020ca4e
MIGRATING = (
    "0020ca4e67aa4d142c1e387010f903c87089c5f7 127.0.0.1:33741@55203 master - 0 1796562426149 2 connected 8192-16383\n"
    "9b618ab5dec8ba19895bbade0780911fb367f852 127.0.0.1:45281@45355 myself,master - 0 1796562426000 1 connected "
    "0-8191 [100->-0020ca4e67aa4d142c1e387010f903c87089c5f7]\n"
)
CLUSTER_INFO = (
    "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\n"
    "cluster_slots_fail:0\r\ncluster_known_nodes:6\r\ncluster_size:3\r\ncluster_current_epoch:7\r\n"
)


# -- pure ----------------------------------------------------------------------------------------------------------
@given(st.integers(1, CLUSTER_SLOTS))
def test_slot_ranges_cover_every_slot_once_in_near_equal_parts(masters: int) -> None:
    ranges = slot_ranges(masters)
    assert len(ranges) == masters
    assert ranges[0][0] == 0
    assert ranges[-1][1] == CLUSTER_SLOTS - 1
    assert all(a[1] + 1 == b[0] for a, b in itertools.pairwise(ranges))
    sizes = {hi - lo + 1 for lo, hi in ranges}
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("masters", [0, -1, CLUSTER_SLOTS + 1])
def test_slot_ranges_refuse_impossible_counts(masters: int) -> None:
    with pytest.raises(ValueError, match="masters must be"):
        slot_ranges(masters)


def test_cluster_nodes_after_a_failover_is_read_as_sent() -> None:
    views = {v.id[:8]: v for v in parse_cluster_nodes(AFTER_FAILOVER)}
    assert len(views) == 6
    dead = views["371cc08d"]
    assert dead.flags == {"master", "fail"} and not dead.working and not dead.connected and dead.slots == ()
    me = views["e2969638"]
    assert me.is_master and me.working and "myself" in me.flags
    assert (me.host, me.port, me.slots) == ("127.0.0.1", 34491, ((0, 5460),))
    replica = views["6616416a"]
    assert not replica.is_master and replica.master_id == me.id and replica.working
    assert slot_owners(list(views.values())) == (
        (0, 5460, me.id), (5461, 10921, views["d6043ade"].id), (10922, 16383, views["8c49de2b"].id),
    )


def test_a_slot_in_migration_is_not_counted_as_served() -> None:
    views = parse_cluster_nodes(MIGRATING)
    assert [v.slots for v in views] == [((8192, 16383),), ((0, 8191),)]


def test_a_failing_master_serves_nothing() -> None:
    text = "abc 127.0.0.1:7000@17000,host.example master,fail? - 0 0 1 connected 0-16383\n"
    (view,) = parse_cluster_nodes(text)
    assert (view.host, view.port, view.slots) == ("127.0.0.1", 7000, ((0, 16383),))
    assert not view.working
    assert slot_owners([view]) == ()
    assert slot_owners([NodeView("abc", "h", 1, frozenset({"master"}), None, True, ((5, 5), (0, 3)))]) == (
        (0, 3, "abc"), (5, 5, "abc"),
    )


def test_cluster_info_is_read_as_sent() -> None:
    info = parse_cluster_info(CLUSTER_INFO)
    assert info["cluster_state"] == "ok"
    assert info["cluster_slots_ok"] == "16384"
    assert info["cluster_size"] == "3"


# -- a real cluster ------------------------------------------------------------------------------------------------
def keys_on_every_master(cluster: LocalCluster) -> dict[int, str]:
    """One key per master, by master port (key names tried in turn until every master's slots hold one)."""
    owners = slot_owners(cluster.views())
    found: dict[int, str] = {}
    i = 0
    while len(found) < len(owners):
        key = f"k:{i}"
        slot = key_slot(key.encode())
        for lo, hi, ident in owners:
            if lo <= slot <= hi:
                found.setdefault(cluster.node(ident).port, key)
        i += 1
    return found


def assert_stopped(cluster: LocalCluster) -> None:
    assert all(not n.alive for n in cluster.nodes)
    assert all(n.server.process.returncode is not None for n in cluster.nodes)
    assert not any(redis_answers(n.url, timeout=0.5) for n in cluster.nodes)
    assert not Path(cluster.directory).exists()


@pytest.mark.slow
async def test_a_3x1_cluster_stores_streams_fails_over_under_a_writer_and_stops() -> None:
    with start_cluster(3, 1) as cluster:
        assert len(cluster.nodes) == 6
        masters = cluster.current_masters()
        assert masters == cluster.nodes[:3]
        assert all(cluster.replicas_of(m) == cluster.formed_replicas(i) for i, m in enumerate(masters))
        with pytest.raises(ValueError, match="not a master"):
            cluster.kill_master(node=cluster.nodes[3])

        client = RedisCluster.from_url(cluster.url)
        stale = RedisCluster(startup_nodes=None, host="127.0.0.1", port=cluster.nodes[1].port)
        try:
            # keys on every master, each stored on the master of its slot and nowhere else
            placed = keys_on_every_master(cluster)
            assert set(placed) == {m.port for m in masters}
            for port, key in placed.items():
                assert await client.set(key, str(port))
            for port, key in placed.items():
                assert cluster.node(port).ask("GET", key) == str(port)
                assert cluster.node(port).ask("EXISTS", key) == 1

            # a stream: XADD with explicit IDs, XRANGE back in order
            stream = "md:binance:BTCUSDT:trade"
            ids = [await client.xadd(stream, {"d": f"tick {n}"}, id=f"1700000000000-{n}") for n in range(1, 101)]
            assert ids == [f"1700000000000-{n}".encode() for n in range(1, 101)]
            rows = await client.xrange(stream, "-", "+")
            assert rows is not None
            assert [r[0] for r in rows] == ids
            assert rows[41][1] == {b"d": b"tick 42"}
            victim = cluster.master_of_key(stream)
            # what the replica acknowledged before the kill survives it
            on_victim = client.get_node(victim.host, victim.port)
            assert await client.execute_command("WAIT", 1, 10_000, target_nodes=on_victim) == 1
            await stale.initialize()  # its slot table is read now and never refreshed while it idles

            # a writer keeps appending while the stream's master is SIGKILLed and its replica promoted
            written: list[bytes | str] = []
            promoted_at: list[int] = []

            async def writer() -> None:
                n = 101
                while len(promoted_at) == 0 or len(written) < promoted_at[0] + 50:
                    try:
                        written.append(await client.xadd(stream, {"d": f"tick {n}"}, id=f"1700000000001-{n}"))
                    except (RedisConnectionError, ClusterDownError, TryAgainError):
                        # The client's own retries can run out before the replica is promoted on a loaded machine:
                        # as the project's writer does, try the same entry again (its explicit ID makes that safe).
                        await asyncio.sleep(0.05)  # pacing of the retries
                        continue
                    except ResponseError as exc:  # the dead master took it and its replica had it: stored once
                        if "equal or smaller" not in str(exc):
                            raise
                        written.append(f"1700000000001-{n}".encode())
                    n += 1

            task = asyncio.create_task(writer())
            async with asyncio.timeout(HANG_S):
                while len(written) < 20:
                    await asyncio.sleep(0.01)  # poll
            killed = cluster.kill_master(slot=key_slot(stream.encode()))
            assert killed is victim and not killed.alive
            heir = await asyncio.to_thread(cluster.wait_promoted, killed, HANG_S)
            assert heir in cluster.formed_replicas(masters.index(victim))
            promoted_at.append(len(written))
            async with asyncio.timeout(HANG_S):
                await task  # appends go on after the promotion: the client found the new master
            assert port_of(client, stream) == heir.port
            held = await client.xrange(stream, "-", "+")
            assert held is not None
            held_ids = [r[0] for r in held]
            assert held_ids[:100] == ids
            assert set(written[promoted_at[0] :]) <= set(held_ids)
            assert cluster.current_masters() == [m if m is not victim else heir for m in masters]

            # the killed master comes back as the new master's replica; a client that still routes the stream
            # to its address is answered MOVED there, follows it, and its append lands on the new master
            with pytest.raises(ValueError, match="not a master"):
                cluster.kill_master(node=killed)
            await asyncio.to_thread(cluster.restart, killed, HANG_S)
            assert killed.alive and cluster.replicas_of(heir) == [killed]
            assert port_of(stale, stream) == killed.port
            moved_before = _errorstat(killed, "MOVED")
            added = await stale.xadd(stream, {"d": "after restart"}, id="1700000000002-1")
            assert _errorstat(killed, "MOVED") > moved_before
            assert heir.ask("XRANGE", stream, added, added)[0][1] == {"d": "after restart"}
            assert port_of(stale, stream) == heir.port
        finally:
            await client.aclose()
            await stale.aclose()
    assert_stopped(cluster)


def port_of(client: RedisCluster, key: str) -> int:
    """The port of the node ``client`` sends ``key``'s writes to now (its own slot table)."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def _errorstat(node: ClusterNode, code: str) -> int:
    """How many ``code`` error replies ``node`` has sent (``INFO errorstats``)."""
    stat = node.ask("INFO", "errorstats").get(f"errorstat_{code}")
    return int(stat["count"]) if isinstance(stat, dict) else 0


def test_every_node_takes_the_extra_arguments_and_is_stopped_when_the_block_raises() -> None:
    seen: list[LocalCluster] = []
    with pytest.raises(ZeroDivisionError), start_cluster(1, 1, server_args=("--maxmemory", "64mb")) as cluster:
        seen.append(cluster)
        assert [n.alive for n in cluster.nodes] == [True, True]
        assert [n.ask("CONFIG", "GET", "maxmemory") for n in cluster.nodes] == [{"maxmemory": str(64 << 20)}] * 2
        assert cluster.replicas_of(cluster.nodes[0]) == [cluster.nodes[1]]
        _ = 1 / 0
    assert_stopped(seen[0])


def test_a_failover_that_cannot_happen_is_refused_at_once() -> None:
    with start_cluster(1, 1) as cluster:
        killed = cluster.kill_master(slot=0)
        with pytest.raises(ValueError, match="majority of the 1 masters"):
            cluster.wait_promoted(killed)
        with pytest.raises(ValueError, match="not killed as a master"):
            cluster.wait_promoted(cluster.nodes[1])
    with start_cluster(3, 0) as cluster:
        killed = cluster.kill_master(slot=CLUSTER_SLOTS - 1)
        assert killed is cluster.nodes[2]
        with pytest.raises(ValueError, match="no replica"):
            cluster.wait_promoted(killed)


def test_a_node_that_dies_unasked_is_named_with_its_log() -> None:
    with start_cluster(1, 1) as cluster:
        replica = cluster.nodes[1]
        replica.server.process.kill()  # not through the harness: an unexpected death
        replica.server.process.wait()
        with pytest.raises(RuntimeError, match=rf"127\.0\.0\.1:{replica.port}.* exited") as raised:
            cluster.wait_settled(HANG_S)
        tail = replica.log_tail()
        assert tail and tail in str(raised.value)


def test_a_frozen_replica_cut_from_its_master_acknowledges_nothing_until_thawed() -> None:
    """What a failover can lose, made on purpose: the master takes a write its replica does not have."""
    with start_cluster(1, 1) as cluster:
        master, replica = cluster.nodes
        assert master.ask("SET", "k", "before") is True
        assert master.ask("WAIT", 1, 10_000) == 1
        cluster.freeze(replica)
        assert master.ask("CLIENT", "KILL", "TYPE", "replica") == 1  # the link is gone; frozen, it cannot come back
        assert replica.alive and not replica.running and cluster.running == [master]
        assert master.ask("SET", "k", "while frozen") is True
        assert master.ask("WAIT", 1, 200) == 0  # no replica has it: a failover now would lose it
        with pytest.raises(RuntimeError, match="not running"):
            cluster.freeze(replica)
        cluster.thaw(replica)
        cluster.wait_settled(HANG_S)
        assert master.ask("WAIT", 1, 10_000) == 1
        assert replica.ask("READONLY") is True  # this connection may read from a replica
        assert replica.ask("GET", "k") == "while frozen"
        cluster.freeze(replica)  # left frozen: stopping thaws it first
    assert_stopped(cluster)
