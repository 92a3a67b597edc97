"""Prometheus exposition for an ingestor process.

Nothing on the hot path touches prometheus-client: the owner tasks keep plain
integer counters and :class:`~consumer_sdk.core.latency.LatencyHistogram` buckets, and
this collector takes the ingestor's :class:`~ingestor.snapshot.IngestorSnapshot`
when Prometheus scrapes (from the exporter's thread; reads need no lock) and reads
only that: one instant, no live object.

A process running several venues (:mod:`ingestor.multi`) serves them all on one port through
:class:`VenuesCollector`: each family once, its samples from every venue's ingestor, those of a family
without a ``venue`` label given one (each venue has its own queue, writer, hot path and control gate), and
the process-wide ones (``market_threads``) once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import LatencyHistogram
from distributor.writer import REJECTION_REASONS
from ingestor.exposition import Exposition, Histograms, Part, as_family, start_exporter
from ingestor.pipeline import SKIP_REASONS
from ingestor.rest import REFUSAL_KINDS
from ingestor.snapshot import IngestorSnapshot, Snapshotting

__all__ = [
    "PROCESS_WIDE", "IngestorCollector", "VenuesCollector", "serve_metrics", "serve_venues_metrics",
]

#: families that describe the process, not one venue's ingestor: served once, without a venue label
PROCESS_WIDE = frozenset({"market_threads"})


class IngestorCollector(Collector):
    def __init__(self, ingestor: Snapshotting) -> None:
        self._ing = ingestor

    def collect(self) -> Iterator[Metric]:
        return map(as_family, self.parts())

    def parts(self) -> Iterator[Part]:
        """What :meth:`collect` gives, the histograms not yet turned into samples (for :class:`Exposition`)."""
        return self.snapshot_parts(self._ing.snapshot())

    @staticmethod
    def snapshot_parts(snap: IngestorSnapshot) -> Iterator[Part]:
        """The metric families of one snapshot, its histograms as :class:`Histograms`."""
        venue = snap.venue
        writer = snap.writer
        q = snap.ingress

        published = CounterMetricFamily(
            "market_published", "Ticks stored in Redis streams", labels=["venue", "channel"]
        )
        for channel, n in (writer.appended_by_channel.items() if writer is not None else ()):
            published.add_metric([venue, channel], n)
        yield published

        dropped = CounterMetricFamily("market_dropped", "Ticks dropped", labels=["stage", "policy"])
        dropped.add_metric(["ingress", q.policy.value], q.dropped)
        yield GaugeMetricFamily("market_ingress_len", "Ticks waiting in the ingress queue", value=q.length)
        yield GaugeMetricFamily(
            "market_queue_fill_ratio", "Ingress queue length / capacity", value=q.fill_ratio
        )
        bp = CounterMetricFamily(
            "market_backpressure_events", "Times the ingress queue became full", labels=["policy"]
        )
        bp.add_metric([q.policy.value], q.backpressure_events)
        yield bp
        hot = snap.hotpath
        hs = hot.stats if hot is not None else None
        yield GaugeMetricFamily(
            "market_subscriber_count", "Co-located subscribers attached to the hot path",
            value=hs.subscribers if hs is not None else 0,
        )
        for policy, n in sorted(hs.dropped_by_policy.items() if hs is not None else ()):
            dropped.add_metric(["hotpath", str(policy)], n)
        # Per co-located subscriber (a configured, small set): its own handler time, overruns and lag.
        spent = CounterMetricFamily(
            "market_subscriber_handler_seconds", "Time spent in the co-located subscriber's handler",
            labels=["subscriber"],
        )
        over = CounterMetricFamily(
            "market_subscriber_overruns", "Chunks the subscriber's handler took longer than its budget",
            labels=["subscriber"],
        )
        behind = GaugeMetricFamily(
            "market_subscriber_lag", "Published ticks between the hot path's head and the subscriber",
            labels=["subscriber"],
        )
        on_thread = GaugeMetricFamily(
            "market_subscriber_on_thread", "1 when the subscriber's handler runs on a thread of its own",
            labels=["subscriber"],
        )
        for ss in hot.ranked if hot is not None else ():
            spent.add_metric([ss.name], ss.handler_total_us / 1e6)
            over.add_metric([ss.name], ss.overruns)
            behind.add_metric([ss.name], ss.lag)
            on_thread.add_metric([ss.name], 1 if ss.execution.value == "thread" else 0)
        yield spent
        yield over
        yield behind
        yield on_thread
        yield CounterMetricFamily(
            "market_subscriber_offloaded", "Synchronous subscribers moved off the event loop for overrunning their "
            "budget", value=hs.offloaded if hs is not None else 0,
        )
        cs = snap.control
        dropped.add_metric(["control", "pause"], cs.paused_dropped)
        dropped.add_metric(["control", "limit_drop"], cs.limited_dropped)
        dropped.add_metric(["control", "limit_conflate"], cs.limited_conflated)
        dropped.add_metric(["control", "conflate"], cs.conflated)
        dropped.add_metric(["control", "essential"], cs.essential_dropped)
        yield dropped
        yield GaugeMetricFamily(
            "market_degrade_level", "Degrade level in force: 0 normal, 1 shed, 2 conflate, 3 essential",
            value=cs.level.rank,
        )
        switches = GaugeMetricFamily("market_control_switches", "Runtime switches in force", labels=["kind"])
        switches.add_metric(["pause"], cs.pauses)
        switches.add_metric(["limit"], cs.limits)
        switches.add_metric(["degrade"], 0 if cs.operator_level.rank == 0 else 1)
        switches.add_metric(["auto"], 1 if cs.auto_enabled else 0)
        yield switches
        yield GaugeMetricFamily("market_control_version", "Version of the control state in force", value=cs.version)
        yield GaugeMetricFamily("market_control_held", "Ticks held back by conflation", value=cs.held)
        steps = CounterMetricFamily(
            "market_degrade_steps", "Automatic degrade steps (down: more degraded)", labels=["direction"]
        )
        for direction, n in sorted(cs.auto_steps.items()):
            steps.add_metric([direction], n)
        yield steps
        yield CounterMetricFamily(
            "market_control_rejected", "Stored control states rejected as malformed", value=snap.control_rejected
        )

        sessions = snap.sessions
        reconnects = CounterMetricFamily(
            "broker_reconnect", "Venue WebSocket reconnects", labels=["venue"]
        )
        reconnects.add_metric([venue], sum(x.reconnects for x in sessions))
        yield reconnects
        up = GaugeMetricFamily(
            "market_connection_up", "Venue connections in the live state", labels=["venue"]
        )
        up.add_metric([venue], sum(1 for x in sessions if x.state.value == "live"))
        yield up
        configured = GaugeMetricFamily(
            "market_connections", "Venue connections the ingestor keeps (live or not)", labels=["venue"]
        )
        configured.add_metric([venue], len(sessions))
        yield configured
        by_reason: dict[str, int] = {}
        for sess in sessions:
            for reason, n in sess.reconnect_reasons.items():
                by_reason[reason] = by_reason.get(reason, 0) + n
        reasons = CounterMetricFamily(
            "market_reconnect_reasons", "Venue WebSocket reconnects by the failure that caused them",
            labels=["venue", "reason"],
        )
        for reason, n in sorted(by_reason.items()):
            reasons.add_metric([venue, reason], n)
        yield reasons
        yield GaugeMetricFamily(
            "market_stale_streams", "Venue streams whose seq has not moved for their stale_after threshold",
            value=sum(len(sess.stale) for sess in sessions),
        )
        now_us = time.time_ns() // 1000
        ages = [(now_us - sess.last_frame_us) / 1e6 for sess in sessions if sess.last_frame_us and sess.streams]
        age = GaugeMetricFamily(
            "market_last_frame_age_seconds", "Seconds since the quietest venue connection delivered a frame",
            labels=["venue"],
        )
        if ages:
            age.add_metric([venue], max(0.0, max(ages)))
        yield age
        received = CounterMetricFamily("market_frames_received", "Venue frames received", labels=["venue"])
        received.add_metric([venue], sum(x.frames for x in sessions))
        yield received
        accepted = CounterMetricFamily(
            "market_ticks_accepted", "Ticks accepted by the sequencer into the ingress", labels=["venue"]
        )
        accepted.add_metric([venue], sum(x.ticks for x in sessions))
        yield accepted
        frames = CounterMetricFamily(
            "market_frames_skipped",
            "Venue frames skipped, by reason: events not carried (unsupported) and what was refused, by kind "
            "(docs/hostile-input.md)",
            labels=["venue", "reason"],
        )
        for reason in SKIP_REASONS:
            if reason == "unsupported":
                n = sum(x.unsupported for x in sessions)
            else:
                n = sum(x.refused.get(reason, 0) for x in sessions)
            frames.add_metric([venue, reason], n)
        yield frames
        pings = CounterMetricFamily(
            "market_venue_pings_sent", "Text pings sent to the venue (its heartbeat: OKX's ping)", labels=["venue"]
        )
        pings.add_metric([venue], sum(x.pings_sent for x in sessions))
        yield pings
        by_code: dict[str, int] = {}
        for sess in sessions:
            for code, n in sess.venue_errors.items():
                by_code[code] = by_code.get(code, 0) + n
        venue_errors = CounterMetricFamily(
            "market_venue_errors", "Error answers of the venue (OKX's {\"event\": \"error\"}), by its code",
            labels=["venue", "code"],
        )
        for code, n in sorted(by_code.items()):
            venue_errors.add_metric([venue, code], n)
        yield venue_errors
        resubscribes = CounterMetricFamily(
            "market_venue_resubscribes",
            "Streams unsubscribed and subscribed again on a live connection (an OKX book wanting a fresh snapshot)",
            labels=["venue"],
        )
        resubscribes.add_metric([venue], sum(x.resubscribes for x in sessions))
        yield resubscribes

        gaps = CounterMetricFamily("market_gap", "Gaps in venue sequence ids", labels=["venue", "channel"])
        dups = CounterMetricFamily("market_duplicate", "Duplicate ticks rejected", labels=["venue", "channel"])
        ooo = CounterMetricFamily(
            "market_out_of_order", "Ticks that arrived after a newer one", labels=["venue", "channel"]
        )
        for channel in snap.channels:
            per = snap.sequence_by_channel.get(channel)
            gaps.add_metric([venue, channel], per.gaps if per is not None else 0)
            dups.add_metric([venue, channel], per.duplicates if per is not None else 0)
            ooo.add_metric([venue, channel], per.out_of_order if per is not None else 0)
        yield gaps
        yield dups
        yield ooo
        rs = snap.repair
        lost = dict(rs.ticks_unrepaired) if rs is not None else {}
        fixed = dict(rs.ticks_repaired) if rs is not None else {}
        unrepaired = CounterMetricFamily(
            "market_gap_unrepaired", "Venue ids lost: missing after gap repair, stored as gap markers",
            labels=["venue", "channel"],
        )
        repaired = CounterMetricFamily(
            "market_gap_repaired", "Venue ids fetched over REST to close gaps", labels=["venue", "channel"]
        )
        for channel in sorted(set(snap.channels) | set(lost) | set(fixed)):
            unrepaired.add_metric([venue, channel], lost.get(channel, 0))
            repaired.add_metric([venue, channel], fixed.get(channel, 0))
        yield unrepaired
        yield repaired
        if rs is not None:
            refused = CounterMetricFamily(
                "market_repair_refused", "REST requests and answers gap repair gave up on, by kind",
                labels=["venue", "kind"],
            )
            for kind in REFUSAL_KINDS:
                refused.add_metric([venue, kind], rs.refused.get(kind, 0))
            yield refused
            per_venue = (
                ("market_repair_hold_expired", "Repairs ended by [repair] hold_s (rest marked, held ticks released)",
                 rs.hold_expired, CounterMetricFamily),
                ("market_repair_circuit_opened", "Times the REST circuit breaker opened", rs.breaker_opened,
                 CounterMetricFamily),
                ("market_repair_skipped", "Gaps marked at once because the REST circuit breaker was open",
                 rs.breaker_skipped, CounterMetricFamily),
                ("market_repair_circuit_open", "1 while the REST circuit breaker is open (gaps marked, not fetched)",
                 1 if rs.breaker == "open" else 0, GaugeMetricFamily),
                ("market_repair_held_ticks", "Live ticks held behind a repair now", rs.held_ticks, GaugeMetricFamily),
            )
            for name, doc, value, family in per_venue:
                metric = family(name, doc, labels=["venue"])
                metric.add_metric([venue], value)
                yield metric

        if writer is not None:
            ws = writer.stats
            yield GaugeMetricFamily("market_writer_buffered", "Ticks waiting for Redis", value=ws.buffered)
            yield CounterMetricFamily("market_redis_errors", "Failed Redis writes", value=ws.errors)
            yield CounterMetricFamily(
                "market_writer_flushes", "Writer round trips to Redis that stored a batch", value=ws.batches
            )
            yield GaugeMetricFamily(
                "market_writer_last_flush_seconds", "Duration of the last writer round trip",
                value=ws.last_flush_us / 1e6,
            )
            yield GaugeMetricFamily(
                "market_redis_up",
                "1 when Redis answered the writer's last attempt (a refusal such as OOM is an answer: "
                "see market_writer_retrying and market_redis_oom); 0 when unreachable",
                value=1 if ws.connected else 0,
            )
            yield GaugeMetricFamily(
                "market_writer_retrying",
                "1 while the writer holds ticks Redis did not take (refused or unreachable) and retries them",
                value=1 if ws.failing else 0,
            )
            yield GaugeMetricFamily(
                "market_redis_oom", "1 while Redis refuses the writer's writes for lack of memory (OOM)",
                value=1 if ws.failing == "oom" else 0,
            )
            rejected = CounterMetricFamily(
                "market_writer_rejected",
                "Tick writes Redis refused, by error class; each refused attempt counts the ticks it carried",
                labels=["reason"],
            )
            by_reason = ws.rejected_by_reason
            for reason in sorted(set(REJECTION_REASONS) | set(by_reason)):
                rejected.add_metric([reason], by_reason.get(reason, 0))
            yield rejected
            yield CounterMetricFamily(
                "market_writer_dead_lettered",
                "Ticks Redis can never store in their stream, written to the dead-letter stream instead",
                value=ws.dead_lettered,
            )
            yield GaugeMetricFamily(
                "market_spill_records", "Ticks in the spill log on disk, waiting for Redis", value=ws.spilled
            )
            yield GaugeMetricFamily(
                "market_spill_full",
                "1 while the spill log refuses ticks for lack of room (its cap, or a full disk): the ingress "
                "policy decides what happens to new ticks",
                value=1 if ws.spill_full else 0,
            )
            yield CounterMetricFamily(
                "market_spill_refused", "Times the spill log took none of the ticks offered (full, or the disk failed)",
                value=ws.spill_refused,
            )
            yield CounterMetricFamily(
                "market_spill_write_failures",
                "Writes and syncs of the spill log the disk refused (ENOSPC, EIO, ...); each left the log intact",
                value=ws.spill_write_failures,
            )
            yield CounterMetricFamily(
                "market_spill_corrupt", "Spill log records dropped while draining because they were not whole",
                value=ws.spill_corrupt,
            )

        depth = snap.depth
        if depth is not None:
            # A symbol label: the books are kept for the configured symbols only (a small, known set).
            resync = CounterMetricFamily(
                "market_book_resync",
                "Order books started over, by reason: rebuilt from a fresh snapshot (Binance: fetched over REST; "
                "OKX: the venue's own, sent on a new subscription of the book's stream)",
                labels=["venue", "symbol", "reason"],
            )
            for (symbol, reason), n in sorted(depth.resyncs.items()):
                resync.add_metric([venue, symbol, reason], n)
            yield resync
            entries = CounterMetricFamily(
                "market_book_entries", "Order book entries stored, by kind (diff, start, resync, periodic)",
                labels=["venue", "kind"],
            )
            entries.add_metric([venue, "diff"], depth.diffs_stored)
            for entry_kind, n in sorted(depth.snapshots_stored.items()):
                entries.add_metric([venue, entry_kind], n)
            yield entries
            live = GaugeMetricFamily("market_books_live", "Order books in step with the venue now", labels=["venue"])
            live.add_metric([venue], depth.live)
            yield live
            failed = CounterMetricFamily(
                "market_book_snapshot_failures", "Order book snapshot requests that gave no usable book, by kind",
                labels=["venue", "kind"],
            )
            for failure, n in sorted(depth.failures.items()):
                failed.add_metric([venue, failure], n)
            yield failed
            if depth.checksums:  # a venue that sends its book's checksum (OKX)
                checksums = CounterMetricFamily(
                    "market_book_checksums",
                    "Venue book checksums compared with the kept book's, by result (equal, mismatch: a resync)",
                    labels=["venue", "result"],
                )
                for result, n in sorted(depth.checksums.items()):
                    checksums.add_metric([venue, result], n)
                yield checksums
                waiting = GaugeMetricFamily(
                    "market_books_resubscribing",
                    "Order books waiting for the snapshot a new subscription of their stream brings (OKX)",
                    labels=["venue"],
                )
                waiting.add_metric([venue], len(depth.resubscribing))
                yield waiting
        yield Histograms(
            "market_ingest_latency_us", "Frame received to tick in ingress (µs)",
            [({"venue": venue}, snap.ingest_latency)],
        )
        yield Histograms(
            "market_fanout_latency_us",
            "Frame received to delivery (µs), by stage: redis_sent (its flush sent to Redis), redis (acknowledged)",
            [({"stage": "redis"}, writer.ack_latency if writer is not None else LatencyHistogram()),
             ({"stage": "redis_sent"}, writer.sent_latency if writer is not None else LatencyHistogram())],
        )
        yield Histograms(
            "market_e2e_latency_us", "Ingress to co-located subscriber callback (µs)",
            [({"path": "hotpath"}, hot.latency if hot is not None else LatencyHistogram())],
        )
        yield GaugeMetricFamily("market_threads", "Threads in this process", value=threading.active_count())


class VenuesCollector(Collector):
    """The ingestors of several venues as one exposition (see the module doc).  ``ingestors()`` gives those
    running now (a venue's ingestor is replaced when it is restarted), read at each scrape; ``restarts()``, when
    given, how many times each venue's was replaced (``market_venue_restarts``)."""

    def __init__(
        self, ingestors: Callable[[], Iterable[Snapshotting]],
        restarts: Callable[[], Mapping[str, int]] | None = None,
    ) -> None:
        self._ingestors = ingestors
        self._restarts = restarts

    def collect(self) -> Iterator[Metric]:
        return map(as_family, self.parts())

    def parts(self) -> list[Part]:
        """Every venue's families merged (see the class doc), the histograms as :class:`Histograms`."""
        merged: dict[str, Part] = {}
        for ingestor in list(self._ingestors()):
            snap = ingestor.snapshot()
            venue = snap.venue
            for part in IngestorCollector.snapshot_parts(snap):
                if isinstance(part, Histograms):
                    into_h = merged.setdefault(part.name, Histograms(part.name, part.documentation, []))
                    assert isinstance(into_h, Histograms)
                    into_h.series.extend(
                        (labels if "venue" in labels else {"venue": venue, **labels}, h) for labels, h in part.series
                    )
                    continue
                into = merged.get(part.name)
                if into is None:
                    into = merged[part.name] = Metric(part.name, part.documentation, part.type, part.unit)
                elif part.name in PROCESS_WIDE:
                    continue
                assert not isinstance(into, Histograms)
                for sample in part.samples:
                    if "venue" not in sample.labels and part.name not in PROCESS_WIDE:
                        sample = sample._replace(labels={"venue": venue, **sample.labels})
                    into.samples.append(sample)
        out = list(merged.values())
        if self._restarts is not None:
            restarts = CounterMetricFamily(
                "market_venue_restarts", "Times a venue's ingestor failed and was replaced by a fresh one",
                labels=["venue"],
            )
            for venue, n in sorted(self._restarts().items()):
                restarts.add_metric([venue], n)
            out.append(restarts)
        return out


def serve_metrics(ingestor: Snapshotting, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Start the exporter thread (:mod:`ingestor.exposition`); a port in use is a :class:`ConfigError`."""
    return _serve(IngestorCollector(ingestor).parts, host, port)


def serve_venues_metrics(
    ingestors: Callable[[], Iterable[Snapshotting]], host: str, port: int,
    restarts: Callable[[], Mapping[str, int]] | None = None,
) -> tuple[WSGIServer, threading.Thread]:
    """Start one exporter thread for several venues' ingestors (:class:`VenuesCollector`); a port in use is a
    :class:`ConfigError`."""
    return _serve(VenuesCollector(ingestors, restarts).parts, host, port)


def _serve(parts: Callable[[], Iterable[Part]], host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    try:
        return start_exporter(Exposition(parts), host, port)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
