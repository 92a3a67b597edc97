"""Co-located subscribers for load tests: attach with ``market ingest --subscriber ops.bench.probe:noop``."""

from __future__ import annotations

from consumer_sdk.core.tick import Tick

__all__ = ["count", "noop"]

_seen = 0


def noop(tick: Tick) -> None:
    """Takes every tick and does nothing: measures the fan-out itself."""


def count(tick: Tick) -> None:
    global _seen
    _seen += 1
