"""The connection drills of every venue against its simulator profile: real faults (close storms, stalls, rotations,
the venue's planned-close notice, bad frames, a black-holed link healed with backfill) on the real Redis.

Each drill is Binance spot's (:mod:`tests.ingestor.test_session_faults`, which keeps them for spot) run for each
other venue the ingestor speaks, on that venue's trade channel, with the same checks: each trade stream holds every
id once, in order, up to the newest the venue's REST history names (:func:`venue_drill.complete`, which asks the
venue's own endpoint), and the session noticed what it had to notice the way it had to notice it.

================= ============= ========================================= ============================ ==============
venue             channel       backfill over (rows a page)               planned close                heartbeat
================= ============= ========================================= ============================ ==============
``binance_usdm``  ``agg_trade`` ``/fapi/v1/aggTrades`` (1000)             ``serverShutdown``           WebSocket ping
``binance_coinm`` ``agg_trade`` ``/dapi/v1/aggTrades`` (1000)             ``serverShutdown``           WebSocket ping
``okx``           ``trade``     ``/api/v5/market/history-trades`` (100)   notice ``64008``             text ``ping``
================= ============= ========================================= ============================ ==============

On OKX our ping is the text ``ping`` (its stall is noticed by an unanswered one, or the no-frame watchdog), and
the planned-close notice is OKX's ``{"event": "notice", "code": "64008"}``, on which the session rotates as on
Binance's ``serverShutdown``.  :func:`test_a_quiet_okx_link_is_kept_open_by_the_text_ping` shows the text
heartbeat keeping a link with no market data open past the venue's idle close.

The black-holed link: spot's drill cuts the link for about 30 s of trades (3000).  What it checks does not depend
on those 30 s: the cut is noticed by our ping or the no-frame watchdog within seconds (5 s and 6 s here), well
before any venue heartbeat could matter, and what the venue made behind the cut comes back over REST.  So here
the outage is measured in trades instead: it lasts until the cut is noticed and more trades than one page of the
venue's REST history were made behind it, so the backfill has to page.  As spot's, it runs ``market ingest
--venue`` (the command, its settings and its log), so a venue the command cannot start fails it.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import venue_drill as drill
from venue_drill import run_ingestor_fixture, state_log_fixture  # noqa: F401 - the fixtures run_ingestor and state_log

from distributor.ingress import Policy
from ingestor.config import IngestSettings
from ingestor.lifecycle import SessionState
from ingestor.session import SessionSettings
from ops.faultproxy import FaultProxy
from ops.simulator import Simulator, SimulatorConfig
from ops.simulator.okx import OkxSimulator

AnySimulator = Simulator | OkxSimulator


@dataclass(frozen=True, slots=True)
class DrillVenue:
    """One venue as the drills run it: its name (the ingestor's and the simulator's), two of its symbols, the
    channel its trades come on, and how many trades one REST history page holds."""

    name: str
    symbols: tuple[str, str]
    channel: str
    rest_page: int
    #: the event of the venue's planned-close notice in the log
    notice_event: str = "server_shutdown_notice"

    def simulator(self, **config: Any) -> AnySimulator:
        cfg = SimulatorConfig(venue=self.name, symbols=self.symbols, **config)
        return OkxSimulator(cfg) if self.name == "okx" else Simulator(cfg)

    def key(self, prefix: str, symbol: str) -> str:
        return f"{prefix}:{self.name}:{symbol}:{self.channel}"

    def settings(self, sim: AnySimulator, prefix: str, symbols: tuple[str, ...],
                 session: SessionSettings = drill.FAST) -> IngestSettings:
        return IngestSettings(
            venue=self.name, url=sim.ws_url, rest_url=sim.rest_url, symbols=symbols, channels=(self.channel,),
            prefix=prefix, session=session, queue_policy=Policy.BLOCK,
        )

    async def assert_complete(self, redis: aioredis.Redis, prefix: str, sim: AnySimulator, symbols: tuple[str, ...],
                              timeout: float = 30.0) -> dict[str, int]:
        """Each trade stream holds every id from its first up to what the venue had made when asked."""
        return {s: len(await drill.complete(redis, self.key(prefix, s), sim, s, timeout)) for s in symbols}


USDM = DrillVenue("binance_usdm", ("BTCUSDT", "ETHUSDT"), "agg_trade", rest_page=1000)
COINM = DrillVenue("binance_coinm", ("BTCUSD_PERP", "ETHUSD_PERP"), "agg_trade", rest_page=1000)
OKX = DrillVenue("okx", ("BTC-USDT", "BTC-USDT-SWAP"), "trade", rest_page=100)

VENUES = [pytest.param(v, id=v.name) for v in (USDM, COINM, OKX)]


@pytest.mark.slow
@pytest.mark.parametrize("venue", VENUES)
async def test_close_every_few_seconds_for_a_minute(venue: DrillVenue, run_ingestor: Any, aredis: aioredis.Redis,
                                                    prefix: str, state_log: drill.StateLog) -> None:
    symbols = venue.symbols
    async with venue.simulator(rate=600.0, close_every=4.0) as sim:
        ing = await run_ingestor(venue.settings(sim, prefix, symbols))
        await drill.ride_out_close_storm(ing)
        counts = await venue.assert_complete(aredis, prefix, sim, symbols)
    drill.assert_close_storm_ridden(state_log, ing, counts)


@pytest.mark.parametrize("venue", VENUES)
async def test_stall_is_detected_within_the_timeout(venue: DrillVenue, run_ingestor: Any, aredis: aioredis.Redis,
                                                    prefix: str, state_log: drill.StateLog) -> None:
    """The venue keeps the socket and goes silent for an hour (no frame, no pong): the session drops the
    connection by itself, through our ping's timeout or the no-frame watchdog, while the venue is still silent;
    once the venue speaks again the stream is whole."""
    symbols = venue.symbols[:1]
    async with venue.simulator(rate=400.0) as sim:
        ing = await run_ingestor(venue.settings(sim, prefix, symbols))
        await drill.stall_noticed_while_silent(ing, sim, state_log)
        await venue.assert_complete(aredis, prefix, sim, symbols)


@pytest.mark.parametrize("venue", VENUES)
async def test_rotation_before_max_age_loses_and_duplicates_nothing(
    venue: DrillVenue, run_ingestor: Any, aredis: aioredis.Redis, prefix: str, state_log: drill.StateLog
) -> None:
    symbols = venue.symbols
    rotating = dataclasses.replace(drill.FAST, max_age=2.0)
    async with venue.simulator(rate=800.0) as sim:
        ing = await run_ingestor(venue.settings(sim, prefix, symbols, session=rotating))
        await drill.rotations(ing, 4, "four rotations")
        await venue.assert_complete(aredis, prefix, sim, symbols)
        assert ing.sequencer.stats().gaps == 0
        assert ing.stats().reconnects == 0
        assert ing.repairer is not None and ing.repairer.gaps_unrepaired == 0
        assert not [f for _, f in state_log.records if f["event"] == "rotation_failed"]


@pytest.mark.parametrize("venue", VENUES)
async def test_server_shutdown_rotates_make_before_break(venue: DrillVenue, run_ingestor: Any,
                                                         aredis: aioredis.Redis, prefix: str,
                                                         state_log: drill.StateLog) -> None:
    """The venue closes each connection at its maximum age after its planned-close notice: the session rotates
    on the notice, before the close, and loses nothing."""
    symbols = venue.symbols
    async with venue.simulator(rate=800.0, max_connection_age=3.0, shutdown_notice=1.5) as sim:
        ing = await run_ingestor(venue.settings(sim, prefix, symbols))
        await drill.rotations(ing, 3, "three rotations on the venue's planned-close notice")
        await venue.assert_complete(aredis, prefix, sim, symbols)
        assert ing.sequencer.stats().gaps == 0
        assert ing.stats().reconnects == 0
    assert any(f.get("event") == venue.notice_event for _, f in state_log.records)


@pytest.mark.parametrize("venue", VENUES)
async def test_bad_frames_are_counted_and_the_stream_stays_whole(
    venue: DrillVenue, run_ingestor: Any, aredis: aioredis.Redis, prefix: str
) -> None:
    symbols = venue.symbols[:1]
    async with venue.simulator(rate=1000.0) as sim:
        ing = await run_ingestor(venue.settings(sim, prefix, symbols))
        await drill.bad_frames_seen(ing, sim, 30)
        await venue.assert_complete(aredis, prefix, sim, symbols)
        assert all(s.state is SessionState.LIVE for s in ing.sessions)
        assert ing.stats().reconnects == 0


async def test_a_quiet_okx_link_is_kept_open_by_the_text_ping(run_ingestor: Any, aredis: aioredis.Redis,
                                                               prefix: str) -> None:
    """OKX closes a connection that sent nothing for its idle timeout (30 s; 3 s here) and the market is silent (no
    trade at all): only the session's text ``ping`` after ``ping_interval`` without a frame keeps the link open,
    answered ``pong`` each time, for more than three idle timeouts."""
    symbols = OKX.symbols
    async with OKX.simulator(rate=0.0, idle_timeout=3.0) as sim:
        ing = await run_ingestor(OKX.settings(sim, prefix, symbols))
        await drill.until_live(ing)

        async def answered() -> bool:  # a ping each second (ping_interval 1 s): more than 3 idle timeouts
            return int(sim.fault_state()["pings_answered"]) >= 10

        await drill.wait_for(answered, 60, "ten text pings answered")
        assert sim.fault_state()["idle_closes"] == 0
        assert ing.stats().reconnects == 0
        assert all(s.state is SessionState.LIVE for s in ing.sessions)
        assert sum(s.pings_sent for s in ing.sessions) >= 10


@pytest.mark.slow
@pytest.mark.parametrize("venue", VENUES)
async def test_black_holed_link_heals_with_backfill(venue: DrillVenue, redis_url: str, aredis: aioredis.Redis,
                                                    prefix: str, tmp_path: Path) -> None:
    """`market ingest --venue` through a proxy that silently drops the link (WebSocket and REST) while the venue
    keeps trading: until the ingestor noticed and more trades than one REST page were made behind the cut (see
    the module doc for why this and not spot's 30 s)."""
    symbols = venue.symbols
    first = symbols[0]
    behind = venue.rest_page + venue.rest_page // 2
    config = tmp_path / "ingest.toml"
    config.write_text(drill.BLACK_HOLE_CONFIG)
    log_path = tmp_path / "ingest.log"
    async with venue.simulator(rate=1000.0) as sim, FaultProxy(sim.port) as proxy:
        args = ["--venue", venue.name, "--url", proxy.url, "--symbols", ",".join(symbols), "--channels", venue.channel,
                "--metrics-port", "0", "--config", str(config)]
        async with drill.market_ingest(args, redis_url, prefix, log_path) as proc:
            async def flowing() -> bool:
                return all([await aredis.xlen(venue.key(prefix, s)) > 50 for s in symbols])

            await drill.wait_for(flowing, 20, "ticks flowing")
            started = time.monotonic()
            wall_cut = time.time()
            await drill.black_hole_until_noticed(proxy, sim, first, log_path, behind)
            proxy.restore()
            restored, wall_restored = time.monotonic(), time.time()
            counts = await venue.assert_complete(aredis, prefix, sim, symbols, timeout=60)
            healed = time.monotonic() - restored

            async def kept_receiving() -> bool:  # then as many more trades per stream over the healed link
                return all([await aredis.xlen(venue.key(prefix, s)) >= counts[s] + behind for s in symbols])

            await drill.wait_for(kept_receiving, 120, f"{behind} more trades per stream over the healed link")
            after = await venue.assert_complete(aredis, prefix, sim, symbols, timeout=30)
            assert all(after[s] > counts[s] for s in symbols)
    assert proc.returncode == 0
    log = drill.BlackHoleLog(log_path, wall_cut, wall_restored)
    assert log.fetched > venue.rest_page, "what was made behind the cut came back over REST, more than one page of it"
    print(f"\n{venue.name} " + log.summary(restored - started, healed, time.monotonic() - started))
