"""consumer_sdk: read market-data ticks from Redis Streams.

Light on purpose: it depends on redis and orjson only, never on the ingestor.  The shared kernel (tick
model, keys, errors, sequencing, latency, backoff, logging, Redis helpers) is :mod:`consumer_sdk.core`,
which the ingestor and the distributor import too; this module re-exports the public part of it and of
the consumer, replay and order-book reader (:mod:`consumer_sdk.book_reader`) modules.  Names are resolved on
first use, so importing :mod:`consumer_sdk.core` (as the ingestor and the ``market`` command do) does not load
the consumer.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from consumer_sdk.book_reader import (
        MAX_DEPTH_ENTRY_BYTES,
        BookAt,
        BookUpdate,
        LiveBook,
        NoBook,
        book_at,
        follow_books,
    )
    from consumer_sdk.consumer import Consumer, ConsumerStats, GapHook, InvalidHook, TrimmedHook
    from consumer_sdk.core.errors import (
        ConfigError,
        Fatal,
        InvalidTick,
        MarketError,
        Retryable,
        TransientError,
        TrimmedError,
    )
    from consumer_sdk.core.handler import Handler
    from consumer_sdk.core.keys import (
        DEFAULT_PREFIX,
        Pattern,
        StreamName,
        entry_id,
        parse_entry_id,
        parse_key,
        stream_key,
    )
    from consumer_sdk.core.sequencing import SeqTracker, Verdict
    from consumer_sdk.core.tick import (
        SCHEMA_VERSION,
        AggTradeTick,
        BookTickerTick,
        KlineTick,
        Tick,
        TradeTick,
        decode_tick,
        encode_tick,
        is_valid_channel,
    )
    from consumer_sdk.replay import Bound, follow, parse_bound, read_range, republish, resolve_bound

#: where each public name lives
_SOURCES: dict[str, str] = {
    **dict.fromkeys(
        ("MAX_DEPTH_ENTRY_BYTES", "BookAt", "BookUpdate", "LiveBook", "NoBook", "book_at", "follow_books"),
        "consumer_sdk.book_reader",
    ),
    **dict.fromkeys(("Consumer", "ConsumerStats", "GapHook", "InvalidHook", "TrimmedHook"), "consumer_sdk.consumer"),
    **dict.fromkeys(
        ("ConfigError", "Fatal", "InvalidTick", "MarketError", "Retryable", "TransientError", "TrimmedError"),
        "consumer_sdk.core.errors",
    ),
    "Handler": "consumer_sdk.core.handler",
    **dict.fromkeys(
        ("DEFAULT_PREFIX", "Pattern", "StreamName", "entry_id", "parse_entry_id", "parse_key", "stream_key"),
        "consumer_sdk.core.keys",
    ),
    **dict.fromkeys(("SeqTracker", "Verdict"), "consumer_sdk.core.sequencing"),
    **dict.fromkeys(
        (
            "SCHEMA_VERSION",
            "AggTradeTick",
            "BookTickerTick",
            "KlineTick",
            "Tick",
            "TradeTick",
            "decode_tick",
            "encode_tick",
            "is_valid_channel",
        ),
        "consumer_sdk.core.tick",
    ),
    **dict.fromkeys(
        ("Bound", "follow", "parse_bound", "read_range", "republish", "resolve_bound"), "consumer_sdk.replay"
    ),
}

__all__ = [
    "DEFAULT_PREFIX",
    "MAX_DEPTH_ENTRY_BYTES",
    "SCHEMA_VERSION",
    "AggTradeTick",
    "BookAt",
    "BookTickerTick",
    "BookUpdate",
    "Bound",
    "ConfigError",
    "Consumer",
    "ConsumerStats",
    "Fatal",
    "GapHook",
    "Handler",
    "InvalidHook",
    "InvalidTick",
    "KlineTick",
    "LiveBook",
    "MarketError",
    "NoBook",
    "Pattern",
    "Retryable",
    "SeqTracker",
    "StreamName",
    "Tick",
    "TradeTick",
    "TransientError",
    "TrimmedError",
    "TrimmedHook",
    "Verdict",
    "book_at",
    "decode_tick",
    "encode_tick",
    "entry_id",
    "follow",
    "follow_books",
    "is_valid_channel",
    "parse_bound",
    "parse_entry_id",
    "parse_key",
    "read_range",
    "republish",
    "resolve_bound",
    "stream_key",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (one dict lookup and an import) and keep the name here."""
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'consumer_sdk' has no attribute {name!r}")
    value = getattr(importlib.import_module(source), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
