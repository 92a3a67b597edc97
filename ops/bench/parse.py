"""``market bench parse``: the Binance frame parser with its price and symbol checks remembering what they passed,
against the same parser with the checks alone (every value through its regex), on the same frames in the same run.

The frames are the simulator's market (``symbols`` symbols x trade, aggTrade and bookTicker, combined-stream
frames, made before the clock starts: :func:`ops.bench.ingest.make_frames`), with one frame in
:data:`REFUSED_EVERY` replaced by a copy carrying a price, quantity or symbol the checks must refuse (zero,
negative, an exponent, a non-ASCII digit, too many decimals, a symbol that cannot name a stream).  A round
parses all of them with :func:`ingestor.binance.parse_frame`, ``batch`` frames at a time as one socket read hands
them over, each batch timed, the batches going to the two modes in turn, so drift on a shared machine hits both
alike; each round starts with the checks' sets empty and with the other mode than the round before:

- ``remembered``: the parser as it runs (:mod:`ingestor.fields`: a price or a symbol seen before costs one set
  lookup; a mode's sets see only its own batches);
- ``checks_alone``: the parser with :func:`~ingestor.fields.pos` and :func:`~ingestor.fields.check_symbol` in
  place of the remembering :func:`~ingestor.fields.price` and :func:`~ingestor.fields.symbol`: every value through
  its regex, one call each, as when nothing is remembered.

Reported per mode: frames per second (the median over pairs of passes, in which the mode parsed every frame once:
its frames over the time its batches took), and the µs a frame took per batch, p50 and p99 over the batches of
every pass.  The ratio is the median over the pairs of ``remembered``'s throughput over ``checks_alone``'s, with
its least and greatest.  A mode's sets see only its own batches, every other one: fewer repeats than a parser that
sees every frame, so the ratio understates what remembering saves.  Each round digests what it made of every
frame, in order (the tick, or the refusal's kind and message); the run fails unless every round made the same,
whichever mode parsed which batch, since remembering may change the cost, never the verdict.
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
from ingestor.fields import check_symbol, forget_seen, pos
from ingestor.venue import MalformedFrame
from ops.bench.ingest import make_frames

__all__ = ["MODES", "MODE_NAMES", "REFUSED_EVERY", "REFUSED_VALUES", "run_parse_bench", "with_refusals"]

#: one frame in this many is replaced by one the checks must refuse
REFUSED_EVERY: Final = 50
#: by event (the frame's ``e``; a spot book ticker has none): (field, value) put into those frames in turn, each a
#: price, quantity or symbol the checks must refuse whatever they remember
REFUSED_VALUES: Final[dict[str | None, tuple[tuple[str, str], ...]]] = {
    "trade": (("p", "0"), ("q", "-1"), ("p", "1e5"), ("q", "٣"), ("s", "BTC/USDT"), ("p", "1." + "0" * 19)),
    "aggTrade": (("q", "0.00000000"), ("p", "NaN"), ("q", ""), ("s", "X" * 65), ("p", "-0.5"), ("q", "1,5")),
    None: (("b", "0.00000000"), ("A", "NaN"), ("B", ""), ("a", "1." + "0" * 19), ("s", "X" * 65), ("b", "+1")),
}


@contextmanager
def _checks_alone() -> Iterator[None]:
    """The Binance parser with the checks that remember nothing, for as long as the block runs."""
    names = {"_price": pos, "_symbol": check_symbol}
    kept = {name: getattr(binance, name) for name in names}
    try:
        for name, check in names.items():
            setattr(binance, name, check)
        yield
    finally:
        for name, check in kept.items():
            setattr(binance, name, check)


#: mode -> what it runs within
MODES: Final[dict[str, Callable[[], AbstractContextManager[None]]]] = {
    "remembered": nullcontext,
    "checks_alone": _checks_alone,
}
MODE_NAMES: Final = tuple(MODES)


def with_refusals(frames: list[bytes]) -> list[bytes]:
    """``frames`` with one in :data:`REFUSED_EVERY` replaced by a copy carrying the next of its event's
    :data:`REFUSED_VALUES` (a frame of another event is left as it is)."""
    out = list(frames)
    turns: dict[str | None, int] = {}
    for i in range(REFUSED_EVERY - 1, len(out), REFUSED_EVERY):
        wrapped = orjson.loads(out[i])
        data = wrapped["data"]
        event = data.get("e")
        values = REFUSED_VALUES.get(event)
        if values is None:
            continue
        turn = turns.get(event, 0)
        turns[event] = turn + 1
        field, value = values[turn % len(values)]
        data[field] = value
        out[i] = orjson.dumps(wrapped)
    return out


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _round(frames: Sequence[bytes], batch: int, first: int) -> tuple[dict[str, list[tuple[int, int]]], str, int]:
    """One pass over ``frames``, ``batch`` frames at a time, the batches going to the two modes in turn (the first to
    ``MODE_NAMES[first]``): per mode, (ns, frames) of each of its batches; a digest of what was made of every frame, in
    order (taken between batches, off the clock); and how many frames were refused."""
    clock = time.perf_counter_ns
    took: dict[str, list[tuple[int, int]]] = {mode: [] for mode in MODES}
    digest = hashlib.blake2b(digest_size=16)
    ts = 1_700_000_000_000_000
    refused = 0
    forget_seen()
    gc.collect()
    for k, i in enumerate(range(0, len(frames), batch)):
        mode = MODE_NAMES[(first + k) % 2]
        chunk = frames[i : i + batch]
        made: list[Any] = []
        add = made.append
        with MODES[mode]():
            t0 = clock()
            for raw in chunk:
                try:
                    add(parse_frame(raw, ts))
                except MalformedFrame as exc:
                    add((exc.kind, str(exc)))
            took[mode].append((clock() - t0, len(chunk)))
        refused += sum(type(m) is tuple for m in made)
        digest.update(orjson.dumps(made))
    return took, digest.hexdigest(), refused


def run_parse_bench(
    *, frames: int = 200_000, symbols: int = 20, rounds: int = 6, batch: int = 64, seed: int = 1,
) -> dict[str, Any]:
    """``rounds`` passes over the frames, the batches alternating between the modes, each pass starting with the
    other mode than the one before; figures per pair of passes, in which each mode parsed every frame once; see the
    module doc."""
    if frames < 2 * batch or rounds < 2 or rounds % 2 or batch < 1:
        raise ConfigError(f"need an even number of rounds, 1 frame a batch and 2 batches of frames, got {rounds}, "
                          f"{batch}, {frames}")
    data = with_refusals(make_frames(frames, symbols, seed))
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    per_frame: dict[str, list[float]] = {mode: [] for mode in MODES}
    digests: set[str] = set()
    refusals: set[int] = set()
    firsts: list[str] = []
    _round(data, batch, 0)  # not counted: the first pass pays for what the others reuse
    for _ in range(rounds // 2):
        pair: dict[str, list[tuple[int, int]]] = {mode: [] for mode in MODES}
        for first in (0, 1):
            took, digest, refused = _round(data, batch, first)
            firsts.append(MODE_NAMES[first])
            digests.add(digest)
            refusals.add(refused)
            for mode, batches in took.items():
                pair[mode] += batches
                per_frame[mode].extend(ns / 1000 / n for ns, n in batches)
        for mode, batches in pair.items():
            rates[mode].append(sum(n for _, n in batches) / (sum(ns for ns, _ in batches) / 1e9))
    forget_seen()
    if len(digests) != 1 or len(refusals) != 1:
        raise MarketError("the two modes made different ticks or refusals from the same frames")
    modes = {
        mode: {
            "frames_per_s": round(statistics.median(rates[mode]), 1),
            "frames_per_s_min": round(min(rates[mode]), 1),
            "frames_per_s_max": round(max(rates[mode]), 1),
            "us_per_frame_p50": round(_percentile(per_frame[mode], 0.50), 3),
            "us_per_frame_p99": round(_percentile(per_frame[mode], 0.99), 3),
        }
        for mode in MODES
    }
    ratios = [a / b for a, b in zip(rates["remembered"], rates["checks_alone"], strict=True)]
    return {
        "frames": len(data), "refused": refusals.pop(), "symbols": symbols, "rounds": rounds, "batch": batch,
        "seed": seed, "first": firsts, "modes": modes,
        "ratio": round(statistics.median(ratios), 2),
        "ratio_min": round(min(ratios), 2), "ratio_max": round(max(ratios), 2),
    }
