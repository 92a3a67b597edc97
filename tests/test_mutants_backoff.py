"""Reconnect policy edges that mutation testing showed unchecked (docs/testing.md, "Mutation testing").

Which handshake statuses mean what, at their exact boundaries, the messages logged for each, and a
refusal after the session was live (retried, with an alarm) against one before (fatal).
"""

from __future__ import annotations

import pytest

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
