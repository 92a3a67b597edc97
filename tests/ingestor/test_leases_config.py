"""``[shards]`` and ``redis_replica_acks`` in the ingestor's TOML settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from consumer_sdk.core.errors import ConfigError
from ingestor.config import IngestSettings, load_settings
from ingestor.leases import LeaseSettings


def load(tmp_path: Path, text: str) -> IngestSettings:
    path = tmp_path / "market.toml"
    path.write_text(text)
    return load_settings({}, {"HOME": "/root"}, str(path))


def test_not_sharded_and_no_replica_acks_by_default(tmp_path: Path) -> None:
    s = load(tmp_path, "")
    assert s.shards == LeaseSettings() and not s.shards.enabled
    assert s.redis_replica_acks == 0


def test_shards_are_read(tmp_path: Path) -> None:
    s = load(tmp_path, "redis_replica_acks = 1\n[shards]\ncount = 4\nmax_owned = 2\nlease_ttl_s = 1.5\n")
    assert s.shards == LeaseSettings(count=4, max_owned=2, ttl_s=1.5)
    assert s.shards.limit == 2 and s.shards.renew_every_s == 0.5
    assert s.redis_replica_acks == 1
    assert load(tmp_path, "[shards]\ncount = 2\n").shards == LeaseSettings(count=2, max_owned=0, ttl_s=3.0)


@pytest.mark.parametrize(("text", "message"), [
    ("[shards]\ncount = -1\n", "shards.count: -1 is out of range 0..1024"),
    ("[shards]\ncount = 2\nmax_owned = 5000\n", "shards.max_owned: 5000 is out of range 0..1024"),
    ("[shards]\ncount = 2\nlease_ttl_s = 0.1\n", "shards.lease_ttl_s: 0.1 is out of range 0.3..600.0"),
    ("[shards]\ncount = 'two'\n", "shards.count: expected an integer, got 'two'"),
    ("[shards]\ncuont = 2\n", "unknown setting 'cuont' in market.toml [shards]; did you mean 'count'?"),
    ("[shards]\nttl = 2\n", "unknown setting 'ttl' in market.toml [shards]"),
    ("redis_replica_acks = -1\n", "redis_replica_acks: -1 is out of range 0..64"),
    ("redis_replica_acks = 1.5\n", "redis_replica_acks: expected an integer, got 1.5"),
])
def test_bad_values_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    assert str(info.value).replace(str(tmp_path / "market.toml"), "market.toml") == message


async def test_redis_replica_acks_reach_the_writer(redis_url: str, prefix: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import ingestor.service
    from ingestor.service import Ingestor

    given: dict[str, Any] = {}

    def writer(*args: Any, **kwargs: Any) -> None:
        given.update(kwargs)
        raise ConfigError("built")

    monkeypatch.setattr(ingestor.service, "StreamWriter", writer)
    settings = IngestSettings(url="ws://127.0.0.1:1", symbols=("BTCUSDT",), redis_url=redis_url, prefix=prefix,
                              spill_dir=str(tmp_path / "spill"), redis_replica_acks=2)
    with pytest.raises(ConfigError, match="built"):
        await Ingestor(settings).run()
    assert given["replica_acks"] == 2


def test_replica_acks_from_the_environment_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "market.toml"
    path.write_text("redis_replica_acks = 1\n")
    env = {"HOME": "/root", "MARKET_REDIS_REPLICA_ACKS": "2"}
    assert load_settings({}, env, str(path)).redis_replica_acks == 2
    assert load_settings({}, {"HOME": "/root"}, str(path)).redis_replica_acks == 1
    with pytest.raises(ConfigError, match="redis_replica_acks: expected an integer, got 'one'"):
        load_settings({}, {"HOME": "/root", "MARKET_REDIS_REPLICA_ACKS": "one"})
