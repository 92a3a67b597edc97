"""``market book`` and ``market replay --at``: the ladder (ops.book_view, pure) and the commands on the real Redis."""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from typing import Any

import orjson
import pytest
import redis

from consumer_sdk.book import Book
from consumer_sdk.book_stream import encode_diff, encode_snapshot
from consumer_sdk.core.tick import encode_tick
from ops.book_view import CLEAR, book_document, format_age, frame, render_ladder

#: how long a test waits for the command's next block before it fails
WAIT_S = 20.0
T0_US = 1_700_000_000_000_000


def small_book(update_id: int = 100) -> Book:
    book = Book()
    book.apply_snapshot(
        update_id,
        [["100.50", "1.5"], ["100.40", "22"], ["100.00", "0.001"]],
        [["100.60", "3"], ["100.75", "10.25"], ["101.00", "7"]],
    )
    return book


# -- the ladder -----------------------------------------------------------------------------------------------------


def test_the_ladder_puts_the_asks_above_the_bids_with_the_best_in_the_middle() -> None:
    text = render_ladder("md:binance:BTCUSDT:depth", small_book(), levels=2, now_us=T0_US + 1_500_000,
                         ts_event_us=T0_US, note="diff")
    assert text.splitlines() == [
        "md:binance:BTCUSDT:depth  seq 100  age 1.5 s  diff",
        "      price   size",
        "ask  100.75  10.25",
        "ask  100.60   3",
        "------ spread 0.10 ------  (3 bids, 3 asks)",
        "bid  100.50   1.5",
        "bid  100.40  22",
    ]


def test_the_ladder_shows_what_is_missing_or_wrong() -> None:
    book = small_book()
    assert "spread 0.10 " in render_ladder("k", book, levels=10, now_us=0)
    assert len(render_ladder("k", book, levels=10, now_us=0).splitlines()) == 2 + 3 + 1 + 3
    book.apply_diff([["100.80", "1"]], [], 101)
    crossed = render_ladder("k", book, levels=1, now_us=0)
    assert "CROSSED by 0.20 " in crossed and "seq 101" in crossed
    book.apply_diff([], [["100.60", "0"], ["100.75", "0"], ["101.00", "0"]], 102)
    assert "no asks" in render_ladder("k", book, levels=3, now_us=0)
    empty = Book()
    empty.apply_snapshot(5, [], [])
    assert "empty book" in render_ladder("k", empty, levels=3, now_us=0)
    lost = render_ladder("k", None, levels=3, now_us=10_000, seq=None, note="entry 1-7: does not follow")
    assert lost.splitlines() == ["k", "no book: entry 1-7: does not follow"]
    assert render_ladder("k", None, levels=3, now_us=0).endswith("no book: waiting for a snapshot")
    with pytest.raises(ValueError, match="levels"):
        render_ladder("k", book, levels=0, now_us=0)


def test_prices_and_sizes_line_up_on_their_points_and_the_spread_keeps_the_prices_decimals() -> None:
    book = Book()
    book.apply_snapshot(7, [["29450.1", "0.5"], ["29449", "12"]], [["29450.35", "1.25"], ["29452", "3"]])
    assert render_ladder("k", book, levels=2, now_us=0).splitlines()[1:] == [
        "        price   size",
        "ask  29452      3",
        "ask  29450.35   1.25",
        "------ spread 0.25 ------  (2 bids, 2 asks)",
        "bid  29450.1    0.5",
        "bid  29449     12",
    ]
    whole = Book(0)
    whole.apply_snapshot(1, [["100", "1"]], [["103", "1"]])
    assert "spread 3 " in render_ladder("k", whole, levels=1, now_us=0)


@pytest.mark.parametrize(
    ("age_us", "text"),
    [(0, "0 ms"), (999_999, "999 ms"), (1_000_000, "1.0 s"), (59_940_000, "59.9 s"), (61_000_000, "1 min 01 s"),
     (3_600_000_000, "1 h 00 min"), (7_620_000_000, "2 h 07 min"), (-2_500_000, "-2.5 s")],
)
def test_format_age(age_us: int, text: str) -> None:
    assert format_age(age_us) == text


def test_frames_redraw_on_a_terminal_and_stack_in_a_pipe() -> None:
    assert frame("a\nb", tty=True) == f"{CLEAR}a\nb\n"
    assert frame("a\nb", tty=False) == "a\nb\n\n"


def test_book_document() -> None:
    doc = book_document("k", small_book(), entry_id="5-100", seq=100, ts_event=T0_US, snapshot_id="4-90", diffs=3,
                        levels=1)
    assert doc == {"key": "k", "id": "5-100", "seq": 100, "ts_event": T0_US, "snapshot_id": "4-90", "diffs": 3,
                   "depth": [3, 3], "bids": [["100.50", "1.5"]], "asks": [["100.60", "3"]]}
    assert len(book_document("k", small_book(), entry_id="5-100", seq=100, ts_event=0, snapshot_id="4-90",
                             diffs=0)["bids"]) == 3


# -- the commands ---------------------------------------------------------------------------------------------------


def market(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=os.environ.copy())


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("market: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


class Writer:
    """Writes a small depth stream (snapshot at seq 100, a diff per seq after) and keeps the book at every seq."""

    def __init__(self, client: redis.Redis, key: str) -> None:
        self.client, self.key = client, key
        self.book = small_book()
        self.books: dict[int, Book] = {}
        self.ids: dict[int, str] = {}
        self._put(encode_snapshot(self.book, "start", venue="binance", symbol="BTCUSDT", link="next",
                                  ts_event=T0_US, ts_recv=T0_US))

    def _put(self, tick: Any) -> None:
        seq = tick["seq"]
        entry_id = f"{tick['ts_event'] // 1000}-{seq}"
        self.client.xadd(self.key, {"d": encode_tick(tick)}, id=entry_id)
        self.books[seq], self.ids[seq] = self.book.copy(), entry_id

    def diff(self, bids: list[list[str]], asks: list[list[str]], *, skip: bool = False) -> None:
        seq = (self.book.update_id or 0) + 1
        self.book.apply_diff(bids, asks, seq)
        if not skip:
            self._put(encode_diff("binance", "BTCUSDT", seq=seq, first=seq, ts_event=T0_US + seq * 1000,
                                  ts_recv=T0_US + seq * 1000, bids=bids, asks=asks))

    def periodic(self) -> None:
        seq = (self.book.update_id or 0) + 1
        self.book.apply_diff([], [], seq)
        self._put(encode_snapshot(self.book, "periodic", venue="binance", symbol="BTCUSDT", link="next",
                                  ts_event=T0_US + seq * 1000, ts_recv=T0_US + seq * 1000))


@pytest.fixture
def client(redis_url: str) -> Any:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_replay_at_prints_the_book_as_it_was_then(client: redis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:depth"
    w = Writer(client, key)
    w.diff([["100.55", "4"]], [["100.60", "0"]])
    w.diff([["100.50", "0"]], [])
    w.diff([], [["100.58", "2.5"]])
    for seq in (100, 101, 102, 103):
        proc = market("replay", key, "--at", f"seq:{seq}")
        assert proc.returncode == 0, proc.stderr
        doc = orjson.loads(proc.stdout)
        bids, asks = w.books[seq].levels()
        assert (doc["seq"], doc["id"], doc["diffs"]) == (seq, w.ids[seq], seq - 100)
        assert doc["bids"] == [list(b) for b in bids] and doc["asks"] == [list(a) for a in asks]
    by_time = orjson.loads(market("replay", key, "--at", w.ids[102].split("-")[0]).stdout)
    assert by_time["seq"] == 102
    ladder = market("replay", key, "--at", "seq:101", "--format", "ladder", "--levels", "1")
    assert ladder.returncode == 0, ladder.stderr
    assert ladder.stdout.splitlines()[2:] == [
        "ask  100.75  10.25",
        "------ spread 0.20 ------  (4 bids, 2 asks)",
        "bid  100.55   4",
    ]
    # without --at the depth stream replays as entries, as any stream
    entries = market("replay", key)
    assert entries.returncode == 0 and len(entries.stdout.splitlines()) == 4


def test_book_once_prints_the_current_book(client: redis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:depth"
    w = Writer(client, key)
    w.diff([["100.55", "4"]], [])
    proc = market("book", key, "--once", "--levels", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{key}  seq 101  age ") and CLEAR not in proc.stdout
    assert lines[2:] == [
        "ask  100.75  10.25",
        "ask  100.60   3",
        "------ spread 0.05 ------  (4 bids, 3 asks)",
        "bid  100.55   4",
        "bid  100.50   1.5",
    ]


def test_book_and_replay_at_refuse_bad_keys_and_missing_streams(client: redis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:depth"
    assert_one_line_error(market("book", "not-a-key"), "not a stream key")
    assert_one_line_error(market("book", f"{prefix}:binance:BTCUSDT:trade"), "not an order-book stream")
    assert_one_line_error(market("book", key), "no such stream", key)
    assert_one_line_error(market("book", key, "--once"), "no such stream")
    assert_one_line_error(market("book", key, "--levels", "0"), "--levels")
    assert_one_line_error(market("replay", key, "--at", "seq:5"), "no such stream")
    assert_one_line_error(market("replay", f"{prefix}:binance:BTCUSDT:trade", "--at", "seq:5"),
                          "not an order-book stream")
    client.set(f"{prefix}:binance:S:depth", "x")
    assert_one_line_error(market("book", f"{prefix}:binance:S:depth"), "not a stream")
    w = Writer(client, key)
    w.diff([["100.55", "4"]], [])
    assert_one_line_error(market("replay", key, "--at", "seq:101", "--format", "csv"), "jsonl or ladder")
    assert_one_line_error(market("replay", key, "--at", "seq:101", "--start", "seq:100"), "does not go with")
    assert_one_line_error(market("replay", key, "--at", "soon"), "bad range bound")
    assert_one_line_error(market("replay", key, "--levels", "3"), "--levels goes with --at")
    assert_one_line_error(market("replay", key, "--at", "seq:99"), "no book", "no snapshot at or before")
    client.xtrim(key, minid=w.ids[101], approximate=False)
    assert_one_line_error(market("replay", key, "--at", "seq:101"), "trimmed")
    assert_one_line_error(market("book", key, "--once"), "entries from the end", "trimmed")


class Blocks:
    """The blocks (separated by an empty line) a running ``market book`` prints, read with a bounded wait."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc, self.buffer = proc, b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout, selectors.EVENT_READ)

    def next(self) -> list[str]:
        deadline = time.monotonic() + WAIT_S
        while b"\n\n" not in self.buffer:
            left = deadline - time.monotonic()
            assert left > 0, f"no block within {WAIT_S} s; got {self.buffer!r}"
            if self.selector.select(left):
                chunk = os.read(self.proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                assert chunk, f"market book ended: {self.proc.wait()} {self.buffer!r}"
                self.buffer += chunk
        block, self.buffer = self.buffer.split(b"\n\n", 1)
        return block.decode().splitlines()


def test_book_follows_the_stream_a_block_per_update(client: redis.Redis, prefix: str) -> None:
    key = f"{prefix}:binance:BTCUSDT:depth"
    w = Writer(client, key)
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "book", key, "--levels", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        blocks = Blocks(proc)
        start = blocks.next()
        assert start[0].startswith(f"{key}  seq 100  age ") and start[0].endswith("start")
        assert start[-1].split() == ["bid", "100.50", "1.5"]
        w.diff([["100.55", "4"]], [])
        diff = blocks.next()
        assert diff[0].endswith("diff") and "seq 101" in diff[0] and diff[-1].split() == ["bid", "100.55", "4"]
        w.diff([["100.56", "1"]], [], skip=True)  # lost: the next diff does not follow
        w.diff([["100.57", "1"]], [])
        lost = blocks.next()
        assert lost[-1].startswith("no book: entry ") and "does not follow" in lost[-1]
        w.periodic()
        back = blocks.next()
        assert "seq 104" in back[0] and "snapshot (periodic)" in back[0] and back[-1].split() == ["bid", "100.57", "1"]
    finally:
        proc.terminate()
        proc.wait(10)
        assert proc.stderr is not None and proc.stdout is not None
        proc.stderr.close()
        proc.stdout.close()


def test_book_on_a_terminal_redraws_in_place(client: redis.Redis, prefix: str) -> None:
    import pty

    key = f"{prefix}:binance:BTCUSDT:depth"
    w = Writer(client, key)
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "book", key, "--levels", "1"], stdout=follower,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    os.close(follower)
    selector = selectors.DefaultSelector()
    selector.register(leader, selectors.EVENT_READ)
    seen = b""

    def until(needle: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + WAIT_S
        while needle not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not drawn within {WAIT_S} s; got {seen!r}"
            if selector.select(left):
                seen += os.read(leader, 65536)

    try:
        until(b"start")
        w.diff([["100.55", "4"]], [])
        until(b"seq 101")
        frames = seen.decode().replace("\r\n", "\n").split(CLEAR)
        assert frames[0] == "" and len(frames) == 3  # each frame starts by going home and clearing the screen
        assert "seq 100" in frames[1] and "seq 101" in frames[2] and "100.55" in frames[2]
    finally:
        proc.terminate()
        proc.wait(10)
        selector.close()
        os.close(leader)
        assert proc.stderr is not None
        proc.stderr.close()
