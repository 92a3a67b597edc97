"""The venue connection's lifecycle and error policy: pure, no I/O.

States: ``connecting -> subscribing -> live -> (rotating ->) live | backing_off -> connecting``,
``closed`` at the end.  :class:`Lifecycle` refuses a transition that the picture does not
allow (a bug, not a venue fault) and keeps the reason of the last one.

:class:`RateWindow` keeps a venue's limit of so many actions per so many seconds (OKX: 3 new connections a
second, 480 subscribe operations an hour per connection): it says how long to wait before the next.

:func:`classify_failure` decides what an error means: retry after the backoff delay, retry
after the venue's ``Retry-After``, or stop with a clear message because retrying cannot help.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = [
    "Failure", "Lifecycle", "RateWindow", "SessionState", "classify_failure", "classify_status", "parse_retry_after",
]


class SessionState(StrEnum):
    CONNECTING = "connecting"
    SUBSCRIBING = "subscribing"
    LIVE = "live"
    ROTATING = "rotating"
    BACKING_OFF = "backing_off"
    CLOSED = "closed"


_ALLOWED: Final[dict[SessionState, frozenset[SessionState]]] = {
    SessionState.CONNECTING: frozenset({SessionState.SUBSCRIBING, SessionState.BACKING_OFF, SessionState.CLOSED}),
    SessionState.SUBSCRIBING: frozenset({SessionState.LIVE, SessionState.BACKING_OFF, SessionState.CLOSED}),
    SessionState.LIVE: frozenset({SessionState.ROTATING, SessionState.BACKING_OFF, SessionState.CLOSED}),
    SessionState.ROTATING: frozenset({SessionState.LIVE, SessionState.BACKING_OFF, SessionState.CLOSED}),
    SessionState.BACKING_OFF: frozenset({SessionState.CONNECTING, SessionState.CLOSED}),
    SessionState.CLOSED: frozenset(),
}

#: numeric state for the ``market_connection_state`` gauge
STATE_CODES: Final = {s: i for i, s in enumerate(SessionState)}


class Lifecycle:
    __slots__ = ("reason", "state", "transitions")

    def __init__(self) -> None:
        self.state = SessionState.CONNECTING
        self.reason = "start"
        self.transitions = 0

    def to(self, state: SessionState, reason: str) -> SessionState:
        if state not in _ALLOWED[self.state]:
            raise RuntimeError(f"connection lifecycle: {self.state} -> {state} is not a valid transition ({reason})")
        previous = self.state
        self.state = state
        self.reason = reason
        self.transitions += 1
        return previous


@dataclass(frozen=True, slots=True)
class Failure:
    """What to do about an error: ``fatal`` stops the session with ``message``; otherwise retry,
    after ``retry_after`` seconds when the venue said so, else after the backoff delay.  ``alarm``
    asks for the retry to be logged at error level (something a person should know about now).

    ``fatal`` is the venue connection's side of the project's one split (:mod:`consumer_sdk.core.errors`:
    a :class:`~consumer_sdk.core.errors.Fatal` error, retrying will not help; otherwise a
    :class:`~consumer_sdk.core.errors.Retryable` one)."""

    message: str
    fatal: bool = False
    retry_after: float | None = None
    alarm: bool = False


def parse_retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds: negative means now; garbage, infinity and NaN mean not given."""
    if not value:
        return None
    try:
        wait = float(value)
    except ValueError:
        return None
    return max(0.0, wait) if math.isfinite(wait) else None


#: handshake refusals that prove a wrong URL or a blocked client, but only before the URL ever worked
REFUSALS: Final = frozenset({400, 401, 403, 404, 405, 410, 414})


def classify_status(status: int, retry_after: str | None, *, been_live: bool = False) -> Failure:
    """An HTTP status refusing the WebSocket handshake.

    A refusal (:data:`REFUSALS`) is fatal only while the session has never been live with this URL:
    once it has, the URL and the access were right, and a 404 or 403 on a reconnect is an error page
    from a proxy or load balancer during an outage, retried like any other.
    """
    wait = parse_retry_after(retry_after)
    if status in (418, 429):
        return Failure(f"venue rate limit: HTTP {status}", retry_after=wait)
    if status >= 500 or status == 408:
        return Failure(f"venue unavailable: HTTP {status}", retry_after=wait)
    if status in REFUSALS:
        if been_live:
            return Failure(
                f"venue refused a reconnect: HTTP {status} (was live: retrying)", retry_after=wait, alarm=True
            )
        return Failure(f"venue refused the connection with HTTP {status}: check the URL and access", fatal=True)
    return Failure(f"venue answered HTTP {status}", retry_after=wait)


def classify_failure(exc: BaseException, *, been_live: bool = False) -> Failure:
    """Any exception out of connect/read (the websockets adapter maps library errors to these)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return classify_status(status, getattr(exc, "retry_after", None), been_live=been_live)
    return Failure(f"{type(exc).__name__}: {exc}")


class RateWindow:
    """At most ``limit`` actions in any ``window_s`` seconds: :meth:`reserve` books the next one and says how long
    to wait before taking it.  Pure (the clock is passed in); one owner, or callers on one event loop."""

    __slots__ = ("_times", "limit", "window_s")

    def __init__(self, limit: int, window_s: float) -> None:
        if limit < 1 or not window_s > 0:
            raise ValueError("limit must be at least 1 and window_s above 0")
        self.limit = limit
        self.window_s = window_s
        #: when the last ``limit`` actions are (or were) taken, oldest first
        self._times: deque[float] = deque(maxlen=limit)

    def reserve(self, now: float) -> float:
        """Book an action: 0 when it may be taken now, else the seconds to wait (it is booked for then)."""
        times = self._times
        at = now
        if len(times) == self.limit:
            at = max(now, times[0] + self.window_s)
        times.append(at)
        return at - now
