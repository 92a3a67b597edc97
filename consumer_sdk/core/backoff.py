"""Reconnect delays, the one schedule every package uses: exponential growth under a cap, jittered, reset
after a healthy run.

:class:`Backoff` is the schedule; :func:`backoff_delays` is the same schedule as an endless iterator (start
a new one after a success).  The venue session and the writer use full jitter (``floor=0``: a delay is
anywhere in ``[0, ceiling]``); the consumer, replay and the control-plane watcher keep at least half of each
ceiling (``floor=0.5``).  Pure and deterministic for a given random generator, so tests check the bounds.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Backoff", "backoff_delays"]


@dataclass(slots=True)
class Backoff:
    """``next_delay()`` is uniform in ``[floor * c, c]`` with ``c = min(cap, base * factor**n)``; ``reset()``
    after a good run.

    With the default ``floor`` of 0 (full jitter) the first delay is at most ``base``, so a one-off
    disconnect reconnects almost at once, and a fleet of ingestors cut at the same moment does not
    reconnect in lock step.  A ``floor`` of 0.5 waits at least half the ceiling.  O(1) per delay.
    """

    base: float = 0.1
    cap: float = 30.0
    factor: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0
    #: the share of the ceiling every delay waits at least (0: full jitter)
    floor: float = 0.0

    def ceiling(self) -> float:
        return min(self.cap, self.base * self.factor**self.attempt)

    def next_delay(self) -> float:
        ceiling = self.ceiling()
        delay = self.rng.uniform(self.floor * ceiling, ceiling)
        if ceiling < self.cap:  # stop counting once capped: the power never overflows
            self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0


def backoff_delays(
    initial: float = 0.05, factor: float = 1.8, cap: float = 2.0, rng: random.Random | None = None
) -> Iterator[float]:
    """Endless reconnect delays: a :class:`Backoff` from ``initial`` growing by ``factor`` up to ``cap``, each
    jittered down by up to half (so many clients restarting at once spread out).  Start a new iterator
    after a successful operation to reset it."""
    schedule = Backoff(base=initial, cap=cap, factor=factor, rng=rng or random.Random(), floor=0.5)
    while True:
        yield schedule.next_delay()
