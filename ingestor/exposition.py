"""The ingestor's ``/metrics`` page: Prometheus text format 0.0.4, with histograms formatted cheaply.

prometheus-client formats every sample on every scrape: a label string sorted and escaped per bucket, a
float formatted per bucket.  The ingestor's three latency histograms have 124 buckets per series, about
600 bucket lines, and that formatting took 6 to 9 ms a scrape on the reference machine, in the exporter's
thread but holding the interpreter lock: the event loop that parses the venue's frames and runs the
hot path stopped for it.  Here a histogram's line prefixes (``name_bucket{le="1023.0",venue="binance"} ``)
are formatted once per label set and kept; a scrape formats only the cumulative counts, and only where a
count changes from the bucket before.  Every other family still goes through prometheus-client's own
``generate_latest``, and the page is byte for byte what ``generate_latest`` writes for the same families
(the tests compare the two).

``?name[]=...`` restricts the page to those sample names, as prometheus-client's exporter does, except that a
histogram is served whole when any of its ``_bucket``, ``_count`` or ``_sum`` is asked for.  Unlike that
exporter, the page is always text 0.0.4 (never OpenMetrics), never gzipped (about 50 kB), and only ``GET`` is
answered (405 otherwise).
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, NamedTuple
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.utils import floatToGoString

from consumer_sdk.core.latency import LatencyHistogram, bucket_bounds

__all__ = ["Exposition", "Histograms", "Part", "as_family", "start_exporter"]

#: label sets whose line prefixes are kept; beyond this the cache starts over.  A safety net: the label sets
#: are few and fixed (a venue, a stage, a path); past it every scrape would format its prefixes again
MAX_CACHED_SERIES = 1024

#: names prometheus-client writes unchanged (others it rewrites; this formatter refuses them)
_LEGACY_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z").match

_LE = tuple("+Inf" if b == float("inf") else repr(b) for b in bucket_bounds())


class Histograms(NamedTuple):
    """One histogram family before it is formatted: its name, help text and series (label values, histogram);
    every series has the same label names."""

    name: str
    documentation: str
    series: list[tuple[dict[str, str], LatencyHistogram]]


#: what a collector gives for one scrape: plain families, and histograms not yet turned into samples
Part = Metric | Histograms


def as_family(part: Part) -> Metric:
    """``part`` as a prometheus-client family (a histogram's samples built, one per bucket)."""
    if not isinstance(part, Histograms):
        return part
    if not part.series:
        return HistogramMetricFamily(part.name, part.documentation, labels=[])
    (labels, hist), *more = part.series
    fam = HistogramMetricFamily(part.name, part.documentation, labels=list(labels))
    for values, h in ((labels, hist), *more):
        if values.keys() != labels.keys():
            raise ValueError(f"{part.name}: label names {sorted(values)} differ from {sorted(labels)}")
        cumulative = h.cumulative()
        fam.add_metric([values[k] for k in labels], list(zip(_LE, cumulative, strict=True)), float(h.sum_us))
    return fam


class _Families:
    """A fixed list of families in the shape ``generate_latest`` reads."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


#: a sample's value as prometheus-client writes it (its own function, untyped there: ``12.0``, ``1.2345678e+07``)
_number: Callable[[float], str] = floatToGoString


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_doc(doc: str) -> str:
    return doc.replace("\\", r"\\").replace("\n", r"\n")


def _labels(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(labels))


class Exposition:
    """The text page of ``parts()``, read at each :meth:`render`; keeps each histogram series' line prefixes.
    Called from the exporter's threads: the cache is replaced, never edited in place, so two scrapes at once
    at worst both format the same prefixes."""

    def __init__(self, parts: Callable[[], Iterable[Part]]) -> None:
        self._parts = parts
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[tuple[str, ...], str, str]] = {}

    def render(self, names: frozenset[str] | None = None) -> bytes:
        """The page; only the samples named in ``names`` when given (see the module doc)."""
        out: list[bytes] = []
        plain: list[Metric] = []
        for part in self._parts():
            if isinstance(part, Histograms):
                if names is not None and not names & {part.name + s for s in ("_bucket", "_count", "_sum")}:
                    continue
                if plain:
                    out.append(generate_latest(_Families(plain)))
                    plain = []
                out.append(self._histograms(part).encode("utf-8"))
            elif names is None:
                plain.append(part)
            else:
                samples = [s for s in part.samples if s.name in names]
                if samples:
                    kept = Metric(part.name, part.documentation, part.type)
                    kept.samples = samples
                    plain.append(kept)
        if plain:
            out.append(generate_latest(_Families(plain)))
        return b"".join(out)

    def _histograms(self, part: Histograms) -> str:
        name = part.name
        lines = [f"# HELP {name} {_escape_doc(part.documentation)}\n", f"# TYPE {name} histogram\n"]
        for labels, hist in part.series:
            key = (name, tuple(labels.items()))
            prefixes = self._prefixes.get(key)
            if prefixes is None:
                prefixes = self._remember(key)
            buckets, count, total = prefixes
            acc, last, text = 0, -1, ""
            for prefix, c in zip(buckets, hist.counts, strict=True):
                acc += c
                if acc != last:
                    last, text = acc, _number(acc) + "\n"
                lines.append(prefix)
                lines.append(text)
            lines.append(f"{count}{_number(acc)}\n")
            lines.append(f"{total}{_number(float(hist.sum_us))}\n")
        return "".join(lines)

    def _remember(self, key: tuple[str, tuple[tuple[str, str], ...]]) -> tuple[tuple[str, ...], str, str]:
        name, labels = key
        bad = [n for n in (name, *(k for k, _ in labels)) if not _LEGACY_NAME(n)]
        if bad or any(k == "le" for k, _ in labels):
            raise ValueError(f"{name}: a histogram's names must be plain (no 'le' label): {bad or labels}")
        plain = _labels(labels)
        buckets = tuple(f"{name}_bucket{{{_labels((*labels, ('le', le)))}}} " for le in _LE)
        inner = f"{{{plain}}}" if plain else ""
        prefixes = (buckets, f"{name}_count{inner} ", f"{name}_sum{inner} ")
        cache = {} if len(self._prefixes) >= MAX_CACHED_SERIES else dict(self._prefixes)
        cache[key] = prefixes
        self._prefixes = cache
        return prefixes


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged (a scrape every few seconds would flood the log)."""


def start_exporter(exposition: Exposition, host: str, port: int) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``exposition`` on ``host:port`` (every path but ``/favicon.ico``) from a daemon thread, a thread
    per scrape; returns the server and its thread (``server.shutdown()`` stops it).  ``OSError`` when the
    address cannot be bound."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(_Server):
        address_family = family

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("REQUEST_METHOD") != "GET":
            start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET")])
            return [b"only GET\n"]
        if environ.get("PATH_INFO") == "/favicon.ico":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        asked = parse_qs(environ.get("QUERY_STRING", "")).get("name[]")
        body = exposition.render(frozenset(asked) if asked else None)
        start_response("200 OK", [("Content-Type", CONTENT_TYPE_PLAIN_0_0_4), ("Content-Length", str(len(body)))])
        return [body]

    server = make_server(str(sockaddr[0]), port, app, Server, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, name="metrics-exporter", daemon=True)
    thread.start()
    return server, thread
