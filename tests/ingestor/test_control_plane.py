"""ingestor.control_plane and ``market ctl`` on the real Redis: changes reach a watcher within a second,
are audited, survive restarts, never lose each other; malformed records are rejected and flagged.

"Within a second" is checked by what makes it true, not by a stopwatch: a change notice is applied
with no re-read at all (the poll is set to an hour), a change without a notice is applied by the
periodic re-read, and that re-read runs every :data:`~ingestor.control_plane.POLL_INTERVAL` (0.5 s).

Each test has its own key prefix (the ``prefix`` fixture deletes its keys).  Every wait is bounded
and waits on a condition (a callback having run), never on the clock alone; the bounds only stop a
hang.  Redis outages are real: a private redis-server is stopped and started again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from typer.testing import CliRunner

import ingestor.control_plane as cp
from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.keys import control_audit_key, control_changed_channel, control_state_key
from consumer_sdk.core.tick import decode_tick
from distributor.control import AutoDegradeConfig, AutoStep, ControlGate, ControlState, Level, dump_state
from ingestor.control_plane import (
    StateFollower,
    read_audit,
    read_state,
    reset_state,
    run_auto_degrade,
    update_state,
    watch_control,
)
from ops.ctl import app as ctl_app
from ops.redis_server import RedisServer, free_port, restart, start_redis
from ops.simulator import Simulator, SimulatorConfig

APPLY_WITHIN = 1.0  # seconds: the promise
UNIT = 5.0  # seconds: the bound on waits for things that should be quick (it only stops a hang)
NEVER = 3600.0  # a poll interval no test outlives: what is applied was applied by a notice


class Recorder:
    """The watcher's callbacks; ``until`` waits for a condition on what they received."""

    def __init__(self) -> None:
        self.states: list[ControlState] = []
        self.invalid: list[str] = []
        self._changed = asyncio.Event()

    def on_state(self, state: ControlState) -> None:
        self.states.append(state)
        self._changed.set()

    def on_invalid(self, message: str) -> None:
        self.invalid.append(message)
        self._changed.set()

    async def until(self, condition: Callable[[], bool], timeout: float = UNIT) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    @property
    def current(self) -> ControlState | None:
        return self.states[-1] if self.states else None


@contextlib.asynccontextmanager
async def watching(redis: Any, prefix: str, **kwargs: Any) -> AsyncIterator[Recorder]:
    rec = Recorder()
    task = asyncio.create_task(watch_control(redis, prefix, rec.on_state, rec.on_invalid, **kwargs))
    try:
        yield rec
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()  # it only ever ends by cancellation


def pause(pattern: str, who: str = "t@h") -> Callable[[ControlState], ControlState]:
    return lambda s: s.with_pause(pattern, who=who, at=time.time())


def test_exports() -> None:
    assert sorted(cp.__all__) == sorted([
        "AUDIT_ACTIONS", "AUDIT_FIELDS", "AUDIT_LIMITS", "AUDIT_MAXLEN", "MAX_REASON", "POLL_INTERVAL", "AuditEntry",
        "Change", "CorruptAuditEntry", "StateFollower", "StoredState", "audit_fields", "check_text", "control_keys",
        "default_who",
        "os_user", "parse_audit", "read_audit", "read_state", "redis_user", "reset_state", "run_auto_degrade",
        "update_state", "watch_control",
    ])  # the key names (control_state_key, ...) are consumer_sdk.core.keys': tests/consumer_sdk/test_core_imports.py


# -- the pure follower -------------------------------------------------------------------------------------------


def test_follower_applies_each_new_state_once_and_rejects_malformed_once() -> None:
    applied: list[ControlState] = []
    rejected: list[str] = []
    f = StateFollower(applied.append, rejected.append)
    f.offer(None)
    f.offer(None)
    assert applied == [ControlState()]
    good = ControlState(version=3).with_level("shed")
    f.offer(dump_state(good))
    f.offer(dump_state(good))
    f.offer(b"{nope")
    f.offer(b"{nope")
    f.offer(b'{"degrade": {"level": "panic"}}')
    assert applied == [ControlState(), good]
    assert len(rejected) == 2 and "not valid JSON" in rejected[0] and "panic" in rejected[1]
    assert f.current == good  # the last good state stays
    f.offer(dump_state(good))  # the record was fixed back to what is in force: nothing to apply
    assert applied == [ControlState(), good]


def test_follower_retries_when_the_callback_fails() -> None:
    calls: list[ControlState] = []

    def flaky(state: ControlState) -> None:
        calls.append(state)
        if len(calls) == 1:
            raise RuntimeError("boom")

    f = StateFollower(flaky, lambda _: None)
    raw = dump_state(ControlState(version=1).with_level("conflate"))
    with pytest.raises(RuntimeError):
        f.offer(raw)
    f.offer(raw)
    assert len(calls) == 2 and f.current == calls[-1]


# -- watcher on the real Redis -----------------------------------------------------------------------------------


async def test_change_notice_is_applied_without_waiting_for_a_re_read(aredis: aioredis.Redis, prefix: str) -> None:
    """The notice itself applies a change: with the periodic re-read an hour away, it still lands."""
    async with watching(aredis, prefix, poll_interval=NEVER) as rec:
        await rec.until(lambda: rec.current == ControlState())  # read at start: nothing stored yet
        change = await update_state(aredis, prefix, pause("binance:BTCUSDT:trade"), who="t@h", action="pause")
        await rec.until(lambda: rec.current == change.after)
        assert change.after.version == 1 and change.changed
        assert rec.states == [ControlState(), change.after]


async def test_missed_notice_is_applied_by_the_periodic_re_read(aredis: aioredis.Redis, prefix: str) -> None:
    """Written without PUBLISH (by hand, or the notice was lost): the periodic re-read applies it, and that
    re-read runs at least twice a second by default, so a lost notice still takes effect within a second."""
    assert 2 * cp.POLL_INTERVAL <= APPLY_WITHIN
    async with watching(aredis, prefix) as rec:
        await rec.until(lambda: len(rec.states) == 1)
        state = ControlState(version=7).with_level("essential")
        await aredis.set(control_state_key(prefix), dump_state(state))
        await rec.until(lambda: rec.current == state)
        assert rec.states == [ControlState(), state]


async def test_same_state_is_applied_once(aredis: aioredis.Redis, prefix: str) -> None:
    async with watching(aredis, prefix, poll_interval=0.01) as rec:
        change = await update_state(aredis, prefix, pause("binance:*:trade"), who="t@h", action="pause")
        await rec.until(lambda: rec.current == change.after)
        n = len(rec.states)
        await aredis.publish(control_changed_channel(prefix), "again")
        await update_state(aredis, prefix, pause("binance:*:trade"), who="t@h", action="pause")  # a no-op
        # many re-reads later (the poll runs every 10 ms), still one application per state
        marker = ControlState(version=99)
        await aredis.set(control_state_key(prefix), dump_state(marker))
        await rec.until(lambda: rec.current == marker)
        assert len(rec.states) == n + 1


async def test_restart_reads_the_state_in_force(aredis: aioredis.Redis, prefix: str) -> None:
    await update_state(aredis, prefix, lambda s: s.with_level("conflate", who="a@h", at=1.0), who="a@h",
                       action="degrade")
    change = await update_state(aredis, prefix, pause("binance:ETHUSDT:*"), who="a@h", action="pause")
    async with watching(aredis, prefix) as rec:  # a fresh watcher, as after an ingestor restart
        await rec.until(lambda: rec.current is not None)
        assert rec.states == [change.after]
        assert rec.current.degrade.level is Level.CONFLATE  # type: ignore[union-attr]


async def test_malformed_record_is_rejected_and_the_last_good_state_kept(
    aredis: aioredis.Redis, prefix: str
) -> None:
    async with watching(aredis, prefix) as rec:
        good = (await update_state(aredis, prefix, pause("binance:BTCUSDT:trade"), who="t@h", action="pause")).after
        await rec.until(lambda: rec.current == good)
        applied = len(rec.states)
        await aredis.set(control_state_key(prefix), b'{"version": 9, "degrade": {"level": "panic"}}')
        await aredis.publish(control_changed_channel(prefix), "9")
        await rec.until(lambda: len(rec.invalid) == 1)
        assert "unknown degrade level 'panic'" in rec.invalid[0]
        assert rec.current == good and len(rec.states) == applied
        # a writer refuses to build on it...
        with pytest.raises(ConfigError, match="malformed"):
            await update_state(aredis, prefix, pause("binance:*:trade"), who="t@h", action="pause")
        stored = await read_state(aredis, prefix)
        assert not stored.valid and stored.state is None and b"panic" in (stored.raw or b"")
        # ...and reset replaces it; the watcher follows
        change = await reset_state(aredis, prefix, who="fixer@h")
        assert change.after == ControlState(version=10)
        await rec.until(lambda: rec.current == change.after)
        assert len(rec.invalid) == 1


async def test_key_of_another_type_is_rejected(aredis: aioredis.Redis, prefix: str) -> None:
    await aredis.hset(control_state_key(prefix), "level", "shed")
    async with watching(aredis, prefix) as rec:
        await rec.until(lambda: len(rec.invalid) == 1)
        assert "not a string key" in rec.invalid[0]
        assert rec.states == []
        stored = await read_state(aredis, prefix)
        assert not stored.valid
        with pytest.raises(ConfigError, match="not a string key"):
            await update_state(aredis, prefix, pause("binance:*:trade"), who="t@h", action="pause")
        await reset_state(aredis, prefix, who="t@h")
        await rec.until(lambda: rec.current == ControlState(version=1))


async def test_deleting_the_key_clears_every_switch(aredis: aioredis.Redis, prefix: str) -> None:
    async with watching(aredis, prefix) as rec:
        change = await update_state(aredis, prefix, pause("binance:*:trade"), who="t@h", action="pause")
        await rec.until(lambda: rec.current == change.after)
        await aredis.delete(control_state_key(prefix))
        await rec.until(lambda: rec.current == ControlState())


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A private redis-server with AOF on: what was stored is there again after a stop and a restart."""
    with start_redis(appendonly=True) as server:
        yield server


async def test_watcher_rides_out_a_redis_restart(durable_redis: RedisServer, prefix: str) -> None:
    """The watcher's Redis is stopped and started again: the watcher keeps the state in force meanwhile,
    retries with its backoff, subscribes again, and applies the next change by its notice (no re-read)."""
    writer = aioredis.Redis.from_url(durable_redis.url)
    client = aioredis.Redis.from_url(durable_redis.url, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    retries: list[float] = []
    retried = asyncio.Event()

    def short_waits() -> Iterator[float]:
        while True:
            retries.append(0.01)
            if len(retries) >= 3:
                retried.set()
            yield 0.01

    async def subscribers() -> int:
        counts: Any = await writer.pubsub_numsub(control_changed_channel(prefix))
        return int(counts[0][1])

    try:
        before = await update_state(writer, prefix, pause("binance:*:trade"), who="t@h", action="pause")
        async with watching(client, prefix, poll_interval=NEVER, delays=short_waits) as rec:
            await rec.until(lambda: rec.current == before.after)
            await writer.aclose()
            await asyncio.to_thread(durable_redis.stop)
            async with asyncio.timeout(UNIT):
                await retried.wait()  # three real connection errors, each retried
            assert rec.states == [before.after], "nothing was applied while Redis was gone"
            await asyncio.to_thread(restart, durable_redis, appendonly=True)
            writer = aioredis.Redis.from_url(durable_redis.url)
            async with asyncio.timeout(UNIT):
                while await subscribers() != 1:  # the watcher is back on the notice channel
                    await asyncio.sleep(0.01)  # poll
            after = await update_state(writer, prefix, pause("binance:*:agg_trade"), who="t@h", action="pause")
            await rec.until(lambda: rec.current == after.after)
            assert rec.states == [before.after, after.after]  # the state read again after the restart was the same
    finally:
        await writer.aclose()
        await client.aclose()


async def test_watcher_survives_redis_being_unreachable(prefix: str) -> None:
    dead = aioredis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    attempts = 0
    done = asyncio.Event()

    def delays() -> Iterator[float]:
        nonlocal attempts
        while True:
            attempts += 1
            if attempts >= 3:
                done.set()
            yield 0.0

    rec = Recorder()
    task = asyncio.create_task(watch_control(dead, prefix, rec.on_state, rec.on_invalid, delays=delays))
    try:
        async with asyncio.timeout(UNIT):
            await done.wait()
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await dead.aclose()
    assert rec.states == []


# -- writers -----------------------------------------------------------------------------------------------------


async def test_audit_records_who_when_and_what(aredis: aioredis.Redis, prefix: str) -> None:
    before = time.time()
    await update_state(aredis, prefix, pause("binance:BTCUSDT:trade", "alice@desk"), who="alice@desk",
                       action="pause", target="binance:BTCUSDT:trade", detail={"unsubscribe": False})
    await update_state(aredis, prefix, lambda s: s.with_limit("binance:*:book_ticker", 5, "drop", who="bob@box"),
                       who="bob@box", action="limit", target="binance:*:book_ticker",
                       detail={"rate": 5.0, "policy": "drop"})
    noop = await update_state(aredis, prefix, pause("binance:BTCUSDT:trade"), who="carol@x", action="pause")
    after = time.time()
    assert not noop.changed
    entries = await read_audit(aredis, prefix)
    assert [(e.who, e.action, e.target, e.detail, e.version) for e in entries] == [
        ("bob@box", "limit", "binance:*:book_ticker", {"rate": 5.0, "policy": "drop"}, 2),
        ("alice@desk", "pause", "binance:BTCUSDT:trade", {"unsubscribe": False}, 1),
    ]  # the no-op left no trace
    assert all(int(before * 1000) <= e.client_ms <= int(after * 1000) + 1 for e in entries)
    info = await aredis.xinfo_stream(control_audit_key(prefix))
    assert info["length"] == 2
    state = (await read_state(aredis, prefix)).state
    assert state is not None and state.pauses[0].who == "alice@desk" and state.limits[0].who == "bob@box"


async def test_concurrent_updates_from_two_clients_both_land(redis_url: str, prefix: str) -> None:
    a = aioredis.Redis.from_url(redis_url)
    b = aioredis.Redis.from_url(redis_url)
    n = 25
    try:
        jobs = [
            update_state(client, prefix, pause(f"binance:S{i}{tag}:trade"), who=tag, action="pause")
            for i in range(n) for client, tag in ((a, "A"), (b, "B"))
        ]
        changes = await asyncio.gather(*jobs)
        assert all(c.changed for c in changes)
        stored = await read_state(a, prefix)
        assert stored.state is not None
        assert len(stored.state.pauses) == 2 * n
        assert stored.state.version == 2 * n
        assert sorted(c.after.version for c in changes) == list(range(1, 2 * n + 1))
        assert len(await read_audit(a, prefix, count=1000)) == 2 * n
    finally:
        await a.aclose()
        await b.aclose()


async def test_run_auto_degrade_feeds_the_gate(aredis: aioredis.Redis, prefix: str) -> None:
    gate = ControlGate(auto=AutoDegradeConfig(down_after=0, up_after=0))
    gate.apply(ControlState().with_auto(True))
    steps: list[AutoStep] = []
    reached = asyncio.Event()

    def on_step(step: AutoStep) -> None:
        steps.append(step)
        if gate.level is Level.ESSENTIAL:
            reached.set()

    clock = iter(range(1000))
    task = asyncio.create_task(
        run_auto_degrade(gate, lambda: (0.99, 0.0), on_step, interval=0.001, clock=lambda: float(next(clock)))
    )
    try:
        async with asyncio.timeout(UNIT):
            await reached.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [s.after for s in steps] == [Level.SHED, Level.CONFLATE, Level.ESSENTIAL]
    assert gate.stats().auto_steps == {"down": 3, "up": 0}


# -- market ctl, in process -------------------------------------------------------------------------------------


@pytest.fixture
def ctl(redis_url: str, prefix: str) -> Callable[..., Any]:
    runner = CliRunner()
    env = {"MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix}

    def invoke(*args: str) -> Any:
        return runner.invoke(ctl_app, list(args), env=env)

    return invoke


def test_ctl_commands_change_and_show_the_state(ctl: Callable[..., Any]) -> None:
    r = ctl("pause", "binance:btcusdt:trade", "--unsubscribe", "--who", "alice@desk")
    assert r.exit_code == 0, r.output
    assert "paused binance:BTCUSDT:trade" in r.output and "version 1" in r.output
    assert "already paused" in ctl("pause", "binance:BTCUSDT:trade", "--unsubscribe").output
    assert ctl("limit", "binance:*:book_ticker", "10", "--policy", "drop").exit_code == 0
    assert ctl("degrade", "conflate").exit_code == 0
    assert ctl("critical", "binance:BTCUSDT:*", "binance:ETHUSDT:trade").exit_code == 0
    assert ctl("auto", "on").exit_code == 0

    r = ctl("show")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert "version 5: 4 switches in force" in lines[0]
    pause_line = next(line for line in lines if line.startswith("pause"))
    assert "binance:BTCUSDT:trade (unsubscribed)" in pause_line and "alice@desk" in pause_line
    assert any(line.startswith("limit") and "10/s drop" in line for line in lines)
    assert any(line.startswith("degrade") and "conflate" in line for line in lines)

    doc = orjson.loads(ctl("show", "--json").output)
    assert doc["valid"] is True and doc["state"]["version"] == 5 and doc["switches"] == 4
    assert doc["state"]["pauses"]["binance:BTCUSDT:trade"]["who"] == "alice@desk"
    assert doc["state"]["critical"]["patterns"] == ["binance:BTCUSDT:*", "binance:ETHUSDT:trade"]

    assert ctl("resume", "binance:BTCUSDT:trade").exit_code == 0
    assert "no pause is set" in ctl("resume", "binance:BTCUSDT:trade").output
    assert ctl("unlimit", "binance:*:book_ticker").exit_code == 0
    assert ctl("critical", "--clear").exit_code == 0
    assert ctl("auto", "off").exit_code == 0
    assert ctl("degrade", "normal").exit_code == 0
    r = ctl("show")
    assert "no switch in force" in r.output.splitlines()[0]

    hist = ctl("history", "-n", "3", "--json")
    assert [orjson.loads(line)["action"] for line in hist.output.splitlines()] == ["degrade", "auto", "critical"]


def test_ctl_show_flags_a_malformed_record(ctl: Callable[..., Any], redis_url: str, prefix: str) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.set(control_state_key(prefix), b'{"pauses": {"binance:BTCUSDT:trade": {"unsubscribe": "yes"}}}')
    finally:
        client.close()
    r = ctl("show")
    assert r.exit_code == 1
    assert r.stdout.startswith("MALFORMED:") and "unsubscribe must be true or false" in r.stdout
    r = ctl("show", "--json")
    assert r.exit_code == 1
    doc = orjson.loads(r.stdout)
    assert doc["valid"] is False and "unsubscribe" in doc["error"] and "yes" in doc["raw"]
    r = ctl("pause", "binance:*:trade")
    assert isinstance(r.exception, ConfigError) and "market ctl reset" in str(r.exception)
    assert ctl("reset").exit_code == 0
    assert ctl("show").exit_code == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("degrade", "panic"), "unknown degrade level 'panic'"),
        (("pause", "binance:BTCUSDT"), "invalid pattern"),
        (("pause", "binance:BTCUSDT:trades"), "matches no channel"),
        (("limit", "binance:BTCUSDT:trade", "-5"), "invalid rate '-5'"),
        (("limit", "binance:BTCUSDT:trade", "0"), "invalid rate"),
        (("limit", "binance:BTCUSDT:trade", "fast"), "invalid rate"),
        (("limit", "binance:BTCUSDT:trade", "5", "--policy", "sample"), "unknown limit policy"),
        (("limit", "binance:BTCUSDT:trade", "5", "--burst", "0.5"), "--burst"),
        (("auto", "maybe"), "expected on or off"),
        (("critical",), "--clear"),
        (("degrade", "shed", "--who", "x" * 201), "--who"),
    ],
)
def test_ctl_bad_input_is_a_config_error(ctl: Callable[..., Any], args: tuple[str, ...], needle: str) -> None:
    r = ctl(*args)
    assert isinstance(r.exception, ConfigError), r.output
    assert needle in str(r.exception)


# -- market ctl, through the market command ---------------------------------------------------------------------


def market(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_market_ctl_is_a_command() -> None:
    proc = market("ctl", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "pause" in proc.stdout and "degrade" in proc.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("degrade", "panic"), "unknown degrade level"),
        (("pause", "binance:BTCUSDT"), "invalid pattern"),
        (("limit", "binance:BTCUSDT:trade", "-5"), "invalid rate"),
        (("limit", "binance:*:trade", "nan"), "invalid rate"),
    ],
)
def test_market_ctl_bad_input(args: tuple[str, ...], needle: str) -> None:
    proc = market("ctl", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("market: error: ") and needle in lines[0]


def test_market_ctl_redis_unreachable() -> None:
    proc = market("ctl", "show", env={"MARKET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Redis unreachable" in lines[0]


def test_market_ctl_show_malformed_exits_1(redis_url: str, prefix: str) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.set(control_state_key(prefix), b"not json")
    finally:
        client.close()
    proc = market("ctl", "show", env={"MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix})
    assert proc.returncode == 1
    assert "MALFORMED" in proc.stdout and "MALFORMED" in proc.stderr and "Traceback" not in proc.stderr


# -- a live ingestor -------------------------------------------------------------------------------------------


async def test_live_ingestor_pauses_and_resumes_with_a_gap_marker(aredis: aioredis.Redis, prefix: str) -> None:
    from ingestor.config import load_settings
    from ingestor.service import Ingestor

    def settings(url: str) -> Any:
        flags = {"url": url, "symbols": "BTCUSDT,ETHUSDT", "channels": "trade", "prefix": prefix, "spill_dir": ""}
        return load_settings(flags, {})

    async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=1000.0, seed=3)) as sim:
        ingestor = Ingestor(settings(sim.ws_url), redis=aredis)
        gate = ingestor.control
        assert isinstance(gate, ControlGate)
        btc, eth = f"{prefix}:binance:BTCUSDT:trade", f"{prefix}:binance:ETHUSDT:trade"

        async def until(condition: Callable[[], Any], timeout: float = 20.0) -> None:
            async with asyncio.timeout(timeout):
                while not await condition():
                    await asyncio.sleep(0.02)  # poll

        async def grown(key: str, n: int) -> Callable[[], Any]:
            base = await aredis.xlen(key)

            async def check() -> bool:
                return bool(await aredis.xlen(key) >= base + n)

            return check

        task = asyncio.create_task(ingestor.run())
        try:
            await until(await grown(btc, 50))
            await update_state(aredis, prefix, pause("binance:BTCUSDT:trade"), who="t@h", action="pause")

            async def paused() -> bool:
                return bool(gate.state.pauses)

            await until(paused)  # how soon is the watcher's promise, checked above without the ingestor
            applied_us = int(time.time() * 1_000_000)

            async def after_apply_landed() -> bool:
                # an ETH tick received after the pause is stored: every batch taken before it is stored too
                top: Any = await aredis.xrevrange(eth, "+", "-", count=1)
                return bool(top) and decode_tick(top[0][1][b"d"])["ts_recv"] > applied_us

            await until(after_apply_landed)
            held = await aredis.xlen(btc)
            await until(await grown(eth, 200))  # the feed goes on...
            assert await aredis.xlen(btc) == held  # ...but not for the paused stream
            assert gate.paused_dropped > 0
            await update_state(aredis, prefix, lambda s: s.without_pause("binance:BTCUSDT:trade"), who="t@h",
                               action="resume")
            await until(await grown(btc, 50))
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    entries: Any = await aredis.xrange(btc, "-", "+")
    ticks = [decode_tick(fields[b"d"]) for _, fields in entries]
    markers = [t for t in ticks if "gap_first" in t]
    assert [m["reason"] for m in markers] == ["paused"]  # type: ignore[typeddict-item]
    covered: list[int] = []
    for t in ticks:  # trade ids plus the marked range: every id, once, in order
        covered += list(range(t["gap_first"], t["gap_last"] + 1)) if "gap_first" in t else [t["seq"]]  # type: ignore[typeddict-item]
    assert covered == list(range(covered[0], covered[0] + len(covered)))
