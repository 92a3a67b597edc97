"""consumer_sdk.core.backoff, ingestor.lifecycle and ingestor.subscriptions: pure code, fed by hand.

Expected values are written out here from the documented behaviour (full jitter under a growing,
capped ceiling; the lifecycle picture; Binance's 1024-streams-a-connection limit), never read
back from the module's own tables.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from consumer_sdk.core.backoff import Backoff, backoff_delays
from consumer_sdk.core.errors import ConfigError
from ingestor.lifecycle import Failure, Lifecycle, RateWindow, SessionState, classify_failure, classify_status
from ingestor.subscriptions import plan_connections, subscribe_requests

S = SessionState

# ------------------------------------------------------------------------------------------------
# Backoff


def documented_ceiling(base: float, cap: float, factor: float, n: int) -> float:
    return min(cap, base * factor**n)


def test_backoff_defaults() -> None:
    b = Backoff()
    assert (b.base, b.cap, b.factor, b.attempt) == (0.1, 30.0, 2.0, 0)
    assert b.ceiling() == 0.1


def test_first_delay_is_at_most_base() -> None:
    for seed in range(200):
        b = Backoff(base=0.5, cap=30.0, rng=random.Random(seed))
        assert 0.0 <= b.next_delay() <= 0.5


def test_every_delay_within_growing_ceiling_and_ceiling_reaches_cap_and_stays() -> None:
    b = Backoff(base=0.1, cap=5.0, factor=2.0, rng=random.Random(7))
    ceilings = []
    for n in range(40):
        ceiling = b.ceiling()
        assert ceiling == pytest.approx(documented_ceiling(0.1, 5.0, 2.0, n))
        delay = b.next_delay()
        assert 0.0 <= delay <= ceiling
        ceilings.append(ceiling)
    # 0.1 * 2**6 = 6.4 > 5: capped from the seventh attempt on, and never grows past it
    assert ceilings[:6] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    assert all(c == 5.0 for c in ceilings[6:])
    assert ceilings == sorted(ceilings)


def test_jitter_is_full_spread_over_zero_to_ceiling() -> None:
    """Full jitter: at the cap, delays spread over the whole [0, cap], not bunched near it."""
    b = Backoff(base=1.0, cap=10.0, rng=random.Random(1), attempt=50)
    delays = [b.next_delay() for _ in range(500)]
    assert all(0.0 <= d <= 10.0 for d in delays)
    assert min(delays) < 0.5
    assert max(delays) > 9.5
    assert 4.0 < sum(delays) / len(delays) < 6.0
    assert len(set(delays)) == len(delays)  # not one fixed value


def test_same_seed_same_delays() -> None:
    a = Backoff(rng=random.Random(42))
    b = Backoff(rng=random.Random(42))
    assert [a.next_delay() for _ in range(20)] == [b.next_delay() for _ in range(20)]


def test_reset_brings_ceiling_back_to_base() -> None:
    b = Backoff(base=0.2, cap=3.0, rng=random.Random(3))
    for _ in range(10):
        b.next_delay()
    assert b.ceiling() == 3.0
    b.reset()
    assert b.attempt == 0
    assert b.ceiling() == 0.2
    assert 0.0 <= b.next_delay() <= 0.2
    assert b.ceiling() == pytest.approx(0.4)


def test_thousands_of_failures_in_a_row_stay_capped() -> None:
    b = Backoff(base=0.1, cap=30.0, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(5000)]
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert b.ceiling() == 30.0
    b.reset()
    assert b.ceiling() == 0.1


def test_backoff_delays_are_capped_jittered_and_growing() -> None:
    delays = backoff_delays(initial=0.05, factor=2.0, cap=2.0, rng=random.Random(1))
    seq = [next(delays) for _ in range(20)]
    assert all(0.025 <= d <= 2.0 for d in seq)
    assert seq[0] <= 0.05 and max(seq[-5:]) > 1.0
    assert len({round(d, 6) for d in seq[-5:]}) > 1  # jittered, not a constant


def test_cap_below_base_caps_the_first_delay_too() -> None:
    b = Backoff(base=5.0, cap=1.0, rng=random.Random(0))
    assert b.ceiling() == 1.0
    assert all(0.0 <= b.next_delay() <= 1.0 for _ in range(20))


@settings(max_examples=150, deadline=None)
@given(
    base=st.floats(min_value=0.001, max_value=10.0),
    cap=st.floats(min_value=0.001, max_value=300.0),
    factor=st.floats(min_value=1.0, max_value=8.0),
    seed=st.integers(min_value=0, max_value=2**32),
    steps=st.integers(min_value=1, max_value=80),
)
def test_delays_stay_within_documented_bounds(base: float, cap: float, factor: float, seed: int, steps: int) -> None:
    b = Backoff(base=base, cap=cap, factor=factor, rng=random.Random(seed))
    for n in range(steps):
        bound = documented_ceiling(base, cap, factor, n)
        assert b.ceiling() <= bound * (1 + 1e-12)
        delay = b.next_delay()
        assert 0.0 <= delay <= bound * (1 + 1e-12)
    b.reset()
    assert b.ceiling() == min(cap, base)


@settings(max_examples=150, deadline=None)
@given(
    base=st.floats(min_value=0.001, max_value=10.0),
    ratio=st.floats(min_value=1.0, max_value=1e5),
    factor=st.floats(min_value=1.05, max_value=8.0),
    seed=st.integers(min_value=0, max_value=2**32),
)
@example(base=1.0, ratio=2000.0, factor=1.125, seed=0)  # needs 65 doublings by 1.125 to pass the cap
def test_ceiling_reaches_cap_and_stays(base: float, ratio: float, factor: float, seed: int) -> None:
    """``base * factor**n`` passes ``cap`` after ``ceil(log(cap/base)/log(factor))`` attempts; the
    ceiling must be the cap from then on, and never above it."""
    cap = base * ratio
    b = Backoff(base=base, cap=cap, factor=factor, rng=random.Random(seed))
    reach = math.ceil(math.log(ratio) / math.log(factor)) + 1
    for _ in range(reach):
        assert b.ceiling() <= cap
        b.next_delay()
    for _ in range(5):
        assert b.ceiling() == pytest.approx(cap, rel=1e-9)
        assert 0.0 <= b.next_delay() <= cap
    b.reset()
    assert b.ceiling() == pytest.approx(base)


# ------------------------------------------------------------------------------------------------
# Lifecycle

#: the picture: connecting -> subscribing -> live -> (rotating ->) live | backing_off -> connecting;
#: closed at the end, from anywhere, and nothing after it
ALLOWED = {
    S.CONNECTING: {S.SUBSCRIBING, S.BACKING_OFF, S.CLOSED},
    S.SUBSCRIBING: {S.LIVE, S.BACKING_OFF, S.CLOSED},
    S.LIVE: {S.ROTATING, S.BACKING_OFF, S.CLOSED},
    S.ROTATING: {S.LIVE, S.BACKING_OFF, S.CLOSED},
    S.BACKING_OFF: {S.CONNECTING, S.CLOSED},
    S.CLOSED: set(),
}

#: a valid path from the initial state to each state
PATH_TO = {
    S.CONNECTING: [],
    S.SUBSCRIBING: [S.SUBSCRIBING],
    S.LIVE: [S.SUBSCRIBING, S.LIVE],
    S.ROTATING: [S.SUBSCRIBING, S.LIVE, S.ROTATING],
    S.BACKING_OFF: [S.BACKING_OFF],
    S.CLOSED: [S.CLOSED],
}


def lifecycle_in(state: SessionState) -> Lifecycle:
    lc = Lifecycle()
    for step in PATH_TO[state]:
        lc.to(step, f"to {step}")
    assert lc.state is state
    return lc


def test_lifecycle_starts_connecting() -> None:
    lc = Lifecycle()
    assert lc.state is S.CONNECTING
    assert lc.reason == "start"
    assert lc.transitions == 0


def test_state_values_are_the_documented_names() -> None:
    assert {s.value for s in S} == {"connecting", "subscribing", "live", "rotating", "backing_off", "closed"}


@pytest.mark.parametrize(
    ("source", "target"),
    [(a, b) for a, targets in ALLOWED.items() for b in sorted(targets)],
    ids=str,
)
def test_allowed_transition(source: SessionState, target: SessionState) -> None:
    lc = lifecycle_in(source)
    before = lc.transitions
    previous = lc.to(target, "because")
    assert previous is source
    assert lc.state is target
    assert lc.reason == "because"
    assert lc.transitions == before + 1


@pytest.mark.parametrize(
    ("source", "target"),
    [(a, b) for a, b in itertools.product(S, S) if b not in ALLOWED[a]],
    ids=str,
)
def test_refused_transition_raises_and_changes_nothing(source: SessionState, target: SessionState) -> None:
    lc = lifecycle_in(source)
    state, reason, count = lc.state, lc.reason, lc.transitions
    with pytest.raises(RuntimeError) as info:
        lc.to(target, "the reason given")
    message = str(info.value)
    assert str(source) in message
    assert str(target) in message
    assert "the reason given" in message
    assert (lc.state, lc.reason, lc.transitions) == (state, reason, count)


def test_full_cycle_with_rotation_and_reconnect() -> None:
    lc = Lifecycle()
    for step in (S.SUBSCRIBING, S.LIVE, S.ROTATING, S.LIVE, S.BACKING_OFF, S.CONNECTING, S.SUBSCRIBING, S.LIVE,
                 S.CLOSED):
        lc.to(step, str(step))
    assert lc.state is S.CLOSED
    assert lc.transitions == 9


# ------------------------------------------------------------------------------------------------
# classify_status / classify_failure


@pytest.mark.parametrize("status", [418, 429])
def test_rate_limit_is_retryable_and_honours_retry_after(status: int) -> None:
    f = classify_status(status, "7")
    assert isinstance(f, Failure)
    assert not f.fatal
    assert f.retry_after == 7.0
    assert str(status) in f.message
    assert classify_status(status, "1.5").retry_after == 1.5
    assert classify_status(status, " 12 ").retry_after == 12.0
    assert classify_status(status, None).retry_after is None
    assert not classify_status(status, None).fatal


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504, 599])
def test_server_errors_and_request_timeout_are_retryable(status: int) -> None:
    f = classify_status(status, None)
    assert not f.fatal
    assert f.retry_after is None
    assert str(status) in f.message
    assert classify_status(status, "3").retry_after == 3.0


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_fatal(status: int) -> None:
    f = classify_status(status, "5")
    assert f.fatal
    assert f.retry_after is None
    assert str(status) in f.message


@pytest.mark.parametrize("header", ["", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "5s", "1,5", "0x10"])
@pytest.mark.parametrize("status", [429, 418, 503])
def test_garbage_retry_after_is_ignored(status: int, header: str) -> None:
    f = classify_status(status, header)
    assert not f.fatal
    assert f.retry_after is None


def test_negative_retry_after_means_no_wait() -> None:
    assert classify_status(429, "-3").retry_after == 0.0


@pytest.mark.parametrize("header", ["inf", "Infinity", "1e999", "nan", "NaN"])
def test_non_finite_retry_after_is_ignored(header: str) -> None:
    """A Retry-After of ``inf`` must not become an endless sleep, nor ``nan`` a zero wait."""
    f = classify_status(429, header)
    assert f.retry_after is None, f"Retry-After {header!r} gave retry_after={f.retry_after!r}"


class StatusError(Exception):
    def __init__(self, message: str, status: object, retry_after: object = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class StatusOnly(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


def test_classify_failure_reads_status_and_retry_after() -> None:
    assert classify_failure(StatusError("x", 429, "9")) == classify_status(429, "9")
    assert classify_failure(StatusError("x", 429, "9")).retry_after == 9.0
    assert classify_failure(StatusError("x", 403)).fatal
    assert classify_failure(StatusError("x", 503, "junk")) == Failure(
        classify_status(503, None).message, fatal=False, retry_after=None
    )


def test_classify_failure_with_status_but_no_retry_after_attribute() -> None:
    f = classify_failure(StatusOnly(429))
    assert not f.fatal
    assert f.retry_after is None
    assert classify_failure(StatusOnly(401)).fatal


@pytest.mark.parametrize("status", ["429", None, 429.0])
def test_classify_failure_ignores_a_status_that_is_not_an_int(status: object) -> None:
    f = classify_failure(StatusError("odd", status, "5"))
    assert f == Failure("StatusError: odd")


@pytest.mark.parametrize(
    "exc",
    [ConnectionResetError("peer reset"), TimeoutError("no pong"), OSError("network down"), EOFError("gone")],
)
def test_plain_exceptions_are_retryable_after_backoff(exc: BaseException) -> None:
    f = classify_failure(exc)
    assert not f.fatal
    assert f.retry_after is None
    assert f.message == f"{type(exc).__name__}: {exc}"


# ------------------------------------------------------------------------------------------------
# plan_connections / subscribe_requests


def names(n: int) -> list[str]:
    return [f"sym{i:05d}@trade" for i in range(n)]


def test_two_thousand_streams_make_two_connections_of_a_thousand() -> None:
    streams = names(2000)
    plan = plan_connections(streams, 1024)
    assert [len(g) for g in plan] == [1000, 1000]
    assert [s for g in plan for s in g] == streams


def test_default_max_is_binance_limit() -> None:
    assert [len(g) for g in plan_connections(names(1024))] == [1024]
    assert len(plan_connections(names(1025))) == 2


def test_duplicates_removed_order_kept() -> None:
    streams = ["b@trade", "a@trade", "b@trade", "c@trade", "a@trade", "d@trade"]
    plan = plan_connections(streams, 2)
    assert [s for g in plan for s in g] == ["b@trade", "a@trade", "c@trade", "d@trade"]
    assert all(len(g) <= 2 for g in plan)


def test_no_streams_no_connections() -> None:
    assert plan_connections([], 1024) == []


@pytest.mark.parametrize("bad", [0, -1])
def test_max_per_connection_below_one_is_a_config_error(bad: int) -> None:
    with pytest.raises(ConfigError, match="max_per_connection"):
        plan_connections(["a@trade"], bad)


@settings(max_examples=200, deadline=None)
@given(
    streams=st.lists(st.integers(min_value=0, max_value=300).map(lambda i: f"s{i}@trade"), max_size=600),
    max_per=st.integers(min_value=1, max_value=64),
)
def test_plan_covers_every_stream_once_within_the_limit(streams: list[str], max_per: int) -> None:
    plan = plan_connections(streams, max_per)
    unique = list(dict.fromkeys(streams))
    flat = [s for g in plan for s in g]
    assert flat == unique  # every stream exactly once, first-seen order
    assert all(1 <= len(g) <= max_per for g in plan)
    assert len(plan) == -(-len(unique) // max_per)  # no more connections than needed


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=1, max_value=600), max_per=st.integers(min_value=1, max_value=64))
def test_plan_is_as_even_as_possible(n: int, max_per: int) -> None:
    """The docstring promises groups "as evenly as possible": sizes differ by at most one."""
    sizes = [len(g) for g in plan_connections(names(n), max_per)]
    assert max(sizes) - min(sizes) <= 1, f"{n} streams, max {max_per}: sizes {sizes}"


def test_subscribe_requests_chunks_and_numbers() -> None:
    streams = names(450)
    reqs = subscribe_requests(streams, 7)
    assert [r["id"] for r in reqs] == [7, 8, 9]
    assert [len(r["params"]) for r in reqs] == [200, 200, 50]
    assert all(r["method"] == "SUBSCRIBE" for r in reqs)
    assert [s for r in reqs for s in r["params"]] == streams
    assert all(set(r) == {"method", "params", "id"} for r in reqs)


def test_subscribe_requests_custom_size_and_method() -> None:
    reqs = subscribe_requests(("a@trade", "b@trade", "c@trade"), 1, per_request=2, method="UNSUBSCRIBE")
    assert reqs == [
        {"method": "UNSUBSCRIBE", "params": ["a@trade", "b@trade"], "id": 1},
        {"method": "UNSUBSCRIBE", "params": ["c@trade"], "id": 2},
    ]
    assert isinstance(reqs[0]["params"], list)


def test_subscribe_requests_empty() -> None:
    assert subscribe_requests([], 1) == []


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(min_value=0, max_value=1100),
    per=st.integers(min_value=1, max_value=300),
    first=st.integers(min_value=0, max_value=10**6),
)
def test_subscribe_requests_properties(n: int, per: int, first: int) -> None:
    streams = names(n)
    reqs = subscribe_requests(streams, first, per_request=per)
    assert len(reqs) == -(-n // per)
    assert [r["id"] for r in reqs] == list(range(first, first + len(reqs)))
    assert all(1 <= len(r["params"]) <= per for r in reqs)
    assert [s for r in reqs for s in r["params"]] == streams


def test_rate_windows_space_actions_under_the_limit() -> None:
    connects = RateWindow(3, 1.0)  # OKX: 3 new connections a second
    assert [connects.reserve(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert connects.reserve(0.1) == pytest.approx(0.9)  # the fourth in a second waits for the first's second to end
    assert connects.reserve(0.2) == pytest.approx(0.8)
    assert connects.reserve(5.0) == 0.0
    ops = RateWindow(480, 3600.0)  # OKX: 480 subscribe operations an hour per connection
    waits = [ops.reserve(float(i)) for i in range(481)]
    assert waits[:480] == [0.0] * 480 and waits[480] == pytest.approx(3600.0 - 480)
    one = RateWindow(1, 1.0)  # an action booked for later counts from when it is taken, not from when it was asked
    assert [one.reserve(0.0), one.reserve(0.0), one.reserve(0.0)] == [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="limit must be at least 1 and window_s above 0"):
        RateWindow(0, 1.0)
    with pytest.raises(ValueError, match="limit must be at least 1 and window_s above 0"):
        RateWindow(1, 0.0)
