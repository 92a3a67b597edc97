"""Strict configuration: nothing the operator wrote is ignored.

A key of the TOML file the ingestor does not read, a value of the wrong kind, or a ``MARKET_*``
environment variable the project does not read is one :class:`ConfigError` line naming it (with the
nearest known name when one is close); ``market`` prints it as ``market: error: ...`` and exits 2.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from consumer_sdk.core.env import KNOWN, check_environment, nearest, unknown_variables
from consumer_sdk.core.errors import ConfigError
from ingestor.config import (
    _ENV,
    ALL_CHANNELS,
    TOML_SCHEMA,
    IngestSettings,
    _Array,
    _Either,
    _Names,
    _Table,
    check_toml,
    is_retention_channel,
    load_settings,
    load_venues,
)

REPO = Path(__file__).resolve().parents[2]


def load_text(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> IngestSettings:
    path = tmp_path / "market.toml"
    path.write_text(text)
    return load_settings({}, env or {}, str(path))


def refusal(tmp_path: Path, text: str) -> str:
    """The one-line message loading ``text`` as market.toml gives, with the file's path shortened."""
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    message = str(info.value)
    assert "\n" not in message
    return message.replace(str(tmp_path / "market.toml"), "market.toml")


# ------------------------------------------------------------------------------------------------
# Unknown keys, at every level


def test_a_top_level_typo_is_refused_with_the_nearest_setting(tmp_path: Path) -> None:
    assert refusal(tmp_path, 'symbolz = ["BTCUSDT"]\n') == (
        "unknown setting 'symbolz' in market.toml (top level); did you mean 'symbols'?"
    )


def test_no_suggestion_when_nothing_is_close(tmp_path: Path) -> None:
    assert refusal(tmp_path, "completely_different = 1\n") == (
        "unknown setting 'completely_different' in market.toml (top level)"
    )
    assert refusal(tmp_path, "[queue]\nzzz = 1\n") == "unknown setting 'zzz' in market.toml [queue]"


def test_a_misspelt_table_is_refused(tmp_path: Path) -> None:
    assert refusal(tmp_path, "[sesion]\nping_interval = 5.0\n") == (
        "unknown setting 'sesion' in market.toml (top level); did you mean 'session'?"
    )


TABLE_TYPOS = [
    ("[queue]\ncapcity = 5", "unknown setting 'capcity' in market.toml [queue]; did you mean 'capacity'?"),
    ("[writer]\ncapasity = 5", "unknown setting 'capasity' in market.toml [writer]; did you mean 'capacity'?"),
    ("[retention]\nmax_len = 5", "unknown setting 'max_len' in market.toml [retention]; did you mean 'maxlen'?"),
    ("[session]\nping_timout = 5",
     "unknown setting 'ping_timout' in market.toml [session]; did you mean 'ping_timeout'?"),
    ("[repair]\nenable = true", "unknown setting 'enable' in market.toml [repair]; did you mean 'enabled'?"),
    ("[streams]\non_demnad = []", "unknown setting 'on_demnad' in market.toml [streams]; did you mean 'on_demand'?"),
    ("[spill]\ndirectory = 'x'", "unknown setting 'directory' in market.toml [spill]"),
    ("[spill]\nfsink = 'always'", "unknown setting 'fsink' in market.toml [spill]; did you mean 'fsync'?"),
    ("[shutdown]\nflush_timeout = 5",
     "unknown setting 'flush_timeout' in market.toml [shutdown]; did you mean 'flush_timeout_s'?"),
    ('[[subscribers]]\ntarget = "a.b:c"\npolicyy = "block"',
     "unknown setting 'policyy' in market.toml subscribers[0]; did you mean 'policy'?"),
]


@pytest.mark.parametrize(("text", "message"), TABLE_TYPOS, ids=[m.split(" in ")[0] for _, m in TABLE_TYPOS])
def test_a_typo_inside_a_table_is_refused(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(tmp_path, text + "\n") == message


NESTED_TYPOS = [
    ("[retention.channels]\ntrades = 5",
     "unknown channel 'trades' in market.toml [retention.channels]; did you mean 'trade'?"),
    ('[retention.channels]\n"klines_*" = 5',
     "unknown channel 'klines_*' in market.toml [retention.channels]; did you mean 'kline_*'?"),
    ("[retention.channels]\ndepth5 = 5",
     "unknown channel 'depth5' in market.toml [retention.channels]; did you mean 'depth'?"),
    ('[retention.channels."kline_*"]\nmaxln = 5',
     "unknown setting 'maxln' in market.toml [retention.channels.\"kline_*\"]; did you mean 'maxlen'?"),
    ("[retention.channels.trade]\nmax_age = 5",
     "unknown setting 'max_age' in market.toml [retention.channels.trade]; did you mean 'max_age_ms'?"),
    ("[session.stale_after]\ntrdae = 5",
     "unknown channel 'trdae' in market.toml [session.stale_after]; did you mean 'trade'?"),
    # every kline interval shares one threshold, named kline: a per-interval key would be ignored
    ("[session.stale_after]\nkline_1m = 5",
     "unknown channel 'kline_1m' in market.toml [session.stale_after]; did you mean 'kline'?"),
    ('[[subscribers]]\ntarget = "a.b:c"\n[[subscribers]]\ntarget = "d.e:f"\nhandler_budget = 5',
     "unknown setting 'handler_budget' in market.toml subscribers[1]; did you mean 'handler_budget_us'?"),
]


@pytest.mark.parametrize(("text", "message"), NESTED_TYPOS, ids=[m.split(" in ")[0] for _, m in NESTED_TYPOS])
def test_a_typo_in_a_nested_table_is_refused(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(tmp_path, text + "\n") == message


def test_the_first_problem_in_file_order_is_named(tmp_path: Path) -> None:
    assert refusal(tmp_path, "[queue]\nfoo = 1\nbar = 2\n").startswith("unknown setting 'foo' ")


def _every_key(node: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str, tuple[str, ...]]]:
    """(table path, key, the keys beside it) for every setting :data:`TOML_SCHEMA` lists."""
    out = []
    if isinstance(node, _Table):
        for key, child in node.keys.items():
            out.append((path, key, tuple(node.keys)))
            out += _every_key(child, (*path, key))
    elif isinstance(node, _Array):
        out += _every_key(node.item, path)
    elif isinstance(node, _Either):
        out += _every_key(node.table, path)
    elif isinstance(node, _Names):
        out += _every_key(node.value, (*path, "binance" if node.what == "venue" else "trade"))
    return out


EVERY_KEY = _every_key(TOML_SCHEMA)


def test_the_schema_lists_every_table_the_readers_read() -> None:
    tables = {p for p, _, _ in EVERY_KEY if p}
    assert {p[0] for p in tables} == {
        "queue", "writer", "retention", "session", "repair", "subscribers", "streams", "spill", "shutdown", "depth",
        "shards", "venues",
    }
    assert ("retention", "channels", "trade") in tables
    assert ("session", "stale_after") not in tables  # its keys are channels, checked as such
    # the top-level settings are the ones the environment can also set
    assert set(_ENV) <= {k for p, k, _ in EVERY_KEY if not p}


@pytest.mark.parametrize(("path", "key", "siblings"), EVERY_KEY, ids=[".".join((*p, k)) for p, k, _ in EVERY_KEY])
def test_every_setting_misspelt_is_refused_naming_it(
    path: tuple[str, ...], key: str, siblings: tuple[str, ...]
) -> None:
    """One letter too many, anywhere in the file: refused, and the suggestion is the setting meant."""
    typo = key + "x"
    assert typo not in siblings
    doc: dict[str, Any] = {typo: 1}
    for part in reversed(path):
        doc = {part: [doc] if part == "subscribers" else doc}
    with pytest.raises(ConfigError) as info:
        check_toml(doc, "market.toml")
    assert str(info.value).startswith(f"unknown setting '{typo}' in market.toml ")
    assert str(info.value).endswith(f"; did you mean '{key}'?")


# ------------------------------------------------------------------------------------------------
# Values of the wrong kind

WRONG_KINDS = [
    ('[url]\nhost = "x"', "url: expected a string, got a table"),
    ("symbols = [1, 2]", "symbols: expected a string or a list of strings, got [1, 2]"),
    ("symbols = { a = 1 }", "symbols: expected a string or a list of strings, got a table"),
    ('metrics_port = "9464"', "metrics_port: expected an integer, got '9464'"),
    ("latency_sample = true", "latency_sample: expected an integer, got True"),
    ("queue = 5", "[queue] must be a table"),
    ('[queue]\ncapacity = 1.5', "queue.capacity: expected an integer, got 1.5"),
    ('[repair]\nenabled = "yes"', "repair.enabled: expected true or false, got 'yes'"),
    ("[spill]\ndir = 3", "spill.dir: expected a string, got 3"),
    ("[session.stale_after]\ntrade = [1]", "session.stale_after.trade: expected a number, got [1]"),
    ('[retention.channels]\n"kline_*" = "x"', 'retention.channels."kline_*": expected an integer or a table'),
    ('[[subscribers]]\ntarget = ["a.b:c"]', "subscribers[0].target: expected a string, got ['a.b:c']"),
    ("subscribers = [1]", "[[subscribers]] must be an array of tables"),
]


@pytest.mark.parametrize(("text", "message"), WRONG_KINDS, ids=[m for _, m in WRONG_KINDS])
def test_a_value_of_the_wrong_kind_is_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    assert refusal(tmp_path, text + "\n").startswith(message)


def test_a_long_value_is_shortened_in_the_message(tmp_path: Path) -> None:
    message = refusal(tmp_path, f"metrics_port = \"{'9' * 500}\"\n")
    assert message.startswith("metrics_port: expected an integer, got '999")
    assert len(message) < 120


# ------------------------------------------------------------------------------------------------
# What is known still loads


def test_a_file_setting_every_known_key_loads(tmp_path: Path) -> None:
    s = load_text(tmp_path, """
url = "ws://127.0.0.1:9000"
rest_url = "http://127.0.0.1:9000"
symbols = ["SOLUSDT"]
channels = "trade,kline_1m"
redis_url = "redis://127.0.0.1:6379/0"
prefix = "strict"
metrics_host = "127.0.0.1"
metrics_port = 0
queue_capacity = 500
queue_policy = "drop_oldest"
spill_dir = ""
latency_sample = 4
[queue]
capacity = 600
policy = "block"
[writer]
capacity = 700
[retention]
maxlen = 800
max_age_ms = 0
[retention.channels]
trade = 900
"kline_*" = { maxlen = 10, max_age_ms = 20 }
"*" = 5
[session]
ping_interval = 1
ping_timeout = 2.5
open_timeout = 3
stall_timeout = 4
healthy_after = 5
max_age = 6
rotation_timeout = 7
backoff_base = 0.5
backoff_cap = 8
[session.stale_after]
trade = 9
agg_trade = 10
book_ticker = 11
kline = 12
[repair]
enabled = false
max_gap = 13
max_hold = 14
deadline_s = 15
hold_s = 16
rest_timeout_s = 17
max_body_mb = 18
breaker_failures = 19
breaker_cooldown_s = 20
[streams]
on_demand = ["binance:*:kline_*"]
release_grace_s = 21
[spill]
dir = "/nowhere"
fsync = "never"
max_mb = 22
[shutdown]
flush_timeout_s = 23
redis_timeout_s = 2
[[subscribers]]
target = "a.b:c"
patterns = "binance:*:trade"
policy = "block"
execution = "thread"
handler_budget_us = 24
""")
    assert (s.prefix, s.queue_capacity, s.writer_capacity, s.session.stale_after["kline"]) == ("strict", 500, 700, 12)
    assert s.retention.for_channel("kline_5m") == (10, 20)
    assert s.retention.for_channel("book_ticker") == (5, 0)
    assert (s.repair.breaker_cooldown_s, s.spill_max_bytes, s.shutdown_flush_s) == (20.0, 22 << 20, 23.0)
    assert s.subscribers[0].handler_budget_us == 24.0


def test_the_readmes_examples_load(tmp_path: Path) -> None:
    blocks = re.findall(r"```toml\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    assert blocks
    for block in blocks:
        (tmp_path / "market.toml").write_text(block)
        load_venues({}, {}, str(tmp_path / "market.toml"))  # one venue, or [venues.*] tables


@pytest.mark.parametrize("name", ["trade", "agg_trade", "book_ticker", "kline_1m", "kline_1M", "kline_*", "*", "k*"])
def test_retention_channel_names(name: str) -> None:
    assert is_retention_channel(name)


@pytest.mark.parametrize("name", ["trades", "kline", "kline_7m", "depth_*", "*trade", "kline_*_x", ""])
def test_retention_channel_names_refused(name: str) -> None:
    assert not is_retention_channel(name)


def test_every_kline_interval_is_a_channel() -> None:
    assert "kline_1m" in ALL_CHANNELS and "kline_1M" in ALL_CHANNELS and "trade" in ALL_CHANNELS


# ------------------------------------------------------------------------------------------------
# The environment

#: names the tests set on purpose to see them refused; none may ever be a real variable
UNKNOWN_ON_PURPOSE = {"MARKET_UNKNOWN", "MARKET_SYMBOLZ", "MARKET_REDIS_ULR", "MARKET_ZZZ", "MARKET_NOTHING_LIKE_IT"}


def test_an_unknown_variable_is_refused_with_the_nearest() -> None:
    with pytest.raises(ConfigError) as info:
        check_environment({"PATH": "/bin", "MARKET_SYMBOLZ": "BTCUSDT"})
    assert str(info.value) == "unknown environment variable MARKET_SYMBOLZ; did you mean MARKET_SYMBOLS?"


def test_an_unknown_variable_with_nothing_close() -> None:
    with pytest.raises(ConfigError) as info:
        check_environment({"MARKET_ZZZ": ""})
    assert str(info.value) == "unknown environment variable MARKET_ZZZ"


def test_several_unknown_variables_are_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        check_environment({"MARKET_ZZZ": "", "MARKET_REDIS_ULR": "redis://x"})
    assert str(info.value) == (
        "unknown environment variable MARKET_REDIS_ULR; did you mean MARKET_REDIS_URL? (and 1 more: MARKET_ZZZ)"
    )


def test_known_and_foreign_variables_pass() -> None:
    check_environment(dict.fromkeys(KNOWN, ""))
    check_environment({"REDIS_URL": "x", "market_symbolz": "x", "MARKETS": "x", "XMARKET_FOO": "x"})
    assert unknown_variables({**dict.fromkeys(KNOWN, ""), "MARKET_": "", "MARKET_ZZZ": ""}) == [
        "MARKET_", "MARKET_ZZZ",
    ]


def test_the_settings_loader_refuses_an_unknown_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, {"MARKET_SYMBOLZ": "BTCUSDT"})
    assert str(info.value) == "unknown environment variable MARKET_SYMBOLZ; did you mean MARKET_SYMBOLS?"


def test_nearest() -> None:
    assert nearest("capcity", ["capacity", "policy"]) == "capacity"
    assert nearest("zzz", ["capacity", "policy"]) is None


def test_every_settings_variable_is_known() -> None:
    assert set(_ENV.values()) | {"MARKET_CONFIG"} <= set(KNOWN)


def _repository_files() -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True, timeout=60,
    ).stdout.decode().split("\0")
    return [REPO / name for name in listed if name and (REPO / name).is_file()]


def test_every_market_variable_in_the_repository_is_known() -> None:
    """Code, scripts, compose file, CI and docs: a ``MARKET_*`` name anywhere must be in KNOWN, so a variable
    the project starts to read cannot be forgotten there (and then refused)."""
    found: dict[str, str] = {}
    files = _repository_files()
    assert any(f.name == "compose.yaml" for f in files) and any(f.parts[-2:] == (".ci", "run") for f in files)
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="ignore")
        for name in re.findall(r"\bMARKET_[A-Z0-9_]*[A-Z0-9]\b", text):
            found.setdefault(name, str(f.relative_to(REPO)))
    assert "MARKET_TEST_SERVER" in found and "MARKET_REDIS_URL" in found
    missing = {name: where for name, where in found.items() if name not in KNOWN and name not in UNKNOWN_ON_PURPOSE}
    assert missing == {}
    assert not UNKNOWN_ON_PURPOSE & set(KNOWN)


def test_the_test_environment_is_clean() -> None:
    """Whatever the suite or CI exports (MARKET_TEST_SERVER, MARKET_REDIS_URL, ...) is known."""
    check_environment(os.environ)


# ------------------------------------------------------------------------------------------------
# The ``market`` command: one line, exit 2, no traceback


#: a Redis nobody answers at and a prefix nobody uses
NOWHERE = {"MARKET_REDIS_URL": "redis://127.0.0.1:1/0", "MARKET_PREFIX": "strictcfgtest"}


def market(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], expected: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"market: error: {expected}"]
    assert proc.stdout == ""


def test_ingest_with_a_misspelt_setting_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('symbolz = ["BTCUSDT"]\n')
    assert_one_line_error(
        market("ingest", "--config", str(bad), env=NOWHERE),
        f"unknown setting 'symbolz' in {bad} (top level); did you mean 'symbols'?",
    )


def test_ingest_with_a_misspelt_setting_named_by_market_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\ncapcity = 5\n")
    assert_one_line_error(
        market("ingest", env={"MARKET_CONFIG": str(bad), **NOWHERE}),
        f"unknown setting 'capcity' in {bad} [queue]; did you mean 'capacity'?",
    )


@pytest.mark.parametrize(
    "args",
    [("ingest",), ("status",), ("tail", "md:binance:BTCUSDT:trade"), ("replay", "md:binance:BTCUSDT:trade"),
     ("verify",), ("ctl", "show"), ("ctl", "pause", "binance:*:trade")],
    ids=lambda a: " ".join(a),
)
def test_every_command_refuses_an_unknown_variable(args: tuple[str, ...]) -> None:
    """Before connecting to anything: the variable a typo meant (MARKET_REDIS_URL) matters to every command.
    (The Redis URL points nowhere, so a command the check missed could not change anything.)"""
    assert_one_line_error(
        market(*args, env={"MARKET_REDIS_ULR": "redis://127.0.0.1:1/0", **NOWHERE}),
        "unknown environment variable MARKET_REDIS_ULR; did you mean MARKET_REDIS_URL?",
    )


def test_status_refuses_an_unknown_variable_with_nothing_close() -> None:
    assert_one_line_error(
        market("status", env={"MARKET_NOTHING_LIKE_IT": "1", **NOWHERE}),
        "unknown environment variable MARKET_NOTHING_LIKE_IT",
    )
