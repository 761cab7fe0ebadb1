"""The agent's Prometheus metrics and the HTTP endpoint that serves them (``--metrics-port``).

Each ``AgentMetrics`` owns its own ``CollectorRegistry`` (so several agents can live in one
process, as in tests) and labels every series with the device id, so the testbed's agents
stay apart when one Prometheus scrapes them all:

- ``edgeswarm_requests_total`` / ``edgeswarm_request_seconds`` (histogram): requests served;
- ``edgeswarm_bytes_sent_total`` / ``edgeswarm_bytes_received_total``: data-plane bytes;
- ``edgeswarm_shards_loaded``: shards currently loaded (gauge);
- ``edgeswarm_rejected_messages_total{reason}``: control messages refused, by reason;
- ``edgeswarm_heartbeats_total``: heartbeats published.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

from edgeswarm.placement.errors import Error

log = logging.getLogger("edgeswarm.agent.metrics")

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0)


class AgentMetrics:
    """The counters of one agent, and (after ``serve``) the endpoint that exposes them."""

    def __init__(self, device: str, reasons: Iterable[str] = ()) -> None:
        self.device = device
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        label = ("device",)
        self._requests = Counter("edgeswarm_requests", "Requests served by this device's shards.",
                                 label, registry=r).labels(device)
        self._latency = Histogram("edgeswarm_request_seconds",
                                  "Time to serve one request on this device, in seconds.",
                                  label, buckets=LATENCY_BUCKETS_S, registry=r).labels(device)
        self._sent = Counter("edgeswarm_bytes_sent", "Tensor bytes sent on the data plane.",
                             label, registry=r).labels(device)
        self._received = Counter("edgeswarm_bytes_received",
                                 "Tensor bytes received on the data plane.",
                                 label, registry=r).labels(device)
        self._shards = Gauge("edgeswarm_shards_loaded", "Shards currently loaded.",
                             label, registry=r).labels(device)
        self._rejected = Counter("edgeswarm_rejected_messages",
                                 "Control messages rejected, by reason.",
                                 ("device", "reason"), registry=r)
        self._heartbeats = Counter("edgeswarm_heartbeats", "Heartbeats published.",
                                   label, registry=r).labels(device)
        for reason in reasons:  # known reasons show up as 0 before the first rejection
            self._rejected.labels(device, reason)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def request(self, seconds: float) -> None:
        """Count one served request that took ``seconds``."""
        self._requests.inc()
        self._latency.observe(seconds)

    def bytes(self, sent: int, received: int) -> None:
        """Add data-plane bytes moved (both >= 0)."""
        self._sent.inc(sent)
        self._received.inc(received)

    def shards(self, n: int) -> None:
        """Set the number of shards loaded now."""
        self._shards.set(n)

    def reject(self, reason: str) -> None:
        """Count one rejected control message."""
        self._rejected.labels(self.device, reason).inc()

    def heartbeat(self) -> None:
        """Count one published heartbeat."""
        self._heartbeats.inc()

    def text(self) -> str:
        """The metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry).decode("utf-8")

    @property
    def port(self) -> int:
        """The port the endpoint listens on (useful after ``serve(0)``)."""
        if self._server is None:
            raise Error("the metrics endpoint is not serving: call serve(port) first")
        return int(self._server.server_port)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread (port 0 picks a free one)."""
        if self._server is not None:
            raise Error(f"the metrics endpoint already serves on port {self.port}; "
                        f"call stop() first")
        try:
            self._server, self._thread = start_http_server(port, addr=host,
                                                           registry=self.registry)
        except OSError as exc:
            raise Error(f"cannot serve metrics on {host}:{port}: {exc}; "
                        f"pick another --metrics-port") from exc
        log.info("metrics for %s on http://%s:%d/metrics", self.device, host, self.port)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut the endpoint down, release its port and join its thread."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout_s)
