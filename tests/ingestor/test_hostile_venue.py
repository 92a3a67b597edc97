"""A hostile venue: every kind of frame a venue should never send, against a real ``market ingest``.

The simulator (real sockets, in this process) puts each kind into the live stream on demand
(``/control/hostile``); a ``python -m ops.cli ingest`` subprocess reads it and writes to the shared Redis
under the test's prefix.  For each kind:

- the ingestor stays up: the process is alive and its session live, and the trade stream reaches the
  venue's newest trade id made after the burst;
- its memory stays bounded: VmRSS after the burst, and VmHWM (the peak), within :data:`RSS_BOUND` of
  VmRSS before it: less than the 50 MB frame, so no kind is ever held whole;
- the fault is counted by kind (``market_frames_skipped_total{reason=...}`` as scraped) and logged
  (``frame_refused``) at most once a second per kind;
- nothing wrong is stored: read back field by field, every trade is the venue's own trade of that id,
  in order, and no other stream exists under the prefix.

The pure parts (the simulator's hostile frames, its control parameters, the pipeline's refusals) are
tested first, without sockets.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import logging
import os
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from consumer_sdk.core.tick import Tick, is_gap_marker
from distributor.ingress import IngressQueue, Policy
from ingestor.binance import BINANCE_SPOT, parse_frame
from ingestor.pipeline import MAX_ID_JUMP, SKIP_REASONS, BadFrame, GapFound, IngestPipeline
from ingestor.repair import GapRepairer, RepairSettings
from ingestor.sequencer import GapReport, Sequencer
from ops.redis_server import free_port
from ops.simulator import Simulator, SimulatorConfig
from ops.simulator.control import parse_control
from ops.simulator.hostile import HOSTILE_KINDS, HOSTILE_PRICE, HostileRequest, hostile_frames, parse_hostile
from ops.simulator.market import format_decimal
from ops.simulator.rest import parse_rest_schedule

SYMBOL = "BTCUSDT"
TS = 1_700_000_000_000_000
#: how far the ingestor's memory may grow over a burst: below the 50 MB frame, so nothing is held whole
RSS_BOUND = 32 * 1024 * 1024
#: the bound of every wait on the ingestor
WAIT = 30.0
CONFIG = (
    "[session]\nping_interval = 0.5\nping_timeout = 1.0\nbackoff_base = 0.05\nbackoff_cap = 0.5\n"
    "[retention]\nmaxlen = 0\n"
)


# -- the simulator's hostile frames, pure ----------------------------------------------------------------------
def test_an_unknown_kind_is_one_line_naming_the_kinds() -> None:
    error = parse_control("/control/hostile", {"kind": ["lava"]})
    assert isinstance(error, str) and "\n" not in error
    assert error.startswith("unknown hostile kind 'lava'; expected one of big_frame, ")
    assert parse_control("/control/hostile", {}) == error.replace("'lava'", "None")
    assert parse_control("/control/hostile", {"kind": ["binary"], "size": ["1"]}) == (
        "unknown parameter 'size'; expected kind, count, seconds, jump"
    )
    for query, message in [
        ({"count": "0"}, "count must be between 1 and 100000 for binary, got 0"),
        ({"count": "x"}, "count and jump must be integers and seconds a number, got 'x', None, None"),
        ({"seconds": "0"}, "seconds must be above 0 and at most 3600, got 0.0"),
        ({"jump": str(1 << 64)}, f"jump must be between 1 and 2^64 - 1, got {1 << 64}"),
    ]:
        assert parse_hostile("binary", query.get("count"), query.get("seconds"), query.get("jump")) == message
    assert parse_hostile("big_frame", "5", None, None) == "count must be between 1 and 4 for big_frame, got 5"
    command = parse_control("/control/hostile", {"kind": ["id_jump"], "count": ["3"], "jump": ["7"]})
    assert not isinstance(command, str) and command.hostile == HostileRequest("id_jump", 3, 30.0, 7)
    assert parse_hostile("ping_flood", None, None, None) == HostileRequest("ping_flood", 10_000)


async def test_the_control_endpoint_answers_an_unknown_kind_400_in_one_line() -> None:
    async with Simulator(SimulatorConfig(symbols=(SYMBOL,), rate=10)) as sim:
        with pytest.raises(urllib.error.HTTPError) as refused:
            await asyncio.to_thread(_get, f"{sim.rest_url}/control/hostile?kind=lava")
        body = orjson.loads(refused.value.read())
        refused.value.close()
        ok = orjson.loads(await asyncio.to_thread(_get, f"{sim.rest_url}/control/hostile?kind=binary&count=2"))
    assert refused.value.code == 400 and "\n" not in body["error"]
    assert body["error"].startswith("unknown hostile kind 'lava'; expected one of big_frame, invalid_utf8, ")
    assert ok["hostile_sent"]["binary"] == 0  # no connection to send them on


def _payloads(wire: bytes) -> list[tuple[int, bytes]]:
    """``(opcode, payload)`` of each whole server frame in ``wire``."""
    out = []
    pos = 0
    while pos < len(wire):
        opcode, n = wire[pos] & 0x0F, wire[pos + 1] & 0x7F
        pos += 2
        if n == 126:
            n, pos = int.from_bytes(wire[pos : pos + 2], "big"), pos + 2
        elif n == 127:
            n, pos = int.from_bytes(wire[pos : pos + 8], "big"), pos + 8
        out.append((opcode, wire[pos : pos + n]))
        pos += n
    return out


@pytest.mark.parametrize("kind", [k for k in HOSTILE_KINDS if k not in ("ping_flood", "no_pong")])
def test_each_hostile_frame_is_refused_by_the_parser_or_the_pipeline(kind: str) -> None:
    """What each kind is, frame by frame, and where the ingestor refuses it: nothing it sends is a tick to store."""
    frames = hostile_frames(kind, symbol=SYMBOL, subscribed={"btcusdt@trade"}, combined=True,
                            last_trade_id=1000, now_ms=1_700_000_000_000)
    assert frames
    sequencer = Sequencer()
    pipeline = IngestPipeline(BINANCE_SPOT, sequencer)
    carried = {SYMBOL: {"trade"}}
    seed = orjson.dumps({"stream": "btcusdt@trade", "data": {
        "e": "trade", "E": 1, "s": SYMBOL, "t": 1000, "p": "1.0", "q": "1.0", "T": 1, "m": False}})
    assert len(pipeline.process(TS, [seed], 0, carried).ticks) == 1
    for wire in frames:
        [(opcode, payload)] = _payloads(wire)
        if kind == "big_frame":
            assert len(payload) > 50 * 1024 * 1024 and opcode == 1
            continue  # the connection refuses it from its header: tested against the real ingestor below
        if kind == "binary":
            assert opcode == 2
            continue  # the connection drops it: below
        assert opcode == 1
        out = pipeline.process(TS, [payload], 0, carried)
        assert out.ticks == [] and out.held == []
        if kind == "id_back":
            assert out.event is None and pipeline.rejected == 1
        else:
            assert isinstance(out.event, BadFrame), (kind, out.event)
    assert sequencer.last_seq("binance", SYMBOL, "trade") == 1000


def test_an_absurd_jump_is_refused_and_the_stream_goes_on_after_its_last_id() -> None:
    sequencer = Sequencer()
    pipeline = IngestPipeline(BINANCE_SPOT, sequencer)

    def trade(tid: int) -> bytes:
        return orjson.dumps({"e": "trade", "E": 1, "s": SYMBOL, "t": tid, "p": "2.5", "q": "1", "T": 1, "m": True})

    assert [t["seq"] for t in pipeline.process(TS, [trade(5), trade(6)]).ticks] == [5, 6]
    out = pipeline.process(TS, [trade(6 + MAX_ID_JUMP + 1), trade(7)])
    assert isinstance(out.event, BadFrame) and out.event.kind == "id_jump" and out.ticks == []
    assert [t["seq"] for t in pipeline.process(TS, [trade(6 + MAX_ID_JUMP + 1), trade(7)], out.resume).ticks] == [7]
    stats = sequencer.stats()
    assert (stats.accepted, stats.gaps, stats.gap_ticks) == (3, 0, 0)
    # the widest jump still taken is a gap, for the repairer
    wide = pipeline.process(TS, [trade(7 + MAX_ID_JUMP)])
    assert isinstance(wide.event, GapFound) and wide.event.gap.last - wide.event.gap.first + 1 == MAX_ID_JUMP - 1
    assert pipeline.refused == {"id_jump": 1}


def test_ticks_of_streams_not_carried_are_refused_by_kind() -> None:
    pipeline = IngestPipeline(BINANCE_SPOT, Sequencer())

    def trade(symbol: str, event: str = "trade") -> bytes:
        ident = "a" if event == "aggTrade" else "t"
        return orjson.dumps({"e": event, "E": 1, "s": symbol, ident: 1, "f": 1, "l": 1, "p": "2.5", "q": "1",
                             "T": 1, "m": True})

    frames = [trade(SYMBOL), trade("ETHUSDT"), trade(SYMBOL, "aggTrade"), trade(SYMBOL)]
    carried = {SYMBOL: {"trade"}}
    kinds = []
    start = 0
    stored = []
    while start < len(frames):
        out = pipeline.process(TS, frames, start, carried)
        stored += out.ticks
        if isinstance(out.event, BadFrame):
            kinds.append(out.event.kind)
        start = out.resume
    assert kinds == ["unknown_symbol", "unsubscribed"] and len(stored) == 1
    assert pipeline.refused == {"unknown_symbol": 1, "unsubscribed": 1}
    assert pipeline.stats().refused == pipeline.refused


# -- against a real ingestor ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One hostile request, what the ingestor counts it as, and how many."""

    query: str
    counter: str
    count: int
    #: the frames are dropped and the connection kept (False: the connection ends and is made again)
    kept: bool = True


CASES = {
    "big_frame": Case("kind=big_frame", "too_large", 1, kept=False),
    "invalid_utf8": Case("kind=invalid_utf8&count=50", "invalid_utf8", 50),
    "binary": Case("kind=binary&count=50", "binary", 50),
    "deep_json": Case("kind=deep_json&count=5", "too_deep", 5),
    "huge_number": Case("kind=huge_number&count=5", "bad_number", 15),
    "nan": Case("kind=nan&count=5", "bad_number", 20),
    "zero_price": Case("kind=zero_price&count=50", "bad_value", 50),
    "negative_qty": Case("kind=negative_qty&count=50", "bad_value", 50),
    "id_jump_2^63": Case("kind=id_jump&count=5", "bad_number", 5),
    "id_jump_2^41": Case(f"kind=id_jump&count=5&jump={1 << 41}", "id_jump", 5),
    "id_back": Case("kind=id_back&count=50", "duplicate", 50),
    "unsubscribed_stream": Case("kind=unsubscribed_stream&count=50", "unsubscribed", 50),
    "unknown_symbol": Case("kind=unknown_symbol&count=50", "unknown_symbol", 100),
    "ping_flood": Case("kind=ping_flood&count=10000", "ping_flood", 10_000 - 100),
    "no_pong": Case("kind=no_pong&seconds=3", "no_pong", 1, kept=False),
}


def test_every_kind_is_tried() -> None:
    assert {case.query.split("&")[0].removeprefix("kind=") for case in CASES.values()} == set(HOSTILE_KINDS)
    assert {c.counter for c in CASES.values()} - {"duplicate"} <= set(SKIP_REASONS)


def _rss(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
        return body


async def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    try:
        text = (await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics")).decode()
    except (urllib.error.URLError, OSError):
        return {}
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def _counter(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], counter: str) -> float:
    if counter == "duplicate":
        return metrics.get(("market_duplicate_total", (("channel", "trade"), ("venue", "binance"))), 0.0)
    return metrics.get(("market_frames_skipped_total", (("reason", counter), ("venue", "binance"))), 0.0)


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await condition():
                await asyncio.sleep(0.05)  # poll
    except TimeoutError:
        raise AssertionError(f"not within {timeout:.0f} s: {what}") from None


@dataclass
class Rig:
    sim: Simulator
    proc: asyncio.subprocess.Process
    port: int
    log: Path
    redis: aioredis.Redis
    key: str

    async def live(self) -> bool:
        metrics = await _metrics(self.port)
        return metrics.get(("market_connection_up", (("venue", "binance"),))) == 1.0

    async def top(self) -> int:
        last = await self.redis.xrevrange(self.key, count=1)
        return int(last[0][0].split(b"-")[1]) if last else 0

    async def caught_up(self) -> None:
        """The session live, and the stream at the newest trade the venue had made when this was called."""
        target = self.sim.market.last_trade_id(SYMBOL)

        async def there() -> bool:
            assert self.proc.returncode is None, f"the ingestor exited ({self.proc.returncode}): {self.log}"
            return await self.top() >= target and await self.live()

        await until(there, f"the stream reaching trade {target}, the session live")


@pytest.fixture
async def rig(prefix: str, redis_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    config = SimulatorConfig(symbols=(SYMBOL,), rate=300, kline_intervals=("1m",), seed=22)
    async with Simulator(config) as sim:
        cfg = tmp_path / "ingest.toml"
        cfg.write_text(CONFIG)
        log = tmp_path / "ingest.log"
        port = free_port()
        with log.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ops.cli", "ingest", "--url", sim.ws_url, "--symbols", SYMBOL,
                "--channels", "trade", "--metrics-port", str(port), "--spill-dir", str(tmp_path / "spill"),
                "--config", str(cfg), "--rest-url", sim.rest_url,
                env={**os.environ, "MARKET_REDIS_URL": redis_url, "MARKET_PREFIX": prefix},
                stdout=asyncio.subprocess.DEVNULL, stderr=log_file,
            )
        redis = aioredis.Redis.from_url(redis_url)
        try:
            yield Rig(sim, proc, port, log, redis, f"{prefix}:binance:{SYMBOL}:trade")
        finally:
            if proc.returncode is None:
                proc.terminate()
                await asyncio.wait_for(proc.wait(), WAIT)
            await redis.aclose()


async def _stored(rig: Rig) -> list[dict[str, Any]]:
    out = []
    start = "-"
    while True:
        page = await rig.redis.xrange(rig.key, start, "+", count=10_000)
        for entry_id, fields in page:
            tick = orjson.loads(fields[b"d"])
            tick["_id"] = entry_id.decode()
            out.append(tick)
        if len(page) < 10_000:
            return out
        start = "(" + page[-1][0].decode()


async def _check_stored(rig: Rig, prefix: str) -> int:
    """Every trade stored is the venue's trade of that id, field by field, ids strictly increasing, gap
    markers (if any) between them; no stream but the trade stream.  Returns how many trades."""
    history = rig.sim.market.history(SYMBOL)
    ticks = await _stored(rig)
    assert ticks, "nothing stored"
    expected_next = None
    trades = 0
    for tick in ticks:
        if is_gap_marker(tick):
            assert expected_next is None or tick["gap_first"] >= expected_next, tick
            expected_next = tick["gap_last"] + 1
            continue
        seq = tick["seq"]
        assert expected_next is None or seq >= expected_next, (seq, expected_next)
        expected_next = seq + 1
        assert tick["_id"].split("-")[1] == str(seq), tick
        [(tid, price, qty, time_ms, maker)] = history.trades(from_id=seq, limit=1)
        assert tid == seq, f"trade {seq} is not one the venue made (it has {tid})"
        assert {k: tick[k] for k in ("venue", "symbol", "channel", "trade_id", "price", "qty", "side", "ts_event")} \
            == {"venue": "binance", "symbol": SYMBOL, "channel": "trade", "trade_id": seq,
                "price": format_decimal(price), "qty": format_decimal(qty), "side": "sell" if maker else "buy",
                "ts_event": time_ms * 1000}, tick
        assert tick["price"] != HOSTILE_PRICE
        trades += 1
    keys = sorted([k.decode() async for k in rig.redis.scan_iter(f"{prefix}:binance:*")])
    assert keys == [rig.key], keys
    return trades


def _refusal_lines(log: Path, kind: str) -> list[datetime.datetime]:
    out = []
    for line in log.read_text().splitlines():
        if '"frame_refused"' in line:
            record = orjson.loads(line)
            if record["kind"] == kind:
                out.append(datetime.datetime.fromisoformat(record["ts"]))
    return out


@pytest.mark.parametrize("name", CASES)
async def test_the_ingestor_survives_each_hostile_input(rig: Rig, prefix: str, name: str) -> None:
    case = CASES[name]
    await rig.caught_up()
    before = _counter(await _metrics(rig.port), case.counter)
    reconnects_before = (await _metrics(rig.port)).get(("broker_reconnect_total", (("venue", "binance"),)), 0.0)
    rss_before, peak_before = _rss(rig.proc.pid)

    answer = orjson.loads(await asyncio.to_thread(_get, f"{rig.sim.rest_url}/control/hostile?{case.query}"))
    assert answer["hostile_sent"][case.query.split("&")[0].removeprefix("kind=")] >= 1

    async def counted() -> bool:
        assert rig.proc.returncode is None, f"the ingestor exited ({rig.proc.returncode}): {rig.log}"
        return _counter(await _metrics(rig.port), case.counter) - before >= case.count

    await until(counted, f"{case.counter} counted {case.count} times")
    await rig.caught_up()
    rss_after, peak_after = _rss(rig.proc.pid)

    # memory: bounded over the burst, its peak included
    assert rss_after <= rss_before + RSS_BOUND, (rss_before, rss_after)
    assert peak_after <= max(peak_before, rss_before + RSS_BOUND), (rss_before, peak_before, peak_after)
    # the connection kept or made again, as docs/hostile-input.md says
    metrics = await _metrics(rig.port)
    reconnects = metrics.get(("broker_reconnect_total", (("venue", "binance"),)), 0.0) - reconnects_before
    assert (reconnects == 0) if case.kept else (reconnects >= 1), reconnects
    # logged at most once a second per kind
    if case.counter != "duplicate":
        lines = _refusal_lines(rig.log, case.counter)
        assert lines, f"no frame_refused line of kind {case.counter}"
        assert all((b - a).total_seconds() >= 0.99 for a, b in itertools.pairwise(lines)), lines
    # nothing wrong stored
    trades = await _check_stored(rig, prefix)
    top = await rig.top()
    print(f"\n{name}: {case.counter} +{_counter(metrics, case.counter) - before:.0f}, reconnects +{reconnects:.0f}, "
          f"VmRSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB (peak {peak_after / 2**20:.1f}), "
          f"{trades} trades stored up to {top}")


# -- the REST side: refusals counted by kind and logged the same way -----------------------------------------------
class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize(("hostile", "kind"), [("bad_json", "bad_json"), ("redirect", "redirect"),
                                                ("huge", "too_large")])
async def test_rest_refusals_are_counted_by_kind_and_logged_at_most_once_a_second(hostile: str, kind: str) -> None:
    """Nine gaps in a row against a REST server that answers each with the same hostile answer: each refusal
    counted (``market_repair_refused{kind}``), one ``rest_refused`` line a second per kind, the gaps marked."""
    lines = _Lines()
    logger = logging.getLogger("market.repair")
    logger.addHandler(lines)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        async with Simulator(SimulatorConfig(symbols=(SYMBOL,), rate=4000.0, seed=3)) as sim:
            history = sim.market.history(SYMBOL)

            async def made() -> bool:
                return len(history.trades(from_id=None, limit=40)) >= 40

            await until(made, "40 trades at the venue")
            rows = history.trades(from_id=history.trade_id_range[0], limit=40)
            ticks: list[Tick] = []
            for tid, price, qty, time_ms, maker in rows:
                tick = parse_frame(orjson.dumps({"e": "trade", "E": time_ms, "s": SYMBOL, "t": tid,
                                                 "p": format_decimal(price), "q": format_decimal(qty),
                                                 "T": time_ms, "m": maker}), TS)
                assert isinstance(tick, dict)
                ticks.append(tick)
            sim.set_rest_faults("/api/v3/historicalTrades", parse_rest_schedule(f"{hostile}*"))
            ingress: IngressQueue[Tick] = IngressQueue(10_000, Policy.BLOCK)
            sequencer = Sequencer()
            settings = RepairSettings(breaker_failures=100)
            repairer = GapRepairer(settings.client(sim.rest_url), ingress, sequencer, settings)
            task = asyncio.create_task(repairer.run())
            try:
                sequencer.check(ticks[0])
                for k in range(2, 20, 2):
                    gap = sequencer.check(ticks[k])
                    assert isinstance(gap, GapReport)
                    if repairer.start(ticks[k], gap) is None:

                        async def released() -> bool:
                            return not repairer.holds

                        await until(released, "the hold released")
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await repairer.aclose()
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    stats = repairer.stats()
    assert stats.refused == {kind: 9} and stats.ticks_unrepaired == {"trade": 9}
    stored = list(ingress.take(1000))
    described = [(t["gap_first"], t["gap_last"]) if is_gap_marker(t) else t["seq"] for t in stored]  # type: ignore[typeddict-item]
    # each gap marked (nothing of the hostile answers stored), then the tick that revealed it
    assert described == [x for k in range(2, 20, 2) for x in ((ticks[k - 1]["seq"],) * 2, ticks[k]["seq"])]
    logged = [r for r in lines.records if r.getMessage() == "rest_refused"]
    assert logged and all(r.fields["kind"] == kind for r in logged)  # type: ignore[attr-defined]
    assert len(logged) < 9
    assert all(b.created - a.created >= 0.99 for a, b in itertools.pairwise(logged))
