"""Several venues in one process: ``[venues.<name>]`` tables read by :func:`ingestor.config.load_venues` (pure)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from consumer_sdk.core.errors import ConfigError
from ingestor import venues as venue_profiles
from ingestor.config import IngestSettings, SubscriberSpec, load_settings, load_venues, subscribers_for

THREE = """
prefix = "mv"
metrics_port = 9999
spill_dir = "/var/spill"
[queue]
capacity = 5000
[depth]
limit = 500
max_buffer = 77
[venues.binance]
symbols = ["BTCUSDT", "ETHUSDT"]
channels = ["trade", "depth"]
[venues.binance_usdm]
symbols = ["BTCUSDT"]
channels = ["agg_trade", "mark_price"]
[venues.binance_coinm]
url = "ws://127.0.0.1:9001"
symbols = "btcusd_perp"
channels = ["depth"]
[venues.binance_coinm.depth]
limit = 100
"""


def load(toml: str, tmp_path: Path, flags: dict[str, Any] | None = None,
         env: dict[str, str] | None = None) -> tuple[IngestSettings, ...]:
    path = tmp_path / "market.toml"
    path.write_text(toml)
    return load_venues(flags or {}, env or {}, str(path))


def refused(toml: str, tmp_path: Path, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(toml, tmp_path, **kwargs)
    text = str(info.value)
    assert "\n" not in text
    return text.replace(str(tmp_path / "market.toml"), "market.toml")


def test_one_settings_per_table_in_file_order_each_with_its_own_hosts_and_streams(tmp_path: Path) -> None:
    spot, usdm, coinm = load(THREE, tmp_path)
    assert [s.venue for s in (spot, usdm, coinm)] == ["binance", "binance_usdm", "binance_coinm"]
    assert (spot.url, spot.rest_url) == ("wss://stream.binance.com:9443", "https://api.binance.com")
    assert (usdm.url, usdm.rest_url) == ("wss://fstream.binance.com", "https://fapi.binance.com")
    assert (coinm.url, coinm.rest_url) == ("ws://127.0.0.1:9001", "http://127.0.0.1:9001")
    assert (spot.symbols, usdm.symbols, coinm.symbols) == (("BTCUSDT", "ETHUSDT"), ("BTCUSDT",), ("BTCUSD_PERP",))
    assert (spot.channels, usdm.channels, coinm.channels) == (("trade", "depth"), ("agg_trade", "mark_price"),
                                                              ("depth",))


def test_the_rest_is_shared_and_each_venue_spills_to_its_own_subdirectory(tmp_path: Path) -> None:
    spot, usdm, coinm = load(THREE, tmp_path)
    for s in (spot, usdm, coinm):
        assert (s.prefix, s.metrics_port, s.queue_capacity) == ("mv", 9999, 5000)
    assert [s.spill_dir for s in (spot, usdm, coinm)] == [
        os.path.join("/var/spill", v) for v in ("binance", "binance_usdm", "binance_coinm")
    ]
    # [depth] is the tables' default, a table's [venues.<name>.depth] overrides it key by key
    assert (spot.depth.limit, spot.depth.max_buffer) == (500, 77)
    assert (coinm.depth.limit, coinm.depth.max_buffer) == (100, 77)


def test_spilling_off_stays_off_for_every_venue(tmp_path: Path) -> None:
    assert [s.spill_dir for s in load(THREE.replace('"/var/spill"', '""'), tmp_path)] == ["", "", ""]


def test_top_level_symbols_and_channels_are_the_tables_defaults(tmp_path: Path) -> None:
    spot, coinm = load('symbols = ["BTCUSDT"]\nchannels = ["agg_trade"]\n[venues.binance]\n'
                       '[venues.binance_coinm]\nsymbols = ["BTCUSD_PERP"]\n', tmp_path)
    assert (spot.symbols, spot.channels) == (("BTCUSDT",), ("agg_trade",))
    assert (coinm.symbols, coinm.channels) == (("BTCUSD_PERP",), ("agg_trade",))


def test_a_file_without_tables_is_the_one_venue_load_settings_reads(tmp_path: Path) -> None:
    toml = 'venue = "binance_usdm"\nsymbols = ["BTCUSDT"]\nchannels = ["agg_trade"]\n'
    (tmp_path / "one.toml").write_text(toml)
    assert load(toml, tmp_path) == (load_settings({}, {}, str(tmp_path / "one.toml")),)
    flags = {"venue": "binance_coinm", "symbols": "BTCUSD_PERP", "channels": "agg_trade"}
    assert load_venues(flags, {}) == (load_settings(flags, {}),)


def test_load_settings_refuses_tables_it_cannot_hold(tmp_path: Path) -> None:
    (tmp_path / "market.toml").write_text(THREE)
    with pytest.raises(ConfigError, match=r"\[venues\.\*\] tables describe several venues"):
        load_settings({}, {}, str(tmp_path / "market.toml"))


def test_an_unknown_venue_is_one_line_naming_the_known_ones(tmp_path: Path) -> None:
    known = "binance, binance_coinm, binance_usdm or okx"
    assert refused('[venues.kraken]\nsymbols = ["XBTUSD"]\n', tmp_path) == (
        f"unknown venue 'kraken' in market.toml [venues]: expected {known}"
    )
    assert refused('[venues.binance_usd]\nsymbols = ["BTCUSDT"]\n', tmp_path) == (
        f"unknown venue 'binance_usd' in market.toml [venues]: expected {known}; did you mean 'binance_usdm'?"
    )


def test_an_unknown_table_key_is_one_line_naming_the_known_ones(tmp_path: Path) -> None:
    assert refused('[venues.binance]\nsymbol = ["BTCUSDT"]\n', tmp_path) == (
        "unknown setting 'symbol' in market.toml [venues.binance]: expected channels, depth, rest_url, symbols or "
        "url; did you mean 'symbols'?"
    )
    # a shared setting belongs at the top of the file, not in a venue's table
    assert refused('[venues.binance]\nsymbols = ["BTCUSDT"]\nprefix = "x"\n', tmp_path).startswith(
        "unknown setting 'prefix' in market.toml [venues.binance]: expected channels, depth, rest_url, symbols or url"
    )
    assert refused('[venues.binance]\nsymbols = ["BTCUSDT"]\n[venues.binance.depth]\nlimt = 5\n', tmp_path) == (
        "unknown setting 'limt' in market.toml [venues.binance.depth]; did you mean 'limit'?"
    )


@pytest.mark.parametrize("symbols", ['["BTCUSDT", "ETHUSDT", "BTCUSDT"]', '["BTCUSDT", "btcusdt"]',
                                     '"BTCUSDT,ETHUSDT,BTCUSDT"'])
def test_a_symbol_listed_twice_for_one_venue_is_refused(tmp_path: Path, symbols: str) -> None:
    assert refused(f"[venues.binance]\nsymbols = {symbols}\n", tmp_path) == (
        "market.toml [venues.binance]: symbol 'BTCUSDT' is listed twice"
    )


def test_the_same_symbol_on_two_venues_is_two_streams(tmp_path: Path) -> None:
    spot, usdm = load('[venues.binance]\nsymbols = ["BTCUSDT"]\n[venues.binance_usdm]\nsymbols = ["BTCUSDT"]\n'
                      'channels = ["agg_trade"]\n', tmp_path)
    assert spot.symbols == usdm.symbols == ("BTCUSDT",)


def test_a_table_without_symbols_is_refused(tmp_path: Path) -> None:
    assert refused('[venues.binance]\nchannels = ["trade"]\n', tmp_path) == (
        "market.toml [venues.binance]: no symbols: set symbols = [...] in the table"
    )


def test_an_empty_venues_table_is_refused(tmp_path: Path) -> None:
    assert refused("[venues]\n", tmp_path) == (
        "market.toml: [venues] names no venue: add a [venues.<name>] table per venue"
    )


@pytest.mark.parametrize(("given", "message"), [
    ({"flags": {"venue": "binance"}},
     "--venue names one venue but market.toml has [venues.*] tables: give either one venue or the tables"),
    ({"env": {"MARKET_VENUE": "binance_usdm"}},
     "MARKET_VENUE names one venue but market.toml has [venues.*] tables: give either one venue or the tables"),
    ({"top": 'venue = "binance"\n'},
     "venue = ... at the top of market.toml names one venue but market.toml has [venues.*] tables: give either one "
     "venue or the tables"),
    ({"flags": {"symbols": "BTCUSDT"}},
     "--symbols is one venue's setting but market.toml has [venues.*] tables: set symbols in each table"),
    ({"flags": {"rest_url": "http://x"}},
     "--rest-url is one venue's setting but market.toml has [venues.*] tables: set rest_url in each table"),
    ({"env": {"MARKET_URL": "ws://x:1"}},
     "MARKET_URL is one venue's setting but market.toml has [venues.*] tables: set url in each table"),
    ({"env": {"MARKET_CHANNELS": "trade"}},
     "MARKET_CHANNELS is one venue's setting but market.toml has [venues.*] tables: set channels in each table"),
    ({"top": 'url = "ws://x:1"\n'},
     "url = ... at the top of market.toml is one venue's setting but market.toml has [venues.*] tables: set url in "
     "each table"),
])
def test_one_venue_settings_with_tables_are_a_clear_error(tmp_path: Path, given: dict[str, Any], message: str) -> None:
    toml = given.get("top", "") + '[venues.binance]\nsymbols = ["BTCUSDT"]\n'
    assert refused(toml, tmp_path, flags=given.get("flags"), env=given.get("env")).replace(
        str(tmp_path / "market.toml"), "market.toml"
    ) == message


def test_a_venues_own_problem_names_its_table(tmp_path: Path) -> None:
    assert refused('[venues.binance]\nsymbols = ["BTCUSDT"]\nchannels = ["mark_price"]\n', tmp_path).startswith(
        "market.toml [venues.binance]: channel 'mark_price' is not available on binance"
    )
    assert refused('[venues.binance_usdm]\nsymbols = ["BTCUSDT"]\nurl = "http://x"\n', tmp_path).startswith(
        "market.toml [venues.binance_usdm]: invalid venue URL 'http://x'"
    )


def test_shards_with_several_venues_are_refused_and_with_one_kept(tmp_path: Path) -> None:
    shards = "[shards]\ncount = 4\n"
    assert refused(THREE + shards, tmp_path).startswith(
        "market.toml: [shards] with several venues is not supported (shard leases are named per prefix"
    )
    (one,) = load('[venues.binance_usdm]\nsymbols = ["BTCUSDT"]\nchannels = ["agg_trade"]\n' + shards, tmp_path)
    assert one.shards.count == 4


def test_each_venue_attaches_the_subscribers_its_patterns_name(tmp_path: Path) -> None:
    toml = THREE + """
[[subscribers]]
target = "pkg.mod:every"
[[subscribers]]
target = "pkg.mod:futures"
patterns = ["binance_*:BTCUSDT:agg_trade", "binance_coinm:*:depth"]
[[subscribers]]
target = "pkg.mod:spot"
patterns = ["binance:*:trade"]
"""
    spot, usdm, coinm = load(toml, tmp_path, flags={"subscribers": ("pkg.flag:all",)})
    assert [(s.target, s.patterns) for s in spot.subscribers] == [
        ("pkg.flag:all", ("*:*:*",)), ("pkg.mod:every", ("*:*:*",)), ("pkg.mod:spot", ("binance:*:trade",)),
    ]
    assert [(s.target, s.patterns) for s in usdm.subscribers] == [
        ("pkg.flag:all", ("*:*:*",)), ("pkg.mod:every", ("*:*:*",)),
        ("pkg.mod:futures", ("binance_*:BTCUSDT:agg_trade",)),
    ]
    assert [(s.target, s.patterns) for s in coinm.subscribers] == [
        ("pkg.flag:all", ("*:*:*",)), ("pkg.mod:every", ("*:*:*",)),
        ("pkg.mod:futures", ("binance_*:BTCUSDT:agg_trade", "binance_coinm:*:depth")),
    ]


def test_a_subscriber_no_venue_matches_is_refused(tmp_path: Path) -> None:
    toml = THREE + '[[subscribers]]\ntarget = "pkg.mod:h"\npatterns = ["kraken:*:trade"]\n'
    assert refused(toml, tmp_path) == (
        "subscriber 'pkg.mod:h': its patterns kraken:*:trade match none of the venues "
        "(binance, binance_usdm, binance_coinm)"
    )


def test_subscribers_for_keeps_only_the_venues_patterns() -> None:
    spec = SubscriberSpec("m:h", patterns=("binance:*:*", "binance_usdm:BTCUSDT:trade", "b*:*:*"))
    assert subscribers_for([spec], "binance_usdm")[0].patterns == ("binance_usdm:BTCUSDT:trade", "b*:*:*")
    assert subscribers_for([spec], "okx") == ()


def test_a_venue_profile_that_lands_is_known_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing names a venue but :data:`ingestor.venues.VENUES`: a profile added there is a table name at once."""
    profile = dataclasses.replace(venue_profiles.VENUES["binance_coinm"], name="venue_x", ws_url="wss://x.example")
    monkeypatch.setitem(venue_profiles.VENUES, "venue_x", profile)  # type: ignore[arg-type]
    _, other = load('[venues.binance]\nsymbols = ["BTCUSDT"]\n[venues.venue_x]\nsymbols = ["BTCUSD_PERP"]\n'
                    'channels = ["agg_trade"]\n', tmp_path)
    assert (other.venue, other.url, other.symbols) == ("venue_x", "wss://x.example", ("BTCUSD_PERP",))


def test_the_readme_example_loads(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Several venues", 1)[1]
    example = section.split("```toml", 1)[1].split("```", 1)[0]
    spot, usdm, okx = load(example, tmp_path)
    assert [s.venue for s in (spot, usdm, okx)] == ["binance", "binance_usdm", "okx"]
    assert (usdm.channels, usdm.depth.limit, spot.depth.limit) == (("agg_trade", "mark_price"), 500, 1000)
    assert (okx.symbols, okx.channels, okx.url) == (("BTC-USDT", "BTC-USDT-SWAP"), ("trade", "book_ticker"),
                                                    "wss://ws.okx.com:8443")
