"""The ``market-ingestor`` ACL user of ``ops/acl/users.acl`` may keep its leases, and nothing else under them."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from ingestor.leases import LeaseStore, fence_key, lease_key
from ops.redis_server import RedisServer

ACL_FILE = Path(__file__).resolve().parents[1] / "ops" / "acl" / "users.acl"


async def as_ingestor(server: RedisServer) -> aioredis.Redis:
    """A client logged in as ``market-ingestor``, its rules taken word by word from the ACL file."""
    admin = aioredis.Redis.from_url(server.url)
    try:
        (line,) = [x for x in ACL_FILE.read_text().splitlines() if x.split()[1] == "market-ingestor"]
        rules = line.split()[2:]
        await admin.execute_command("ACL", "SETUSER", "market-ingestor", *rules, ">secret")
    finally:
        await admin.aclose()
    return aioredis.Redis(host="127.0.0.1", port=server.port, username="market-ingestor", password="secret")


async def test_the_ingestor_user_takes_renews_and_releases_leases(private_redis: RedisServer) -> None:
    client = await as_ingestor(private_redis)
    try:
        store = LeaseStore(client, "md", "host-1-abc")
        got = await store.acquire([0, 1], 2, 3.0)
        assert [s for s, _ in got] == [0, 1]
        assert await store.renew(dict(got), 3.0) == {0: True, 1: True}
        assert await store.release(dict(got)) == 2
        assert await client.get("md:_ctl:{md}:state") is None, "the hash-tagged control state is readable"
        assert await client.get("md:_ctl:state") is None
        with pytest.raises((NoPermissionError, ResponseError)):
            await client.set("md:_ctl:{md}:state", "x")
        with pytest.raises((NoPermissionError, ResponseError)):
            await client.set(lease_key("other", 0), "1 x")
        with pytest.raises((NoPermissionError, ResponseError)):
            await client.delete(fence_key("other"))
    finally:
        await client.aclose()
