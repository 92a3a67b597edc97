"""consumer_sdk.core: the shared kernel stays light, and the helpers that used to be repeated exist once.

- importing the core (or ``consumer_sdk`` itself) loads neither the consumer nor the ingestor, the
  distributor or ``ops``; ``market tail``, ``replay``, ``ctl`` and ``status`` get their Redis client from
  the core, so the command modules do not load the ingestor to reach Redis;
- one Redis error classifier: the writer's reasons and the readers' kinds are both read from it, and
  the callers' stakes differ only where documented (OOM: a reader raises, the writer holds its ticks);
- one redactor, one prefix rule, one backoff.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
import subprocess
import sys

import pytest
import redis.exceptions as rexc

import consumer_sdk.core
from consumer_sdk.core.backoff import Backoff, backoff_delays
from consumer_sdk.core.errors import (
    ConfigError,
    Fatal,
    InvalidTick,
    MarketError,
    Retryable,
    TransientError,
    TrimmedError,
)
from consumer_sdk.core.keys import (
    PREFIX_RE,
    check_prefix,
    control_audit_key,
    control_changed_channel,
    control_state_key,
    heartbeat_key,
    heartbeat_set_key,
)
from consumer_sdk.core.redis import FAULT_REASONS, ErrorKind, classify, classify_redis, translate
from consumer_sdk.core.urls import public_url, redact_url
from distributor.writer import REASONS, Action, classify_error
from ingestor.rest import RestRefused, RestRetryable

CORE_MODULES = sorted(
    info.name for info in pkgutil.iter_modules(consumer_sdk.core.__path__, prefix="consumer_sdk.core.")
)
#: what the core must never pull in
FOREIGN = ("ingestor", "distributor", "ops", "websockets", "httpx", "consumer_sdk.consumer", "consumer_sdk.replay")


def loaded_after(code: str) -> list[str]:
    """The foreign modules loaded once ``code`` ran in a fresh interpreter."""
    probe = (
        f"import sys\n{code}\n"
        f"print(','.join(sorted(m for m in sys.modules if m.startswith({FOREIGN!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    return [m for m in out.stdout.strip().split(",") if m]


def test_the_core_has_the_modules_the_packages_share() -> None:
    assert [
        f"consumer_sdk.core.{m}"
        for m in (
            "aio", "backoff", "env", "errors", "handler", "health", "heap", "keys", "latency", "log", "loop", "redis",
            "sequencing", "server", "tick", "untrusted", "urls",
        )
    ] == CORE_MODULES


def test_importing_the_core_loads_nothing_else() -> None:
    assert loaded_after("; ".join(f"import {m}" for m in CORE_MODULES)) == []


def test_importing_the_sdk_loads_the_consumer_only_when_asked() -> None:
    assert loaded_after("import consumer_sdk") == []
    assert loaded_after("from consumer_sdk import Tick, Pattern, TransientError") == []
    loaded = loaded_after("from consumer_sdk import Consumer")
    assert "consumer_sdk.consumer" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("ingestor", "distributor", "ops")]


@pytest.mark.parametrize("module", ["ops.ctl", "ops.status", "ops.cli"])
def test_command_modules_do_not_load_the_ingestor(module: str) -> None:
    loaded = loaded_after(f"import {module}")
    assert not [m for m in loaded if m.split(".")[0] == "ingestor"], loaded


def test_tail_and_replay_reach_redis_without_the_ingestor(redis_url: str, prefix: str) -> None:
    """``market replay`` of an empty stream, run whole: it connects through the core, prints nothing."""
    code = (
        "import os, ops.cli\n"
        f"os.environ['MARKET_REDIS_URL'] = {redis_url!r}\n"
        "try:\n"
        f"    ops.cli.main(['replay', '{prefix}:binance:BTCUSDT:trade'])\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "ops.cli._check_key('md:binance:BTCUSDT:trade')"
    )
    loaded = loaded_after(code)
    assert not [m for m in loaded if m.split(".")[0] == "ingestor"], loaded


# -- one error model ----------------------------------------------------------------------------------------


def test_every_project_error_is_retryable_or_fatal() -> None:
    assert [c for c in (TransientError, RestRetryable) if not issubclass(c, Retryable)] == []
    assert [c for c in (ConfigError, InvalidTick, TrimmedError, RestRefused) if not issubclass(c, Fatal)] == []
    assert issubclass(Retryable, MarketError) and issubclass(Fatal, MarketError)
    assert not issubclass(Retryable, Fatal) and not issubclass(Fatal, Retryable)
    retryable = (TransientError("x").retryable, ConfigError("x").retryable, MarketError("x").retryable)
    assert retryable == (True, False, False)
    assert RestRetryable("x", kind="deadline").retryable and not RestRefused("x", kind="bad_row").retryable


@pytest.mark.parametrize(
    ("error", "reason", "kind"),
    [
        (rexc.ConnectionError("x"), "unreachable", ErrorKind.TRANSIENT),
        (rexc.TimeoutError("x"), "unreachable", ErrorKind.TRANSIENT),
        (ConnectionRefusedError(), "unreachable", ErrorKind.TRANSIENT),
        (rexc.BusyLoadingError("x"), "loading", ErrorKind.TRANSIENT),
        (rexc.ReadOnlyError("x"), "readonly", ErrorKind.TRANSIENT),
        (rexc.MasterDownError("x"), "masterdown", ErrorKind.TRANSIENT),
        (rexc.ClusterDownError("x"), "clusterdown", ErrorKind.TRANSIENT),
        (rexc.TryAgainError("x"), "tryagain", ErrorKind.TRANSIENT),
        (TransientError("x"), "transient", ErrorKind.TRANSIENT),
        ("BUSY Redis is busy running a script", "busy", ErrorKind.TRANSIENT),
        ("LOADING Redis is loading the dataset in memory", "loading", ErrorKind.TRANSIENT),
        (rexc.ResponseError("NOGROUP No such key"), "nogroup", ErrorKind.NOGROUP),
        (rexc.ResponseError("UNBLOCKED the stream key no longer exists"), "nogroup", ErrorKind.NOGROUP),
        (rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."), "oom", ErrorKind.FATAL),
        ("OOM command not allowed when used memory > 'maxmemory'.", "oom", ErrorKind.FATAL),
        (rexc.NoScriptError("x"), "noscript", ErrorKind.FATAL),
        (rexc.MovedError("1 127.0.0.1:7000"), "moved", ErrorKind.FATAL),
        ("MISCONF snapshots failing", "misconf", ErrorKind.FATAL),
        ("NOREPLICAS Not enough good replicas", "noreplicas", ErrorKind.FATAL),
        (rexc.NoPermissionError("x"), "noperm", ErrorKind.FATAL),
        (rexc.AuthenticationError("x"), "auth", ErrorKind.FATAL),
        (rexc.AuthorizationError("x"), "auth", ErrorKind.FATAL),
        ("WRONGPASS invalid username-password pair", "auth", ErrorKind.FATAL),
        (rexc.ResponseError("WRONGTYPE Operation against a key"), "wrongtype", ErrorKind.FATAL),
        ("ERR The ID specified in XADD is equal or smaller", "bad_id", ErrorKind.FATAL),
        (rexc.ResponseError("Invalid stream ID specified as stream command argument"), "bad_id", ErrorKind.FATAL),
        (rexc.ResponseError("BUSYGROUP Consumer Group name already exists"), "other", ErrorKind.FATAL),
        (RuntimeError("x"), "other", ErrorKind.FATAL),
    ],
)
def test_one_classifier_for_every_redis_error(error: BaseException | str, reason: str, kind: ErrorKind) -> None:
    fault = classify_redis(error)
    assert (fault.reason, fault.kind, fault.retryable) == (reason, kind, kind is ErrorKind.TRANSIENT)
    assert reason in FAULT_REASONS
    # the writer's reason is the classifier's, or "other" for what a write never meets
    assert classify_error(error).reason == (reason if reason in REASONS else "other")
    if not isinstance(error, str):
        assert classify(error) is kind


def test_oom_is_fatal_to_a_reader_and_held_by_the_writer() -> None:
    """The one documented difference of stakes: a reader stops (nothing is lost), the writer keeps its ticks."""
    oom = rexc.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    assert classify(oom) is ErrorKind.FATAL
    assert type(translate(oom)) is MarketError
    assert classify_error(oom).action is Action.RETRY


def test_every_writer_reason_comes_from_the_classifier() -> None:
    assert set(REASONS) <= set(FAULT_REASONS)
    assert set(FAULT_REASONS) - set(REASONS) == {"nogroup", "transient"}


# -- one redactor, one prefix rule, the keys beside the streams ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted", "public"),
    [
        ("redis://app:s3cret@redis:6379/0", "redis://app:***@redis:6379/0", "redis://app:***@redis:6379/0"),
        ("redis://:pw@h:1/0?x=1#f", "redis://:***@h:1/0?x=1#f", "redis://:***@h:1/0"),
        ("redis://app@h:1/0?token=t", "redis://app@h:1/0?token=t", "redis://app@h:1/0"),
        ("wss://stream.binance.com:9443/stream?x=1#f", "wss://stream.binance.com:9443/stream?x=1#f",
         "wss://stream.binance.com:9443/stream"),
        ("redis://[::1", "<unparseable URL>", "<unparseable URL>"),
    ],
)
def test_one_redactor(url: str, redacted: str, public: str) -> None:
    assert (redact_url(url), public_url(url)) == (redacted, public)


@pytest.mark.parametrize("prefix", ["md", "a", "soak.v2-x_1", "x" * 64])
def test_the_prefix_rule_accepts(prefix: str) -> None:
    assert check_prefix(prefix) == prefix and PREFIX_RE.match(prefix)


@pytest.mark.parametrize("prefix", ["", "md:x", "a b", "x" * 65, "é"])
def test_the_prefix_rule_refuses_naming_the_prefix_and_where_it_came_from(prefix: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_prefix(prefix, "MARKET_PREFIX")
    assert str(caught.value) == (
        f"invalid stream prefix {prefix!r} (MARKET_PREFIX): 1 to 64 letters, digits, '_', '.' or '-'"
    )
    with pytest.raises(ConfigError, match=r"^invalid stream prefix .*: 1 to 64"):
        check_prefix(prefix)


def test_the_prefix_rule_is_the_one_every_command_uses() -> None:
    for module in ("ingestor.config", "ops.ctl", "ops.status"):
        source = importlib.import_module(module).__file__
        assert source is not None
        with open(source) as f:
            text = f.read()
        assert "{1,64}" not in text, f"{module} has its own copy of the prefix rule"


def test_keys_beside_the_streams() -> None:
    assert heartbeat_key("md", "h-1-a") == "md:_hb:ingestor:h-1-a"
    assert heartbeat_set_key("md") == "md:_hb:ingestors"
    assert control_state_key("md") == "md:_ctl:state"
    assert control_audit_key("md") == "md:_ctl:audit"
    assert control_changed_channel("md") == "md:_ctl:changed"


def test_one_backoff_for_the_readers_too() -> None:
    """``backoff_delays`` is a :class:`Backoff` that waits at least half of each ceiling."""
    ours = backoff_delays(initial=0.05, factor=2.0, cap=2.0, rng=random.Random(5))
    same = Backoff(base=0.05, cap=2.0, factor=2.0, rng=random.Random(5), floor=0.5)
    assert [next(ours) for _ in range(30)] == [same.next_delay() for _ in range(30)]
