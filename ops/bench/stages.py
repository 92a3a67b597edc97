"""The phases of a whole-path run, driven through a :class:`~ops.bench.harness.Harness`.

:func:`pipeline` is the run: children up, :func:`prime`, one :func:`measure_step` per rate of the schedule (a
warm-up, a measured window sampled every :data:`~ops.bench.profiles.SAMPLE_S`, then rate 0 until the
path drains), the final drain and tally, then :func:`ingest_only` (the peak ingest: the ingestor again
without subscribers, the consumer stopped).  Children are stopped and keys deleted whatever happens.
Every wait is bounded: a step by its window, a drain by its limit, a stop by
:data:`~ops.bench.profiles.STOP_TIMEOUT_S`.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Final

from consumer_sdk.consumer import Consumer
from consumer_sdk.core.errors import MarketError
from consumer_sdk.core.heap import settle_heap
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.loop import choose_loop
from ops.bench.analysis import analyse_step, final_tally, redis_commands, summarize_peak
from ops.bench.harness import Harness
from ops.bench.processes import Child, memory_kib
from ops.bench.profiles import (
    CHANNELS,
    CONSUMER_COUNT,
    PRIME_RATE,
    REPAIR_WAIT_S,
    SAMPLE_S,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    SYMBOLS,
)

__all__ = ["ingest_only", "measure_step", "pipeline", "prime"]

#: what a queue sample reads of the ingestor's page: the page restricted to these (``?name[]=``), so sampling
#: every :data:`SAMPLE_S` does not have the ingestor format its latency histograms, which only the edges need
SAMPLED: Final = (
    "market_ingress_len", "market_writer_buffered", "market_frames_received_total", "market_published_total",
)


async def prime(h: Harness, consumer: Consumer) -> None:
    """A trickle until every stream exists and the consumer reads it, then drain: the first window must
    not measure the consumer finding streams (it reads a stream it finds from its beginning)."""
    h.tick("priming: every stream, every reader")
    await h.set_rate(PRIME_RATE)
    streams = len(SYMBOLS) * len(CHANNELS)
    deadline = time.monotonic() + START_TIMEOUT_S
    while consumer.stats().keys < streams:
        if time.monotonic() > deadline:
            h.notes.append(f"priming: the consumer read {consumer.stats().keys} of {streams} streams after "
                           f"{START_TIMEOUT_S:.0f} s")
            break
        await asyncio.sleep(0.1)  # the consumer's own rescan finds the streams; poll its counter
        h.tick()
    await h.set_rate(0)
    drained, _ = await h.drain(h.drain_s)
    if not drained:
        h.notes.append("priming: the path did not drain before the first step")


async def measure_step(h: Harness, index: int, rate: float, children: list[Child], of: int = 0,
                       phase: str = "step") -> dict[str, Any]:
    """One rate: a warm-up, then a window of :attr:`~ops.bench.harness.Harness.window_s` with the queues
    sampled every :data:`SAMPLE_S`, the edges read at both ends; its figures (see
    :func:`~ops.bench.analysis.analyse_step`) with Redis's own time in the writer's script calls and the consumer's
    reads and acks (:func:`~ops.bench.analysis.redis_commands`).  The rate
    is left where it is: the caller drains.  :class:`MarketError` when a child exits meanwhile."""
    label = f"{phase} {index + 1}/{of or len(h.schedule)} {rate:.0f}/s"
    h.tick(label + " warm-up")
    await h.set_rate(rate)
    await h.sleep(h.warmup_s)
    h.tick(label)
    start = await h.edge()
    commands_a = await h.command_stats()
    h.sink.hist = LatencyHistogram()
    samples: list[list[float]] = []
    next_at = start.t
    while True:
        next_at += SAMPLE_S
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        consumed, ing, sim = await h.read_counts(SAMPLED)
        now = time.monotonic()
        samples.append([
            round(now - h.t0, 2), ing.total("market_ingress_len"), ing.total("market_writer_buffered"),
            int(sim["stats"]["frames_sent"]) - ing.total("market_frames_received_total") - h.received_before,
            max(0.0, ing.total("market_published_total") - consumed),
        ])
        h.tick()
        for child in children:
            if child.proc.returncode is not None:
                raise MarketError(f"the {child.name} exited during the run (status {child.proc.returncode}): "
                                  f"{child.last_line() or 'no message'}")
        if now - start.t >= h.window_s - 1e-3:
            break
    e2e = h.sink.hist
    h.sink.hist = LatencyHistogram()
    end = await h.edge()
    commands_b = await h.command_stats()
    step = analyse_step(rate, start, end, e2e, samples, consuming=h.consuming)
    step["redis_commands"] = redis_commands(commands_a, commands_b, step["window_s"])
    return step


async def ingest_only(h: Harness, env: dict[str, str], workdir: Path, children: list[Child]) -> dict[str, Any]:
    """Peak ingest: the ingestor restarted with no subscriber, the consumer stopped, rates stepped up
    until one saturates (simulator -> WebSocket -> normalize -> Redis, nothing else)."""
    await h.set_rate(0)
    h.tick("peak ingest: the ingestor again, without subscribers")
    old = next(c for c in children if c.name == "ingestor")
    await old.stop()
    children.remove(old)
    h.pids.pop("ingestor", None)
    # Drained at rate 0 before the stop: every frame sent so far was received by the old process.
    h.received_before = int((await h.sim_state())["stats"]["frames_sent"])
    # Streams and a spill log of its own: it starts as a new deployment would, with nothing from the sweep
    # (whose saturated steps leave reconnects and repairs behind) to resume.
    fresh = env | {"MARKET_PREFIX": h.peak_prefix}
    await h.start_ingestor(fresh, workdir, children, 0, spill="spill-peak")
    steps: list[dict[str, Any]] = []
    for index, rate in enumerate(h.peak_schedule):
        step = await measure_step(h, index, rate, children, of=len(h.peak_schedule), phase="peak ingest")
        await h.set_rate(0)
        h.tick("peak ingest: draining")
        drained, _ = await h.drain(h.drain_s)
        step["drained"] = drained
        steps.append(step)
        if step["saturated"] or not drained:
            break
    for rate in h.peak_schedule[len(steps):]:
        steps.append({"rate": rate, "status": "not run", "reason": "a lower rate saturated"})
    return summarize_peak(h.peak_schedule, steps)


async def pipeline(
    h: Harness, workdir: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, int], dict[str, Any] | None]:
    """Children up, the sweep, the final drain, the ingest-only phase; children stopped and keys deleted
    whatever happens."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
    env["MARKET_LOOP"] = choose_loop()  # the children run the loop the report names
    env |= {"MARKET_REDIS_URL": h.redis_url, "MARKET_PREFIX": h.prefix,
            "MARKET_STATE_DIR": str(workdir), "MARKET_QUEUE_CAPACITY": "100000"}
    children: list[Child] = []
    steps: list[dict[str, Any]] = []
    memory: dict[str, int] = {}
    peak: dict[str, Any] | None = None
    try:
        await h.start(env, workdir, children)
        consumer = Consumer(
            redis_url=h.redis_url, patterns=["binance:*:*"], prefix=h.prefix, group="bench",
            consumer=f"bench-{os.getpid()}", start_id="0", rescan_s=1.0, count=CONSUMER_COUNT,
            on_gap=h.sink.on_gap, on_trimmed=h.sink.on_trimmed,
        )

        async def consume() -> None:
            try:
                await consumer.run(h.sink)
            except MarketError as exc:
                h.sink.error = f"{type(exc).__name__}: {exc}"

        # Owned here: stopped and awaited in the finally below (a TaskGroup would wrap our one-line errors).
        task = asyncio.create_task(consume(), name="bench-consumer")
        try:
            await prime(h, consumer)
            settle_heap()  # the consumer reads every stream: what exists now is never garbage
            stop_reason = ""
            for index, rate in enumerate(h.schedule):
                if stop_reason:
                    steps.append({"rate": rate, "status": "not run", "reason": stop_reason})
                    continue
                step = await measure_step(h, index, rate, children)
                await h.set_rate(0)
                h.tick(f"step {index + 1}/{len(h.schedule)} draining")
                began = time.monotonic()
                drained, _ = await h.drain(h.drain_s)
                step["drain_s"] = round(time.monotonic() - began, 2)
                step["drained"] = drained
                steps.append(step)
                if h.sink.error:
                    stop_reason = f"the consumer failed: {h.sink.error}"
                elif not drained:
                    stop_reason = f"the backlog of the {rate:.0f}/s step did not drain in {h.drain_s:.0f} s"
                elif step["reconnects"]:
                    stop_reason = f"the venue connection was lost at {rate:.0f}/s"
            h.tick("final drain")
            await h.set_rate(0)
            # A gap repair after a reconnect holds ticks for up to its 60 s deadline: wait for it.
            lost = any(s.get("reconnects") for s in steps)
            drained, last = await h.drain(max(h.drain_s, REPAIR_WAIT_S if lost else 30.0))
            tally = final_tally(drained, last, consumer_duplicates=consumer.stats().duplicates,
                                consumer_gaps=h.sink.gaps, consumer_trimmed=h.sink.trimmed,
                                consumer_error=h.sink.error)
            for name, pid in h.pids.items():
                hwm = memory_kib(pid).get("VmHWM")
                if hwm is not None:
                    memory[name] = hwm
            hwm = memory_kib(os.getpid()).get("VmHWM")
            if hwm is not None:
                memory["bench"] = hwm
            if h.peak_schedule and drained and not h.sink.error:
                consumer.stop()
                task.cancel()
                await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
                h.consuming = False
                peak = await ingest_only(h, env, workdir, children)
        finally:
            consumer.stop()
            task.cancel()
            await asyncio.wait([task], timeout=STOP_TIMEOUT_S)
    finally:
        h.tick("stopping")
        for child in reversed(children):
            await child.stop()
        await h.delete_keys()
    return steps, tally, memory, peak

