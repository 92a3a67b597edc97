"""Several venues in one ingestor process: two Binance-family venues on loopback WebSockets into the real Redis.

Both venues store side by side under the test's own prefix; one venue's connection killed at the socket leaves
the other storing; a pause of one venue by pattern (``market ctl pause binance_coinm:*``) stops that venue only;
the heartbeats name each venue and ``market status`` judges both; one metrics exposition labels both; SIGTERM to
``market ingest`` flushes both and exits 0; ``--venue`` with ``[venues.*]`` tables is one line, exit 2.

The venues are the test's own (:class:`TradeVenue`, real sockets, real closes).  A :class:`TradeVenue` serves
Binance's combined streams on ``/stream``: it answers each ``SUBSCRIBE`` with ``{"result": null, "id": n}``, then
sends one trade event on each subscribed stream every ``every_s``, its ids counting up per symbol (spot: ``trade``
with ``t``; futures: ``aggTrade`` with ``a``, ``f`` and ``l``).
:meth:`TradeVenue.kill` closes every connection at the socket (no close frame) and refuses new ones until
:meth:`TradeVenue.revive`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import heartbeat_set_key, parse_entry_id
from ingestor import multi
from ingestor.config import load_venues
from ingestor.control_plane import update_state
from ingestor.metrics import VenuesCollector
from ingestor.multi import VenueRunner, unsaved_at_stop
from ingestor.service import Ingestor, StopReport
from ops.ctl import _target
from ops.redis_server import free_port
from ops.status import collect, evaluate


class TradeVenue:
    def __init__(self, event: str, *, every_s: float = 0.002) -> None:
        assert event in ("trade", "aggTrade")
        self.event = event
        self.every_s = every_s
        self.next_id: dict[str, int] = {}
        self.connections: set[ServerConnection] = set()
        self.accepted = 0
        self.refusing = False
        #: answer every handshake with HTTP 404 (a wrong URL)
        self.not_found = False
        self._server: Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> TradeVenue:
        self._server = await serve(self._handle, "127.0.0.1", self.port, process_request=self._process)
        self.port = self._server.sockets[0].getsockname()[1] if self.port == 0 else self.port
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def kill(self) -> int:
        """Abort every connection at the socket and refuse new ones; how many were aborted."""
        self.refusing = True
        killed = 0
        for conn in list(self.connections):
            conn.transport.abort()
            killed += 1
        return killed

    def revive(self) -> None:
        self.refusing = False

    def _process(self, conn: ServerConnection, request: Request) -> Response | None:
        return conn.respond(HTTPStatus.NOT_FOUND, "no such path\n") if self.not_found else None

    def _frame(self, stream: str) -> bytes:
        symbol = stream.split("@", 1)[0].upper()
        n = self.next_id.get(symbol, 1)
        self.next_id[symbol] = n + 1
        ms = int(time.time() * 1000)
        data: dict[str, Any] = {
            "e": self.event, "E": ms, "s": symbol, "p": "100.5", "q": "0.25", "T": ms, "m": n % 2 == 0,
        }
        if self.event == "trade":
            data["t"] = n
        else:
            data.update(a=n, f=n, l=n)
        return orjson.dumps({"stream": stream, "data": data})

    async def _handle(self, conn: ServerConnection) -> None:
        if self.refusing:
            conn.transport.abort()
            return
        self.accepted += 1
        self.connections.add(conn)
        streams: list[str] = []
        sender: asyncio.Task[None] | None = None
        try:
            async for message in conn:
                request = orjson.loads(message)
                if request.get("method") == "SUBSCRIBE":
                    streams.extend(request["params"])
                await conn.send(orjson.dumps({"result": None, "id": request["id"]}).decode())
                if sender is None and streams:
                    sender = asyncio.create_task(self._send(conn, streams))
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            if sender is not None:
                sender.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await sender

    async def _send(self, conn: ServerConnection, streams: list[str]) -> None:
        while True:
            for stream in list(streams):
                await conn.send(self._frame(stream).decode())
            await asyncio.sleep(self.every_s)  # the venue's pace


# ---------------------------------------------------------------------------------------------- the tests
SPOT_KEY = "binance:BTCUSDT:trade"
COINM_KEY = "binance_coinm:BTCUSD_PERP:agg_trade"


def write_config(path: Path, prefix: str, spot: TradeVenue, coinm: TradeVenue, metrics_port: int = 0) -> Path:
    path.write_text(f"""
prefix = "{prefix}"
metrics_port = {metrics_port}
spill_dir = "{path.parent / 'spill'}"
[repair]
enabled = false
[session]
backoff_base = 0.05
backoff_cap = 0.5
[venues.binance]
url = "{spot.url}"
symbols = ["BTCUSDT", "ETHUSDT"]
channels = ["trade"]
[venues.binance_coinm]
url = "{coinm.url}"
symbols = ["BTCUSD_PERP"]
channels = ["agg_trade"]
""")
    return path


@pytest.fixture
async def two_venues() -> AsyncIterator[tuple[TradeVenue, TradeVenue]]:
    spot, coinm = await TradeVenue("trade").start(), await TradeVenue("aggTrade").start()
    try:
        yield spot, coinm
    finally:
        spot.kill()
        coinm.kill()
        await spot.close()
        await coinm.close()


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 30.0) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(0.02)  # poll the condition
    except TimeoutError:
        raise AssertionError(f"not within {timeout} s: {what}") from None


def grown(aredis: aioredis.Redis, key: str, at_least: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return int(await aredis.xlen(key)) >= at_least

    return check


async def ids(aredis: aioredis.Redis, key: str) -> list[int]:
    return [parse_entry_id(entry_id)[1] for entry_id, _ in await aredis.xrange(key, "-", "+")]


def live(runner: VenueRunner, venue: str) -> int:
    return sum(1 for s in runner.ingestors[venue].sessions if s.state.value == "live")


async def test_two_venues_store_side_by_side_and_one_dead_connection_leaves_the_other_storing(
    two_venues: tuple[TradeVenue, TradeVenue], aredis: aioredis.Redis, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    spot, coinm = two_venues
    settings = load_venues({}, {"MARKET_REDIS_URL": redis_url}, str(write_config(tmp_path / "m.toml", prefix, spot,
                                                                                 coinm)))
    assert [s.venue for s in settings] == ["binance", "binance_coinm"]
    spot_key, coinm_key = f"{prefix}:{SPOT_KEY}", f"{prefix}:{COINM_KEY}"
    runner = VenueRunner(settings, redis=aredis)
    # A co-located subscriber on each venue's hot path: the ticks of both reach it, each from its own venue.
    seen: dict[str, set[str]] = {"binance": set(), "binance_coinm": set()}
    for venue, ingestor in runner.ingestors.items():
        ingestor.subscribe(lambda t, venue=venue: seen[venue].add(f"{t['venue']}:{t['symbol']}:{t['channel']}"),
                           "*:*:*", name=f"test-{venue}")
    task = asyncio.create_task(runner.run())
    try:
        await asyncio.wait_for(runner.started.wait(), 30)
        await until(grown(aredis, spot_key, 50), "binance storing")
        await until(grown(aredis, coinm_key, 50), "binance_coinm storing")

        async def both_delivered() -> bool:
            return len(seen["binance"]) == 2 and len(seen["binance_coinm"]) == 1

        await until(both_delivered, "both venues' ticks on their hot paths")
        assert seen == {"binance": {SPOT_KEY, "binance:ETHUSDT:trade"}, "binance_coinm": {COINM_KEY}}
        assert {p.name for p in (tmp_path / "spill").iterdir()} == {"binance", "binance_coinm"}

        # Heartbeats: one per venue, each id naming its venue; `market status` judges both.
        async def both_beating() -> bool:
            return len(await aredis.smembers(heartbeat_set_key(prefix))) == 2

        await until(both_beating, "two heartbeats")
        members = sorted(m.decode() for m in await aredis.smembers(heartbeat_set_key(prefix)))
        assert any("-binance-" in m for m in members) and any("-binance_coinm-" in m for m in members), members
        heartbeats, groups = await collect(aredis, prefix)
        report = evaluate(heartbeats, groups, time.time())
        ingestor = report.stage("ingestor")
        assert ingestor.level.value == "ok" and "venues binance, binance_coinm" in ingestor.cause, ingestor

        # One exposition: each venue's families labelled by venue, the process-wide ones once.
        registry = CollectorRegistry()
        registry.register(VenuesCollector(runner.running, lambda: dict(runner.restarts)))
        families = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
        published = {(s.labels["venue"], s.labels["channel"]): s.value for s in families["market_published"].samples}
        assert published[("binance", "trade")] > 0 and published[("binance_coinm", "agg_trade")] > 0
        assert {s.labels["venue"] for s in families["market_ingress_len"].samples} == {"binance", "binance_coinm"}
        assert [s.labels for s in families["market_threads"].samples] == [{}]
        assert {s.labels["venue"]: s.value for s in families["market_venue_restarts"].samples
                if s.name.endswith("_total")} == {"binance": 0, "binance_coinm": 0}

        # binance's connection killed at the socket, and refused while down: binance_coinm keeps storing.
        assert spot.kill() >= 1

        async def spot_down() -> bool:
            return live(runner, "binance") == 0

        await until(spot_down, "binance's connection seen down")
        accepted = spot.accepted
        mark = int(await aredis.xlen(coinm_key))
        await until(grown(aredis, coinm_key, mark + 200), "binance_coinm storing while binance is down")
        assert live(runner, "binance") == 0 and spot.accepted == accepted and live(runner, "binance_coinm") == 1
        assert runner.restarts == {"binance": 0, "binance_coinm": 0}  # a lost connection is its session's to retry

        spot.revive()
        mark = int(await aredis.xlen(spot_key))
        await until(grown(aredis, spot_key, mark + 50), "binance storing again after its venue came back")

        # A pause of one venue by pattern (`market ctl pause binance_coinm:*`) reaches that venue's ingestor only.
        pattern = _target("binance_coinm:*")
        assert pattern == "binance_coinm:*:*"
        await update_state(aredis, prefix, lambda s: s.with_pause(pattern), who="test", action="pause", target=pattern)

        async def coinm_paused() -> bool:
            return runner.ingestors["binance_coinm"].control.stats().paused_dropped > 0

        await until(coinm_paused, "binance_coinm paused")
        mark = int(await aredis.xlen(spot_key))
        await until(grown(aredis, spot_key, mark + 100), "binance storing while binance_coinm is paused")
        assert runner.ingestors["binance"].control.stats().paused_dropped == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert set(runner.stop_reports) == {"binance", "binance_coinm"}
    assert all(r.unsaved == 0 for r in runner.stop_reports.values()), runner.stop_reports
    for key in (spot_key, coinm_key):
        stored = await ids(aredis, key)
        assert stored == sorted(set(stored)), f"{key}: stored out of order or twice"


class FailsOnceLive(Ingestor):
    """A defect in binance_coinm's pipeline (an exception no stage handles), the first time it runs: it ends in an
    error once live and storing.  The only way to reach the runner's replacement path, since every fault of the
    venue, Redis or the disk is handled inside an ingestor."""

    failed = False

    async def run(self) -> None:
        if self.settings.venue != "binance_coinm" or FailsOnceLive.failed:
            return await super().run()
        FailsOnceLive.failed = True
        task = asyncio.create_task(super().run())

        async def storing() -> bool:
            w = self.writer
            return w is not None and w.snapshot().stats.appended >= 20

        await until(storing, "binance_coinm storing before its defect")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise RuntimeError("a defect")


async def test_a_venue_whose_ingestor_fails_is_replaced_while_the_other_stores_on(
    two_venues: tuple[TradeVenue, TradeVenue], aredis: aioredis.Redis, redis_url: str, prefix: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spot, coinm = two_venues
    settings = load_venues({}, {"MARKET_REDIS_URL": redis_url}, str(write_config(tmp_path / "m.toml", prefix, spot,
                                                                                 coinm)))
    monkeypatch.setattr(multi, "Ingestor", FailsOnceLive)
    monkeypatch.setattr(FailsOnceLive, "failed", False)
    spot_key, coinm_key = f"{prefix}:{SPOT_KEY}", f"{prefix}:{COINM_KEY}"
    runner = VenueRunner(settings, redis=aredis, restart_base_s=0.05, restart_cap_s=0.2)
    first = runner.ingestors["binance_coinm"]
    task = asyncio.create_task(runner.run())
    try:
        async def replaced() -> bool:
            return runner.restarts["binance_coinm"] == 1

        await until(replaced, "binance_coinm's ingestor replaced")
        assert runner.last_error["binance_coinm"] == "RuntimeError: a defect"
        assert runner.ingestors["binance_coinm"] is not first and first not in runner.running()
        mark_spot, mark_coinm = int(await aredis.xlen(spot_key)), int(await aredis.xlen(coinm_key))
        await until(grown(aredis, coinm_key, mark_coinm + 50), "binance_coinm storing again")
        await until(grown(aredis, spot_key, mark_spot + 50), "binance storing on")
        assert runner.restarts["binance"] == 0 and not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert all(r.unsaved == 0 for r in runner.stop_reports.values()), runner.stop_reports


async def test_a_venue_refusing_its_url_at_start_stops_the_process(
    two_venues: tuple[TradeVenue, TradeVenue], aredis: aioredis.Redis, redis_url: str, prefix: str, tmp_path: Path,
) -> None:
    """A configuration to fix (the venue answers the handshake with 404 before it was ever live), as with one venue:
    the run ends with that error, the other venue stopped and flushed."""
    spot, coinm = two_venues
    coinm.not_found = True
    settings = load_venues({}, {"MARKET_REDIS_URL": redis_url}, str(write_config(tmp_path / "m.toml", prefix, spot,
                                                                                 coinm)))
    runner = VenueRunner(settings, redis=aredis)
    with pytest.raises(ConfigError, match="venue refused the connection with HTTP 404"):
        await asyncio.wait_for(runner.run(), 60)
    assert runner.restarts == {"binance": 0, "binance_coinm": 0}
    assert runner.stop_reports["binance"].unsaved == 0


async def test_sigterm_flushes_every_venue_and_exits_0(
    two_venues: tuple[TradeVenue, TradeVenue], aredis: aioredis.Redis, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """`market ingest --config` with two [venues.*] tables: one process, one metrics port, SIGTERM flushes both."""
    spot, coinm = two_venues
    port = free_port()
    config = write_config(tmp_path / "m.toml", prefix, spot, coinm, metrics_port=port)
    log = tmp_path / "ingest.log"
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops.cli", "ingest", "--config", str(config),
            env={**os.environ, "MARKET_REDIS_URL": redis_url}, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
        )
    spot_key, coinm_key = f"{prefix}:{SPOT_KEY}", f"{prefix}:{COINM_KEY}"
    try:
        await until(grown(aredis, spot_key, 100), "binance storing", timeout=60)
        await until(grown(aredis, coinm_key, 100), "binance_coinm storing", timeout=60)
        text = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
        assert 'market_published_total{channel="trade",venue="binance"}' in text, text[:2000]
        assert 'market_published_total{channel="agg_trade",venue="binance_coinm"}' in text
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]
    assert rc == 0, log.read_text()[-3000:]
    stops = [line for line in lines if line["event"] == "stopped"]
    assert len(stops) == 2 and all(x["unsaved"] == 0 for x in stops), stops
    summary = next(line for line in lines if line["event"] == "venues_stopped")
    assert summary["unsaved"] == {"binance": 0, "binance_coinm": 0}
    assert not [line for line in lines if line["level"] == "error"], lines[-20:]
    for key in (spot_key, coinm_key):
        stored = await ids(aredis, key)
        assert len(stored) >= 100 and stored == list(range(stored[0], stored[0] + len(stored))), key


def test_the_exit_status_names_every_venues_unsaved_count() -> None:
    clean, lost = StopReport(10, 0, 0, 0), StopReport(5, 2, 12, 0)
    assert unsaved_at_stop({"binance": clean, "okx": clean}) is None
    error = unsaved_at_stop({"binance": clean, "okx": lost})
    assert error is not None and str(error) == (
        "stopped with ticks saved neither to Redis nor to the spill log: binance 0 unsaved, okx 12 unsaved"
    )


def test_venue_flag_with_venue_tables_is_one_line_exit_2(tmp_path: Path) -> None:
    import subprocess

    config = tmp_path / "m.toml"
    config.write_text('[venues.binance]\nsymbols = ["BTCUSDT"]\n[venues.binance_usdm]\nsymbols = ["BTCUSDT"]\n')
    done = subprocess.run(
        [sys.executable, "-m", "ops.cli", "ingest", "--venue", "binance_usdm", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env={**os.environ, "MARKET_REDIS_URL": "redis://127.0.0.1:1/0"},
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"market: error: --venue names one venue but {config} has [venues.*] tables: give either one venue or the "
        "tables"
    ]
