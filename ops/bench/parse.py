"""``market bench parse``: the Binance frame parser with the field checks remembering what they passed, against
the same parser with the checks alone (every value through its regex), on the same frames in the same run.

The frames are the simulator's market (``symbols`` symbols x trade, aggTrade and bookTicker, combined-stream
frames, made before the clock starts: :func:`ops.bench.ingest.make_frames`), with one frame in
:data:`REFUSED_EVERY` replaced by a copy carrying a value the checks must refuse (a zero, negative, exponent or
non-ASCII price or quantity, a symbol that cannot name a stream).  A round parses all of them with
:func:`ingestor.binance.parse_frame`, ``batch`` frames at a time as one socket read hands them over, each batch
timed; rounds of the two modes alternate, so drift on a shared machine hits both alike, and every round starts
with the checks' sets empty:

- ``remembered``: the parser as it runs (:mod:`ingestor.fields`: a price, a quantity or a symbol seen before
  costs one set lookup);
- ``checks_alone``: the parser with :func:`~ingestor.fields.check_pos`, :func:`~ingestor.fields.check_nonneg`
  and :func:`~ingestor.fields.check_symbol` in place of the remembering checks: every value through its regex,
  one call each, as when nothing is remembered.

Reported per mode: frames per second (the median round), and the µs a frame took per batch, p50 and p99 over
the batches of every round.  The ratio is the median round's throughput of ``remembered`` over ``checks_alone``.
Each round digests what it made of every frame (the tick, or the refusal's kind); the run fails unless every
round of both modes made the same, since remembering may change the cost, never the verdict.
"""

from __future__ import annotations

import gc
import hashlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Final

import orjson

import ingestor.binance as binance
from consumer_sdk.core.errors import ConfigError, MarketError
from ingestor.binance import parse_frame
from ingestor.fields import check_nonneg, check_pos, check_symbol, forget_seen
from ingestor.venue import MalformedFrame
from ops.bench.ingest import make_frames

__all__ = ["MODES", "REFUSED_EVERY", "REFUSED_VALUES", "run_parse_bench", "with_refusals"]

#: one frame in this many is replaced by one the checks must refuse
REFUSED_EVERY: Final = 50
#: (field, value) put into those frames in turn: each must be refused whatever the checks remember
REFUSED_VALUES: Final = (
    ("p", "0"), ("q", "-1"), ("p", "1e5"), ("q", "٣"), ("b", "0.00000000"), ("A", "NaN"), ("s", "BTC/USDT"),
    ("B", ""), ("a", "1." + "0" * 19), ("s", "X" * 65),
)


@contextmanager
def _checks_alone() -> Iterator[None]:
    """The Binance parser with the checks that remember nothing, for as long as the block runs."""
    names = {"_pos": check_pos, "_nonneg": check_nonneg, "_symbol": check_symbol}
    kept = {name: getattr(binance, name) for name in names}
    for name, check in names.items():
        setattr(binance, name, check)
    try:
        yield
    finally:
        for name, check in kept.items():
            setattr(binance, name, check)


#: mode -> what it runs within
MODES: Final[dict[str, Callable[[], AbstractContextManager[None]]]] = {
    "remembered": nullcontext,
    "checks_alone": _checks_alone,
}


def with_refusals(frames: list[bytes]) -> list[bytes]:
    """``frames`` with one in :data:`REFUSED_EVERY` replaced by a copy carrying the next of :data:`REFUSED_VALUES`
    that its event has (a frame whose event has none of them is left as it is)."""
    out = list(frames)
    turn = 0
    for i in range(REFUSED_EVERY - 1, len(out), REFUSED_EVERY):
        wrapped = orjson.loads(out[i])
        data = wrapped["data"]
        for step in range(len(REFUSED_VALUES)):
            field, value = REFUSED_VALUES[(turn + step) % len(REFUSED_VALUES)]
            if field in data:
                data[field] = value
                out[i] = orjson.dumps(wrapped)
                turn += step + 1
                break
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round(frames: Sequence[bytes], batch: int) -> tuple[float, list[float], str, int]:
    """One pass over ``frames``: seconds spent parsing (the batches' times summed), µs a frame per batch, a digest
    of what was made of each frame (taken between batches, off the clock) and how many frames were refused."""
    clock = time.perf_counter_ns
    per_frame: list[float] = []
    digest = hashlib.blake2b(digest_size=16)
    ts = 1_700_000_000_000_000
    spent = refused = 0
    gc.collect()
    for i in range(0, len(frames), batch):
        chunk = frames[i : i + batch]
        made: list[Any] = []
        add = made.append
        t0 = clock()
        for raw in chunk:
            try:
                add(parse_frame(raw, ts))
            except MalformedFrame as exc:
                add(exc.kind)
        took = clock() - t0
        spent += took
        per_frame.append(took / 1000 / len(chunk))
        refused += sum(type(m) is str for m in made)
        digest.update(orjson.dumps(made))
    return spent / 1e9, per_frame, digest.hexdigest(), refused


def run_parse_bench(
    *, frames: int = 200_000, symbols: int = 20, rounds: int = 5, batch: int = 64, seed: int = 1,
) -> dict[str, Any]:
    """Both modes, ``rounds`` rounds each, alternating; see the module doc."""
    if frames < 1 or rounds < 1 or batch < 1:
        raise ConfigError(f"frames, rounds and batch must be at least 1, got {frames}, {rounds}, {batch}")
    data = with_refusals(make_frames(frames, symbols, seed))
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    batches: dict[str, list[float]] = {mode: [] for mode in MODES}
    digests: set[str] = set()
    refusals: set[int] = set()
    order: list[str] = []
    forget_seen()
    _round(data, batch)  # not counted: the first pass pays for what the others reuse
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            forget_seen()
            with MODES[mode]():
                elapsed, per_frame, digest, refused = _round(data, batch)
            order.append(mode)
            rates[mode].append(len(data) / elapsed)
            batches[mode].extend(per_frame)
            digests.add(digest)
            refusals.add(refused)
    forget_seen()
    if len(digests) != 1 or len(refusals) != 1:
        raise MarketError("the two modes made different ticks or refusals from the same frames")
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
        "frames": len(data), "refused": refusals.pop(), "symbols": symbols, "rounds": rounds, "batch": batch,
        "seed": seed, "order": order, "modes": modes,
        "ratio": round(modes["remembered"]["frames_per_s"] / modes["checks_alone"]["frames_per_s"], 2),
    }
