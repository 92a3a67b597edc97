"""The scale bench's arithmetic: symbols split between ingestors, one window's figures, a cell's summary, the
ratios to the first cell, and the Markdown table.  Pure: no I/O, no clock; :mod:`ops.bench.scale` reads the
edges and calls these.

A window runs between two :class:`ScaleEdge` reads.  Its stored rate is what Redis holds more at its end than at
its start (each stream's ``entries-added``, which trimming does not lower), never what the ingestors say they
wrote.  A window is *saturated* when the simulator generated less than
:data:`~ops.bench.profiles.UNDER_DELIVERY` of the offered rate (starved of CPU), when the backlog (frames sent but
not yet stored) grew by more than :data:`~ops.bench.profiles.GROWTH_SHARE` of the offered rate over the window,
or when an ingestor reconnected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ops.bench.profiles import GROWTH_SHARE, UNDER_DELIVERY

__all__ = [
    "ScaleEdge",
    "add_ratios",
    "analyse_window",
    "others_cores",
    "render_scale_markdown",
    "split_symbols",
    "stream_keys",
    "summarize_cell",
]


def split_symbols(symbols: Sequence[str], parts: int) -> list[tuple[str, ...]]:
    """``symbols`` dealt round-robin into ``parts`` disjoint non-empty sets (the simulator gives every symbol an
    equal share of the rate, so the sets' loads differ by one symbol's at most); ValueError when there are fewer
    symbols than parts."""
    if parts < 1 or len(symbols) < parts:
        raise ValueError(f"cannot split {len(symbols)} symbols between {parts} ingestors")
    return [tuple(symbols[i::parts]) for i in range(parts)]


def stream_keys(prefix: str, symbols: Sequence[str], channels: Sequence[str], venue: str = "binance") -> list[str]:
    """The stream keys an ingestor of ``symbols`` x ``channels`` writes under ``prefix``."""
    return [f"{prefix}:{venue}:{s}:{c}" for s in symbols for c in channels]


@dataclass(frozen=True, slots=True)
class ScaleEdge:
    """One read of everything at one instant: Redis first, then the ingestors, then the simulator (each later
    read can only be ahead of the one before, so sent - stored is never negative)."""

    t: float
    #: ticks stored in Redis, per ingestor (its own streams), counted from Redis
    stored: tuple[int, ...]
    #: frames each ingestor received (its ``/metrics``)
    received: tuple[int, ...]
    #: reconnects of each ingestor to the venue
    reconnects: tuple[int, ...]
    #: frames the simulator sent (to every connection) and ticks it generated (every kind, sent or not)
    sent: int
    generated: int
    #: ticks it generated of the kinds the ingestors subscribe to (trade, aggTrade, bookTicker)
    streamed: int
    #: CPU seconds so far of each process (None: gone or unreadable)
    cpu: Mapping[str, float | None]
    #: CPU seconds the whole machine spent busy so far (None: unreadable)
    machine: float | None


def analyse_window(rate: float, a: ScaleEdge, b: ScaleEdge) -> dict[str, Any]:
    """One window's figures: rates per second, CPU seconds and core share per process, and whether (and why) it
    saturated (see the module's docstring)."""
    dt = b.t - a.t
    if dt <= 0:
        raise ValueError("a window must last")
    stored = [y - x for x, y in zip(a.stored, b.stored, strict=True)]
    stored_total = sum(stored)
    generated_per_s = (b.generated - a.generated) / dt
    backlog_growth = (b.sent - sum(b.stored)) - (a.sent - sum(a.stored))
    reconnects = sum(b.reconnects) - sum(a.reconnects)
    reasons: list[str] = []
    if generated_per_s < UNDER_DELIVERY * rate:
        reasons.append(f"the simulator generated {generated_per_s:.0f}/s of the {rate:.0f}/s offered (starved)")
    if backlog_growth > GROWTH_SHARE * rate * dt:
        reasons.append(f"the backlog (sent, not stored) grew by {backlog_growth} ticks")
    if reconnects:
        reasons.append(f"the venue connection was lost {reconnects} time(s)")
    # An ingestor's CPU is per tick of its own streams; every other process's per tick of all of them.
    own = {f"ingestor-{i}": n for i, n in enumerate(stored, start=1)}
    cpu_s: dict[str, float | None] = {}
    for name, after in b.cpu.items():
        before = a.cpu.get(name)
        cpu_s[name] = None if after is None or before is None else round(after - before, 2)
    machine_s = None if a.machine is None or b.machine is None else round(b.machine - a.machine, 2)
    return {
        "rate": rate,
        "window_s": round(dt, 2),
        "generated_per_s": round(generated_per_s),
        "sent_per_s": round((b.sent - a.sent) / dt),
        "received_per_s": round((sum(b.received) - sum(a.received)) / dt),
        "stored_per_s": round(stored_total / dt),
        "stored_per_s_by_ingestor": [round(s / dt) for s in stored],
        "backlog_growth": backlog_growth,
        "reconnects": reconnects,
        "cpu_s": cpu_s,
        "cpu_share": {k: (None if v is None else round(v / dt, 3)) for k, v in cpu_s.items()},
        "cpu_us_per_tick": {k: _per_tick(v, own.get(k, stored_total)) for k, v in cpu_s.items()},
        "machine_busy_s": machine_s,
        "machine_busy_cores": None if machine_s is None else round(machine_s / dt, 3),
        "others_cores": others_cores(machine_s, cpu_s, dt),
        "saturated": bool(reasons),
        "reasons": reasons,
    }


def others_cores(machine_s: float | None, cpu_s: Mapping[str, float | None], dt: float) -> float | None:
    """The cores the rest of the machine kept busy over a window: the machine's busy time less the run's
    processes', per second (None when a figure is missing); the bench process itself counts as the rest."""
    if machine_s is None or any(v is None for v in cpu_s.values()):
        return None
    return round(max(0.0, machine_s - sum(v for v in cpu_s.values() if v is not None)) / dt, 3)


def _per_tick(cpu_s: float | None, ticks: int) -> float | None:
    return None if cpu_s is None or ticks <= 0 else round(cpu_s * 1e6 / ticks, 2)


def summarize_cell(masters: int, ingestors: int, steps: Sequence[Mapping[str, Any]], *, sent: int, stored: int,
                   streamed: int, drained: bool) -> dict[str, Any]:
    """A cell: its steps, its best window (the most stored per second in any window: what the whole path took
    at most) and its sustained peak (the highest offered rate whose window did not saturate), and the final
    tally from the moment every ingestor had subscribed to the moment the path drained at rate 0: ticks
    ``stored`` (from Redis) against frames ``sent`` and against ticks ``streamed`` (generated, of the subscribed
    kinds); it adds up when the three are equal.  After a lost venue connection (an overloaded window) what the
    venue generated and never sent is partly fetched back over REST (trades and aggregate trades) and partly gone
    by design (book ticker updates the next one supersedes): then it adds up when nothing sent is missing and
    nothing stored was never generated (``sent <= stored <= streamed``), and ``repaired`` is the difference."""
    reconnects = sum(int(s.get("reconnects", 0)) for s in steps)
    best = max(steps, key=lambda s: s["stored_per_s"], default=None)
    sustained = max((s for s in steps if not s["saturated"]), key=lambda s: s["rate"], default=None)
    return {
        "masters": masters,
        "ingestors": ingestors,
        "steps": list(steps),
        "stored_per_s": best["stored_per_s"] if best else None,
        "sustained_rate": sustained["rate"] if sustained else None,
        "sustained_stored_per_s": sustained["stored_per_s"] if sustained else None,
        "best": best,
        "sent": sent,
        "stored": stored,
        "streamed": streamed,
        "drained": drained,
        "reconnects": reconnects,
        "repaired": stored - sent,
        "adds_up": drained and (sent == stored == streamed if reconnects == 0 else sent <= stored <= streamed),
    }


def add_ratios(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each cell's ``ratio``: its best stored rate over the 1-master 1-ingestor cell's (None without that cell)."""
    base = next((c for c in cells if c["masters"] == 1 and c["ingestors"] == 1), None)
    base_rate = base["stored_per_s"] if base else None
    for c in cells:
        c["ratio"] = (round(c["stored_per_s"] / base_rate, 2)
                      if base_rate and c["stored_per_s"] is not None else None)
    return cells


def _k(v: float | None) -> str:
    return "-" if v is None else f"{v / 1000:.1f}k"


def _share(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def render_scale_markdown(cells: Sequence[Mapping[str, Any]]) -> str:
    """The cells as a Markdown table (one row a cell) and, below, each cell's CPU by process in its best window."""
    lines = [
        "| masters | ingestors | stored ticks/s (best window) | ratio to 1x1 | sustained (offered, no saturation) "
        "| machine busy, cores | of which others, cores | stored = sent after drain |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for c in cells:
        best = c["best"] or {}
        ratio = "-" if c.get("ratio") is None else f"x{c['ratio']:.2f}"
        tally = f"{'yes' if c['adds_up'] else 'NO'} ({c['stored']} of {c['sent']})"
        if c.get("reconnects"):
            tally += f"; {c['reconnects']} reconnects, {c['repaired']} more fetched over REST"
        lines.append(
            f"| {c['masters']} | {c['ingestors']} | {_k(c['stored_per_s'])} | {ratio} | "
            f"{_k(c['sustained_rate'])} | {_share(best.get('machine_busy_cores'))} | "
            f"{_share(best.get('others_cores'))} | {tally} |"
        )
    lines += ["", "CPU in the best window, cores (CPU seconds / window seconds), per process:", ""]
    seen = {name for c in cells for name in (c["best"] or {}).get("cpu_share", {})}
    names = sorted(seen, key=lambda n: (0 if n == "simulator" else 1 if n.startswith("ingestor") else 2, n))
    lines.append("| masters | ingestors | offered/s | " + " | ".join(names) + " |")
    lines.append("| ---: | ---: | ---: | " + " | ".join("---:" for _ in names) + " |")
    for c in cells:
        best = c["best"] or {}
        share = best.get("cpu_share", {})
        lines.append(f"| {c['masters']} | {c['ingestors']} | {_k(best.get('rate'))} | "
                     + " | ".join(_share(share.get(n)) for n in names) + " |")
    lines += ["", "CPU per tick stored in the best window, µs (CPU seconds / ticks stored; an ingestor's per tick of "
              "its own symbols): a process given a core of its own would take about 1e6 / this many ticks a second, "
              "if nothing else limits it:", ""]
    lines.append("| masters | ingestors | " + " | ".join(names) + " |")
    lines.append("| ---: | ---: | " + " | ".join("---:" for _ in names) + " |")
    for c in cells:
        per_tick = (c["best"] or {}).get("cpu_us_per_tick", {})
        lines.append(f"| {c['masters']} | {c['ingestors']} | "
                     + " | ".join("-" if per_tick.get(n) is None else f"{per_tick[n]:.1f}" for n in names) + " |")
    return "\n".join(lines) + "\n"
