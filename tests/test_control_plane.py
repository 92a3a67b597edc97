"""ingestor.control_plane and ``market ctl`` on the real Redis: changes reach a watcher within a second,
are audited, survive restarts, never lose each other; malformed records are rejected and flagged.

Each test has its own key prefix (the ``prefix`` fixture deletes its keys).  Every wait is bounded
and waits on a condition (a callback having run), never on the clock alone.
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
from redis.exceptions import ConnectionError as RedisConnectionError
from typer.testing import CliRunner

import ingestor.control_plane as cp
from consumer_sdk.errors import ConfigError
from consumer_sdk.tick import decode_tick
from distributor.control import AutoDegradeConfig, AutoStep, ControlGate, ControlState, Level, dump_state
from ingestor.control_plane import (
    StateFollower,
    read_audit,
    read_state,
    reset_state,
    run_auto_degrade,
    state_key,
    update_state,
    watch_control,
)
from ops.ctl import app as ctl_app
from ops.redis_server import free_port
from ops.simulator import Simulator, SimulatorConfig

APPLY_WITHIN = 1.0  # seconds: the promise
UNIT = 5.0  # seconds: the bound on waits for things that should be quick


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
        "AUDIT_MAXLEN", "POLL_INTERVAL", "AuditEntry", "Change", "StateFollower", "StoredState", "audit_key",
        "changed_channel", "default_who", "read_audit", "read_state", "reset_state", "run_auto_degrade",
        "state_key", "update_state", "watch_control",
    ])


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


async def test_change_reaches_the_watcher_within_a_second(aredis: aioredis.Redis, prefix: str) -> None:
    async with watching(aredis, prefix) as rec:
        await rec.until(lambda: rec.current == ControlState())  # read at start: nothing stored yet
        loop = asyncio.get_running_loop()
        started = loop.time()
        change = await update_state(aredis, prefix, pause("binance:BTCUSDT:trade"), who="t@h", action="pause")
        await rec.until(lambda: rec.current == change.after, timeout=APPLY_WITHIN)
        assert loop.time() - started < APPLY_WITHIN
        assert change.after.version == 1 and change.changed


async def test_missed_notice_still_applies_within_a_second(aredis: aioredis.Redis, prefix: str) -> None:
    """Written without PUBLISH (by hand, or the notice was lost): the periodic re-read applies it."""
    async with watching(aredis, prefix) as rec:
        await rec.until(lambda: len(rec.states) == 1)
        state = ControlState(version=7).with_level("essential")
        started = asyncio.get_running_loop().time()
        await aredis.set(state_key(prefix), dump_state(state))
        await rec.until(lambda: rec.current == state, timeout=APPLY_WITHIN)
        assert asyncio.get_running_loop().time() - started < APPLY_WITHIN


async def test_same_state_is_applied_once(aredis: aioredis.Redis, prefix: str) -> None:
    async with watching(aredis, prefix, poll_interval=0.01) as rec:
        change = await update_state(aredis, prefix, pause("binance:*:trade"), who="t@h", action="pause")
        await rec.until(lambda: rec.current == change.after)
        n = len(rec.states)
        await aredis.publish(cp.changed_channel(prefix), "again")
        await update_state(aredis, prefix, pause("binance:*:trade"), who="t@h", action="pause")  # a no-op
        # many re-reads later (the poll runs every 10 ms), still one application per state
        marker = ControlState(version=99)
        await aredis.set(state_key(prefix), dump_state(marker))
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
        await aredis.set(state_key(prefix), b'{"version": 9, "degrade": {"level": "panic"}}')
        await aredis.publish(cp.changed_channel(prefix), "9")
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
    await aredis.hset(state_key(prefix), "level", "shed")
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
        await aredis.delete(state_key(prefix))
        await rec.until(lambda: rec.current == ControlState())


class FlakyRedis:
    """The real client, but the first ``failures`` GETs and SUBSCRIBEs fail as if the connection dropped."""

    def __init__(self, real: aioredis.Redis, failures: int) -> None:
        self.real = real
        self.failures = failures
        self.failed = 0

    def _maybe_fail(self) -> None:
        if self.failed < self.failures:
            self.failed += 1
            raise RedisConnectionError("connection reset (simulated)")

    async def get(self, key: str) -> Any:
        self._maybe_fail()
        return await self.real.get(key)

    def pubsub(self) -> Any:
        outer = self
        inner = self.real.pubsub()

        class PubSub:
            async def subscribe(self, channel: str) -> None:
                outer._maybe_fail()
                await inner.subscribe(channel)

            async def get_message(self, **kwargs: Any) -> Any:
                return await inner.get_message(**kwargs)

            async def aclose(self) -> None:
                await inner.aclose()  # type: ignore[no-untyped-call]

        return PubSub()


async def test_redis_errors_never_kill_the_watcher(aredis: aioredis.Redis, prefix: str) -> None:
    await update_state(aredis, prefix, pause("binance:*:trade"), who="t@h", action="pause")
    flaky = FlakyRedis(aredis, failures=6)
    delays: list[float] = []

    def no_wait() -> Iterator[float]:
        while True:
            delays.append(0.0)
            yield 0.0

    async with watching(flaky, prefix, delays=no_wait) as rec:
        await rec.until(lambda: rec.current is not None and len(rec.current.pauses) == 1)
        assert flaky.failed == 6 and len(delays) == 6
        change = await update_state(aredis, prefix, pause("binance:*:agg_trade"), who="t@h", action="pause")
        await rec.until(lambda: rec.current == change.after, timeout=APPLY_WITHIN)


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
    assert all(int(before * 1000) <= e.at_ms <= int(after * 1000) + 1 for e in entries)
    info = await aredis.xinfo_stream(cp.audit_key(prefix))
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
        client.set(state_key(prefix), b'{"pauses": {"binance:BTCUSDT:trade": {"unsubscribe": "yes"}}}')
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


# -- market ctl, through the market command (once it is registered) ---------------------------------------------


def market(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture(scope="module")
def registered() -> None:
    if market("ctl", "--help").returncode != 0:
        pytest.skip("`market ctl` is not registered in ops/cli.py yet")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("degrade", "panic"), "unknown degrade level"),
        (("pause", "binance:BTCUSDT"), "invalid pattern"),
        (("limit", "binance:BTCUSDT:trade", "-5"), "invalid rate"),
        (("limit", "binance:*:trade", "nan"), "invalid rate"),
    ],
)
def test_market_ctl_bad_input(registered: None, args: tuple[str, ...], needle: str) -> None:
    proc = market("ctl", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("market: error: ") and needle in lines[0]


def test_market_ctl_redis_unreachable(registered: None) -> None:
    proc = market("ctl", "show", env={"MARKET_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Redis unreachable" in lines[0]


def test_market_ctl_show_malformed_exits_1(registered: None, redis_url: str, prefix: str) -> None:
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_url)
    try:
        client.set(state_key(prefix), b"not json")
    finally:
        client.close()
    proc = market("ctl", "show", env={"MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix})
    assert proc.returncode == 1
    assert "MALFORMED" in proc.stdout and "MALFORMED" in proc.stderr and "Traceback" not in proc.stderr


# -- a live ingestor (once the gate and the watcher are wired into it) ------------------------------------------


async def test_live_ingestor_pauses_and_resumes_with_a_gap_marker(aredis: aioredis.Redis, prefix: str) -> None:
    from ingestor.config import load_settings
    from ingestor.service import Ingestor

    def settings(url: str) -> Any:
        flags = {"url": url, "symbols": "BTCUSDT,ETHUSDT", "channels": "trade", "prefix": prefix, "spill_dir": ""}
        return load_settings(flags, {})

    if not isinstance(getattr(Ingestor(settings("ws://127.0.0.1:9")), "control", None), ControlGate):
        pytest.skip("the ingestor does not run the control plane yet")
    async with Simulator(SimulatorConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=1000.0, seed=3)) as sim:
        ingestor = Ingestor(settings(sim.ws_url), redis=aredis)
        gate = ingestor.control  # type: ignore[attr-defined]
        btc, eth = f"{prefix}:binance:BTCUSDT:trade", f"{prefix}:binance:ETHUSDT:trade"

        async def until(condition: Callable[[], Any], timeout: float = 20.0) -> None:
            async with asyncio.timeout(timeout):
                while not await condition():
                    await asyncio.sleep(0.02)

        async def grown(key: str, n: int) -> Callable[[], Any]:
            base = await aredis.xlen(key)

            async def check() -> bool:
                return bool(await aredis.xlen(key) >= base + n)

            return check

        task = asyncio.create_task(ingestor.run())
        try:
            await until(await grown(btc, 50))
            started = asyncio.get_running_loop().time()
            await update_state(aredis, prefix, pause("binance:BTCUSDT:trade"), who="t@h", action="pause")

            async def paused() -> bool:
                return bool(gate.state.pauses)

            await until(paused, APPLY_WITHIN)
            assert asyncio.get_running_loop().time() - started < APPLY_WITHIN
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
