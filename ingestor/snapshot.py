"""What an ingestor reports about itself at one instant: frozen, typed, with no reference to a live part.

:meth:`ingestor.service.Ingestor.snapshot` composes an :class:`IngestorSnapshot` from each part's own
snapshot (:meth:`~ingestor.session.VenueSession.snapshot`, :meth:`~distributor.writer.StreamWriter.snapshot`,
:meth:`~distributor.hotpath.HotPath.snapshot`) or frozen stats (the ingress queue, the sequencer, the gap
repairer, the control gate).  The heartbeat (:mod:`ingestor.heartbeat`) and the Prometheus collector
(:mod:`ingestor.metrics`) read only this: neither touches a live object.  Taking one costs a pass over
the sessions, the subscribers and the streams, and copies three latency histograms; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from consumer_sdk.core.latency import LatencyHistogram
from distributor.control import GateStats
from distributor.hotpath import HotPathSnapshot
from distributor.ingress import IngressStats
from distributor.writer import WriterSnapshot
from ingestor.depth_books import DepthStats
from ingestor.lifecycle import SessionState
from ingestor.repair import RepairStats
from ingestor.sequencer import SequenceStats

__all__ = ["ChannelSequence", "IngestorSnapshot", "SessionSnapshot", "Snapshotting"]


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """One venue connection's state and counters (:meth:`ingestor.session.VenueSession.snapshot`)."""

    session_id: int
    state: SessionState
    #: why it entered ``state``, and how many state changes it made so far
    reason: str
    transitions: int
    #: venue streams it carries
    streams: int
    #: when its last frame arrived (Unix µs; 0 before the first)
    last_frame_us: int
    reconnects: int
    reconnect_reasons: Mapping[str, int]
    #: connections dropped for delivering no frame for too long
    stalls: int
    #: its streams whose seq has not moved for their threshold, sorted
    stale: tuple[str, ...]
    subscribe_errors: int
    frames: int
    ticks: int
    malformed: int
    unsupported: int
    #: frames refused by kind (:data:`ingestor.pipeline.SKIP_REASONS`), the connections' refusals included
    refused: Mapping[str, int] = field(default_factory=dict)
    #: text pings sent (``text_ping`` venues: OKX)
    pings_sent: int = 0
    #: the venue's error answers by code (OKX ``{"event": "error"}``)
    venue_errors: Mapping[str, int] = field(default_factory=dict)
    #: streams subscribed again on a live connection (an OKX book's fresh snapshot)
    resubscribes: int = 0


@dataclass(frozen=True, slots=True)
class ChannelSequence:
    """The sequencer's verdicts on one channel, summed over its streams."""

    gaps: int
    duplicates: int
    out_of_order: int


@dataclass(frozen=True, slots=True)
class IngestorSnapshot:
    """An ingestor at one instant; a part not built yet (before ``run()``) is None."""

    venue: str
    #: as configured: may hold secrets, which readers strip before publishing
    url: str
    redis_url: str
    prefix: str
    #: the configured channels
    channels: tuple[str, ...]
    sessions: tuple[SessionSnapshot, ...]
    ingress: IngressStats
    hotpath: HotPathSnapshot | None
    #: handlers called with every batch in the distributor task
    batch_handlers: int
    writer: WriterSnapshot | None
    sequence: SequenceStats
    sequence_by_channel: Mapping[str, ChannelSequence]
    repair: RepairStats | None
    control: GateStats
    #: stored control states rejected as malformed
    control_rejected: int
    #: frame received to tick in the ingress (µs), a copy
    ingest_latency: LatencyHistogram
    #: the order books (None: the channel ``depth`` is not configured)
    depth: DepthStats | None = None


class Snapshotting(Protocol):
    """Anything that reports an :class:`IngestorSnapshot`: an ingestor, or a stand-in in a test."""

    def snapshot(self) -> IngestorSnapshot: ...
