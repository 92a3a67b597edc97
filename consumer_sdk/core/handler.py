"""What a tick is handed to: the one callable type the consumer, the hot path and the ingestor share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeAlias

from consumer_sdk.core.tick import Tick

__all__ = ["Handler"]

Handler: TypeAlias = Callable[[Tick], Awaitable[None] | None]
"""What gets each tick: a plain function or a coroutine function (decided once, at start)."""
