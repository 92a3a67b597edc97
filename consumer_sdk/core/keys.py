"""Stream keys, entry IDs, the one pattern syntax and the one prefix rule used everywhere.

Key: ``<prefix>:<venue>:<SYMBOL>:<channel>``, e.g. ``md:binance:BTCUSDT:trade``.
Entry ID: ``<ms>-<seq>``: venue event time in ms (non-decreasing per stream) and the tick's seq.
Pattern: ``venue:SYMBOL:channel`` with shell-style globs in any part, e.g. ``binance:*:kline_*``.
Prefix: 1 to 64 letters, digits, ``_``, ``.`` or ``-`` (:data:`PREFIX_RE`, :func:`check_prefix`).
Under a prefix, besides the streams: ``_hb`` (ingestor heartbeats) and ``_ctl`` (the control plane).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Final

from consumer_sdk.core.errors import ConfigError

__all__ = [
    "DEFAULT_PREFIX",
    "PREFIX_RE",
    "Pattern",
    "StreamName",
    "check_prefix",
    "control_audit_key",
    "control_changed_channel",
    "control_state_key",
    "entry_id",
    "heartbeat_key",
    "heartbeat_set_key",
    "parse_entry_id",
    "parse_key",
    "stream_key",
]

DEFAULT_PREFIX: Final = "md"
#: what a key prefix may be
PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")
_GLOB_PART = re.compile(r"^[A-Za-z0-9_.\-*?\[\]!]+$")


@dataclass(frozen=True, slots=True)
class StreamName:
    """One stream: a venue, a symbol and a channel."""

    venue: str
    symbol: str
    channel: str

    def key(self, prefix: str = DEFAULT_PREFIX) -> str:
        return f"{prefix}:{self.venue}:{self.symbol}:{self.channel}"

    def __str__(self) -> str:
        return f"{self.venue}:{self.symbol}:{self.channel}"


def check_prefix(prefix: str, source: str = "") -> str:
    """``prefix`` itself when it matches :data:`PREFIX_RE`; a :class:`ConfigError` naming it (and ``source``,
    where it came from, e.g. ``MARKET_PREFIX``) otherwise."""
    if not PREFIX_RE.match(prefix):
        where = f" ({source})" if source else ""
        raise ConfigError(f"invalid stream prefix {prefix!r}{where}: 1 to 64 letters, digits, '_', '.' or '-'")
    return prefix


def stream_key(venue: str, symbol: str, channel: str, prefix: str = DEFAULT_PREFIX) -> str:
    return f"{prefix}:{venue}:{symbol}:{channel}"


def parse_key(key: str, prefix: str = DEFAULT_PREFIX) -> StreamName:
    """Split a stream key; raise :class:`ConfigError` when it is not ``prefix:venue:SYMBOL:channel``."""
    parts = key.split(":")
    if len(parts) != 4 or parts[0] != prefix or not all(_PART.match(p) for p in parts[1:]):
        raise ConfigError(f"not a stream key of the form {prefix}:<venue>:<SYMBOL>:<channel>: {key!r}")
    return StreamName(parts[1], parts[2], parts[3])


def entry_id(ms: int, seq: int) -> str:
    return f"{ms}-{seq}"


def parse_entry_id(entry: str | bytes) -> tuple[int, int]:
    """``b"1700000000000-42"`` -> ``(1700000000000, 42)``."""
    if isinstance(entry, bytes):
        entry = entry.decode()
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


class Pattern:
    """A ``venue:SYMBOL:channel`` pattern with shell-style globs in any part.

    Venue and channel match case-sensitively as written (lower case in keys);
    the symbol part is upper-cased, since venue symbols are stored upper case.
    """

    __slots__ = ("_literal", "_regex", "text")

    def __init__(self, text: str) -> None:
        parts = text.split(":")
        if len(parts) != 3 or not all(p and _GLOB_PART.match(p) for p in parts):
            raise ConfigError(
                f"invalid pattern {text!r}: expected venue:SYMBOL:channel, globs (* ? [..]) allowed in any part"
            )
        parts[1] = parts[1].upper()
        self.text = ":".join(parts)
        self._literal = not any(c in self.text for c in "*?[")
        self._regex = re.compile(fnmatch.translate(self.text))

    @property
    def is_literal(self) -> bool:
        return self._literal

    def matches(self, name: StreamName | str) -> bool:
        """Whether ``venue:SYMBOL:channel`` (a :class:`StreamName` or its text) matches."""
        return self._regex.match(str(name)) is not None

    def redis_glob(self, prefix: str = DEFAULT_PREFIX) -> str:
        """The ``SCAN MATCH`` glob selecting the keys this pattern names."""
        return f"{prefix}:{self.text}"

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


# ---------------------------------------------------------------- keys beside the streams


def heartbeat_key(prefix: str, ingestor_id: str) -> str:
    """``<prefix>:_hb:ingestor:<id>``: one ingestor's latest heartbeat (a string, JSON, with an expiry)."""
    return f"{prefix}:_hb:ingestor:{ingestor_id}"


def heartbeat_set_key(prefix: str) -> str:
    """``<prefix>:_hb:ingestors``: the set of ingestor ids that have reported."""
    return f"{prefix}:_hb:ingestors"


def control_state_key(prefix: str) -> str:
    """``<prefix>:_ctl:state``: the desired control state, JSON with its version (one key: one slot)."""
    return f"{prefix}:_ctl:state"


def control_audit_key(prefix: str) -> str:
    """``<prefix>:_ctl:audit``: the stream of control changes, one entry per change."""
    return f"{prefix}:_ctl:audit"


def control_changed_channel(prefix: str) -> str:
    """``<prefix>:_ctl:changed``: the channel each control change's version is published on."""
    return f"{prefix}:_ctl:changed"
