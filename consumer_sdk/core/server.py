"""The Redis servers this project supports, and the check every entry point runs at start.

The floor is **Redis 7.0** (or **Valkey 7.2**, which reports itself as Redis 7.2.4 and speaks the
same protocol).  What the code needs from 7.0, and 6.2 lacks:

- ``XAUTOCLAIM`` that returns the IDs of entries deleted while pending (6.2 returns nil entries and
  no list), which the consumer uses to report a claimed entry that was trimmed away;
- ``XINFO GROUPS`` with ``lag`` and ``entries-read``, which the consumer's lag and its
  group-behind-the-trim check read;
- ``XINFO STREAM`` with ``max-deleted-entry-id`` and ``entries-added``, which tell a trimmed range
  from one that was never written (replay and the consumer);
- script flags (``#!lua flags=...``), which let the writer's append script be refused whole by a
  server out of memory instead of failing half-way.

Redis 6.2 reached its end of life in 2025; rather than run a degraded consumer on it, an
ingestor, a consumer, ``market status``, ``tail``, ``replay`` and ``ctl`` refuse it with one line
naming the version found and the one needed.

:func:`parse_server_info` and :func:`check_supported` are pure; :func:`require_supported` asks the
server (``INFO server``, one round trip, once per connection set-up).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from consumer_sdk.core.errors import ConfigError

__all__ = ["MIN_REDIS", "MIN_VALKEY", "ServerVersion", "check_supported", "parse_server_info", "require_supported"]

#: the oldest Redis the project runs on
MIN_REDIS: Final = (7, 0)
#: the oldest Valkey the project runs on (Valkey's first release; it reports ``redis_version:7.2.4``)
MIN_VALKEY: Final = (7, 2)


@dataclass(frozen=True, slots=True)
class ServerVersion:
    """What a server says it is: ``name`` is ``redis`` or ``valkey``; ``version`` as numbers."""

    name: str
    version: tuple[int, ...]

    @property
    def text(self) -> str:
        return f"{'Valkey' if self.name == 'valkey' else 'Redis'} {'.'.join(map(str, self.version))}"


def _numbers(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.strip().split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def parse_server_info(info: Mapping[Any, Any]) -> ServerVersion:
    """The server's name and version from an ``INFO server`` reply (as redis-py parses it).

    Valkey is told by ``server_name:valkey`` and versioned by ``valkey_version``; anything else by
    ``redis_version``.  :class:`ConfigError` when no version can be read at all.
    """
    fields = {_text(k): v for k, v in info.items()}
    if _text(fields.get("server_name", "")).lower() == "valkey" and "valkey_version" in fields:
        version = _numbers(_text(fields["valkey_version"]))
        name = "valkey"
    else:
        version = _numbers(_text(fields.get("redis_version", "")))
        name = "redis"
    if not version:
        raise ConfigError("the server did not report a version in INFO server: is it Redis?")
    return ServerVersion(name, version)


def check_supported(found: ServerVersion, where: str = "") -> None:
    """:class:`ConfigError` naming the version found and the one needed when ``found`` is too old."""
    floor = MIN_VALKEY if found.name == "valkey" else MIN_REDIS
    if found.version >= floor:
        return
    at = f" at {where}" if where else ""
    raise ConfigError(
        f"{found.text}{at} is too old: market needs Redis {'.'.join(map(str, MIN_REDIS))} or newer "
        f"(or Valkey {'.'.join(map(str, MIN_VALKEY))} or newer)"
    )


async def require_supported(client: Any, where: str = "") -> ServerVersion:
    """Ask the server for its version (``INFO server``) and :func:`check_supported` it.

    ``client`` is a ``redis.asyncio.Redis`` (or cluster) client; errors talking to it propagate
    as redis-py raised them, so callers keep their own retry policy.
    """
    info = await client.info("server")
    if isinstance(info, Mapping) and info and all(isinstance(v, Mapping) for v in info.values()):
        info = next(iter(info.values()))  # a cluster client answers per node
    found = parse_server_info(info)
    check_supported(found, where)
    return found
