# size: every setting is read and checked here, with the schema of known keys beside the readers, so a setting
#   cannot be added in one place and forgotten in the other.
"""Ingestor settings: flags, then ``MARKET_*`` environment variables, then a TOML file, then defaults.

:func:`load_settings` is pure apart from reading the TOML file; every problem is a
:class:`~consumer_sdk.core.errors.ConfigError` with one line naming it.  Secrets in
URLs never appear in messages: :func:`consumer_sdk.core.urls.redact_url` masks them.

Nothing unknown is ignored: a ``MARKET_*`` variable the project does not read
(:func:`consumer_sdk.core.env.check_environment`) and a key or table of the TOML file that
:data:`TOML_SCHEMA` does not list (:func:`check_toml`) are refused, naming the nearest known name.
"""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from consumer_sdk.core.env import check_environment, nearest
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import DEFAULT_PREFIX, Pattern, check_prefix
from consumer_sdk.core.latency import DEFAULT_SAMPLE_EVERY
from consumer_sdk.core.tick import FIXED_CHANNELS, KLINE_INTERVALS, is_valid_channel
from consumer_sdk.core.urls import DEFAULT_REDIS_URL, validate_redis_url
from distributor.hotpath import SubscriberPolicy
from distributor.ingress import Policy
from distributor.writer import Retention
from ingestor.depth_pacer import depth_weight
from ingestor.leases import DEFAULT_TTL_S, LeaseSettings
from ingestor.repair import RepairSettings
from ingestor.session import DEFAULT_STALE_AFTER, SessionSettings
from ingestor.venues import VENUES, venue_profile

__all__ = [
    "TOML_SCHEMA",
    "DepthSettings",
    "IngestSettings",
    "SubscriberSpec",
    "check_toml",
    "default_rest_url",
    "load_settings",
    "load_venues",
]

DEFAULT_WS_URL: Final = "wss://stream.binance.com:9443"
BINANCE_REST: Final = "https://api.binance.com"
SUBSCRIBER_POLICIES: Final = tuple(p.value for p in SubscriberPolicy)


@dataclass(frozen=True, slots=True)
class SubscriberSpec:
    """A co-located subscriber to attach at start: ``package.module:handler``, its patterns and policy, and
    for a synchronous handler where it runs (``inline`` or ``thread``; None: the hot path's default) and its
    budget in µs per tick (None: the hot path's)."""

    target: str
    patterns: tuple[str, ...] = ("*:*:*",)
    policy: str = "drop_oldest"
    execution: str | None = None
    handler_budget_us: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class DepthSettings:
    """``[depth]``: the order books (channel ``depth``).  ``limit``: levels a side of each REST snapshot
    (``/api/v3/depth``, 1 to 5000); ``speed_ms``: the diff stream's speed (100: ``@depth@100ms``, 1000:
    ``@depth``); a ``periodic`` snapshot entry after ``snapshot_every_updates`` diffs or each
    ``snapshot_every_s`` seconds of venue time (None: not by that measure); ``max_buffer``: diffs held per
    symbol while its snapshot is awaited; snapshot requests spend at most ``weight_share`` of the venue's
    ``weight_per_minute`` REST weight."""

    limit: int = 1000
    speed_ms: int = 100
    snapshot_every_updates: int | None = None
    snapshot_every_s: float | None = 60.0
    max_buffer: int = 1000
    weight_share: float = 0.5
    weight_per_minute: int = 6000


@dataclass(frozen=True, kw_only=True, slots=True)
class IngestSettings:
    #: the venue by name (:mod:`ingestor.venues`): ``binance`` (spot), ``binance_usdm``, ``binance_coinm``
    venue: str = "binance"
    url: str = DEFAULT_WS_URL
    rest_url: str = ""
    symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    channels: tuple[str, ...] = ("trade",)
    redis_url: str = DEFAULT_REDIS_URL
    #: after each batch, wait until this many replicas have it (``WAIT``; 0: not asked), see docs/cluster.md
    redis_replica_acks: int = 0
    #: ``[shards]``: split the configured streams with other ingestors through leases (see :mod:`ingestor.leases`)
    shards: LeaseSettings = field(default_factory=LeaseSettings)
    prefix: str = DEFAULT_PREFIX
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    queue_capacity: int = 100_000
    queue_policy: Policy = Policy.BLOCK
    #: ticks the writer holds in memory while Redis does not take them; beyond it they go to the spill log
    #: (``[writer] capacity``)
    writer_capacity: int = 200_000
    retention: Retention = field(default_factory=Retention)
    subscribers: tuple[SubscriberSpec, ...] = ()
    max_streams_per_connection: int = 1024
    repair: RepairSettings = field(default_factory=RepairSettings)
    depth: DepthSettings = field(default_factory=DepthSettings)
    session: SessionSettings = field(default_factory=SessionSettings)
    #: where the writer spills ticks Redis cannot take yet ("" disables spilling)
    spill_dir: str = ""
    spill_fsync: str = "interval"
    spill_max_bytes: int = 8 << 30
    #: configured streams held at the venue only while a co-located subscriber wants them
    on_demand: tuple[str, ...] = ()
    #: how long a stream nobody wants stays subscribed before it is released
    release_grace_s: float = 30.0
    #: per-tick latency stages observe one tick in this many (0: latency not measured; see consumer_sdk.core.latency)
    latency_sample: int = DEFAULT_SAMPLE_EVERY
    #: on SIGTERM/SIGINT, how long saving what the process holds may take in all (``[shutdown] flush_timeout_s``);
    #: below the usual supervisors' 30 s before SIGKILL
    shutdown_flush_s: float = 20.0
    #: of that, how long Redis is tried before what it did not take goes to the spill log
    #: (``[shutdown] redis_timeout_s``)
    shutdown_redis_s: float = 3.0


def _validate_ws_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(f"invalid venue URL {url!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(f"invalid venue URL {url!r}: expected ws://host:port or wss://host:port")
    return url.rstrip("/")


def default_spill_dir(prefix: str) -> str:
    """``$MARKET_STATE_DIR`` or ``$XDG_STATE_HOME/market`` or ``~/.local/state/market``, then ``spill/<prefix>``."""
    base = os.environ.get("MARKET_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "market"
    )
    return os.path.join(base, "spill", prefix)


def default_rest_url(ws_url: str) -> str:
    """Binance's own REST host for Binance; otherwise the same host and port over http(s)."""
    parts = urlsplit(ws_url)
    host = parts.hostname or ""
    if host.endswith("binance.com"):
        return BINANCE_REST
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def _csv(value: Any, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)):
        items = [str(v).strip() for v in value]
    else:
        raise ConfigError(f"{what}: expected a comma-separated string or a list, got {value!r}")
    items = [i for i in items if i]
    if not items:
        raise ConfigError(f"{what}: empty")
    return tuple(dict.fromkeys(items))


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected an integer, got {value!r}") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{what}: {n} is out of range {lo}..{hi}")
    return n


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not valid TOML: {exc}") from None


_ENV: Final = {
    "venue": "MARKET_VENUE",
    "url": "MARKET_URL",
    "rest_url": "MARKET_REST_URL",
    "symbols": "MARKET_SYMBOLS",
    "channels": "MARKET_CHANNELS",
    "redis_url": "MARKET_REDIS_URL",
    "prefix": "MARKET_PREFIX",
    "metrics_host": "MARKET_METRICS_HOST",
    "metrics_port": "MARKET_METRICS_PORT",
    "queue_capacity": "MARKET_QUEUE_CAPACITY",
    "queue_policy": "MARKET_QUEUE_POLICY",
    "spill_dir": "MARKET_SPILL_DIR",
    "latency_sample": "MARKET_LATENCY_SAMPLE",
    "redis_replica_acks": "MARKET_REDIS_REPLICA_ACKS",
}


def _retention(table: Any) -> Retention:
    if table is None:
        return Retention()
    if not isinstance(table, dict):
        raise ConfigError("[retention] must be a table")
    maxlen = _int(table.get("maxlen", 100_000), "retention.maxlen", 0, 10**10)
    age = _int(table.get("max_age_ms", 0), "retention.max_age_ms", 0, 10**13)
    per: list[tuple[str, int, int]] = []
    channels = table.get("channels", {})
    if not isinstance(channels, dict):
        raise ConfigError("[retention.channels] must be a table")
    for name, spec in channels.items():
        if isinstance(spec, int):
            per.append((name, _int(spec, f"retention.channels.{name}", 0, 10**10), age))
        elif isinstance(spec, dict):
            per.append((
                name,
                _int(spec.get("maxlen", maxlen), f"retention.channels.{name}.maxlen", 0, 10**10),
                _int(spec.get("max_age_ms", age), f"retention.channels.{name}.max_age_ms", 0, 10**13),
            ))
        else:
            raise ConfigError(f"retention.channels.{name}: expected an integer or a table")
    return Retention(maxlen=maxlen, max_age_ms=age, per_channel=tuple(per))


def _float(value: Any, what: str, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: expected a number, got {value!r}") from None
    if not lo <= x <= hi:
        raise ConfigError(f"{what}: {x} is out of range {lo}..{hi}")
    return x


def _session(table: Any) -> SessionSettings:
    if table is None:
        return SessionSettings()
    if not isinstance(table, dict):
        raise ConfigError("[session] must be a table")
    values: dict[str, Any] = {
        k: _float(v, f"session.{k}", 0.001, 10 * 86400.0) for k, v in table.items() if k != "stale_after"
    }
    stale = dict(DEFAULT_STALE_AFTER)
    extra = table.get("stale_after", {})
    if not isinstance(extra, dict):
        raise ConfigError("[session.stale_after] must be a table of channel = seconds")
    for channel, secs in extra.items():
        stale[channel] = _float(secs, f"session.stale_after.{channel}", 0.1, 86400.0)
    return SessionSettings(stale_after=stale, **values)


def _repair(table: Any) -> RepairSettings:
    if table is None:
        return RepairSettings()
    if not isinstance(table, dict):
        raise ConfigError("[repair] must be a table")
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"repair.enabled: expected true or false, got {enabled!r}")
    return RepairSettings(
        enabled=enabled,
        max_gap=_int(table.get("max_gap", 200_000), "repair.max_gap", 1, 10**9),
        max_hold=_int(table.get("max_hold", 200_000), "repair.max_hold", 1, 10**9),
        deadline_s=_float(table.get("deadline_s", 60.0), "repair.deadline_s", 0.1, 3600.0),
        hold_s=_float(table.get("hold_s", 5.0), "repair.hold_s", 0.1, 600.0),
        rest_timeout_s=_float(table.get("rest_timeout_s", 2.0), "repair.rest_timeout_s", 0.05, 600.0),
        max_body_mb=_float(table.get("max_body_mb", 4.0), "repair.max_body_mb", 0.01, 1024.0),
        breaker_failures=_int(table.get("breaker_failures", 3), "repair.breaker_failures", 1, 1000),
        breaker_cooldown_s=_float(table.get("breaker_cooldown_s", 30.0), "repair.breaker_cooldown_s", 0.0, 86400.0),
    )


def _shards(table: Any) -> LeaseSettings:
    """``[shards]``: ``count`` (0, the default: not sharded), ``max_owned`` (0: every shard), ``lease_ttl_s``."""
    if table is None:
        return LeaseSettings()
    if not isinstance(table, dict):
        raise ConfigError("[shards] must be a table")
    return LeaseSettings(
        count=_int(table.get("count", 0), "shards.count", 0, 1024),
        max_owned=_int(table.get("max_owned", 0), "shards.max_owned", 0, 1024),
        ttl_s=_float(table.get("lease_ttl_s", DEFAULT_TTL_S), "shards.lease_ttl_s", 0.3, 600.0),
    )


def _depth(table: Any) -> DepthSettings:
    """``[depth]`` (see :class:`DepthSettings`); ``snapshot_every_updates`` and ``snapshot_every_s`` of 0 turn
    that measure off."""
    if table is None:
        return DepthSettings()
    if not isinstance(table, dict):
        raise ConfigError("[depth] must be a table")
    speed = _int(table.get("speed_ms", 100), "depth.speed_ms", 100, 1000)
    if speed not in (100, 1000):
        raise ConfigError(f"depth.speed_ms: expected 100 or 1000, got {speed}")
    updates = _int(table.get("snapshot_every_updates", 0), "depth.snapshot_every_updates", 0, 10**9)
    every_s = _float(table.get("snapshot_every_s", 60.0), "depth.snapshot_every_s", 0.0, 86400.0)
    if 0 < every_s < 0.001:
        raise ConfigError(f"depth.snapshot_every_s: {every_s} is below a millisecond (0 turns it off)")
    settings = DepthSettings(
        limit=_int(table.get("limit", 1000), "depth.limit", 1, 5000),
        speed_ms=speed,
        snapshot_every_updates=updates or None,
        snapshot_every_s=every_s or None,
        max_buffer=_int(table.get("max_buffer", 1000), "depth.max_buffer", 1, 10**6),
        weight_share=_float(table.get("weight_share", 0.5), "depth.weight_share", 0.01, 1.0),
        weight_per_minute=_int(table.get("weight_per_minute", 6000), "depth.weight_per_minute", 1, 10**6),
    )
    budget = int(settings.weight_per_minute * settings.weight_share)
    weight = depth_weight(settings.limit)
    if weight > budget:
        raise ConfigError(
            f"depth: a snapshot of limit {settings.limit} weighs {weight}, more than the budget of {budget} a minute "
            f"(weight_per_minute x weight_share)"
        )
    return settings


#: the most ticks ``[writer] capacity`` may hold in memory (about 1 KB each)
MAX_WRITER_CAPACITY: Final = 10_000_000


def _writer(table: Any) -> int:
    """``[writer]``: ``capacity``, the ticks the writer holds in memory while Redis does not take them
    (beyond it, they go to the spill log)."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError("[writer] must be a table")
    return _int(table.get("capacity", 200_000), "writer.capacity", 1, MAX_WRITER_CAPACITY)


def _shutdown(table: Any) -> tuple[float, float]:
    """``[shutdown]``: ``(flush_timeout_s, redis_timeout_s)``."""
    if table is None:
        table = {}
    if not isinstance(table, dict):
        raise ConfigError("[shutdown] must be a table")
    flush = _float(table.get("flush_timeout_s", 20.0), "shutdown.flush_timeout_s", 1.0, 3600.0)
    try_redis = _float(table.get("redis_timeout_s", min(3.0, flush)), "shutdown.redis_timeout_s", 0.1, 3600.0)
    if try_redis > flush:
        raise ConfigError(
            f"shutdown.redis_timeout_s ({try_redis:g}) must not exceed shutdown.flush_timeout_s ({flush:g})"
        )
    return flush, try_redis


def _execution(value: Any, i: int) -> str | None:
    if value is None:
        return None
    if value not in ("inline", "thread"):
        raise ConfigError(f"subscribers[{i}].execution: expected 'inline' or 'thread', got {value!r}")
    return str(value)


def _budget(value: Any, i: int) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1e9:
        raise ConfigError(f"subscribers[{i}].handler_budget_us: expected a positive number of µs, got {value!r}")
    return float(value)


def _subscribers(flag_targets: tuple[str, ...], table: Any) -> tuple[SubscriberSpec, ...]:
    specs = [SubscriberSpec(target=t) for t in flag_targets]
    if table is not None:
        if not isinstance(table, list):
            raise ConfigError("[[subscribers]] must be an array of tables")
        for i, entry in enumerate(table):
            if not isinstance(entry, dict) or "target" not in entry:
                raise ConfigError(f"subscribers[{i}]: needs a 'target' = 'package.module:handler'")
            specs.append(SubscriberSpec(
                target=str(entry["target"]),
                patterns=_csv(entry.get("patterns", ["*:*:*"]), f"subscribers[{i}].patterns"),
                policy=str(entry.get("policy", "drop_oldest")),
                execution=_execution(entry.get("execution"), i),
                handler_budget_us=_budget(entry.get("handler_budget_us"), i),
            ))
    for spec in specs:
        if spec.policy not in SUBSCRIBER_POLICIES:
            raise ConfigError(
                f"subscriber {spec.target!r}: unknown policy {spec.policy!r}; expected one of "
                + ", ".join(SUBSCRIBER_POLICIES)
            )
        module, _, attr = spec.target.partition(":")
        if not module or not attr:
            raise ConfigError(f"subscriber target {spec.target!r}: expected package.module:handler")
        for p in spec.patterns:
            Pattern(p)
    return tuple(specs)


# ------------------------------------------------------------------------------------------------
# The TOML file's shape: every table and key a reader above reads, and the kind of its value.
# A key a reader starts to read must be listed here, or a file that sets it is refused.

#: kinds of TOML values, as messages name them
_STRING: Final = "a string"
_INTEGER: Final = "an integer"
_NUMBER: Final = "a number"
_BOOLEAN: Final = "true or false"
_LIST: Final = "a string or a list of strings"


@dataclass(frozen=True, slots=True)
class _Table:
    """A table of settings: each key and what its value must be; ``lists_known``: an unknown key's message
    lists every known one."""

    keys: Mapping[str, _Node]
    lists_known: bool = False


@dataclass(frozen=True, slots=True)
class _Names:
    """A table whose keys are names (channels), not settings: ``accepts`` says which names are valid,
    ``choices`` are the names suggested for one that is not; each value is a ``value``."""

    value: _Node
    accepts: Callable[[str], bool]
    choices: tuple[str, ...]
    what: str = "channel"
    lists_known: bool = False


@dataclass(frozen=True, slots=True)
class _Array:
    """An array of tables (``[[name]]``)."""

    item: _Table


@dataclass(frozen=True, slots=True)
class _Either:
    """A value of ``kind`` or a ``table``."""

    kind: str
    table: _Table


_Node = str | _Table | _Names | _Array | _Either

#: every concrete channel name: the fixed ones and one ``kline_<interval>`` per Binance interval
ALL_CHANNELS: Final = (*FIXED_CHANNELS, *(f"kline_{i}" for i in sorted(KLINE_INTERVALS)))
#: the keys of ``[session.stale_after]``: a channel, ``kline`` standing for every interval
STALE_AFTER_KEYS: Final = (*FIXED_CHANNELS, "kline")


def is_retention_channel(name: str) -> bool:
    """A ``[retention.channels]`` key: a channel, or a ``prefix*`` glob matching at least one channel
    (the only glob :meth:`~distributor.writer.Retention.for_channel` applies)."""
    if is_valid_channel(name):
        return True
    return name.endswith("*") and any(c.startswith(name[:-1]) for c in ALL_CHANNELS)


_PER_STREAM_LIMITS: Final = _Table({"maxlen": _INTEGER, "max_age_ms": _INTEGER})
_DEPTH: Final = _Table({
    "limit": _INTEGER,
    "speed_ms": _INTEGER,
    "snapshot_every_updates": _INTEGER,
    "snapshot_every_s": _NUMBER,
    "max_buffer": _INTEGER,
    "weight_share": _NUMBER,
    "weight_per_minute": _INTEGER,
})
#: what a ``[venues.<name>]`` table may set: the venue's own hosts, streams and books; the rest is shared
VENUE_TABLE: Final = _Table(
    {"url": _STRING, "rest_url": _STRING, "symbols": _LIST, "channels": _LIST, "depth": _DEPTH}, lists_known=True
)

#: the whole TOML file; top-level keys are the ``_ENV`` settings, the rest are tables
TOML_SCHEMA: Final = _Table({
    "venue": _STRING,
    "url": _STRING,
    "rest_url": _STRING,
    "symbols": _LIST,
    "channels": _LIST,
    "redis_url": _STRING,
    "redis_replica_acks": _INTEGER,
    "prefix": _STRING,
    "metrics_host": _STRING,
    "metrics_port": _INTEGER,
    "queue_capacity": _INTEGER,
    "queue_policy": _STRING,
    "spill_dir": _STRING,
    "latency_sample": _INTEGER,
    "queue": _Table({"capacity": _INTEGER, "policy": _STRING}),
    "writer": _Table({"capacity": _INTEGER}),
    "retention": _Table({
        "maxlen": _INTEGER,
        "max_age_ms": _INTEGER,
        "channels": _Names(
            _Either(_INTEGER, _PER_STREAM_LIMITS), is_retention_channel, (*ALL_CHANNELS, "kline_*")
        ),
    }),
    "session": _Table({
        **dict.fromkeys(
            ("ping_interval", "ping_timeout", "open_timeout", "stall_timeout", "healthy_after", "max_age",
             "rotation_timeout", "backoff_base", "backoff_cap"),
            _NUMBER,
        ),
        "stale_after": _Names(_NUMBER, STALE_AFTER_KEYS.__contains__, STALE_AFTER_KEYS),
    }),
    "repair": _Table({
        "enabled": _BOOLEAN,
        "max_gap": _INTEGER,
        "max_hold": _INTEGER,
        "deadline_s": _NUMBER,
        "hold_s": _NUMBER,
        "rest_timeout_s": _NUMBER,
        "max_body_mb": _NUMBER,
        "breaker_failures": _INTEGER,
        "breaker_cooldown_s": _NUMBER,
    }),
    "subscribers": _Array(_Table({
        "target": _STRING, "patterns": _LIST, "policy": _STRING, "execution": _STRING, "handler_budget_us": _NUMBER,
    })),
    "depth": _DEPTH,
    "venues": _Names(VENUE_TABLE, VENUES.__contains__, tuple(sorted(VENUES)), what="venue", lists_known=True),
    "shards": _Table({"count": _INTEGER, "max_owned": _INTEGER, "lease_ttl_s": _NUMBER}),
    "streams": _Table({"on_demand": _LIST, "release_grace_s": _NUMBER}),
    "spill": _Table({"dir": _STRING, "fsync": _STRING, "max_mb": _INTEGER}),
    "shutdown": _Table({"flush_timeout_s": _NUMBER, "redis_timeout_s": _NUMBER}),
})

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _dotted(path: tuple[str | int, ...]) -> str:
    """``retention.channels."kline_*"``, ``subscribers[1].policy``: a key's path as TOML spells it."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + (part if _BARE_KEY.match(part) else f'"{part}"')
    return out


def _where(path: tuple[str | int, ...]) -> str:
    if not path:
        return "(top level)"
    return _dotted(path) if isinstance(path[-1], int) else f"[{_dotted(path)}]"


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_kind(value: Any, kind: str) -> bool:
    if kind == _STRING:
        return isinstance(value, str)
    if kind == _BOOLEAN:
        return isinstance(value, bool)
    if kind == _INTEGER:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == _NUMBER:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == _LIST:
        return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
    raise AssertionError(kind)


def _unknown(
    what: str, name: str, choices: tuple[str, ...], path: tuple[str | int, ...], source: str, lists_known: bool
) -> ConfigError:
    close = nearest(name, choices)
    hint = f"; did you mean {close!r}?" if close else ""
    known = ""
    if lists_known:
        names = sorted(choices)
        known = ": expected " + (", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0])
    return ConfigError(f"unknown {what} {name!r} in {source} {_where(path)}{known}{hint}")


def _check(value: Any, node: _Node, path: tuple[str | int, ...], source: str) -> None:
    if isinstance(node, str):
        if not _is_kind(value, node):
            raise ConfigError(f"{_dotted(path)}: expected {node}, got {_show(value)}")
    elif isinstance(node, _Either):
        if isinstance(value, dict):
            _check(value, node.table, path, source)
        elif not _is_kind(value, node.kind):
            raise ConfigError(f"{_dotted(path)}: expected {node.kind} or a table, got {_show(value)}")
    elif isinstance(node, _Table):
        if not isinstance(value, dict):
            raise ConfigError(f"[{_dotted(path)}] must be a table")
        for key, item in value.items():
            if key not in node.keys:
                raise _unknown("setting", key, tuple(node.keys), path, source, node.lists_known)
            _check(item, node.keys[key], (*path, key), source)
    elif isinstance(node, _Names):
        if not isinstance(value, dict):
            raise ConfigError(f"[{_dotted(path)}] must be a table of {node.what} = value")
        for name, item in value.items():
            if not node.accepts(name):
                raise _unknown(node.what, name, node.choices, path, source, node.lists_known)
            _check(item, node.value, (*path, name), source)
    else:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"[[{_dotted(path)}]] must be an array of tables")
        for i, item in enumerate(value):
            _check(item, node.item, (*path, i), source)


def check_toml(doc: Mapping[str, Any], source: str) -> None:
    """Refuse a TOML document (as :func:`tomllib.load` returns it) that holds a table or key
    :data:`TOML_SCHEMA` does not list, or a value of the wrong kind: one :class:`ConfigError` for the first
    problem in file order, e.g. ``unknown setting 'symbolz' in market.toml (top level); did you mean
    'symbols'?`` or ``session.ping_interval: expected a number, got 'fast'``.  ``source`` names the file.
    Ranges and the values themselves are the readers' to check.  Cost: one pass over the document."""
    _check(dict(doc), TOML_SCHEMA, (), source)


def load_settings(
    flags: Mapping[str, Any], env: Mapping[str, str], config_path: str | None = None
) -> IngestSettings:
    """Merge flags (``None`` = not given), environment and the TOML file; validate everything, refusing an
    unknown ``MARKET_*`` variable in ``env`` and an unknown key in the file.  One venue: a file with
    ``[venues.*]`` tables is :func:`load_venues`'s."""
    check_environment(env)
    path = config_path or env.get("MARKET_CONFIG")
    toml = read_toml(path) if path else {}
    if path:
        check_toml(toml, path)
    if "venues" in toml:
        raise ConfigError(f"{path}: [venues.*] tables describe several venues: they are read by load_venues")
    return _settings(flags, env, toml)


def _settings(flags: Mapping[str, Any], env: Mapping[str, str], toml: Mapping[str, Any]) -> IngestSettings:
    """The settings of one venue from flags, environment and a checked TOML document."""
    merged: dict[str, Any] = {}
    for name, env_name in _ENV.items():
        if flags.get(name) is not None:
            merged[name] = flags[name]
        elif env.get(env_name):
            merged[name] = env[env_name]
        elif name in toml:
            merged[name] = toml[name]
    queue = toml.get("queue", {})
    if isinstance(queue, dict):
        merged.setdefault("queue_capacity", queue.get("capacity", 100_000))
        merged.setdefault("queue_policy", queue.get("policy", "block"))

    profile = venue_profile(str(merged.get("venue", "binance")))
    url = _validate_ws_url(str(merged.get("url", profile.ws_url)))
    rest_url = str(merged.get("rest_url") or profile.default_rest_url(url)).rstrip("/")
    if urlsplit(rest_url).scheme not in ("http", "https"):
        raise ConfigError(f"invalid REST URL {rest_url!r}: expected http(s)://host[:port]")
    symbols = tuple(dict.fromkeys(s.upper() for s in _csv(merged.get("symbols", "BTCUSDT,ETHUSDT"), "symbols")))
    for s in symbols:
        profile.check_symbol(s)
    channels = _csv(merged.get("channels", "trade"), "channels")
    depth = _depth(toml.get("depth"))
    profile.check_channels(channels, depth.speed_ms)
    prefix = check_prefix(str(merged.get("prefix", DEFAULT_PREFIX)))
    subscriber_flags = tuple(flags.get("subscribers") or ())
    streams_table = toml.get("streams", {})
    if not isinstance(streams_table, dict):
        raise ConfigError("[streams] must be a table")
    on_demand = _csv(streams_table["on_demand"], "streams.on_demand") if streams_table.get("on_demand") else ()
    for p in on_demand:
        Pattern(p)
    grace = _float(streams_table.get("release_grace_s", 30.0), "streams.release_grace_s", 0.0, 86400.0)
    spill = toml.get("spill", {})
    if not isinstance(spill, dict):
        raise ConfigError("[spill] must be a table")
    spill_dir = str(merged.get("spill_dir", spill.get("dir", default_spill_dir(prefix))))
    spill_fsync = str(spill.get("fsync", "interval"))
    if spill_fsync not in ("always", "interval", "never"):
        raise ConfigError(f"spill.fsync must be always, interval or never, got {spill_fsync!r}")
    flush_s, redis_s = _shutdown(toml.get("shutdown"))
    return IngestSettings(
        venue=profile.name,
        url=url,
        rest_url=rest_url,
        symbols=symbols,
        channels=channels,
        redis_url=validate_redis_url(str(merged.get("redis_url", DEFAULT_REDIS_URL))),
        redis_replica_acks=_int(merged.get("redis_replica_acks", 0), "redis_replica_acks", 0, 64),
        shards=_shards(toml.get("shards")),
        prefix=prefix,
        metrics_host=str(merged.get("metrics_host", "127.0.0.1")),
        metrics_port=_int(merged.get("metrics_port", 9464), "metrics port", 0, 65535),
        queue_capacity=_int(merged.get("queue_capacity", 100_000), "queue capacity", 1, 10**8),
        queue_policy=Policy.parse(str(merged.get("queue_policy", "block"))),
        writer_capacity=_writer(toml.get("writer")),
        retention=_retention(toml.get("retention")),
        subscribers=_subscribers(subscriber_flags, toml.get("subscribers")),
        session=_session(toml.get("session")),
        on_demand=on_demand,
        release_grace_s=grace,
        spill_dir=spill_dir,
        spill_fsync=spill_fsync,
        spill_max_bytes=_int(spill.get("max_mb", 8192), "spill.max_mb", 1, 10**7) << 20,
        repair=_repair(toml.get("repair")),
        depth=depth,
        latency_sample=_int(merged.get("latency_sample", DEFAULT_SAMPLE_EVERY), "latency sample", 0, 65536),
        shutdown_flush_s=flush_s,
        shutdown_redis_s=redis_s,
    )


# ------------------------------------------------------------------------------------------------
# Several venues in one process: one [venues.<name>] table each.

#: what names one venue's hosts and streams: as a flag, a ``MARKET_*`` variable or a top-level key of the file
#: it cannot go with ``[venues.*]`` tables (``symbols`` and ``channels`` at the top of the file are the tables'
#: defaults)
_ONE_VENUE_FLAGS: Final = ("venue", "url", "rest_url", "symbols", "channels")
_ONE_VENUE_KEYS: Final = ("venue", "url", "rest_url")


def load_venues(
    flags: Mapping[str, Any], env: Mapping[str, str], config_path: str | None = None
) -> tuple[IngestSettings, ...]:
    """The settings of every venue the process runs, in file order: :func:`load_settings`'s one venue when the
    file has no ``[venues.*]`` table, else one per ``[venues.<name>]`` table.

    A table sets the venue's ``url``, ``rest_url``, ``symbols``, ``channels`` and ``[depth]`` keys, over the
    file's top-level ``symbols``, ``channels`` and ``[depth]``; everything else (Redis, prefix, metrics, queue,
    writer, retention, session, repair, shutdown, subscribers, the control plane) is shared, each venue keeping its
    own queue and writer of that size.  Each venue's spill log is the subdirectory named after it of the spill
    directory.  A ``[[subscribers]]`` entry is attached to the venues its patterns' venue parts match, with
    those patterns only.

    Refused, each in one :class:`ConfigError` line: an unknown venue or table key (naming the known ones); a
    symbol listed twice for one venue; a table without symbols (none at the top either); ``--venue`` (or
    ``--url``, ``--rest-url``, ``--symbols``, ``--channels``, their ``MARKET_*`` variables, a top-level
    ``venue``, ``url`` or ``rest_url``) together with tables; ``[shards]`` with more than one venue (leases are
    named per prefix, not per venue); a subscriber whose patterns match none of the venues."""
    check_environment(env)
    path = config_path or env.get("MARKET_CONFIG")
    toml = read_toml(path) if path else {}
    if path:
        check_toml(toml, path)
    tables = toml.get("venues")
    if tables is None:
        return (_settings(flags, env, toml),)
    assert path is not None and isinstance(tables, dict)  # check_toml: a table of tables
    names = tuple(tables)
    if not names:
        raise ConfigError(f"{path}: [venues] names no venue: add a [venues.<name>] table per venue")
    _refuse_one_venue_settings(flags, env, toml, path)
    shared = {k: v for k, v in toml.items() if k != "venues"}
    out: list[IngestSettings] = []
    for name in names:
        table = tables[name]
        doc = dict(shared, venue=name)
        for key in ("url", "rest_url", "symbols", "channels"):
            if key in table:
                doc[key] = table[key]
        if "depth" in table:
            doc["depth"] = {**shared.get("depth", {}), **table["depth"]}
        where = f"{path} [venues.{name}]"
        if "symbols" not in doc:
            raise ConfigError(f"{where}: no symbols: set symbols = [...] in the table")
        _refuse_twice(doc["symbols"], where)
        try:
            settings = _settings(flags, env, doc)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        out.append(replace(
            settings,
            spill_dir=os.path.join(settings.spill_dir, name) if settings.spill_dir else "",
            subscribers=subscribers_for(settings.subscribers, name),
        ))
    if len(out) > 1 and out[0].shards.enabled:
        raise ConfigError(
            f"{path}: [shards] with several venues is not supported (shard leases are named per prefix, not per "
            "venue): run one ingestor process per venue to shard"
        )
    for spec in _subscribers(tuple(flags.get("subscribers") or ()), shared.get("subscribers")):
        if not any(subscribers_for((spec,), name) for name in names):
            raise ConfigError(
                f"subscriber {spec.target!r}: its patterns {', '.join(spec.patterns)} match none of the venues "
                f"({', '.join(names)})"
            )
    return tuple(out)


def _refuse_one_venue_settings(
    flags: Mapping[str, Any], env: Mapping[str, str], toml: Mapping[str, Any], path: str
) -> None:
    for name in _ONE_VENUE_FLAGS:
        if flags.get(name) is not None:
            given = f"--{name.replace('_', '-')}"
        elif env.get(_ENV[name]):
            given = _ENV[name]
        elif name in _ONE_VENUE_KEYS and name in toml:
            given = f"{name} = ... at the top of {path}"
        else:
            continue
        if name == "venue":
            raise ConfigError(
                f"{given} names one venue but {path} has [venues.*] tables: give either one venue or the tables"
            )
        raise ConfigError(
            f"{given} is one venue's setting but {path} has [venues.*] tables: set {name} in each table"
        )


def _refuse_twice(symbols: Any, where: str) -> None:
    items = symbols.split(",") if isinstance(symbols, str) else [str(v) for v in symbols]
    seen: set[str] = set()
    for item in items:
        key = item.strip().upper()
        if key in seen:
            raise ConfigError(f"{where}: symbol {key!r} is listed twice")
        if key:
            seen.add(key)


def subscribers_for(specs: Iterable[SubscriberSpec], venue: str) -> tuple[SubscriberSpec, ...]:
    """The subscribers a venue's ingestor attaches: those with a pattern whose venue part matches ``venue``, with
    those patterns only (a literal pattern of another venue would have this venue subscribe its stream)."""
    out = []
    for spec in specs:
        mine = tuple(p for p in spec.patterns if fnmatch.fnmatchcase(venue, p.split(":", 1)[0]))
        if mine:
            out.append(replace(spec, patterns=mine))
    return tuple(out)
