"""ControlClient against real brokers on loopback: sealed round trips through Mosquitto and the
embedded amqtt broker, TCP_NODELAY on the socket, clear connect errors (no broker, bad
password, TLS), retained messages, and reconnecting after the broker restarts."""

import queue
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from edgeswarm.device_agent import protocol, topics
from edgeswarm.device_agent.broker import EmbeddedBroker, Mosquitto, free_port
from edgeswarm.device_agent.control import ConnectError, ControlClient, TlsConfig, parse_uri
from edgeswarm.placement.errors import InvalidInput

KEY = bytes(range(32))
BROKERS = ["mosquitto", "embedded_broker"]
PING = topics.cmd("t", "dev")


@pytest.fixture(params=BROKERS)
def broker_uri(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(request.param).uri)


@pytest.fixture
def clients() -> Iterator[list[ControlClient]]:
    made: list[ControlClient] = []
    yield made
    for c in made:
        c.stop()


def connect(made: list[ControlClient], uri: str, name: str, **kw: object) -> ControlClient:
    c = ControlClient(uri, name, key=KEY, **kw)  # type: ignore[arg-type]
    made.append(c)
    c.start()
    return c


def collector() -> tuple[queue.Queue[tuple[str, bytes]], object]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    return got, lambda topic, raw: got.put((topic, raw))


def test_a_sealed_message_arrives_as_raw_bytes_that_unseal(
        broker_uri: str, clients: list[ControlClient], no_leaked_threads: None) -> None:
    got, handler = collector()
    rx = connect(clients, broker_uri, "rx")
    rx.subscribe(f"{topics.ROOT}/t/devices/+/cmd", handler)  # type: ignore[arg-type]
    tx = connect(clients, broker_uri, "coordinator")
    tx.publish(PING, protocol.Ping(seq=7))
    topic, raw = got.get(timeout=5)
    sender, body = protocol.unseal(KEY, topic, raw, time.time(), protocol.ReplayGuard(),
                                   protocol.COMMAND)
    assert (topic, sender, body) == (PING, "coordinator", protocol.Ping(seq=7))
    for c in clients:
        c.stop()


def test_the_socket_has_tcp_nodelay_and_round_trips_are_fast(
        broker_uri: str, clients: list[ControlClient]) -> None:
    echo = connect(clients, broker_uri, "echo")
    echo.subscribe(PING, lambda t, raw: echo.publish_raw(topics.events("t", "dev"), raw))
    got, handler = collector()
    tx = connect(clients, broker_uri, "tx")
    tx.subscribe(topics.events("t", "dev"), handler)  # type: ignore[arg-type]
    for c in (echo, tx):
        sock = c._client.socket()
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    rtts = []
    for seq in range(20):
        t0 = time.perf_counter()
        tx.publish(PING, protocol.Ping(seq=seq))
        got.get(timeout=5)
        rtts.append(time.perf_counter() - t0)
    rtts.sort()
    # Nagle's algorithm would put the median at 40 ms or more
    assert rtts[len(rtts) // 2] < 0.03, rtts


def test_retained_messages_reach_a_later_subscriber(
        broker_uri: str, clients: list[ControlClient]) -> None:
    tx = connect(clients, broker_uri, "tx")
    tx.publish(topics.heartbeat("t", "dev"), protocol.Heartbeat(seq=1), retain=True, wait=True)
    got, handler = collector()
    rx = connect(clients, broker_uri, "rx")
    rx.subscribe(topics.all_heartbeats("t"), handler)  # type: ignore[arg-type]
    topic, raw = got.get(timeout=5)
    assert topic == topics.heartbeat("t", "dev")
    _, body = protocol.unseal(KEY, topic, raw, time.time(), None, protocol.Heartbeat, None)
    assert body.seq == 1


def test_a_failing_handler_does_not_stop_the_client(
        mosquitto: Mosquitto, clients: list[ControlClient]) -> None:
    got, handler = collector()
    rx = connect(clients, mosquitto.uri, "rx")

    def explode(topic: str, raw: bytes) -> None:
        raise RuntimeError("handler bug")

    rx.subscribe(topics.cmd("t", "boom"), explode)
    rx.subscribe(PING, handler)  # type: ignore[arg-type]
    tx = connect(clients, mosquitto.uri, "tx")
    tx.publish(topics.cmd("t", "boom"), protocol.Ping(seq=1))
    tx.publish(PING, protocol.Ping(seq=2))
    assert got.get(timeout=5)[0] == PING
    assert rx.connected


def test_no_broker_is_a_clear_error_naming_it() -> None:
    port = free_port()
    c = ControlClient(f"mqtt://127.0.0.1:{port}", "x", key=KEY, connect_timeout_s=2)
    with pytest.raises(ConnectError, match=f"mqtt://127.0.0.1:{port}.*running"):
        c.start()
    c.stop()


def test_a_wrong_password_is_refused_with_a_hint() -> None:
    with Mosquitto(users={"agent": "right"}) as broker:
        bad = ControlClient(broker.uri, "x", key=KEY, username="agent", password="wrong",
                            connect_timeout_s=3)
        with pytest.raises(ConnectError, match=r"refused.*--password-file"):
            bad.start()
        good = ControlClient(broker.uri, "y", key=KEY, username="agent", password="right")
        good.start()
        assert good.connected
        good.stop()


def test_tls_with_the_right_ca_connects_and_without_it_fails(
        mosquitto_tls: Mosquitto, clients: list[ControlClient]) -> None:
    assert mosquitto_tls.tls is not None
    uri = mosquitto_tls.uri
    assert uri.startswith("mqtts://")
    got, handler = collector()
    rx = connect(clients, uri, "rx", tls=TlsConfig(ca=mosquitto_tls.tls.cafile))
    rx.subscribe(PING, handler)  # type: ignore[arg-type]
    tx = connect(clients, uri, "tx", tls=TlsConfig(ca=mosquitto_tls.tls.cafile))
    tx.publish(PING, protocol.Ping(seq=3))
    assert got.get(timeout=5)[0] == PING
    untrusting = ControlClient(uri, "z", key=KEY, connect_timeout_s=3)  # system CAs only
    with pytest.raises(ConnectError, match=r"TLS handshake.*--tls-ca"):
        untrusting.start()
    untrusting.stop()


def test_the_client_reconnects_and_resubscribes_after_the_broker_restarts(
        clients: list[ControlClient]) -> None:
    port = free_port()
    first = EmbeddedBroker(port=port)
    first.start()
    got, handler = collector()
    reconnected = threading.Event()
    try:
        rx = connect(clients, first.uri, "rx")
        rx.subscribe(PING, handler)  # type: ignore[arg-type]
        rx.on_connect(reconnected.set)
    finally:
        first.stop()
    with EmbeddedBroker(port=port) as second:
        assert reconnected.wait(10), "no reconnect within 10 s"
        tx = connect(clients, second.uri, "tx")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # the resubscription is in flight
            tx.publish(PING, protocol.Ping(seq=1))
            try:
                assert got.get(timeout=0.2)[0] == PING
                break
            except queue.Empty:
                continue
        else:
            pytest.fail("no message after the reconnect")
        for c in clients:
            c.stop()


@pytest.mark.parametrize("uri", ["http://h:1", "mqtt://", "mqtt://h:notaport", "mqtt://u:p@h:1",
                                 "mqtt://h:1/path"])
def test_bad_broker_uris_are_refused(uri: str) -> None:
    with pytest.raises(InvalidInput, match="broker URI"):
        parse_uri(uri)


def test_uris_default_their_port() -> None:
    assert parse_uri("mqtt://pi.local").uri == "mqtt://pi.local:1883"
    assert parse_uri("mqtts://pi.local").uri == "mqtts://pi.local:8883"
