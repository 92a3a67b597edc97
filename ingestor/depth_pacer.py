"""REST snapshot requests paced across every symbol of a process, so a reconnect of many symbols at once cannot
get the IP banned.  Pure: no I/O, no clock (every call is given ``now``).

:class:`SnapshotPacer` keeps the snapshot requests under a share of the venue's request weight budget (the rest
stays for gap repairs), stops them all on a 429 or 418 until the venue's ``Retry-After``, and backs a failing
symbol off.  :func:`depth_weight` is what one depth snapshot costs, by market and ``limit``.  The
synchronization that asks for the snapshots is :mod:`ingestor.depth`.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from typing import Final

from consumer_sdk.core.backoff import Backoff
from ingestor.depth import DepthRule

__all__ = [
    "FUTURES_DEPTH_WEIGHTS",
    "FUTURES_WEIGHT_PER_MINUTE",
    "SPOT_WEIGHT_PER_MINUTE",
    "PacerStats",
    "SnapshotPacer",
    "depth_weight",
]

#: Binance spot's REST request weight per minute and IP (``exchangeInfo`` ``rateLimits``)
SPOT_WEIGHT_PER_MINUTE: Final = 6000
#: Binance USD-M and COIN-M futures' REST request weight per minute and IP
FUTURES_WEIGHT_PER_MINUTE: Final = 2400
#: ``/fapi/v1/depth`` and ``/dapi/v1/depth`` weight by ``limit`` (the only limits they take)
FUTURES_DEPTH_WEIGHTS: Final = {5: 2, 10: 2, 20: 2, 50: 2, 100: 5, 500: 10, 1000: 20}


def depth_weight(limit: int, rule: DepthRule | str = DepthRule.SPOT) -> int:
    """The request weight of a depth snapshot of ``limit`` levels a side; ValueError for a limit the venue
    refuses.  Spot ``/api/v3/depth``: 1-100 -> 5, 101-500 -> 25, 501-1000 -> 50, 1001-5000 -> 250."""
    if DepthRule(rule) is DepthRule.FUTURES:
        try:
            return FUTURES_DEPTH_WEIGHTS[limit]
        except KeyError:
            allowed = sorted(FUTURES_DEPTH_WEIGHTS)
            raise ValueError(f"futures depth limit must be one of {allowed}, got {limit}") from None
    if not 1 <= limit <= 5000:
        raise ValueError(f"spot depth limit must be 1 to 5000, got {limit}")
    return 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250


@dataclass(frozen=True, slots=True)
class PacerStats:
    """The pacer at one instant: weight spent in the window ending now, of ``budget``; requests granted; rate
    limit answers (429 and 418) and other failures seen; when every request is held until (0: not held);
    symbols backing off now."""

    budget: int
    spent: int
    granted: int
    rate_limited: int
    failures: int
    halted_until: float
    backing_off: int


class SnapshotPacer:
    """When the next snapshot request of a process may go, so a reconnect of many symbols at once cannot get the
    IP banned.  Pure: every call is given ``now`` (monotonic seconds, never going back).  One owner (the task
    that sends snapshot requests); memory O(requests in a window + symbols failing).

    - Budget: ``share`` of ``weight_per_minute`` in any ``window_s`` seconds, as a sliding log of what was
      granted: no span of ``window_s`` seconds, wherever it starts, holds more (Binance counts per clock minute,
      which this implies; a refilling bucket would let twice the budget through across a bucket's refill).
    - A 429 or 418 answer stops every request until ``Retry-After`` (``default_retry_after`` /
      ``default_ban`` seconds when the venue named none); a later, shorter one never shortens the stop.
    - Any other failure backs that symbol off: :class:`~consumer_sdk.core.backoff.Backoff` from
      ``backoff_base`` doubling to ``backoff_cap``, each delay at least half its ceiling; reset by a success.
    """

    __slots__ = (
        "_backoffs", "_failures", "_granted", "_halted_until", "_log", "_rate_limited", "_retry_at", "_rng",
        "backoff_base", "backoff_cap", "budget", "default_ban", "default_retry_after", "window_s",
    )

    def __init__(
        self, *, weight_per_minute: int = SPOT_WEIGHT_PER_MINUTE, share: float = 0.5, window_s: float = 60.0,
        backoff_base: float = 1.0, backoff_cap: float = 60.0, default_retry_after: float = 60.0,
        default_ban: float = 120.0, rng: random.Random | None = None,
    ) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share}")
        budget = int(weight_per_minute * share)
        if budget < 1 or window_s <= 0:
            raise ValueError(f"no budget: {weight_per_minute} x {share} per {window_s} s")
        self.budget = budget
        self.window_s = window_s
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.default_retry_after = default_retry_after
        self.default_ban = default_ban
        self._rng = rng or random.Random()
        #: ``(granted at, weight)``, oldest first, pruned to the window as requests are granted
        self._log: deque[tuple[float, int]] = deque()
        self._halted_until = 0.0
        self._backoffs: dict[str, Backoff] = {}
        self._retry_at: dict[str, float] = {}
        self._granted = self._rate_limited = self._failures = 0

    def next_allowed(self, now: float, weight: int, symbol: str | None = None) -> float:
        """The earliest time, ``now`` or later, a request of ``weight`` (for ``symbol``) may go.  O(grants in the
        window)."""
        if not 0 < weight <= self.budget:
            raise ValueError(f"weight {weight} outside 1..{self.budget} (the budget per window)")
        at = max(now, self._halted_until, self._retry_at.get(symbol, now) if symbol is not None else now)
        window = self.window_s
        spent = 0
        for granted_at, w in self._log:
            if at < granted_at + window:
                spent += w
        if spent + weight <= self.budget:
            return at
        # the oldest grants leave the window one by one; the first moment enough has left is the answer
        for granted_at, w in self._log:
            if at >= granted_at + window:
                continue
            spent -= w
            if spent + weight <= self.budget:
                return granted_at + window
        raise AssertionError("unreachable: an empty window always has room for a weight within the budget")

    def acquire(self, now: float, weight: int, symbol: str | None = None) -> bool:
        """Spend ``weight`` now when :meth:`next_allowed` permits it (True), else nothing (False)."""
        if self.next_allowed(now, weight, symbol) > now:
            return False
        log = self._log
        while log and now >= log[0][0] + self.window_s:
            log.popleft()
        log.append((now, weight))
        self._granted += 1
        return True

    def on_success(self, symbol: str) -> None:
        """``symbol``'s snapshot arrived: its backoff starts over."""
        self._backoffs.pop(symbol, None)
        self._retry_at.pop(symbol, None)

    def on_failure(
        self, symbol: str, now: float, *, status: int | None = None, retry_after: float | None = None
    ) -> float:
        """``symbol``'s request failed at ``now`` (HTTP ``status`` if one came, the venue's ``Retry-After`` in
        seconds if it named one): when that symbol may ask again."""
        if status in (418, 429):
            self._rate_limited += 1
            wait = retry_after
            if wait is None:
                wait = self.default_ban if status == 418 else self.default_retry_after
            self._halted_until = max(self._halted_until, now + wait)
            return max(self._halted_until, self._retry_at.get(symbol, now))
        self._failures += 1
        backoff = self._backoffs.get(symbol)
        if backoff is None:
            backoff = self._backoffs[symbol] = Backoff(
                base=self.backoff_base, cap=self.backoff_cap, rng=self._rng, floor=0.5
            )
        delay = backoff.next_delay()
        if retry_after is not None:
            delay = max(delay, retry_after)
        self._retry_at[symbol] = now + delay
        return max(self._halted_until, now + delay)

    def stats(self, now: float) -> PacerStats:
        spent = sum(w for at, w in self._log if now < at + self.window_s)
        halted = self._halted_until if self._halted_until > now else 0.0
        backing_off = sum(1 for at in self._retry_at.values() if at > now)
        return PacerStats(self.budget, spent, self._granted, self._rate_limited, self._failures, halted, backing_off)
