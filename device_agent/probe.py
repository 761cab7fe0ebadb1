"""The data probe: a TCP echo service on the agent's data address (``--data-port``).

The data plane itself (gloo) connects on ports gloo picks. The probe gives the device's
data address something to answer with: :class:`DataProbe` echoes back whatever it
receives (at most ``max_bytes`` per connection, idle connections closed after
``timeout_s``), and :func:`measure_link` uses it from the coordinator's side to check that
the device is reachable on its data address and to measure the link — latency from
one-byte round trips, bandwidth from a stream echoed back.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time

from edgeswarm.placement.cluster import LinkSpec
from edgeswarm.placement.errors import DeviceLost, Error

log = logging.getLogger("edgeswarm.agent.probe")

MAX_BYTES = 256 << 20


class DataProbe:
    """An echo server on ``host:port`` (0: a free port) in a daemon thread."""

    def __init__(self, host: str, port: int = 0, timeout_s: float = 10.0,
                 max_bytes: int = MAX_BYTES) -> None:
        class Echo(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.settimeout(timeout_s)
                # no Nagle: a short last segment would wait for the client's delayed ACK
                # (40 ms), which made a 1 MB probe read as 20 MB/s on loopback
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                total = 0
                while total < max_bytes:
                    try:
                        chunk = self.request.recv(1 << 16)
                        if not chunk:
                            return
                        self.request.sendall(chunk)
                    except OSError:
                        return
                    total += len(chunk)

        server = socketserver.ThreadingTCPServer((host, port), Echo, bind_and_activate=False)
        server.daemon_threads = True
        server.allow_reuse_address = True
        try:
            server.server_bind()
            server.server_activate()
        except OSError as exc:
            server.server_close()
            raise Error(f"cannot open the data probe on {host}:{port}: {exc}; pick another "
                        f"--data-port (0 picks a free one)") from exc
        self._server = server
        self.host = host
        self.port: int = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,),
                                        daemon=True, name=f"edgeswarm-probe-{self.port}")
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the listener and join the thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def measure_link(host: str, port: int, nbytes: int = 1 << 20, rounds: int = 5,
                 timeout_s: float = 5.0) -> LinkSpec:
    """Latency and bandwidth to the data probe at ``host:port``.

    Latency is half the best of ``rounds`` one-byte round trips; bandwidth is ``nbytes``
    streamed there and back (both ways at once), less one round trip. Raises DeviceLost if
    the probe cannot be reached.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rtts = []
            for _ in range(max(1, rounds)):
                t0 = time.perf_counter()
                sock.sendall(b"\0")
                _read_exactly(sock, 1)
                rtts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sender = threading.Thread(target=sock.sendall, args=(bytes(nbytes),), daemon=True,
                                      name="edgeswarm-probe-send")
            sender.start()  # the echo comes back while we still send
            _read_exactly(sock, nbytes)
            elapsed = time.perf_counter() - t0
            sender.join(timeout_s)
    except OSError as exc:
        raise DeviceLost(f"cannot reach the data probe at {host}:{port}: {exc}; is the "
                         f"device's --data-host an address this machine reaches?") from exc
    rtt = min(rtts)
    return LinkSpec(bandwidth_Bps=nbytes / max(elapsed - rtt, 1e-9), latency_s=rtt / 2)


def _read_exactly(sock: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 16))
        if not chunk:
            raise ConnectionError(f"the data probe closed after {got} of {n} bytes")
        got += len(chunk)
