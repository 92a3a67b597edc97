"""ingestor.config: precedence (flags > MARKET_* environment > TOML > defaults), validation, URLs.

Every bad input must be a :class:`ConfigError` (the ``market`` command turns it into one line and
exit status 2) whose message names the problem.  TOML files are written to ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.urls import DEFAULT_REDIS_URL, redact_url, validate_redis_url
from distributor.ingress import Policy
from ingestor.config import IngestSettings, SubscriberSpec, default_rest_url, load_settings
from ingestor.repair import RepairSettings
from ingestor.session import SessionSettings


def toml_file(tmp_path: Path, text: str, name: str = "market.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def load(
    flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, path: str | None = None
) -> IngestSettings:
    return load_settings(flags or {}, env or {}, path)


# ------------------------------------------------------------------------------------------------
# Defaults


def test_defaults_with_nothing_given() -> None:
    s = load()
    assert s.url == "wss://stream.binance.com:9443"
    assert s.rest_url == "https://api.binance.com"
    assert s.symbols == ("BTCUSDT", "ETHUSDT")
    assert s.channels == ("trade",)
    assert s.redis_url == DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"
    assert s.prefix == "md"
    assert s.metrics_port == 9464
    assert s.queue_policy is Policy.BLOCK
    assert s.queue_capacity == 100_000
    assert s.subscribers == ()
    assert s.retention.for_channel("trade") == (100_000, 0)
    assert s.session == SessionSettings()
    assert s.repair == RepairSettings()
    assert s.venue == "binance"


def test_unrelated_environment_is_ignored() -> None:
    s = load(env={"HOME": "/root", "REDIS_URL": "redis://elsewhere:1/0", "market_unknown": "x"})
    assert s == load()


def test_an_unknown_market_variable_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^unknown environment variable MARKET_UNKNOWN$"):
        load(env={"HOME": "/root", "MARKET_UNKNOWN": "x"})


# ------------------------------------------------------------------------------------------------
# Precedence, field by field

#: (flag name, flag value, env value, TOML text, attribute, expected from flag, env, TOML, default)
FIELDS = [
    ("url", "ws://flag:1", "ws://env:2", 'url = "ws://toml:3"', "url",
     "ws://flag:1", "ws://env:2", "ws://toml:3", "wss://stream.binance.com:9443"),
    ("symbols", "aaa,bbb", "CCC", 'symbols = ["DDD", "EEE"]', "symbols",
     ("AAA", "BBB"), ("CCC",), ("DDD", "EEE"), ("BTCUSDT", "ETHUSDT")),
    ("channels", "agg_trade", "book_ticker,kline_1m", 'channels = ["kline_5m"]', "channels",
     ("agg_trade",), ("book_ticker", "kline_1m"), ("kline_5m",), ("trade",)),
    ("redis_url", "redis://flag:1/0", "redis://env:2/0", 'redis_url = "redis://toml:3/0"', "redis_url",
     "redis://flag:1/0", "redis://env:2/0", "redis://toml:3/0", "redis://127.0.0.1:6379/0"),
    ("prefix", "pflag", "penv", 'prefix = "ptoml"', "prefix", "pflag", "penv", "ptoml", "md"),
    ("metrics_port", 1001, "1002", "metrics_port = 1003", "metrics_port", 1001, 1002, 1003, 9464),
    ("queue_policy", "block", "drop_newest", '[queue]\npolicy = "drop_oldest"', "queue_policy",
     Policy.BLOCK, Policy.DROP_NEWEST, Policy.DROP_OLDEST, Policy.BLOCK),
    ("queue_capacity", 11, "22", "[queue]\ncapacity = 33", "queue_capacity", 11, 22, 33, 100_000),
]
ENV_NAMES = {
    "url": "MARKET_URL", "symbols": "MARKET_SYMBOLS", "channels": "MARKET_CHANNELS", "redis_url": "MARKET_REDIS_URL",
    "prefix": "MARKET_PREFIX", "metrics_port": "MARKET_METRICS_PORT", "queue_policy": "MARKET_QUEUE_POLICY",
    "queue_capacity": "MARKET_QUEUE_CAPACITY",
}


@pytest.mark.parametrize(
    ("name", "flag", "env_value", "toml_text", "attr", "from_flag", "from_env", "from_toml", "default"),
    FIELDS,
    ids=[f[0] for f in FIELDS],
)
def test_precedence(
    tmp_path: Path, name: str, flag: Any, env_value: str, toml_text: str, attr: str,
    from_flag: Any, from_env: Any, from_toml: Any, default: Any,
) -> None:
    path = toml_file(tmp_path, toml_text + "\n")
    env = {ENV_NAMES[name]: env_value}
    assert getattr(load({name: flag}, env, path), attr) == from_flag
    assert getattr(load({name: None}, env, path), attr) == from_env
    assert getattr(load({}, {}, path), attr) == from_toml
    assert getattr(load({name: None}, {}, None), attr) == default
    # the flag also beats the file when no environment variable is set
    assert getattr(load({name: flag}, {}, path), attr) == from_flag


def test_empty_environment_variable_counts_as_unset(tmp_path: Path) -> None:
    path = toml_file(tmp_path, 'prefix = "ptoml"\n')
    assert load(env={"MARKET_PREFIX": ""}, path=path).prefix == "ptoml"
    assert load(env={"MARKET_PREFIX": ""}).prefix == "md"


def test_market_config_names_the_file_and_the_argument_beats_it(tmp_path: Path) -> None:
    a = toml_file(tmp_path, 'prefix = "from_env_file"\n', "a.toml")
    b = toml_file(tmp_path, 'prefix = "from_arg_file"\n', "b.toml")
    assert load(env={"MARKET_CONFIG": a}).prefix == "from_env_file"
    assert load(env={"MARKET_CONFIG": a}, path=b).prefix == "from_arg_file"


def test_one_file_many_fields(tmp_path: Path) -> None:
    path = toml_file(tmp_path, """
url = "ws://127.0.0.1:9100/"
symbols = "btcusdt, ethusdt ,btcusdt"
channels = ["trade", "agg_trade", "kline_1m", "trade"]
redis_url = "redis://cache:6380/2"
prefix = "mkt.v1"
metrics_port = 0

[queue]
capacity = 500
policy = "drop_newest"
""")
    s = load(path=path)
    assert s.url == "ws://127.0.0.1:9100"  # trailing slash dropped
    assert s.rest_url == "http://127.0.0.1:9100"
    assert s.symbols == ("BTCUSDT", "ETHUSDT")  # upper-cased, duplicate removed, order kept
    assert s.channels == ("trade", "agg_trade", "kline_1m")
    assert s.redis_url == "redis://cache:6380/2"
    assert s.prefix == "mkt.v1"
    assert s.metrics_port == 0
    assert (s.queue_capacity, s.queue_policy) == (500, Policy.DROP_NEWEST)


def test_rest_url_precedence_and_default(tmp_path: Path) -> None:
    path = toml_file(tmp_path, 'url = "ws://sim:9000"\nrest_url = "http://toml-rest:1/"\n')
    assert load(path=path).rest_url == "http://toml-rest:1"
    assert load(env={"MARKET_REST_URL": "https://env-rest"}, path=path).rest_url == "https://env-rest"
    assert load({"rest_url": "http://flag-rest:2"}, {"MARKET_REST_URL": "https://env-rest"}, path).rest_url == (
        "http://flag-rest:2"
    )
    assert load({"url": "wss://venue.example:443"}).rest_url == "https://venue.example:443"
    assert load({"url": "ws://127.0.0.1:8765"}).rest_url == "http://127.0.0.1:8765"


def test_symbols_differing_only_in_case_are_one_symbol() -> None:
    assert load({"symbols": "btcusdt,BTCUSDT,EthUsdt"}).symbols == ("BTCUSDT", "ETHUSDT")


def test_symbols_and_channels_as_lists_from_flags() -> None:
    s = load({"symbols": ["solusdt", "BNBUSDT"], "channels": ("book_ticker", "kline_1h")})
    assert s.symbols == ("SOLUSDT", "BNBUSDT")
    assert s.channels == ("book_ticker", "kline_1h")


# ------------------------------------------------------------------------------------------------
# Validation: one ConfigError naming the problem

BAD_FLAGS = [
    ({"url": "http://venue:9000"}, "invalid venue URL"),
    ({"url": "https://stream.binance.com"}, "invalid venue URL"),
    ({"url": "ws://"}, "invalid venue URL"),
    ({"url": "stream.binance.com:9443"}, "invalid venue URL"),
    ({"url": "ws://venue:99999"}, "invalid venue URL"),
    ({"url": "ws://venue:port"}, "invalid venue URL"),
    ({"rest_url": "ftp://venue"}, "invalid REST URL"),
    ({"rest_url": "ws://venue:9000"}, "invalid REST URL"),
    ({"channels": "trade,trades"}, "unknown channel 'trades'"),
    ({"channels": "kline_7m"}, "unknown channel 'kline_7m'"),
    ({"channels": "depth5"}, "unknown channel 'depth5'"),
    ({"channels": " , "}, "channels: empty"),
    ({"symbols": "BTC-USDT"}, "invalid symbol 'BTC-USDT'"),
    ({"symbols": "BTC USDT"}, "invalid symbol"),
    ({"symbols": ""}, "symbols: empty"),
    ({"symbols": 42}, "symbols: expected a comma-separated string or a list"),
    ({"prefix": "md:x"}, "invalid stream prefix 'md:x'"),
    ({"prefix": ""}, "invalid stream prefix"),
    ({"prefix": "a b"}, "invalid stream prefix"),
    ({"metrics_port": 70000}, "metrics port: 70000 is out of range 0..65535"),
    ({"metrics_port": -1}, "metrics port: -1 is out of range"),
    ({"metrics_port": "http"}, "metrics port: expected an integer, got 'http'"),
    ({"queue_policy": "lifo"}, "unknown queue policy 'lifo'"),
    ({"queue_capacity": 0}, "queue capacity: 0 is out of range"),
    ({"queue_capacity": "big"}, "queue capacity: expected an integer"),
    ({"redis_url": "http://cache:6379"}, "invalid Redis URL"),
    ({"redis_url": "redis://"}, "invalid Redis URL"),
    ({"subscribers": ["strategies.momentum"]}, "subscriber target 'strategies.momentum'"),
    ({"subscribers": [":handler"]}, "expected package.module:handler"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS, ids=[m for _, m in BAD_FLAGS])
def test_bad_flag_is_a_config_error_naming_it(flags: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(flags)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MARKET_URL": "http://venue"}, "invalid venue URL"),
        ({"MARKET_CHANNELS": "trade,ticker"}, "unknown channel 'ticker'"),
        ({"MARKET_METRICS_PORT": "65536"}, "metrics port"),
        ({"MARKET_QUEUE_POLICY": "drop_all"}, "unknown queue policy"),
        ({"MARKET_REDIS_URL": "mysql://db"}, "invalid Redis URL"),
    ],
)
def test_bad_environment_is_a_config_error(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(env=env)


def test_redis_url_password_never_appears_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        validate_redis_url("http://user:hunter2@cache:6379/0")
    assert "hunter2" not in str(info.value)
    assert "user:***@cache:6379" in str(info.value)


@pytest.mark.parametrize("url", ["redis://user:hunter2@cache:notaport/0", "redis://user:hunter2@cache:99999/0"])
def test_redis_url_with_bad_port_is_a_config_error(url: str) -> None:
    """A bad port must give the one-line ConfigError, without the password."""
    with pytest.raises(ConfigError) as info:
        load({"redis_url": url})
    assert "invalid Redis URL" in str(info.value)
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["redis://h:6379/0", "rediss://user:pw@h:6380/1", "unix:///var/run/redis.sock", "redis://[::1]:6379"]
)
def test_valid_redis_urls_pass(url: str) -> None:
    assert validate_redis_url(url) == url


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load(path=missing)
    assert "cannot read config file" in str(info.value)
    assert "nope.toml" in str(info.value)


def test_directory_as_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(path=str(tmp_path))


def test_missing_file_named_by_market_config_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(env={"MARKET_CONFIG": str(tmp_path / "gone.toml")})


@pytest.mark.parametrize("text", ['url = "ws://a:1', "symbols = [", "[queue\ncapacity = 3", "a = 1\na = 2\n"])
def test_invalid_toml_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = toml_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path=path)
    assert "is not valid TOML" in str(info.value)
    assert path in str(info.value)


BAD_TABLES = [
    # [retention]
    ("retention = 5", "[retention] must be a table"),
    ('[retention]\nmaxlen = "lots"', "retention.maxlen: expected an integer, got 'lots'"),
    ("[retention]\nmaxlen = -1", "retention.maxlen: -1 is out of range"),
    ("[retention]\nmax_age_ms = -5", "retention.max_age_ms: -5 is out of range"),
    ("[retention]\nchannels = 3", "[retention.channels] must be a table"),
    ('[retention.channels]\ntrade = "big"', "retention.channels.trade: expected an integer or a table"),
    ("[retention.channels]\ntrade = -2", "retention.channels.trade: -2 is out of range"),
    ("[retention.channels.trade]\nmaxlen = -5", "retention.channels.trade.maxlen: -5 is out of range"),
    ('[retention.channels.trade]\nmax_age_ms = "1d"', "retention.channels.trade.max_age_ms: expected an integer"),
    # [session]
    ("session = 1", "[session] must be a table"),
    ("[session]\nping_intervall = 5", "unknown setting 'ping_intervall' in "),
    ("[session]\nping_intervall = 5", "market.toml [session]; did you mean 'ping_interval'?"),
    ("[session]\nfoo = 1\nbar = 2", "unknown setting 'foo' in "),
    ('[session]\nping_interval = "fast"', "session.ping_interval: expected a number, got 'fast'"),
    ("[session]\nbackoff_cap = 0", "session.backoff_cap: 0.0 is out of range"),
    ("[session]\nmax_age = 1e9", "session.max_age"),
    ("[session]\nstale_after = 5", "[session.stale_after] must be a table"),
    ("[session.stale_after]\ntrade = 0", "session.stale_after.trade: 0.0 is out of range"),
    # [repair]
    ("repair = true", "[repair] must be a table"),
    ("[repair]\nmax_gap = 0", "repair.max_gap: 0 is out of range"),
    ('[repair]\nmax_hold = "x"', "repair.max_hold: expected an integer"),
    ("[repair]\ndeadline_s = 0.01", "repair.deadline_s"),
    # [[subscribers]]
    ('[subscribers]\ntarget = "a.b:c"', "[[subscribers]] must be an array of tables"),
    ('[[subscribers]]\npatterns = ["*:*:*"]', "subscribers[0]: needs a 'target'"),
    ('[[subscribers]]\ntarget = "a.b:c"\n[[subscribers]]\npolicy = "block"', "subscribers[1]: needs a 'target'"),
    ('[[subscribers]]\ntarget = "strategies.momentum"', "subscriber target 'strategies.momentum'"),
    ('[[subscribers]]\ntarget = "mod:"', "expected package.module:handler"),
    ('[[subscribers]]\ntarget = "a.b:c"\npatterns = ["binance:BTCUSDT"]', "invalid pattern 'binance:BTCUSDT'"),
    ('[[subscribers]]\ntarget = "a.b:c"\npatterns = "binance:BTC/USDT:trade"', "invalid pattern"),
    ('[[subscribers]]\ntarget = "a.b:c"\npatterns = []', "subscribers[0].patterns: empty"),
    # [shutdown]
    ("shutdown = 5", "[shutdown] must be a table"),
    ("[shutdown]\nflush_timeout = 5", "unknown setting 'flush_timeout' in "),
    ("[shutdown]\nflush_timeout_s = 0", "shutdown.flush_timeout_s: 0.0 is out of range"),
    ('[shutdown]\nredis_timeout_s = "soon"', "shutdown.redis_timeout_s: expected a number"),
    ("[shutdown]\nflush_timeout_s = 5\nredis_timeout_s = 6", "must not exceed shutdown.flush_timeout_s"),
    # [writer]
    ("writer = 5000", "[writer] must be a table"),
    ("[writer]\ncapacit = 5000", "unknown setting 'capacit' in "),
    ('[writer]\ncapacity = "big"', "writer.capacity: expected an integer, got 'big'"),
    ("[writer]\ncapacity = 0", "writer.capacity: 0 is out of range 1..10000000"),
    ("[writer]\ncapacity = 10000001", "writer.capacity: 10000001 is out of range"),
    # [depth]
    ("depth = 5", "[depth] must be a table"),
    ("[depth]\nlimt = 100", "unknown setting 'limt' in "),
    ("[depth]\nlimit = 0", "depth.limit: 0 is out of range 1..5000"),
    ("[depth]\nlimit = 5001", "depth.limit: 5001 is out of range"),
    ("[depth]\nspeed_ms = 500", "depth.speed_ms: expected 100 or 1000, got 500"),
    ("[depth]\nsnapshot_every_updates = -1", "depth.snapshot_every_updates: -1 is out of range"),
    ("[depth]\nsnapshot_every_s = 0.0001", "depth.snapshot_every_s: 0.0001 is below a millisecond"),
    ("[depth]\nmax_buffer = 0", "depth.max_buffer: 0 is out of range"),
    ("[depth]\nweight_share = 0", "depth.weight_share: 0.0 is out of range"),
    ('[depth]\nweight_share = "half"', "depth.weight_share: expected a number"),
    ("[depth]\nlimit = 5000\nweight_per_minute = 400", "depth: a snapshot of limit 5000 weighs 250, more than"),
    # [queue]
    ('[queue]\npolicy = "fifo"', "unknown queue policy 'fifo'"),
    ("[queue]\ncapacity = 0", "queue capacity: 0 is out of range"),
]


@pytest.mark.parametrize(("text", "message"), BAD_TABLES, ids=[m for _, m in BAD_TABLES])
def test_bad_table_is_a_config_error_naming_it(tmp_path: Path, text: str, message: str) -> None:
    path = toml_file(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as info:
        load(path=path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_depth_settings_default_and_from_the_file(tmp_path: Path) -> None:
    d = load({"channels": "trade,depth"}).depth
    assert load({"channels": "trade,depth"}).channels == ("trade", "depth")
    assert (d.limit, d.speed_ms, d.snapshot_every_updates, d.snapshot_every_s, d.max_buffer) == (1000, 100, None,
                                                                                                 60.0, 1000)
    text = ("[depth]\nlimit = 500\nspeed_ms = 1000\nsnapshot_every_updates = 600\nsnapshot_every_s = 0\n"
            "max_buffer = 50\nweight_share = 0.25\nweight_per_minute = 1200\n")
    d = load(path=toml_file(tmp_path, text)).depth
    assert (d.limit, d.speed_ms, d.snapshot_every_updates, d.snapshot_every_s, d.max_buffer, d.weight_share,
            d.weight_per_minute) == (500, 1000, 600, None, 50, 0.25, 1200)


def test_unknown_subscriber_policy_is_a_config_error(tmp_path: Path) -> None:
    """``load_settings`` validates everything: a policy the hot path does not know is caught here."""
    path = toml_file(tmp_path, '[[subscribers]]\ntarget = "a.b:c"\npolicy = "drop_everything"\n')
    with pytest.raises(ConfigError, match="drop_everything"):
        load(path=path)


def test_repair_enabled_must_be_a_boolean(tmp_path: Path) -> None:
    """``enabled = "false"`` (a string) must not silently turn repair on."""
    path = toml_file(tmp_path, '[repair]\nenabled = "false"\n')
    with pytest.raises(ConfigError, match=r"repair\.enabled"):
        load(path=path)


# ------------------------------------------------------------------------------------------------
# Tables read correctly


def test_retention_per_channel_with_kline_glob(tmp_path: Path) -> None:
    path = toml_file(tmp_path, """
[retention]
maxlen = 5000
max_age_ms = 60000

[retention.channels]
trade = 1000000
"kline_*" = { maxlen = 500, max_age_ms = 86400000 }
book_ticker = { maxlen = 200 }
agg_trade = { max_age_ms = 0 }
""")
    r = load(path=path).retention
    assert (r.maxlen, r.max_age_ms) == (5000, 60000)
    assert r.for_channel("trade") == (1_000_000, 60000)  # an integer sets maxlen, the age is inherited
    assert r.for_channel("kline_1m") == (500, 86_400_000)
    assert r.for_channel("kline_1h") == (500, 86_400_000)
    assert r.for_channel("book_ticker") == (200, 60000)
    assert r.for_channel("agg_trade") == (5000, 0)
    assert r.for_channel("kline") == (5000, 60000)  # not kline_<i>: the defaults


def test_retention_defaults_apply_without_channels(tmp_path: Path) -> None:
    r = load(path=toml_file(tmp_path, "[retention]\nmaxlen = 0\n")).retention
    assert r.for_channel("trade") == (0, 0)
    assert r.for_channel("kline_1m") == (0, 0)


def test_retention_exact_channel_beats_glob_whatever_the_order(tmp_path: Path) -> None:
    """``kline_1m = 50`` is more specific than ``"kline_*" = 500`` and must win even when written after it."""
    path = toml_file(tmp_path, '[retention.channels]\n"kline_*" = 500\nkline_1m = 50\n')
    r = load(path=path).retention
    assert r.for_channel("kline_5m") == (500, 0)
    assert r.for_channel("kline_1m") == (50, 0)


def test_session_table(tmp_path: Path) -> None:
    path = toml_file(tmp_path, """
[session]
ping_interval = 5
ping_timeout = 4.5
open_timeout = 3
stall_timeout = 20
healthy_after = 2
max_age = 3600
rotation_timeout = 7
backoff_base = 0.25
backoff_cap = 12

[session.stale_after]
kline = 3
trade = 120.5
""")
    s = load(path=path).session
    assert (s.ping_interval, s.ping_timeout, s.open_timeout, s.stall_timeout) == (5.0, 4.5, 3.0, 20.0)
    assert (s.healthy_after, s.max_age, s.rotation_timeout) == (2.0, 3600.0, 7.0)
    assert (s.backoff_base, s.backoff_cap) == (0.25, 12.0)
    assert dict(s.stale_after) == {"trade": 120.5, "agg_trade": 60.0, "book_ticker": 60.0, "kline": 3.0}
    # settings not in the file keep their defaults
    assert s.requests_per_s == SessionSettings().requests_per_s


def test_empty_session_table_is_the_defaults(tmp_path: Path) -> None:
    assert load(path=toml_file(tmp_path, "[session]\n")).session == SessionSettings()


def test_repair_table(tmp_path: Path) -> None:
    path = toml_file(tmp_path, "[repair]\nenabled = false\nmax_gap = 10\nmax_hold = 20\ndeadline_s = 1.5\n")
    r = load(path=path).repair
    assert (r.enabled, r.max_gap, r.max_hold, r.deadline_s) == (False, 10, 20, 1.5)
    assert r.page == RepairSettings().page
    partial = load(path=toml_file(tmp_path, "[repair]\nmax_gap = 7\n", "p.toml")).repair
    assert partial == RepairSettings(max_gap=7)


def test_writer_table(tmp_path: Path) -> None:
    assert load().writer_capacity == 200_000
    assert load(path=toml_file(tmp_path, "[writer]\n")).writer_capacity == 200_000
    assert load(path=toml_file(tmp_path, "[writer]\ncapacity = 5000\n", "w.toml")).writer_capacity == 5000


def test_shutdown_table(tmp_path: Path) -> None:
    defaults = load()
    assert (defaults.shutdown_flush_s, defaults.shutdown_redis_s) == (20.0, 3.0)
    s = load(path=toml_file(tmp_path, "[shutdown]\nflush_timeout_s = 25\nredis_timeout_s = 5\n"))
    assert (s.shutdown_flush_s, s.shutdown_redis_s) == (25.0, 5.0)
    short = load(path=toml_file(tmp_path, "[shutdown]\nflush_timeout_s = 2\n", "short.toml"))
    assert (short.shutdown_flush_s, short.shutdown_redis_s) == (2.0, 2.0), "Redis's try fits in the whole"


def test_subscribers_from_flags_and_table(tmp_path: Path) -> None:
    path = toml_file(tmp_path, """
[[subscribers]]
target = "strategies.momentum:on_tick"
patterns = ["binance:btcusdt:trade", "binance:*:kline_*"]
policy = "block"

[[subscribers]]
target = "strategies.logger:handle"
patterns = "binance:*:trade, binance:ETHUSDT:*"
""")
    subs = load({"subscribers": ["pkg.mod:fn"]}, {}, path).subscribers
    assert subs == (
        SubscriberSpec(target="pkg.mod:fn", patterns=("*:*:*",), policy="drop_oldest"),
        SubscriberSpec(
            target="strategies.momentum:on_tick",
            patterns=("binance:btcusdt:trade", "binance:*:kline_*"),
            policy="block",
        ),
        SubscriberSpec(
            target="strategies.logger:handle", patterns=("binance:*:trade", "binance:ETHUSDT:*"), policy="drop_oldest"
        ),
    )


# ------------------------------------------------------------------------------------------------
# default_rest_url / redact_url


@pytest.mark.parametrize(
    ("ws", "rest"),
    [
        ("wss://stream.binance.com:9443", "https://api.binance.com"),
        ("wss://stream.binance.com:443", "https://api.binance.com"),
        ("wss://data-stream.binance.com", "https://api.binance.com"),
        ("ws://127.0.0.1:8765", "http://127.0.0.1:8765"),
        ("ws://sim.local:9000", "http://sim.local:9000"),
        ("wss://venue.example:9443", "https://venue.example:9443"),
        ("wss://venue.example", "https://venue.example"),
        ("ws://[::1]:8765", "http://[::1]:8765"),
    ],
)
def test_default_rest_url(ws: str, rest: str) -> None:
    assert default_rest_url(ws) == rest


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://user:pw@h:1/0", "redis://user:***@h:1/0"),
        ("redis://:secret@cache:6379", "redis://:***@cache:6379"),
        ("rediss://admin:s3cr3t@cache.example:6380/2?ssl_cert_reqs=none",
         "rediss://admin:***@cache.example:6380/2?ssl_cert_reqs=none"),
        ("redis://u:p@ss@h:1/0", "redis://u:***@h:1/0"),
        ("redis://u:pw@h/0", "redis://u:***@h/0"),
    ],
)
def test_redact_url_hides_password(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379/0",
        "redis://user@h:6379/0",
        "unix:///var/run/redis.sock?db=0",
        "rediss://cache.example:6380",
        "redis://[::1]:6379/0",
        "",
    ],
)
def test_redact_url_leaves_urls_without_password_unchanged(url: str) -> None:
    assert redact_url(url) == url


def test_redact_url_keeps_ipv6_brackets() -> None:
    assert redact_url("redis://u:pw@[::1]:6379/0") == "redis://u:***@[::1]:6379/0"


@pytest.mark.parametrize("url", ["redis://u:hunter2@h:notaport/0", "redis://u:hunter2@h:99999/0"])
def test_redact_url_never_raises_and_never_shows_the_password(url: str) -> None:
    out = redact_url(url)
    assert "hunter2" not in out
