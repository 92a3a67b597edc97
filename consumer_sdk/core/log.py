"""Structured logging helpers shared by every package.

Code logs through the standard :mod:`logging` module with the event name as the
message and fields in ``extra``; the ``market`` command installs a formatter that
writes one JSON object per line (``ts``, ``level``, ``event``, ``component``, fields).
:class:`Throttle` keeps floods down: at most one line per interval per event, with
the count of what it suppressed.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["Throttle", "get_logger", "log_event"]


def get_logger(component: str) -> logging.Logger:
    return logging.getLogger(f"market.{component}")


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        fields.setdefault("component", logger.name.rpartition(".")[2])
        logger.log(level, event, extra={"fields": fields})


class Throttle:
    """At most one log line per ``interval`` seconds per event name; counts the rest."""

    __slots__ = ("_interval", "_last", "_logger", "_suppressed")

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, event: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last.get(event, -1e18) < self._interval:
            self._suppressed[event] = self._suppressed.get(event, 0) + 1
            return
        self._last[event] = now
        suppressed = self._suppressed.pop(event, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        log_event(self._logger, level, event, **fields)
