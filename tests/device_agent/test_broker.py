"""The brokers, exercised with a real paho-mqtt 2.x client over loopback: connect, retained
messages, the last will of a SIGKILLed client process, passwords, TLS, round-trip latency
(TCP_NODELAY), and clean start/stop."""

import os
import queue
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import pytest

from edgeswarm.device_agent.broker import (
    BrokerError,
    EmbeddedBroker,
    Mosquitto,
    TlsFiles,
    free_port,
    mosquitto_path,
)

BROKERS = ["mosquitto", "embedded_broker"]


class Probe:
    """A connected paho client that queues what it receives (MQTT 3.1.1, TCP_NODELAY)."""

    def __init__(self, uri: str, client_id: str, username: str | None = None,
                 password: str | None = None, cafile: Path | None = None,
                 timeout_s: float = 5.0) -> None:
        parts = urlsplit(uri)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[mqtt.ReasonCode] = queue.Queue()
        self.subacks: queue.Queue[int] = queue.Queue()
        self.timeout_s = timeout_s
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)
        self.client.on_subscribe = lambda c, u, mid, rcs, props: self.subacks.put(mid)
        self.client.on_socket_open = lambda c, u, sock: _nodelay(sock)
        if username is not None:
            self.client.username_pw_set(username, password)
        if cafile is not None:
            self.client.tls_set(ca_certs=str(cafile))
        self.client.connect(parts.hostname or "", parts.port or 1883, keepalive=30)
        self.client.loop_start()

    def accepted(self) -> bool:
        rc = self.connack.get(timeout=self.timeout_s)
        return not rc.is_failure

    def subscribe(self, topic: str, qos: int = 1) -> None:
        _, mid = self.client.subscribe(topic, qos)
        while self.subacks.get(timeout=self.timeout_s) != mid:
            pass

    def next(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=self.timeout_s)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _nodelay(sock: object) -> None:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for probe in made:
        probe.close()


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest) -> EmbeddedBroker | Mosquitto:
    return request.getfixturevalue(request.param)


def test_connect_and_retained_message(broker: EmbeddedBroker | Mosquitto,
                                      probes: list[Probe]) -> None:
    writer = Probe(broker.uri, "writer")
    probes.append(writer)
    assert writer.accepted()
    writer.client.publish("edgeswarm/v1/c/devices/a/state", b'{"status":"online"}', qos=1,
                          retain=True).wait_for_publish(5)
    # a client that subscribes afterwards still gets the last retained value
    reader = Probe(broker.uri, "reader")
    probes.append(reader)
    assert reader.accepted()
    reader.subscribe("edgeswarm/v1/c/devices/+/state")
    msg = reader.next()
    assert msg.topic == "edgeswarm/v1/c/devices/a/state"
    assert msg.payload == b'{"status":"online"}'
    assert msg.retain


WILL_CLIENT = """
import socket, sys, time
import paho.mqtt.client as mqtt
host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="doomed", protocol=mqtt.MQTTv311)
c.will_set(topic, b'{"status":"offline"}', qos=1, retain=True)
c.on_connect = lambda *a: print("connected", flush=True)
c.connect(host, port, keepalive=60)
c.loop_start()
time.sleep(60)
"""


def test_last_will_of_killed_client_is_delivered(broker: EmbeddedBroker | Mosquitto,
                                                 probes: list[Probe]) -> None:
    topic = "edgeswarm/v1/c/devices/doomed/state"
    watcher = Probe(broker.uri, "watcher")
    probes.append(watcher)
    assert watcher.accepted()
    watcher.subscribe(topic)
    parts = urlsplit(broker.uri)
    proc = subprocess.Popen([sys.executable, "-c", WILL_CLIENT, str(parts.hostname),
                             str(parts.port), topic], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "connected"
        assert watcher.messages.empty()  # no will while the client lives
        start = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        msg = watcher.next()
        elapsed = time.monotonic() - start
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert msg.topic == topic
    assert msg.payload == b'{"status":"offline"}'
    assert elapsed < 2.0


def test_round_trip_is_not_delayed_by_nagle(broker: EmbeddedBroker | Mosquitto,
                                            probes: list[Probe]) -> None:
    # A QoS 1 request/reply through the broker: without TCP_NODELAY on the broker's
    # sockets every round trip waits ~40 ms (Nagle + delayed ACK); with it, well under 5 ms.
    coordinator, agent = Probe(broker.uri, "coordinator"), Probe(broker.uri, "agent")
    probes += [coordinator, agent]
    assert coordinator.accepted() and agent.accepted()
    agent.client.on_message = lambda c, u, m: c.publish("events", m.payload, qos=1)
    agent.subscribe("cmd")
    coordinator.subscribe("events")
    seconds = []
    for seq in range(30):
        start = time.perf_counter()
        coordinator.client.publish("cmd", b"%d" % seq + b"." * 400, qos=1)
        assert coordinator.next().payload.startswith(b"%d." % seq)
        seconds.append(time.perf_counter() - start)
    assert statistics.median(seconds) < 0.02, f"median round trip {statistics.median(seconds)}"


def test_mosquitto_passwords(probes: list[Probe]) -> None:
    with Mosquitto(users={"agent": "s3cret word", "coordinator": "other"}) as broker:
        for username, password, ok in [("agent", "s3cret word", True),
                                       ("coordinator", "other", True),
                                       ("agent", "wrong", False), (None, None, False),
                                       ("intruder", "s3cret word", False)]:
            probe = Probe(broker.uri, f"p-{username}-{password}", username, password)
            probes.append(probe)
            assert probe.accepted() is ok, (username, password)
            probe.close()


def test_mosquitto_tls(mosquitto_tls: Mosquitto, probes: list[Probe]) -> None:
    assert mosquitto_tls.uri.startswith("mqtts://127.0.0.1:")
    assert mosquitto_tls.tls is not None
    probe = Probe(mosquitto_tls.uri, "tls-client", cafile=mosquitto_tls.tls.cafile)
    probes.append(probe)
    assert probe.accepted()
    probe.subscribe("t")
    probe.client.publish("t", b"over tls", qos=1)
    assert probe.next().payload == b"over tls"
    # a client that does not trust the CA is refused at the handshake
    context = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", mosquitto_tls.port), timeout=5) as raw, \
            pytest.raises(ssl.SSLCertVerificationError):
        context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_embedded_broker_stops_cleanly_with_clients_attached(no_leaked_threads: None) -> None:
    broker = EmbeddedBroker()
    broker.start()
    port = broker.port
    probe = Probe(broker.uri, "attached")
    try:
        assert probe.accepted()
        disconnected = threading.Event()
        probe.client.on_disconnect = lambda *a: disconnected.set()
        probe.client.reconnect_delay_set(60, 60)  # no reconnect attempts during the checks
        broker.stop()
        assert disconnected.wait(5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
    finally:
        probe.close()
    with pytest.raises(BrokerError, match="start"):
        _ = broker.uri


def test_embedded_broker_on_a_taken_port_says_so() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(BrokerError, match=f"127.0.0.1:{port}"):
            EmbeddedBroker(port=port, start_timeout_s=5).start()


def test_two_embedded_brokers_get_their_own_ports() -> None:
    with EmbeddedBroker() as a, EmbeddedBroker() as b:
        assert a.port != b.port
        assert a.uri == f"mqtt://127.0.0.1:{a.port}"


def test_mosquitto_stop_releases_the_port() -> None:
    port = free_port()
    broker = Mosquitto(port=port)
    broker.start()
    assert broker.uri == f"mqtt://127.0.0.1:{port}"
    socket.create_connection(("127.0.0.1", port), timeout=1).close()
    broker.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert mosquitto_path().name == "mosquitto"


def test_mosquitto_with_a_bad_tls_file_reports_its_log(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(BrokerError, match="log says"):
        Mosquitto(tls=TlsFiles(missing, missing, missing), start_timeout_s=5).start()
