"""The soak's decisions, pure: the fault schedule, the stream invariant, the growth test, the summary.

Nothing here touches a process, a socket or the clock; :mod:`ops.soak` runs what these decide.

- :func:`parse_faults` reads ``--faults``: ``all`` (every kind at its default rate), or
  ``kind[=N/h],...`` (``N`` times an hour), or ``none``.  Unknown kinds and malformed rates are a
  :class:`~consumer_sdk.core.errors.ConfigError` naming them.
- :func:`plan` lays the faults out over a run, seeded: the same seed and arguments give the same
  schedule.  Faults never overlap (each gets its own slot, so its recovery can be timed), every
  kind asked for happens at least once, and a warm-up and a cool-down stay quiet.
- :class:`StreamCheck` is the invariant on one stream of venue ids (trades, aggregate trades):
  every id from the first one seen is stored exactly once, in order, or lies inside a gap marker.
- :data:`VENUE_PLANS` holds what differs per venue (``--venue``): its symbols and channels by default, the
  channels whose seq are the venue's contiguous ids (the ones :class:`StreamCheck` holds), the REST history that
  gives the venue's newest id of each (:func:`history_path`, :func:`newest_id`), and the fault kinds its
  simulator profile cannot take, each with its reason (:func:`applicable_faults` sets them aside, by name).
- :func:`grows_without_bound` is the resource test: a least-squares slope over the second half of
  a series, compared with the series' own level and the time it covers.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

from consumer_sdk.core.errors import ConfigError

__all__ = [
    "FAULT_KINDS",
    "VENUE_PLANS",
    "FaultEvent",
    "StreamCheck",
    "VenuePlan",
    "applicable_faults",
    "checked_channels",
    "grows_without_bound",
    "history_path",
    "merge_runs",
    "missing_from",
    "newest_id",
    "parse_faults",
    "plan",
    "recovery_summary",
    "slope",
    "venue_plan",
]

#: every fault kind, with what it does and its default rate (times an hour)
FAULT_KINDS: Final[dict[str, tuple[str, float]]] = {
    "close_storm": ("the venue closes every connection five times in a row", 4.0),
    "stall": ("the venue stops sending on every connection, sockets open", 4.0),
    "refuse": ("the venue refuses new connections (HTTP 503)", 4.0),
    "blackhole": ("one ingestor's link to the venue drops every packet (no FIN, no RST)", 4.0),
    "http_error": ("one ingestor's proxy answers 404/403/502 pages and cuts its connection", 4.0),
    "bad_frames": ("the venue sends malformed, duplicate and out-of-order frames", 4.0),
    "redis_restart": ("Redis stops and starts again (AOF on)", 3.0),
    "redis_unreachable": ("every client's link to Redis drops every packet", 3.0),
    "ingestor_kill": ("one ingestor is SIGKILLed and started again", 3.0),
    "consumer_kill": ("one consumer is SIGKILLed mid-batch and started again", 4.0),
    "spill_full": ("Redis unreachable long enough that one ingestor's capped spill fills", 2.0),
}
WARMUP_S: Final = 20.0
COOLDOWN_S: Final = 30.0


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One fault: ``kind`` starts ``at`` seconds into the run and lasts ``duration`` seconds.

    ``target`` picks the ingestor or consumer (0 or 1) where the kind has one; ``status`` is the
    HTTP status of an ``http_error``.
    """

    at: float
    kind: str
    duration: float
    target: int = 0
    status: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"at": round(self.at, 3), "kind": self.kind, "duration": round(self.duration, 3),
                "target": self.target, "status": self.status}


def parse_faults(text: str) -> dict[str, float]:
    """``all`` | ``none`` | ``kind[=N/h],...`` -> rate an hour per kind."""
    text = text.strip()
    if text == "all":
        return {k: rate for k, (_, rate) in FAULT_KINDS.items()}
    if text in ("", "none"):
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, rate_text = part.strip().partition("=")
        name = name.strip()
        if name not in FAULT_KINDS:
            raise ConfigError(f"unknown fault {name!r}; known: {', '.join(FAULT_KINDS)}")
        if not sep:
            out[name] = FAULT_KINDS[name][1]
            continue
        number = rate_text.strip().removesuffix("/h")
        try:
            rate = float(number)
        except ValueError:
            raise ConfigError(f"fault {name!r}: rate must look like 4/h, got {rate_text!r}") from None
        if not math.isfinite(rate) or rate <= 0 or rate > 3600:
            raise ConfigError(f"fault {name!r}: rate must be above 0 and at most 3600/h, got {rate_text!r}")
        out[name] = rate
    return out


def plan(rates: dict[str, float], duration: float, seed: int) -> list[FaultEvent]:
    """A schedule for ``duration`` seconds: each kind ``rate x hours`` times (at least once), shuffled,
    one per slot, with a random start in the first part of its slot."""
    if not rates:
        return []
    active = duration - WARMUP_S - COOLDOWN_S
    if active <= 0:
        raise ConfigError(f"a soak with faults needs more than {WARMUP_S + COOLDOWN_S:.0f} s")
    rng = random.Random(seed)
    kinds: list[str] = []
    for kind in sorted(rates):
        kinds += [kind] * max(1, round(rates[kind] * duration / 3600.0))
    rng.shuffle(kinds)
    slot = active / len(kinds)
    if slot < 8.0:
        raise ConfigError(
            f"{len(kinds)} faults do not fit in {duration:.0f} s (8 s each at least): lower the rates or run longer"
        )
    events = []
    for i, kind in enumerate(kinds):
        # the fault takes at most 60% of its slot, so the rest of the slot shows the recovery
        longest = min(_LONGEST.get(kind, 30.0), 0.6 * slot)
        shortest = min(_SHORTEST.get(kind, 5.0), longest)
        length = rng.uniform(shortest, longest)
        start = WARMUP_S + i * slot + rng.uniform(0.0, max(0.0, 0.6 * slot - length))
        status = rng.choice((404, 403, 502)) if kind == "http_error" else 0
        events.append(FaultEvent(start, kind, length, target=rng.randrange(2), status=status))
    return events


@dataclass(frozen=True, slots=True)
class VenuePlan:
    """What the soak does differently on one venue.

    ``history`` maps each checked channel to the venue's REST path listing it newest last (Binance) or newest
    first (OKX), the query parameter naming the symbol, and the field of a row holding the id.
    ``unsupported`` names the fault kinds the venue's simulator profile cannot take, each with why.
    """

    name: str
    symbols: tuple[str, ...]
    channels: tuple[str, ...]
    #: the channels whose seq are the venue's own ids, numbered one by one per symbol (held to StreamCheck)
    checked: tuple[str, ...]
    #: a REST path the simulator answers once it listens
    ping: str
    history: Mapping[str, tuple[str, str, str]]
    unsupported: Mapping[str, str] = field(default_factory=dict)


#: every venue ``market soak --venue`` runs, the default first.  Every fault kind the soak injects acts on a
#: part every profile has (the venue's connections, its handshakes, its frames; the proxies; Redis; processes),
#: so none is set aside today.
VENUE_PLANS: Final[dict[str, VenuePlan]] = {
    "binance": VenuePlan(
        "binance", ("BTCUSDT", "ETHUSDT"), ("trade", "agg_trade"), ("trade", "agg_trade"), "/api/v3/ping",
        {"trade": ("/api/v3/trades", "symbol", "id"), "agg_trade": ("/api/v3/aggTrades", "symbol", "a")},
    ),
    "binance_usdm": VenuePlan(
        "binance_usdm", ("BTCUSDT", "ETHUSDT"), ("agg_trade", "book_ticker", "mark_price"), ("agg_trade",),
        "/fapi/v1/ping", {"agg_trade": ("/fapi/v1/aggTrades", "symbol", "a")},
    ),
    "binance_coinm": VenuePlan(
        "binance_coinm", ("BTCUSD_PERP", "ETHUSD_PERP"), ("agg_trade", "book_ticker", "mark_price"), ("agg_trade",),
        "/dapi/v1/ping", {"agg_trade": ("/dapi/v1/aggTrades", "symbol", "a")},
    ),
    "okx": VenuePlan(
        "okx", ("BTC-USDT", "BTC-USDT-SWAP"), ("trade", "book_ticker"), ("trade",), "/api/v5/public/time",
        {"trade": ("/api/v5/market/history-trades", "instId", "tradeId")},
    ),
}


def venue_plan(name: str) -> VenuePlan:
    """The soak's plan for venue ``name``; :class:`ConfigError` naming the known ones otherwise."""
    found = VENUE_PLANS.get(name)
    if found is None:
        raise ConfigError(f"unknown venue {name!r}; known: {', '.join(VENUE_PLANS)}")
    return found


def checked_channels(venue: VenuePlan, channels: Sequence[str]) -> tuple[str, ...]:
    """The channels of ``channels`` held to the stream invariant on ``venue``, in the order given."""
    return tuple(c for c in channels if c in venue.checked)


def applicable_faults(
    venue: VenuePlan, rates: Mapping[str, float],
) -> tuple[dict[str, float], dict[str, str]]:
    """``rates`` split into the kinds ``venue`` takes and the ones it cannot (kind -> why), by name."""
    kept = {k: r for k, r in rates.items() if k not in venue.unsupported}
    skipped = {k: venue.unsupported[k] for k in rates if k in venue.unsupported}
    return kept, skipped


def history_path(venue: VenuePlan, symbol: str, channel: str) -> str:
    """The REST path and query giving the newest id of ``symbol``'s ``channel`` on ``venue``."""
    path, param, _ = venue.history[channel]
    return f"{path}?{param}={quote(symbol, safe='')}&limit=1"


def newest_id(venue: VenuePlan, channel: str, answer: Any) -> int | None:
    """The newest id in the venue's answer to :func:`history_path` (None when it lists nothing).

    Binance answers a list, oldest first; OKX ``{"code": "0", "data": [...]}``, newest first (an answer with another
    code is :class:`ValueError`)."""
    _, _, id_field = venue.history[channel]
    if isinstance(answer, dict):
        if str(answer.get("code")) != "0":
            raise ValueError(f"{venue.name} answered code {answer.get('code')!r}: {answer.get('msg')!r}")
        rows = answer.get("data") or []
        row = rows[0] if rows else None
    else:
        row = answer[-1] if answer else None
    return None if row is None else int(row[id_field])


_SHORTEST: Final = {"redis_unreachable": 10.0, "spill_full": 20.0, "close_storm": 5.0, "ingestor_kill": 2.0,
                    "consumer_kill": 1.0}
_LONGEST: Final = {"redis_unreachable": 60.0, "spill_full": 60.0, "close_storm": 10.0, "ingestor_kill": 6.0,
                   "consumer_kill": 3.0, "stall": 20.0, "refuse": 20.0, "blackhole": 40.0, "http_error": 30.0,
                   "bad_frames": 60.0, "redis_restart": 5.0}


@dataclass
class StreamCheck:
    """The invariant on one stream of contiguous venue ids, fed entry by entry in stream order.

    ``next`` is the id the next entry must hold (None before the first).  A tick must be ``next``;
    a gap marker must start at ``next`` (or lower, overlapping nothing stored) and moves ``next``
    past its end.  Anything else is a break: the first one is kept with its entry ID.
    """

    key: str
    next: int | None = None
    stored: int = 0
    marked: int = 0
    markers: int = 0
    breaks: int = 0
    first_break: str = ""
    #: (first, last) runs of ids stored as ticks, merged; for comparing with what consumers saw
    runs: list[list[int]] = field(default_factory=list)

    def feed(self, entry_id: str, seq: int, gap: tuple[int, int] | None) -> None:
        expected = self.next
        if gap is not None:
            first, last = gap
            if expected is not None and (first > expected or last < expected or seq != last):
                self.break_at(entry_id, f"gap marker {first}..{last} where id {expected} was due")
            if expected is None or last >= expected:
                lo = first if expected is None else max(first, expected)
                self.marked += last - lo + 1
                self.next = last + 1
            self.markers += 1
            return
        if expected is not None and seq != expected:
            what = "stored twice or out of order" if seq < expected else f"missing {expected}..{seq - 1}"
            self.break_at(entry_id, f"id {seq} where {expected} was due ({what})")
            if seq < expected:
                return
        self.stored += 1
        self.next = seq + 1
        runs = self.runs
        if runs and runs[-1][1] == seq - 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])

    def break_at(self, entry_id: str, what: str) -> None:
        """Count a break at ``entry_id``; the first one is kept, with its stream and entry ID."""
        self.breaks += 1
        if not self.first_break:
            self.first_break = f"{self.key} at entry {entry_id}: {what}"


def merge_runs(runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, overlapping or adjacent (first, last) runs merged into disjoint ones."""
    out: list[list[int]] = []
    for first, last in sorted(runs):
        if out and first <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], last)
        else:
            out.append([first, last])
    return [(a, b) for a, b in out]


def missing_from(stored: Sequence[tuple[int, int]], seen: Sequence[tuple[int, int]], upto: int) -> int:
    """How many ids up to ``upto`` are in ``stored`` runs and in no ``seen`` run."""
    seen = merge_runs(seen)
    total = 0
    j = 0
    for first, last in merge_runs(stored):
        last = min(last, upto)
        if last < first:
            continue
        covered = 0
        while j < len(seen) and seen[j][1] < first:
            j += 1
        k = j
        while k < len(seen) and seen[k][0] <= last:
            covered += min(last, seen[k][1]) - max(first, seen[k][0]) + 1
            k += 1
        total += (last - first + 1) - covered
    return total


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of ``(t, value)`` points (0 for fewer than two distinct times)."""
    if len(points) < 2:
        return 0.0
    mt = statistics.fmean(t for t, _ in points)
    mv = statistics.fmean(v for _, v in points)
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return 0.0
    return sum((t - mt) * (v - mv) for t, v in points) / den


def grows_without_bound(points: Sequence[tuple[float, float]], *, tolerance: float = 0.10, floor: float = 0.0) -> bool:
    """True when the second half of the series rises by more than ``tolerance`` of its level.

    The rise is the slope over the second half times the time it covers; it must also exceed
    ``floor`` (in the series' own unit), so a counter moving by a handful (threads 9 -> 10) is not growth.
    """
    half = points[len(points) // 2 :]
    if len(half) < 4:
        return False
    span = half[-1][0] - half[0][0]
    level = max(1e-9, statistics.fmean(abs(v) for _, v in half))
    rise = slope(half) * span
    return rise > tolerance * level and rise > floor


def recovery_summary(recoveries: dict[str, list[float | None]]) -> dict[str, dict[str, Any]]:
    """Per fault kind: count, recovered, median and worst time to recovery (seconds)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, times in sorted(recoveries.items()):
        done = sorted(t for t in times if t is not None)
        out[kind] = {
            "injected": len(times),
            "recovered": len(done),
            "median_s": round(statistics.median(done), 2) if done else None,
            "worst_s": round(done[-1], 2) if done else None,
        }
    return out
