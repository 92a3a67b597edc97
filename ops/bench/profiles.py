"""The load the whole-path bench offers and the bars it is judged by: markets, schedules, targets, limits.

Pure constants, imported by every other part of :mod:`ops.bench`; this module imports nothing of the
project.  ``QUICK_*`` are ``market bench --quick``'s rates, ``FULL_*`` the default run's.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CHANNELS",
    "CONSUMER_COUNT",
    "FULL_PEAK_SCHEDULE",
    "FULL_SCHEDULE",
    "GROWTH_SHARE",
    "HTTP_TIMEOUT_S",
    "PRIME_RATE",
    "PROBE",
    "QUICK_PEAK_SCHEDULE",
    "QUICK_SCHEDULE",
    "REFERENCE_RATE",
    "REPAIR_WAIT_S",
    "RETENTION_MAXLEN",
    "SAMPLE_S",
    "SATURATED_CORE",
    "SIM_BATCH_S",
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "SUBSCRIBERS",
    "SYMBOLS",
    "TARGETS",
    "UNDER_DELIVERY",
]

SYMBOLS: Final = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "AVAXUSDT", "DOTUSDT", "LINKUSDT",
    "LTCUSDT", "TRXUSDT", "ATOMUSDT", "UNIUSDT", "ETCUSDT", "XLMUSDT", "NEARUSDT", "APTUSDT", "FILUSDT", "ARBUSDT",
)
CHANNELS: Final = ("trade", "agg_trade", "book_ticker")
SUBSCRIBERS: Final = 16
#: the co-located no-op subscriber the ingestor under test runs, ``SUBSCRIBERS`` times (``--subscriber``)
PROBE: Final = "ops.bench.probe:noop"
QUICK_SCHEDULE: Final = (1_000.0, 10_000.0, 50_000.0, 100_000.0)
FULL_SCHEDULE: Final = (1_000.0, 10_000.0, 20_000.0, 30_000.0, 50_000.0, 100_000.0, 150_000.0, 200_000.0)
QUICK_PEAK_SCHEDULE: Final = (60_000.0, 100_000.0)
FULL_PEAK_SCHEDULE: Final = (60_000.0, 80_000.0, 100_000.0, 120_000.0, 150_000.0)
REFERENCE_RATE: Final = 50_000.0  # the rate the latency targets name

#: target name -> (bound, unit); latency targets at REFERENCE_RATE with SUBSCRIBERS co-located subscribers
TARGETS: Final[dict[str, tuple[float, str]]] = {
    "hotpath_p99_us": (500.0, "µs"),
    "redis_e2e_p99_us": (2_000.0, "µs"),
    "no_queue_growth": (1.0, ""),
    "peak_ingest_per_s": (100_000.0, "ticks/s"),
    "instrumentation_cost_pct": (5.0, "%"),
}

SAMPLE_S: Final = 0.5  # queue sampling period during a window
#: the simulator sends what is due every this many seconds (its default); 1 ms was measured too: lower
#: latency at 10k ticks/s, but at 50k the ingestor's per-read costs outweigh it on this machine
SIM_BATCH_S: Final = 0.005
REPAIR_WAIT_S: Final = 75.0  # the ingestor's gap repair deadline (60 s) and some
PRIME_RATE: Final = 500.0  # ticks/s until every stream exists and the consumer reads it
RETENTION_MAXLEN: Final = 20_000  # per stream: bounds what the bench leaves in a shared Redis at any time
CONSUMER_COUNT: Final = 2_000  # entries per stream per XREADGROUP
UNDER_DELIVERY: Final = 0.95  # the simulator generating less than this share of the offered rate is starved
GROWTH_SHARE: Final = 0.02  # a queue growing by more than this share of the offered rate is piling up
START_TIMEOUT_S: Final = 30.0
HTTP_TIMEOUT_S: Final = 5.0
STOP_TIMEOUT_S: Final = 10.0
SATURATED_CORE: Final = 0.75  # a single-threaded process (or the machine) this busy has no headroom left
