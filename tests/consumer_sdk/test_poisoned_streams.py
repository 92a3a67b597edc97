"""Poisoned streams: entries written by hand among the writer's never crash or block a reader.

The kinds (:mod:`consumer_sdk.poison`): no field ``d``, ``d`` not JSON, ``d`` JSON but not a tick, a ``d`` of
10 MB (a JSON bomb: parsed, it would take hundreds of MB), an entry ID far in the future.  A consumer group
acks them, counts them by kind, reports them with their IDs and goes on with the valid entries after them, in
order, its dedupe and gap state untouched by them; ``market replay`` stops at the first naming it (exit 2), or
with ``--skip-invalid`` names each on stderr and goes on (exit 1); ``market tail`` (with and without
``--group``) prints the valid entries with their IDs.  Everything runs against the real Redis, under the
test's own prefix; memory is the peak RSS of a child process (its ``VmHWM``), the huge entry's run against the
same run over the same stream without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk import Consumer, InvalidTick, Tick
from consumer_sdk.consumer.batch import INVALID, KeyState, classify, flatten
from consumer_sdk.poison import (
    FUTURE_ID_MS,
    MAX_ENTRY_BYTES,
    POISON_KINDS,
    PoisonedEntry,
    PoisonLog,
    entry_verdict,
    first_future,
)

BASE_MS = 1_700_000_000_000
FUTURE_MS = 99_999_999_999_999  # the year 5138
UNIT = 1.0  # seconds; every wait below is a multiple of it
HUGE_BYTES = 10 * 1024 * 1024
#: the most a reader's peak RSS may grow for the 10 MB entry (a parse of it would take far more)
RSS_BOUND_MB = 64


def tick(seq: int) -> dict[str, Any]:
    return {
        "v": 1, "venue": "binance", "symbol": "BTCUSDT", "channel": "trade", "seq": seq,
        "ts_event": (BASE_MS + seq) * 1000, "ts_recv": (BASE_MS + seq) * 1000 + 7, "trade_id": seq,
        "price": "37000.10", "qty": "0.002", "side": "buy",
    }


def json_bomb(size: int) -> bytes:
    """``size`` bytes of valid JSON that parse into about ``size / 3`` lists."""
    n = (size - 2) // 3
    return b"[" + b"[]," * n + b"[]]"


@dataclass(frozen=True)
class Entry:
    id: str
    fields: dict[str, bytes]
    seq: int | None = None  # the tick's seq; None for a poisoned entry
    kind: str | None = None  # the poison kind


def poisoned_layout(huge: bool = True) -> list[Entry]:
    """The stream, in order: valid ticks 1..10 without 6, and among them one entry of every kind.

    Where tick 6 should be lies only poison (a 10 MB entry and one not JSON): a gap 6..6 the consumer must
    still report.  The JSON-but-not-a-tick entry carries seq 1 000 000: trusted, it would make every later
    tick a duplicate.  From tick 9 on, the IDs lie in the year 5138 (as the writer would write them after
    such an entry, keeping IDs increasing); one entry there is not a tick either.
    """
    def ok(seq: int, ms: int | None = None) -> Entry:
        return Entry(f"{BASE_MS + seq if ms is None else ms}-{seq}", {"d": orjson.dumps(tick(seq))}, seq=seq)

    entries = [
        ok(1), ok(2),
        Entry(f"{BASE_MS + 2}-100", {"d": b"\xff\xfe{not json"}, kind="not_json"),
        ok(3),
        Entry(f"{BASE_MS + 3}-101", {"x": b"1"}, kind="no_field"),
        ok(4),
        Entry(f"{BASE_MS + 4}-102", {"d": b'{"v": 1, "seq": 1000000}'}, kind="not_a_tick"),
        ok(5),
    ]
    if huge:
        entries.append(Entry(f"{BASE_MS + 5}-103", {"d": json_bomb(HUGE_BYTES)}, kind="too_large"))
    entries += [
        Entry(f"{BASE_MS + 6}-6", {"d": b"tick six, damaged"}, kind="not_json"),
        ok(7), ok(8),
        ok(9, FUTURE_MS),
        Entry(f"{FUTURE_MS}-9999", {"d": b'{"v": 1}'}, kind="not_a_tick"),
        ok(10, FUTURE_MS + 1),
    ]
    return entries


VALID = [1, 2, 3, 4, 5, 7, 8, 9, 10]


def expected_kinds(entries: list[Entry]) -> dict[str, int]:
    counts = dict.fromkeys(POISON_KINDS, 0)
    for e in entries:
        if e.kind is not None:
            counts[e.kind] += 1
    counts["future_id"] = sum(1 for e in entries if e.seq is not None and int(e.id.split("-")[0]) >= FUTURE_MS)
    return counts


async def write(client: aioredis.Redis, key: str, entries: list[Entry]) -> None:
    for e in entries:  # one by one: the 10 MB entry is not held twice in one pipeline
        await client.xadd(key, e.fields, id=e.id)  # type: ignore[arg-type]


@pytest.fixture
async def poisoned(aredis: aioredis.Redis, prefix: str) -> AsyncIterator[tuple[str, list[Entry]]]:
    key = f"{prefix}:binance:BTCUSDT:trade"
    entries = poisoned_layout()
    await write(aredis, key, entries)
    yield key, entries


async def until(cond: Callable[[], bool], timeout: float = 10 * UNIT) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)  # poll


@contextlib.asynccontextmanager
async def running(consumer: Consumer, handler: Any) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(consumer.run(handler))
    try:
        yield task
    finally:
        consumer.stop()
        async with asyncio.timeout(10 * UNIT):
            await task


def consumer_for(redis_url: str, prefix: str, **kw: Any) -> Consumer:
    settings: dict[str, Any] = {
        "redis_url": redis_url, "group": "g", "consumer": "c1", "prefix": prefix, "block_ms": 100,
        "start_id": "0", "claim_idle_ms": None, "count": 4,
    }
    settings.update(kw)
    return Consumer(patterns=["binance:BTCUSDT:trade"], **settings)


# ---------------------------------------------------------------- pure pieces


def test_every_kind_is_told_apart_without_parsing_a_huge_entry() -> None:
    assert not isinstance(entry_verdict(orjson.dumps(tick(1))), PoisonedEntry)
    cases = {
        "no_field": None,
        "too_large": json_bomb(MAX_ENTRY_BYTES + 1),
        "not_json": b"\xff\xfe not UTF-8",
        "not_a_tick": b"[1, 2]",
    }
    for kind, raw in cases.items():
        verdict = entry_verdict(raw)
        assert isinstance(verdict, PoisonedEntry) and isinstance(verdict, InvalidTick)
        assert verdict.kind == kind, (kind, str(verdict))
    assert str(entry_verdict(json_bomb(HUGE_BYTES))) == f"too large: {HUGE_BYTES} bytes (at most 65536)"
    assert entry_verdict(b"{}", max_bytes=1).kind == "too_large"  # type: ignore[union-attr]
    assert len(json_bomb(HUGE_BYTES)) == HUGE_BYTES and len(json_bomb(MAX_ENTRY_BYTES)) == MAX_ENTRY_BYTES
    assert entry_verdict(json_bomb(MAX_ENTRY_BYTES)).kind == "not_a_tick"  # type: ignore[union-attr]
    # what an entry quotes is cut short: a report never carries a large value
    long_version = orjson.dumps({**tick(1), "v": "x" * 50_000})
    assert len(str(entry_verdict(long_version))) <= 203


def test_first_future_finds_where_ids_leave_the_horizon() -> None:
    ids = [b"100-1", b"200-2", b"300-0", b"300-5", "400-1"]
    assert first_future(ids, 400) is None and first_future([], 0) is None
    assert first_future(ids, 399) == 4
    assert first_future(ids, 299) == 2
    assert first_future(ids, 0) == 0


def test_classify_keeps_poison_out_of_the_tracker_and_lists_future_ids() -> None:
    state = KeyState("md:binance:BTCUSDT:trade", True)
    entries = [[e.id.encode(), [f for k, v in e.fields.items() for f in (k.encode(), v)]] for e in poisoned_layout()]
    batch = classify(state, *flatten(entries, b"d"), False, horizon_ms=BASE_MS + FUTURE_ID_MS)
    layout = poisoned_layout()
    kinds = [batch.odd[i][2].kind if batch.kind(i) == INVALID else None for i in range(len(layout))]  # type: ignore[union-attr]
    assert kinds == [e.kind for e in layout]
    assert [t["seq"] for t in batch.ticks if t is not None] == VALID
    assert [(g[3], g[4]) for g in batch.gaps] == [(6, 6)]  # the poisoned seq 1 000 000 moved nothing
    assert state.tracker.last == 10
    assert [layout[i].seq for i in batch.future] == [9, 10]  # ticks past the horizon; the poison there is INVALID
    assert classify(KeyState("md:a:B:trade", True), *flatten(entries, b"d"), False).future == []


def test_poison_log_counts_everything_and_logs_once_a_second_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    plog = PoisonLog(logging.getLogger("market.test"), clock=lambda: now[0], group="g")
    with caplog.at_level(logging.WARNING, logger="market.test"):
        for i in range(5):
            plog.report("k", f"1-{i}", "not_json", "not JSON: x")
        plog.report("k", "2-0", "too_large", "too large")
        plog.count("no_field")  # reported elsewhere: counted, not logged
        now[0] += 0.999
        plog.report("k", "3-0", "not_json", "not JSON: y")
        now[0] += 0.001
        plog.report("k", "4-0", "not_json", "not JSON: z")
        plog.report("k", "5-0", "future_id", "ahead")
    lines = [(r.getMessage(), r.fields) for r in caplog.records]  # type: ignore[attr-defined]
    assert [(m, f["id"], f["kind"], f.get("suppressed")) for m, f in lines] == [
        ("invalid_tick", "1-0", "not_json", None),
        ("invalid_tick", "2-0", "too_large", None),
        ("invalid_tick", "4-0", "not_json", 5),
        ("future_id", "5-0", "future_id", None),
    ]
    assert all(f["key"] == "k" and f["group"] == "g" for _m, f in lines)
    assert plog.counts == {"no_field": 1, "too_large": 1, "not_json": 7, "not_a_tick": 0, "future_id": 1}


# ---------------------------------------------------------------- a consumer group on the real Redis


async def test_a_consumer_group_acks_counts_reports_and_goes_on_in_order(
    aredis: aioredis.Redis, redis_url: str, prefix: str, poisoned: tuple[str, list[Entry]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    key, entries = poisoned
    seqs: list[int] = []
    gaps: list[tuple[str, int, int]] = []
    consumer = consumer_for(redis_url, prefix, on_gap=lambda k, a, b: gaps.append((k, a, b)))
    with caplog.at_level(logging.WARNING, logger="market.consumer"):
        async with running(consumer, lambda t: seqs.append(t["seq"])):
            await until(lambda: consumer.stats().acked == len(entries))
    stats = consumer.stats()
    assert seqs == VALID
    assert gaps == [(key, 6, 6)]  # the hole holds only poison: tick 6 is missing, and said so
    assert stats.poisoned == expected_kinds(entries) == {
        "no_field": 1, "too_large": 1, "not_json": 2, "not_a_tick": 2, "future_id": 2,
    }
    assert stats.invalid == 6 and stats.delivered == 9 and stats.duplicates == 0 and stats.gaps == 1
    assert (await aredis.xpending(key, "g"))["pending"] == 0

    # the reports name the stream and the entry, one line at most per kind per second, every kind at least once
    reports = [(r.getMessage(), r.fields) for r in caplog.records if r.getMessage() in ("invalid_tick", "future_id")]  # type: ignore[attr-defined]
    by_id = {e.id: e for e in entries}
    for event, fields in reports:
        assert fields["key"] == key and fields["group"] == "g"
        entry = by_id[fields["id"]]
        assert fields["kind"] == (entry.kind or "future_id")
        assert event == ("future_id" if entry.kind is None else "invalid_tick")
        assert len(fields["error"]) <= 203
    logged = [f["kind"] for _e, f in reports]
    assert set(logged) == set(POISON_KINDS)
    assert all(logged.count(k) <= n for k, n in stats.poisoned.items())

    # what comes after goes on: the dedupe state was not moved by the poison (seq 1 000 000 was never seen)
    await write(aredis, key, [
        Entry(f"{FUTURE_MS + 2}-11", {"d": orjson.dumps(tick(11))}, seq=11),
        Entry(f"{FUTURE_MS + 2}-11000", {"d": b"\x00"}, kind="not_json"),
        Entry(f"{FUTURE_MS + 2}-12000", {"d": orjson.dumps(tick(12))}, seq=12),
    ])
    async with running(consumer, lambda t: seqs.append(t["seq"])):
        await until(lambda: consumer.stats().acked == len(entries) + 3)
    assert seqs == [*VALID, 11, 12]
    assert consumer.stats().duplicates == 0 and consumer.stats().poisoned["not_json"] == 3
    assert (await aredis.xpending(key, "g"))["pending"] == 0
    await consumer.aclose()


async def test_the_hook_gets_every_poisoned_entry_with_its_id_and_kind(
    aredis: aioredis.Redis, redis_url: str, prefix: str, poisoned: tuple[str, list[Entry]]
) -> None:
    key, entries = poisoned
    bad: list[tuple[str, str, str]] = []
    batches: list[list[tuple[str, str, Tick]]] = []
    consumer = consumer_for(
        redis_url, prefix, on_invalid=lambda k, i, e: bad.append((k, i, getattr(e, "kind", ""))),
        on_gap=lambda *_: None,
    )
    async for batch in consumer.batches():
        batches.append(batch)
        if sum(len(b) for b in batches) == len(VALID):
            consumer.stop()
    got = [(k, i, t["seq"]) for b in batches for k, i, t in b]
    assert got == [(key, e.id, e.seq) for e in entries if e.seq is not None]
    assert bad == [(key, e.id, e.kind) for e in entries if e.kind is not None]
    assert consumer.stats().poisoned == expected_kinds(entries)


async def test_a_second_consumer_of_the_group_claims_poison_left_pending_and_acks_it(
    aredis: aioredis.Redis, redis_url: str, prefix: str, poisoned: tuple[str, list[Entry]]
) -> None:
    """A consumer that died holding poisoned entries: the one that claims them acks them, and blocks on none."""
    key, entries = poisoned
    await aredis.xgroup_create(key, "g", id="0")
    await aredis.xreadgroup("g", "dead", {key: ">"})  # everything pending on a consumer that never acks
    seqs: list[int] = []
    consumer = consumer_for(redis_url, prefix, consumer="c2", claim_idle_ms=1, on_gap=lambda *_: None)
    async with running(consumer, lambda t: seqs.append(t["seq"])):
        await until(lambda: consumer.stats().acked == len(entries))
    assert seqs == VALID
    assert consumer.stats().poisoned == expected_kinds(entries) and consumer.stats().claimed == len(entries)
    assert (await aredis.xpending(key, "g"))["pending"] == 0


# ---------------------------------------------------------------- the commands, as child processes


#: run in a child before anything else: at exit, its peak RSS (the kernel's VmHWM of its own memory) on stderr
PEAK_RSS_AT_EXIT = """
import atexit, sys

def _peak() -> None:
    with open("/proc/self/status") as status:
        kb = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    print(f"peak_rss_kb {kb}", file=sys.stderr, flush=True)

atexit.register(_peak)
"""


def peak_rss_kb(err: list[str]) -> int:
    """The child's peak RSS in kB from the last line :data:`PEAK_RSS_AT_EXIT` wrote."""
    name, kb = err[-1].split()
    assert name == "peak_rss_kb"
    return int(kb)


def replay(
    key: str, redis_url: str, *flags: str, measured: bool = False
) -> tuple[int, list[dict[str, Any]], list[str]]:
    """``python -m ops.cli replay KEY FLAGS``: exit status, the lines printed, stderr's lines.

    ``measured`` runs the same ``main()`` behind :data:`PEAK_RSS_AT_EXIT` (stderr's last line is its peak RSS).
    """
    env = {**os.environ, "MARKET_REDIS_URL": redis_url}
    if measured:
        code = PEAK_RSS_AT_EXIT + "from ops.cli import main\nmain(['replay', *sys.argv[1:]])\n"
        args = [sys.executable, "-c", code, key, *flags]
    else:
        args = [sys.executable, "-m", "ops.cli", "replay", key, *flags]
    done = subprocess.run(args, env=env, capture_output=True, timeout=120 * UNIT)
    return done.returncode, [orjson.loads(line) for line in done.stdout.splitlines()], done.stderr.decode().splitlines()


def test_replay_fails_fast_naming_the_first_poisoned_entry(
    redis_url: str, poisoned: tuple[str, list[Entry]]
) -> None:
    key, _entries = poisoned
    code, printed, err = replay(key, redis_url)
    assert code == 2
    assert [p["tick"]["seq"] for p in printed] == [1, 2]  # what came before it
    assert len(err) == 1 and err[0].startswith(f"market: error: {key} {BASE_MS + 2}-100: not JSON")


def test_replay_skip_invalid_goes_on_names_each_and_exits_1(
    redis_url: str, poisoned: tuple[str, list[Entry]]
) -> None:
    key, entries = poisoned
    code, printed, err = replay(key, redis_url, "--skip-invalid")
    assert code == 1
    assert [(p["key"], p["id"], p["tick"]["seq"]) for p in printed] == [
        (key, e.id, e.seq) for e in entries if e.seq is not None
    ]
    bad = [e for e in entries if e.kind is not None]
    assert err[:-1] == [line for line in err if line.startswith("market: skipped ")]
    assert [line.split(" ")[2:4] for line in err[:-1]] == [[key, f"{e.id}:"] for e in bad]
    assert [line.split(" ")[4] for line in err[:-1]] == [f"{e.kind}:" for e in bad]
    assert err[-1] == f"market: replay of {key} skipped {len(bad)} entries that are not ticks"
    assert all(len(line) < 300 for line in err)  # the 10 MB entry is named, never quoted

    head_code, head, head_err = replay(key, redis_url, "--skip-invalid", "--end", f"{BASE_MS + 2}-2")
    assert (head_code, [p["tick"]["seq"] for p in head], head_err) == (0, [1, 2], [])  # nothing skipped: 0


async def test_replay_memory_stays_bounded_by_the_huge_entry(
    aredis: aioredis.Redis, redis_url: str, prefix: str, poisoned: tuple[str, list[Entry]]
) -> None:
    key, _entries = poisoned
    clean = f"{prefix}:binance:ETHUSDT:trade"
    await write(aredis, clean, poisoned_layout(huge=False))
    code, printed, err = replay(key, redis_url, "--skip-invalid", measured=True)
    clean_code, clean_printed, clean_err = replay(clean, redis_url, "--skip-invalid", measured=True)
    assert code == clean_code == 1 and len(printed) == len(clean_printed) == len(VALID)
    rss, clean_rss = peak_rss_kb(err), peak_rss_kb(clean_err)
    assert rss - clean_rss < RSS_BOUND_MB * 1024, (rss, clean_rss)


CONSUMER_SCRIPT = PEAK_RSS_AT_EXIT + """
import asyncio, orjson
from consumer_sdk import Consumer

async def main():
    seqs = []
    consumer = Consumer(redis_url=sys.argv[1], patterns=[sys.argv[2]], prefix=sys.argv[3], group="mem",
                        start_id="0", block_ms=100, claim_idle_ms=None, on_gap=lambda *_: None)
    task = asyncio.create_task(consumer.run(lambda t: seqs.append(t["seq"])))
    async with asyncio.timeout(60):
        while consumer.stats().acked < int(sys.argv[4]):
            await asyncio.sleep(0.01)  # poll
    consumer.stop()
    await task
    print(orjson.dumps({"seqs": seqs, "poisoned": consumer.stats().poisoned}).decode())

asyncio.run(main())
"""


async def test_a_consumer_process_memory_stays_bounded_by_the_huge_entry(
    aredis: aioredis.Redis, redis_url: str, prefix: str, poisoned: tuple[str, list[Entry]]
) -> None:
    key, entries = poisoned
    clean_entries = poisoned_layout(huge=False)
    clean = f"{prefix}:binance:ETHUSDT:trade"
    await write(aredis, clean, clean_entries)
    runs = []
    for stream, layout in ((key, entries), (clean, clean_entries)):
        args = [sys.executable, "-c", CONSUMER_SCRIPT, redis_url, stream, prefix, str(len(layout))]
        done = await asyncio.to_thread(subprocess.run, args, capture_output=True, timeout=120 * UNIT)
        assert done.returncode == 0, done.stderr
        runs.append((orjson.loads(done.stdout), peak_rss_kb(done.stderr.decode().splitlines())))
    (huge, rss), (plain, clean_rss) = runs
    assert huge["seqs"] == plain["seqs"] == VALID
    assert huge["poisoned"] == expected_kinds(entries) and plain["poisoned"]["too_large"] == 0
    assert rss - clean_rss < RSS_BOUND_MB * 1024, (rss, clean_rss)


class Pump:
    """The lines a child writes to a pipe, read by a thread, so each read has a deadline."""

    def __init__(self, pipe: IO[bytes]) -> None:
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(pipe,), daemon=True)
        self._thread.start()

    def _run(self, pipe: IO[bytes]) -> None:
        for line in iter(pipe.readline, b""):
            self._lines.put(line)
        self._lines.put(b"")

    def next(self, timeout: float = 30 * UNIT) -> bytes:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s") from None

    def rest(self) -> list[bytes]:
        self._thread.join(15 * UNIT)
        lines = []
        while not self._lines.empty():
            lines.append(self._lines.get())
        return [line for line in lines if line]


@contextlib.contextmanager
def tail(redis_url: str, *args: str) -> Iterator[tuple[Pump, Pump]]:
    env = {**os.environ, "MARKET_REDIS_URL": redis_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "tail", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        yield Pump(proc.stdout), Pump(proc.stderr)
    finally:
        proc.terminate()
        proc.wait(15 * UNIT)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("group", [False, True], ids=["follow", "group"])
def test_tail_prints_every_valid_entry_with_its_id_and_names_the_poison(
    redis_url: str, poisoned: tuple[str, list[Entry]], group: bool
) -> None:
    key, entries = poisoned
    with tail(redis_url, key, "--from", "0", *(("--group", "g") if group else ())) as (out, err):
        printed = [orjson.loads(out.next()) for _ in VALID]
        bad = [e for e in entries if e.kind is not None]
        skipped = [err.next().decode() for _ in bad]
    assert [(p["key"], p["id"], p["tick"]["seq"]) for p in printed] == [
        (key, e.id, e.seq) for e in entries if e.seq is not None
    ]
    assert all(p["id"] for p in printed)  # never "" (through a group too)
    assert [line.split(" ")[2:5] for line in skipped] == [[key, f"{e.id}:", f"{e.kind}:"] for e in bad]
