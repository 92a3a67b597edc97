"""Ingress queue edges that mutation testing showed unchecked (docs/testing.md, "Mutation testing")."""

from __future__ import annotations

import pytest

from consumer_sdk.core.errors import ConfigError
from distributor.ingress import IngressQueue, Policy


def test_an_unknown_policy_names_the_choices() -> None:
    with pytest.raises(ConfigError) as info:
        Policy.parse("drop_all")
    assert str(info.value) == "unknown queue policy 'drop_all': expected one of drop_newest, drop_oldest, block"


def test_a_capacity_under_one_names_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        IngressQueue(0)
    assert str(info.value) == "ingress capacity must be at least 1, got 0"


@pytest.mark.parametrize("policy", list(Policy))
def test_a_queue_still_full_after_an_empty_take_counts_no_new_backpressure_event(policy: Policy) -> None:
    """One event per time the queue *turns* full: taking nothing leaves it full, so the next refusal is
    the same episode."""
    q: IngressQueue[int] = IngressQueue(2, policy)
    q.offer(1)
    q.offer(2)
    q.offer(3)
    assert q.stats().backpressure_events == 1
    assert list(q.take(0)) == []
    q.offer(4)
    assert q.stats().backpressure_events == 1
    assert len(q.take(1)) == 1  # room again: the next time it fills is a new episode
    q.offer(5)
    q.offer(6)
    assert q.stats().backpressure_events == 2


def test_taking_exactly_what_is_queued_empties_the_queue_in_order() -> None:
    q: IngressQueue[int] = IngressQueue(5)
    for i in range(3):
        q.offer(i)
    assert list(q.take(3)) == [0, 1, 2]
    assert len(q) == 0 and list(q.take(3)) == []
    q.offer(9)
    assert list(q.take(1)) == [9]
