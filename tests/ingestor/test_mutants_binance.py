"""Binance parsing edges that mutation testing showed unchecked (docs/testing.md, "Mutation testing").

Id zero, frames that look like a reply or a spot book ticker without being one, a shutdown notice
without a time, and error messages that name the problem (they end up in the logs, one line each).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ingestor.binance import MalformedFrame, Reply, ServerShutdown, parse_frame, stream_to_channel

TS = 1_700_000_000_000_000


def frame(obj: Any) -> bytes:
    return orjson.dumps(obj)


def test_id_zero_is_a_valid_trade_id() -> None:
    tick = parse_frame(frame({"e": "trade", "s": "BTCUSDT", "t": 0, "T": 0, "p": "1", "q": "2", "m": False}), TS)
    assert isinstance(tick, dict)
    assert (tick["seq"], tick.get("trade_id"), tick["ts_event"]) == (0, 0, 0)


@pytest.mark.parametrize("bad", [-1, 1.5, "7", True, None])
def test_an_id_that_is_not_a_non_negative_int_is_named_in_the_error(bad: Any) -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(frame({"e": "trade", "s": "BTCUSDT", "t": bad, "T": 1, "p": "1", "q": "2", "m": False}), TS)
    assert str(info.value) == f"expected a non-negative integer, got {bad!r}"


def test_a_price_that_is_not_a_string_is_named_in_the_error() -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(frame({"e": "trade", "s": "BTCUSDT", "t": 1, "T": 1, "p": 1.5, "q": "2", "m": False}), TS)
    assert str(info.value) == "expected a decimal string, got 1.5"


def test_a_side_flag_that_is_not_a_boolean_is_named_in_the_error() -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(frame({"e": "trade", "s": "BTCUSDT", "t": 1, "T": 1, "p": "1", "q": "2", "m": 0}), TS)
    assert str(info.value) == "expected a boolean, got 0"


def test_frames_that_are_not_json_objects_say_so() -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(b"{nope", TS)
    assert str(info.value).startswith("not JSON: ")
    with pytest.raises(MalformedFrame) as info:
        parse_frame(b"[1, 2]", TS)
    assert str(info.value) == "not a JSON object"


def test_a_missing_field_is_named_in_the_error() -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(frame({"e": "trade", "s": "BTCUSDT", "T": 1, "p": "1", "q": "2", "m": False}), TS)
    assert str(info.value) == "missing or bad field 't'"


def test_a_spot_book_ticker_is_recognised_by_its_update_id_and_bid() -> None:
    """Spot book tickers carry no ``e``: ``u`` and ``b`` identify them; one lacking ``B`` is malformed."""
    tick = parse_frame(frame({"u": 5, "s": "BTCUSDT", "b": "1", "B": "2", "a": "3", "A": "4"}), TS)
    assert isinstance(tick, dict) and tick["channel"] == "book_ticker" and tick["ts_event"] == TS
    with pytest.raises(MalformedFrame, match="'B'"):
        parse_frame(frame({"u": 5, "s": "BTCUSDT", "b": "1", "a": "3", "A": "4"}), TS)
    # without a bid it is not a book ticker: an event we do not carry
    assert parse_frame(frame({"u": 5, "s": "BTCUSDT", "B": "2", "a": "3", "A": "4"}), TS) is None


def test_only_an_id_with_a_result_or_an_error_is_a_reply() -> None:
    assert parse_frame(frame({"id": 4}), TS) is None
    assert parse_frame(frame({"result": None}), TS) is None
    assert parse_frame(frame({"error": {"code": 1}}), TS) is None
    assert parse_frame(frame({"id": 4, "error": {"code": 1}}), TS) == Reply(id=4, error={"code": 1})


def test_a_shutdown_notice_without_a_time_is_time_zero() -> None:
    assert parse_frame(frame({"e": "serverShutdown"}), TS) == ServerShutdown(0)


def test_a_stream_name_has_exactly_one_at_sign() -> None:
    assert stream_to_channel("btcusdt@trade") == ("BTCUSDT", "trade")
    with pytest.raises(ValueError) as info:
        stream_to_channel("btc@usdt@trade")
    assert str(info.value) == "not a stream this project carries: 'btc@usdt@trade'"
