"""The spill log under real faults: torn and corrupt records on disk, a size cap, a full filesystem,
the front segment a stop writes, and what a start makes of Redis plus the log.

Full-filesystem tests mount a real 2 MB tmpfs (root only); where the sandbox refuses the mount they
fall back to the spill log's size cap, which refuses appends through the same path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.tick import Tick, make_gap_marker
from distributor.spill import (
    FIRST_SEGMENT,
    MAGIC,
    SEGMENT_STEP,
    SpillFull,
    SpillLog,
    check_spill_dir,
    frame_records,
    parse_records,
)
from distributor.writer import StreamWriter
from ingestor.sequencer import GapReport, Sequencer
from ingestor.service import plan_spill_recovery, plan_stop_flush
from ops.redis_server import restart, start_redis


def payload(i: int, size: int = 40) -> bytes:
    return f"{i:08d}".encode().ljust(size, b"x")


def drain(log: SpillLog, batch: int = 7) -> list[bytes]:
    out: list[bytes] = []
    while len(log):
        got = log.peek(batch)
        assert got, "peek returned nothing while records remain"
        out += got
        log.consume(len(got))
    return out


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("seg-*.spill"))


# -- framing (pure) ---------------------------------------------------------------------------------------
def test_frames_round_trip() -> None:
    data, n = frame_records([b"a", b"bc", payload(3, 500)])
    assert n == 3
    got, end, bad = parse_records(data)
    assert got == [b"a", b"bc", payload(3, 500)] and end == len(data) and not bad
    got, end, bad = parse_records(data, 0, 2)
    assert got == [b"a", b"bc"] and end == 8 + 1 + 8 + 2 and not bad


def test_frame_refuses_empty_and_oversized_payloads() -> None:
    with pytest.raises(ValueError, match=r"1\.\."):
        frame_records([b""])
    with pytest.raises(ValueError, match=r"1\.\."):
        frame_records([b"x" * ((1 << 24) + 1)])


def test_an_incomplete_record_is_not_bad_and_not_returned() -> None:
    data, _ = frame_records([b"one", b"two"])
    whole = len(data) - (8 + 3)
    for cut in range(whole, len(data)):
        got, end, bad = parse_records(data[:cut])
        assert (got, end, bad) == ([b"one"], whole, False), cut


def test_crc_mismatch_zero_length_and_huge_length_are_bad() -> None:
    data, _ = frame_records([b"one", b"two"])
    flipped = bytearray(data)
    flipped[-1] ^= 0x01
    assert parse_records(bytes(flipped)) == ([b"one"], 11, True)
    zeroed = data[:11] + bytes(16)  # zero-filled blocks after a crash look like empty records
    assert parse_records(zeroed) == ([b"one"], 11, True)
    huge = bytearray(data)
    huge[11:15] = (1 << 30).to_bytes(4, "little")
    assert parse_records(bytes(huge)) == ([b"one"], 11, True)


# -- the log ---------------------------------------------------------------------------------------------
def test_append_peek_consume_and_the_count_from_disk(tmp_path: Path) -> None:
    log = SpillLog(tmp_path, segment_bytes=300)
    for i in range(0, 40, 4):
        assert log.append([payload(j) for j in range(i, i + 4)]) == 4
    assert len(log) == 40 and len(segments(tmp_path)) > 2
    first = log.peek(5)
    log.consume(3)  # part of a peek: the other two come again
    assert len(log) == 37
    log.close()
    reopened = SpillLog(tmp_path, segment_bytes=300)
    assert len(reopened) == 40, "a consumed position is not persisted: the oldest segment drains again"
    assert drain(reopened) == [payload(i) for i in range(40)]
    assert first == [payload(i) for i in range(5)]
    assert len(reopened) == 0 and segments(tmp_path) == [] and reopened.bytes == 0


@pytest.mark.parametrize("keep_writing", [False, True])
def test_a_torn_tail_is_cut_at_every_byte_of_the_last_record(tmp_path: Path, keep_writing: bool) -> None:
    record = len(frame_records([payload(0)])[0])
    for cut in range(1, record):
        d = tmp_path / f"cut{cut}"
        log = SpillLog(d)
        log.append([payload(i) for i in range(5)])
        log.close()
        (seg,) = segments(d)
        size = seg.stat().st_size
        os.truncate(seg, size - cut)  # the last record written only in part: a crash mid-write
        log = SpillLog(d)
        assert (len(log), log.torn) == (4, 1), cut
        assert seg.stat().st_size == size - record, "cut back to the end of the last whole record"
        assert log.bytes == size - record
        expected = [payload(i) for i in range(4)]
        if keep_writing:
            log.append([payload(99)])
            expected.append(payload(99))
            assert len(log) == 5
        assert drain(log, 3) == expected
        assert len(log) == 0
        log.close()


def test_a_headerless_or_empty_segment_is_removed_at_open(tmp_path: Path) -> None:
    log = SpillLog(tmp_path)
    log.append([payload(1)])
    log.close()
    (tmp_path / f"seg-{FIRST_SEGMENT + 1:016d}.spill").write_bytes(b"")
    (tmp_path / f"seg-{FIRST_SEGMENT + 2:016d}.spill").write_bytes(b"garbage, no header")
    log = SpillLog(tmp_path)
    assert len(log) == 1 and log.torn == 1 and len(segments(tmp_path)) == 1
    assert drain(log) == [payload(1)]


def test_a_crc_mismatch_in_the_middle_cuts_that_segment_and_the_next_ones_drain(tmp_path: Path) -> None:
    log = SpillLog(tmp_path, segment_bytes=10 * 48)
    log.append([payload(i) for i in range(10)])
    log.append([payload(i) for i in range(10, 20)])
    log.close()
    first, _ = segments(tmp_path)
    raw = bytearray(first.read_bytes())
    at = len(MAGIC) + 4 * 48 + 8 + 3  # a byte of the fifth record's payload
    raw[at] ^= 0x20
    first.write_bytes(bytes(raw))
    log = SpillLog(tmp_path, segment_bytes=10 * 48)
    assert len(log) == 4 + 10 and log.torn == 1
    assert log.cut_after == {int(first.name[4:-6])}, "records may be missing right after the cut segment"
    assert drain(log) == [payload(i) for i in range(4)] + [payload(i) for i in range(10, 20)]
    assert len(log) == 0


def test_a_segment_inserted_after_a_cut_drains_between_its_neighbours(tmp_path: Path) -> None:
    log = SpillLog(tmp_path, segment_bytes=10 * 48)
    log.append([payload(i) for i in range(10)])
    log.append([payload(i) for i in range(10, 20)])
    log.append([payload(i) for i in range(20, 30)])
    first, second, _ = (int(p.name[4:-6]) for p in segments(tmp_path))
    assert second - first == SEGMENT_STEP
    log.insert_after(first, [payload(i) for i in range(100, 103)])
    log.insert_after(first, [payload(i) for i in range(103, 105)])  # a second one goes after the first
    log.close()
    log = SpillLog(tmp_path)
    assert drain(log, 4) == (
        [payload(i) for i in range(10)] + [payload(i) for i in range(100, 105)] + [payload(i) for i in range(10, 30)]
    )


def test_the_newest_segment_cut_at_open_is_not_a_place_for_missing_records(tmp_path: Path) -> None:
    log = SpillLog(tmp_path)
    log.append([payload(i) for i in range(3)])
    log.close()
    (seg,) = segments(tmp_path)
    os.truncate(seg, seg.stat().st_size - 1)
    assert SpillLog(tmp_path).cut_after == set(), "what a torn tail lost was never stored; the live feed repairs it"


def test_corruption_found_while_draining_drops_the_rest_of_that_segment_only(tmp_path: Path) -> None:
    log = SpillLog(tmp_path, segment_bytes=10 * 48)
    log.append([payload(i) for i in range(10)])
    log.append([payload(i) for i in range(10, 20)])
    assert log.peek(2) == [payload(0), payload(1)]
    log.consume(2)
    first = segments(tmp_path)[0]
    with open(first, "r+b") as f:  # bit rot under a running log
        f.seek(len(MAGIC) + 6 * 48 + 8)
        f.write(b"Z")
    out = drain(log, 100)
    assert out == [payload(i) for i in range(2, 6)] + [payload(i) for i in range(10, 20)]
    assert log.corrupt == 4 and len(log) == 0


def test_the_size_cap_refuses_whole_appends_and_draining_clears_it(tmp_path: Path) -> None:
    log = SpillLog(tmp_path, max_bytes=1000)
    accepted = 0
    with pytest.raises(SpillFull, match="cap"):
        while True:
            log.append([payload(accepted)])
            accepted += 1
    assert accepted == (1000 - 2 * len(MAGIC)) // 48
    size = sum(p.stat().st_size for p in segments(tmp_path))
    assert size == log.bytes == len(MAGIC) + accepted * 48, "the refused append wrote nothing"
    assert log.full and log.full_events == 1
    with pytest.raises(SpillFull):
        log.append([payload(0)])
    assert log.full_events == 1, "one state, counted once"
    assert drain(log) == [payload(i) for i in range(accepted)]
    assert not log.full
    log.append([payload(7)])
    assert len(log) == 1


def test_a_front_segment_drains_before_everything_already_in_the_log(tmp_path: Path) -> None:
    log = SpillLog(tmp_path)
    log.append([payload(i) for i in range(100, 110)])  # spilled while Redis was down (newer)
    log.prepend([payload(i) for i in range(90, 100)])  # the writer's memory at a stop (older)
    log.prepend([payload(i) for i in range(80, 90)])  # a hole repaired at the next start (older still)
    log.append([payload(i) for i in range(110, 115)])
    assert [int(p.name[4:-6]) for p in segments(tmp_path)] == [
        FIRST_SEGMENT - 2 * SEGMENT_STEP, FIRST_SEGMENT - SEGMENT_STEP, FIRST_SEGMENT
    ]
    log.close()
    log = SpillLog(tmp_path)
    assert list(log.scan()) == [payload(i) for i in range(80, 115)]
    assert drain(log, 6) == [payload(i) for i in range(80, 115)]


def test_a_front_written_mid_drain_goes_first_and_reading_resumes_where_it_was(tmp_path: Path) -> None:
    log = SpillLog(tmp_path)
    log.append([payload(i) for i in range(10, 20)])
    log.peek(4)
    log.consume(4)
    log.prepend([payload(i) for i in range(5)])
    assert len(log) == 11
    assert drain(log, 3) == [payload(i) for i in range(5)] + [payload(i) for i in range(14, 20)]


def test_saving_what_fits_keeps_the_oldest_at_the_tail_and_the_newest_in_front(tmp_path: Path) -> None:
    tail = SpillLog(tmp_path / "tail", max_bytes=len(MAGIC) * 2 + 10 * 48)
    assert tail.save_oldest([payload(i) for i in range(25)]) == 10
    assert drain(tail) == [payload(i) for i in range(10)]
    front = SpillLog(tmp_path / "front", max_bytes=len(MAGIC) * 3 + 12 * 48)
    front.append([payload(i) for i in range(100, 102)])
    saved = front.save_newest([payload(i) for i in range(25)])
    assert saved == 9, "what fits of the newest, in whole fronts below the log's oldest"
    assert drain(front) == [payload(i) for i in range(25 - saved, 25)] + [payload(100), payload(101)]


def test_old_format_files_are_set_aside_not_drained_and_do_not_crash(tmp_path: Path) -> None:
    old = tmp_path / "spill-000000000001.log"
    old.write_bytes((5).to_bytes(4, "little") + b"hello" + (3).to_bytes(4, "little") + b"ab")  # torn, old layout
    log = SpillLog(tmp_path)
    assert len(log) == 0 and log.set_aside == 1
    assert not old.exists() and (tmp_path / "spill-000000000001.log.old-format").exists()
    log.append([payload(1)])
    assert drain(log) == [payload(1)]


def test_check_spill_dir_refuses_a_path_that_cannot_be_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create spill directory"):
        check_spill_dir(tmp_path / "file" / "spill")
    assert check_spill_dir(tmp_path / "a" / "b").is_dir()


# -- a real full filesystem ------------------------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "2m", *, read_only: bool = False) -> Iterator[bool]:
    """A tmpfs of ``size`` mounted on ``path`` (True), or False where this sandbox refuses the mount."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    try:
        yield done.returncode == 0
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def test_enospc_leaves_a_consistent_log(tmp_path: Path) -> None:
    with small_filesystem(tmp_path / "disk") as mounted:
        log = SpillLog(tmp_path / "disk", max_bytes=(8 << 30) if mounted else (2 << 20))
        batch = [payload(i, 300) for i in range(100)]
        accepted = 0
        with pytest.raises(SpillFull) as refused:
            for _ in range(10_000):
                log.append(batch)
                accepted += len(batch)
        assert ("disk full" if mounted else "cap") in refused.value.reason
        assert log.write_failures == (1 if mounted else 0) and log.full
        on_disk = sum(p.stat().st_size for p in segments(tmp_path / "disk"))
        assert on_disk == log.bytes, "the failed write was cut back: no torn record on disk"
        assert len(log) == accepted > 0
        log.close()
        reopened = SpillLog(tmp_path / "disk")
        assert (len(reopened), reopened.torn) == (accepted, 0)
        assert reopened.save_oldest([payload(i, 300) for i in range(50)]) < 50 if mounted else True
        out = drain(reopened, 1000)
        assert out[:accepted] == batch * (accepted // len(batch))
        assert len(reopened) == 0
        reopened.close()


def tick(seq: int, symbol: str = "BTCUSDT", channel: str = "trade") -> Tick:
    t: Any = {
        "v": 1, "venue": "binance", "symbol": symbol, "channel": channel, "seq": seq, "ts_event": 1_700_000_000_000_000
        + seq * 1000, "ts_recv": 1_700_000_000_000_000 + seq * 1000, "trade_id": seq, "price": "1.0", "qty": "2.0",
        "side": "buy",
    }
    return t  # type: ignore[no-any-return]


async def test_a_full_spill_disk_keeps_the_writer_running_and_loses_nothing_it_took(tmp_path: Path) -> None:
    """Redis down, memory full, the spill's disk full: submit refuses (the ingress policy decides), the
    writer task lives on, and once Redis is back every tick it took is stored, in order."""
    with small_filesystem(tmp_path / "disk") as mounted, start_redis(appendonly=True) as server:
        spill = SpillLog(tmp_path / "disk", max_bytes=(8 << 30) if mounted else (2 << 20))
        client = aioredis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        prefix = f"t{uuid.uuid4().hex[:8]}"
        writer = StreamWriter(client, prefix=prefix, capacity=500, spill=spill)
        task = asyncio.create_task(writer.run())
        try:
            await writer.append([tick(0)])
            server.stop()
            seq, refused = 1, 0
            async with asyncio.timeout(60):
                while refused < 3:
                    batch = [tick(s) for s in range(seq, seq + 200)]
                    if writer.submit(batch):
                        seq += 200
                    else:
                        refused += 1
                        await writer.wait_room()  # the distributor's wait: woken to try again
            assert writer.spill_refusing and writer.spill_errors >= 3 and spill.full_events == 1
            assert not task.done(), "the writer lives through a full spill disk"
            restart(server, appendonly=True)
            async with asyncio.timeout(60):
                await writer.drain()
            assert len(spill) == 0 and not task.done()
            ids = [int(i.split(b"-")[1]) for i, _ in await client.xrange(f"{prefix}:binance:BTCUSDT:trade")]
            assert ids == list(range(seq)), "every tick taken, stored once, in order"
            assert writer.submit([tick(seq)]) and not writer.spill_refusing
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await client.aclose()
            spill.close()


# -- what a start makes of Redis and the log (pure) ------------------------------------------------------
def in_segment(seg: int, *ticks: Tick) -> list[tuple[int, Tick]]:
    return [(seg, t) for t in ticks]


def test_plan_finds_the_hole_between_redis_and_the_spill() -> None:
    eth = ("binance", "ETHUSDT", "trade")
    btc = ("binance", "BTCUSDT", "trade")
    book = ("binance", "BTCUSDT", "book_ticker")
    spilled = in_segment(1, tick(95), tick(101), tick(102), tick(500, "ETHUSDT"), tick(80, channel="book_ticker"),
                         tick(103), tick(501, "ETHUSDT"), tick(90, channel="book_ticker"))
    newest, holes = plan_spill_recovery({btc: 97, eth: 499, book: 10}, spilled)
    assert newest == {btc: 103, eth: 501, book: 90}
    assert [(h.gap, h.after["seq"], h.place) for h in holes] == [
        (GapReport("binance", "BTCUSDT", "trade", 98, 100), 101, -1)
    ]


def test_plan_counts_a_gap_marker_from_its_first_id_and_ignores_unknown_streams() -> None:
    marker: Any = make_gap_marker("binance", "BTCUSDT", "trade", 51, 60, 1, 1, "x")
    newest, holes = plan_spill_recovery({("binance", "BTCUSDT", "trade"): 50}, in_segment(1, marker, tick(61)))
    assert holes == [] and newest == {("binance", "BTCUSDT", "trade"): 61}
    newest, holes = plan_spill_recovery({("binance", "BTCUSDT", "trade"): 40}, in_segment(1, marker, tick(61)))
    assert [h.gap for h in holes] == [GapReport("binance", "BTCUSDT", "trade", 41, 50)]
    assert plan_spill_recovery({}, in_segment(1, tick(5)))[1] == []


def test_plan_places_a_hole_across_a_cut_right_after_the_cut_segment() -> None:
    spilled = (in_segment(10, tick(1), tick(2), tick(7, "ETHUSDT")) + in_segment(20, tick(5), tick(8, "ETHUSDT"))
               + in_segment(30, tick(9)) + in_segment(40, tick(20)))
    _, holes = plan_spill_recovery({}, spilled, {10})
    assert [(h.gap.first, h.gap.last, h.after["seq"], h.place) for h in holes] == [(3, 4, 5, 10)]
    _, holes = plan_spill_recovery({}, spilled, {10, 30})
    assert [(h.gap.first, h.gap.last, h.place) for h in holes] == [(3, 4, 10), (10, 19, 30)]
    assert plan_spill_recovery({}, spilled)[1] == [], "a jump not across a cut is the feed's own"


def test_a_stop_puts_memory_in_front_of_the_spill_and_what_came_after_at_its_end() -> None:
    older, newer = [tick(1), tick(2)], [tick(9)]
    assert plan_stop_flush(older, newer, False) == ([tick(1), tick(2), tick(9)], False, [])
    assert plan_stop_flush(older, newer, True) == (older, True, newer)


@pytest.mark.parametrize("order", [(100, 90), (90, 100)])
def test_seeding_never_moves_a_stream_backwards(order: tuple[int, int]) -> None:
    seq = Sequencer()
    seq.seed("binance", "BTCUSDT", "trade", 50)
    seq.accept(tick(51))
    seq.accept(tick(53))  # a gap, remembered
    for last in order:
        seq.seed("binance", "BTCUSDT", "trade", last)
    assert seq.last_seq("binance", "BTCUSDT", "trade") == 100
    assert seq.stats().gaps == 1 and seq.stats().accepted == 2


# -- the command line ------------------------------------------------------------------------------------
def test_ingest_refuses_a_spill_directory_it_cannot_write(tmp_path: Path) -> None:
    """A read-only filesystem (root writes through permission bits); where mounting is refused, a directory
    that cannot be created because a file stands in its way."""
    target = tmp_path / "ro"
    with small_filesystem(target, "1m", read_only=True) as mounted:
        spill_dir = target if mounted else tmp_path / "file" / "spill"
        if not mounted:
            (tmp_path / "file").write_text("not a directory")
        proc = subprocess.run(
            [sys.executable, "-m", "ops.cli", "ingest", "--url", "ws://127.0.0.1:1", "--metrics-port", "0",
             "--spill-dir", str(spill_dir)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "MARKET_REDIS_URL": "redis://127.0.0.1:1/0"},
        )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("market: error: ") and str(spill_dir) in lines[0]
    assert ("is not writable: Read-only file system" if mounted else "cannot create spill directory") in lines[0]


def test_orjson_payloads_round_trip_through_the_log(tmp_path: Path) -> None:
    log = SpillLog(tmp_path)
    ticks = [tick(i) for i in range(3)]
    log.append([orjson.dumps(t) for t in ticks])
    assert [orjson.loads(p) for p in drain(log)] == ticks
