"""Spill log framing and recovery edges that mutation testing showed unchecked (docs/testing.md,
"Mutation testing").

Record sizes at their bounds, reading from an offset and with a record budget, segments longer
than one read at open (records straddling the read boundary), and what a cut at open logs.  The
segments are real files in a temporary directory; damage is done to them with plain writes.
"""

from __future__ import annotations

import logging
import struct
import zlib
from pathlib import Path

import pytest

from distributor.spill import MAGIC, MAX_RECORD, SpillLog, frame_records, parse_records


def record(payload: bytes) -> bytes:
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def only_segment(directory: Path) -> Path:
    (seg,) = sorted(directory.glob("seg-*.spill"))
    return seg


def test_records_of_one_byte_and_of_max_record_bytes_are_framed_and_read_back() -> None:
    big = b"\xab" * MAX_RECORD
    data, n = frame_records([b"x", big])
    assert n == 2 and data == record(b"x") + record(big)
    assert parse_records(data) == ([b"x", big], len(data), False)


def test_framing_names_the_size_it_refuses() -> None:
    with pytest.raises(ValueError) as info:
        frame_records([b"ok", b"x" * (MAX_RECORD + 1)])
    assert str(info.value) == f"spill record of {MAX_RECORD + 1} bytes: must be 1..{MAX_RECORD}"
    with pytest.raises(ValueError) as info:
        frame_records([b""])
    assert str(info.value) == f"spill record of 0 bytes: must be 1..{MAX_RECORD}"


def test_framing_nothing_gives_nothing() -> None:
    assert frame_records([]) == (b"", 0)
    assert parse_records(b"") == ([], 0, False)


def test_a_length_just_over_max_record_is_bad_at_once() -> None:
    """Not a record that more bytes could complete: the length itself is impossible."""
    head = struct.pack("<II", MAX_RECORD + 1, 0)
    assert parse_records(record(b"a") + head) == ([b"a"], 9, True)
    head = struct.pack("<II", MAX_RECORD, 0)  # possible: waits for the payload
    assert parse_records(record(b"a") + head) == ([b"a"], 9, False)


def test_reading_starts_at_pos_and_stops_after_max_records() -> None:
    data = b"junk" + record(b"one") + record(b"two") + record(b"three")
    assert parse_records(data, 4) == ([b"one", b"two", b"three"], len(data), False)
    assert parse_records(data, 4, 1) == ([b"one"], 4 + 11, False)
    assert parse_records(data, 4, 0) == ([], 4, False)
    assert parse_records(memoryview(data), 4 + 11, 5) == ([b"two", b"three"], len(data), False)


def test_a_header_alone_or_part_of_one_is_incomplete_not_bad() -> None:
    data = record(b"one") + record(b"two")
    for cut in range(len(record(b"one")), len(data)):
        assert parse_records(data[:cut]) == ([b"one"], 11, False), cut


def test_a_segment_longer_than_one_read_is_counted_whole_at_open(tmp_path: Path) -> None:
    """Segments are checked in reads of 1 MiB: records that straddle a read's end are carried to the next."""
    payloads = [bytes([i % 251]) * (1000 + i % 7) for i in range(3000)]  # about 3 MiB
    log = SpillLog(tmp_path, segment_bytes=64 << 20)
    log.append(payloads)
    log.close()
    size = only_segment(tmp_path).stat().st_size
    assert size > 2 << 20
    log = SpillLog(tmp_path, segment_bytes=64 << 20)
    assert (len(log), log.bytes, log.torn) == (3000, size, 0)
    assert log.peek(3000) == payloads
    log.close()


def test_damage_past_the_first_read_cuts_the_segment_there(tmp_path: Path) -> None:
    payloads = [bytes([i % 251]) * 1000 for i in range(2000)]  # about 2 MiB
    log = SpillLog(tmp_path)
    log.append(payloads)
    log.close()
    seg = only_segment(tmp_path)
    raw = bytearray(seg.read_bytes())
    rec = 8 + 1000
    at = len(MAGIC) + 1500 * rec + 8 + 10  # a payload byte of record 1500, in the second read
    raw[at] ^= 0xFF
    seg.write_bytes(bytes(raw))
    log = SpillLog(tmp_path)
    assert (len(log), log.torn) == (1500, 1)
    assert seg.stat().st_size == len(MAGIC) + 1500 * rec == log.bytes
    assert log.peek(1500) == payloads[:1500]
    log.close()


def test_a_cut_at_open_is_logged_with_what_was_kept_and_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = SpillLog(tmp_path)
    log.append([b"a" * 10, b"b" * 10])
    log.close()
    seg = only_segment(tmp_path)
    size = seg.stat().st_size
    with seg.open("ab") as f:
        f.write(b"\x00" * 5)  # a torn header
    with caplog.at_level(logging.WARNING):
        SpillLog(tmp_path).close()
    (rec,) = [r for r in caplog.records if r.getMessage() == "spill_cut"]
    fields = rec.fields  # type: ignore[attr-defined]
    assert fields["segment"] == seg.name and fields["kept_bytes"] == size and fields["dropped_bytes"] == 5
    assert fields["records"] == 2 and fields["reason"] == "a record that is not whole"
    assert rec.levelno == logging.WARNING


def test_a_headerless_segment_is_logged_and_removed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    name = "seg-0000001000000000.spill"
    (tmp_path / name).write_bytes(b"mdspill\x01" + record(b"old"))  # the magic of another format
    with caplog.at_level(logging.WARNING):
        log = SpillLog(tmp_path)
    (rec,) = [r for r in caplog.records if r.getMessage() == "spill_cut"]
    fields = rec.fields  # type: ignore[attr-defined]
    assert fields["reason"] == "no header" and fields["kept_bytes"] == 0 and fields["records"] == 0
    assert (len(log), log.torn, log.bytes) == (0, 1, 0)
    assert not (tmp_path / name).exists()
    log.close()


def test_a_segment_of_only_its_header_opens_empty_without_a_cut(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seg = tmp_path / "seg-0000001000000000.spill"
    seg.write_bytes(MAGIC)
    with caplog.at_level(logging.WARNING):
        log = SpillLog(tmp_path)
    assert (len(log), log.torn) == (0, 0) and not [r for r in caplog.records if r.getMessage() == "spill_cut"]
    assert seg.exists() and seg.stat().st_size == len(MAGIC)
    log.close()


def test_zeroed_blocks_after_the_records_are_bad_not_empty_records() -> None:
    """A crash can leave zero-filled blocks: a zero length (with a zero CRC, which is the CRC of nothing) is
    not a record."""
    data = record(b"one") + bytes(32)
    assert parse_records(data) == ([b"one"], 11, True)


def test_a_crc_mismatch_is_bad() -> None:
    data = bytearray(record(b"one") + record(b"two"))
    data[-1] ^= 0x01
    assert parse_records(bytes(data)) == ([b"one"], 11, True)


def test_every_torn_segment_is_counted_and_whole_ones_are_not_places_of_loss(tmp_path: Path) -> None:
    log = SpillLog(tmp_path, segment_bytes=50)
    for i in range(4):
        log.append([bytes([i]) * 60])  # one record per segment (a segment rolls once past 50 bytes)
    log.close()
    segs = sorted(tmp_path.glob("seg-*.spill"))
    assert len(segs) == 4
    assert SpillLog(tmp_path, segment_bytes=50).cut_after == set(), "nothing was cut"
    for seg in segs[:2]:
        with seg.open("ab") as f:
            f.write(b"\x01\x02\x03")
    log = SpillLog(tmp_path, segment_bytes=50)
    assert log.torn == 2 and len(log) == 4
    assert log.cut_after == {int(segs[0].name[4:-6]), int(segs[1].name[4:-6])}
    log.close()


def test_an_empty_segment_file_is_removed_without_a_place_of_loss(tmp_path: Path) -> None:
    """A crash right after creating a segment leaves it empty: nothing was in it, nothing is missing there."""
    log = SpillLog(tmp_path, segment_bytes=50)
    for i in range(2):
        log.append([bytes([i]) * 60])
    log.close()
    first, _ = sorted(tmp_path.glob("seg-*.spill"))
    empty = tmp_path / f"seg-{int(first.name[4:-6]) + 1:016d}.spill"
    empty.write_bytes(b"")
    log = SpillLog(tmp_path, segment_bytes=50)
    assert not empty.exists() and len(log) == 2 and log.cut_after == set()
    log.close()


def test_a_one_byte_headerless_segment_is_a_place_of_loss(tmp_path: Path) -> None:
    log = SpillLog(tmp_path, segment_bytes=50)
    for i in range(2):
        log.append([bytes([i]) * 60])
    log.close()
    first, _ = sorted(tmp_path.glob("seg-*.spill"))
    stub = tmp_path / f"seg-{int(first.name[4:-6]) + 1:016d}.spill"
    stub.write_bytes(b"m")
    log = SpillLog(tmp_path, segment_bytes=50)
    assert not stub.exists() and len(log) == 2 and log.torn == 1
    assert log.cut_after == {int(first.name[4:-6])}, "what the removed segment held is missing after the first"
    log.close()
