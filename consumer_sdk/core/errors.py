"""The exception tree of the project, split once into what retrying may fix and what it cannot.

::

    MarketError                retryable: a class attribute, True exactly for Retryable
    ├── Retryable              retrying (after a delay) may succeed
    │   └── TransientError     Redis unreachable or busy
    └── Fatal                  retrying the same thing will not help
        ├── ConfigError        bad settings, patterns or arguments
        ├── InvalidTick        a stream entry that is not a valid tick
        └── TrimmedError       the range asked for was trimmed away (carries the range lost)

Other packages put their errors under one side (the venue REST client's ``RestRetryable`` and
``RestRefused``, say).  Redis's own exceptions are sorted by the one classifier,
:func:`consumer_sdk.core.redis.classify_redis`.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["ConfigError", "Fatal", "InvalidTick", "MarketError", "Retryable", "TransientError", "TrimmedError"]


class MarketError(Exception):
    """Root of every error this project raises on purpose."""

    #: whether retrying may succeed: True for :class:`Retryable` and only for it
    retryable: ClassVar[bool] = False


class Retryable(MarketError):
    """Asking again, after a delay, may succeed: the cause is expected to pass by itself."""

    retryable: ClassVar[bool] = True


class Fatal(MarketError):
    """Asking again will get the same answer until someone changes something."""


class ConfigError(Fatal, ValueError):
    """A setting, pattern, key or argument that cannot work; retrying will not help."""


class InvalidTick(Fatal, ValueError):
    """A stream entry whose ``d`` field is not a tick of a schema version we read."""


class TransientError(Retryable):
    """Redis is unreachable, loading or read-only for now; the operation may be retried."""


class TrimmedError(Fatal):
    """What was asked for is older than the oldest entry the stream still holds."""

    def __init__(self, key: str, first_missing: str, first_available: str | None) -> None:
        self.key = key
        self.first_missing = first_missing
        self.first_available = first_available
        super().__init__(
            f"{key}: entries from {first_missing} were trimmed away; "
            f"oldest available is {first_available or 'none (stream empty)'}"
        )
