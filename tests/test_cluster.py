"""The project on a real Redis Cluster (``MARKET_REDIS_URL=redis+cluster://...``): 3 masters, 3 replicas, started
here on free ports by :func:`ops.redis_cluster.start_cluster` (never the shared server at 127.0.0.1:6379).

- the cluster URL: taken apart, checked, refused with one line naming what is wrong;
- the writer stores ticks of many streams, spread over every master, each once and in order;
- the SDK consumer reads every stream (one group per stream) and acknowledges what it handled;
- ``market status``, ``ctl``, ``tail`` and ``replay`` work on the cluster;
- bad input exits 2 with one line: a cluster URL naming a standalone server, a plain URL naming a cluster node,
  a cluster that leaves hash slots uncovered.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import RedisError

from consumer_sdk.consumer import Consumer
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import heartbeat_set_key, parse_entry_id, stream_key
from consumer_sdk.core.redis import connect_redis, is_cluster
from consumer_sdk.core.tick import Tick
from consumer_sdk.core.urls import is_cluster_url, parse_cluster_url, redact_url, validate_redis_url
from distributor.writer import StreamWriter, WriteRefused
from ingestor.config import load_settings
from ingestor.control_plane import control_keys
from ingestor.service import Ingestor
from ops.redis_cluster import LocalCluster, start_cluster
from ops.redis_server import RedisServer
from ops.simulator import Simulator, SimulatorConfig

HANG_S = 120.0  # a wait's bound: only a hang takes this long
SYMBOLS = [f"S{i:02d}" for i in range(24)]
TICKS_PER_STREAM = 150


def cluster_url(cluster: LocalCluster, nodes: int = 2) -> str:
    return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in cluster.startup_nodes[:nodes])


def make_tick(symbol: str, seq: int, ms: int) -> Tick:
    t: dict[str, Any] = {
        "v": 1, "venue": "binance", "symbol": symbol, "channel": "trade", "seq": seq, "ts_event": ms * 1000 + 7,
        "ts_recv": ms * 1000 + 900, "trade_id": seq, "price": "43000.10", "qty": "0.001", "side": "buy",
    }
    return t  # type: ignore[return-value]


def market(*args: str, url: str, prefix: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MARKET_REDIS_URL": url, "MARKET_PREFIX": prefix}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=timeout, env=env,
    )


def tail_lines(url: str, prefix: str, args: list[str], want: int) -> list[str]:
    """The first ``want`` lines ``market tail`` prints (then it is stopped); fewer only if it ends first."""
    env = {**os.environ, "MARKET_REDIS_URL": url, "MARKET_PREFIX": prefix}
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "tail", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    timer = threading.Timer(HANG_S, proc.kill)  # only a hang takes this long
    timer.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while len(lines) < want:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
    finally:
        timer.cancel()
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert len(lines) == want, err
    return lines


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("market: error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


# -- the URL (pure) ------------------------------------------------------------------------------------------------
def test_a_cluster_url_names_its_nodes_login_and_options() -> None:
    url = "redis+cluster://app:s3cret@10.0.0.1:7000,[::1]:7001,10.0.0.1:7000/0?socket_timeout=3"
    assert is_cluster_url(url) and not is_cluster_url("redis://h:1/0")
    parsed = parse_cluster_url(url)
    assert parsed.nodes == (("10.0.0.1", 7000), ("::1", 7001))  # each node once
    assert (parsed.username, parsed.password, parsed.tls, parsed.query) == ("app", "s3cret", False, "socket_timeout=3")
    assert parsed.node_url("::1", 7001) == "redis://app:s3cret@[::1]:7001/0?socket_timeout=3"
    assert parse_cluster_url("rediss+cluster://h:1").tls
    assert validate_redis_url(url) == url
    assert redact_url(url) == "redis+cluster://app:***@10.0.0.1:7000,[::1]:7001,10.0.0.1:7000/0?socket_timeout=3"


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("redis+cluster://h", "node 'h' is not host:port"),
        ("redis+cluster://h:0", "node 'h:0' is not host:port"),
        ("redis+cluster://h:1,,g:2", "an empty node"),
        ("redis+cluster://h:1/3", "database 0 only"),
        ("redis+cluster://u:pw@h:1?sockettimeout=3", "unknown option 'sockettimeout'"),
        ("redis+cluster://h:1?ssl_ca_certs=/ca.pem", "needs TLS"),
        ("cluster://h:1", "scheme must be"),
    ],
)
def test_a_bad_cluster_url_is_refused_naming_why(url: str, needle: str) -> None:
    with pytest.raises(ConfigError, match="invalid Redis") as info:
        validate_redis_url(url)
    assert needle in str(info.value)
    assert "pw" not in str(info.value)


# -- a real cluster ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with start_cluster(3, 1) as running:
        yield running


@pytest.fixture
def cprefix() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def cclient(cluster: LocalCluster) -> AsyncIterator[aioredis.Redis]:
    client = await connect_redis(cluster_url(cluster))
    yield client
    await client.aclose()


async def write_all(client: aioredis.Redis, prefix: str) -> list[Tick]:
    """Every tick of every stream, in order, through a running writer (the way the ingestor hands them over)."""
    ticks = [make_tick(s, n, 1_700_000_000_000 + n) for n in range(1, TICKS_PER_STREAM + 1) for s in SYMBOLS]
    writer = StreamWriter(client, prefix=prefix, max_batch=500)
    task = asyncio.create_task(writer.run())
    try:
        for i in range(0, len(ticks), 300):
            assert writer.submit(ticks[i : i + 300])
        async with asyncio.timeout(HANG_S):
            await writer.drain()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert writer.appended == len(ticks) and writer.errors == 0
    return ticks


@pytest.mark.slow
@pytest.mark.redis
async def test_the_writer_stores_every_tick_once_in_order_on_every_master(
    cluster: LocalCluster, cclient: aioredis.Redis, cprefix: str
) -> None:
    assert is_cluster(cclient)
    ticks = await write_all(cclient, cprefix)
    keys = [stream_key("binance", s, "trade", prefix=cprefix) for s in SYMBOLS]
    masters = {cluster.master_of_key(k).port for k in keys}
    assert masters == {m.port for m in cluster.current_masters()}  # the streams spread over all 3 masters
    for key in keys:
        rows: Any = await cclient.xrange(key)
        seqs = [parse_entry_id(eid)[1] for eid, _ in rows]
        assert seqs == list(range(1, TICKS_PER_STREAM + 1)), key
    # a second writer handed the same ticks (a retry, a second ingestor) stores none of them again
    again = StreamWriter(cclient, prefix=cprefix)
    assert await again.append(ticks[:1000]) == (0, 1000)


@pytest.mark.slow
@pytest.mark.redis
async def test_the_consumer_reads_every_stream_of_every_master_and_acks(
    cluster: LocalCluster, cclient: aioredis.Redis, cprefix: str
) -> None:
    ticks = await write_all(cclient, cprefix)
    url = cluster_url(cluster, nodes=1)  # one node named: the client learns the rest
    got: list[tuple[str, int]] = []
    consumer = Consumer(redis_url=url, patterns=["binance:*:trade"], group="g", prefix=cprefix, start_id="0",
                        block_ms=200, count=100)

    def handler(tick: Tick) -> None:
        got.append((tick["symbol"], tick["seq"]))
        if len(got) == len(ticks):
            consumer.stop()

    async with asyncio.timeout(HANG_S):
        await consumer.run(handler)
    assert sorted(got) == sorted((t["symbol"], t["seq"]) for t in ticks)  # each once
    for symbol in SYMBOLS:
        assert [n for s, n in got if s == symbol] == list(range(1, TICKS_PER_STREAM + 1))  # in order
    stats = consumer.stats()
    assert (stats.keys, stats.delivered, stats.acked, stats.duplicates) == (len(SYMBOLS), len(ticks), len(ticks), 0)
    for symbol in SYMBOLS:
        key = stream_key("binance", symbol, "trade", prefix=cprefix)
        pending: Any = await cclient.xpending(key, "g")
        assert pending["pending"] == 0, key
        (group,) = await cclient.xinfo_groups(key)
        assert group["lag"] == 0
    # a tick written now reaches a consumer waiting on the cluster (its reads find nothing, then this)
    late: list[int] = []
    waiting = Consumer(redis_url=url, patterns=["binance:S00:trade"], group="g", prefix=cprefix, block_ms=200,
                       on_gap=lambda *_: None)

    def one(tick: Tick) -> None:
        late.append(tick["seq"])
        waiting.stop()

    task = asyncio.create_task(waiting.run(one))
    async with asyncio.timeout(HANG_S):
        while not waiting.keys:
            await asyncio.sleep(0.01)  # poll: the consumer says nothing when it starts reading
    assert await StreamWriter(cclient, prefix=cprefix).append([make_tick("S00", 999, 1_700_000_000_999)]) == (1, 0)
    async with asyncio.timeout(HANG_S):
        await task
    assert late == [999]


@pytest.mark.slow
@pytest.mark.redis
async def test_status_ctl_tail_and_replay_work_on_the_cluster(
    cluster: LocalCluster, cclient: aioredis.Redis, cprefix: str
) -> None:
    url = cluster_url(cluster)
    await write_all(cclient, cprefix)
    key = stream_key("binance", "S07", "trade", prefix=cprefix)

    replayed = await asyncio.to_thread(market, "replay", key, "--start", "-", "--end", "+", url=url, prefix=cprefix)
    assert replayed.returncode == 0, replayed.stderr
    rows = [orjson.loads(line) for line in replayed.stdout.splitlines()]
    assert [r["tick"]["seq"] for r in rows] == list(range(1, TICKS_PER_STREAM + 1))

    # tail without a group: one XREAD per stream on the cluster, every entry of both streams printed
    other = stream_key("binance", "S08", "trade", prefix=cprefix)
    lines = await asyncio.to_thread(tail_lines, url, cprefix, [key, other, "--from", "-"], 2 * TICKS_PER_STREAM)
    printed = [orjson.loads(line) for line in lines]
    for k in (key, other):
        assert [p["tick"]["seq"] for p in printed if p["key"] == k] == list(range(1, TICKS_PER_STREAM + 1))

    # the control plane: a change with its audit record in one script call (the keys share a slot)
    state_key, audit_key = control_keys(cclient, cprefix)
    assert key_slot(state_key.encode()) == key_slot(audit_key.encode())
    paused = await asyncio.to_thread(market, "ctl", "pause", "binance:S07:trade", "--actor", "ops", "--reason",
                                     "drill", url=url, prefix=cprefix)
    assert paused.returncode == 0, paused.stderr
    shown = await asyncio.to_thread(market, "ctl", "show", "--json", url=url, prefix=cprefix)
    assert shown.returncode == 0, shown.stderr
    doc = orjson.loads(shown.stdout)
    assert doc["key"] == state_key and doc["valid"] and "binance:S07:trade" in shown.stdout
    history = await asyncio.to_thread(market, "ctl", "history", "--json", url=url, prefix=cprefix)
    assert history.returncode == 0, history.stderr
    (record,) = [orjson.loads(line) for line in history.stdout.splitlines()]
    assert (record["who"], record["action"], record["reason"]) == ("ops", "pause", "drill")
    assert await cclient.xlen(audit_key) == 1

    status = await asyncio.to_thread(market, "status", "--json", url=url, prefix=cprefix)
    assert status.returncode in (0, 1), status.stderr  # no ingestor reports here: not ok, but no bad input
    assert status.stderr.strip() == "" or "Traceback" not in status.stderr
    orjson.loads(status.stdout)


@pytest.mark.slow
@pytest.mark.redis
async def test_an_ingestor_writes_beats_and_follows_the_control_plane_on_the_cluster(
    cluster: LocalCluster, cclient: aioredis.Redis, cprefix: str
) -> None:
    url = cluster_url(cluster)
    symbols = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT")
    async with Simulator(SimulatorConfig(symbols=symbols, rate=400.0, seed=7)) as sim:
        settings = load_settings(
            {"url": sim.ws_url, "symbols": ",".join(symbols), "channels": "trade,agg_trade", "prefix": cprefix},
            {"MARKET_REDIS_URL": url},
        )
        ingestor = Ingestor(settings)  # connects by itself, from the cluster URL
        task = asyncio.create_task(ingestor.run())
        keys = [stream_key("binance", s, c, prefix=cprefix) for s in symbols for c in ("trade", "agg_trade")]
        try:
            async with asyncio.timeout(HANG_S):
                while min([await cclient.xlen(k) for k in keys]) < 20 or not await cclient.smembers(
                    heartbeat_set_key(cprefix)
                ):
                    await asyncio.sleep(0.05)  # poll: the streams fill and the first beat lands
            status = await asyncio.to_thread(market, "status", "--json", url=url, prefix=cprefix)
            report = orjson.loads(status.stdout)
            assert report["ingestors"] and {s["stage"]: s["level"] for s in report["stages"]}["ingestor"] == "ok", (
                status.stdout
            )
            paused = await asyncio.to_thread(market, "ctl", "pause", "binance:BTCUSDT:trade", "--actor", "ops",
                                             url=url, prefix=cprefix)
            assert paused.returncode == 0, paused.stderr
            async with asyncio.timeout(HANG_S):
                while ingestor.control.stats().pauses != 1:
                    await asyncio.sleep(0.05)  # poll: the watcher applies the change (notice or re-read)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    masters = {cluster.master_of_key(k).port for k in keys}
    assert len(masters) >= 2  # the ingestor's streams spread over the masters
    for key in keys:
        rows: Any = await cclient.xrange(key)
        seqs = [parse_entry_id(eid)[1] for eid, _ in rows]
        assert seqs == sorted(set(seqs)), key  # each once, in order


@pytest.mark.slow
@pytest.mark.redis
def test_a_cluster_url_naming_a_standalone_server_exits_2(private_redis: RedisServer) -> None:
    url = f"redis+cluster://127.0.0.1:{private_redis.port}"
    proc = market("replay", "md:binance:BTCUSDT:trade", url=url, prefix="md")
    assert_one_line_error(proc, "standalone server", "redis://")


@pytest.mark.slow
@pytest.mark.redis
def test_a_plain_url_naming_a_cluster_node_exits_2(cluster: LocalCluster) -> None:
    node = cluster.nodes[0]
    proc = market("replay", "md:binance:BTCUSDT:trade", url=f"redis://127.0.0.1:{node.port}/0", prefix="md")
    assert_one_line_error(proc, "node of a Redis Cluster", "redis+cluster://")


@pytest.mark.slow
@pytest.mark.redis
def test_a_cluster_leaving_slots_uncovered_exits_2() -> None:
    with start_cluster(1, 0) as small:
        small.nodes[0].ask("CLUSTER", "DELSLOTSRANGE", 100, 199)
        proc = market("ctl", "show", url=cluster_url(small, nodes=1), prefix="md")
        assert_one_line_error(proc, "does not serve every hash slot")


# -- failover: a master SIGKILLed under a writer and a consumer ---------------------------------------------------
@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("replica_acks", [0, 1])
async def test_a_master_killed_mid_flow_is_replaced_and_writer_and_consumer_carry_on(replica_acks: int) -> None:
    """The writer holds and retries through the failover and drains; the consumer goes on and hands no tick twice.
    What asynchronous replication lost (acknowledged by the dead master, never on its replica) is counted and
    printed; with ``WAIT 1`` after each batch (``replica_acks=1``) nothing acknowledged is lost."""
    prefix = f"f{uuid.uuid4().hex[:8]}"
    with start_cluster(3, 1) as cl:
        url = cluster_url(cl)
        client = await connect_redis(url)
        writer = StreamWriter(client, prefix=prefix, max_batch=2000, replica_acks=replica_acks)
        writing = asyncio.create_task(writer.run())
        got: list[tuple[str, int]] = []
        consumer = Consumer(redis_url=url, patterns=["binance:*:trade"], group="g", prefix=prefix, start_id="0",
                            block_ms=200, on_gap=lambda *_: None)
        reading = asyncio.create_task(consumer.run(lambda t: got.append((t["symbol"], t["seq"]))))
        submitted = 0
        rounds_after: list[int] = []

        async def produce() -> None:
            nonlocal submitted
            n = 0
            while not rounds_after or n < rounds_after[0] + 300:
                n += 1
                batch = [make_tick(s, n, 1_700_000_000_000 + n) for s in SYMBOLS]
                while not writer.submit(batch):
                    await writer.wait_room()
                submitted += len(batch)
                await asyncio.sleep(0.002)  # pacing: a steady feed, not a wait for anything

        producing = asyncio.create_task(produce())
        victim_key = stream_key("binance", SYMBOLS[0], "trade", prefix=prefix)
        try:
            async with asyncio.timeout(HANG_S):
                while writer.appended < 20 * len(SYMBOLS):
                    await asyncio.sleep(0.01)  # poll: the flow is under way
            held_before = int(await client.xlen(victim_key))
            killed_at = time.monotonic()
            killed = await asyncio.to_thread(cl.kill_master, slot=key_slot(victim_key.encode()))
            appended_at_kill = writer.appended
            heir = await asyncio.to_thread(cl.wait_promoted, killed, HANG_S)
            promoted_s = time.monotonic() - killed_at
            if replica_acks:
                # the new master has no replica: WAIT 1 holds its writes until the old master rejoins as one
                await asyncio.to_thread(cl.restart, killed, HANG_S)
            async with asyncio.timeout(HANG_S):  # the victim's stream takes writes again: on its new master
                while True:
                    try:
                        if int(await client.xlen(victim_key)) > held_before:
                            break
                    except RedisError:
                        pass  # the client is still finding the new master
                    await asyncio.sleep(0.01)  # poll: the writer's retry lands
            resumed_s = time.monotonic() - killed_at
            rounds_after.append(submitted // len(SYMBOLS))
            async with asyncio.timeout(HANG_S):
                await producing
                await writer.drain()
            assert heir.port == cl.master_of_key(victim_key).port
            keys = [stream_key("binance", s, "trade", prefix=prefix) for s in SYMBOLS]
            stored: dict[str, list[int]] = {}
            for key in keys:
                rows: Any = await client.xrange(key)
                stored[key] = [parse_entry_id(eid)[1] for eid, _ in rows]
                assert stored[key] == sorted(set(stored[key])), key  # each once, in order
            total = sum(len(v) for v in stored.values())
            async with asyncio.timeout(HANG_S):
                while len(got) < total:
                    await asyncio.sleep(0.02)  # poll: the consumer catches up
            assert len(got) == len(set(got))  # no tick handed twice
            missing = {(k.split(":")[2], n) for k, seqs in stored.items() for n in seqs} - set(got)
            assert not missing
            lost = submitted - total
            print(f"\nreplica_acks={replica_acks}: master SIGKILLed -> replica promoted {promoted_s:.2f} s, -> the "
                  f"stream written again {resumed_s:.2f} s; submitted {submitted}, stored {total}, lost {lost} "
                  f"(appended by the writer at the kill: {appended_at_kill}); writer errors {writer.errors}, "
                  f"rejected by reason {writer.rejected_by_reason}, replica shortfalls {writer.replica_shortfalls}; "
                  f"consumer reconnects {consumer.stats().reconnects}, gaps {consumer.stats().gaps}")
            rounds = submitted // len(SYMBOLS)
            assert all(set(seqs) <= set(range(1, rounds + 1)) for seqs in stored.values())  # nothing but what was fed
            # (the writer's own count can be short of what is stored: a batch the dead master took whose reply was
            # lost is written again on the new master and counted as duplicates there)
            if replica_acks:
                assert lost == 0
        finally:
            consumer.stop()
            for task in (producing, writing, reading):
                task.cancel()
            await asyncio.gather(producing, writing, reading, return_exceptions=True)
            await consumer.aclose()
            await client.aclose()


@pytest.mark.slow
@pytest.mark.redis
async def test_with_replica_acks_a_batch_no_replica_took_is_held_and_written_again(
    cluster: LocalCluster, cclient: aioredis.Redis, cprefix: str
) -> None:
    key = stream_key("binance", "S00", "trade", prefix=cprefix)
    master = cluster.master_of_key(key)
    (replica,) = cluster.replicas_of(master)
    writer = StreamWriter(cclient, prefix=cprefix, replica_acks=1, replica_wait_ms=200)
    ticks = [make_tick(s, n, 1_700_000_000_000 + n) for n in range(1, 11) for s in ("S00", "S01", "S02")]
    assert await writer.append(ticks[:3]) == (3, 0)  # a replica acknowledges: stored
    await asyncio.to_thread(cluster.freeze, replica)
    try:
        with pytest.raises(WriteRefused) as refused:
            await writer.append(ticks[3:])
        assert refused.value.error.reason == "noreplicas" and "0 replica(s)" in str(refused.value)
        held = refused.value.remaining
        assert held and {t["symbol"] for t in held} <= {
            s for s in ("S00", "S01", "S02")
            if cluster.master_of_key(stream_key("binance", s, "trade", prefix=cprefix)) is master
        }
        assert [t["seq"] for t in held if t["symbol"] == "S00"] == list(range(2, 11))  # all of it, in order
        assert writer.replica_shortfalls == 1 and writer.rejected_by_reason["noreplicas"] == len(held)
    finally:
        await asyncio.to_thread(cluster.thaw, replica)
        await asyncio.to_thread(cluster.wait_settled, HANG_S)
    # the master had taken them: written again, they are duplicates, and now a replica has them
    assert await writer.append(held) == (0, len(held))
    rows: Any = await cclient.xrange(key)
    assert [parse_entry_id(eid)[1] for eid, _ in rows] == list(range(1, 11))
