"""Reconnect delays: exponential growth, full jitter, a cap, reset after a healthy connection.

Pure and deterministic for a given random generator, so tests check the bounds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass(slots=True)
class Backoff:
    """``next_delay()`` is uniform in ``[0, min(cap, base * factor**n)]``; ``reset()`` after a good run.

    The first delay is at most ``base``, so a one-off disconnect reconnects almost at once, and a
    fleet of ingestors cut at the same moment does not reconnect in lock step.
    """

    base: float = 0.1
    cap: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def ceiling(self) -> float:
        return min(self.cap, self.base * self.factor**self.attempt)

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        delay = self.rng.uniform(0.0, ceiling)
        if ceiling < self.cap:  # stop counting once capped: the power never overflows
            self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0
