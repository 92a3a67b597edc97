"""The ``venue`` setting: flag, ``MARKET_VENUE``, TOML ``venue = "binance_usdm"``; each venue's hosts, channels and
symbols; an unknown venue refused in one line naming the known ones."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from consumer_sdk.core.errors import ConfigError
from ingestor.config import IngestSettings, load_settings


def load(flags: dict[str, Any] | None = None, env: dict[str, str] | None = None, toml: str | None = None,
         tmp_path: Path | None = None) -> IngestSettings:
    path = None
    if toml is not None:
        assert tmp_path is not None
        file = tmp_path / "market.toml"
        file.write_text(toml)
        path = str(file)
    return load_settings(flags or {}, env or {}, path)


def test_binance_spot_stays_the_default() -> None:
    s = load()
    assert (s.venue, s.url, s.rest_url) == ("binance", "wss://stream.binance.com:9443", "https://api.binance.com")


def test_usdm_from_toml_takes_its_own_hosts(tmp_path: Path) -> None:
    s = load(toml='venue = "binance_usdm"\nsymbols = ["BTCUSDT"]\nchannels = ["agg_trade", "mark_price", "depth"]\n',
             tmp_path=tmp_path)
    assert (s.venue, s.url, s.rest_url) == ("binance_usdm", "wss://fstream.binance.com", "https://fapi.binance.com")
    assert s.channels == ("agg_trade", "mark_price", "depth")


def test_coinm_from_the_environment_with_its_symbols() -> None:
    s = load(env={"MARKET_VENUE": "binance_coinm", "MARKET_SYMBOLS": "btcusd_perp,ETHUSD_210924",
                  "MARKET_CHANNELS": "depth,agg_trade"})
    assert (s.venue, s.url, s.rest_url) == ("binance_coinm", "wss://dstream.binance.com", "https://dapi.binance.com")
    assert s.symbols == ("BTCUSD_PERP", "ETHUSD_210924")


def test_the_flag_wins_and_a_test_host_keeps_its_own_rest_base(tmp_path: Path) -> None:
    s = load(flags={"venue": "binance_usdm", "url": "ws://venue.test:9443", "channels": "agg_trade"},
             env={"MARKET_VENUE": "binance_coinm"}, toml='venue = "binance"\n', tmp_path=tmp_path)
    assert (s.venue, s.url, s.rest_url) == ("binance_usdm", "ws://venue.test:9443", "http://venue.test:9443")


def test_an_unknown_venue_is_one_line_naming_the_known_ones(tmp_path: Path) -> None:
    for given in ({"flags": {"venue": "kraken"}}, {"env": {"MARKET_VENUE": "kraken"}},
                  {"toml": 'venue = "kraken"\n', "tmp_path": tmp_path}):
        with pytest.raises(ConfigError) as refused:
            load(**given)
        assert str(refused.value) == "unknown venue 'kraken': expected binance, binance_coinm, binance_usdm or okx"


@pytest.mark.parametrize(
    ("venue", "channels", "message"),
    [
        ("binance", "mark_price", "'mark_price' is not available on binance"),
        ("binance_usdm", "trade", "'trade' is not available on binance_usdm"),
        ("binance_usdm", "agg_trade,kline_1s", "unknown channel 'kline_1s' on binance_usdm"),
        ("binance_coinm", "trade", "'trade' is not available on binance_coinm"),
    ],
)
def test_each_venue_refuses_the_channels_it_lacks(venue: str, channels: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(flags={"venue": venue, "channels": channels})


def test_a_futures_depth_speed_the_venue_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"depth\.speed_ms 1000 is not available on binance_usdm"):
        load(toml='venue = "binance_usdm"\nchannels = ["depth"]\n[depth]\nspeed_ms = 1000\n', tmp_path=tmp_path)



def test_market_ingest_on_an_unknown_venue_is_one_line_and_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "ingest", "--spill-dir", ""], capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}, "MARKET_VENUE": "kraken"},
    )
    assert (proc.returncode, proc.stderr) == (
        2, "market: error: unknown venue 'kraken': expected binance, binance_coinm, binance_usdm or okx\n"
    )


def test_market_ingest_venue_flag_over_the_environment() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ops.cli", "ingest", "--venue", "okx_v9", "--spill-dir", ""], capture_output=True,
        text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}, "MARKET_VENUE": "binance"},
    )
    assert (proc.returncode, proc.stderr) == (
        2, "market: error: unknown venue 'okx_v9': expected binance, binance_coinm, binance_usdm or okx\n"
    )
