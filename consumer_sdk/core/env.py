"""The ``MARKET_*`` environment variables the project reads, in one place, and the check that refuses the rest.

A misspelt variable (``MARKET_SYMBOLZ``) would otherwise be ignored without a word and the process would
run on a default.  :func:`check_environment` turns it into one :class:`ConfigError` naming it and the
nearest known name; ``market`` calls it before every command and the ingestor's settings loader calls it
on the environment it is given.  A variable the project starts to read must be added to :data:`KNOWN`
(a test greps the repository for ``MARKET_*`` names and finds any that is missing).

Pure and light: the standard library only, nothing is read but the mapping given.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Final

from consumer_sdk.core.errors import ConfigError

__all__ = ["KNOWN", "PREFIX", "check_environment", "nearest", "unknown_variables"]

PREFIX: Final = "MARKET_"

#: every ``MARKET_*`` variable read anywhere in the project, and what reads it
KNOWN: Final[Mapping[str, str]] = {
    # the ingestor's settings (ingestor/config.py; the Redis URL and prefix also every ops command)
    "MARKET_CONFIG": "the ingestor's TOML settings file",
    "MARKET_VENUE": "the venue the ingestor runs on (binance, binance_usdm, binance_coinm)",
    "MARKET_URL": "venue WebSocket base",
    "MARKET_REST_URL": "venue REST base",
    "MARKET_SYMBOLS": "symbols to ingest",
    "MARKET_CHANNELS": "channels to ingest",
    "MARKET_REDIS_URL": "the Redis every command uses",
    "MARKET_PREFIX": "stream key prefix every command uses",
    "MARKET_REDIS_REPLICA_ACKS": "replicas each write batch waits for (WAIT); 0: none",
    "MARKET_METRICS_HOST": "address the ingestor's metrics bind",
    "MARKET_METRICS_PORT": "port of the ingestor's metrics",
    "MARKET_QUEUE_CAPACITY": "ingress queue capacity",
    "MARKET_QUEUE_POLICY": "ingress queue policy",
    "MARKET_SPILL_DIR": "the ingestor's spill log directory",
    "MARKET_LATENCY_SAMPLE": "one tick in N timed at the latency stages",
    "MARKET_LOOP": "the event loop every command runs on (auto, asyncio, uvloop)",
    "MARKET_STATE_DIR": "base of the default spill directory; the demo's and bench's work directory",
    # market ctl
    "MARKET_ACTOR": "who `market ctl` records as making a change (default: the OS user)",
    # market soak
    "MARKET_SOAK_SUBSCRIBER_FILE": "where a soak ingestor's subscriber writes its totals",
    # development: ops/dev.sh, .ci/run, ops/redis_server.py and the test suite
    "MARKET_VENV": "the virtualenv ops/dev.sh and .ci/run use",
    "MARKET_TEST_SERVER": "ops/dev.sh test: 'bundled' runs the suite against the bundled server",
    "MARKET_REDIS_SERVER": "the redis-server binary ops.redis_server and the tests start",
    "MARKET_REDIS_PIDFILE": "pid file of the server ops.redis_server started",
    "MARKET_DRILL_RATE": "tests: tick rate of the Redis outage drill",
    "MARKET_DRILL_OUTAGE_S": "tests: length of the Redis outage drill",
    "MARKET_OOM_DRILL_S": "tests: how long Redis stays at its memory limit in the OOM drill",
    "MARKET_OOM_DRILL_RATE": "tests: tick rate of the OOM drill",
}


def nearest(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word`` (:func:`difflib.get_close_matches`, cutoff 0.6), or None when none is
    close.  Cost: O(len(choices)) string comparisons."""
    found = difflib.get_close_matches(word, list(choices), n=1)
    return found[0] if found else None


def unknown_variables(env: Mapping[str, str]) -> list[str]:
    """The ``MARKET_*`` names in ``env`` the project does not read, sorted."""
    return sorted(name for name in env if name.startswith(PREFIX) and name not in KNOWN)


def check_environment(env: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` naming the first unknown ``MARKET_*`` variable of ``env`` (and the
    nearest known one, when one is close): ``unknown environment variable MARKET_SYMBOLZ; did you mean
    MARKET_SYMBOLS?``.  Other variables are not looked at."""
    unknown = unknown_variables(env)
    if not unknown:
        return
    name = unknown[0]
    # compared without the common prefix, which would make every name look close to every other
    close = nearest(name.removeprefix(PREFIX), (k.removeprefix(PREFIX) for k in KNOWN))
    hint = f"; did you mean {PREFIX}{close}?" if close else ""
    more = f" (and {len(unknown) - 1} more: {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
    raise ConfigError(f"unknown environment variable {name}{hint}{more}")
