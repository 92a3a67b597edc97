"""Reconnect policy edges that mutation testing showed unchecked (docs/testing.md, "Mutation testing").

The delay schedule's floor and the readers' default schedule, drawn at the ends of their ranges.

Which handshake statuses mean what, at their exact boundaries, the messages logged for each, and a
refusal after the session was live (retried, with an alarm) against one before (fatal).
"""

from __future__ import annotations

import random

import pytest

from consumer_sdk.core.backoff import Backoff, backoff_delays
from ingestor.lifecycle import REFUSALS, Failure, classify_failure, classify_status


class HandshakeRefused(Exception):
    def __init__(self, status: int, retry_after: str | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.retry_after = retry_after


@pytest.mark.parametrize("status", [418, 429])
def test_rate_limits_say_so(status: int) -> None:
    assert classify_status(status, "4") == Failure(f"venue rate limit: HTTP {status}", retry_after=4.0)


@pytest.mark.parametrize("status", [408, 500, 501, 503])
def test_timeouts_and_server_errors_say_the_venue_is_unavailable(status: int) -> None:
    assert classify_status(status, "2") == Failure(f"venue unavailable: HTTP {status}", retry_after=2.0)


@pytest.mark.parametrize("status", [301, 407, 409, 417, 419, 428, 430, 499])
def test_other_statuses_are_retried_as_they_are(status: int) -> None:
    """Neither a rate limit, an outage nor a refusal: retried after the venue's wait, if it gave one."""
    assert classify_status(status, "3") == Failure(f"venue answered HTTP {status}", retry_after=3.0)
    assert classify_status(status, None) == Failure(f"venue answered HTTP {status}")


@pytest.mark.parametrize("status", sorted(REFUSALS))
def test_a_refusal_before_the_session_was_ever_live_is_fatal(status: int) -> None:
    f = classify_status(status, "5")
    assert f.fatal and f.retry_after is None and not f.alarm
    assert f.message == f"venue refused the connection with HTTP {status}: check the URL and access"


@pytest.mark.parametrize("status", sorted(REFUSALS))
def test_a_refusal_after_the_session_was_live_is_retried_with_an_alarm(status: int) -> None:
    f = classify_status(status, "6", been_live=True)
    assert f == Failure(f"venue refused a reconnect: HTTP {status} (was live: retrying)", retry_after=6.0, alarm=True)
    assert classify_status(status, None, been_live=True).retry_after is None


def test_classify_failure_passes_on_whether_the_session_was_live() -> None:
    assert classify_failure(HandshakeRefused(404, "1"), been_live=True) == classify_status(404, "1", been_live=True)
    assert classify_failure(HandshakeRefused(404, "1")).fatal
    assert not classify_failure(HandshakeRefused(404, "1"), been_live=True).fatal


# -- the schedule itself (consumer_sdk.core.backoff) ----------------------------------------------------------


class Top(random.Random):
    """A generator that always draws the top of the range: each delay is its ceiling."""

    def random(self) -> float:
        return 1.0


class Bottom(random.Random):
    """A generator that always draws the bottom of the range: each delay is the floor of its ceiling."""

    def random(self) -> float:
        return 0.0


def test_full_jitter_is_the_default() -> None:
    assert Backoff().floor == 0.0
    assert Backoff(base=2.0, rng=Bottom()).next_delay() == 0.0


def test_a_floor_keeps_that_share_of_each_ceiling() -> None:
    b = Backoff(base=2.0, cap=8.0, rng=Bottom(), floor=0.5)
    assert [b.next_delay() for _ in range(4)] == [1.0, 2.0, 4.0, 4.0]
    b = Backoff(base=2.0, cap=8.0, rng=Top(), floor=0.5)
    assert [b.next_delay() for _ in range(4)] == [2.0, 4.0, 8.0, 8.0]
    spread = Backoff(base=2.0, cap=2.0, rng=random.Random(3), floor=0.25)
    delays = [spread.next_delay() for _ in range(500)]
    assert all(0.5 <= d <= 2.0 for d in delays) and min(delays) < 0.6


def test_backoff_delays_default_schedule() -> None:
    """From 0.05 s, times 1.8 each time, capped at 2 s; each at least half its ceiling."""
    top = backoff_delays(rng=Top())
    assert [next(top) for _ in range(9)] == pytest.approx(
        [0.05, 0.09, 0.162, 0.2916, 0.52488, 0.944784, 1.7006112, 2.0, 2.0]
    )
    bottom = backoff_delays(rng=Bottom())
    assert [next(bottom) for _ in range(3)] == pytest.approx([0.025, 0.045, 0.081])


def test_backoff_delays_use_the_generator_given() -> None:
    a = backoff_delays(rng=random.Random(9))
    b = backoff_delays(rng=random.Random(9))
    assert [next(a) for _ in range(10)] == [next(b) for _ in range(10)]
    unseeded = backoff_delays()
    assert all(0.025 <= next(unseeded) <= 2.0 for _ in range(50))
