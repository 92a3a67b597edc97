"""A handshake refusal (404, 403 ...) is fatal only before the session was ever live with its URL.

Once the URL has worked, an HTTP error page on a reconnect comes from a proxy or load balancer while
the path behind it is broken: an outage, retried with the backoff, never the end of the process.
The integration test puts a real proxy between the ingestor and the venue that answers 404 for a while.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk.core.tick import is_gap_marker
from ingestor.lifecycle import REFUSALS, classify_status
from ops.faultproxy import FaultProxy
from ops.simulator import Simulator, SimulatorConfig


@pytest.mark.parametrize("status", sorted(REFUSALS))
def test_a_refusal_is_fatal_only_before_the_first_live(status: int) -> None:
    first = classify_status(status, None, been_live=False)
    assert first.fatal and "check the URL" in first.message
    later = classify_status(status, "2", been_live=True)
    assert not later.fatal and later.alarm
    assert f"HTTP {status}" in later.message and later.retry_after == 2.0


@pytest.mark.parametrize("status", [408, 418, 429, 500, 502, 503, 504, 409])
def test_other_statuses_are_retried_either_way(status: int) -> None:
    for been_live in (False, True):
        failure = classify_status(status, None, been_live=been_live)
        assert not failure.fatal and not failure.alarm


async def _wait(predicate: object, timeout: float, what: str) -> None:
    assert callable(predicate)
    try:
        async with asyncio.timeout(timeout):
            while not await predicate():
                await asyncio.sleep(0.05)  # poll
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None


async def _venue_last_trade(sim: Simulator, symbol: str) -> int:
    import json
    import urllib.request

    def get() -> list[dict[str, object]]:
        with urllib.request.urlopen(f"{sim.rest_url}/api/v3/trades?symbol={symbol}&limit=1", timeout=5) as r:
            return list(json.loads(r.read()))

    return int(str((await asyncio.to_thread(get))[-1]["id"]))


@pytest.mark.slow
async def test_404_pages_after_live_are_an_outage_and_heal(
    redis_url: str, aredis: aioredis.Redis, prefix: str, tmp_path: Path
) -> None:
    """`market ingest` through a proxy that, once live, answers every connection with 404 for a while."""
    symbols = ("BTCUSDT", "ETHUSDT")
    config = tmp_path / "ingest.toml"
    config.write_text("[session]\nping_interval = 2.0\nping_timeout = 3.0\nopen_timeout = 3.0\nbackoff_cap = 1.0\n")
    log_path = tmp_path / "ingest.log"
    async with Simulator(SimulatorConfig(symbols=symbols, rate=400.0)) as sim, FaultProxy(sim.port) as proxy:
        env = {**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}
        with open(log_path, "wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ops.cli", "ingest", "--url", proxy.url, "--rest-url", sim.rest_url,
                "--symbols", ",".join(symbols), "--channels", "trade", "--metrics-port", "0",
                "--config", str(config), env=env, stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
            )
            try:
                async def flowing() -> bool:
                    return all([await aredis.xlen(f"{prefix}:binance:{s}:trade") > 50 for s in symbols])

                await _wait(flowing, 30, "ticks flowing")
                proxy.http_error(404)

                async def refused_repeatedly() -> bool:
                    return proxy.refused >= 5 and proc.returncode is None

                await _wait(refused_repeatedly, 60, "five reconnects answered with 404")
                assert proc.returncode is None, "the ingestor ended on a 404 after it had been live"
                proxy.restore()
                for symbol in symbols:
                    key = f"{prefix}:binance:{symbol}:trade"
                    target = await _venue_last_trade(sim, symbol)

                    async def caught_up(key: str = key, target: int = target) -> bool:
                        top = await aredis.xrevrange(key, count=1)
                        return bool(top) and int(top[0][0].split(b"-")[1]) >= target

                    await _wait(caught_up, 60, f"{key} reaches venue id {target}")
                    ids = []
                    for _, fields in await aredis.xrange(key):
                        tick = orjson.loads(fields[b"d"])
                        assert not is_gap_marker(tick), f"the outage left a marked gap in {key}: {tick}"
                        ids.append(tick["seq"])
                    assert ids == list(range(ids[0], ids[0] + len(ids))), f"{key}: trade ids not contiguous"
                assert proc.returncode is None
            finally:
                if proc.returncode is None:
                    proc.terminate()
                await asyncio.wait_for(proc.wait(), 30)
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line.startswith(b"{")]
    events = [x["event"] for x in lines]
    assert "session_fatal" not in events
    refused = [x for x in lines if x["event"] == "reconnect_refused"]
    assert refused and all(x["level"] == "error" for x in refused) and "HTTP 404" in refused[0]["error"]
    assert any(x["event"] in ("gap_repaired",) for x in lines), "the trades made during the outage were not backfilled"
