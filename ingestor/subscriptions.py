"""Which streams go on which connection, and the SUBSCRIBE requests that ask for them: pure.

Binance allows at most 1024 streams a connection and 5 incoming messages a second;
:func:`plan_connections` spreads streams over as many connections as needed and
:func:`subscribe_requests` chunks one connection's streams into requests.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consumer_sdk.core.errors import ConfigError

__all__ = ["plan_connections", "subscribe_requests"]


def plan_connections(streams: Sequence[str], max_per_connection: int = 1024) -> list[list[str]]:
    """Split streams into groups of at most ``max_per_connection``, as evenly as possible."""
    if max_per_connection < 1:
        raise ConfigError("max_per_connection must be at least 1")
    unique = list(dict.fromkeys(streams))
    if not unique:
        return []
    n = -(-len(unique) // max_per_connection)
    base, extra = divmod(len(unique), n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append(unique[start : start + size])
        start += size
    return out


def subscribe_requests(
    streams: Sequence[str], first_id: int, *, per_request: int = 200, method: str = "SUBSCRIBE"
) -> list[dict[str, Any]]:
    """``[{"method": "SUBSCRIBE", "params": [...], "id": n}, ...]`` with at most ``per_request`` params each."""
    return [
        {"method": method, "params": list(streams[i : i + per_request]), "id": first_id + k}
        for k, i in enumerate(range(0, len(streams), per_request))
    ]
