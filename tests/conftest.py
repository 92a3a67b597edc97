"""Fixtures shared by the test suite.

Integration tests use the real Redis at ``MARKET_REDIS_URL`` (default
``redis://127.0.0.1:6379/0``; ``ops/dev.sh test`` starts one when none answers).
Each test gets its own key prefix and deletes its keys afterwards; tests that stop
or restart Redis start a private ``redis-server`` on a free port.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings

from ops.redis_server import RedisServer, redis_answers, start_redis

# Property tests: the same examples on every run (a failure reproduces as it is), no example database on disk, and
# no timing checks (a busy 2-core machine is slow, not wrong). A test's own @settings changes only what it names.
settings.register_profile(
    "market", derandomize=True, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("market")

REDIS_URL = os.environ.get("MARKET_REDIS_URL", "redis://127.0.0.1:6379/0")
#: a test that uses any of these fixtures talks to a Redis server: it is marked ``redis``
REDIS_FIXTURES = frozenset({"redis_url", "prefix", "aredis", "private_redis"})


#: a module whose source names one of these has its own Redis clients or servers: all its tests are marked
_REDIS_IN_SOURCE = re.compile(r"REDIS_URL|start_redis|private_redis|from_url\(")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the Redis-facing tests, so ``-m redis`` runs them again on another server (see .ci/run)."""
    by_module: dict[str, bool] = {}
    for item in items:
        path = str(item.path)
        talks = by_module.get(path)
        if talks is None:
            talks = by_module[path] = path.endswith(".py") and bool(_REDIS_IN_SOURCE.search(item.path.read_text()))
        if talks or REDIS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.redis)


@pytest.fixture(scope="session", autouse=True)
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Ingestors started by the tests (and their child processes) keep their spill logs here."""
    path = str(tmp_path_factory.mktemp("state"))
    old = os.environ.get("MARKET_STATE_DIR")
    os.environ["MARKET_STATE_DIR"] = path
    yield path
    if old is None:
        os.environ.pop("MARKET_STATE_DIR", None)
    else:
        os.environ["MARKET_STATE_DIR"] = old


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not redis_answers(REDIS_URL):
        pytest.fail(f"no Redis answers at {REDIS_URL}: run the tests with ops/dev.sh test, which starts one")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A unique stream prefix; every key under it is deleted after the test."""
    p = f"t{uuid.uuid4().hex[:10]}"
    yield p
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(f"{p}:*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, on a free port, which the test may stop and restart."""
    with start_redis() as server:
        yield server
