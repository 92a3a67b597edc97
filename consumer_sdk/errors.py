"""The exception tree of ``consumer_sdk``.

::

    MarketError
    ├── ConfigError            bad settings, patterns or arguments (fatal)
    ├── InvalidTick            a stream entry that is not a valid tick
    ├── TrimmedError           the range asked for was trimmed away (carries the range lost)
    └── TransientError         Redis unreachable or busy; retrying may succeed
"""

from __future__ import annotations

__all__ = ["ConfigError", "InvalidTick", "MarketError", "TransientError", "TrimmedError"]


class MarketError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(MarketError, ValueError):
    """A setting, pattern, key or argument that cannot work; retrying will not help."""


class InvalidTick(MarketError, ValueError):
    """A stream entry whose ``d`` field is not a tick of a schema version we read."""


class TransientError(MarketError):
    """Redis is unreachable, loading or read-only for now; the operation may be retried."""


class TrimmedError(MarketError):
    """What was asked for is older than the oldest entry the stream still holds."""

    def __init__(self, key: str, first_missing: str, first_available: str | None) -> None:
        self.key = key
        self.first_missing = first_missing
        self.first_available = first_available
        super().__init__(
            f"{key}: entries from {first_missing} were trimmed away; "
            f"oldest available is {first_available or 'none (stream empty)'}"
        )
