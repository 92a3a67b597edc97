"""What the depth books cost: diffs generated per second of CPU, against the market's own step as the baseline."""

from __future__ import annotations

import time
from typing import Any

from .book import BookConfig, DepthBooks
from .market import SyntheticMarket

__all__ = ["bench_books"]


def bench_books(
    *, symbols: int = 100, seconds: float = 10.0, rate: int = 10_000, step_ms: int = 5, seed: int = 1,
    config: BookConfig | None = None,
) -> dict[str, Any]:
    """Depth diffs generated per second of CPU, against the market's own step as the baseline, in one run.

    Two markets alike (``symbols`` symbols, ``rate`` events a simulated second, one step every ``step_ms``)
    run for ``seconds`` of simulated time: the baseline only steps; the other also feeds its books
    (:meth:`DepthBooks.observe`, :meth:`DepthBooks.advance`), timed apart.  At the default cadence that is
    ``10 * symbols`` batches a simulated second.
    """
    names = [f"SYM{i:03d}USDT" for i in range(symbols)]
    steps = max(1, int(seconds * 1000) // step_ms)
    per_step = max(1, rate * step_ms // 1000)
    t0_ms = 1_700_000_000_000

    baseline = SyntheticMarket(names, seed=seed, history=1000)
    started = time.perf_counter()
    for i in range(steps):
        baseline.step(per_step, t0_ms + i * step_ms)
    baseline_s = time.perf_counter() - started

    market = SyntheticMarket(names, seed=seed, history=1000)
    books = DepthBooks.for_market(market, seed=seed, config=config)
    books.advance(t0_ms)
    step_s = book_s = 0.0
    diffs = levels = 0
    clock = time.perf_counter
    for i in range(steps):
        now = t0_ms + i * step_ms
        a = clock()
        events = market.step(per_step, now)
        b = clock()
        books.observe(events)
        out = books.advance(now)
        c = clock()
        step_s += b - a
        book_s += c - b
        diffs += len(out)
        levels += sum(len(p["b"]) + len(p["a"]) for _, _, p in out)
    sim_s = steps * step_ms / 1000
    return {
        "symbols": symbols,
        "simulated_s": sim_s,
        "market_events": steps * per_step,
        "diffs": diffs,
        "levels": levels,
        "baseline_step_s": round(baseline_s, 4),
        "step_s": round(step_s, 4),
        "book_s": round(book_s, 4),
        "diffs_per_s": round(diffs / book_s) if book_s > 0 else None,
        "levels_per_s": round(levels / book_s) if book_s > 0 else None,
        "book_vs_step": round(book_s / baseline_s, 3) if baseline_s > 0 else None,
        "realtime_factor": round(sim_s / (step_s + book_s), 2) if step_s + book_s > 0 else None,
    }
