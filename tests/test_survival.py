"""README "When Redis or the ingestor fails: what survives what", each row driven by a real fault.

- Redis with AOF stopped and started again: every stream under the test's prefix is read entry by entry
  before and after, and must be identical; the same check after a restart with AOF off finds every stream
  gone (so it is able to see a loss).
- The ingestor killed with SIGKILL while its spill log holds ticks: the next ingestor on the same spill
  directory continues after the log, drains it, and every trade id is stored once, in order, or inside a
  gap marker.
- The spill disk lost (the directory emptied while the ingestor is dead): the hole is repaired over REST
  where the venue still has the ids and marked where it does not; no id is missing unmarked.
- ``[spill] fsync``: the real :class:`SpillLog` on a real directory, counting the fsync calls it makes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from venue_drill import ingestor_running, spot_caught_up, stream_coverage

from consumer_sdk.core.tick import is_gap_marker
from distributor.ingress import Policy
from distributor.spill import MAGIC, SpillLog, parse_records
from ingestor.config import IngestSettings
from ingestor.service import Ingestor
from ingestor.session import SessionSettings
from ops.redis_server import restart, start_redis
from ops.simulator import Simulator, SimulatorConfig

FAST = SessionSettings(ping_interval=1.0, ping_timeout=2.0, open_timeout=2.0, backoff_base=0.05, backoff_cap=1.0)
RATE = 2000.0
#: the first ingestor's memory buffer in ticks: an outage reaches its spill log within seconds
SMALL_MEMORY = 2000
CONFIG = "[session]\nping_interval = 1.0\nping_timeout = 2.0\nbackoff_cap = 1.0\n[retention]\nmaxlen = 0\n"

#: ``market ingest`` (same settings, same code from ``ops.cli``) with the writer's memory cut to argv[4] ticks,
#: which no flag or TOML setting changes
SMALL_MEMORY_INGEST = """
import dataclasses, os, sys
from ingestor.config import load_settings
from ops.cli import _ingest, run_async
from ops.logs import setup_logging
setup_logging("info")
url, spill, config, capacity = sys.argv[1:5]
flags = {"url": url, "symbols": "BTCUSDT", "channels": "trade,agg_trade", "metrics_port": 0, "spill_dir": spill}
settings = load_settings(flags, os.environ, config)
run_async(_ingest(dataclasses.replace(settings, writer_capacity=int(capacity))))
"""

Entries = list[tuple[bytes, dict[bytes, bytes]]]


async def wait_for(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(0.05)  # poll
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f} s: {what}") from None


# -- AOF ----------------------------------------------------------------------------------------------------------
async def _streams(url: str, prefix: str) -> dict[bytes, tuple[bytes, Entries]]:
    """Every stream under ``prefix``: its last generated ID and every entry (ID and fields), read with a
    client of its own (a restarted server leaves pooled connections dead)."""
    client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=1)
    try:
        out: dict[bytes, tuple[bytes, Entries]] = {}
        async for key in client.scan_iter(f"{prefix}:*", count=1000, _type="stream"):
            entries: Entries = []
            start = "-"
            while True:
                page = await client.xrange(key, start, "+", count=10_000)
                entries += page
                if len(page) < 10_000:
                    break
                start = "(" + page[-1][0].decode()
            info = await client.xinfo_stream(key)
            out[key] = (info["last-generated-id"], entries)
        return out
    finally:
        await client.aclose()


def _differences(
    before: dict[bytes, tuple[bytes, Entries]], after: dict[bytes, tuple[bytes, Entries]]
) -> list[str]:
    """Where ``after`` is not ``before``, entry by entry: one line per stream that differs."""
    out = []
    for key in sorted(before.keys() | after.keys()):
        if key not in after:
            out.append(f"{key!r}: gone ({len(before[key][1])} entries before)")
            continue
        if key not in before:
            out.append(f"{key!r}: new")
            continue
        (last_a, a), (last_b, b) = before[key], after[key]
        if last_a != last_b:
            out.append(f"{key!r}: last generated ID {last_a!r} -> {last_b!r}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            if x != y:
                out.append(f"{key!r}: entry {i} was {x!r}, is {y!r}")
                break
        else:
            if len(a) != len(b):
                out.append(f"{key!r}: {len(a)} entries before, {len(b)} after")
    return out


async def test_redis_restarted_with_aof_brings_back_every_stored_entry(prefix: str, tmp_path: Path) -> None:
    """README row "Redis stops or restarts, with AOF": an ingestor stores trades and aggregate trades in a
    private Redis with AOF on; Redis is stopped and started again on the same directory; every stream is
    identical entry by entry (ID and fields) and keeps its last generated ID.  Started once more with AOF
    off on that same directory, the same comparison finds every stream gone."""
    symbols = ("BTCUSDT", "ETHUSDT")
    keys = [f"{prefix}:binance:{s}:{c}" for s in symbols for c in ("trade", "agg_trade")]
    with start_redis(appendonly=True) as server:
        client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
        try:
            async with Simulator(SimulatorConfig(symbols=symbols, rate=RATE)) as sim:
                settings = IngestSettings(
                    url=sim.ws_url, rest_url=sim.rest_url, symbols=symbols, channels=("trade", "agg_trade"),
                    prefix=prefix, session=FAST, queue_policy=Policy.BLOCK, spill_dir=str(tmp_path / "spill"),
                )
                ingestor = Ingestor(settings, redis=client)
                async with ingestor_running(ingestor):
                    async def stored() -> bool:
                        return min([await client.xlen(k) for k in keys]) >= 500

                    await wait_for(stored, 60, "500 entries in each stream")
        finally:
            await client.aclose()
        before = await _streams(server.url, prefix)
        server.stop()
        aof = [p for p in (Path(server.directory) / "appendonlydir").glob("*.aof") if p.stat().st_size]
        assert aof, "Redis wrote its append-only file"
        restart(server, appendonly=True)
        after = await _streams(server.url, prefix)
        server.stop()
        restart(server, appendonly=False)
        without = await _streams(server.url, prefix)
    assert sorted(before) == sorted(k.encode() for k in keys)
    assert all(len(entries) >= 500 for _, entries in before.values())
    assert _differences(before, after) == []
    lost = _differences(before, without)
    assert without == {} and len(lost) == len(keys), lost
    print(f"\nAOF restart: {sum(len(e) for _, e in before.values())} entries in {len(before)} streams back "
          f"identical; without AOF: {lost}")


# -- the ingestor killed ------------------------------------------------------------------------------------------
async def _spawn(argv: list[str], redis_url: str, prefix: str, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as log_file:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            *argv, env={**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix},
            stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )


async def _start_small_memory_ingest(
    sim: Simulator, redis_url: str, prefix: str, spill: Path, log: Path
) -> asyncio.subprocess.Process:
    cfg = log.with_suffix(".toml")
    cfg.write_text(CONFIG)
    argv = [sys.executable, "-c", SMALL_MEMORY_INGEST, sim.ws_url, str(spill), str(cfg), str(SMALL_MEMORY)]
    return await _spawn(argv, redis_url, prefix, log)


async def _start_ingest(
    sim: Simulator, redis_url: str, prefix: str, spill: Path, log: Path
) -> asyncio.subprocess.Process:
    """``market ingest`` on BTCUSDT trades and aggregate trades, keeping every entry."""
    cfg = log.with_suffix(".toml")
    cfg.write_text(CONFIG)
    argv = [
        sys.executable, "-m", "ops.cli", "ingest", "--url", sim.ws_url, "--symbols", "BTCUSDT",
        "--channels", "trade,agg_trade", "--metrics-port", "0", "--spill-dir", str(spill), "--config", str(cfg),
    ]
    return await _spawn(argv, redis_url, prefix, log)


def _on_disk(spill: Path) -> list[bytes]:
    """The whole records in the spill directory's segments, in drain order, read without opening the log
    (which would cut a segment being written)."""
    out: list[bytes] = []
    for path in sorted(spill.glob("seg-*.spill")):
        try:
            raw = path.read_bytes()
        except FileNotFoundError:  # drained and deleted meanwhile
            continue
        if raw.startswith(MAGIC):
            out += parse_records(raw, len(MAGIC))[0]
    return out


def _trade_ids(payloads: list[bytes]) -> list[int]:
    ticks = [orjson.loads(p) for p in payloads]
    return [t["seq"] for t in ticks if t["channel"] == "trade" and not is_gap_marker(t)]


def _events(log: Path, *names: str) -> list[dict[str, Any]]:
    wanted = {f'"event":"{n}"' for n in names}
    return [orjson.loads(line) for line in log.read_text().splitlines() if any(w in line for w in wanted)]


async def _kill_during_outage(
    sim: Simulator, server: Any, prefix: str, spill: Path, log: Path
) -> tuple[list[bytes], int]:
    """First life: an ingestor with a small memory stores trades, Redis stops, the ingestor spills; once its
    spill log holds 3000 records it is killed with SIGKILL.  Returns the records on disk after the kill and
    the newest trade id Redis held shortly before it stopped."""
    client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
    first = await _start_small_memory_ingest(sim, server.url, prefix, spill, log)
    try:
        key = f"{prefix}:binance:BTCUSDT:trade"

        async def flowing() -> bool:
            return await client.xlen(key) >= 500

        await wait_for(flowing, 30, "the first ingestor stores 500 trades")
        top = await client.xrevrange(key, count=1)
        server.stop()

        async def spilled() -> bool:
            assert first.returncode is None, log.read_text()[-2000:]
            return len(_on_disk(spill)) >= 3000

        await wait_for(spilled, 60, "the spill log holds 3000 records")
        first.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(first.wait(), 30) == -signal.SIGKILL
    finally:
        if first.returncode is None:
            first.kill()
            await asyncio.wait_for(first.wait(), 30)
        await client.aclose()
    return _on_disk(spill), int(top[0][0].split(b"-")[1])


async def _second_life(
    sim: Simulator, server: Any, prefix: str, spill: Path, log: Path
) -> tuple[dict[str, tuple[int, set[int], set[int], list[tuple[int, int]]]], dict[str, int]]:
    """Redis (AOF) started again and ``market ingest`` on the same spill directory: once it reaches the
    venue's newest ids and its spill log is empty, each stream's coverage; stopped with SIGTERM (exit 0)."""
    restart(server, appendonly=True)
    client = aioredis.Redis.from_url(server.url, socket_timeout=5, socket_connect_timeout=1)
    second = await _start_ingest(sim, server.url, prefix, spill, log)
    try:
        targets = await spot_caught_up(client, sim, prefix, 180)

        async def drained() -> bool:
            return not list(spill.glob("seg-*.spill"))

        await wait_for(drained, 60, "the spill log drained (no segment left)")
        covered = {c: await stream_coverage(client, f"{prefix}:binance:BTCUSDT:{c}", upto, entry_ids_are_seqs=True)
                   for c, upto in targets.items()}
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 60) == 0, log.read_text()[-2000:]
    finally:
        if second.returncode is None:
            second.kill()
            await asyncio.wait_for(second.wait(), 30)
        await client.aclose()
    return covered, targets


@pytest.mark.slow
async def test_a_sigkilled_ingestor_continues_after_its_spill_log_and_drains_it(prefix: str, tmp_path: Path) -> None:
    """README row "the ingestor is killed": Redis (AOF) stopped until the ingestor's spill log holds 3000
    records, then SIGKILL; Redis started again and a new ``market ingest`` on the same spill directory.  It
    finds exactly the records the disk holds, drains them (no segment left), and every trade and aggregate
    trade id is stored once, in order, or inside a gap marker; every trade id from the log is stored."""
    spill, one, two = tmp_path / "spill", tmp_path / "one.log", tmp_path / "two.log"
    with start_redis(appendonly=True) as server:
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=RATE)) as sim:
            on_disk, redis_top = await _kill_during_outage(sim, server, prefix, spill, one)
            spilled = _trade_ids(on_disk)
            coverage, targets = await _second_life(sim, server, prefix, spill, two)
    found = _events(two, "spill_found_at_start")
    assert found and found[0]["records"] == len(on_disk), (found, len(on_disk))
    assert _events(two, "spill_drained")
    for channel, (_, _, _, holes) in coverage.items():
        assert holes == [], f"{channel}: unmarked holes {holes[:5]}"
    _, stored, marked, _ = coverage["trade"]
    assert spilled and redis_top < spilled[0], "the log holds trades newer than Redis"
    assert set(spilled) <= stored, f"{len(set(spilled) - stored)} trade ids from the spill log not stored"
    text = one.read_text() + two.read_text()
    assert "Traceback" not in text
    repaired = [(e["event"], e["first"], e["last"], e["fetched"], e["missing"])
                for e in _events(two, "gap_repaired", "gap_partly_repaired")]
    print(f"\nSIGKILL drill: {len(on_disk)} records on disk at the kill ({len(spilled)} trades, "
          f"{spilled[0]}..{spilled[-1]}), Redis held trades up to at least {redis_top}; restart drained them; "
          f"trade ids up to {targets['trade']}: {len(stored)} stored, {len(marked)} marked, no hole; "
          f"repairs {repaired}")


@pytest.mark.slow
@pytest.mark.parametrize(("history", "venue_has_them"), [(200_000, True), (1000, False)], ids=["repaired", "marked"])
async def test_a_lost_spill_disk_shows_as_repaired_or_marked_gaps(
    prefix: str, tmp_path: Path, history: int, venue_has_them: bool
) -> None:
    """README row "the spill disk is lost": as in the SIGKILL drill, but the spill directory is emptied while
    the ingestor is dead.  The restart leaves no trade or aggregate trade id missing unmarked: with the
    venue's REST history holding every lost id (200000), each is repaired from it (``gap_repaired``); with
    only the newest 1000 kept, the older lost ids are inside gap markers (``gap_marked`` or
    ``gap_partly_repaired`` with ``missing``)."""
    spill, one, two = tmp_path / "spill", tmp_path / "one.log", tmp_path / "two.log"
    with start_redis(appendonly=True) as server:
        async with Simulator(SimulatorConfig(symbols=("BTCUSDT",), rate=RATE, history=history)) as sim:
            on_disk, redis_top = await _kill_during_outage(sim, server, prefix, spill, one)
            lost = _trade_ids(on_disk)
            for path in spill.iterdir():  # the disk is gone: a fresh, empty one in its place
                path.unlink()
            coverage, targets = await _second_life(sim, server, prefix, spill, two)
    assert not _events(two, "spill_found_at_start")
    for channel, (_, _, _, holes) in coverage.items():
        assert holes == [], f"{channel}: unmarked holes {holes[:5]}"
    _, stored, marked, _ = coverage["trade"]
    assert lost and redis_top < lost[0]
    assert set(lost) <= stored | marked
    fills = _events(two, "gap_repaired", "gap_partly_repaired", "gap_marked")
    trade_fills = [
        e for e in fills if e["stream"] == "BTCUSDT:trade" and e["first"] <= lost[-1] and e["last"] >= lost[0]
    ]
    assert trade_fills, f"the log shows the lost trade ids repaired or marked: {fills}"
    if venue_has_them:
        assert set(lost) <= stored, f"{len(set(lost) - stored)} lost trade ids not repaired from the venue"
        assert all(e["event"] == "gap_repaired" for e in trade_fills), trade_fills
    else:
        assert set(lost) & marked, "ids the venue no longer lists are marked"
        assert all(e["event"] in ("gap_marked", "gap_partly_repaired") for e in trade_fills), trade_fills
    print(f"\nlost-spill drill (venue history {history}): {len(lost)} trade ids lost with the disk "
          f"({lost[0]}..{lost[-1]}); trade ids up to {targets['trade']}: {len(stored)} stored, {len(marked)} marked, "
          f"no hole; {[(e['event'], e['first'], e['last'], e.get('fetched'), e.get('missing')) for e in trade_fills]}")


# -- [spill] fsync ------------------------------------------------------------------------------------------------
RECORDS = [b'{"seq":1,"channel":"trade"}'] * 4


def test_spill_fsync_always_syncs_every_append(tmp_path: Path) -> None:
    log = SpillLog(tmp_path, fsync="always", fsync_interval=3600.0)
    try:
        for _ in range(50):
            log.append(RECORDS)
            log.maybe_sync()
        assert log.syncs == 50
    finally:
        log.close()
    reopened = SpillLog(tmp_path)
    assert len(reopened) == 200
    reopened.close()


def test_spill_fsync_never_syncs_no_append(tmp_path: Path) -> None:
    """Not even with a zero interval: ``maybe_sync`` does nothing under ``never``."""
    log = SpillLog(tmp_path, fsync="never", fsync_interval=0.0)
    try:
        for _ in range(50):
            log.append(RECORDS)
            log.maybe_sync()
        assert log.syncs == 0
        assert len(log) == 200
    finally:
        log.close()


def test_spill_fsync_interval_syncs_from_maybe_sync_at_most_once_per_interval(tmp_path: Path) -> None:
    """Appends alone never sync; ``maybe_sync`` syncs what was appended once the interval has passed since
    the last sync (or the open), and not again before it has passed once more."""
    log = SpillLog(tmp_path / "zero", fsync="interval", fsync_interval=0.0)
    try:
        for _ in range(20):
            log.append(RECORDS)
        assert log.syncs == 0
        log.maybe_sync()
        assert log.syncs == 1
        log.maybe_sync()
        assert log.syncs == 1, "nothing appended since: nothing to sync"
    finally:
        log.close()

    log = SpillLog(tmp_path / "hour", fsync="interval", fsync_interval=3600.0)
    try:
        for _ in range(50):
            log.append(RECORDS)
            log.maybe_sync()
        assert log.syncs == 0
    finally:
        log.close()

    interval = 0.2
    opened = time.monotonic()
    log = SpillLog(tmp_path / "short", fsync="interval", fsync_interval=interval)
    synced_at = [opened]
    try:
        deadline = time.monotonic() + 30
        while len(synced_at) <= 4:
            if time.monotonic() >= deadline:
                pytest.fail(f"only {log.syncs} syncs within 30 s")
            log.append(RECORDS)
            before = log.syncs
            log.maybe_sync()
            if log.syncs > before:
                synced_at.append(time.monotonic())
            time.sleep(0.01)  # poll
        appended = log.appended
    finally:
        log.close()
    # A sync starts at least `interval` after the end of the one before it (or the open), and ends before
    # the time taken after it: consecutive times taken are at least `interval` apart.
    spacing = [b - a for a, b in itertools.pairwise(synced_at)]
    assert min(spacing) >= interval, spacing
    print(f"\nfsync interval {interval} s: {len(spacing)} syncs for {appended // len(RECORDS)} appends, "
          f"spacing {[round(s, 3) for s in spacing]}")
