"""``market bench parse``: the Binance frame parser with the field checks remembering what they passed, against
the same parser checking every value by its regex, on the same frames in the same run.

The frames are the simulator's market (``symbols`` symbols x trade, aggTrade and bookTicker, combined-stream
frames, made before the clock starts: :func:`ops.bench.ingest.make_frames`).  A round parses all of them with
:func:`ingestor.binance.parse_frame`, ``batch`` frames at a time as one socket read hands them over, each batch
timed; rounds of the two modes alternate, so drift on a shared machine hits both alike:

- ``remembered``: the parser as it runs (:mod:`ingestor.fields`: a price, a quantity or a symbol seen before
  costs one set lookup);
- ``checked``: within :func:`ingestor.fields.values_checked_every_time`, every value takes its regex, as
  when a venue never repeats one.  This is the parser's worst case, not the parser before the sets: it pays a
  lookup that misses and a call per value more (a few percent of a frame).

Reported per mode: frames per second (the median round), and the µs a frame took per batch, p50 and p99 over
the batches of every round.  The ratio is the median round's throughput of ``remembered`` over ``checked``.
Each round also checks that both modes made the same ticks (a digest of them), since the point of remembering
is to change the cost, never the result.
"""

from __future__ import annotations

import gc
import hashlib
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Final

import orjson

from consumer_sdk.core.errors import ConfigError, MarketError
from ingestor.binance import parse_frame
from ingestor.fields import values_checked_every_time
from ops.bench.ingest import make_frames

__all__ = ["MODES", "run_parse_bench"]

#: mode -> what it runs within
MODES: Final[dict[str, Callable[[], AbstractContextManager[None]]]] = {
    "remembered": nullcontext,
    "checked": values_checked_every_time,
}


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round(frames: Sequence[bytes], batch: int) -> tuple[float, list[float], str]:
    """One pass over ``frames``: seconds spent parsing (the batches' times summed), µs a frame per batch, and a
    digest of the ticks made (taken between batches, off the clock)."""
    clock = time.perf_counter_ns
    per_frame: list[float] = []
    digest = hashlib.blake2b(digest_size=16)
    ts = 1_700_000_000_000_000
    spent = 0
    gc.collect()
    for i in range(0, len(frames), batch):
        chunk = frames[i : i + batch]
        t0 = clock()
        made = [parse_frame(raw, ts) for raw in chunk]
        took = clock() - t0
        spent += took
        per_frame.append(took / 1000 / len(chunk))
        digest.update(orjson.dumps(made))
    return spent / 1e9, per_frame, digest.hexdigest()


def run_parse_bench(
    *, frames: int = 200_000, symbols: int = 20, rounds: int = 5, batch: int = 64, seed: int = 1,
) -> dict[str, Any]:
    """Both modes, ``rounds`` rounds each, alternating; see the module doc."""
    if frames < 1 or rounds < 1 or batch < 1:
        raise ConfigError(f"frames, rounds and batch must be at least 1, got {frames}, {rounds}, {batch}")
    data = make_frames(frames, symbols, seed)
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    batches: dict[str, list[float]] = {mode: [] for mode in MODES}
    digests: set[str] = set()
    order: list[str] = []
    _round(data, batch)  # not counted: the first pass pays for what the others reuse
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            with MODES[mode]():
                elapsed, per_frame, digest = _round(data, batch)
            order.append(mode)
            rates[mode].append(len(data) / elapsed)
            batches[mode].extend(per_frame)
            digests.add(digest)
    if len(digests) != 1:
        raise MarketError("the two modes made different ticks from the same frames")
    modes = {
        mode: {
            "frames_per_s": round(statistics.median(rates[mode]), 1),
            "frames_per_s_min": round(min(rates[mode]), 1),
            "frames_per_s_max": round(max(rates[mode]), 1),
            "us_per_frame_p50": round(_percentile(batches[mode], 0.50), 3),
            "us_per_frame_p99": round(_percentile(batches[mode], 0.99), 3),
        }
        for mode in MODES
    }
    return {
        "frames": len(data), "symbols": symbols, "rounds": rounds, "batch": batch, "seed": seed, "order": order,
        "modes": modes, "ratio": round(modes["remembered"]["frames_per_s"] / modes["checked"]["frames_per_s"], 2),
        "same_ticks": True,
    }
