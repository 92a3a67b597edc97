"""Bad input to the ``market`` command: one line on stderr naming the problem, exit status 2, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from ops.redis_server import free_port


def market(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("market: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_ingest_bad_url() -> None:
    assert_one_line_error(market("ingest", "--url", "not-a-url"), "invalid venue URL", "not-a-url")


def test_ingest_unknown_channel() -> None:
    assert_one_line_error(market("ingest", "--channels", "trade,depth5"), "unknown channel", "depth5")


def test_ingest_bad_symbol() -> None:
    assert_one_line_error(market("ingest", "--symbols", "BTC USDT"), "invalid symbol")


def test_ingest_unreadable_config(tmp_path: object) -> None:
    assert_one_line_error(market("ingest", "--config", "/nonexistent/market.toml"), "cannot read config file")


def test_ingest_invalid_toml(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bad.toml")
    with open(path, "w") as f:
        f.write("symbols = [\n")
    assert_one_line_error(market("ingest", "--config", path), "not valid TOML")


def test_ingest_bad_policy() -> None:
    assert_one_line_error(market("ingest", "--queue-policy", "drop_all"), "unknown queue policy")


def test_unknown_flag() -> None:
    assert_one_line_error(market("ingest", "--bogus"), "--bogus")


def test_redis_unreachable_hides_password() -> None:
    port = free_port()
    proc = market(
        "ingest", "--url", "ws://127.0.0.1:1", "--metrics-port", "0",
        env={"MARKET_REDIS_URL": f"redis://alice:s3cret-pw@127.0.0.1:{port}/0"},
    )
    assert_one_line_error(proc, "Redis unreachable", "alice:***@")
    assert "s3cret-pw" not in proc.stderr + proc.stdout


def test_bad_redis_url_scheme() -> None:
    proc = market("ingest", env={"MARKET_REDIS_URL": "http://127.0.0.1:6379"})
    assert_one_line_error(proc, "invalid Redis URL")


def test_metrics_port_in_use(redis_url: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = market(
            "ingest", "--url", "ws://127.0.0.1:1", "--metrics-port", str(port), env={"MARKET_REDIS_URL": redis_url}
        )
    assert_one_line_error(proc, "metrics", str(port))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("replay", "md:binance:BTCUSDT:trade", "--start", "yesterday"), "yesterday"),
        (("replay", "not-a-key"), "not-a-key"),
        (("replay", "md:binance:BTCUSDT:trade", "--format", "xml"), "--format"),
        (("tail", "md:binance"), "md:binance"),
        (("simulate", "--rate", "-5"), "--rate"),
        (("simulate", "--replay", "/nonexistent.jsonl"), "--replay"),
        (("simulate", "--batch-interval", "5"), "batch_interval"),
        (("simulate", "--batch-interval", "0"), "batch_interval"),
        (("demo", "--duration", "0"), "--duration"),
    ],
)
def test_other_commands_bad_input(args: tuple[str, ...], needle: str) -> None:
    assert_one_line_error(market(*args), needle)


def test_find_tls_names_a_server_built_with_tls_or_says_there_is_none() -> None:
    """The bundled Valkey has no TLS; the TLS tests and ``ops/dev.sh test`` look for a server that has."""
    from ops.redis_server import bundled_redis_server, tls_capable

    bundled = bundled_redis_server()
    assert bundled is not None and not tls_capable(bundled)
    only_bundled = subprocess.run(
        [sys.executable, "-m", "ops.redis_server", "--find-tls"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "MARKET_REDIS_SERVER": bundled},
    )
    assert (only_bundled.returncode, only_bundled.stdout) == (2, "")
    assert only_bundled.stderr == "error: no supported Redis or Valkey server built with TLS was found\n"
