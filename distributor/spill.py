"""The writer's spill log: a local append-only log on disk for ticks Redis could not take yet.

Records are length-prefixed tick payloads (the same bytes stored in the stream field ``d``) in
segment files ``spill-<n>.log``.  The writer appends when its memory buffer is full (Redis slow
or down) and drains from the oldest record once Redis is back; a drained segment is deleted.
A crash loses nothing appended and synced: on start the remaining records are drained again
(the stream IDs make a re-drained tick a no-op).  A torn record at the end of the newest
segment (a crash mid-write) is cut off.

``fsync``: ``always`` syncs every append, ``interval`` at most every ``fsync_interval`` seconds
(from :meth:`SpillLog.maybe_sync`), ``never`` leaves it to the OS.  One owner task; no locks.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Final

from consumer_sdk.errors import ConfigError

__all__ = ["FSYNC_POLICIES", "SpillLog"]

FSYNC_POLICIES: Final = ("always", "interval", "never")
_LEN = struct.Struct("<I")
_MAX_RECORD = 1 << 24


class SpillLog:
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
        self.dir = Path(directory)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create spill directory {str(self.dir)!r}: {exc.strerror or exc}") from None
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self._segments: list[int] = sorted(
            int(p.stem.split("-")[1]) for p in self.dir.glob("spill-*.log") if p.stem.split("-")[1].isdigit()
        )
        self._writer: BinaryIO | None = None
        self._write_seg = -1
        self._read_seg = -1
        self._reader: BinaryIO | None = None
        self._read_pos = 0
        self._peek_pos = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self.records = 0
        self.bytes = sum(self._path(n).stat().st_size for n in self._segments)
        self.appended = 0
        self.drained = 0
        self.torn = 0
        if self._segments:
            self._repair_tail(self._segments[-1])
            self.records = sum(1 for _ in self._scan_all())

    def _path(self, n: int) -> Path:
        return self.dir / f"spill-{n:012d}.log"

    def __len__(self) -> int:
        return self.records

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    # -- writing --------------------------------------------------------------------------------
    def append(self, payloads: Iterable[bytes]) -> int:
        """Append records in order; returns how many.  Raises OSError if the disk refuses."""
        if self._writer is None or self._writer.tell() >= self.segment_bytes:
            self._roll()
        w = self._writer
        assert w is not None
        n = 0
        chunks: list[bytes] = []
        for p in payloads:
            chunks.append(_LEN.pack(len(p)))
            chunks.append(p)
            n += 1
        data = b"".join(chunks)
        w.write(data)
        w.flush()
        self.bytes += len(data)
        self.records += n
        self.appended += n
        self._dirty = True
        if self.fsync == "always":
            self.sync()
        return n

    def _roll(self) -> None:
        if self._writer is not None:
            self.sync()
            self._writer.close()
        n = (self._segments[-1] + 1) if self._segments else 1
        self._segments.append(n)
        self._writer = open(self._path(n), "ab")  # noqa: SIM115 - held open across appends, closed in close()
        self._write_seg = n

    def sync(self) -> None:
        if self._writer is not None and self._dirty:
            os.fsync(self._writer.fileno())
            self._dirty = False
        self._last_sync = time.monotonic()

    def maybe_sync(self) -> None:
        """Under the ``interval`` policy, sync when the interval has passed."""
        if self.fsync == "interval" and self._dirty and time.monotonic() - self._last_sync >= self.fsync_interval:
            self.sync()

    # -- reading --------------------------------------------------------------------------------
    def peek(self, max_records: int) -> list[bytes]:
        """Up to ``max_records`` of the oldest records, without consuming them (see :meth:`consume`)."""
        while self._segments:
            seg = self._segments[0]
            if self._reader is None or self._read_seg != seg:
                if self._reader is not None:
                    self._reader.close()
                self._reader = open(self._path(seg), "rb")  # noqa: SIM115 - closed in _retire/close
                self._read_seg = seg
                self._read_pos = 0
            r = self._reader
            r.seek(self._read_pos)
            out: list[bytes] = []
            while len(out) < max_records:
                head = r.read(4)
                if len(head) < 4:
                    break
                (size,) = _LEN.unpack(head)
                body = r.read(size)
                if len(body) < size:
                    break
                out.append(body)
            self._peek_pos = r.tell() if out else self._read_pos
            if out or seg == self._write_seg:
                return out
            self._retire(seg)  # an exhausted segment that is no longer written: move to the next one
        return []

    def consume(self, n: int) -> None:
        """The ``n`` records returned by the last :meth:`peek` are stored: forget them."""
        if n <= 0:
            return
        self._read_pos = self._peek_pos
        self.records -= n
        self.drained += n
        if self.records == 0:
            # Everything written is drained: the next spill starts a fresh segment.
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                self._write_seg = -1
            while self._segments:
                self._retire(self._segments[0])

    def _retire(self, seg: int) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        path = self._path(seg)
        self.bytes -= path.stat().st_size
        if seg == self._write_seg and self._writer is not None:
            self._writer.close()
            self._writer = None
            self._write_seg = -1
        path.unlink()
        self._segments.pop(0)
        self._read_seg = -1
        self._read_pos = 0
        if not self._segments:
            self.bytes = 0

    # -- recovery ---------------------------------------------------------------------------------
    def _repair_tail(self, seg: int) -> None:
        path = self._path(seg)
        good = 0
        with open(path, "rb") as f:
            while True:
                head = f.read(4)
                if len(head) < 4:
                    break
                (size,) = _LEN.unpack(head)
                if size > _MAX_RECORD:
                    break
                body = f.read(size)
                if len(body) < size:
                    break
                good = f.tell()
            end = f.seek(0, os.SEEK_END)
        if good < end:
            self.torn += 1
            with open(path, "r+b") as f:
                f.truncate(good)
            self.bytes -= end - good

    def _scan_all(self) -> Iterable[bytes]:
        for seg in self._segments:
            with open(self._path(seg), "rb") as f:
                while True:
                    head = f.read(4)
                    if len(head) < 4:
                        break
                    (size,) = _LEN.unpack(head)
                    body = f.read(size)
                    if len(body) < size:
                        break
                    yield body

    def scan(self) -> Iterable[bytes]:
        """Every record not yet drained, oldest first (used at start to restore sequencing state)."""
        return self._scan_all()

    def close(self) -> None:
        if self._writer is not None:
            self.sync()
            self._writer.close()
            self._writer = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
