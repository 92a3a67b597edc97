# size: one on-disk format and its only reader and writer: framing, CRCs, torn-tail recovery and the segment ring
#   change together, and a third of it documents the format.
"""The writer's spill log: a local append-only log on disk for ticks Redis could not take yet.

Layout.  Segment files ``seg-<n>.spill`` in one directory, drained in increasing ``n``.  Each
segment starts with the 8-byte :data:`MAGIC` and holds records ``<u32 length><u32 crc32><payload>``
(little-endian; the payload is the tick as stored in the stream field ``d``).  A record is whole
when its length is in ``1..MAX_RECORD`` and its payload's CRC-32 matches: anything else (a torn
write, zeroed blocks after a crash, bit rot) is not a record, and nothing after it in that segment
is trusted.

Writing.  :meth:`SpillLog.append` adds records at the tail in one ``write`` and is all or nothing:
when the disk refuses (``ENOSPC``, ``EIO``, ...) the segment is truncated back to its last whole
record before the exception leaves, so the log on disk and its count always agree.
:meth:`SpillLog.prepend` writes a *front* segment, numbered below the oldest, through a temporary
file renamed into place (all or nothing, synced): its records drain before everything already in
the log.  It exists for ticks that are older than the log's records (the writer's memory at a stop,
ids repaired from the venue at start), which the append script would otherwise skip as duplicates
of the newer ones drained first.  New logs start numbering at :data:`FIRST_SEGMENT`, leaving room
below for fronts, and number tail segments :data:`SEGMENT_STEP` apart, leaving room between two for
a segment :meth:`SpillLog.insert_after` writes where records were cut (see Opening).

Full.  ``max_bytes`` caps the log; an append that would pass it raises :class:`SpillFull` (an
``OSError`` with ``ENOSPC``) and writes nothing.  A disk that refuses with ``ENOSPC`` puts the log in
the same state: it refuses further appends for :data:`RETRY_FULL_S` without touching the disk, then
tries again; draining frees room.  Both are counted (:attr:`SpillLog.full_events`,
:attr:`SpillLog.write_failures`) and never corrupt what is stored.

Opening.  Every segment is read and checked once (cost: one sequential read of the log): a segment
is cut at its first record that is not whole (counted in :attr:`SpillLog.torn`), an empty or
headerless one is removed, and the count of records comes from what is on disk.  Where records may
be missing between two segments because of that, :attr:`SpillLog.cut_after` names the segment
before the place, so the ingestor can put what it repairs (or the gap markers) right there.  Files of the
previous format (``spill-<n>.log``, no header, no checksums) are not read: they are renamed
``*.old-format`` and counted in :attr:`SpillLog.set_aside`, and their ticks are treated as lost
(the ingestor repairs the hole they leave from the venue, or marks it).

Reading.  :meth:`SpillLog.peek` returns the oldest records without consuming them; :meth:`consume`
forgets them once stored.  A drained segment is deleted.  A crash loses nothing appended and
synced: on start the remaining records drain again (the stream IDs make a re-drained tick a no-op).

``fsync``: ``always`` syncs every append, ``interval`` at most every ``fsync_interval`` seconds
(from :meth:`SpillLog.maybe_sync`), ``never`` leaves it to the OS; fronts are always synced.  One
owner task; no locks.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.log import get_logger, log_event

__all__ = [
    "FIRST_SEGMENT",
    "FSYNC_POLICIES",
    "MAGIC",
    "MAX_RECORD",
    "SEGMENT_STEP",
    "SpillFull",
    "SpillLog",
    "SpillStats",
    "check_spill_dir",
    "frame_records",
    "parse_records",
]

FSYNC_POLICIES: Final = ("always", "interval", "never")
#: the first bytes of every segment of this format
MAGIC: Final = b"mdspill\x02"
#: the largest payload a record may hold
MAX_RECORD: Final = 1 << 24
#: a new log's first segment number: the numbers below are left for front segments
FIRST_SEGMENT: Final = 10**12
#: segments are numbered this far apart (tail and front alike): the numbers between are for segments
#: inserted after a cut
SEGMENT_STEP: Final = 1000
#: after the disk refused with ENOSPC, appends are refused without a write for this long
RETRY_FULL_S: Final = 1.0
_HEAD: Final = struct.Struct("<II")
_NO_ROOM: Final = (errno.ENOSPC, errno.EDQUOT)
_READ_CHUNK: Final = 1 << 20
log = get_logger("spill")


class SpillFull(OSError):
    """The spill log takes nothing more for now: its size cap is reached or the disk is full."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.ENOSPC, reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class SpillStats:
    records: int
    bytes: int
    segments: int
    appended: int
    drained: int
    #: True while appends are refused (size cap reached, or the disk said ENOSPC)
    full: bool
    #: times the log turned full (cap or disk)
    full_events: int
    #: appends the disk refused (ENOSPC, EIO, ...); each left the log as it was
    write_failures: int
    #: segments cut at open after their last whole record (a crash or failed write mid-record)
    torn: int
    #: records dropped while draining because they were not whole (corruption after open)
    corrupt: int
    #: files of the previous format renamed aside at open, not drained
    set_aside: int


# -- framing: pure ------------------------------------------------------------------------------
def frame_records(payloads: Iterable[bytes]) -> tuple[bytes, int]:
    """``payloads`` -> the bytes of their records and how many; ``ValueError`` for an empty or oversized one."""
    pack, crc = _HEAD.pack, zlib.crc32
    chunks: list[bytes] = []
    n = 0
    for p in payloads:
        size = len(p)
        if not 0 < size <= MAX_RECORD:
            raise ValueError(f"spill record of {size} bytes: must be 1..{MAX_RECORD}")
        chunks.append(pack(size, crc(p)))
        chunks.append(p)
        n += 1
    return b"".join(chunks), n


def parse_records(buf: bytes | memoryview, pos: int = 0, max_records: int = -1) -> tuple[list[bytes], int, bool]:
    """Whole records from ``buf[pos:]``, at most ``max_records`` (-1: all).

    Returns ``(payloads, end, bad)``: ``end`` is the offset just after the last record returned;
    ``bad`` is True when what follows ``end`` is a record that can never become whole (impossible
    length or CRC mismatch), False when the data simply ends there (nothing, or an incomplete record
    that more bytes could complete).
    """
    view = memoryview(buf)
    size = len(view)
    unpack, crc = _HEAD.unpack_from, zlib.crc32
    out: list[bytes] = []
    while max_records < 0 or len(out) < max_records:
        if size - pos < _HEAD.size:
            return out, pos, False
        length, check = unpack(view, pos)
        if not 0 < length <= MAX_RECORD:
            return out, pos, True
        start = pos + _HEAD.size
        if size - start < length:
            return out, pos, False
        body = bytes(view[start : start + length])
        if crc(body) != check:
            return out, pos, True
        out.append(body)
        pos = start + length
    return out, pos, False


def check_spill_dir(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` if needed and prove a file can be created in it; :class:`ConfigError` naming it if not.

    A full disk is not an error here (the log starts in its full state); a read-only or forbidden
    directory is.
    """
    path = Path(directory)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create spill directory {str(path)!r}: {exc.strerror or exc}") from None
    probe = path / f".probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            return path
        raise ConfigError(f"spill directory {str(path)!r} is not writable: {exc.strerror or exc}") from None
    os.close(fd)
    probe.unlink(missing_ok=True)
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class SpillLog:
    """Segments on disk, oldest drained first; ``len()`` is the number of records not yet drained."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 << 20,
        max_bytes: int = 8 << 30,
        fsync: str = "interval",
        fsync_interval: float = 1.0,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ConfigError(f"spill fsync policy must be one of {', '.join(FSYNC_POLICIES)}, got {fsync!r}")
        self.dir = check_spill_dir(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.appended = 0
        self.drained = 0
        self.torn = 0
        self.corrupt = 0
        self.set_aside = 0
        self.full_events = 0
        self.write_failures = 0
        #: fsync calls that made appended tail records durable (fronts are synced apart, see :meth:`prepend`)
        self.syncs = 0
        #: why appends are refused now ("" while they are not)
        self.full_reason = ""
        self._no_room_until = 0.0
        # Undrained records per segment, in drain order; their sum is len(self).
        self._counts: dict[int, int] = {}
        self._segments: list[int] = []
        self.records = 0
        self.bytes = 0
        self._fd = -1
        self._write_seg = -1
        self._write_off = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self._reader: BinaryIO | None = None
        self._read_seg = -1
        self._read_pos = 0
        self._peek_pos = 0
        self._peeked = 0
        #: where reading resumes in a segment whose reader was closed for a front
        self._resume: dict[int, int] = {}
        #: segments found not whole while draining: the offset where trust ends
        self._bad_at: dict[int, int] = {}
        #: segments after whose last record records may be missing (cut at open, or the next one removed):
        #: -1 stands for the front of the log
        self.cut_after: set[int] = set()
        #: per segment, the number of the last segment inserted after it
        self._inserted: dict[int, int] = {}
        self._set_aside_old_format()
        (self.dir / "segment.tmp").unlink(missing_ok=True)  # a new segment a crash left half written
        for seg in sorted(self._listed()):
            count, size, cut = self._open_segment(seg)
            if cut:
                self.cut_after.add(seg if size else (self._segments[-1] if self._segments else -1))
            if size:
                self._segments.append(seg)
                self._counts[seg] = count
                self.records += count
                self.bytes += size
        if self._segments:
            self.cut_after.discard(self._segments[-1])  # nothing after the newest: its cut tail was never stored

    # -- naming and opening ------------------------------------------------------------------
    def _path(self, n: int) -> Path:
        return self.dir / f"seg-{n:016d}.spill"

    def _listed(self) -> Iterator[int]:
        for p in self.dir.glob("seg-*.spill"):
            digits = p.name[4:-6]
            if digits.isdigit():
                yield int(digits)

    def _set_aside_old_format(self) -> None:
        for p in sorted(self.dir.glob("spill-*.log")):
            p.rename(p.with_name(p.name + ".old-format"))
            self.set_aside += 1

    def _open_segment(self, seg: int) -> tuple[int, int, bool]:
        """Check one segment at open: cut it after its last whole record; ``(records, bytes kept, cut)``."""
        path = self._path(seg)
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
            if head != MAGIC:
                count, good = 0, 0
            else:
                count, good, carry = 0, len(MAGIC), b""
                while True:
                    chunk = f.read(_READ_CHUNK)
                    if not chunk:
                        break
                    buf = carry + chunk if carry else chunk
                    records, end, bad = parse_records(buf)
                    count += len(records)
                    good += end
                    if bad:
                        break
                    carry = buf[end:]
            size = f.seek(0, os.SEEK_END)
        if good < size:
            self.torn += 1
            log_event(
                log, logging.WARNING, "spill_cut", segment=path.name, kept_bytes=good, dropped_bytes=size - good,
                records=count, reason="no header" if good == 0 else "a record that is not whole",
            )
        if good == 0:  # no header: a crash right after creating it, or not a segment of ours
            path.unlink()
            return 0, 0, size > 0
        if good < size:
            with open(path, "r+b") as f:
                f.truncate(good)
        return count, good, good < size

    def __len__(self) -> int:
        return self.records

    @property
    def full(self) -> bool:
        """Appends are refused now: the size cap is reached, or the disk was full less than a moment ago."""
        if self.bytes >= self.max_bytes:
            return True
        return bool(self.full_reason) and time.monotonic() < self._no_room_until

    def _enter_full(self, reason: str, retry_after: float = float("inf")) -> None:
        """Refuse appends for ``retry_after`` seconds, or (the cap) until draining frees room."""
        if not self.full_reason:
            self.full_events += 1
        self.full_reason = reason
        self._no_room_until = time.monotonic() + retry_after

    # -- writing --------------------------------------------------------------------------------
    def append(self, payloads: Iterable[bytes]) -> int:
        """Append records at the tail in order; returns how many.

        All or nothing: raises :class:`SpillFull` (cap reached, disk full) or another ``OSError`` with
        the log exactly as it was before the call.
        """
        data, n = frame_records(payloads)
        if not n:
            return 0
        if self.full_reason and time.monotonic() < self._no_room_until:
            raise SpillFull(self.full_reason)
        self._append(data, n)
        return n

    def _append(self, data: bytes, n: int) -> None:
        if self.bytes + len(data) + len(MAGIC) > self.max_bytes:
            self._enter_full(f"spill log reached its cap of {self.max_bytes} bytes")
            raise SpillFull(self.full_reason)
        try:
            if self._fd < 0 or self._write_off >= self.segment_bytes:
                self._roll()
            good = self._write_off
            try:
                _write_all(self._fd, data)
            except OSError:
                self._cut_back(good)
                raise
        except OSError as exc:
            self.write_failures += 1
            if exc.errno in _NO_ROOM:
                self._enter_full(f"disk full: {exc.strerror or exc}", RETRY_FULL_S)
                raise SpillFull(self.full_reason) from exc
            raise
        self.full_reason = ""
        self._write_off += len(data)
        self._counts[self._write_seg] += n
        self.records += n
        self.bytes += len(data)
        self.appended += n
        self._dirty = True
        if self.fsync == "always":
            self.sync()

    def _cut_back(self, good: int) -> None:
        """A write failed part way: drop what it left after ``good``; a segment that cannot be cut is closed."""
        try:
            os.ftruncate(self._fd, good)
        except OSError as exc:
            # The torn bytes stay; nothing more goes into this segment, and reading stops at them.
            log_event(
                log, logging.ERROR, "spill_cut_back_failed", segment=self._path(self._write_seg).name, offset=good,
                error=str(exc),
            )
            self._bad_at[self._write_seg] = good
            self._close_writer()

    def _roll(self) -> None:
        """Start a new tail segment (the previous one is synced and closed)."""
        self._close_writer()
        n = max(self._segments[-1] + SEGMENT_STEP, FIRST_SEGMENT) if self._segments else FIRST_SEGMENT
        path = self._path(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            _write_all(fd, MAGIC)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self._write_seg = n
        self._write_off = len(MAGIC)
        self._segments.append(n)
        self._counts[n] = 0
        self.bytes += len(MAGIC)

    def _close_writer(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
            self._write_seg = -1
            self._dirty = False

    def prepend(self, payloads: Sequence[bytes]) -> int:
        """Write ``payloads`` as a new front segment, drained before every record already in the log.

        All or nothing, synced before it returns (temporary file, fsync, rename, fsync of the
        directory); raises :class:`SpillFull` or another ``OSError`` with the log as it was.  On an
        empty log this is :meth:`append`.
        """
        data, n = frame_records(payloads)
        if not n:
            return 0
        if not self._segments:
            self._append(data, n)
            self.sync()
            return n
        seg = self._segments[0] - SEGMENT_STEP
        if seg < 0:
            raise OSError(errno.ERANGE, "no segment number left below the oldest for a front segment")
        self._write_segment(seg, data, n)
        return n

    def insert_after(self, after: int, payloads: Sequence[bytes]) -> int:
        """Write ``payloads`` as a new segment drained right after segment ``after`` (-1: the front), before
        the segment that follows it; all or nothing like :meth:`prepend`."""
        if after < 0:
            return self.prepend(payloads)
        data, n = frame_records(payloads)
        if not n:
            return 0
        seg = self._inserted.get(after, after) + 1
        if seg in self._counts:
            raise OSError(errno.ERANGE, f"no segment number left after segment {after}")
        self._write_segment(seg, data, n)
        self._inserted[after] = seg
        return n

    def _write_segment(self, seg: int, data: bytes, n: int) -> None:
        """A whole new segment ``seg`` holding ``n`` framed records, synced and renamed into place."""
        if self.bytes + len(data) + len(MAGIC) > self.max_bytes:
            self._enter_full(f"spill log reached its cap of {self.max_bytes} bytes")
            raise SpillFull(self.full_reason)
        tmp = self.dir / "segment.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, MAGIC + data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, self._path(seg))
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self.write_failures += 1
            if exc.errno in _NO_ROOM:
                self._enter_full(f"disk full: {exc.strerror or exc}", RETRY_FULL_S)
                raise SpillFull(self.full_reason) from exc
            raise
        self._peeked = 0  # a batch peeked before the new segment is drained again after it (a no-op in Redis)
        if self._reader is not None and self._read_seg > seg:
            # Reading resumes where it was once the new segment is drained.
            self._resume[self._read_seg] = self._read_pos
            self._reader.close()
            self._reader = None
            self._read_seg = -1
        self._segments.append(seg)
        self._segments.sort()
        self._counts[seg] = n
        self.records += n
        self.bytes += len(data) + len(MAGIC)
        self.appended += n

    def save_oldest(self, payloads: Sequence[bytes], *, max_tries: int = 48) -> int:
        """Append as many of ``payloads`` as the disk and the cap take, oldest first; how many.

        For a final flush: what is saved stays contiguous with what Redis and the log hold, and a
        newer remainder that does not fit is a gap the next start sees (and repairs or marks).
        """
        saved, step = 0, len(payloads)
        for _ in range(max_tries):
            if saved >= len(payloads) or step < 1:
                break
            chunk = payloads[saved : saved + step]
            try:
                data, n = frame_records(chunk)
                self._append(data, n)
            except OSError:
                if step == 1:
                    break
                step //= 2
                continue
            saved += n
        return saved

    def save_newest(self, payloads: Sequence[bytes], *, max_tries: int = 48) -> int:
        """Prepend as many of ``payloads`` as fit, newest first, as front segments; how many.

        What is saved stays contiguous with the records already in the log (which are newer); an
        older remainder that does not fit is a gap between Redis and the log that the next start
        repairs or marks.
        """
        end, step = len(payloads), len(payloads)
        for _ in range(max_tries):
            if end <= 0 or step < 1:
                break
            start = max(0, end - step)
            try:
                self.prepend(payloads[start:end])
            except OSError:
                if end - start == 1:
                    break
                step = (end - start) // 2
                continue
            end = start
        return len(payloads) - end

    def sync(self) -> None:
        """Make what was appended durable.  A disk that refuses is logged and counted, never raised: the
        records stay readable from the page cache and drain as usual; only a crash of the host could lose them."""
        if self._fd >= 0 and self._dirty:
            try:
                os.fsync(self._fd)
                self.syncs += 1
            except OSError as exc:
                self.write_failures += 1
                log_event(log, logging.ERROR, "spill_sync_failed", segment=self._path(self._write_seg).name,
                          error=str(exc))
            self._dirty = False
        self._last_sync = time.monotonic()

    def maybe_sync(self) -> None:
        """Under the ``interval`` policy, sync when the interval has passed."""
        if self.fsync == "interval" and self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    # -- reading --------------------------------------------------------------------------------
    def peek(self, max_records: int) -> list[bytes]:
        """Up to ``max_records`` of the oldest records, without consuming them (see :meth:`consume`).

        Never empty while ``len(self)`` is positive: a segment that turns out not to be whole past some
        point is cut there (its uncountable rest dropped and counted in :attr:`corrupt`).
        """
        self._peeked = 0
        while self._segments:
            seg = self._segments[0]
            if self._reader is None or self._read_seg != seg:
                if self._reader is not None:
                    self._reader.close()
                self._reader = open(self._path(seg), "rb")  # noqa: SIM115 - closed in _retire/close
                self._read_seg = seg
                self._read_pos = self._resume.pop(seg, len(MAGIC))
            r = self._reader
            r.seek(self._read_pos)
            limit = self._bad_at.get(seg, -1)
            want = min(max_records, self._counts[seg])
            out: list[bytes] = []
            pos = self._read_pos
            bad = False
            carry = b""
            while len(out) < want:
                size = _READ_CHUNK if limit < 0 else max(0, limit - (pos + len(carry)))
                chunk = r.read(size) if size else b""
                if not chunk:
                    bad = bool(carry) or limit >= 0
                    break
                buf = carry + chunk if carry else chunk
                got, end, bad = parse_records(buf, 0, want - len(out))
                out += got
                pos += end
                carry = buf[end:]
                if bad:
                    break
            if out:
                self._peek_pos = pos
                self._peeked = len(out)
                if bad or len(out) < want:
                    self._drop_rest(seg, len(out))
                return out
            if self._counts[seg] > 0:
                self._drop_rest(seg, 0)
            self._retire(seg)
        return []

    def _drop_rest(self, seg: int, keep: int) -> None:
        """Segment ``seg`` holds only ``keep`` more whole records from the read position: forget the rest."""
        lost = self._counts[seg] - keep
        if lost > 0:
            self._counts[seg] = keep
            self.records -= lost
            self.corrupt += lost
            log_event(
                log, logging.ERROR, "spill_corrupt", segment=self._path(seg).name, records_dropped=lost,
                after_offset=self._read_pos,
            )
        if seg == self._write_seg:
            self._close_writer()

    def consume(self, n: int) -> None:
        """The first ``n`` records returned by the last :meth:`peek` are stored: forget them."""
        n = min(n, self._peeked)
        if n <= 0:
            return
        if n == self._peeked:
            self._read_pos = self._peek_pos
        else:
            self._read_pos = self._skip(self._read_seg, self._read_pos, n)
        self._peeked = 0
        self._counts[self._read_seg] -= n
        self.records -= n
        self.drained += n
        if self.records == 0:
            # Everything written is drained: the next spill starts a fresh log.
            self._close_writer()
            while self._segments:
                self._retire(self._segments[0])

    def _skip(self, seg: int, pos: int, n: int) -> int:
        with open(self._path(seg), "rb") as f:
            for _ in range(n):
                f.seek(pos)
                (length, _crc) = _HEAD.unpack(f.read(_HEAD.size))
                pos += _HEAD.size + length
        return pos

    def _retire(self, seg: int) -> None:
        if self._reader is not None and self._read_seg == seg:
            self._reader.close()
            self._reader = None
            self._read_seg = -1
        if seg == self._write_seg:
            self._close_writer()
        path = self._path(seg)
        try:
            self.bytes -= path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            pass
        self._segments.remove(seg)
        self.records -= self._counts.pop(seg, 0)
        self._bad_at.pop(seg, None)
        self._resume.pop(seg, None)
        if not self._segments:
            self.bytes = 0
            self.records = 0
        if self.bytes < self.max_bytes and self.full_reason:
            self.full_reason = ""
            self._no_room_until = 0.0

    def scan(self) -> Iterator[bytes]:
        """Every record not yet drained, in drain order (read at start to restore sequencing state)."""
        for _, payload in self.scan_segments():
            yield payload

    def scan_segments(self) -> Iterator[tuple[int, bytes]]:
        """Like :meth:`scan`, each record with the number of its segment."""
        for seg in list(self._segments):
            pos = self._read_pos if seg == self._read_seg else self._resume.get(seg, len(MAGIC))
            limit = self._bad_at.get(seg, -1)
            left = self._counts[seg]
            with open(self._path(seg), "rb") as f:
                f.seek(pos)
                carry = b""
                while left > 0:
                    chunk = f.read(_READ_CHUNK if limit < 0 else max(0, limit - pos))
                    if not chunk:
                        break
                    pos += len(chunk)
                    buf = carry + chunk if carry else chunk
                    got, end, bad = parse_records(buf, 0, left)
                    for payload in got:
                        yield seg, payload
                    left -= len(got)
                    carry = buf[end:]
                    if bad:
                        break

    def stats(self) -> SpillStats:
        return SpillStats(
            records=self.records, bytes=self.bytes, segments=len(self._segments), appended=self.appended,
            drained=self.drained, full=self.full, full_events=self.full_events,
            write_failures=self.write_failures, torn=self.torn, corrupt=self.corrupt, set_aside=self.set_aside,
        )

    def close(self) -> None:
        self._close_writer()
        if self._reader is not None:
            self._reader.close()
            self._reader = None
            self._read_seg = -1
