"""Capture files for replay: loading and pacing, pure code apart from reading the file.

A capture has one JSON object per line, ``{"recv_ts": <float seconds>, "frame": "<text frame>"}``,
where the frame is combined-stream wrapped (``{"stream": ..., "data": {...}}``). Replay sends each
frame at its recorded offset from the first one (divided by a speed factor) to the connections
subscribed to its stream: the recorded bytes unchanged on combined connections, and the ``data``
part (re-serialized, same content) on raw ones. Event times inside are the recorded ones.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

from .errors import CaptureError

__all__ = ["ReplayFrame", "capture_symbols", "frames_due", "load_capture"]


@dataclass(frozen=True, slots=True)
class ReplayFrame:
    """One recorded frame: seconds after the first frame, its stream, and both payload forms."""

    offset: float
    stream: str
    raw: bytes
    combined: bytes


def load_capture(path: str | Path) -> list[ReplayFrame]:
    """Read a capture file; raise :class:`CaptureError` naming the file and line on bad input."""
    try:
        lines = Path(path).read_bytes().splitlines()
    except OSError as exc:
        raise CaptureError(f"cannot read capture {str(path)!r}: {exc.strerror or exc}") from None
    frames: list[ReplayFrame] = []
    first: float | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = orjson.loads(line)
            recv_ts = record["recv_ts"]
            text = record["frame"]
            frame = orjson.loads(text)
            stream = frame["stream"]
            data = frame["data"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise CaptureError(f"{where}: not a capture record ({exc})") from None
        if not isinstance(recv_ts, int | float) or not isinstance(stream, str) or not isinstance(text, str):
            raise CaptureError(f"{where}: recv_ts must be a number, frame and stream strings")
        if first is None:
            first = float(recv_ts)
        offset = max(0.0, float(recv_ts) - first)
        if frames and offset < frames[-1].offset:
            offset = frames[-1].offset  # a capture clock stepping back: keep the order
        frames.append(ReplayFrame(offset, stream, orjson.dumps(data), text.encode()))
    if not frames:
        raise CaptureError(f"capture {str(path)!r} holds no frames")
    return frames


def capture_symbols(frames: Sequence[ReplayFrame]) -> tuple[str, ...]:
    """The symbols (upper case) of the streams in a capture, in order of first appearance."""
    symbols = dict.fromkeys(f.stream.partition("@")[0].upper() for f in frames)
    return tuple(symbols)


def frames_due(frames: Sequence[ReplayFrame], start: int, elapsed: float, speed: float) -> int:
    """Index after the last frame due ``elapsed`` seconds into playback at ``speed``, from ``start``."""
    due = bisect.bisect_right(frames, elapsed * speed, lo=start, key=_offset)
    return max(start, due)


def _offset(frame: ReplayFrame) -> float:
    return frame.offset
