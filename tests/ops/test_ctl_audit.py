"""The audit trail of ``market ctl``: every change appends exactly one record to ``<prefix>:_ctl:audit`` in the
same script call as the change (who, host, Redis user, server and client clocks, command and arguments, versions,
reason); ``market ctl history`` shows them newest first; what the stream holds is hostile input.

On the real shared Redis with a unique prefix (the ``prefix`` fixture deletes its keys); the Redis-user tests
create ACL users on a private redis-server of their own.
"""

from __future__ import annotations

import getpass
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
from typer.testing import CliRunner

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import control_audit_key, control_state_key
from ingestor.control_plane import (
    AUDIT_FIELDS,
    AUDIT_LIMITS,
    AUDIT_MAXLEN,
    MAX_REASON,
    AuditEntry,
    audit_fields,
    check_text,
    parse_audit,
)
from ops.ctl import app as ctl_app
from ops.redis_server import RedisServer

Invoke = Callable[..., Any]


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def make_ctl(url: str, prefix: str, **extra: str | None) -> Invoke:
    runner = CliRunner()
    env: dict[str, str | None] = {"MARKET_REDIS_URL": url, "MARKET_PREFIX": prefix, "MARKET_ACTOR": None, **extra}

    def invoke(*args: str) -> Any:
        return runner.invoke(ctl_app, list(args), env=env)

    return invoke


@pytest.fixture
def ctl(redis_url: str, prefix: str) -> Invoke:
    return make_ctl(redis_url, prefix)


def server_ms(c: redis.Redis) -> int:
    sec, usec = c.time()
    return int(sec) * 1000 + int(usec) // 1000


def records(c: redis.Redis, prefix: str) -> list[tuple[str, dict[str, str]]]:
    """The audit stream as stored, oldest first, decoded."""
    return [
        (i.decode(), {k.decode(): v.decode() for k, v in fields.items()})
        for i, fields in c.xrange(control_audit_key(prefix))
    ]


def history_json(ctl: Invoke, *args: str) -> list[dict[str, Any]]:
    r = ctl("history", "--json", *args)
    assert r.exit_code == 0, r.output
    return [orjson.loads(line) for line in r.stdout.splitlines()]


# -- the record's rules, pure ------------------------------------------------------------------------------------


def good_fields(**over: str) -> dict[str, str]:
    fields = {"server_ms": "1700000000123", **audit_fields(
        who="alice", host="desk", redis_user="ops", client_ms=1700000000120, action="pause",
        target="binance:BTCUSDT:trade", detail={"unsubscribe": True}, before=4, after=5, reason="incident 42",
    )}
    fields.update(over)
    return fields


def pairs(fields: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in fields.items()]


def test_a_record_reads_back_as_written() -> None:
    fields = good_fields()
    assert tuple(fields) == AUDIT_FIELDS  # the order they are written in
    assert parse_audit("1-0", pairs(fields)) == AuditEntry(
        id="1-0", who="alice", host="desk", redis_user="ops", server_ms=1700000000123, client_ms=1700000000120,
        action="pause", target="binance:BTCUSDT:trade", detail={"unsubscribe": True}, before=4, after=5,
        reason="incident 42",
    )
    no_reason = {k: v for k, v in fields.items() if k != "reason"}
    assert parse_audit("1-0", pairs(no_reason)).reason == ""


@pytest.mark.parametrize(
    ("record", "needle"),
    [
        (pairs(good_fields())[:-3], "missing fields before, after"),
        ([*pairs(good_fields()), (b"who", b"bob")], "field 'who' given twice"),
        ([*pairs(good_fields()), (b"note", b"x")], "unexpected field 'note'"),
        ([(b"who\xff", b"x")], "not UTF-8"),
        ([*pairs(good_fields(who="x"))[:1], (b"who", b"\xc3\x28")], "not UTF-8"),
        (pairs(good_fields(who="evil\x1b[31m")), "field 'who': control and invisible characters"),
        (pairs(good_fields(reason="a\u202eb")), "field 'reason': control and invisible characters"),
        (pairs(good_fields(reason="r" * (MAX_REASON + 1))), f"field 'reason': at most {MAX_REASON} characters"),
        (pairs(good_fields(host="h" * 256)), "field 'host': at most 255 characters"),
        (pairs(good_fields(before="-1")), "field 'before': not a decimal number"),
        (pairs(good_fields(server_ms="1e12")), "field 'server_ms': not a decimal number"),
        (pairs(good_fields(client_ms="١٢٣")), "field 'client_ms': not a decimal number"),  # unicode digits
        (pairs(good_fields(after="7")), "versions 4 -> 7: a change adds one"),
        (pairs(good_fields(action="format_disk")), "unknown action 'format_disk'"),
        (pairs(good_fields(detail="{nope")), "field 'detail': not valid JSON"),
        (pairs(good_fields(detail="[1, 2]")), "field 'detail': not a JSON object"),
        (pairs(good_fields(detail="[" * 5000)), "field 'detail': not valid JSON"),  # nested past orjson's limit
    ],
)
def test_a_record_that_breaks_a_rule_is_refused_naming_it(record: list[tuple[bytes, bytes]], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_audit("1-0", record)
    assert needle in str(info.value)


def test_check_text_bounds_length_and_control_characters() -> None:
    assert check_text("--reason", "r" * MAX_REASON, MAX_REASON) == "r" * MAX_REASON  # exactly the limit
    with pytest.raises(ConfigError, match=rf"^--reason: at most {MAX_REASON} characters, got {MAX_REASON + 1}$"):
        check_text("--reason", "r" * (MAX_REASON + 1), MAX_REASON)
    for bad in ("a\nb", "\x1b[2J", "tab\there", "\x7f", "\u200b", "\ufeff"):
        with pytest.raises(ConfigError, match="control and invisible characters"):
            check_text("--reason", bad, MAX_REASON)
    assert check_text("--reason", "café 日本 ok", MAX_REASON) == "café 日本 ok"


def test_writing_refuses_what_could_not_be_read_back() -> None:
    with pytest.raises(ConfigError, match=r"^audit record: field 'target': at most 8192 characters, got 8193$"):
        audit_fields(who="a", host="h", redis_user="u", client_ms=1, action="critical", target="x" * 8193,
                     detail={}, before=0, after=1)
    with pytest.raises(ConfigError, match=r"^audit record: field 'who': control and invisible"):
        audit_fields(who="a\nb", host="h", redis_user="u", client_ms=1, action="pause", target="", detail={},
                     before=0, after=1)
    assert AUDIT_LIMITS["who"] == 200 and AUDIT_LIMITS["reason"] == MAX_REASON


# -- every change records exactly one entry ------------------------------------------------------------------------


CHANGES: list[tuple[tuple[str, ...], tuple[str, ...], str, str, dict[str, Any]]] = [
    # (set-up commands, the change, action, target, detail)
    ((), ("pause", "binance:btcusdt:trade", "--unsubscribe"), "pause", "binance:BTCUSDT:trade",
     {"unsubscribe": True}),
    (("pause", "binance:BTCUSDT:trade"), ("resume", "binance:BTCUSDT:trade"), "resume", "binance:BTCUSDT:trade", {}),
    ((), ("limit", "binance:*:book_ticker", "50", "--policy", "drop", "--burst", "10"), "limit",
     "binance:*:book_ticker", {"rate": 50.0, "policy": "drop", "burst": 10.0}),
    (("limit", "binance:*:book_ticker", "50"), ("unlimit", "binance:*:book_ticker"), "unlimit",
     "binance:*:book_ticker", {}),
    ((), ("degrade", "conflate"), "degrade", "", {"level": "conflate"}),
    ((), ("critical", "binance:BTCUSDT:*", "binance:ETHUSDT:trade"), "critical",
     "binance:BTCUSDT:* binance:ETHUSDT:trade", {"patterns": ["binance:BTCUSDT:*", "binance:ETHUSDT:trade"]}),
    (("critical", "binance:BTCUSDT:*"), ("critical", "--clear"), "critical", "", {"patterns": []}),
    ((), ("auto", "on"), "auto", "", {"enabled": True}),
    (("degrade", "shed"), ("reset",), "reset", "", {}),
]


@pytest.mark.parametrize(("setup", "change", "action", "target", "detail"), CHANGES, ids=lambda v: str(v))
def test_each_change_appends_exactly_one_record_with_its_fields(
    ctl: Invoke, client: redis.Redis, prefix: str, setup: tuple[str, ...], change: tuple[str, ...], action: str,
    target: str, detail: dict[str, Any],
) -> None:
    if setup:
        assert ctl(*setup).exit_code == 0
    before = records(client, prefix)
    version = len(before)  # every change so far made one version and one record
    t0, c0 = server_ms(client), int(time.time() * 1000)
    r = ctl(*change, "--reason", "ticket OPS-7")
    c1, t1 = int(time.time() * 1000), server_ms(client)
    assert r.exit_code == 0, r.output
    after = records(client, prefix)
    assert after[: len(before)] == before and len(after) == len(before) + 1
    entry_id, f = after[-1]
    assert list(f) == list(AUDIT_FIELDS)
    assert f["who"] == getpass.getuser() and f["host"] == socket.gethostname() and f["redis_user"] == "default"
    assert t0 <= int(f["server_ms"]) <= t1 and c0 <= int(f["client_ms"]) <= c1
    assert (f["action"], f["target"], orjson.loads(f["detail"])) == (action, target, detail)
    assert (int(f["before"]), int(f["after"])) == (version, version + 1)
    assert f["reason"] == "ticket OPS-7"
    stored = orjson.loads(client.get(control_state_key(prefix)) or b"{}")
    assert stored["version"] == version + 1  # the record names the version the change produced
    assert history_json(ctl, "--limit", "1")[0] == {
        "id": entry_id, "valid": True, **{k: v for k, v in f.items() if k not in ("detail",)},
        "server_ms": int(f["server_ms"]), "client_ms": int(f["client_ms"]), "before": version,
        "after": version + 1, "detail": detail,
    }


def test_a_change_already_in_force_records_nothing(ctl: Invoke, client: redis.Redis, prefix: str) -> None:
    assert ctl("degrade", "shed").exit_code == 0
    r = ctl("degrade", "shed", "--reason", "again")
    assert r.exit_code == 0 and "nothing changed" in r.output
    assert ctl("resume", "binance:BTCUSDT:trade").exit_code == 0  # no such pause
    assert [f["action"] for _, f in records(client, prefix)] == ["degrade"]


def test_actor_from_the_flag_then_the_environment_then_the_os_user(
    redis_url: str, prefix: str, client: redis.Redis
) -> None:
    plain = make_ctl(redis_url, prefix)
    env = make_ctl(redis_url, prefix, MARKET_ACTOR="oncall-bot")
    assert plain("degrade", "shed").exit_code == 0
    assert env("degrade", "conflate").exit_code == 0
    assert env("degrade", "essential", "--actor", "alice").exit_code == 0
    assert env("degrade", "normal", "--who", "bob").exit_code == 0  # --who: the older name of --actor
    assert [f["who"] for _, f in records(client, prefix)] == [getpass.getuser(), "oncall-bot", "alice", "bob"]
    shown = orjson.loads(plain("show", "--json").stdout)
    assert shown["state"]["degrade"]["who"] == "bob"  # the switch is stamped with the actor too


@pytest.mark.parametrize(
    ("args", "extra", "needle"),
    [
        (("--reason", "x" * 1_048_576), {}, f"--reason: at most {MAX_REASON} characters, got 1048576"),
        (("--reason", "two\nlines"), {}, "--reason: control and invisible characters are not allowed (found '\\n')"),
        (("--actor", "a" * 201), {}, "--actor/--who: at most 200 characters, got 201"),
        (("--actor", "\x1b]0;pwned\x07"), {}, "--actor/--who: control and invisible characters"),
        ((), {"MARKET_ACTOR": "m" * 5000}, "MARKET_ACTOR: at most 200 characters, got 5000"),
    ],
)
def test_hostile_operator_input_is_refused_before_anything_is_written(
    redis_url: str, prefix: str, client: redis.Redis, args: tuple[str, ...], extra: dict[str, str], needle: str
) -> None:
    r = make_ctl(redis_url, prefix, **extra)("pause", "binance:*:trade", *args)
    assert isinstance(r.exception, ConfigError), r.output
    assert str(r.exception).startswith(needle)
    assert client.exists(control_state_key(prefix), control_audit_key(prefix)) == 0


def test_a_reason_of_exactly_the_limit_is_kept_whole(ctl: Invoke, client: redis.Redis, prefix: str) -> None:
    assert ctl("auto", "on", "--reason", "é" * MAX_REASON).exit_code == 0
    assert records(client, prefix)[0][1]["reason"] == "é" * MAX_REASON


# -- atomic: no change without its record ----------------------------------------------------------------------------


def test_an_audit_stream_that_cannot_take_the_record_blocks_the_change(
    ctl: Invoke, client: redis.Redis, prefix: str
) -> None:
    audit = control_audit_key(prefix)
    assert ctl("degrade", "shed").exit_code == 0
    state = client.get(control_state_key(prefix))

    client.delete(audit)
    client.set(audit, "not a stream")  # hand-written over the stream
    r = ctl("degrade", "conflate")
    assert isinstance(r.exception, ConfigError) and f"{audit} is not a stream" in str(r.exception)
    assert "nothing changed" in str(r.exception)
    assert client.get(control_state_key(prefix)) == state

    client.delete(audit)
    client.xadd(audit, {"x": "1"}, id="18446744073709551615-18446744073709551615")  # no ID can follow it
    r = ctl("degrade", "conflate")
    assert isinstance(r.exception, ConfigError) and "nothing changed" in str(r.exception)
    assert client.get(control_state_key(prefix)) == state  # the XADD failed, so the state was not touched
    assert client.xlen(audit) == 1

    client.delete(audit)
    assert ctl("degrade", "conflate").exit_code == 0
    assert [f["action"] for _, f in records(client, prefix)] == ["degrade"]


def test_reset_records_the_version_it_replaced_even_from_a_malformed_record(
    ctl: Invoke, client: redis.Redis, prefix: str
) -> None:
    client.set(control_state_key(prefix), b'{"version": 41, "degrade": {"level": "panic"}}')
    assert ctl("reset", "--reason", "fix hand edit").exit_code == 0
    client.delete(control_state_key(prefix))
    client.hset(control_state_key(prefix), "level", "shed")  # a key of another type
    assert ctl("reset").exit_code == 0
    got = [(f["action"], f["before"], f["after"], f["reason"]) for _, f in records(client, prefix)]
    assert got == [("reset", "41", "42", "fix hand edit"), ("reset", "0", "1", "")]


def test_the_audit_stream_is_capped(ctl: Invoke, client: redis.Redis, prefix: str) -> None:
    audit = control_audit_key(prefix)
    pipe = client.pipeline(transaction=False)
    for i in range(AUDIT_MAXLEN + 500):
        pipe.xadd(audit, {"n": str(i)})
    pipe.execute()
    node = int(client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    assert ctl("degrade", "shed").exit_code == 0
    # MAXLEN ~: whole nodes are trimmed, never below the cap, so at most a node's worth above it
    assert AUDIT_MAXLEN <= client.xlen(audit) <= AUDIT_MAXLEN + node
    newest = history_json(ctl, "--limit", "1")[0]
    assert newest["valid"] is True and newest["action"] == "degrade"


# -- history -------------------------------------------------------------------------------------------------------


def test_history_shows_the_newest_first_with_limit_table_and_json(ctl: Invoke) -> None:
    assert ctl("pause", "binance:BTCUSDT:trade", "--reason", "maintenance").exit_code == 0
    assert ctl("limit", "binance:*:book_ticker", "5", "--actor", "alice").exit_code == 0
    assert ctl("degrade", "conflate").exit_code == 0
    assert ctl("resume", "binance:BTCUSDT:trade").exit_code == 0

    docs = history_json(ctl)
    assert [(d["action"], d["after"]) for d in docs] == [("resume", 4), ("degrade", 3), ("limit", 2), ("pause", 1)]
    assert [d["id"] for d in docs] == sorted((d["id"] for d in docs), key=lambda i: tuple(map(int, i.split("-"))),
                                             reverse=True)
    assert [d["action"] for d in history_json(ctl, "--limit", "2")] == ["resume", "degrade"]
    assert [d["action"] for d in history_json(ctl, "-n", "1")] == ["resume"]

    r = ctl("history", "--limit", "3")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["ID", "SERVER", "TIME", "WHO", "HOST", "REDIS", "USER", "VERSION", "CHANGE", "REASON"]
    assert len(lines) == 4
    assert lines[1].startswith(docs[0]["id"]) and "3->4" in lines[1] and "resume binance:BTCUSDT:trade" in lines[1]
    assert "alice" in lines[3] and "limit binance:*:book_ticker rate=5 policy=conflate" in lines[3]
    assert socket.gethostname() in lines[1] and "default" in lines[1]
    assert ctl("history", "--limit", "3").stdout == r.stdout  # reading changes nothing


def test_history_of_an_empty_trail(ctl: Invoke) -> None:
    r = ctl("history")
    assert r.exit_code == 0 and r.stdout == "no audit record\n"
    assert ctl("history", "--json").stdout == ""


@pytest.mark.parametrize("bad", ["0", "-3", str(AUDIT_MAXLEN + 1)])
def test_history_limit_out_of_range(ctl: Invoke, bad: str) -> None:
    r = ctl("history", "--limit", bad)
    assert isinstance(r.exception, ConfigError) and f"--limit: 1 to {AUDIT_MAXLEN}, got {bad}" in str(r.exception)


def test_history_reads_past_a_page(ctl: Invoke, client: redis.Redis, prefix: str) -> None:
    for level in ("shed", "conflate") * 60:
        assert ctl("degrade", level).exit_code == 0
    docs = history_json(ctl, "--limit", "150")  # more than one XREVRANGE page of 100
    assert [d["after"] for d in docs] == list(range(120, 0, -1))


def test_corrupt_records_are_shown_as_corrupt_with_their_id(ctl: Invoke, client: redis.Redis, prefix: str) -> None:
    audit = control_audit_key(prefix)
    assert ctl("degrade", "shed").exit_code == 0
    hostile = {
        client.xadd(audit, {"who": b"\xff\xfe", "x": "1"}).decode(): "not UTF-8",
        client.xadd(audit, {"who": "evil\x1b[2J\x1b]0;owned\x07"}).decode(): "control and invisible characters",
        client.xadd(audit, {"reason": "r" * 1_000_000}).decode(): "at most 1000 characters",
        client.xadd(audit, good_fields(after="9")).decode(): "a change adds one",
    }
    assert ctl("auto", "on").exit_code == 0  # a change after them is still recorded and shown

    r = ctl("history")
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert len(lines) == 1 + 6
    assert "auto" in lines[1] and "shed" in lines[-1]
    for line, (entry_id, needle) in zip(lines[2:6], reversed(hostile.items()), strict=True):
        assert line.startswith(f"{entry_id}  CORRUPT  ") and needle in line
        assert "\x1b" not in line and "\x07" not in line and len(line) < 1000
    assert "\\x1b[2J" in r.stdout  # escaped, not sent to the terminal
    assert r.stderr == f"market: 4 corrupt audit record(s): {', '.join(reversed(hostile))}\n"

    r = ctl("history", "--json")
    assert r.exit_code == 1
    docs = [orjson.loads(line) for line in r.stdout.splitlines()]
    assert [d["valid"] for d in docs] == [True, False, False, False, False, True]
    assert {d["id"]: d["error"] for d in docs if not d["valid"]}.keys() == hostile.keys()
    assert docs[1]["error"].startswith("versions 4 -> 9") and docs[1]["fields"]["who"] == "alice"


# -- through the market command ----------------------------------------------------------------------------------------


def market(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k != "MARKET_ACTOR"}, **env},
    )


def test_market_ctl_audit_end_to_end(redis_url: str, prefix: str) -> None:
    env = {"MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}
    proc = market("ctl", "pause", "binance:BTCUSDT:trade", "--reason", "x" * 100_000, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"market: error: --reason: at most {MAX_REASON} characters, got 100000\n"

    proc = market("ctl", "pause", "binance:BTCUSDT:trade", "--reason", "halt", env={**env, "MARKET_ACTOR": "ops"})
    assert proc.returncode == 0, proc.stderr
    proc = market("ctl", "history", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    (doc,) = [orjson.loads(line) for line in proc.stdout.splitlines()]
    assert (doc["who"], doc["action"], doc["reason"], doc["after"]) == ("ops", "pause", "halt", 1)

    c = redis.Redis.from_url(redis_url)
    try:
        c.xadd(control_audit_key(prefix), {"d": "{nope"})
    finally:
        c.close()
    proc = market("ctl", "history", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "CORRUPT" in proc.stdout and len(proc.stderr.splitlines()) == 1


# -- the Redis user ------------------------------------------------------------------------------------------------


def test_the_redis_user_is_the_acl_user_or_the_login_when_whoami_is_refused(
    private_redis: RedisServer, prefix: str
) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    try:
        admin.acl_setuser("operator", enabled=True, passwords=["+op-pw"], keys=["*"], channels=["*"],
                          commands=["+@all"])
        # no right to ACL WHOAMI: the name it logged in with is recorded
        admin.acl_setuser("quiet", enabled=True, passwords=["+q-pw"], keys=["*"], channels=["*"],
                          commands=["+@all", "-acl"])
        base = f"127.0.0.1:{private_redis.port}/0"
        assert make_ctl(f"redis://operator:op-pw@{base}", prefix)("degrade", "shed").exit_code == 0
        assert make_ctl(f"redis://quiet:q-pw@{base}", prefix)("degrade", "conflate").exit_code == 0
        assert make_ctl(private_redis.url, prefix)("degrade", "normal").exit_code == 0
        got = [f["redis_user"] for _, f in records(admin, prefix)]
        assert got == ["operator", "quiet", "default"]
    finally:
        admin.close()
