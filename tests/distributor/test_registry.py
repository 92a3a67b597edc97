"""distributor.registry: which venue streams are wanted, kept, released after a grace period."""

from __future__ import annotations

import pytest

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import StreamName
from distributor import registry as registry_module
from distributor.registry import Changes, ChannelRegistry, parse_stream

GRACE = 30.0


def names(*texts: str) -> tuple[StreamName, ...]:
    return tuple(parse_stream(t) for t in texts)


def known(symbols: int = 3) -> list[str]:
    return [f"binance:S{i}USDT:{ch}" for i in range(symbols) for ch in ("trade", "book_ticker", "kline_1m")]


def test_public_names() -> None:
    assert set(registry_module.__all__) == {"ChannelRegistry", "Changes", "parse_stream"}


def test_parse_stream() -> None:
    assert parse_stream("binance:btcusdt:trade") == StreamName("binance", "BTCUSDT", "trade")
    s = StreamName("binance", "ETHUSDT", "kline_1m")
    assert parse_stream(s) is s
    with pytest.raises(ConfigError, match="without globs"):
        parse_stream("binance:*:trade")
    with pytest.raises(ConfigError):
        parse_stream("binance:BTCUSDT")


def test_nothing_wanted_nothing_to_do() -> None:
    reg = ChannelRegistry(known=known())
    ch = reg.tick(0.0)
    assert ch == Changes() and not ch
    assert reg.active() == frozenset() and reg.wanted() == frozenset()


def test_persisting_streams_are_subscribed_and_never_released() -> None:
    reg = ChannelRegistry(persist=["binance:BTCUSDT:trade"], grace=0)
    assert reg.tick(0.0) == Changes(subscribe=names("binance:BTCUSDT:trade"))
    reg.want("binance:BTCUSDT:trade")
    reg.release("binance:BTCUSDT:trade")
    assert reg.tick(1e6) == Changes()
    assert reg.active() == frozenset(names("binance:BTCUSDT:trade"))
    reg.remove_known(["binance:BTCUSDT:trade"])
    assert parse_stream("binance:BTCUSDT:trade") in reg.known()


def test_literal_asks_for_its_stream_even_unknown() -> None:
    reg = ChannelRegistry(known=known())
    reg.want("binance:xrpusdt:trade")
    assert reg.tick(0.0).subscribe == names("binance:XRPUSDT:trade")
    assert reg.tick(1.0) == Changes()  # done already


def test_glob_matches_known_streams_only() -> None:
    reg = ChannelRegistry(known=known(3))
    reg.want("binance:*:trade")
    assert reg.tick(0.0).subscribe == names("binance:S0USDT:trade", "binance:S1USDT:trade", "binance:S2USDT:trade")
    reg.add_known(["binance:S9USDT:trade", "binance:S9USDT:book_ticker"])
    assert reg.tick(1.0).subscribe == names("binance:S9USDT:trade")
    reg.want(["binance:S1*:kline_*"])
    assert reg.tick(2.0).subscribe == names("binance:S1USDT:kline_1m")
    assert reg.patterns() == {"binance:*:trade": 1, "binance:S1*:kline_*": 1}


def test_release_waits_for_the_grace_period() -> None:
    reg = ChannelRegistry(known=known(), grace=GRACE)
    reg.want("binance:S0USDT:*")
    assert len(reg.tick(0.0).subscribe) == 3
    reg.release("binance:S0USDT:*")
    assert reg.tick(10.0) == Changes()  # unwanted seen first at 10.0
    assert set(reg.releasing()) == set(reg.active()) and set(reg.releasing().values()) == {10.0}
    assert reg.tick(10.0 + GRACE - 0.001) == Changes()
    ch = reg.tick(10.0 + GRACE)
    assert ch.unsubscribe == names("binance:S0USDT:book_ticker", "binance:S0USDT:kline_1m", "binance:S0USDT:trade")
    assert ch.subscribe == ()
    assert reg.active() == frozenset() and reg.releasing() == {}


def test_wanted_again_within_grace_costs_nothing() -> None:
    reg = ChannelRegistry(known=known(), grace=GRACE)
    reg.want("binance:S1USDT:trade")
    reg.tick(0.0)
    reg.release("binance:S1USDT:trade")
    assert reg.tick(5.0) == Changes()
    reg.want("binance:*:trade")  # a glob that covers it
    assert reg.tick(6.0).subscribe == names("binance:S0USDT:trade", "binance:S2USDT:trade")
    assert reg.releasing() == {}
    assert reg.tick(6.0 + 10 * GRACE) == Changes()


def test_resubscribed_when_asked_again_after_release() -> None:
    reg = ChannelRegistry(known=known(), grace=0)
    reg.want("binance:S2USDT:trade")
    assert reg.tick(0.0).subscribe == names("binance:S2USDT:trade")
    reg.release("binance:S2USDT:trade")
    assert reg.tick(1.0).unsubscribe == names("binance:S2USDT:trade")
    reg.want("binance:S2USDT:trade")
    assert reg.tick(2.0) == Changes(subscribe=names("binance:S2USDT:trade"))


def test_reference_counted_patterns() -> None:
    reg = ChannelRegistry(known=known(), grace=0)
    reg.want("binance:S0USDT:trade")
    reg.want(["binance:S0USDT:trade", "binance:*:trade"])
    reg.tick(0.0)
    reg.release("binance:S0USDT:trade")
    reg.release("binance:*:trade")
    assert reg.tick(1.0) == Changes(unsubscribe=names("binance:S1USDT:trade", "binance:S2USDT:trade"))
    reg.release("binance:S0USDT:trade")
    assert reg.tick(2.0) == Changes(unsubscribe=names("binance:S0USDT:trade"))
    with pytest.raises(ConfigError, match="not wanted"):
        reg.release("binance:S0USDT:trade")
    reg.want("binance:S1USDT:trade")
    with pytest.raises(ConfigError, match="not wanted"):
        reg.release(["binance:S1USDT:trade", "binance:S1USDT:trade"])  # all or nothing
    assert reg.patterns() == {"binance:S1USDT:trade": 1}


def test_failed_subscriptions_are_asked_again() -> None:
    reg = ChannelRegistry(known=known(), grace=GRACE)
    reg.want("binance:S0USDT:trade")
    reg.tick(0.0)
    reg.failed(["binance:S0USDT:trade"])
    assert reg.active() == frozenset()
    assert reg.tick(1.0).subscribe == names("binance:S0USDT:trade")


def test_removed_known_stream_is_released_from_a_glob() -> None:
    reg = ChannelRegistry(known=known(2), grace=0)
    reg.want("binance:*:book_ticker")
    reg.tick(0.0)
    reg.remove_known(["binance:S1USDT:book_ticker"])
    assert reg.tick(1.0) == Changes(unsubscribe=names("binance:S1USDT:book_ticker"))


def test_bad_input() -> None:
    with pytest.raises(ConfigError, match="grace"):
        ChannelRegistry(grace=-1)
    with pytest.raises(ConfigError):
        ChannelRegistry(known=["binance:*:trade"])
    reg = ChannelRegistry()
    with pytest.raises(ConfigError):
        reg.want("not-a-pattern")
    assert reg.patterns() == {}


def test_suppressed_streams_are_released_after_grace_and_come_back_when_lifted() -> None:
    from distributor.registry import ChannelRegistry as Registry

    reg = Registry(known=["binance:BTCUSDT:trade", "binance:ETHUSDT:trade"],
                   persist=["binance:BTCUSDT:trade", "binance:ETHUSDT:trade"], grace=5.0)
    assert {str(s) for s in reg.tick(0.0).subscribe} == {"binance:BTCUSDT:trade", "binance:ETHUSDT:trade"}
    reg.suppress(["binance:BTCUSDT:*"])
    assert not reg.tick(1.0)
    assert [str(s) for s in reg.tick(6.0).unsubscribe] == ["binance:BTCUSDT:trade"]
    reg.suppress([])
    assert [str(s) for s in reg.tick(7.0).subscribe] == ["binance:BTCUSDT:trade"]
