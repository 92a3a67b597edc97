"""consumer_sdk: read market-data ticks from Redis Streams.

Light on purpose: it depends on redis and orjson only, never on the ingestor.
"""

from consumer_sdk.consumer import Consumer, ConsumerStats, GapHook, Handler, InvalidHook, TrimmedHook
from consumer_sdk.errors import ConfigError, InvalidTick, MarketError, TransientError, TrimmedError
from consumer_sdk.keys import DEFAULT_PREFIX, Pattern, StreamName, entry_id, parse_entry_id, parse_key, stream_key
from consumer_sdk.replay import Bound, follow, parse_bound, read_range, republish, resolve_bound
from consumer_sdk.sequencing import SeqTracker, Verdict
from consumer_sdk.tick import (
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

__all__ = [
    "DEFAULT_PREFIX",
    "SCHEMA_VERSION",
    "AggTradeTick",
    "BookTickerTick",
    "Bound",
    "ConfigError",
    "Consumer",
    "ConsumerStats",
    "GapHook",
    "Handler",
    "InvalidHook",
    "InvalidTick",
    "KlineTick",
    "MarketError",
    "Pattern",
    "SeqTracker",
    "StreamName",
    "Tick",
    "TradeTick",
    "TransientError",
    "TrimmedError",
    "TrimmedHook",
    "Verdict",
    "decode_tick",
    "encode_tick",
    "entry_id",
    "follow",
    "is_valid_channel",
    "parse_bound",
    "parse_entry_id",
    "parse_key",
    "read_range",
    "republish",
    "resolve_bound",
    "stream_key",
]
