"""The metrics endpoint, scraped over real HTTP on loopback and parsed as Prometheus text."""

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgeswarm.device_agent.metrics import AgentMetrics
from edgeswarm.placement.errors import Error


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics and return {(sample name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.fixture
def metrics(no_leaked_threads: None) -> Iterator[AgentMetrics]:
    m = AgentMetrics("pi-1", reasons=["bad_signature", "replayed"])
    m.serve(0)
    yield m
    m.stop()


def test_scrape_reports_what_was_counted(metrics: AgentMetrics) -> None:
    dev = ("device", "pi-1")
    before = scrape(metrics.port)
    assert before[("edgeswarm_requests_total", frozenset({dev}))] == 0
    assert before[("edgeswarm_rejected_messages_total",
                   frozenset({dev, ("reason", "replayed")}))] == 0

    for seconds in (0.003, 0.004, 0.2):
        metrics.request(seconds)
    metrics.bytes(sent=1000, received=250)
    metrics.bytes(sent=24, received=0)
    metrics.shards(3)
    metrics.reject("bad_signature")
    metrics.reject("bad_signature")
    metrics.reject("oversized")  # a reason not declared up front still counts
    metrics.heartbeat()

    after = scrape(metrics.port)
    assert after[("edgeswarm_requests_total", frozenset({dev}))] == 3
    assert after[("edgeswarm_request_seconds_count", frozenset({dev}))] == 3
    assert after[("edgeswarm_request_seconds_sum", frozenset({dev}))] == pytest.approx(0.207)
    assert after[("edgeswarm_request_seconds_bucket", frozenset({dev, ("le", "0.005")}))] == 2
    assert after[("edgeswarm_request_seconds_bucket", frozenset({dev, ("le", "0.25")}))] == 3
    assert after[("edgeswarm_bytes_sent_total", frozenset({dev}))] == 1024
    assert after[("edgeswarm_bytes_received_total", frozenset({dev}))] == 250
    assert after[("edgeswarm_shards_loaded", frozenset({dev}))] == 3
    rejected = {dict(labels)["reason"]: v for (name, labels), v in after.items()
                if name == "edgeswarm_rejected_messages_total"}
    assert rejected == {"bad_signature": 2, "replayed": 0, "oversized": 1}
    assert after[("edgeswarm_heartbeats_total", frozenset({dev}))] == 1
    assert metrics.text().count("edgeswarm_shards_loaded{") == 1


def test_two_agents_in_one_process_keep_their_own_counts(metrics: AgentMetrics) -> None:
    other = AgentMetrics("pi-2")
    other.request(1.0)
    other.serve(0)
    try:
        assert scrape(other.port)[("edgeswarm_requests_total",
                                   frozenset({("device", "pi-2")}))] == 1
        assert scrape(metrics.port)[("edgeswarm_requests_total",
                                     frozenset({("device", "pi-1")}))] == 0
    finally:
        other.stop()


def test_stop_releases_the_port(no_leaked_threads: None) -> None:
    m = AgentMetrics("pi-3")
    m.serve(0)
    port = m.port
    scrape(port)
    m.stop()
    with pytest.raises(urllib.error.URLError):
        scrape(port)
    with pytest.raises(Error, match="serve"):
        _ = m.port
    m.stop()  # stopping twice is harmless


def test_a_taken_port_names_the_option(metrics: AgentMetrics) -> None:
    with pytest.raises(Error, match="--metrics-port"):
        AgentMetrics("pi-4").serve(metrics.port)
