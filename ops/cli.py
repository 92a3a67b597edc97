# size: one typer application, a short function per command; what each command does lives in its own module.
"""The ``market`` command: one typer application.

Every command turns bad input (a bad flag, an unreadable config, Redis unreachable at
start, a port in use, a command Redis refuses) into one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from redis.exceptions import RedisError

from consumer_sdk.core.errors import ConfigError, MarketError, TransientError
from consumer_sdk.core.loop import run as run_loop
from ops.ctl import app as ctl_app

__all__ = ["app", "main"]

T = TypeVar("T")

app = typer.Typer(
    name="market",
    help="Market-data distribution: venue -> ingestor -> Redis Streams -> consumers.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(ctl_app, name="ctl")


@app.callback()
def _check_environment() -> None:
    # Before every command: a misspelt MARKET_* variable (MARKET_REDIS_ULR) is refused, not ignored.
    from consumer_sdk.core.env import check_environment

    check_environment(os.environ)


def fail(message: str) -> NoReturn:
    """One line on stderr, exit status 2."""
    print(f"market: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def run_async(
    coro: Coroutine[Any, Any, T], *, graceful_term: bool = True, grace_s: float | None = None
) -> T:
    """Run a command's coroutine; Ctrl-C (and SIGTERM when ``graceful_term``) cancel it and end the command
    cleanly.  Read-only commands keep SIGTERM's default action: they hold nothing to flush, and a
    write blocked on a full stdout pipe must not delay their end.  A stop after SIGTERM that takes longer
    than ``grace_s`` (default :data:`SHUTDOWN_GRACE_S`) is reported with every task's stack, exit 3.  The loop is
    the one ``MARKET_LOOP`` chooses (:mod:`consumer_sdk.core.loop`: uvloop when installed, else asyncio)."""
    grace = SHUTDOWN_GRACE_S if grace_s is None else grace_s

    async def wrapper() -> T:
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def terminate() -> None:
            assert task is not None
            task.cancel()
            # A shutdown that does not finish in time is a bug: show where every task waits, then leave.
            loop.call_later(grace, _stuck_shutdown, grace)

        if task is not None and graceful_term:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGTERM, terminate)
        return await coro

    try:
        return run_loop(wrapper())
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except asyncio.CancelledError:
        raise SystemExit(0) from None


def pin_cpus(spec: str) -> None:
    """Pin this process (and every thread started after) to the CPUs listed, e.g. ``0`` or ``0,1``."""
    try:
        cpus = {int(c) for c in spec.split(",") if c.strip()}
    except ValueError:
        fail(f"--cpus: expected CPU numbers like 0 or 0,1, got {spec!r}")
    try:
        os.sched_setaffinity(0, cpus)
    except (OSError, ValueError) as exc:
        fail(f"--cpus {spec}: {exc}")


SHUTDOWN_GRACE_S = 10.0


def _stuck_shutdown(grace: float = SHUTDOWN_GRACE_S) -> None:
    import io

    out = io.StringIO()
    for t in asyncio.all_tasks():
        print(f"task {t.get_name()}:", file=out)
        t.print_stack(limit=6, file=out)
    print(f"market: error: shutdown did not finish within {grace:.0f} s; tasks:\n{out.getvalue()}",
          file=sys.stderr, flush=True)
    os._exit(3)


def _redis_url() -> str:
    from consumer_sdk.core.urls import DEFAULT_REDIS_URL, validate_redis_url

    return validate_redis_url(os.environ.get("MARKET_REDIS_URL", DEFAULT_REDIS_URL))


# ----------------------------------------------------------------------------------------------
@app.command()
def ingest(
    config: Annotated[Path | None, typer.Option(help="TOML settings file")] = None,
    venue: Annotated[
        str | None,
        typer.Option(help="one venue by name, binance by default (binance_usdm, binance_coinm, ...): hosts, channels, "
                     "REST; several venues: [venues.<name>] tables in --config instead"),
    ] = None,
    url: Annotated[str | None, typer.Option(help="venue WebSocket base, e.g. wss://stream.binance.com:9443")] = None,
    rest_url: Annotated[str | None, typer.Option(help="venue REST base (default: derived from --url)")] = None,
    symbols: Annotated[str | None, typer.Option(help="comma-separated symbols, e.g. BTCUSDT,ETHUSDT")] = None,
    channels: Annotated[
        str | None, typer.Option(help="comma-separated: trade, agg_trade, book_ticker, kline_<i>, depth, mark_price")
    ] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Prometheus port (default 9464; 0 disables)")] = None,
    queue_policy: Annotated[str | None, typer.Option(help="drop_newest | drop_oldest | block")] = None,
    prefix: Annotated[str | None, typer.Option(help="stream key prefix (default md)")] = None,
    subscriber: Annotated[
        list[str] | None,
        typer.Option(help="co-located subscriber package.module:handler on every stream (repeatable)"),
    ] = None,
    cpus: Annotated[str | None, typer.Option(help="pin the process to these CPUs, e.g. 0 or 0,1")] = None,
    spill_dir: Annotated[
        str | None, typer.Option(help="spill log directory for ticks Redis cannot take yet (\"\" disables)")
    ] = None,
    latency_sample: Annotated[
        int | None,
        typer.Option(help="time one tick in N at the per-tick latency stages (default 16; 1 every tick; 0 off)"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """Run an ingestor: venue WebSocket -> normalize -> sequence -> Redis Streams.

    One venue (--venue, binance by default), or one per [venues.<name>] table of the config file, all in this
    process: one metrics port, one stop, exit 1 when any venue stopped with ticks saved nowhere."""
    from ingestor.config import load_venues
    from ops.logs import setup_logging

    setup_logging(log_level)
    if cpus is not None:
        pin_cpus(cpus)
    flags = {
        "subscribers": tuple(subscriber or ()),
        "venue": venue, "url": url, "rest_url": rest_url, "symbols": symbols, "channels": channels,
        "metrics_port": metrics_port, "queue_policy": queue_policy, "prefix": prefix, "spill_dir": spill_dir,
        "latency_sample": latency_sample,
    }
    venues = load_venues(flags, os.environ, str(config) if config else None)
    for settings in venues:
        if settings.spill_dir:
            from distributor.spill import check_spill_dir

            check_spill_dir(settings.spill_dir)
    from ingestor.multi import VenuesUnsavedAtStop
    from ingestor.service import UnsavedAtStop

    try:
        # The stop saves what the process holds within [shutdown] flush_timeout_s: the watchdog waits longer.
        run_async(_ingest(venues), grace_s=max(s.shutdown_flush_s for s in venues) + 5.0)
    except UnsavedAtStop:
        # The ingestor's last log line ("stopped") names how many ticks were saved nowhere.
        raise SystemExit(1) from None
    except VenuesUnsavedAtStop as exc:
        print(f"market: error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


async def _ingest(settings: Any) -> None:
    """Run the venues' ingestors (:class:`ingestor.multi.VenueRunner`) on one Redis client and one metrics port;
    ``settings``: one venue's :class:`~ingestor.config.IngestSettings` or a sequence of them."""
    from consumer_sdk.core.log import get_logger, log_event
    from consumer_sdk.core.redis import connect_redis
    from ingestor.config import IngestSettings
    from ingestor.metrics import serve_metrics, serve_venues_metrics
    from ingestor.multi import VenueRunner, stop_summary, unsaved_at_stop
    from ingestor.service import StopReport, UnsavedAtStop

    venues = (settings,) if isinstance(settings, IngestSettings) else tuple(settings)
    first = venues[0]
    redis = await connect_redis(first.redis_url)
    try:
        runner = VenueRunner(venues, redis=redis)
        if first.metrics_port:
            if len(venues) == 1:
                serve_metrics(runner.ingestors[first.venue], first.metrics_host, first.metrics_port)
            else:
                serve_venues_metrics(
                    runner.running, first.metrics_host, first.metrics_port, restarts=lambda: dict(runner.restarts)
                )
        try:
            await runner.run()
        except asyncio.CancelledError:
            reports = {s.venue: runner.stop_reports.get(s.venue, StopReport(0, 0, 0, 0)) for s in venues}
            if len(venues) == 1:
                report = reports[first.venue]
                if report.unsaved:
                    raise UnsavedAtStop(report) from None
                raise
            unsaved = unsaved_at_stop(reports)
            log_event(get_logger("ingestor"), logging.ERROR if unsaved else logging.INFO, "venues_stopped",
                      unsaved={v: r.unsaved for v, r in reports.items()}, summary=stop_summary(reports))
            if unsaved is not None:
                raise unsaved from None
            raise
    finally:
        await redis.aclose()


# ----------------------------------------------------------------------------------------------
@app.command()
def simulate(
    venue: Annotated[
        str, typer.Option(help="the venue stood in for: binance (spot), binance_usdm, binance_coinm (futures), okx")
    ] = "binance",
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0 picks a free one)")] = 9443,
    symbols: Annotated[
        str | None,
        typer.Option(help="comma-separated symbols (okx: instIds like BTC-USDT,BTC-USDT-SWAP); default: the venue's "
                          "BTC and ETH ones"),
    ] = None,
    rate: Annotated[float, typer.Option(help="ticks per second in total")] = 1000.0,
    seed: Annotated[int, typer.Option(help="random seed (same seed, same market)")] = 1,
    id_base: Annotated[
        int | None, typer.Option(help="offset of every id series (default: from the clock, so ids grow across runs)")
    ] = None,
    replay: Annotated[Path | None, typer.Option(help="play a capture (fixtures' JSONL format)")] = None,
    replay_speed: Annotated[float, typer.Option(help="replay speed factor")] = 1.0,
    replay_loop: Annotated[bool, typer.Option(help="start the capture over at its end")] = False,
    replay_rest: Annotated[
        Path | None, typer.Option(help="with --replay: recorded REST depth snapshots (*.depth.jsonl) that answer "
                                       "/api/v3/depth, the last recorded at or before the capture time played")
    ] = None,
    depth: Annotated[
        bool, typer.Option(help="order books: <sym>@depth@100ms and <sym>@depth diffs and /api/v3/depth")
    ] = True,
    depth_levels: Annotated[int, typer.Option(help="order book levels a side at most (1 to 5000)")] = 1000,
    rest_weight_limit: Annotated[
        int | None,
        typer.Option(help="REST request weight per minute and client (0: none); over it 429, then 418 "
                          "(default: the venue's, 6000 spot, 2400 futures)"),
    ] = None,
    idle_timeout: Annotated[
        float | None, typer.Option(help="okx: close a connection that sent nothing for S seconds (default 30)")
    ] = None,
    book_checksum: Annotated[
        bool, typer.Option(help="okx: books messages carry the crc32 checksum (as before June 2026) instead of 0")
    ] = False,
    batch_interval: Annotated[
        float, typer.Option(help="seconds between two sends of what is due (the market is generated in steps)")
    ] = 0.005,
    close_every: Annotated[float | None, typer.Option(help="fault: close every connection every S seconds")] = None,
    stall_for: Annotated[float, typer.Option(help="fault: stall every connection for S seconds at start")] = 0.0,
    refuse_for: Annotated[float, typer.Option(help="fault: refuse new connections for S seconds at start")] = 0.0,
    malformed: Annotated[float, typer.Option(help="fault: fraction of frames sent malformed")] = 0.0,
    duplicate: Annotated[float, typer.Option(help="fault: fraction of frames sent twice")] = 0.0,
    out_of_order: Annotated[float, typer.Option(help="fault: fraction of frames swapped with the next")] = 0.0,
    rest_faults: Annotated[
        str,
        typer.Option(help="fault: what the first REST requests get instead of their answer, in order: "
                          "PATH=STATUS[:RETRY_AFTER]|close,...;PATH=..., e.g. 'historicalTrades=429:2,503,close'"),
    ] = "",
    depth_faults: Annotated[
        str, typer.Option(help="fault: armed at start, e.g. 'drop@BTCUSDT,stale:3' (the next diff not sent; the "
                               "next snapshot 3 batches old)")
    ] = "",
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "info",
) -> None:
    """The venue simulator (WebSocket + REST + /control on one port): Binance spot, its futures, or OKX."""
    from ops.logs import setup_logging
    from ops.simulator import SimulatorConfig, run_simulator
    from ops.simulator.profiles import VENUE_DEFAULTS, VENUES

    setup_logging(log_level)
    if venue not in VENUES:
        fail(f"--venue: unknown venue {venue!r}; known venues: {', '.join(VENUES)}")
    venue_settings: dict[str, Any] = dict(VENUE_DEFAULTS[venue])
    if symbols is not None:
        venue_settings["symbols"] = tuple(s.strip().upper() for s in symbols.split(",") if s.strip())
    if rest_weight_limit is not None:
        venue_settings["rest_weight_limit"] = rest_weight_limit
    if idle_timeout is not None:
        venue_settings["idle_timeout"] = idle_timeout
    syms = venue_settings["symbols"]
    if not syms:
        fail("--symbols: empty")
    if rate <= 0:
        fail(f"--rate must be positive, got {rate}")
    if not 0 <= port <= 65535:
        fail(f"--port out of range: {port}")
    if replay is not None and not replay.is_file():
        fail(f"--replay: cannot read {str(replay)!r}")
    if replay_rest is not None and (replay is None or not replay_rest.is_file()):
        fail(f"--replay-rest: needs --replay and a readable file, got {str(replay_rest)!r}")
    cfg = SimulatorConfig(
        **venue_settings, venue=venue, book_checksum=book_checksum,
        host=host, port=port, rate=rate, seed=seed, id_base=id_base, replay=replay,
        replay_speed=replay_speed, replay_loop=replay_loop, batch_interval=batch_interval,
        close_every=close_every, stall_for=stall_for, refuse_for=refuse_for,
        fault_malformed=malformed, fault_duplicate=duplicate, fault_out_of_order=out_of_order,
        rest_faults=rest_faults, replay_rest=replay_rest, depth=depth, depth_levels=depth_levels,
        depth_faults=depth_faults,
    )

    def ready(sim: Any) -> None:
        print(f"simulator listening on {sim.ws_url} (REST {sim.rest_url})", file=sys.stderr, flush=True)

    try:
        run_async(run_simulator(cfg, ready=ready))
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")


# ----------------------------------------------------------------------------------------------
@app.command()
def tail(
    keys: Annotated[list[str], typer.Argument(help="stream keys, e.g. md:binance:BTCUSDT:trade")],
    group: Annotated[str | None, typer.Option(help="read through this consumer group (acks)")] = None,
    from_: Annotated[
        str, typer.Option("--from", help="start: an entry ID, epoch ms, ISO time, or $ for new only")
    ] = "$",
) -> None:
    """Print ticks as they arrive, one JSON object per line: {"key", "id", "tick"}."""
    prefixes = {_check_key(k) for k in keys}
    if group is not None and len(prefixes) > 1:
        fail(f"--group reads keys of one prefix at a time, got {', '.join(sorted(prefixes))}")
    run_async(_tail(_redis_url(), keys, group, from_, prefixes.pop()), graceful_term=group is not None)


def _check_key(key: str) -> str:
    """``key`` is ``<prefix>:<venue>:<SYMBOL>:<channel>`` with a valid prefix (any, not only ``md``); its prefix."""
    from consumer_sdk.core.keys import check_prefix, parse_key

    prefix = key.split(":", 1)[0]
    try:
        check_prefix(prefix)
    except ConfigError:
        raise ConfigError(f"not a stream key of the form <prefix>:<venue>:<SYMBOL>:<channel>: {key!r}") from None
    parse_key(key, prefix=prefix)
    return prefix


def _emit(key: str, entry_id: str, tick: Any) -> None:
    import orjson

    sys.stdout.buffer.write(orjson.dumps({"key": key, "id": entry_id, "tick": tick}) + b"\n")
    sys.stdout.flush()


def _report_skipped(key: str, entry_id: str, error: Exception) -> None:
    """One line on stderr for an entry that is not a tick, naming it: ``market: skipped KEY ID: KIND: ERROR``."""
    kind = getattr(error, "kind", "invalid")
    print(f"market: skipped {key} {entry_id}: {kind}: {error}", file=sys.stderr, flush=True)


async def _tail(url: str, keys: list[str], group: str | None, start: str, prefix: str) -> None:
    from consumer_sdk.consumer import Consumer
    from consumer_sdk.core.redis import connect_redis
    from consumer_sdk.replay import follow

    redis = await connect_redis(url)
    try:
        if group is None:
            async for key, entry_id, tick in follow(redis, keys, start=start, on_invalid=_report_skipped):
                _emit(key, entry_id, tick)
        else:
            consumer = Consumer(
                redis_url=url, patterns=keys, group=group, prefix=prefix, start_id="$" if start == "$" else start,
                on_invalid=_report_skipped,
            )
            # batch by batch, so each line carries its entry ID; a batch is acknowledged once printed
            async for batch in consumer.batches():
                for key, entry_id, tick in batch:
                    _emit(key, entry_id, tick)
    finally:
        await redis.aclose()


# ----------------------------------------------------------------------------------------------
@app.command()
def replay(
    key: Annotated[str, typer.Argument(help="stream key, e.g. md:binance:BTCUSDT:trade")],
    start: Annotated[str, typer.Option(help="epoch ms, ISO-8601 time, seq:N, or -")] = "-",
    end: Annotated[str, typer.Option(help="epoch ms, ISO-8601 time, seq:N, or +")] = "+",
    format_: Annotated[str, typer.Option("--format", help="jsonl or csv (with --at: jsonl or ladder)")] = "jsonl",
    progress: Annotated[bool, typer.Option(help="progress on stderr (default: when stderr is a terminal)")] = False,
    to_prefix: Annotated[
        str | None, typer.Option(help="copy the range into this key prefix (same IDs) instead of printing it")
    ] = None,
    skip_invalid: Annotated[
        bool,
        typer.Option(
            "--skip-invalid",
            help="go on past entries that are not ticks, naming each on stderr; exit status 1 if any was skipped",
        ),
    ] = False,
    at: Annotated[
        str | None,
        typer.Option(help="depth streams: print the book as it was at seq:N, an entry ID, epoch ms or ISO time"),
    ] = None,
    levels: Annotated[
        int | None, typer.Option(help="with --at: levels a side (default: all in jsonl, 10 in ladder)")
    ] = None,
) -> None:
    """History from a stream to stdout, in entry order (exactly what XRANGE returns), or copied to another prefix.

    With --at on a depth stream: the order book as it was then (the newest snapshot at or before it and the
    diffs after), one JSON object (--format jsonl) or a ladder (--format ladder); exit status 2 when trimming
    took what it needs.

    An entry that is not a tick (no field d, d not JSON or not a tick, d over 64 KiB) stops the replay with
    one line naming its entry ID, exit status 2; with --skip-invalid each is named on stderr
    ("market: skipped KEY ID: KIND: ERROR") and the replay goes on.  --to-prefix copies entries byte for byte,
    valid or not.

    Exit status: 0 every entry printed; 1 done, but entries that are not ticks were skipped (--skip-invalid);
    2 bad input, Redis unreachable, history trimmed, or an entry that is not a tick without --skip-invalid.
    """
    from consumer_sdk.replay import parse_bound

    _check_key(key)
    if at is not None:
        _replay_book(key, at, format_, levels, (start, end, to_prefix, skip_invalid))
        return
    if levels is not None:
        fail("--levels goes with --at")
    if format_ not in ("jsonl", "csv"):
        fail(f"--format must be jsonl or csv, got {format_!r}")
    lo = parse_bound(start, end=False)
    hi = parse_bound(end, end=True)
    if to_prefix is not None:
        from consumer_sdk.core.keys import check_prefix

        if skip_invalid:
            fail("--skip-invalid does not go with --to-prefix, which copies every entry byte for byte")
        check_prefix(to_prefix)
        run_async(_republish(_redis_url(), key, lo, hi, to_prefix, progress or sys.stderr.isatty()))
        return
    skipped = run_async(
        _replay(_redis_url(), key, lo, hi, format_, progress or sys.stderr.isatty(), skip_invalid),
        graceful_term=False,
    )
    if skipped:
        print(f"market: replay of {key} skipped {skipped} entries that are not ticks", file=sys.stderr)
        raise typer.Exit(1)


async def _republish(url: str, key: str, lo: Any, hi: Any, prefix: str, show_progress: bool) -> None:
    from consumer_sdk.core.redis import connect_redis
    from consumer_sdk.replay import republish

    def report(done: int, total: int | None) -> None:
        if show_progress:
            pct = f" {100 * done / total:5.1f}%" if total else ""
            print(f"\rcopy {key}: {done} entries{pct}", end="", file=sys.stderr, flush=True)

    redis = await connect_redis(url)
    try:
        n = await republish(redis, key, lo, hi, target_prefix=prefix, progress=report)
    finally:
        await redis.aclose()
    print(f"\ncopied {n} entries of {key} into prefix {prefix!r}", file=sys.stderr)


async def _replay(url: str, key: str, lo: Any, hi: Any, fmt: str, show_progress: bool, skip_invalid: bool) -> int:
    """Print the range; returns how many entries that are not ticks were skipped (only with ``skip_invalid``)."""
    import csv

    import orjson

    from consumer_sdk.core.redis import connect_redis
    from consumer_sdk.core.tick import BASE_FIELDS, channel_fields
    from consumer_sdk.replay import read_range

    redis = await connect_redis(url)
    out = sys.stdout
    writer: Any = None
    skipped = 0

    def skip(key: str, entry_id: str, error: Exception) -> None:
        nonlocal skipped
        skipped += 1
        if show_progress:
            print(file=sys.stderr)
        _report_skipped(key, entry_id, error)

    def report(done: int, total: int | None) -> None:
        if show_progress:
            pct = f" {100 * done / total:5.1f}%" if total else ""
            print(f"\rreplay {key}: {done} entries{pct}", end="", file=sys.stderr, flush=True)

    try:
        async for entry_id, tick in read_range(
            redis, key, lo, hi, progress=report, on_invalid=skip if skip_invalid else None
        ):
            if fmt == "jsonl":
                out.buffer.write(orjson.dumps({"key": key, "id": entry_id, "tick": tick}) + b"\n")
            else:
                if writer is None:
                    fields = [*BASE_FIELDS, *channel_fields(tick["channel"])]
                    writer = csv.DictWriter(out, ["id", *fields], extrasaction="ignore", lineterminator="\n")
                    writer.writeheader()
                writer.writerow({"id": entry_id, **tick})
        out.flush()
        if show_progress:
            print(file=sys.stderr)
    finally:
        await redis.aclose()
    return skipped


def _replay_book(key: str, at: str, fmt: str, levels: int | None, range_flags: tuple[Any, ...]) -> None:
    """``replay KEY --at X`` on a depth stream: the book as it was at X, as JSON or a ladder."""
    from consumer_sdk.book_reader import check_depth_key
    from consumer_sdk.replay import parse_bound

    check_depth_key(key)
    if range_flags != ("-", "+", None, False):
        fail("--at prints one book: it does not go with --start, --end, --to-prefix or --skip-invalid")
    if fmt not in ("jsonl", "ladder"):
        fail(f"--format with --at must be jsonl or ladder, got {fmt!r}")
    if levels is not None and levels < 1:
        fail(f"--levels must be at least 1, got {levels}")
    run_async(_print_book_at(_redis_url(), key, parse_bound(at, end=True), fmt, levels), graceful_term=False)


async def _print_book_at(url: str, key: str, at: Any, fmt: str, levels: int | None) -> None:
    import time

    import orjson

    from consumer_sdk.book_reader import book_at
    from consumer_sdk.core.redis import connect_redis
    from ops.book_view import book_document, render_ladder

    redis = await connect_redis(url)
    try:
        await _require_stream(redis, key)
        got = await book_at(redis, key, at)
    finally:
        await redis.aclose()
    if fmt == "jsonl":
        doc = book_document(key, got.book, entry_id=got.entry_id, seq=got.seq, ts_event=got.ts_event,
                            snapshot_id=got.snapshot_id, diffs=got.diffs, levels=levels)
        sys.stdout.buffer.write(orjson.dumps(doc) + b"\n")
    else:
        note = f"at {got.entry_id}, {got.diffs} diffs after the snapshot {got.snapshot_id}"
        print(render_ladder(key, got.book, levels=levels or 10, now_us=time.time_ns() // 1000, seq=got.seq,
                            ts_event_us=got.ts_event, note=note))
    sys.stdout.flush()


async def _require_stream(redis: Any, key: str) -> None:
    """:class:`ConfigError` unless ``key`` holds a stream."""
    kind = await redis.type(key)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind == "none":
        raise ConfigError(f"no such stream: {key}")
    if kind != "stream":
        raise ConfigError(f"{key} holds a {kind}, not a stream")


# ----------------------------------------------------------------------------------------------
@app.command()
def book(
    key: Annotated[str, typer.Argument(help="depth stream key, e.g. md:binance:BTCUSDT:depth")],
    levels: Annotated[int, typer.Option(help="levels shown a side")] = 10,
    once: Annotated[bool, typer.Option("--once", help="print the current book and exit")] = False,
) -> None:
    """A live order-book ladder: asks above bids, the best in the middle, spread, seq and age.

    Redrawn in place on a terminal, one block per update otherwise. A break in the stream (a diff missing)
    shows "no book" until the next snapshot. Exit status 2 for a key that is not a depth stream, a missing
    stream, or (with --once) no book held.
    """
    from consumer_sdk.book_reader import check_depth_key

    _check_key(key)
    check_depth_key(key)
    if not 1 <= levels <= 1000:
        fail(f"--levels must be from 1 to 1000, got {levels}")
    if once:
        run_async(_print_book_at(_redis_url(), key, "+", "ladder", levels), graceful_term=False)
        return
    run_async(_book(_redis_url(), key, levels, sys.stdout.isatty()), graceful_term=False)


async def _book(url: str, key: str, levels: int, tty: bool) -> None:
    import time

    from consumer_sdk.book_reader import follow_books
    from consumer_sdk.core.redis import connect_redis
    from ops.book_view import frame, render_ladder

    redis = await connect_redis(url)
    try:
        await _require_stream(redis, key)
        async for update in follow_books(redis, [key]):
            note = update.event if not update.detail or update.book is None else f"{update.event} ({update.detail})"
            ladder = render_ladder(key, update.book, levels=levels, now_us=time.time_ns() // 1000, seq=update.seq,
                                   ts_event_us=update.ts_event, note=update.detail if update.book is None else note)
            sys.stdout.write(frame(ladder, tty=tty))
            sys.stdout.flush()
    finally:
        await redis.aclose()


# ----------------------------------------------------------------------------------------------
@app.command()
def status(
    json_: Annotated[bool, typer.Option("--json", help="one JSON object instead of a line per stage")] = False,
    prefix: Annotated[str | None, typer.Option(help="stream key prefix (default: MARKET_PREFIX, else md)")] = None,
) -> None:
    """Health of every stage: ingestor, connection, ingress queue, fan-out, Redis, consumer lag.

    Exit status 0 only when every stage is ok, 1 when any is not (naming the failing stages), 2 when the
    input is bad or Redis cannot be read.
    """
    from ops.status import run_status

    key_prefix = prefix if prefix is not None else os.environ.get("MARKET_PREFIX", "md")
    code = run_async(run_status(_redis_url(), key_prefix, json=json_), graceful_term=False)
    raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------
@app.command()
def demo(
    duration: Annotated[float | None, typer.Option(help="seconds to run (default: until Ctrl-C)")] = None,
    rate: Annotated[float, typer.Option(help="simulated ticks per second in total")] = 2000.0,
    symbols: Annotated[str, typer.Option(help="comma-separated symbols")] = "BTCUSDT,ETHUSDT,SOLUSDT",
) -> None:
    """The whole path on this machine: simulator -> ingestor -> Redis -> consumer, with a live view."""
    from ops.demo import run_demo

    if duration is not None and duration <= 0:
        fail(f"--duration must be positive, got {duration}")
    run_async(run_demo(duration=duration, rate=rate, symbols=symbols))


# ----------------------------------------------------------------------------------------------
@app.command()
def soak(
    venue: Annotated[
        str, typer.Option(help="binance (spot) | binance_usdm | binance_coinm | okx: the simulator's profile and the "
                               "ingestors' venue")
    ] = "binance",
    duration: Annotated[float, typer.Option(help="seconds to run")] = 300.0,
    rate: Annotated[float, typer.Option(help="simulated ticks per second in total")] = 400.0,
    symbols: Annotated[
        str | None, typer.Option(help="comma-separated symbols (default: the venue's BTC and ETH ones)")
    ] = None,
    channels: Annotated[
        str | None,
        typer.Option(help="comma-separated channels (default: the venue's; its trade and agg_trade ids are checked)"),
    ] = None,
    faults: Annotated[
        str, typer.Option(help="all | none | kind[=N/h],... (kinds: see docs/soak.md)")
    ] = "all",
    seed: Annotated[int, typer.Option(help="schedule and market seed (same seed, same schedule)")] = 1,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("soak-report"),
) -> None:
    """The whole path under faults on a seeded schedule, invariants checked, resources sampled; writes a report.

    Exit status 0 when the run passed, 1 when an invariant broke or a resource grew, 2 on bad input.
    """
    from ingestor.config import load_settings
    from ops.soak import SoakConfig, run_soak
    from ops.soak_plan import applicable_faults, parse_faults, plan, venue_plan

    if not duration > 0:
        fail(f"--duration must be positive, got {duration}")
    if not 0 < rate <= 100_000:
        fail(f"--rate must be above 0 and at most 100000, got {rate}")
    venue_p = venue_plan(venue)
    checked = load_settings(  # the ingestor's own validation, for the venue
        {"venue": venue, "symbols": symbols or ",".join(venue_p.symbols),
         "channels": channels or ",".join(venue_p.channels)}, {},
    )
    cfg = SoakConfig(
        venue=venue, duration=duration, rate=rate, symbols=tuple(checked.symbols),
        channels=tuple(checked.channels), faults=parse_faults(faults), seed=seed, out=out,
    )
    kept, not_applicable = applicable_faults(venue_p, cfg.faults)
    for kind, why in not_applicable.items():
        print(f"fault {kind} not applicable to {venue}: {why}", file=sys.stderr)
    plan(kept, cfg.duration, cfg.seed)  # a schedule that cannot fit is bad input, said before anything starts
    report = run_async(run_soak(cfg))
    print(f"soak {'passed' if report['passed'] else 'FAILED'}: report in {out}/report.md", file=sys.stderr)
    raise typer.Exit(0 if report["passed"] else 1)


# ----------------------------------------------------------------------------------------------
@app.command()
def verify(
    keys: Annotated[
        list[str] | None, typer.Argument(help="stream keys (default: every trade and agg_trade stream of --prefix)")
    ] = None,
    prefix: Annotated[str, typer.Option(help="key prefix whose streams are checked")] = "md",
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document instead of a table")] = False,
) -> None:
    """Check stored trade and agg_trade streams: every venue id once, in order, or inside a gap marker.

    Works against any venue (the ids are the venue's own, numbered one by one): the check for a long run on
    the real venue. Exit status 0 when every stream holds, 1 on a break or when no stream was found, 2 on bad input.
    """
    from consumer_sdk.core.keys import check_prefix

    check_prefix(prefix)
    for key in keys or ():
        if _check_key(key) != prefix:
            fail(f"{key} is not under --prefix {prefix}")
    verdicts = run_async(_verify(_redis_url(), prefix, keys or []))
    if as_json:
        print(json.dumps({"prefix": prefix, "streams": [v.as_dict() for v in verdicts]}, indent=2))
    else:
        print(f"{'stream':<44} {'entries':>9} {'stored':>9} {'marked':>7} {'markers':>7} {'breaks':>6}")
        for v in verdicts:
            print(f"{v.key:<44} {v.entries:>9} {v.stored:>9} {v.marked:>7} {v.markers:>7} {v.breaks:>6}")
            if v.first_break:
                print(f"  first break: {v.first_break}")
    if not verdicts:
        print(f"no trade or agg_trade stream under prefix {prefix!r}", file=sys.stderr)
    raise typer.Exit(0 if verdicts and not any(v.breaks for v in verdicts) else 1)


async def _verify(url: str, prefix: str, keys: list[str]) -> list[Any]:
    from consumer_sdk.core.redis import connect_redis
    from ops.verify import verify_streams

    redis = await connect_redis(url)
    try:
        return await verify_streams(redis, prefix, keys)
    finally:
        await redis.aclose()


# ----------------------------------------------------------------------------------------------
bench_app = typer.Typer(help="Reproducible load tests.", no_args_is_help=False, invoke_without_command=True)
app.add_typer(bench_app, name="bench")


@bench_app.callback(invoke_without_command=True)
def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="rates 1k to 100k/s, short windows: under 3 minutes")] = False,
    out: Annotated[Path, typer.Option(help="directory for report.json, report.md and the plots")] = Path(
        "bench-report"
    ),
    seed: Annotated[int, typer.Option(help="simulator seed (same seed, same market)")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as one JSON line")] = False,
) -> None:
    """The reproducible load test: simulator -> ingestor -> Redis -> consumer at stepped rates; writes a report.

    With a command (hotpath, writer, reader, ingest), measures that one stage instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    from ops.bench.render import progress_bar
    from ops.bench.report import run_bench

    report = run_async(run_bench(quick=quick, out_dir=out, redis_url=_redis_url(), seed=seed, progress=progress_bar()))
    if as_json:
        _print_json(report["summary"], True)
    else:
        summary = dict(report["summary"])
        targets = summary.pop("targets")
        _print_json(summary, False)
        for name, target in targets.items():
            verdict = "N/A" if target["met"] is None else ("MET" if target["met"] else "MISSED")
            print(f"{name:>24}: {verdict} ({target['target']}; measured {target['value']})")
    print(f"market bench: report in {out / 'report.md'}", file=sys.stderr)


def _print_json(result: dict[str, Any], as_json: bool) -> None:
    import orjson

    if as_json:
        print(orjson.dumps(result).decode())
    else:
        for k, v in result.items():
            print(f"{k:>24}: {v}")


@bench_app.command("hotpath")
def bench_hotpath(
    rate: Annotated[float, typer.Option(help="ticks per second offered to the ingress")] = 50_000,
    subscribers: Annotated[int, typer.Option(help="co-located subscribers")] = 16,
    slow_subscribers: Annotated[int, typer.Option(help="of which deliberately slow (drop_oldest)")] = 1,
    duration: Annotated[float, typer.Option(help="seconds (per side, with --slow-handler-ms)")] = 20.0,
    slow_handler_ms: Annotated[float, typer.Option(
        help="the slow-subscriber drill: one more subscriber, synchronous, blocking this long per tick; "
        "against the same load without it, in the same run")] = 0.0,
    rounds: Annotated[int, typer.Option(help="the drill's alternating pairs of rounds")] = 2,
    fast_execution: Annotated[str, typer.Option(help="inline or thread, for the fast subscribers")] = "inline",
    redis: Annotated[bool, typer.Option("--redis", help="the drill also writes to Redis (MARKET_REDIS_URL)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line")] = False,
) -> None:
    """The hot path alone: ingress -> fan-out -> subscriber callbacks; latency percentiles and accounting."""
    from ops.bench.hotpath import run_hotpath_bench

    if rate <= 0 or duration <= 0 or subscribers < 1 or not 0 <= slow_subscribers <= subscribers:
        fail("--rate and --duration must be positive, 1 <= --subscribers, 0 <= --slow-subscribers <= --subscribers")
    result = run_async(run_hotpath_bench(
        rate=rate, subscribers=subscribers, slow_subscribers=slow_subscribers, duration=duration,
        slow_handler_ms=slow_handler_ms, rounds=rounds, fast_execution=fast_execution,
        redis_url=_redis_url() if redis else None,
    ))
    _print_json(result, as_json)


@bench_app.command("ingest")
def bench_ingest(
    ticks: Annotated[int, typer.Option(help="frames per round")] = 300_000,
    rounds: Annotated[int, typer.Option(help="rounds of each mode (off, sampled, every), alternating")] = 5,
    subscribers: Annotated[int, typer.Option(help="co-located no-op subscribers")] = 16,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line")] = False,
) -> None:
    """The ingestor's path (parse -> ingress -> hot path -> Redis) at full speed, latency timing off/sampled/every."""
    from ops.bench.ingest import run_ingest_bench

    result = run_async(run_ingest_bench(_bench_redis(ticks, 1), ticks=ticks, rounds=rounds, subscribers=subscribers))
    if as_json:
        _print_json(result, True)
        return
    for mode, m in result["modes"].items():
        print(f"{mode:>8}: {m['ticks_per_s']:>10.0f} ticks/s (min {m['ticks_per_s_min']:.0f}, max "
              f"{m['ticks_per_s_max']:.0f}), {m['cpu_us_per_tick']:.2f} µs CPU per tick; cost "
              f"{m['throughput_cost_pct']:+.1f}% throughput, {m['cpu_cost_pct']:+.1f}% CPU")
    s = result["summary"]
    print(f"default instrumentation costs {s['cost_pct']:.1f}% of the throughput "
          f"(target <= {s['target_pct']:.0f}%: {'MET' if s['met'] else 'MISSED'})")


@bench_app.command("parse")
def bench_parse(
    frames: Annotated[int, typer.Option(help="frames of the simulator's market parsed per round")] = 200_000,
    rounds: Annotated[int, typer.Option(
        help="passes over the frames (even), their batches alternating between the modes (remembered, checks_alone)",
    )] = 6,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON line")] = False,
) -> None:
    """The Binance frame parser, its price and symbol checks remembering the values they passed, against the checks
    alone (every value through its regex): frames/s and µs a frame, same frames, same run, the same verdicts."""
    from ops.bench.parse import run_parse_bench

    if frames < 128 or rounds < 2 or rounds % 2:
        fail("--frames must be at least 128 (two batches) and --rounds an even number, at least 2")
    result = run_parse_bench(frames=frames, rounds=rounds)
    if as_json:
        _print_json(result, True)
        return
    for mode, m in result["modes"].items():
        print(f"{mode:>12}: {m['frames_per_s']:>10.0f} frames/s (min {m['frames_per_s_min']:.0f}, max "
              f"{m['frames_per_s_max']:.0f}); µs a frame p50 {m['us_per_frame_p50']}, p99 {m['us_per_frame_p99']}")
    print(f"remembered / checks_alone: x{result['ratio']} (pairs of passes: {result['ratio_min']} to "
          f"{result['ratio_max']}); "
          f"{result['frames']} frames, {result['refused']} refused, the same verdicts in every round")


Ticks = Annotated[int, typer.Option(help="ticks to write and read")]
Streams = Annotated[int, typer.Option(help="streams they spread over")]
AsJson = Annotated[bool, typer.Option("--json", help="one JSON line")]


@bench_app.command("writer")
def bench_writer(
    ticks: Ticks = 500_000,
    streams: Streams = 100,
    redis_url: Annotated[str | None, typer.Option(
        help="the Redis to bench against, redis:// or redis+cluster:// (default: MARKET_REDIS_URL)")] = None,
    masters: Annotated[int, typer.Option(
        help="start a Redis Cluster of this many masters on this machine for the run instead (0: none)")] = 0,
    replicas: Annotated[int, typer.Option(help="with --masters: replicas of each master")] = 1,
    as_json: AsJson = False,
) -> None:
    """Our Redis writer against the naive per-tick XADD pipeline, same ticks, same run (on a cluster too)."""
    from ops.bench.writer import run_writer_bench, run_writer_bench_on_cluster

    if masters < 0 or replicas < 0 or (masters and redis_url):
        fail("--masters and --replicas must be >= 0, and --masters starts its own cluster: not with --redis-url")
    if masters:
        if ticks < streams or streams < 1:
            fail("--ticks must be at least --streams, and --streams at least 1")
        result = run_async(run_writer_bench_on_cluster(masters, replicas, ticks=ticks, streams=streams))
    else:
        result = run_async(run_writer_bench(_bench_redis(ticks, streams, redis_url), ticks=ticks, streams=streams))
    _print_json(result, as_json)


@bench_app.command("reader")
def bench_reader(ticks: Ticks = 500_000, streams: Streams = 100, as_json: AsJson = False) -> None:
    """The consumer SDK: XREADGROUP + decode + dedupe + handler + XACK."""
    from ops.bench.writer import run_reader_bench

    _print_json(run_async(run_reader_bench(_bench_redis(ticks, streams), ticks=ticks, streams=streams)), as_json)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        fail(f"{option} takes comma-separated integers, not {text!r}")
    if not values or min(values) < 1:
        fail(f"{option} takes integers >= 1, not {text!r}")
    return values


@bench_app.command("scale")
def bench_scale(
    masters: Annotated[str, typer.Option(
        help="Redis masters per cell, comma-separated: 1 is a standalone server, more a cluster")] = "1,3",
    ingestors: Annotated[str, typer.Option(help="ingestors per cell, comma-separated (the symbols split)")] = "1,2",
    rates: Annotated[str, typer.Option(
        help="offered ticks/s in turn, until a window saturates (default: 20k to 200k)")] = "",
    duration: Annotated[float, typer.Option(help="seconds of each measured window")] = 20.0,
    warmup: Annotated[float, typer.Option(help="seconds at each rate before its window")] = 3.0,
    drain: Annotated[float, typer.Option(help="seconds at most for Redis to hold every tick sent, at the end")] = 60.0,
    replicas: Annotated[int, typer.Option(help="replicas of each cluster master")] = 1,
    seed: Annotated[int, typer.Option(help="simulator seed (same seed, same market)")] = 1,
    out: Annotated[Path | None, typer.Option(help="also write the result as JSON to this file")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON, not the Markdown table")] = False,
) -> None:
    """Ingest and write throughput by Redis masters x ingestors, each cell on a Redis of its own on this machine:
    ticks/s stored (counted from Redis), CPU per process, ratio to the 1-master 1-ingestor cell."""
    import orjson

    from ops.bench.scale import SCALE_RATES, ScaleSettings, run_scale
    from ops.bench.scale_report import render_scale_markdown

    rate_list = SCALE_RATES
    if rates:
        try:
            rate_list = tuple(float(x) for x in rates.split(",") if x.strip())
        except ValueError:
            fail(f"--rates takes comma-separated numbers, not {rates!r}")
    if duration <= 0 or warmup < 0 or drain <= 0 or replicas < 0:
        fail("--duration and --drain must be positive, --warmup and --replicas >= 0")
    settings = ScaleSettings(
        masters=_int_list(masters, "--masters"), ingestors=_int_list(ingestors, "--ingestors"), rates=rate_list,
        warmup_s=warmup, window_s=duration, drain_s=drain, replicas=replicas, seed=seed,
    )
    result = run_async(run_scale(settings, lambda line: print(f"market bench scale: {line}", file=sys.stderr)))
    if out is not None:
        out.write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2) + b"\n")
    if as_json:
        print(orjson.dumps(result).decode())
    else:
        print(render_scale_markdown(result["cells"]), end="")
    if not all(c["adds_up"] for c in result["cells"]):
        print("market bench scale: in a cell, Redis did not end up holding exactly the ticks the simulator sent",
              file=sys.stderr)
        raise typer.Exit(1)


@bench_app.command("book")
def bench_book(
    updates: Annotated[int, typer.Option(help="diffs applied to each book, per workload")] = 20_000,
    depth: Annotated[int, typer.Option(help="levels a side of the synthetic workload's snapshot")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the synthetic workload")] = 7,
    frames: Annotated[Path | None, typer.Option(
        help="capture frames (.jsonl) for the capture workload (default: the repository's spot fixture)")] = None,
    snapshots: Annotated[Path | None, typer.Option(
        help="its REST depth snapshots (.depth.jsonl; default: beside --frames)")] = None,
    as_json: AsJson = False,
) -> None:
    """The order book (consumer_sdk.book) against a naive re-sorting book: updates/s, in one run, on a synthetic
    workload and on a capture's diffs."""
    from ops.bench.book import bench_book as run
    from ops.bench.book import capture_workload, synthetic_workload

    if updates < 1 or depth < 1:
        fail("--updates and --depth must be at least 1")
    frames = frames or Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "binance-spot-2021-10-12.jsonl"
    snapshots = snapshots or frames.with_name(frames.name.removesuffix(".jsonl") + ".depth.jsonl")
    if not frames.is_file() or not snapshots.is_file():
        fail(f"cannot read the capture workload {str(frames)!r} and {str(snapshots)!r}")
    try:
        capture = capture_workload(frames, snapshots, updates)
    except (ValueError, KeyError, IndexError) as exc:
        fail(f"{frames}: not a capture workload: {exc}")
    result = run(synthetic_workload(updates, depth, seed))
    result["capture"] = run(capture)
    if as_json:
        _print_json(result, True)
        return
    for one in (result, result["capture"]):
        print(f"{one['source']}: {one['updates_per_s']} updates/s against {one['baseline_updates_per_s']} "
              f"(x{one['ratio']}); p50 {one['p50_us']} µs, p99 {one['p99_us']} µs (baseline {one['baseline_p50_us']}, "
              f"{one['baseline_p99_us']}); books equal: {one['equal']}")


@bench_app.command("depth")
def bench_depth(
    symbols: Annotated[int, typer.Option(help="symbols, each with its book at 100 ms and its trades")] = 100,
    duration: Annotated[float, typer.Option(help="seconds measured per run (without, then with depth)")] = 30.0,
    rate: Annotated[float, typer.Option(help="the simulator's market events a second in all (trades among them)")]
    = 4000.0,
    seed: Annotated[int, typer.Option(help="simulator seed (same seed, same market)")] = 1,
    as_json: AsJson = False,
) -> None:
    """The ingestor's whole path with order books: one ingestor on trades alone, then on trades and depth, against
    the same simulator; entries stored per second, CPU, memory, frame -> Redis latency by channel."""
    from ops.bench.depth import run_depth_bench

    if symbols < 1 or duration <= 0 or rate <= 0:
        fail("--symbols must be at least 1, --duration and --rate positive")
    result = run_async(run_depth_bench(redis_url=_bench_redis(symbols, 1), symbols=symbols, duration_s=duration,
                                       rate=rate, seed=seed))
    if as_json:
        _print_json(result, True)
        return
    print(f"{symbols} symbols, {duration:g} s a run, simulator at {rate:g} events/s")
    for name, one in result["runs"].items():
        per_s = ", ".join(f"{ch} {n}/s" for ch, n in one["stored_per_s"].items())
        back = "; ".join(f"{ch} p50 {h['p50_us']:.0f} p99 {h['p99_us']:.0f}"
                         for ch, h in one["frame_to_readback"].items())
        red = one["frame_to_redis"]
        print(f"{name:>12}: stored {per_s}; ingestor CPU {one['ingestor_cpu_share']} of a core, RSS "
              f"{one['rss_mib']} MiB (peak {one['peak_rss_mib']}); frame->Redis p50 {red['p50_us']:.0f} p99 "
              f"{red['p99_us']:.0f} µs; frame->read back (µs) {back}")
    print(f"depth adds {result['depth']['entries_per_s']} entries/s, {result['depth']['cpu_share_added']} of a core, "
          f"{result['depth']['rss_mib_added']} MiB")


def _bench_redis(ticks: int, streams: int, url: str | None = None) -> str:
    """Check the sizes and that Redis answers; the Redis URL to bench against (``url``, else MARKET_REDIS_URL)."""
    from consumer_sdk.core.redis import connect_redis
    from consumer_sdk.core.urls import validate_redis_url

    if ticks < streams or streams < 1:
        fail("--ticks must be at least --streams, and --streams at least 1")
    url = validate_redis_url(url) if url else _redis_url()
    run_async(_check_redis(url, connect_redis))
    return url


async def _check_redis(url: str, connect: Any) -> None:
    client = await connect(url)
    await client.aclose()


# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    try:
        rc = app(args=argv, prog_name="market", standalone_mode=False)
    except (ConfigError, TransientError, MarketError) as exc:
        fail(str(exc))
    except RedisError as exc:
        # Redis refused a command once connected (e.g. an ACL user without the right to run it).
        from consumer_sdk.core.urls import DEFAULT_REDIS_URL, redact_url

        where = redact_url(os.environ.get("MARKET_REDIS_URL", DEFAULT_REDIS_URL))
        fail(f"Redis at {where}: {type(exc).__name__}: {exc}")
    except BrokenPipeError:
        # The reader went away (e.g. `market replay ... | head`): not an error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(0) from None
    except Exception as exc:
        # The command-line parser's own errors (bad flag, missing argument) carry an exit code and a message.
        message = getattr(exc, "format_message", None)
        code = getattr(exc, "exit_code", None)
        if type(exc).__name__ == "Abort":
            raise SystemExit(130) from None
        if type(exc).__name__ == "NoArgsIsHelpError" and callable(message):
            print(message(), file=sys.stderr)
            raise SystemExit(2) from None
        if callable(message) and isinstance(code, int):
            text = str(message()).strip().splitlines()
            fail(text[0] if text else type(exc).__name__)
        raise
    raise SystemExit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
