"""The ingestor's ``/metrics`` page (:mod:`ingestor.exposition`): the same bytes as prometheus-client's
``generate_latest`` for the same families, its histograms' line prefixes kept between scrapes, ``name[]``
restricting the page, and the exporter served over real HTTP."""

from __future__ import annotations

import dataclasses
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from consumer_sdk.core.errors import ConfigError
from consumer_sdk.core.latency import LatencyHistogram
from ingestor.config import IngestSettings
from ingestor.exposition import Exposition, Histograms, Part, as_family, start_exporter
from ingestor.metrics import IngestorCollector, VenuesCollector, serve_metrics
from ops.redis_server import free_port
from tests.ingestor.test_heartbeat import FakeIngestor, fake_ingestor, fake_session, fake_writer


class Families:
    """``parts`` turned into the families prometheus-client would format (the reference)."""

    def __init__(self, parts: list[Part]) -> None:
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        return map(as_family, self.parts)


def hist_of(values: list[int]) -> LatencyHistogram:
    h = LatencyHistogram()
    for v in values:
        h.observe(v)
    return h


label_values = st.text(st.characters(codec="utf-8"), max_size=12)
observations = st.lists(st.integers(min_value=0, max_value=2**42), max_size=60)


@settings(max_examples=150, deadline=None)
@example(first='a"b\\c\nd', second="\\", a=[5, 2**40], b=[], more=[7], doc='help "with" \\ and \n')
@given(
    first=label_values, second=label_values, a=observations, b=observations, more=observations,
    doc=st.text(max_size=40),
)
def test_histograms_are_byte_for_byte_what_generate_latest_writes(
    first: str, second: str, a: list[int], b: list[int], more: list[int], doc: str,
) -> None:
    ha, hb = hist_of(a), hist_of(b)
    gauge = GaugeMetricFamily("g", "a gauge", labels=["x"])
    gauge.add_metric([first], 2.5)
    parts: list[Part] = [
        gauge,
        Histograms("h_us", doc, [({"stage": first}, ha), ({"stage": second}, hb)]),
        Histograms("empty_us", "nothing observed", [({}, LatencyHistogram())]),
        GaugeMetricFamily("last", "after the histograms", value=1),
    ]
    page = Exposition(lambda: parts)
    assert page.render() == generate_latest(Families(parts))
    # A second scrape, after more observations: the kept prefixes, the new counts.
    for v in more:
        ha.observe(v)
    assert page.render() == generate_latest(Families(parts))


def collector_of(ingestor: Any) -> IngestorCollector:
    return IngestorCollector(ingestor)


def loaded_ingestor(venue: str = "binance") -> FakeIngestor:
    writer = fake_writer()
    writer.value = dataclasses.replace(writer.value, appended_by_channel={"trade": 10, "agg_trade": 3})
    writer.value.ack_latency.observe(1234)
    writer.value.sent_latency.observe(600)
    ing = fake_ingestor(sessions=[fake_session(1), fake_session(2)], writer=writer)
    ing.settings = IngestSettings(venue=venue, url=ing.settings.url, redis_url=ing.settings.redis_url, prefix="md")
    return ing


def test_an_ingestors_page_is_what_generate_latest_writes() -> None:
    collector = collector_of(loaded_ingestor())
    page = Exposition(collector.parts).render()
    assert page == generate_latest(collector)
    names = {s.name for f in text_string_to_metric_families(page.decode()) for s in f.samples}
    assert {"market_published_total", "market_ingress_len", "market_fanout_latency_us_bucket",
            "market_e2e_latency_us_count", "market_ingest_latency_us_sum", "market_threads"} <= names


def test_several_venues_page_is_what_generate_latest_writes() -> None:
    venues = [loaded_ingestor("binance"), loaded_ingestor("binance_coinm")]
    collector = VenuesCollector(lambda: venues, lambda: {"binance": 1, "binance_coinm": 0})
    page = Exposition(collector.parts).render()
    assert page == generate_latest(collector)
    fanout = {f.name: f for f in text_string_to_metric_families(page.decode())}["market_fanout_latency_us"]
    counts = {(s.labels["venue"], s.labels["stage"]): s.value for s in fanout.samples
              if s.name == "market_fanout_latency_us_count"}
    assert counts == {("binance", "redis"): 1, ("binance", "redis_sent"): 1,
                      ("binance_coinm", "redis"): 1, ("binance_coinm", "redis_sent"): 1}


def test_name_restricts_the_page_to_those_samples() -> None:
    collector = collector_of(loaded_ingestor())
    page = Exposition(collector.parts).render(frozenset({
        "market_ingress_len", "market_frames_received_total", "market_fanout_latency_us_count", "no_such_metric",
    })).decode()
    families = {f.name: f for f in text_string_to_metric_families(page)}
    assert set(families) == {"market_ingress_len", "market_frames_received", "market_fanout_latency_us"}
    # A histogram comes whole (buckets, count and sum) when one of its names is asked for.
    assert {s.name for s in families["market_fanout_latency_us"].samples} == {
        "market_fanout_latency_us_bucket", "market_fanout_latency_us_count", "market_fanout_latency_us_sum"}
    assert Exposition(collector.parts).render(frozenset({"nothing"})) == b""


def test_a_histogram_with_an_le_label_or_a_name_it_would_rewrite_is_refused() -> None:
    for name, labels in (("h_us", {"le": "1"}), ("h-us", {}), ("h_us", {"a.b": "1"})):
        page = Exposition(lambda name=name, labels=labels: [Histograms(name, "d", [(labels, hist_of([1]))])])
        with pytest.raises(ValueError, match="must be plain"):
            page.render()


def test_a_label_set_beyond_the_cache_starts_it_over() -> None:
    import ingestor.exposition as expo

    series = [({"k": str(i)}, hist_of([i])) for i in range(expo.MAX_CACHED_SERIES + 5)]
    parts: list[Part] = [Histograms("many_us", "many label sets", series)]
    page = Exposition(lambda: parts)
    assert page.render() == generate_latest(Families(parts))
    assert len(page._prefixes) <= expo.MAX_CACHED_SERIES
    assert page.render() == generate_latest(Families(parts))


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read()


def test_the_exporter_serves_the_page_over_http() -> None:
    collector = collector_of(loaded_ingestor())
    port = free_port()
    before = set(threading.enumerate())
    server, thread = serve_metrics(loaded_ingestor(), "127.0.0.1", port)
    try:
        status, ctype, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and ctype == "text/plain; version=0.0.4; charset=utf-8"
        # The same page as rendered here, but for the thread count (the exporter's own threads are running).
        def without_threads(page: bytes) -> list[bytes]:
            return [line for line in page.splitlines() if not line.startswith(b"market_threads ")]

        assert without_threads(body) == without_threads(Exposition(collector.parts).render())
        status, _, body = _get(f"http://127.0.0.1:{port}/metrics?name[]=market_ingress_len")
        assert status == 200 and body.decode().splitlines()[-1] == "market_ingress_len 0.0"
        with pytest.raises(urllib.error.HTTPError) as err:
            _get(f"http://127.0.0.1:{port}/favicon.ico")
        assert err.value.code == 404
        err.value.close()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 405 and err.value.headers["Allow"] == "GET"
        err.value.close()
        # The port taken: a clear error, not a traceback from the socket layer.
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            serve_metrics(loaded_ingestor(), "127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert not [t for t in threading.enumerate() if t not in before and t.is_alive()]


def test_the_exporter_binds_an_ipv6_address_when_given_one() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("::1 cannot be bound here")
    port = free_port()
    server, thread = start_exporter(Exposition(lambda: [GaugeMetricFamily("one", "one", value=1)]), "::1", port)
    try:
        status, _, body = _get(f"http://[::1]:{port}/metrics")
        assert status == 200 and body.endswith(b"one 1.0\n")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
